//! The downstream response body: either a local reply, or an upstream body streamed through.
//!
//! Streaming an upstream body also finishes the request's bookkeeping: active-request gauges
//! fall when the body is done, and the route timeout keeps running until the last byte — if it
//! fires mid-body the stream is reset (and an HTTP/1.1 upstream connection closed), as Envoy
//! does. An HTTP/1.1 body returns its connection to the pool itself when it completes.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use std::sync::Arc;

use super::HttpStats;
use crate::cluster::ClusterStats;
use crate::cluster::host::HostStats;
use crate::cluster::pool::PoolBody;
use crate::stats::GaugeGuard;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The active-request gauges of one proxied request; they fall when the response is done.
pub struct RequestGuards {
    pub downstream: GaugeGuard<Arc<HttpStats>>,
    pub cluster: GaugeGuard<Arc<ClusterStats>>,
    pub host: GaugeGuard<Arc<HostStats>>,
}

impl RequestGuards {
    fn on_timeout(&self) {
        self.cluster.inner().upstream_rq_timeout.inc();
        self.host.inner().rq_timeout.inc();
    }
}

pub enum ResponseBody {
    Empty,
    Full(Option<Bytes>),
    Upstream(Box<UpstreamBody>),
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseBody::Empty => f.write_str("Empty"),
            ResponseBody::Full(b) => write!(f, "Full({:?} bytes)", b.as_ref().map(Bytes::len)),
            ResponseBody::Upstream(_) => f.write_str("Upstream"),
        }
    }
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let b: Bytes = bytes.into();
        if b.is_empty() {
            ResponseBody::Empty
        } else {
            ResponseBody::Full(Some(b))
        }
    }
}

/// An upstream response body with its connection and deadline.
pub struct UpstreamBody {
    inner: PoolBody,
    deadline: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    guards: Option<RequestGuards>,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream request timeout while streaming the response body")]
pub struct BodyTimeout;

impl UpstreamBody {
    pub fn new(inner: PoolBody, deadline: Option<Instant>, guards: RequestGuards) -> Self {
        Self {
            inner,
            deadline,
            timer: None,
            guards: Some(guards),
        }
    }

    fn finish(&mut self, complete: bool) {
        if !complete {
            // Abandoned mid-body: an HTTP/1.1 connection closes.
            self.inner = PoolBody::Done;
        }
        self.guards = None;
        self.deadline = None;
        self.timer = None;
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Upstream(u) => u.poll_upstream(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::Full(b) => b.is_none(),
            ResponseBody::Upstream(u) => u.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Empty => SizeHint::with_exact(0),
            ResponseBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Upstream(u) => u.inner.size_hint(),
        }
    }
}

impl UpstreamBody {
    fn poll_upstream(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => {
                self.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                let Some(deadline) = self.deadline else {
                    return Poll::Pending;
                };
                // The timer is only armed once the body actually waits.
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        if let Some(g) = &self.guards {
                            g.on_timeout();
                        }
                        self.finish(false);
                        Poll::Ready(Some(Err(Box::new(BodyTimeout))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// A request body on its way upstream: streamed through, or replayed from a buffer (retries,
/// mirrors), or a buffered prefix followed by the rest of the stream (a body too large to
/// retry).
pub enum RequestBody {
    Streaming(Incoming),
    Buffered {
        data: Option<Bytes>,
        trailers: Option<http::HeaderMap>,
    },
    Prefixed {
        prefix: Option<Bytes>,
        rest: Incoming,
    },
}

impl RequestBody {
    pub fn buffered(data: Bytes, trailers: Option<http::HeaderMap>) -> Self {
        RequestBody::Buffered {
            data: (!data.is_empty()).then_some(data),
            trailers,
        }
    }

    /// A copy to send again, for a body that is buffered (or empty); `None` for a stream.
    pub fn try_clone(&self) -> Option<Self> {
        match self {
            RequestBody::Buffered { data, trailers } => Some(RequestBody::Buffered {
                data: data.clone(),
                trailers: trailers.clone(),
            }),
            b if b.is_end_stream() => Some(RequestBody::Buffered {
                data: None,
                trailers: None,
            }),
            _ => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Streaming(incoming) => Pin::new(incoming)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            RequestBody::Buffered { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            RequestBody::Prefixed { prefix, rest } => {
                if let Some(d) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Pin::new(rest)
                    .poll_frame(cx)
                    .map(|f| f.map(|r| r.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming(i) => i.is_end_stream(),
            RequestBody::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            RequestBody::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming(i) => i.size_hint(),
            RequestBody::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestBody::Prefixed { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower() + p);
                if let Some(u) = r.upper() {
                    h.set_upper(u + p);
                }
                h
            }
        }
    }
}

/// The result of reading a request body so that it can be replayed.
pub enum Buffered {
    /// The whole body (and trailers) fit the limit.
    Complete(Bytes, Option<http::HeaderMap>),
    /// The body exceeds the limit: the part read so far and the rest, to stream once.
    TooLarge(Bytes, Incoming),
    /// The downstream failed while sending its body.
    Failed,
}

/// Reads `body` up to `limit` bytes, as Envoy's router buffers a request it may retry.
pub async fn buffer_request(mut body: Incoming, limit: usize) -> Buffered {
    use http_body_util::BodyExt as _;
    let mut buf = bytes::BytesMut::new();
    loop {
        if body.is_end_stream() {
            return Buffered::Complete(buf.freeze(), None);
        }
        match body.frame().await {
            None => return Buffered::Complete(buf.freeze(), None),
            Some(Err(_)) => return Buffered::Failed,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => {
                    buf.extend_from_slice(&d);
                    if buf.len() > limit {
                        return Buffered::TooLarge(buf.freeze(), body);
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        return Buffered::Complete(buf.freeze(), Some(t));
                    }
                }
            },
        }
    }
}
