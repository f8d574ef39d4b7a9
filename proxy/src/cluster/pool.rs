//! Upstream connection pool of one host: HTTP/1.1 keep-alive connections, or one multiplexed
//! HTTP/2 connection.
//!
//! HTTP/1.1 (our own client, [`super::h1`]): idle connections wait in a LIFO list as bare
//! sockets; a request takes one (checking it is still open) or connects, and the response body
//! puts the connection back when it has been read to its end. A request that fails on a reused
//! connection before any of it was written, or — idempotent methods only, with a replayable
//! body — before any response byte arrived, is retried once on a fresh connection (the pooled
//! connection was closed under it); nothing else is retried here. WebSocket upgrades use hyper's client on a connection of their
//! own. HTTP/2: one shared hyper connection, replaced when it closes.
//!
//! Connecting honours the cluster's `connect_timeout`. Locks here guard plain lists and are
//! never held across an await. This module must not choose hosts or build requests.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::h1;
use crate::http::body::{BoxError, RequestBody};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::ClusterStats;
use super::host::HostStats;
use crate::config::cluster::UpstreamProtocol;

/// Why an upstream request got no response headers.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection timeout")]
    ConnectTimeout,
    #[error("remote connection failure, transport failure reason: {0}")]
    ConnectFailure(io::Error),
    #[error("connection failure: HTTP handshake: {0}")]
    Handshake(hyper::Error),
    /// The connection closed or was reset before a complete response head, or the head was
    /// malformed.
    #[error("connection termination")]
    Reset(BoxError),
}

/// Connection settings that come from the cluster.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
}

pub struct Pool {
    address: SocketAddr,
    settings: PoolSettings,
    host_stats: Arc<HostStats>,
    cluster_stats: Arc<ClusterStats>,
    idle: Mutex<Vec<h1::Conn>>,
    h2: Mutex<Option<http2::SendRequest<RequestBody>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("address", &self.address)
            .field("protocol", &self.settings.protocol)
            .finish_non_exhaustive()
    }
}

/// An upstream response body: HTTP/1.1 bodies hold their connection and return it to the
/// pool when complete (dropping one early closes the connection).
pub enum PoolBody {
    Http1(h1::Body),
    Hyper(Incoming),
    /// Abandoned: nothing more will be read.
    Done,
}

impl Body for PoolBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            PoolBody::Http1(b) => Pin::new(b).poll_frame(cx),
            PoolBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            PoolBody::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PoolBody::Http1(b) => b.is_end_stream(),
            PoolBody::Hyper(b) => b.is_end_stream(),
            PoolBody::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PoolBody::Http1(b) => b.size_hint(),
            PoolBody::Hyper(b) => b.size_hint(),
            PoolBody::Done => SizeHint::with_exact(0),
        }
    }
}

/// The response headers; the body owns what it needs to finish the exchange.
pub struct PoolResponse {
    pub response: Response<PoolBody>,
}

impl Pool {
    pub fn new(
        address: SocketAddr,
        settings: PoolSettings,
        host_stats: Arc<HostStats>,
        cluster_stats: Arc<ClusterStats>,
    ) -> Self {
        Self {
            address,
            settings,
            host_stats,
            cluster_stats,
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        }
    }

    pub fn protocol(&self) -> UpstreamProtocol {
        self.settings.protocol
    }

    /// Sends a request (already in the form the protocol needs) and waits for the response
    /// headers.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<PoolResponse, UpstreamError> {
        match self.settings.protocol {
            UpstreamProtocol::Http1 => self.send_http1(req).await,
            UpstreamProtocol::Http2 => self.send_http2(req).await,
        }
    }

    async fn send_http1(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<PoolResponse, UpstreamError> {
        let (mut parts, mut body) = req.into_parts();
        let prepared = h1::prepare(&mut parts, body.is_end_stream(), &body.size_hint());
        // A copy to send again if a reused connection turns out closed after the request was
        // (partly) written but before any response byte.
        // Only idempotent requests (RFC 9110 §9.2.2): the upstream may have acted on one it
        // did not answer, and a POST must not be sent twice behind the client's back.
        let replay = if !idempotent(&parts.method) {
            None
        } else if prepared.sends_no_body() {
            Some(RequestBody::buffered(Bytes::new(), None))
        } else {
            body.try_clone()
        };
        let mut fresh_only = false;
        loop {
            let (conn, reused) = match (!fresh_only).then(|| self.checkout_http1()).flatten() {
                Some(c) => (c, true),
                None => (self.connect_http1().await?, false),
            };
            match h1::send(self.clone(), conn, &prepared, body).await {
                Ok(response) => {
                    return Ok(PoolResponse {
                        response: response.map(PoolBody::Http1),
                    });
                }
                Err(f) => {
                    let again = if !reused || matches!(f.error, h1::Error::RequestBody(_)) {
                        None
                    } else if let Some(unsent) = f.body.filter(|_| !f.wrote) {
                        Some(unsent)
                    } else if !f.received {
                        replay.as_ref().and_then(RequestBody::try_clone)
                    } else {
                        None
                    };
                    match again {
                        Some(b) => {
                            tracing::debug!(error = %f.error, "pooled upstream connection failed; trying a fresh one");
                            body = b;
                            fresh_only = true;
                        }
                        None => return Err(UpstreamError::Reset(Box::new(f.error))),
                    }
                }
            }
        }
    }

    fn checkout_http1(&self) -> Option<h1::Conn> {
        loop {
            let conn = lock(&self.idle).pop()?;
            if conn.is_usable() {
                return Some(conn);
            }
        }
    }

    #[cfg(test)]
    pub(super) fn idle_len(&self) -> usize {
        lock(&self.idle).len()
    }

    /// Puts a connection whose exchange completed cleanly back in the idle list. Idle
    /// connections have no task watching them: the oldest one (the likeliest to have been
    /// closed by the upstream's idle timeout) is checked here, so that closed ones do not
    /// linger at the bottom of the list.
    pub(super) fn release_http1(&self, conn: h1::Conn) {
        let mut idle = lock(&self.idle);
        if idle.first().is_some_and(|oldest| !oldest.is_usable()) {
            idle.remove(0);
        }
        idle.push(conn);
    }

    /// Sends an HTTP/1.1 upgrade request (WebSocket) on a connection of its own, never pooled:
    /// after a `101` the connection belongs to the upgraded stream.
    pub async fn send_upgrade(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let io = self.connect_tcp().await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake::<_, RequestBody>(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        self.cluster_stats.upstream_cx_http1_total.inc();
        let guard = self.connection_guard();
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended with an error");
            }
        });
        sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Reset(Box::new(e)))
    }

    async fn connect_http1(&self) -> Result<h1::Conn, UpstreamError> {
        let io = self.connect_tcp().await?;
        self.cluster_stats.upstream_cx_http1_total.inc();
        Ok(h1::Conn::new(io.into_inner(), self.connection_guard()))
    }

    async fn send_http2(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<PoolResponse, UpstreamError> {
        let mut fresh = false;
        loop {
            let existing = lock(&self.h2).as_ref().filter(|s| !s.is_closed()).cloned();
            let mut sender = match existing {
                Some(s) => s,
                None => {
                    let s = self.connect_http2().await?;
                    *lock(&self.h2) = Some(s.clone());
                    fresh = true;
                    s
                }
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok(PoolResponse {
                        response: response.map(PoolBody::Hyper),
                    });
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        let mut slot = lock(&self.h2);
                        if slot.as_ref().is_some_and(|s| s.is_closed()) {
                            *slot = None;
                        }
                        req = unsent;
                    }
                    _ => return Err(UpstreamError::Reset(Box::new(e.into_error()))),
                },
            }
        }
    }

    async fn connect_http2(&self) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect_tcp().await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake::<_, RequestBody>(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        self.cluster_stats.upstream_cx_http2_total.inc();
        let guard = self.connection_guard();
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn connect_tcp(&self) -> Result<TokioIo<TcpStream>, UpstreamError> {
        let connect = TcpStream::connect(self.address);
        let stream = match tokio::time::timeout(self.settings.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.cluster_stats.upstream_cx_connect_fail.inc();
                self.host_stats.cx_connect_fail.inc();
                return Err(UpstreamError::ConnectFailure(e));
            }
            Err(_) => {
                self.cluster_stats.upstream_cx_connect_fail.inc();
                self.cluster_stats.upstream_cx_connect_timeout.inc();
                self.host_stats.cx_connect_fail.inc();
                return Err(UpstreamError::ConnectTimeout);
            }
        };
        // Latency matters more than packet count for proxied requests.
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }

    /// A TCP connection of its own (never pooled), for the TCP proxy: connected with the
    /// cluster's `connect_timeout` and counted in the cluster's and host's connection stats
    /// (`upstream_cx_total`, `upstream_cx_active` while the guard lives,
    /// `upstream_cx_connect_fail`).
    pub async fn connect_raw(&self) -> Result<(TcpStream, ConnectionGuard), UpstreamError> {
        let io = self.connect_tcp().await?;
        Ok((io.into_inner(), self.connection_guard()))
    }

    pub(super) fn connection_guard(&self) -> ConnectionGuard {
        self.cluster_stats.upstream_cx_total.inc();
        self.cluster_stats.upstream_cx_active.inc();
        self.host_stats.cx_total.inc();
        self.host_stats.cx_active.inc();
        ConnectionGuard {
            host: self.host_stats.clone(),
            cluster: self.cluster_stats.clone(),
        }
    }
}

/// Keeps `upstream_cx_active` right for as long as a connection task runs.
pub struct ConnectionGuard {
    host: Arc<HostStats>,
    cluster: Arc<ClusterStats>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.host.cx_active.dec();
        self.cluster.upstream_cx_active.dec();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// RFC 9110 §9.2.2: methods whose repetition has the effect of one request.
fn idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(address: SocketAddr, connect_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool::new(
            address,
            PoolSettings {
                protocol: UpstreamProtocol::Http1,
                connect_timeout,
            },
            Arc::new(HostStats::default()),
            Arc::new(ClusterStats::default()),
        ))
    }

    /// A listener whose accept queue is full, so new connections hang in the handshake.
    async fn saturated_listener() -> (tokio::net::TcpListener, Vec<TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(1).expect("listen");
        let address = listener.local_addr().expect("address");
        let mut held = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(address))
                .await
            {
                Ok(Ok(s)) => held.push(s),
                _ => break,
            }
        }
        (listener, held)
    }

    #[tokio::test]
    async fn connect_timeout_is_enforced() {
        let (listener, _held) = saturated_listener().await;
        let address = listener.local_addr().expect("address");
        let p = pool(address, Duration::from_millis(150));
        let started = std::time::Instant::now();
        let err = p.connect_tcp().await.expect_err("no connection");
        assert!(matches!(err, UpstreamError::ConnectTimeout), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(p.cluster_stats.upstream_cx_connect_timeout.get(), 1);
        assert_eq!(p.host_stats.cx_connect_fail.get(), 1);
    }

    #[tokio::test]
    async fn refused_connections_are_connect_failures() {
        let address = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("address")
        };
        let p = pool(address, Duration::from_secs(1));
        let err = p.connect_tcp().await.expect_err("refused");
        assert!(matches!(err, UpstreamError::ConnectFailure(_)), "{err}");
        assert_eq!(p.cluster_stats.upstream_cx_connect_fail.get(), 1);
    }
}
