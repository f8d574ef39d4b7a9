//! Upstream connection pool of one host: HTTP/1.1 keep-alive connections, or one multiplexed
//! HTTP/2 connection.
//!
//! HTTP/1.1: idle connections wait in a LIFO list; a request takes one (or connects), and the
//! connection returns to the list when the response body has been read to its end — see
//! [`Http1Connection::release`]. A request that hyper hands back unsent (the pooled connection
//! closed under it) is retried once on a fresh connection; nothing else is retried here.
//! HTTP/2: one shared connection, replaced when it closes.
//!
//! Connecting honours the cluster's `connect_timeout`. Locks here guard plain lists and are
//! never held across an await. This module must not choose hosts or build requests.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::http::body::RequestBody;
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
    #[error("connection termination")]
    Reset(hyper::Error),
}

/// The read buffer of an upstream HTTP/1.1 connection. hyper's adaptive default starts at
/// 8 KiB and settles around 16 KiB per connection, kept while the connection idles in the pool;
/// with hundreds of pooled connections that was the largest part of the proxy's heap. Larger
/// heads and bodies still work: the buffer grows by this much per read.
const UPSTREAM_READ_BUFFER: usize = 4096;

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
    idle: Mutex<Vec<http1::SendRequest<RequestBody>>>,
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

/// An HTTP/1.1 connection lent to one request; give it back with [`Self::release`] once the
/// response body is complete, or drop it to close the connection.
pub struct Http1Connection {
    sender: http1::SendRequest<RequestBody>,
    pool: Arc<Pool>,
}

impl Http1Connection {
    pub fn release(self) {
        let mut idle = lock(&self.pool.idle);
        idle.push(self.sender);
    }
}

/// The response headers and, for HTTP/1.1, the connection to release after the body.
pub struct PoolResponse {
    pub response: Response<Incoming>,
    pub connection: Option<Http1Connection>,
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
        mut req: Request<RequestBody>,
    ) -> Result<PoolResponse, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.checkout_http1().await {
                Some(s) => (s, true),
                None => (self.connect_http1().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok(PoolResponse {
                        response,
                        connection: Some(Http1Connection {
                            sender,
                            pool: self.clone(),
                        }),
                    });
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the pooled connection was closed; try a fresh one.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(UpstreamError::Reset(e.into_error())),
                },
            }
        }
    }

    async fn checkout_http1(&self) -> Option<http1::SendRequest<RequestBody>> {
        loop {
            let candidate = lock(&self.idle).pop();
            let mut sender = candidate?;
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
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
        sender.send_request(req).await.map_err(UpstreamError::Reset)
    }

    async fn connect_http1(&self) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
        let io = self.connect_tcp().await?;
        let (sender, conn) = http1::Builder::new()
            .read_buf_exact_size(Some(UPSTREAM_READ_BUFFER))
            .handshake::<_, RequestBody>(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        self.cluster_stats.upstream_cx_http1_total.inc();
        let guard = self.connection_guard();
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended with an error");
            }
        });
        Ok(sender)
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
                        response,
                        connection: None,
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
                    _ => return Err(UpstreamError::Reset(e.into_error())),
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

    fn connection_guard(&self) -> ConnectionGuard {
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
