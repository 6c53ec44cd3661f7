//! Connections to runners and to other servers' gateways through hyper's client, kept
//! alive between calls in a pool per thread, and driven by the task of the call using
//! them: for calls on hyper's path, the durable queue's calls, cancel notices and
//! forwarded calls. The common call goes on the gateway's own path ([`crate::fast`]),
//! which keeps a pool of its own.
//!
//! A connection is usually a task of its own that the call talks to through channels.
//! Here a call takes a connection out of the pool and polls it itself, while it waits
//! for the answer and while the answer's body streams ([`UpstreamBody`]); when the body
//! has ended the connection goes back to the pool. A call and its connection thus stay
//! on one task, with no wake-ups between tasks, which is what made the gateway's
//! per-call cost (see BENCHMARKS.md).

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use netns::Endpoint;
use tokio::net::TcpStream;

use crate::pool::{Pool, Pooled};

type Connection = http1::Connection<TokioIo<TcpStream>, Body>;

thread_local! {
    static IDLE: RefCell<Pool<Upstream>> = RefCell::new(Pool::new());
}

/// One connection to a runner: the handle to send on and the connection itself.
pub(crate) struct Upstream {
    addr: Endpoint,
    sender: http1::SendRequest<Body>,
    connection: Pin<Box<Connection>>,
    /// The connection has ended; it must not be polled again.
    ended: bool,
}

impl Pooled for Upstream {
    /// Polled once without anyone to wake: a connection whose peer has gone ends.
    fn usable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop()));
        !self.ended && !self.sender.is_closed()
    }
}

impl Upstream {
    /// An idle connection to `addr` that is ready for a request, or a new one.
    async fn checkout(addr: &Endpoint) -> Result<Upstream, UpstreamError> {
        while let Some(mut idle) = IDLE.with(|pool| pool.borrow_mut().take(addr)) {
            if idle.ready().await.is_ok() {
                return Ok(idle);
            }
        }
        let stream = addr.connect().await?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        let mut upstream = Upstream { addr: addr.clone(), sender, connection: Box::pin(connection), ended: false };
        upstream.ready().await?;
        Ok(upstream)
    }

    /// Waits, driving the connection, until it can take a request. A connection that
    /// ends meanwhile (its peer closed it while it sat in the pool) never will: it
    /// would wait for ever, since the ended connection wakes nobody.
    async fn ready(&mut self) -> Result<(), UpstreamError> {
        poll_fn(|cx| {
            self.drive(cx);
            if self.ended {
                return Poll::Ready(Err(UpstreamError::Closed));
            }
            self.sender.poll_ready(cx).map_err(UpstreamError::from)
        })
        .await
    }

    /// Polls the connection once, so it reads and writes what it can.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.ended && self.connection.as_mut().poll(cx).is_ready() {
            self.ended = true;
        }
    }

    /// Back to the pool, if it can serve again.
    fn give_back(self) {
        if self.ended || self.sender.is_closed() {
            return;
        }
        let addr = self.addr.clone();
        IDLE.with(|pool| pool.borrow_mut().put(&addr, self));
    }
}

/// Why a call got no answer head from its runner.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("the connection was closed")]
    Closed,
}

/// Sends `request` to the runner at `addr` and waits for the head of its answer,
/// driving the connection meanwhile. The body streams from the same connection.
pub(crate) async fn send(
    addr: &Endpoint,
    request: http::Request<Body>,
) -> Result<http::Response<UpstreamBody>, UpstreamError> {
    send_on(Upstream::checkout(addr).await?, request).await
}

/// A connection to `addr` ready for a request: an idle one, or a new one.
pub(crate) async fn connect(addr: &Endpoint) -> Result<Upstream, UpstreamError> {
    Upstream::checkout(addr).await
}

/// [`send`] on a connection already made.
pub(crate) async fn send_on(
    mut upstream: Upstream,
    request: http::Request<Body>,
) -> Result<http::Response<UpstreamBody>, UpstreamError> {
    let mut response = std::pin::pin!(upstream.sender.send_request(request));
    let response = poll_fn(|cx| {
        upstream.drive(cx);
        response.as_mut().poll(cx)
    })
    .await?;
    if http_body::Body::is_end_stream(response.body()) {
        // Nobody will poll an empty body to its end: the connection is free now.
        upstream.give_back();
        return Ok(response.map(|body| UpstreamBody { inner: body, upstream: None }));
    }
    Ok(response.map(|body| UpstreamBody { inner: body, upstream: Some(upstream) }))
}

/// A runner's answer body. Polling it drives the connection; once it has ended, the
/// connection goes back to the pool. Dropped early, it closes the connection.
pub struct UpstreamBody {
    inner: Incoming,
    upstream: Option<Upstream>,
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(upstream) = this.upstream.as_mut() {
            upstream.drive(cx);
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => {
                // A reader may stop at the last frame without polling for the end.
                if this.inner.is_end_stream()
                    && let Some(upstream) = this.upstream.take()
                {
                    upstream.give_back();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.upstream = None;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                if let Some(upstream) = this.upstream.take() {
                    upstream.give_back();
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
