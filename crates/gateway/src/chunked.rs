//! Where a chunked body ends (RFC 9112 §7.1), found while its bytes pass through
//! unchanged: the gateway relays a runner's chunked answer as it comes, and needs to
//! know only when the last chunk and the trailers are over, so that the connection can
//! serve the next call.

/// Reads the framing of one chunked body, fed its bytes in pieces of any size.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    state: State,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a chunk's size line: its value so far, whether a digit came, whether the
    /// digits have ended (an extension or whitespace follows).
    #[default]
    Size0,
    Size {
        value: u64,
        ended: bool,
    },
    /// After the size line's CR.
    SizeLf {
        value: u64,
    },
    /// This many bytes of chunk data still to come.
    Data(u64),
    DataCr,
    DataLf,
    /// In the trailer section: the length of the line so far.
    Trailer {
        line: usize,
    },
    TrailerLf {
        line: usize,
    },
    Done,
}

/// The body is not validly chunked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Malformed;

/// A size line or trailer line longer than this is refused.
const MAX_LINE: usize = 8 * 1024;

impl Chunked {
    /// Takes the next `bytes` of the body. `Some(n)`: the body ended after the first `n`
    /// of them (any further bytes are not part of it). `None`: it goes on.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, Malformed> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                State::Done => return Ok(Some(i)),
                State::Data(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == left { State::DataCr } else { State::Data(left - take) };
                    continue;
                }
                State::Size0 => State::Size { value: hex(b).ok_or(Malformed)?, ended: false },
                State::Size { value, ended } => match (b, hex(b)) {
                    (b'\r', _) => State::SizeLf { value },
                    (_, Some(d)) if !ended => State::Size {
                        value: value.checked_mul(16).and_then(|v| v.checked_add(d)).ok_or(Malformed)?,
                        ended,
                    },
                    // An extension (`;name=value`) or whitespace before it: skipped.
                    (b'\n', _) => return Err(Malformed),
                    _ => State::Size { value, ended: true },
                },
                State::SizeLf { value } => match b {
                    b'\n' if value == 0 => State::Trailer { line: 0 },
                    b'\n' => State::Data(value),
                    _ => return Err(Malformed),
                },
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::Size0,
                State::DataCr | State::DataLf => return Err(Malformed),
                State::Trailer { line } => match b {
                    b'\r' => State::TrailerLf { line },
                    b'\n' => return Err(Malformed),
                    _ if line >= MAX_LINE => return Err(Malformed),
                    _ => State::Trailer { line: line + 1 },
                },
                State::TrailerLf { line } => match b {
                    b'\n' if line == 0 => State::Done,
                    b'\n' => State::Trailer { line: 0 },
                    _ => return Err(Malformed),
                },
            };
            if let State::Size { value, .. } = self.state
                && value > (1 << 60)
            {
                return Err(Malformed);
            }
            i += 1;
        }
        Ok((self.state == State::Done).then_some(bytes.len()))
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where a body ends, if it does.
    type End = Result<Option<usize>, Malformed>;

    /// Feeds `body` whole and in every split into two pieces; each way, where the body
    /// ends must be the same.
    fn end_of(body: &[u8]) -> End {
        let whole = Chunked::default().feed(body);
        for at in 0..=body.len() {
            let mut chunked = Chunked::default();
            let split = match chunked.feed(&body[..at]) {
                Ok(Some(n)) => Ok(Some(n)),
                Ok(None) => chunked.feed(&body[at..]).map(|end| end.map(|n| at + n)),
                Err(e) => Err(e),
            };
            assert_eq!(split, whole, "split at {at} of {:?}", String::from_utf8_lossy(body));
        }
        whole
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers() {
        let cases: &[(&[u8], End)] = &[
            (b"0\r\n\r\n", Ok(Some(5))),
            (b"5\r\nhello\r\n0\r\n\r\n", Ok(Some(15))),
            (b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1", Ok(Some(15))),
            (b"A\r\n0123456789\r\n0\r\n\r\n", Ok(Some(20))),
            (b"a;name=value\r\n0123456789\r\n0\r\n\r\n", Ok(Some(31))),
            (b"1 ; x\r\nz\r\n0\r\n\r\n", Ok(Some(15))),
            (b"0\r\nx-trailer: 1\r\n\r\n", Ok(Some(19))),
            // Not over yet.
            (b"5\r\nhel", Ok(None)),
            (b"5\r\nhello\r\n", Ok(None)),
            (b"0\r\n", Ok(None)),
            (b"0\r\nx-trailer: 1\r\n", Ok(None)),
            (b"", Ok(None)),
            // Not chunked.
            (b"x\r\n", Err(Malformed)),
            (b"\r\n", Err(Malformed)),
            (b"5\nhello", Err(Malformed)),
            (b"5\r\nhelloX\r\n", Err(Malformed)),
            (b"1 2\r\n", Ok(None)),
            (b"ffffffffffffffffff\r\n", Err(Malformed)),
            (b"0\r\nbad\n", Err(Malformed)),
        ];
        for (body, want) in cases {
            assert_eq!(&end_of(body), want, "{:?}", String::from_utf8_lossy(body));
        }
    }
}
