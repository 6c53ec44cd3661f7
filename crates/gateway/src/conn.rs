//! Timeouts of a served HTTP/1.1 connection, for both listeners: how long it may sit
//! idle waiting for a request, and how long a request's headers may take once its first
//! byte has come.
//!
//! hyper has one timer for both (`header_read_timeout` starts when the connection is
//! ready for the next request), so an idle keep-alive connection would be closed as soon
//! as a slow header would. Here a connection's [`Activity`] is kept by its stream (the
//! first byte of a request), its service (a request has started) and its response body
//! (the answer is done), all in the connection's own task, and [`Timeouts::serve`] closes
//! it when the phase it is in has lasted too long. hyper's own timer stays as a backstop
//! past both.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use api::error::{ApiError, ErrorCode};

/// How long a connection may stay in each phase.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timeouts {
    /// From the first byte of a request to the end of its headers.
    pub header_read: Duration,
    /// From the end of an answer (or the connection's start) to the first byte of the
    /// next request.
    pub idle: Duration,
}

/// `idle_since` while a request is being served; `first_byte` before one has come.
const NONE: u64 = u64::MAX;

/// What a connection is doing, as nanoseconds since `origin`.
pub struct Activity {
    origin: Instant,
    /// When the last answer ended (or the connection started); NONE while serving one.
    idle_since: AtomicU64,
    /// When the first byte after `idle_since` was read; NONE until then.
    first_byte: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity { origin: Instant::now(), idle_since: AtomicU64::new(0), first_byte: AtomicU64::new(NONE) })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(NONE - 1)
    }

    /// A request's headers have been read and it is being served.
    pub fn request_started(&self) {
        self.idle_since.store(NONE, Relaxed);
    }

    /// The answer is done: the connection waits for the next request.
    pub(crate) fn request_ended(&self) {
        self.first_byte.store(NONE, Relaxed);
        self.idle_since.store(self.now(), Relaxed);
    }

    /// Between requests, with no byte of the next one read.
    fn waiting(&self) -> bool {
        self.idle_since.load(Relaxed) != NONE && self.first_byte.load(Relaxed) == NONE
    }

    /// A new request's bytes have come, and it has not reached a service: whatever is
    /// written now is hyper's own answer to a request it could not read.
    fn reading_head(&self) -> bool {
        self.idle_since.load(Relaxed) != NONE && self.first_byte.load(Relaxed) != NONE
    }

    fn bytes_read(&self) {
        if self.first_byte.load(Relaxed) == NONE && self.idle_since.load(Relaxed) != NONE {
            self.first_byte.store(self.now(), Relaxed);
        }
    }

    /// When to look at the connection next, and whether the phase it is in has run out.
    ///
    /// Nothing wakes the watcher when a phase begins, so it looks at least every
    /// `header_read`: a request's first byte, come since, is then found before its
    /// headers' time is up, and the header deadline is kept exactly.
    fn deadline(&self, timeouts: Timeouts) -> (Instant, bool) {
        let now = Instant::now();
        let at = |since: u64, limit: Duration| self.origin + Duration::from_nanos(since) + limit;
        let deadline = match (self.idle_since.load(Relaxed), self.first_byte.load(Relaxed)) {
            // Serving: nothing runs out.
            (NONE, _) => return (now + timeouts.header_read, false),
            (idle_since, NONE) => at(idle_since, timeouts.idle),
            (_, first_byte) => at(first_byte, timeouts.header_read),
        };
        (deadline.min(now + timeouts.header_read), deadline <= now)
    }
}

impl Timeouts {
    /// hyper's own header timer, which starts when the connection is ready for a
    /// request: past the end of both phases, so it only acts if this module did not.
    pub fn hyper_backstop(&self) -> Duration {
        self.idle + self.header_read + Duration::from_secs(1)
    }

    /// A new connection's activity, and its stream wrapped to keep it.
    pub fn watch<S>(&self, stream: S) -> (Arc<Activity>, Watched<S>) {
        let activity = Activity::new();
        (activity.clone(), Watched { stream, activity, unread: BytesMut::new(), rewritten: Bytes::new() })
    }

    /// Drives `connection` (the connection `activity` belongs to) until it ends, or until
    /// it has been idle or reading headers for too long, when it is dropped (closed).
    /// With `closing`, once that is cancelled the connection is also dropped as soon as
    /// it waits for a request (one in progress is answered first). None when it was
    /// closed so.
    pub async fn serve<F: Future>(
        &self,
        activity: &Activity,
        connection: F,
        closing: Option<&CancellationToken>,
    ) -> Option<F::Output> {
        let mut connection = std::pin::pin!(connection);
        let mut closed = closing.is_none();
        loop {
            let (wake, _) = activity.deadline(*self);
            tokio::select! {
                biased;
                ended = &mut connection => return Some(ended),
                () = tokio::time::sleep_until(wake) => {
                    if activity.deadline(*self).1 {
                        return None;
                    }
                }
                () = async { if let Some(closing) = closing { closing.cancelled().await } }, if !closed => {
                    closed = true;
                }
            }
            if closed && closing.is_some() && activity.waiting() {
                return None;
            }
        }
    }
}

/// A connection's stream, noting when a request's first byte arrives. Bytes read
/// already can be put back ([`unread`](Watched::unread)), to be read again first.
pub struct Watched<S> {
    stream: S,
    activity: Arc<Activity>,
    unread: BytesMut,
    /// hyper's own error answer, with the JSON error body every other error has, still
    /// to be written in its place.
    rewritten: Bytes,
}

impl<S> Watched<S> {
    /// Puts `bytes`, read from this stream, back in front of what it reads next.
    pub(crate) fn unread(&mut self, bytes: BytesMut) {
        self.unread = bytes;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.unread.is_empty() {
            // Their arrival was noted when they were first read.
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            self.unread.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> Watched<S> {
    /// Takes `buf` in place of writing it when it is hyper's own answer to a request it
    /// could not read (a 400, 414 or 431 with no body), to write that answer with the
    /// JSON error body instead.
    fn rewrite(&mut self, buf: &[u8]) -> bool {
        if !self.rewritten.is_empty() || !self.activity.reading_head() {
            return false;
        }
        match with_error_body(buf) {
            Some(answer) => {
                self.rewritten = answer;
                true
            }
            None => false,
        }
    }

    /// Writes what is left of a rewritten answer.
    fn poll_rewritten(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.rewritten.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.stream).poll_write(cx, &self.rewritten))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.rewritten.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.rewrite(buf) {
            // Taken whole; it goes out now or at the flush that follows.
            let _ = self.poll_rewritten(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        std::task::ready!(self.poll_rewritten(cx))?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let [only] = bufs
            && self.rewrite(only)
        {
            let _ = self.poll_rewritten(cx)?;
            return Poll::Ready(Ok(only.len()));
        }
        std::task::ready!(self.poll_rewritten(cx))?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_rewritten(cx))?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_rewritten(cx))?;
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// hyper's answers to a request it cannot read, as it writes them (`connection: close`,
/// no body, then its date), and the error each is.
const HYPER_ERRORS: [(&str, ErrorCode, &str); 3] = [
    (
        "HTTP/1.1 400 Bad Request\r\n",
        ErrorCode::InvalidRequest,
        "the request could not be read as HTTP/1.1: its request line or a header is malformed",
    ),
    (
        "HTTP/1.1 414 URI Too Long\r\n",
        ErrorCode::UriTooLong,
        "the request's target (its path and query) is longer than this server reads (64 KiB)",
    ),
    (
        "HTTP/1.1 431 Request Header Fields Too Large\r\n",
        ErrorCode::HeadersTooLarge,
        "the request's headers are larger than this server reads",
    ),
];

/// `answer` with the JSON error body, when it is one of hyper's own error answers.
fn with_error_body(answer: &[u8]) -> Option<Bytes> {
    let text = std::str::from_utf8(answer).ok()?;
    let (line, code, message) = HYPER_ERRORS.iter().find(|(line, ..)| text.starts_with(line))?;
    let rest = text[line.len()..].strip_prefix("connection: close\r\ncontent-length: 0\r\n")?;
    let date = rest.strip_prefix("date: ")?.strip_suffix("\r\n\r\n")?;
    if date.contains('\n') {
        return None;
    }
    let body = ApiError::new(*code, *message).json();
    let head = format!(
        "{line}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\ndate: {date}\r\n\r\n",
        body.len()
    );
    Some([head.as_bytes(), &body].concat().into())
}

/// An answer's body that tells the connection's activity when it is done (sent, or
/// dropped).
pub struct Answer<B> {
    body: B,
    activity: Arc<Activity>,
}

impl<B> Answer<B> {
    pub fn new(body: B, activity: Arc<Activity>) -> Answer<B> {
        Answer { body, activity }
    }
}

impl<B> Drop for Answer<B> {
    fn drop(&mut self) {
        self.activity.request_ended();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Answer<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_error_answers_get_the_json_error_body_and_nothing_else_does() {
        let date = "date: Thu, 03 Dec 2026 20:47:52 GMT\r\n\r\n";
        let hyper = |line: &str| format!("{line}\r\nconnection: close\r\ncontent-length: 0\r\n{date}");
        let table = [
            (hyper("HTTP/1.1 400 Bad Request"), Some(("400 Bad Request", "invalid_request"))),
            (hyper("HTTP/1.1 414 URI Too Long"), Some(("414 URI Too Long", "uri_too_long"))),
            (hyper("HTTP/1.1 431 Request Header Fields Too Large"), Some(("431", "headers_too_large"))),
            // Anything else is written as it is.
            (hyper("HTTP/1.1 404 Not Found"), None),
            (hyper("HTTP/1.1 400 Bad Request").replace("content-length: 0", "content-length: 2"), None),
            (format!("{}{{}}", hyper("HTTP/1.1 400 Bad Request")), None),
            ("HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n\r\n".to_owned(), None),
            (String::new(), None),
        ];
        for (answer, expected) in table {
            let got = with_error_body(answer.as_bytes()).map(|b| String::from_utf8(b.to_vec()).unwrap());
            match (got, expected) {
                (None, None) => {}
                (Some(got), Some((status, code))) => {
                    let (head, body) = got.split_once("\r\n\r\n").unwrap();
                    assert!(head.contains(status) && head.contains("content-type: application/json"), "{head}");
                    assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
                    assert!(head.ends_with("date: Thu, 03 Dec 2026 20:47:52 GMT"), "{head}");
                    assert!(body.contains(&format!("\"code\":\"{code}\"")), "{body}");
                }
                (got, expected) => panic!("{answer:?}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    const T: Timeouts = Timeouts { header_read: Duration::from_secs(2), idle: Duration::from_secs(10) };

    /// The phases a connection goes through and when each runs out, on a paused clock.
    #[tokio::test(start_paused = true)]
    async fn each_phase_has_its_own_deadline() {
        let activity = Activity::new();
        let start = Instant::now();
        let after = |s: u64| start + Duration::from_secs(s);
        // A new connection is idle until a byte comes; its watcher looks in as often as a
        // header may take.
        assert_eq!(activity.deadline(T), (after(2), false));
        tokio::time::advance(Duration::from_secs(3)).await;
        activity.bytes_read();
        assert_eq!(activity.deadline(T), (after(5), false));
        // More bytes of the same head do not move the deadline.
        tokio::time::advance(Duration::from_secs(1)).await;
        activity.bytes_read();
        assert_eq!(activity.deadline(T), (after(5), false));
        // Serving a request has no deadline here however long it takes.
        activity.request_started();
        tokio::time::advance(Duration::from_secs(100)).await;
        activity.bytes_read();
        assert!(!activity.deadline(T).1);
        // After the answer, idle again: longer than a header may take.
        activity.request_ended();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(activity.deadline(T), (after(114), false));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(activity.deadline(T), (after(114), false));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(activity.deadline(T), (after(114), true));
    }
}
