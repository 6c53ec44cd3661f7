//! The gateway's own HTTP/1.1 path for the calls nearly all traffic is made of: a call
//! to an app this server runs, with no body or a small one of known length, answered
//! with a body of known length, chunked, or none.
//!
//! hyper's server and client, back to back, made each call cost the gateway about twice
//! the user time nginx spends (BENCHMARKS.md, "P1 with a fast runner"): a request is
//! parsed into a `HeaderMap`, copied into a new request, handed to the client's
//! connection and encoded again, and the answer takes the same way back. Here the head
//! is parsed once, in place, with `httparse` (the parser hyper itself uses), and the
//! request the runner gets is written straight from the caller's bytes; the runner's
//! answer is parsed the same way and its body passes through unchanged, as it comes.
//! Every call still goes through the same checks as on hyper's path: the app's auth
//! mode, a slot on a runner (waiting in the app's queue), the start deadline and the
//! request timeout, the metrics, and the response headers naming runner, revision and
//! call.
//!
//! Whatever this path does not take (a chunked or large request body, `Expect`,
//! `Upgrade`, HTTP/1.0, the queue, an app another server runs or none does, a head it
//! cannot parse) is decided from the head alone, before anything has happened: the
//! connection, with the bytes read so far, goes to hyper for the rest of its life
//! ([`Ended::HandOver`]), and hyper's path answers as it always has.

use std::cell::RefCell;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use api::error::{ApiError, ErrorCode};
use axum::response::IntoResponse;
use bytes::{Buf, BytesMut};
use netns::Endpoint;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::chunked::Chunked;
use crate::conn::Activity;
use crate::pool::{Pool, Pooled};
use crate::route::{AppRoute, Lease};
use crate::{AppPath, Gateway};

/// The longest request head this path reads; a longer one goes to hyper (which answers
/// 431 past its own limit).
const MAX_HEAD: usize = 64 * 1024;
/// The most headers of a request or answer parsed here.
const MAX_HEADERS: usize = 100;
/// Request bodies up to this size are read whole and sent with the head; larger ones
/// stream through hyper's path.
const MAX_BODY: usize = 64 * 1024;
/// The longest answer head a runner may send.
const MAX_ANSWER_HEAD: usize = 400 * 1024;
/// How much of an answer's body is read at a time.
const READ_CHUNK: usize = 16 * 1024;

/// How a connection left this path.
pub(crate) enum Ended<S> {
    /// It is closed, or is to be.
    Done,
    /// It is hyper's from now on, starting with these bytes, read already.
    HandOver(S, BytesMut),
}

/// Serves calls on one connection until it closes, or until one comes that this path
/// does not take. `activity` is the connection's, kept by `stream`'s reads.
pub(crate) async fn serve<S>(
    gateway: &Gateway,
    mut stream: S,
    activity: &Activity,
    closing: &CancellationToken,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Connection::default();
    loop {
        let call = loop {
            if !conn.input.is_empty() {
                match parse_request(gateway, &conn.input, &mut conn.forward) {
                    Parsed::Call(call) => break call,
                    Parsed::Partial if conn.input.len() < MAX_HEAD => {}
                    Parsed::Partial | Parsed::NotMine => {
                        return Ended::HandOver(stream, conn.input);
                    }
                }
            }
            if !read_more(&mut stream, &mut conn).await {
                return Ended::Done;
            }
        };
        while conn.input.len() < call.head_len + call.body_len {
            if !read_more(&mut stream, &mut conn).await {
                return Ended::Done;
            }
        }
        activity.request_started();
        let keep = conn.call(gateway, &mut stream, &call).await;
        activity.request_ended();
        conn.input.advance(call.head_len + call.body_len);
        if !keep || closing.is_cancelled() {
            let _ = stream.shutdown().await;
            return Ended::Done;
        }
        if conn.input.is_empty() {
            // Idle until the next request: the buffers serve other connections meanwhile.
            spare::give(std::mem::take(&mut conn));
        }
    }
}

/// Reads what has come into the connection's input. False when the peer has closed it.
///
/// A connection waiting for its next request holds no buffers: they are lent from the
/// thread's spares for as long as bytes are coming, and go back whenever a read would
/// wait with nothing read, so that an idle kept-alive connection costs little memory.
async fn read_more<S: AsyncRead + Unpin>(stream: &mut S, conn: &mut Connection) -> bool {
    std::future::poll_fn(|cx| {
        if conn.input.capacity() == 0 {
            *conn = spare::take();
        } else if conn.input.capacity() - conn.input.len() < 1024 {
            conn.input.reserve(4096);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, &mut conn.input) {
            Poll::Pending => {
                if conn.input.is_empty() {
                    spare::give(std::mem::take(conn));
                }
                Poll::Pending
            }
            Poll::Ready(read) => Poll::Ready(matches!(read, Ok(n) if n > 0)),
        }
    })
    .await
}

/// Buffers that connections of this thread are not using now.
mod spare {
    use std::cell::RefCell;

    use super::{Connection, READ_CHUNK};

    /// Spares kept per thread; past that, buffers given back are freed.
    const KEPT: usize = 256;

    thread_local! {
        static SPARE: RefCell<Vec<Connection>> = const { RefCell::new(Vec::new()) };
    }

    /// Empty buffers, with room to read a request into.
    pub(super) fn take() -> Connection {
        let mut conn = SPARE.with(|spare| spare.borrow_mut().pop()).unwrap_or_default();
        conn.input.reserve(4096);
        conn
    }

    /// Buffers no longer used, unless they have grown large (a big body has passed).
    pub(super) fn give(mut conn: Connection) {
        conn.input.clear();
        // Takes back the room that reading moved past: the buffer is this handle's alone.
        conn.input.reserve(4096);
        if conn.input.capacity() > 4 * READ_CHUNK || conn.output.capacity() > 4 * READ_CHUNK {
            return;
        }
        conn.output.clear();
        conn.forward.clear();
        conn.answer.clear();
        SPARE.with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < KEPT {
                spare.push(conn);
            }
        });
    }
}

/// What one connection uses for a call: its buffers, lent from the thread's spares
/// while it has a request to read or answer.
#[derive(Default)]
struct Connection {
    /// Bytes from the caller, from the start of the current request.
    input: BytesMut,
    /// What is written next: the request to the runner, then the answer to the caller.
    output: Vec<u8>,
    /// The caller's headers that go on to the runner, as ranges of `input`.
    forward: Vec<(Range<usize>, Range<usize>)>,
    /// The runner's headers that go back to the caller, as ranges of its answer.
    answer: Vec<(Range<usize>, Range<usize>)>,
}

/// A request this path takes, as ranges of the connection's input.
struct Call {
    route: Arc<AppRoute>,
    head_len: usize,
    body_len: usize,
    method: Range<usize>,
    /// The parts of `/{team}/{app}[/rest]` (the query left out).
    team: Range<usize>,
    app: Range<usize>,
    rest: Range<usize>,
    query: Option<Range<usize>>,
    authorization: Option<Range<usize>>,
    start_timeout: Option<Range<usize>>,
    /// The caller asked to close the connection after the answer.
    close: bool,
    /// A HEAD request, whose answer has no body whatever its headers say.
    head_only: bool,
}

enum Parsed {
    Call(Call),
    /// The head has not all come yet.
    Partial,
    /// Not for this path: hyper's answers it.
    NotMine,
}

/// Where `part` (a slice of `buf`) lies in `buf`.
fn range_in(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    if part.is_empty() || start > buf.len() {
        return 0..0;
    }
    start..start + part.len()
}

fn parse_request(gateway: &Gateway, input: &[u8], forward: &mut Vec<(Range<usize>, Range<usize>)>) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::NotMine,
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version) else {
        return Parsed::NotMine;
    };
    // Only visible ASCII: anything else is for hyper's stricter URI parser to refuse.
    if method == "CONNECT" || !target.bytes().all(|b| b.is_ascii_graphic()) || target.starts_with("/queue") {
        return Parsed::NotMine;
    }
    let (path, query) = match target.bytes().position(|b| b == b'?') {
        Some(at) => (&target[..at], Some(&target[at + 1..])),
        None => (target, None),
    };
    let Some(app_path) = AppPath::parse(path) else {
        return Parsed::NotMine;
    };
    let Some(route) = gateway.route(app_path.team_and_app) else {
        // No such app here: it may be another server's, or none; hyper's path says.
        return Parsed::NotMine;
    };
    forward.clear();
    let mut call = Call {
        route,
        head_len,
        body_len: 0,
        method: range_in(input, method.as_bytes()),
        team: range_in(input, app_path.team.as_bytes()),
        app: range_in(input, app_path.app.as_bytes()),
        rest: range_in(input, app_path.rest.as_bytes()),
        query: query.map(|q| range_in(input, q.as_bytes())),
        authorization: None,
        start_timeout: None,
        close: false,
        head_only: method == "HEAD",
    };
    let mut length = None;
    let mut fal_start_timeout = None;
    for header in request.headers.iter() {
        let (name, value) = (header.name, header.value);
        let is = |other: &str| name.eq_ignore_ascii_case(other);
        if is("content-length") {
            let parsed = std::str::from_utf8(value).ok().filter(|v| v.bytes().all(|b| b.is_ascii_digit()));
            match parsed.and_then(|v| v.parse::<usize>().ok()) {
                Some(n) if length.is_none() && n <= MAX_BODY => length = Some(n),
                _ => return Parsed::NotMine,
            }
        } else if is("transfer-encoding") || is("expect") || is("upgrade") || is(crate::REVISION_HEADER) {
            // A pinned call's revision is looked up in the store, on hyper's path.
            return Parsed::NotMine;
        } else if is("connection") {
            call.close |= value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            continue;
        } else if is("authorization") {
            call.authorization = Some(range_in(input, value));
            continue;
        } else if is(crate::START_TIMEOUT_HEADER) {
            call.start_timeout.get_or_insert(range_in(input, value));
            continue;
        } else if is(crate::FAL_START_TIMEOUT_HEADER) {
            fal_start_timeout.get_or_insert(range_in(input, value));
            continue;
        }
        if forwarded(name) {
            forward.push((range_in(input, name.as_bytes()), range_in(input, value)));
        }
    }
    call.start_timeout = call.start_timeout.or(fal_start_timeout);
    call.body_len = length.unwrap_or(0);
    Parsed::Call(call)
}

/// Whether a header of a request or an answer passes through the gateway: not one of a
/// single hop, nor the ones the gateway sets itself.
fn forwarded(name: &str) -> bool {
    const OWN: &[&str] = &[crate::REQUEST_ID_HEADER, crate::RUNNER_ID_HEADER, crate::REVISION_HEADER, "keep-alive"];
    !crate::HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h.as_str()))
        && !OWN.iter().any(|h| name.eq_ignore_ascii_case(h))
        && !name.eq_ignore_ascii_case(crate::START_TIMEOUT_HEADER)
        && !name.eq_ignore_ascii_case(crate::FAL_START_TIMEOUT_HEADER)
}

/// How a runner's answer body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (a HEAD request's answer, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// It runs until the runner closes the connection.
    Close,
}

/// The head of a runner's answer, parsed in its connection's buffer.
struct AnswerHead {
    len: usize,
    status: u16,
    reason: Range<usize>,
    framing: Framing,
    /// The connection may serve another call after this answer.
    reusable: bool,
}

/// Why no answer head came from the runner.
enum Failed {
    /// The connection failed or the answer was not HTTP: nothing was answered.
    Lost,
    Timeout,
}

impl Connection {
    /// Answers one call. False when the connection to the caller must close after it.
    async fn call<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        gateway: &Gateway,
        stream: &mut S,
        call: &Call,
    ) -> bool {
        let arrived = Instant::now();
        let mut id = [0; uuid::fmt::Hyphenated::LENGTH];
        let request_id: &[u8] = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut id).as_bytes();
        let input = &self.input[..];
        // Visible ASCII, as `parse_request` checked.
        let text = |r: Range<usize>| std::str::from_utf8(&input[r]).unwrap_or_default();
        let (team_and_app, team, app) =
            (text(call.team.start..call.app.end), text(call.team.clone()), text(call.app.clone()));
        let rest = text(call.rest.clone());
        let authorization = call.authorization.clone().and_then(|r| std::str::from_utf8(&input[r]).ok());
        let route = match gateway.authorize_key(Some(call.route.clone()), team_and_app, authorization).await {
            Ok(route) => route,
            Err(e) => return answer_error(stream, &mut self.output, e, request_id, call.close).await,
        };
        let start_value = call.start_timeout.clone().map(|r| &input[r]);
        let start_timeout = match crate::parse_start_timeout(start_value, gateway.default_start_timeout) {
            Ok(t) => t,
            Err(e) => return answer_error(stream, &mut self.output, e, request_id, call.close).await,
        };
        let lease = match route.acquire(arrived + start_timeout, None).await {
            Ok(lease) => lease,
            Err(e) => {
                let e = crate::acquire_error(e, team, app, start_timeout);
                return answer_error(stream, &mut self.output, e, request_id, call.close).await;
            }
        };
        let config = route.config();
        let app_label = route.label.get().cloned().unwrap_or_else(|| Arc::new(team_and_app.to_owned()));

        // The request the runner gets: the path after `/{team}/{app}`, and the query.
        let out = &mut self.output;
        out.clear();
        out.extend_from_slice(&input[call.method.clone()]);
        out.push(b' ');
        out.extend_from_slice(if rest.is_empty() { b"/" } else { rest.as_bytes() });
        if let Some(query) = call.query.clone() {
            out.push(b'?');
            out.extend_from_slice(&input[query]);
        }
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(lease.labels.host.as_bytes());
        out.extend_from_slice(b"\r\nx-hangar-request-id: ");
        out.extend_from_slice(request_id);
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.forward {
            push_header(out, &input[name.clone()], &input[value.clone()]);
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&input[call.head_len..call.head_len + call.body_len]);

        // One timer bounds both the wait for the answer and its body.
        let mut timer = std::pin::pin!(tokio::time::sleep(config.request_timeout));
        let exchanged = tokio::select! {
            exchanged = exchange(&lease.addr, &out[..], call.head_only, &mut self.answer) => exchanged,
            () = timer.as_mut() => Err(Failed::Timeout),
        };
        let (mut upstream, head) = match exchanged {
            Ok(exchanged) => exchanged,
            Err(failed) => {
                let (status, e) = match failed {
                    Failed::Lost => (503, lost(&route, &lease, team, app)),
                    Failed::Timeout => {
                        route.flag_timed_out(lease.runner);
                        (504, timed_out(config.request_timeout))
                    }
                };
                gateway.metrics.record(&app_label, &lease.labels, status, arrived.elapsed());
                drop(lease);
                return answer_error(stream, out, e, request_id, call.close).await;
            }
        };
        gateway.metrics.record(&app_label, &lease.labels, head.status, arrived.elapsed());

        // The answer's head: the runner's, without its hop-by-hop headers, framed here.
        let answer = &upstream.input[..];
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(out, u64::from(head.status));
        out.push(b' ');
        out.extend_from_slice(&answer[head.reason.clone()]);
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.answer {
            let name = &answer[name.clone()];
            if head.framing != Framing::Empty && name.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
            push_header(out, name, &answer[value.clone()]);
        }
        match head.framing {
            Framing::Length(n) => {
                out.extend_from_slice(b"content-length: ");
                push_decimal(out, n);
                out.extend_from_slice(b"\r\n");
            }
            Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Framing::Empty | Framing::Close => {}
        }
        let close = call.close || head.framing == Framing::Close;
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        push_header(out, crate::RUNNER_ID_HEADER.as_bytes(), lease.labels.runner.as_bytes());
        push_header(out, crate::REVISION_HEADER.as_bytes(), lease.labels.revision.as_bytes());
        push_header(out, crate::REQUEST_ID_HEADER.as_bytes(), request_id);
        out.extend_from_slice(b"\r\n");
        upstream.input.advance(head.len);

        let relayed = tokio::select! {
            relayed = relay(&mut upstream, stream, out, head.framing) => relayed,
            () = timer.as_mut() => {
                lease.flag_timed_out();
                tracing::debug!(runner = %lease.runner, "the runner's answer ran past the request timeout");
                return false;
            }
        };
        match relayed {
            Ok(()) => {
                if head.reusable && upstream.input.is_empty() {
                    upstream.give_back();
                }
                !close
            }
            Err(e) => {
                tracing::debug!(runner = %lease.runner, error = %e, "a call's answer broke off");
                false
            }
        }
    }
}

/// `n` in decimal, without the formatting machinery (this runs for every call).
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn lost(route: &AppRoute, lease: &Lease, team: &str, app: &str) -> ApiError {
    crate::lost_error(route.cut_reason(lease.runner), lease.runner, team, app)
}

fn timed_out(request_timeout: Duration) -> ApiError {
    ApiError::new(
        ErrorCode::RequestTimeout,
        format!("the call ran longer than the app's request_timeout of {request_timeout:?}"),
    )
}

/// Writes `error` as the answer, with the call's id. False when the connection is to
/// close after it.
async fn answer_error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    error: ApiError,
    request_id: &[u8],
    close: bool,
) -> bool {
    let response = error.into_response();
    let (parts, body) = response.into_parts();
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else { return false };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    push_header(out, b"content-length", body.len().to_string().as_bytes());
    push_header(out, b"date", httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    push_header(out, crate::REQUEST_ID_HEADER.as_bytes(), request_id);
    if close {
        push_header(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    write_out(stream, out).await.is_ok() && !close
}

async fn write_out<S: AsyncWrite + Unpin>(stream: &mut S, out: &[u8]) -> std::io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await
}

/// Sends `request` to the runner at `addr` and reads the head of its answer (skipping
/// any 1xx interim answers), parsing its headers into `headers`.
async fn exchange(
    addr: &Endpoint,
    request: &[u8],
    head_only: bool,
    headers: &mut Vec<(Range<usize>, Range<usize>)>,
) -> Result<(Upstream, AnswerHead), Failed> {
    let mut upstream = Upstream::checkout(addr).await.map_err(|_| Failed::Lost)?;
    upstream.stream.write_all(request).await.map_err(|_| Failed::Lost)?;
    loop {
        if !upstream.input.is_empty() {
            match parse_answer(&upstream.input, head_only, headers)? {
                Some(head) if (100..200).contains(&head.status) && head.status != 101 => {
                    upstream.input.advance(head.len);
                    continue;
                }
                Some(head) if head.status == 101 => return Err(Failed::Lost),
                Some(head) => return Ok((upstream, head)),
                None if upstream.input.len() >= MAX_ANSWER_HEAD => return Err(Failed::Lost),
                None => {}
            }
        }
        if upstream.input.capacity() - upstream.input.len() < 1024 {
            upstream.input.reserve(READ_CHUNK);
        }
        match upstream.stream.read_buf(&mut upstream.input).await {
            Ok(n) if n > 0 => {}
            _ => return Err(Failed::Lost),
        }
    }
}

/// The head of an answer at the start of `input`, once it has all come.
fn parse_answer(
    input: &[u8],
    head_only: bool,
    headers: &mut Vec<(Range<usize>, Range<usize>)>,
) -> Result<Option<AnswerHead>, Failed> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let len = match response.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Failed::Lost),
    };
    let status = response.code.ok_or(Failed::Lost)?;
    let reason = response.reason.map_or(0..0, |r| range_in(input, r.as_bytes()));
    let mut reusable = response.version == Some(1);
    let (mut length, mut chunked, mut encoded) = (None, false, false);
    headers.clear();
    for header in response.headers.iter() {
        let (name, value) = (header.name, header.value);
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(Failed::Lost)?;
            if length.is_some_and(|l| l != n) {
                return Err(Failed::Lost);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            // Chunked must be the last coding; whatever else is applied stays on.
            let last = value.rsplit(|b| *b == b',').next().unwrap_or(value);
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            continue;
        } else if name.eq_ignore_ascii_case("connection") {
            if value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close")) {
                reusable = false;
            }
            continue;
        }
        if forwarded(name) {
            headers.push((range_in(input, name.as_bytes()), range_in(input, value)));
        }
    }
    let framing = if head_only || status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else if encoded {
        if chunked { Framing::Chunked } else { Framing::Close }
    } else {
        length.map_or(Framing::Close, Framing::Length)
    };
    if framing == Framing::Close {
        reusable = false;
    }
    Ok(Some(AnswerHead { len, status, reason, framing, reusable }))
}

/// Sends the answer to the caller: `head` (written with the first of the body), then the
/// rest of the body as it comes from the runner.
async fn relay<S: AsyncWrite + Unpin>(
    upstream: &mut Upstream,
    stream: &mut S,
    head: &mut Vec<u8>,
    framing: Framing,
) -> std::io::Result<()> {
    let broke =
        || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the runner closed the connection mid-answer");
    match framing {
        Framing::Empty => write_out(stream, head).await,
        Framing::Length(mut left) => {
            let take = (upstream.input.len() as u64).min(left) as usize;
            head.extend_from_slice(&upstream.input[..take]);
            upstream.input.advance(take);
            left -= take as u64;
            write_out(stream, head).await?;
            while left > 0 {
                upstream.input.clear();
                upstream.input.reserve(READ_CHUNK);
                let n = upstream.stream.read_buf(&mut upstream.input).await?;
                if n == 0 {
                    return Err(broke());
                }
                let take = (n as u64).min(left) as usize;
                write_out(stream, &upstream.input[..take]).await?;
                upstream.input.advance(take);
                left -= take as u64;
            }
            Ok(())
        }
        Framing::Chunked => {
            let mut chunked = Chunked::default();
            let malformed = || std::io::Error::new(std::io::ErrorKind::InvalidData, "a malformed chunked answer");
            let mut ended = chunked.feed(&upstream.input).map_err(|_| malformed())?;
            let take = ended.unwrap_or(upstream.input.len());
            head.extend_from_slice(&upstream.input[..take]);
            upstream.input.advance(take);
            write_out(stream, head).await?;
            while ended.is_none() {
                upstream.input.clear();
                upstream.input.reserve(READ_CHUNK);
                let n = upstream.stream.read_buf(&mut upstream.input).await?;
                if n == 0 {
                    return Err(broke());
                }
                ended = chunked.feed(&upstream.input).map_err(|_| malformed())?;
                let take = ended.unwrap_or(n);
                write_out(stream, &upstream.input[..take]).await?;
                upstream.input.advance(take);
            }
            Ok(())
        }
        Framing::Close => {
            head.extend_from_slice(&upstream.input);
            upstream.input.clear();
            write_out(stream, head).await?;
            loop {
                upstream.input.reserve(READ_CHUNK);
                if upstream.stream.read_buf(&mut upstream.input).await? == 0 {
                    return Ok(());
                }
                write_out(stream, &upstream.input).await?;
                upstream.input.clear();
            }
        }
    }
}

thread_local! {
    static IDLE: RefCell<Pool<Upstream>> = RefCell::new(Pool::new());
}

/// A connection to a runner, with what has been read from it and not yet used.
struct Upstream {
    addr: Endpoint,
    stream: TcpStream,
    input: BytesMut,
}

impl Upstream {
    /// An idle connection to `addr` that the runner has not closed, or a new one.
    async fn checkout(addr: &Endpoint) -> std::io::Result<Upstream> {
        if let Some(idle) = IDLE.with(|pool| pool.borrow_mut().take(addr)) {
            return Ok(idle);
        }
        let stream = addr.connect().await?;
        let _ = stream.set_nodelay(true);
        Ok(Upstream { addr: addr.clone(), stream, input: BytesMut::new() })
    }

    fn give_back(mut self) {
        if self.input.capacity() > 4 * READ_CHUNK {
            self.input = BytesMut::new();
        }
        let addr = self.addr.clone();
        IDLE.with(|pool| pool.borrow_mut().put(&addr, self));
    }
}

impl Pooled for Upstream {
    /// An idle connection has nothing to read unless its runner closed it (or sent what
    /// was not asked for).
    fn usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::RouteConfig;
    use model::revision::AuthMode;

    struct NoKeys;

    impl crate::Authenticator for NoKeys {
        fn owner<'a>(
            &'a self,
            _: &'a str,
        ) -> Pin<Box<dyn std::future::Future<Output = Option<crate::KeyOwner>> + Send + 'a>> {
            Box::pin(async { None })
        }
    }

    fn gateway() -> Arc<Gateway> {
        let timeouts = crate::conn::Timeouts { header_read: Duration::from_secs(30), idle: Duration::from_secs(60) };
        let gateway = Gateway::new(Arc::new(NoKeys), Duration::from_secs(300), timeouts);
        let config = RouteConfig { auth: AuthMode::Public, request_timeout: Duration::from_secs(60), suspended: false };
        gateway.register("t", AppRoute::new(uuid::Uuid::nil(), uuid::Uuid::nil(), "app".to_owned(), config));
        gateway
    }

    /// What this path makes of a request head: `Some(forwarded header names)` when it
    /// takes the call, "partial" or "hyper" otherwise.
    fn taken(gateway: &Gateway, head: &str) -> Result<Vec<String>, &'static str> {
        let mut forward = Vec::new();
        match parse_request(gateway, head.as_bytes(), &mut forward) {
            Parsed::Call(_) => Ok(forward.iter().map(|(n, _)| head[n.clone()].to_ascii_lowercase()).collect()),
            Parsed::Partial => Err("partial"),
            Parsed::NotMine => Err("hyper"),
        }
    }

    #[test]
    fn numbers_are_written_in_decimal() {
        for n in [0, 7, 10, 200, 404, 65_536, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
        }
    }

    #[test]
    fn the_common_calls_are_taken_and_the_rest_left_to_hyper() {
        let gateway = gateway();
        let ok = |names: &[&str]| Ok(names.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        let cases: &[(&str, Result<Vec<String>, &str>)] = &[
            ("GET /t/app HTTP/1.1\r\nHost: x\r\n\r\n", ok(&[])),
            ("GET /t/app/p?q=1 HTTP/1.1\r\nhost: x\r\nAccept: */*\r\nX-Mine: 1\r\n\r\n", ok(&["accept", "x-mine"])),
            // Hop-by-hop headers and the gateway's own stay behind; a body's length goes on.
            (
                "POST /t/app HTTP/1.1\r\nhost: x\r\nconnection: keep-alive\r\nkeep-alive: 5\r\nauthorization: Key a:b\r\n\
                 x-hangar-request-timeout: 5\r\nx-fal-request-timeout: 5\r\nx-hangar-request-id: mine\r\nte: trailers\r\n\
                 content-length: 3\r\n\r\nabc",
                ok(&["content-length"]),
            ),
            ("GET /t/app HTTP/1.1\r\nhost: x\r\n", Err("partial")),
            ("GET /t/ap", Err("partial")),
            // Not this path's: other apps, the queue, HTTP/1.0, bodies it does not read whole,
            // upgrades, and what it cannot parse.
            ("GET /t/other HTTP/1.1\r\nhost: x\r\n\r\n", Err("hyper")),
            ("GET /queue/t/app HTTP/1.1\r\nhost: x\r\n\r\n", Err("hyper")),
            ("GET /t/app HTTP/1.0\r\nhost: x\r\n\r\n", Err("hyper")),
            ("POST /t/app HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", Err("hyper")),
            ("POST /t/app HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n", Err("hyper")),
            ("POST /t/app HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc", Err("hyper")),
            ("POST /t/app HTTP/1.1\r\ncontent-length: +3\r\n\r\nabc", Err("hyper")),
            ("POST /t/app HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n", Err("hyper")),
            ("GET /t/app HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n", Err("hyper")),
            ("CONNECT /t/app HTTP/1.1\r\n\r\n", Err("hyper")),
            ("GET http://x/t/app HTTP/1.1\r\n\r\n", Err("hyper")),
            ("GET /t//app HTTP/1.1\r\n\r\n", Err("hyper")),
            ("GET /t/app HTTP/1.1\r\nbad header\r\n\r\n", Err("hyper")),
        ];
        for (head, want) in cases {
            assert_eq!(&taken(&gateway, head), want, "{head:?}");
        }
    }

    /// An answer's framing, whether its connection may serve again, and whether the
    /// whole input was its head; or why there is none.
    type Framed = Result<(Framing, bool, bool), &'static str>;

    #[test]
    fn a_runners_answer_is_framed_as_the_rfc_says() {
        let framing = |head: &str, head_only: bool| {
            let mut headers = Vec::new();
            match parse_answer(head.as_bytes(), head_only, &mut headers) {
                Ok(Some(a)) => Ok((a.framing, a.reusable, a.len == head.len())),
                Ok(None) => Err("partial"),
                Err(_) => Err("refused"),
            }
        };
        let cases: &[(&str, bool, Framed)] = &[
            ("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false, Ok((Framing::Length(5), true, true))),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
                false,
                Ok((Framing::Length(5), true, true)),
            ),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", false, Ok((Framing::Chunked, true, true))),
            // Chunked wins over a length, and must come last.
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                false,
                Ok((Framing::Chunked, true, true)),
            ),
            ("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n", false, Ok((Framing::Close, false, true))),
            ("HTTP/1.1 200 OK\r\n\r\n", false, Ok((Framing::Close, false, true))),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n",
                false,
                Ok((Framing::Length(5), false, true)),
            ),
            ("HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n", false, Ok((Framing::Length(5), false, true))),
            // No body, whatever the headers say.
            ("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true, Ok((Framing::Empty, true, true))),
            ("HTTP/1.1 204 No Content\r\n\r\n", false, Ok((Framing::Empty, true, true))),
            ("HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n", false, Ok((Framing::Empty, true, true))),
            ("HTTP/1.1 100 Continue\r\n\r\n", false, Ok((Framing::Empty, true, true))),
            ("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n", false, Err("partial")),
            ("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n", false, Err("refused")),
            ("HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n", false, Err("refused")),
            ("HTTP/1.1 2000 OK\r\n\r\n", false, Err("refused")),
            ("SSH-2.0-OpenSSH\r\n\r\n", false, Err("refused")),
        ];
        for (head, head_only, want) in cases {
            assert_eq!(&framing(head, *head_only), want, "{head:?} (HEAD: {head_only})");
        }
    }
}
