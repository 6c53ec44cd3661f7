//! The body of a proxied response: streams the runner's answer to the client and holds
//! the call's slot until the last byte has gone (or the client went away).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::route::Lease;
use crate::upstream::UpstreamBody;

pub(crate) struct LeaseBody {
    inner: UpstreamBody,
    /// Held while the body streams; dropped at its end.
    lease: Option<Lease>,
    /// The request timeout, which also bounds how long the body may take.
    deadline: Pin<Box<Sleep>>,
}

impl LeaseBody {
    pub(crate) fn new(inner: UpstreamBody, lease: Lease, deadline: Pin<Box<Sleep>>) -> LeaseBody {
        LeaseBody { inner, lease: Some(lease), deadline }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the runner's response ran past the request timeout")]
    Timeout,
    #[error("the runner's response broke off: {0}")]
    Upstream(#[from] hyper::Error),
}

impl Body for LeaseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.lease.is_none() {
            return Poll::Ready(None);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            if let Some(lease) = this.lease.take() {
                lease.flag_timed_out();
            }
            return Poll::Ready(Some(Err(BodyError::Timeout)));
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(Err(e)) => {
                this.lease = None;
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                this.lease = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.lease.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
