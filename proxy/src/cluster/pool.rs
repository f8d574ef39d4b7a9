//! Upstream connection pool of one host: HTTP/1.1 keep-alive connections, or one multiplexed
//! HTTP/2 connection.
//!
//! HTTP/1.1 (our own client, [`super::h1`]): idle connections wait in a LIFO list as bare
//! sockets; a request takes one (checking it is still open) or connects, and the response body
//! puts the connection back when it has been read to its end. A request that fails on a reused
//! connection before any of it was written, or — idempotent methods only, with a replayable
//! body — before any response byte arrived, is retried once on a fresh connection (the pooled
//! connection was closed under it); nothing else is retried here. WebSocket upgrades use
//! hyper's client on a connection of their own. HTTP/2: one shared hyper connection, replaced
//! when it closes.
//!
//! Circuit breakers, as Envoy's pool applies them (the cluster's [`Shared`], reached through
//! its stats): a request with a ready connection is admitted against `max_requests`
//! (`upstream_rq_active_overflow`); otherwise it is pending (`max_pending_requests`,
//! `upstream_rq_pending_overflow`) while a connection is opened within `max_connections`, or,
//! when that is reached (`upstream_cx_overflow`), until one of this pool's connections is
//! returned or closed — a pool without any connection always opens one. `upstream_rq_total`
//! counts admitted requests. Connection settings: `max_requests_per_connection` closes a
//! connection after its last request, `idle_timeout` and `max_connection_duration` close idle
//! ones (one [`sweeper`] task per cluster; idle connections have none), `tcp_keepalive` is set
//! on every upstream socket.
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
#[cfg(test)]
use tokio::net::TcpStream;

use super::ClusterStats;
use super::circuit_breaker::{Breakers, Kind, Permit};
use super::host::HostStats;
use super::outlier::HostMonitor;
use super::stream::UpstreamStream;
use crate::config::cluster::UpstreamProtocol;
use crate::config::pool::PoolOptions;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;
use tokio::time::Instant;

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
    /// A circuit breaker refused the request (`max_pending_requests`, `max_requests`) or, for
    /// the TCP proxy, the connection (`max_connections`).
    #[error("overflow")]
    Overflow,
}

/// What every pool of a cluster shares: its circuit breakers and connection settings. The
/// cluster sets it once in its stats ([`ClusterStats::shared`]) so every host's pool sees it.
#[derive(Debug, Default)]
pub struct Shared {
    pub breakers: Breakers,
    pub options: PoolOptions,
    /// Wakes the cluster's idle sweeper ([`sweeper`]) when a connection went idle.
    pub idle: Notify,
}

/// A pool's count of its connections (connecting ones included), and the signal that one was
/// returned or closed, which requests waiting as pending (`max_connections` reached) wait on.
#[derive(Debug, Default)]
struct Waiters {
    notify: Notify,
    connections: AtomicU64,
}

/// The pool's shared HTTP/2 connection and what its limits need.
struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    created: Instant,
    requests: u32,
    activity: Arc<H2Activity>,
}

/// Streams in flight on an HTTP/2 connection, and since when it has none.
#[derive(Debug)]
pub struct H2Activity {
    active: AtomicU64,
    idle_since: Mutex<Instant>,
}

/// One stream on an HTTP/2 connection (kept by the response body).
#[derive(Debug)]
pub struct H2Stream(Arc<H2Activity>);

impl H2Stream {
    fn new(a: &Arc<H2Activity>) -> Self {
        a.active.fetch_add(1, Ordering::AcqRel);
        Self(a.clone())
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.0.idle_since) = Instant::now();
        }
    }
}

/// A connection's claim on the cluster's `max_connections` and on its pool's count.
#[derive(Debug)]
pub struct CxSlot {
    _permit: Option<Permit>,
    waiters: Arc<Waiters>,
}

impl Drop for CxSlot {
    fn drop(&mut self) {
        self.waiters.connections.fetch_sub(1, Ordering::AcqRel);
        self.waiters.notify.notify_waiters();
    }
}

/// Connection settings that come from the cluster.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    /// The cluster's TLS (`transport_socket`); `None`: plaintext.
    pub tls: Option<Arc<crate::config::tls::UpstreamTls>>,
}

pub struct Pool {
    address: SocketAddr,
    settings: PoolSettings,
    host_stats: Arc<HostStats>,
    cluster_stats: Arc<ClusterStats>,
    idle: Mutex<Vec<h1::Conn>>,
    h2: Mutex<Option<H2Conn>>,
    /// `auto_config`: the protocol the upstream's ALPN chose (0 not known yet, 1 HTTP/1.1,
    /// 2 HTTP/2), learned on the first connection and kept for the host's life.
    negotiated: std::sync::atomic::AtomicU8,
    waiters: Arc<Waiters>,
    /// This host's outlier detection counters (used only when the cluster has a detector).
    pub outlier: HostMonitor,
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
    /// With the request's `max_requests` permit, given back when the body is dropped.
    Http1(h1::Body, Option<Permit>),
    Http2(Incoming, Option<Permit>, H2Stream),
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
            PoolBody::Http1(b, _) => Pin::new(b).poll_frame(cx),
            PoolBody::Http2(b, _, _) | PoolBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            PoolBody::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PoolBody::Http1(b, _) => b.is_end_stream(),
            PoolBody::Http2(b, _, _) | PoolBody::Hyper(b) => b.is_end_stream(),
            PoolBody::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PoolBody::Http1(b, _) => b.size_hint(),
            PoolBody::Http2(b, _, _) | PoolBody::Hyper(b) => b.size_hint(),
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
            negotiated: std::sync::atomic::AtomicU8::new(0),
            waiters: Arc::default(),
            outlier: HostMonitor::default(),
        }
    }

    /// The cluster's breakers and settings (absent only for pools built without a cluster).
    fn shared(&self) -> Option<&Arc<Shared>> {
        self.cluster_stats.shared.get()
    }

    /// A slot for a new connection, or `None` (counted in `upstream_cx_overflow`) when the
    /// cluster is at `max_connections`.
    fn claim_connection(&self) -> Option<CxSlot> {
        let permit = match self.shared() {
            Some(s) => match s.breakers.try_acquire(Kind::Connections) {
                Some(p) => Some(p),
                None => {
                    self.cluster_stats.upstream_cx_overflow.inc();
                    return None;
                }
            },
            None => None,
        };
        Some(self.slot(permit))
    }

    /// A slot taken past `max_connections`: Envoy always lets a host with no connection open
    /// one, so its pending requests are not stranded.
    pub(super) fn force_connection(&self) -> CxSlot {
        let permit = self.shared().map(|s| s.breakers.force(Kind::Connections));
        self.slot(permit)
    }

    fn claim_or_force(&self) -> CxSlot {
        match self.claim_connection() {
            Some(s) => s,
            None => self.force_connection(),
        }
    }

    fn slot(&self, permit: Option<Permit>) -> CxSlot {
        self.waiters.connections.fetch_add(1, Ordering::AcqRel);
        CxSlot {
            _permit: permit,
            waiters: self.waiters.clone(),
        }
    }

    /// Admits one request onto a ready connection: a `max_requests` permit (refused:
    /// `upstream_rq_active_overflow`, as Envoy counts it since 1.38) and `upstream_rq_total`.
    fn admit(&self) -> Result<Option<Permit>, UpstreamError> {
        let permit = match self.shared() {
            Some(s) => match s.breakers.try_acquire(Kind::Requests) {
                Some(p) => Some(p),
                None => {
                    self.cluster_stats.upstream_rq_active_overflow.inc();
                    return Err(UpstreamError::Overflow);
                }
            },
            None => None,
        };
        self.cluster_stats.upstream_rq_total.inc();
        self.host_stats.rq_total.inc();
        Ok(permit)
    }

    /// A `max_pending_requests` permit for a request that waits for a connection.
    fn pending(&self) -> Result<Option<Permit>, UpstreamError> {
        match self.shared() {
            Some(s) => match s.breakers.try_acquire(Kind::PendingRequests) {
                Some(p) => Ok(Some(p)),
                None => {
                    self.cluster_stats.upstream_rq_pending_overflow.inc();
                    Err(UpstreamError::Overflow)
                }
            },
            None => Ok(None),
        }
    }

    /// An HTTP/1.1 connection for one request, as Envoy's pool: an idle one if any; else the
    /// request is pending (`max_pending_requests`) while a connection is opened, or, at
    /// `max_connections`, until one of this pool's connections is returned or closed (a pool
    /// without any connection always opens one). Then the request is admitted.
    async fn acquire_http1(&self) -> Result<(h1::Conn, bool, Option<Permit>), UpstreamError> {
        if let Some(c) = self.checkout_http1() {
            return self.attach_http1(c, true);
        }
        let pending = self.pending()?;
        let notified = self.waiters.notify.notified();
        tokio::pin!(notified);
        loop {
            notified.as_mut().enable();
            let slot = match self.claim_connection() {
                Some(s) => Some(s),
                None if self.waiters.connections.load(Ordering::Acquire) == 0 => {
                    Some(self.force_connection())
                }
                None => None,
            };
            if let Some(slot) = slot {
                let conn = self.connect_http1(slot).await?;
                drop(pending);
                return self.attach_http1(conn, false);
            }
            notified.as_mut().await;
            notified.set(self.waiters.notify.notified());
            if let Some(c) = self.checkout_http1() {
                drop(pending);
                return self.attach_http1(c, true);
            }
        }
    }

    fn attach_http1(
        &self,
        mut conn: h1::Conn,
        reused: bool,
    ) -> Result<(h1::Conn, bool, Option<Permit>), UpstreamError> {
        match self.admit() {
            Ok(permit) => {
                // `max_requests_per_connection`: the last request closes the connection.
                let g = conn.guard_mut();
                g.requests += 1;
                if let Some(max) = self.options().max_requests_per_connection
                    && g.requests >= max
                {
                    g.last = true;
                    self.cluster_stats.upstream_cx_max_requests.inc();
                }
                Ok((conn, reused, permit))
            }
            Err(e) => {
                self.release_http1(conn);
                Err(e)
            }
        }
    }

    /// The protocol requests are shaped for: for `auto_config` the one ALPN negotiated, or
    /// HTTP/1.1 until the first connection tells (the pool reshapes if it turns out h2).
    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol_for(http::Version::HTTP_11)
    }

    /// [`Pool::protocol`] for a request that came downstream over `downstream`
    /// (`use_downstream_protocol_config` follows it).
    pub fn protocol_for(&self, downstream: http::Version) -> UpstreamProtocol {
        match self.settings.protocol {
            UpstreamProtocol::UseDownstream if downstream == http::Version::HTTP_2 => {
                UpstreamProtocol::Http2
            }
            UpstreamProtocol::UseDownstream => UpstreamProtocol::Http1,
            UpstreamProtocol::Auto => match self.negotiated.load(Ordering::Acquire) {
                2 => UpstreamProtocol::Http2,
                _ => UpstreamProtocol::Http1,
            },
            p => p,
        }
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
            // The router shaped the request for the protocol `protocol_for` gave it.
            UpstreamProtocol::UseDownstream if req.version() == http::Version::HTTP_2 => {
                self.send_http2(req).await
            }
            UpstreamProtocol::UseDownstream => self.send_http1(req).await,
            UpstreamProtocol::Auto => {
                if self.negotiated.load(Ordering::Acquire) == 0 {
                    self.negotiate().await?;
                }
                let (mut parts, body) = req.into_parts();
                if self.negotiated.load(Ordering::Acquire) == 2 {
                    reshape_for_http2(&mut parts);
                    self.send_http2(Request::from_parts(parts, body)).await
                } else {
                    reshape_for_http1(&mut parts);
                    self.send_http1(Request::from_parts(parts, body)).await
                }
            }
        }
    }

    /// `auto_config`'s first connection: the TLS handshake's ALPN decides HTTP/2 (the
    /// connection becomes the host's shared h2 connection) or HTTP/1.1 (it joins the idle
    /// pool); no ALPN answer is HTTP/1.1, as in Envoy.
    async fn negotiate(&self) -> Result<(), UpstreamError> {
        let slot = self.claim_or_force();
        let io = self.connect_tcp().await?;
        if io.inner().alpn() == Some(b"h2") {
            let sender = self.start_http2(io, slot).await?;
            *lock(&self.h2) = Some(H2Conn {
                sender,
                created: Instant::now(),
                requests: 0,
                activity: Arc::new(H2Activity {
                    active: AtomicU64::new(0),
                    idle_since: Mutex::new(Instant::now()),
                }),
            });
            self.negotiated.store(2, Ordering::Release);
        } else {
            self.cluster_stats.upstream_cx_http1_total.inc();
            let conn = h1::Conn::new(io.into_inner(), self.connection_guard(slot));
            self.negotiated.store(1, Ordering::Release);
            self.release_http1(conn);
        }
        Ok(())
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
        let (mut conn, mut reused, permit) = self.acquire_http1().await?;
        loop {
            match h1::send(self.clone(), conn, &prepared, body).await {
                Ok(response) => {
                    return Ok(PoolResponse {
                        response: response.map(|b| PoolBody::Http1(b, permit)),
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
                            // The request is admitted already; it replaces the connection
                            // that failed under it.
                            conn = self.connect_http1(self.claim_or_force()).await?;
                            reused = false;
                        }
                        None => return Err(UpstreamError::Reset(Box::new(f.error))),
                    }
                }
            }
        }
    }

    fn checkout_http1(&self) -> Option<h1::Conn> {
        let options = self.options();
        let now = Instant::now();
        loop {
            let conn = lock(&self.idle).pop()?;
            if conn.is_usable() && !self.expired(conn.guard(), &options, now) {
                return Some(conn);
            }
        }
    }

    fn options(&self) -> PoolOptions {
        self.shared().map(|s| s.options).unwrap_or_default()
    }

    /// Whether an idle connection reached `idle_timeout` or `max_connection_duration`
    /// (counted in `upstream_cx_idle_timeout` / `upstream_cx_max_duration_reached`).
    fn expired(&self, g: &ConnectionGuard, options: &PoolOptions, now: Instant) -> bool {
        if options
            .max_connection_duration
            .is_some_and(|d| now >= g.created + d)
        {
            self.cluster_stats.upstream_cx_max_duration_reached.inc();
            return true;
        }
        if options
            .idle_timeout
            .is_some_and(|t| now >= g.idle_since + t)
        {
            self.cluster_stats.upstream_cx_idle_timeout.inc();
            return true;
        }
        false
    }

    /// Closes the idle connections that expired; returns when the next one will.
    fn sweep(&self, now: Instant) -> Option<Instant> {
        let options = self.options();
        let h2 = self.sweep_http2(&options, now);
        let mut idle = lock(&self.idle);
        idle.retain(|c| !self.expired(c.guard(), &options, now));
        idle.iter()
            .filter_map(|c| deadline(c.guard(), &options))
            .chain(h2)
            .min()
    }

    #[cfg(test)]
    pub(super) fn idle_len(&self) -> usize {
        lock(&self.idle).len()
    }

    /// Puts a connection whose exchange completed cleanly back in the idle list. Idle
    /// connections have no task watching them: the oldest one (the likeliest to have been
    /// closed by the upstream's idle timeout) is checked here, so that closed ones do not
    /// linger at the bottom of the list.
    pub(super) fn release_http1(&self, mut conn: h1::Conn) {
        let options = self.options();
        let now = Instant::now();
        let g = conn.guard_mut();
        if g.last {
            // Its last request (`max_requests_per_connection`) is done: closed.
            drop(conn);
        } else if options
            .max_connection_duration
            .is_some_and(|d| now >= g.created + d)
        {
            self.cluster_stats.upstream_cx_max_duration_reached.inc();
            drop(conn);
        } else {
            g.idle_since = now;
            let mut idle = lock(&self.idle);
            if idle.first().is_some_and(|oldest| !oldest.is_usable()) {
                idle.remove(0);
            }
            idle.push(conn);
            drop(idle);
            if let Some(s) = self.shared() {
                s.idle.notify_one();
            }
        }
        self.waiters.notify.notify_waiters();
    }

    /// Sends an HTTP/1.1 upgrade request (WebSocket) on a connection of its own, never pooled:
    /// after a `101` the connection belongs to the upgraded stream.
    pub async fn send_upgrade(
        &self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let slot = self.claim_or_force();
        let io = self.connect_tcp().await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake::<_, RequestBody>(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        self.cluster_stats.upstream_cx_http1_total.inc();
        let guard = self.connection_guard(slot);
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

    async fn connect_http1(&self, slot: CxSlot) -> Result<h1::Conn, UpstreamError> {
        let io = self.connect_tcp().await?;
        self.cluster_stats.upstream_cx_http1_total.inc();
        Ok(h1::Conn::new(io.into_inner(), self.connection_guard(slot)))
    }

    async fn send_http2(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<PoolResponse, UpstreamError> {
        let mut fresh = false;
        loop {
            let existing = self.checkout_http2();
            let (mut sender, activity, permit) = match existing {
                Some((s, a)) => (s, a, self.admit()?),
                None => {
                    // Pending while the connection is established, then admitted.
                    let pending = self.pending()?;
                    let s = self.connect_http2().await?;
                    let activity = Arc::new(H2Activity {
                        active: AtomicU64::new(0),
                        idle_since: Mutex::new(Instant::now()),
                    });
                    *lock(&self.h2) = Some(H2Conn {
                        sender: s.clone(),
                        created: Instant::now(),
                        requests: 0,
                        activity: activity.clone(),
                    });
                    fresh = true;
                    drop(pending);
                    (s, activity, self.admit()?)
                }
            };
            let stream = H2Stream::new(&activity);
            self.count_http2_request(&activity);
            match sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok(PoolResponse {
                        response: response.map(|b| PoolBody::Http2(b, permit, stream)),
                    });
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        let mut slot = lock(&self.h2);
                        if slot.as_ref().is_some_and(|s| s.sender.is_closed()) {
                            *slot = None;
                        }
                        req = unsent;
                    }
                    _ => return Err(UpstreamError::Reset(Box::new(e.into_error()))),
                },
            }
        }
    }

    /// The shared HTTP/2 connection, unless it closed or reached `max_connection_duration`.
    fn checkout_http2(&self) -> Option<(http2::SendRequest<RequestBody>, Arc<H2Activity>)> {
        let options = self.options();
        let mut slot = lock(&self.h2);
        let c = slot.as_ref()?;
        if c.sender.is_closed() {
            *slot = None;
            return None;
        }
        if options
            .max_connection_duration
            .is_some_and(|d| Instant::now() >= c.created + d)
        {
            self.cluster_stats.upstream_cx_max_duration_reached.inc();
            *slot = None;
            return None;
        }
        Some((c.sender.clone(), c.activity.clone()))
    }

    /// `max_requests_per_connection`: the connection that carried its last request takes no
    /// more (it closes once its streams end).
    fn count_http2_request(&self, activity: &Arc<H2Activity>) {
        let Some(max) = self.options().max_requests_per_connection else {
            return;
        };
        let mut slot = lock(&self.h2);
        if let Some(c) = slot.as_mut()
            && Arc::ptr_eq(&c.activity, activity)
        {
            c.requests += 1;
            if c.requests >= max {
                self.cluster_stats.upstream_cx_max_requests.inc();
                *slot = None;
            }
        }
    }

    /// HTTP/2: closes the shared connection once it has been without streams for
    /// `idle_timeout` or reached `max_connection_duration` while idle.
    fn sweep_http2(&self, options: &PoolOptions, now: Instant) -> Option<Instant> {
        let mut slot = lock(&self.h2);
        let c = slot.as_ref()?;
        if c.activity.active.load(Ordering::Acquire) > 0 {
            return options.idle_timeout.map(|t| now + t);
        }
        let idle_since = *lock(&c.activity.idle_since);
        if options
            .max_connection_duration
            .is_some_and(|d| now >= c.created + d)
        {
            self.cluster_stats.upstream_cx_max_duration_reached.inc();
            *slot = None;
            return None;
        }
        if options.idle_timeout.is_some_and(|t| now >= idle_since + t) {
            self.cluster_stats.upstream_cx_idle_timeout.inc();
            *slot = None;
            return None;
        }
        let idle = options.idle_timeout.map(|t| idle_since + t);
        let age = options.max_connection_duration.map(|d| c.created + d);
        match (idle, age) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn connect_http2(&self) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let slot = self.claim_or_force();
        let io = self.connect_tcp().await?;
        self.start_http2(io, slot).await
    }

    /// The HTTP/2 handshake on a connected stream; the connection task owns the slot.
    async fn start_http2(
        &self,
        io: TokioIo<UpstreamStream>,
        slot: CxSlot,
    ) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake::<_, RequestBody>(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        self.cluster_stats.upstream_cx_http2_total.inc();
        let guard = self.connection_guard(slot);
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn connect_tcp(&self) -> Result<TokioIo<UpstreamStream>, UpstreamError> {
        // The connect timeout covers the TLS handshake, as in Envoy.
        let connect = UpstreamStream::connect(self.address, self.settings.tls.as_deref());
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
        if let Some(k) = self.shared().and_then(|s| s.options.tcp_keepalive) {
            set_keepalive(&stream, &k);
        }
        Ok(TokioIo::new(stream))
    }

    /// A TCP connection of its own (never pooled), for the TCP proxy: connected with the
    /// cluster's `connect_timeout` and counted in the cluster's and host's connection stats
    /// (`upstream_cx_total`, `upstream_cx_active` while the guard lives,
    /// `upstream_cx_connect_fail`).
    /// At the cluster's `max_connections` it fails at once with [`UpstreamError::Overflow`]
    /// (`upstream_cx_overflow`), as Envoy's TCP proxy does.
    pub async fn connect_raw(&self) -> Result<(UpstreamStream, ConnectionGuard), UpstreamError> {
        let slot = self.claim_connection().ok_or(UpstreamError::Overflow)?;
        let io = self.connect_tcp().await?;
        Ok((io.into_inner(), self.connection_guard(slot)))
    }

    pub(super) fn connection_guard(&self, slot: CxSlot) -> ConnectionGuard {
        self.cluster_stats.upstream_cx_total.inc();
        self.cluster_stats.upstream_cx_active.inc();
        self.host_stats.cx_total.inc();
        self.host_stats.cx_active.inc();
        let now = Instant::now();
        ConnectionGuard {
            host: self.host_stats.clone(),
            cluster: self.cluster_stats.clone(),
            created: now,
            idle_since: now,
            requests: 0,
            last: false,
            _slot: slot,
        }
    }
}

/// When an idle connection expires, if ever.
fn deadline(g: &ConnectionGuard, options: &PoolOptions) -> Option<Instant> {
    let idle = options.idle_timeout.map(|t| g.idle_since + t);
    let age = options.max_connection_duration.map(|d| g.created + d);
    match (idle, age) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The cluster's one idle-connection timer: closes idle HTTP/1.1 connections at
/// `idle_timeout` or `max_connection_duration` (idle connections have no task of their own),
/// sleeping until the next expiry or until a connection goes idle. Ends with the cluster.
pub(super) async fn sweeper(cluster: std::sync::Weak<super::Cluster>, shared: Arc<Shared>) {
    let o = shared.options;
    let Some(fallback) = [o.idle_timeout, o.max_connection_duration]
        .into_iter()
        .flatten()
        .min()
    else {
        return;
    };
    loop {
        let now = Instant::now();
        let next = {
            let Some(c) = cluster.upgrade() else { return };
            c.host_set()
                .hosts
                .iter()
                .filter_map(|h| h.pool.sweep(now))
                .min()
        };
        let wake = next.unwrap_or(now + fallback);
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            () = shared.idle.notified() => {}
        }
    }
}

/// Sets `SO_KEEPALIVE` and the configured time, interval and probes on an upstream socket.
fn set_keepalive(stream: &UpstreamStream, k: &crate::config::pool::TcpKeepalive) {
    let tcp = match stream {
        UpstreamStream::Plain(s) => s,
        UpstreamStream::Tls(s) => s.get_ref().0,
    };
    let mut ka = socket2::TcpKeepalive::new();
    if let Some(t) = k.time {
        ka = ka.with_time(t);
    }
    if let Some(i) = k.interval {
        ka = ka.with_interval(i);
    }
    if let Some(p) = k.probes {
        ka = ka.with_retries(p);
    }
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "cannot set TCP keepalive on an upstream connection");
    }
}

/// Keeps `upstream_cx_active` right for as long as a connection task runs.
pub struct ConnectionGuard {
    host: Arc<HostStats>,
    cluster: Arc<ClusterStats>,
    created: Instant,
    /// When it last went idle (HTTP/1.1 pool).
    pub(super) idle_since: Instant,
    /// Requests it carried (HTTP/1.1 pool).
    pub(super) requests: u32,
    /// Its current request is its last (`max_requests_per_connection`).
    pub(super) last: bool,
    /// Dropped after the stats above are updated: wakes requests waiting for a connection.
    _slot: CxSlot,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.host.cx_active.dec();
        self.cluster.upstream_cx_active.dec();
    }
}

/// A request shaped for HTTP/1.1 (origin form + `Host`) reshaped for HTTP/2 (`:authority`
/// in the URI, no `Host`), for an `auto_config` host that negotiated h2.
fn reshape_for_http2(parts: &mut http::request::Parts) {
    if parts.version == http::Version::HTTP_2 {
        return;
    }
    parts.version = http::Version::HTTP_2;
    let host = parts.headers.remove(http::header::HOST);
    let authority = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if let Ok(uri) = format!("http://{authority}{path}").parse() {
        parts.uri = uri;
    }
}

/// The other way round, for a request shaped before the negotiation said HTTP/1.1.
fn reshape_for_http1(parts: &mut http::request::Parts) {
    if parts.version != http::Version::HTTP_2 {
        return;
    }
    parts.version = http::Version::HTTP_11;
    if let Some(a) = parts.uri.authority()
        && let Ok(v) = http::HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if let Ok(uri) = path.parse() {
        parts.uri = uri;
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
                tls: None,
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
