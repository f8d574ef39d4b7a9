//! Active health checking of a cluster's hosts (Envoy's `HealthCheckerImplBase` and its HTTP,
//! TCP and gRPC checkers).
//!
//! One task per cluster ([`run`]) drives every host's schedule: it follows the cluster's
//! membership (woken by [`HealthChecker::hosts_changed`]), keeps one session per host
//! (thresholds, the "first check decides at once" rule, the connection reused between checks),
//! and runs each check as a short-lived future bounded by the check's `timeout`. Results change
//! only the host's `FAILED_ACTIVE_HC` / `PENDING_ACTIVE_HC` flags; when routability changes the
//! cluster's host set is rebuilt ([`super::Cluster::refresh_health`]).
//!
//! Envoy's state machine, as in `health_checker_base_impl.cc`:
//! * new hosts start `FAILED_ACTIVE_HC`; the first completed check decides at once (a single
//!   success makes the host healthy), later transitions need `healthy_threshold` successes or
//!   `unhealthy_threshold` network failures (refused, reset, timeout);
//! * an HTTP status outside `expected_statuses` (unless in `retriable_statuses`) and any failed
//!   gRPC check mark a healthy host unhealthy at once, ignoring `unhealthy_threshold`;
//! * the next check is scheduled after the previous one ends: `no_traffic_interval` (or
//!   `no_traffic_healthy_interval` for a healthy host) until the cluster has made an upstream
//!   connection, then `interval` / `unhealthy_interval`, or the `*_edge_interval`s while a
//!   transition is pending; plus `interval_jitter_percent` and `interval_jitter`.
//!
//! A host whose routability changed rebuilds the load balancer's host set at once if the
//! cluster's last update is more than Envoy's `update_merge_window` (1 s) old, else when that
//! window ends ([`MergeWindow`]); `/clusters` shows the flags at once, as in Envoy.
//!
//! The initialization round ([`HealthChecker::begin_round`]) is Envoy's
//! `pending_initialize_health_checks_`: when the cluster's own discovery has finished, the
//! number of hosts not yet checked is taken, and every completed check (or a host removed
//! before its first check) counts one down; at zero the round is over.
//!
//! This module must not pick hosts for requests or touch the request path.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Cluster;
use super::host::{Host, flags};
use crate::config::health_check::{Checker, Codec, GrpcCheck, HealthCheck, HttpCheck, TcpCheck};
use crate::init;
use crate::stats::{Counter, Gauge, Sample, Scope};

/// Envoy's `User-Agent` for health checks.
const USER_AGENT: &str = "Envoy/HC";
/// How much a TCP check buffers while looking for its `receive` payloads (Envoy's default
/// per-connection buffer limit).
const TCP_RECEIVE_LIMIT: usize = 1024 * 1024;

/// `cluster.<name>.health_check.*`.
#[derive(Debug, Default)]
pub struct HealthCheckStats {
    pub attempt: Counter,
    pub success: Counter,
    pub failure: Counter,
    pub network_failure: Counter,
    pub passive_failure: Counter,
    pub verify_cluster: Counter,
    /// Hosts this checker considers healthy (Envoy's `incHealthy`/`decHealthy`).
    pub healthy: Gauge,
    /// Hosts answering `x-envoy-degraded`: always 0, degraded hosts are not implemented (such
    /// a host counts as healthy).
    pub degraded: Gauge,
}

/// A cluster's health checker: configuration, stats and the initialization round. The cluster
/// owns it; [`run`] is its task.
#[derive(Debug)]
pub struct HealthChecker {
    config: HealthCheck,
    cluster_name: String,
    pub stats: HealthCheckStats,
    changed: Notify,
    round: Mutex<Round>,
    round_done: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct Round {
    begun: bool,
    pending: usize,
    /// Hosts whose first check completed (before the round began they do not count).
    checked: HashSet<SocketAddr>,
}

impl HealthChecker {
    pub fn new(config: HealthCheck, cluster_name: &str) -> Self {
        Self {
            config,
            cluster_name: cluster_name.to_string(),
            stats: HealthCheckStats::default(),
            changed: Notify::new(),
            round: Mutex::new(Round::default()),
            round_done: watch::channel(false).0,
        }
    }

    pub fn config(&self) -> &HealthCheck {
        &self.config
    }

    /// The cluster's membership changed; the task adds and removes sessions.
    pub fn hosts_changed(&self) {
        self.changed.notify_one();
    }

    /// The cluster's discovery finished (Envoy's `onInitDone`): the round waits for one check
    /// per host not checked yet. Later calls do nothing.
    pub fn begin_round(&self, hosts: &[Arc<Host>]) {
        let mut round = lock(&self.round);
        if round.begun {
            return;
        }
        round.begun = true;
        round.pending = hosts
            .iter()
            .filter(|h| !round.checked.contains(&h.address))
            .count();
        tracing::debug!(cluster = %self.cluster_name, pending = round.pending,
            "health check round begins");
        if round.pending == 0 {
            self.round_done.send_replace(true);
        }
    }

    /// One check completed (or a host was removed before its first check).
    fn completed(&self, address: SocketAddr, first: bool) {
        let mut round = lock(&self.round);
        if first {
            round.checked.insert(address);
        }
        if round.begun && round.pending > 0 {
            round.pending -= 1;
            if round.pending == 0 {
                tracing::info!(cluster = %self.cluster_name, "health check round finished");
                self.round_done.send_replace(true);
            }
        }
    }

    /// Completes once the initialization round is over.
    pub fn round_finished(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.round_done.subscribe();
        async move {
            let _ = rx.wait_for(|done| *done).await;
        }
    }

    /// Reports `ready` once the round is over.
    pub fn wait_round(&self, ready: init::TargetHandle) {
        let done = self.round_finished();
        tokio::spawn(async move {
            done.await;
            ready.ready();
        });
    }

    pub fn collect(&self, scope: &Scope, out: &mut Vec<Sample>) {
        let s = &self.stats;
        scope.counter("health_check.attempt", s.attempt.get(), out);
        scope.counter("health_check.success", s.success.get(), out);
        scope.counter("health_check.failure", s.failure.get(), out);
        scope.counter("health_check.network_failure", s.network_failure.get(), out);
        scope.counter("health_check.passive_failure", s.passive_failure.get(), out);
        scope.counter("health_check.verify_cluster", s.verify_cluster.get(), out);
        scope.gauge("health_check.healthy", s.healthy.get(), out);
        scope.gauge("health_check.degraded", s.degraded.get(), out);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one check found (Envoy's `HealthCheckFailureType` plus success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The host answered, wrongly (`ACTIVE`); `retriable` counts toward `unhealthy_threshold`.
    Active {
        retriable: bool,
    },
    /// Connection refused, reset or closed (`NETWORK`).
    Network,
    /// No answer within `timeout` (`NETWORK_TIMEOUT`).
    Timeout,
}

/// Envoy's `HealthTransition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    Changed,
    ChangePending,
}

/// One host's state machine.
#[derive(Debug)]
pub struct Session {
    pub host: Arc<Host>,
    first_check: bool,
    num_healthy: u32,
    num_unhealthy: u32,
}

/// The result of applying one outcome to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub transition: Transition,
    /// The check's result was healthy (Envoy's `HealthState`).
    pub healthy: bool,
    /// The host's routability changed: the cluster's host set must be rebuilt.
    pub routability_changed: bool,
    /// This was the host's first completed check.
    pub first: bool,
}

impl Session {
    pub fn new(host: Arc<Host>, stats: &HealthCheckStats) -> Self {
        if host.flags() & flags::FAILED_ACTIVE_HC == 0 {
            stats.healthy.inc();
        }
        Self {
            host,
            first_check: true,
            num_healthy: 0,
            num_unhealthy: 0,
        }
    }

    /// Envoy's `handleSuccess` / `setUnhealthy`.
    pub fn apply(
        &mut self,
        outcome: Outcome,
        config: &HealthCheck,
        stats: &HealthCheckStats,
    ) -> Applied {
        let first = self.first_check;
        let failed = self.host.flags() & flags::FAILED_ACTIVE_HC != 0;
        let mut transition = Transition::Unchanged;
        let mut routability_changed = false;
        let healthy = outcome == Outcome::Success;
        if healthy {
            self.num_unhealthy = 0;
            if failed {
                if self.first_check || {
                    self.num_healthy += 1;
                    self.num_healthy == config.healthy_threshold
                } {
                    routability_changed |= self.host.set_flags(flags::FAILED_ACTIVE_HC, false);
                    stats.healthy.inc();
                    transition = Transition::Changed;
                } else {
                    transition = Transition::ChangePending;
                }
            }
            stats.success.inc();
        } else {
            self.num_healthy = 0;
            let network = matches!(outcome, Outcome::Network | Outcome::Timeout);
            let retriable = matches!(outcome, Outcome::Active { retriable: true });
            if !failed {
                if (!network && !retriable) || {
                    self.num_unhealthy += 1;
                    self.num_unhealthy == config.unhealthy_threshold
                } {
                    routability_changed |= self.host.set_flags(flags::FAILED_ACTIVE_HC, true);
                    stats.healthy.dec();
                    transition = Transition::Changed;
                } else {
                    transition = Transition::ChangePending;
                }
            }
            stats.failure.inc();
            if network {
                stats.network_failure.inc();
            }
        }
        if self.host.flags() & flags::PENDING_ACTIVE_HC != 0 {
            routability_changed |= self.host.set_flags(flags::PENDING_ACTIVE_HC, false);
            transition = Transition::Changed;
        }
        self.first_check = false;
        Applied {
            transition,
            healthy,
            routability_changed,
            first,
        }
    }

    fn removed(&self, stats: &HealthCheckStats) {
        if self.host.flags() & flags::FAILED_ACTIVE_HC == 0 {
            stats.healthy.dec();
        }
    }
}

/// Envoy's `interval()`: the wait before the next check of a host.
pub fn next_interval(
    config: &HealthCheck,
    had_traffic: bool,
    applied: &Applied,
    random: &mut impl FnMut() -> u64,
) -> Duration {
    let pending = applied.transition == Transition::ChangePending;
    let base = if had_traffic {
        match (applied.healthy, pending) {
            (false, true) => config.unhealthy_edge_interval,
            (false, false) => config.unhealthy_interval,
            (true, true) => config.healthy_edge_interval,
            (true, false) => config.interval,
        }
    } else if applied.healthy && !pending {
        config.no_traffic_healthy_interval
    } else {
        config.no_traffic_interval
    };
    with_jitter(
        millis(base),
        config.interval_jitter_percent,
        millis(config.interval_jitter),
        random,
    )
}

/// Envoy's `intervalWithJitter` (never below 1 ms).
pub fn with_jitter(
    base_ms: u64,
    jitter_percent: u32,
    jitter_ms: u64,
    random: &mut impl FnMut() -> u64,
) -> Duration {
    let mut ms = base_ms;
    let percent_mod = u64::from(jitter_percent).saturating_mul(base_ms) / 100;
    if percent_mod > 0 {
        ms = ms.saturating_add(random() % percent_mod);
    }
    if jitter_ms > 0 {
        ms = ms.saturating_add(random() % jitter_ms);
    }
    Duration::from_millis(ms.max(1))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A connection kept between checks (`reuse_connection`). Idle, nothing polls it: no task,
/// no buffers; it is checked for closure before reuse.
enum Conn {
    Tcp(TcpStream),
    H1(http1::SendRequest<Full<Bytes>>, Pin<Box<H1Connection>>),
    H2(http2::SendRequest<Full<Bytes>>, Pin<Box<H2Connection>>),
}

type H1Connection = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;
type H2Connection = http2::Connection<TokioIo<TcpStream>, Full<Bytes>, TokioExecutor>;

impl Conn {
    /// Whether an idle connection is still usable (the peer did not close it meanwhile).
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self {
            Conn::Tcp(s) => {
                // Readable now means EOF, an error or unsolicited bytes: start afresh.
                let mut buf = [0u8; 1];
                match s.try_read(&mut buf) {
                    Ok(_) => false,
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                }
            }
            Conn::H1(sender, conn) => {
                !sender.is_closed() && conn.as_mut().poll(&mut cx).is_pending()
            }
            Conn::H2(sender, conn) => {
                !sender.is_closed() && conn.as_mut().poll(&mut cx).is_pending()
            }
        }
    }
}

/// Everything a check needs, cloned into its future.
#[derive(Clone)]
struct Target {
    address: SocketAddr,
    /// `Host` / `:authority` (the configured one, else the cluster's name).
    authority: String,
}

/// One check; returns the outcome and the connection to keep, if any.
async fn check(
    kind: Arc<Checker>,
    target: Target,
    reuse: bool,
    conn: Option<Conn>,
) -> (Outcome, Option<Conn>) {
    match &*kind {
        Checker::Tcp(t) => tcp_check(t, &target, reuse, conn).await,
        Checker::Http(h) => http_check(h, &target, reuse, conn).await,
        Checker::Grpc(g) => grpc_check(g, &target, reuse, conn).await,
    }
}

async fn connect(address: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(address).await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Envoy's `PayloadMatcher::match`: every segment, in order, somewhere in `data`.
pub fn payload_matches(segments: &[Vec<u8>], data: &[u8]) -> bool {
    let mut start = 0;
    for seg in segments {
        let Some(pos) = data.get(start..).and_then(|rest| {
            rest.windows(seg.len().max(1))
                .position(|w| w == seg.as_slice())
        }) else {
            return false;
        };
        start += pos + seg.len();
    }
    true
}

async fn tcp_check(
    t: &TcpCheck,
    target: &Target,
    reuse: bool,
    conn: Option<Conn>,
) -> (Outcome, Option<Conn>) {
    let mut stream = match conn {
        Some(Conn::Tcp(s)) => s,
        _ => match connect(target.address).await {
            Ok(s) => s,
            Err(_) => return (Outcome::Network, None),
        },
    };
    if !t.send.is_empty() && stream.write_all(&t.send).await.is_err() {
        return (Outcome::Network, None);
    }
    if t.receive.is_empty() {
        // A connect test: Envoy succeeds on connect and always closes.
        return (Outcome::Success, None);
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return (Outcome::Network, None),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if payload_matches(&t.receive, &buf) {
                    return (Outcome::Success, reuse.then_some(Conn::Tcp(stream)));
                }
                if buf.len() > TCP_RECEIVE_LIMIT {
                    return (Outcome::Network, None);
                }
            }
        }
    }
}

/// Runs `exchange` while polling the connection that serves it; says whether the connection
/// ended meanwhile.
async fn drive<C, F, T>(conn: &mut Pin<Box<C>>, exchange: F) -> (T, bool)
where
    C: Future + ?Sized,
    F: Future<Output = T>,
{
    let mut exchange = std::pin::pin!(exchange);
    tokio::select! {
        biased;
        r = &mut exchange => (r, false),
        _ = conn.as_mut() => (exchange.await, true),
    }
}

fn apply_headers(check: &HttpCheck, headers: &mut http::HeaderMap) {
    use crate::config::route::AppendAction;
    for name in &check.headers.remove {
        headers.remove(name);
    }
    for a in &check.headers.add {
        match a.action {
            AppendAction::AppendIfExistsOrAdd => {
                headers.append(a.name.clone(), a.value.clone());
            }
            AppendAction::AddIfAbsent => {
                if !headers.contains_key(&a.name) {
                    headers.insert(a.name.clone(), a.value.clone());
                }
            }
            AppendAction::OverwriteIfExistsOrAdd => {
                headers.insert(a.name.clone(), a.value.clone());
            }
            AppendAction::OverwriteIfExists => {
                if headers.contains_key(&a.name) {
                    headers.insert(a.name.clone(), a.value.clone());
                }
            }
        }
    }
}

/// Opens (or reuses) an HTTP connection of the given codec.
async fn http_conn(codec: Codec, address: SocketAddr, conn: Option<Conn>) -> Option<Conn> {
    match (codec, conn) {
        (Codec::Http1, Some(c @ Conn::H1(..))) | (Codec::Http2, Some(c @ Conn::H2(..))) => Some(c),
        (Codec::Http1, _) => {
            let io = TokioIo::new(connect(address).await.ok()?);
            let (sender, conn) = http1::handshake(io).await.ok()?;
            Some(Conn::H1(sender, Box::pin(conn)))
        }
        (Codec::Http2, _) => {
            let io = TokioIo::new(connect(address).await.ok()?);
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await.ok()?;
            Some(Conn::H2(sender, Box::pin(conn)))
        }
    }
}

/// Sends one request over `conn` and returns the response head, body and trailers (the body
/// only when `keep_body`), and whether the connection may be reused.
async fn exchange(
    conn: Conn,
    req: http::Request<Full<Bytes>>,
    keep_body: bool,
) -> Option<(
    http::response::Parts,
    Bytes,
    Option<http::HeaderMap>,
    Option<Conn>,
)> {
    async fn read(
        resp: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
        keep_body: bool,
    ) -> Option<(http::response::Parts, Bytes, Option<http::HeaderMap>)> {
        let (parts, mut body) = resp.ok()?.into_parts();
        let mut data = BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.ok()?;
            match frame.into_data() {
                Ok(d) => {
                    if keep_body {
                        data.put(d);
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
        Some((parts, data.freeze(), trailers))
    }
    match conn {
        Conn::H1(mut sender, mut c) => {
            let (r, ended) = drive(&mut c, async {
                sender.ready().await.ok()?;
                read(sender.send_request(req).await, keep_body).await
            })
            .await;
            let (parts, body, trailers) = r?;
            let keep = !ended && !sender.is_closed();
            Some((parts, body, trailers, keep.then_some(Conn::H1(sender, c))))
        }
        Conn::H2(mut sender, mut c) => {
            let (r, ended) = drive(&mut c, async {
                sender.ready().await.ok()?;
                read(sender.send_request(req).await, keep_body).await
            })
            .await;
            let (parts, body, trailers) = r?;
            let keep = !ended && !sender.is_closed();
            Some((parts, body, trailers, keep.then_some(Conn::H2(sender, c))))
        }
        Conn::Tcp(_) => None,
    }
}

async fn http_check(
    h: &HttpCheck,
    target: &Target,
    reuse: bool,
    conn: Option<Conn>,
) -> (Outcome, Option<Conn>) {
    let Some(conn) = http_conn(h.codec, target.address, conn).await else {
        return (Outcome::Network, None);
    };
    let uri = match h.codec {
        Codec::Http1 => h.path.clone(),
        Codec::Http2 => format!("http://{}{}", target.authority, h.path),
    };
    let mut req = match http::Request::builder()
        .method(h.method.clone())
        .uri(uri)
        .body(Full::new(Bytes::new()))
    {
        Ok(r) => r,
        Err(_) => return (Outcome::Network, None),
    };
    if h.codec == Codec::Http1
        && let Ok(v) = http::HeaderValue::from_str(&target.authority)
    {
        req.headers_mut().insert(http::header::HOST, v);
    }
    req.headers_mut().insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    );
    apply_headers(h, req.headers_mut());
    let Some((parts, _, _, conn)) = exchange(conn, req, false).await else {
        return (Outcome::Network, None);
    };
    let status = parts.status.as_u16();
    let outcome = if h.expected(status) {
        Outcome::Success
    } else {
        Outcome::Active {
            retriable: h.retriable(status),
        }
    };
    (outcome, conn.filter(|_| reuse))
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

async fn grpc_check(
    g: &GrpcCheck,
    target: &Target,
    reuse: bool,
    conn: Option<Conn>,
) -> (Outcome, Option<Conn>) {
    let Some(conn) = http_conn(Codec::Http2, target.address, conn).await else {
        return (Outcome::Network, None);
    };
    // HealthCheckRequest { service = 1 }, in one length-prefixed gRPC frame.
    let mut message = Vec::new();
    if !g.service_name.is_empty() {
        message.push(0x0a);
        put_varint(&mut message, g.service_name.len() as u64);
        message.extend_from_slice(g.service_name.as_bytes());
    }
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap_or(0).to_be_bytes());
    frame.extend_from_slice(&message);
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!(
            "http://{}/grpc.health.v1.Health/Check",
            target.authority
        ))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, USER_AGENT)
        .body(Full::new(Bytes::from(frame)));
    let Ok(req) = req else {
        return (Outcome::Network, None);
    };
    let Some((parts, body, trailers, conn)) = exchange(conn, req, true).await else {
        return (Outcome::Network, None);
    };
    let grpc_status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    let serving = parts.status == http::StatusCode::OK
        && grpc_status == Some(0)
        && serving_status(&body) == Some(SERVING);
    let outcome = if serving {
        Outcome::Success
    } else {
        Outcome::Active { retriable: false }
    };
    (outcome, conn.filter(|_| reuse))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.first()?;
        buf.advance(1);
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The `status` of the single `HealthCheckResponse` in a gRPC response body.
pub fn serving_status(body: &[u8]) -> Option<u64> {
    let mut buf = body;
    if buf.len() < 5 || buf[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    buf.advance(5);
    if buf.len() != len {
        return None;
    }
    let mut status = 0;
    while !buf.is_empty() {
        let key = get_varint(&mut buf)?;
        match key & 7 {
            0 => {
                let v = get_varint(&mut buf)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            2 => {
                let n = usize::try_from(get_varint(&mut buf)?).ok()?;
                if buf.len() < n {
                    return None;
                }
                buf.advance(n);
            }
            5 => buf.advance(4.min(buf.len())),
            1 => buf.advance(8.min(buf.len())),
            _ => return None,
        }
    }
    Some(status)
}

/// A host's entry in the task.
struct Entry {
    session: Session,
    /// When the next check starts; `None` while one is running.
    due: Option<Instant>,
    conn: Option<Conn>,
    running: Option<tokio::task::AbortHandle>,
    generation: u64,
}

/// The cluster's health-check task: runs until the cluster is gone.
pub async fn run(cluster: Weak<Cluster>, checker: Arc<HealthChecker>) {
    let config = checker.config.clone();
    let kind = Arc::new(config.checker.clone());
    let authority = {
        let configured = match &config.checker {
            Checker::Http(h) => h.host.clone(),
            Checker::Grpc(g) => g.authority.clone(),
            Checker::Tcp(_) => String::new(),
        };
        if configured.is_empty() {
            checker.cluster_name.clone()
        } else {
            configured
        }
    };
    let mut entries: HashMap<SocketAddr, Entry> = HashMap::new();
    let mut running: JoinSet<(SocketAddr, u64, Outcome, Option<Conn>)> = JoinSet::new();
    let mut generation = 0u64;
    let mut random = || fastrand::u64(..);
    let mut sync = true;
    let mut window = MergeWindow::default();
    loop {
        if sync {
            sync = false;
            let Some(c) = cluster.upgrade() else { return };
            let set = c.host_set();
            drop(c);
            let current: HashMap<SocketAddr, &Arc<Host>> =
                set.hosts.iter().map(|h| (h.address, h)).collect();
            let mut membership_changed = false;
            entries.retain(|address, e| {
                let keep = current
                    .get(address)
                    .is_some_and(|h| Arc::ptr_eq(h, &e.session.host));
                if !keep {
                    if let Some(r) = e.running.take() {
                        r.abort();
                    }
                    e.session.removed(&checker.stats);
                    if e.session.first_check {
                        checker.completed(*address, false);
                    }
                    membership_changed = true;
                }
                keep
            });
            for (address, host) in current {
                entries.entry(address).or_insert_with(|| {
                    membership_changed = true;
                    generation += 1;
                    let first = if config.initial_jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        with_jitter(0, 0, millis(config.initial_jitter), &mut random)
                    };
                    Entry {
                        session: Session::new(host.clone(), &checker.stats),
                        due: Some(Instant::now() + first),
                        conn: None,
                        running: None,
                        generation,
                    }
                });
            }
            if membership_changed {
                // A membership update (never merged) rebuilt the host set with every flag.
                window.applied(Instant::now());
            }
        }
        // Start every check that is due.
        let now = Instant::now();
        for (address, e) in entries.iter_mut() {
            if e.due.is_some_and(|d| d <= now) {
                e.due = None;
                checker.stats.attempt.inc();
                let mut conn = e.conn.take().filter(|_| config.reuse_connection);
                if let Some(c) = conn.as_mut()
                    && !c.still_open()
                {
                    conn = None;
                }
                let target = Target {
                    address: *address,
                    authority: authority.clone(),
                };
                let kind = kind.clone();
                let timeout = config.timeout;
                let reuse = config.reuse_connection;
                let generation = e.generation;
                let handle = running.spawn(async move {
                    match tokio::time::timeout(timeout, check(kind, target.clone(), reuse, conn))
                        .await
                    {
                        Ok((outcome, conn)) => (target.address, generation, outcome, conn),
                        Err(_) => (target.address, generation, Outcome::Timeout, None),
                    }
                });
                e.running = Some(handle);
            }
        }
        let next_due = entries.values().filter_map(|e| e.due).min();
        tokio::select! {
            _ = checker.changed.notified() => sync = true,
            Some(done) = running.join_next(), if !running.is_empty() => {
                let Ok((address, generation, outcome, conn)) = done else { continue };
                let Some(e) = entries.get_mut(&address) else { continue };
                if e.generation != generation {
                    continue;
                }
                e.running = None;
                let applied = e.session.apply(outcome, &config, &checker.stats);
                tracing::debug!(cluster = %checker.cluster_name, host = %address, ?outcome,
                    transition = ?applied.transition, "health check");
                let Some(c) = cluster.upgrade() else { return };
                let had_traffic = c.stats().upstream_cx_total.get() > 0;
                if applied.healthy && let Some(detector) = c.outlier() {
                    // Envoy's default successful_active_health_check_uneject_host.
                    detector.on_health_check_success(&c, &e.session.host);
                }
                if applied.routability_changed {
                    let now = Instant::now();
                    if !*checker.round_done.borrow() {
                        // Initializing: no traffic yet; LIVE must see every result.
                        window.applied(now);
                        c.refresh_health();
                    } else if window.health_changed(now) {
                        c.refresh_health();
                    }
                }
                drop(c);
                e.conn = conn;
                e.due = Some(Instant::now() + next_interval(&config, had_traffic, &applied, &mut random));
                checker.completed(address, applied.first);
            }
            _ = sleep_until(next_due) => {}
            _ = sleep_until(window.deadline) => {
                window.applied(Instant::now());
                let Some(c) = cluster.upgrade() else { return };
                c.refresh_health();
            }
        }
    }
}

/// Envoy's `CommonLbConfig.update_merge_window` default: health-only host-set updates of a
/// cluster are applied at most once per window (the first one at once, later ones merged and
/// applied when the window ends); membership updates are never delayed.
pub const UPDATE_MERGE_WINDOW: Duration = Duration::from_secs(1);

/// The cluster manager's `scheduleUpdate` for one cluster.
#[derive(Debug, Default)]
pub struct MergeWindow {
    last: Option<Instant>,
    /// When the merged update is applied.
    pub deadline: Option<Instant>,
}

impl MergeWindow {
    /// An update was applied now (a membership change, or a merged update delivered).
    pub fn applied(&mut self, now: Instant) {
        self.last = Some(now);
        self.deadline = None;
    }

    /// A host's health changed: whether to rebuild the host set now (else at `deadline`).
    pub fn health_changed(&mut self, now: Instant) -> bool {
        let out_of_window = self
            .last
            .is_none_or(|last| now.duration_since(last) > UPDATE_MERGE_WINDOW);
        if out_of_window {
            self.applied(now);
            return true;
        }
        if self.deadline.is_none() {
            self.deadline = Some(now + UPDATE_MERGE_WINDOW);
        }
        false
    }
}

async fn sleep_until(when: Option<Instant>) {
    match when {
        Some(w) => tokio::time::sleep_until(w).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::health_check::TcpCheck;

    fn config() -> HealthCheck {
        HealthCheck {
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(10),
            initial_jitter: Duration::ZERO,
            interval_jitter: Duration::ZERO,
            interval_jitter_percent: 0,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            no_traffic_interval: Duration::from_secs(60),
            no_traffic_healthy_interval: Duration::from_secs(70),
            unhealthy_interval: Duration::from_secs(20),
            unhealthy_edge_interval: Duration::from_secs(30),
            healthy_edge_interval: Duration::from_secs(40),
            reuse_connection: true,
            checker: Checker::Tcp(TcpCheck::default()),
        }
    }

    /// Hosts of a STATIC cluster on 127.0.0.1 ports 1..=n (built the way the proxy builds
    /// them), each starting FAILED_ACTIVE_HC as under a health checker.
    fn hosts(n: u16) -> Vec<Arc<Host>> {
        let endpoints: Vec<String> = (1..=n)
            .map(|p| format!("{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }} }}"))
            .collect();
        let yaml = format!(
            "name: c\nload_assignment: {{ cluster_name: c, endpoints: [{{ lb_endpoints: [{}] }}] }}\n",
            endpoints.join(", ")
        );
        let pb: envoy_types::pb::envoy::config::cluster::v3::Cluster =
            capstan_proto::from_yaml(&yaml).expect("yaml");
        let mut errors = crate::config::Errors::new();
        let model =
            crate::config::cluster::translate(&pb, &crate::config::Path::new("c"), &mut errors)
                .expect("valid cluster");
        let hosts = Cluster::new(Arc::new(model), false)
            .host_set()
            .hosts
            .clone();
        for h in &hosts {
            h.set_flags(flags::FAILED_ACTIVE_HC, true);
        }
        hosts
    }

    fn host() -> Arc<Host> {
        hosts(1).remove(0)
    }

    #[test]
    fn the_first_success_makes_a_new_host_healthy_at_once() {
        let stats = HealthCheckStats::default();
        let mut s = Session::new(host(), &stats);
        assert_eq!(stats.healthy.get(), 0);
        let a = s.apply(Outcome::Success, &config(), &stats);
        assert_eq!(a.transition, Transition::Changed);
        assert!(a.routability_changed && a.first);
        assert!(s.host.is_routable());
        assert_eq!(stats.healthy.get(), 1);
    }

    #[test]
    fn network_failures_count_to_the_threshold_and_active_failures_are_immediate() {
        let stats = HealthCheckStats::default();
        let cfg = config();
        let mut s = Session::new(host(), &stats);
        s.apply(Outcome::Success, &cfg, &stats);
        assert_eq!(
            s.apply(Outcome::Network, &cfg, &stats).transition,
            Transition::ChangePending
        );
        assert_eq!(
            s.apply(Outcome::Timeout, &cfg, &stats).transition,
            Transition::ChangePending
        );
        let a = s.apply(Outcome::Network, &cfg, &stats);
        assert_eq!(a.transition, Transition::Changed);
        assert!(a.routability_changed);
        assert!(!s.host.is_routable());
        assert_eq!(stats.network_failure.get(), 3);
        assert_eq!(stats.healthy.get(), 0);

        // Back: healthy_threshold (2) successes, the first one only pending.
        assert_eq!(
            s.apply(Outcome::Success, &cfg, &stats).transition,
            Transition::ChangePending
        );
        assert_eq!(
            s.apply(Outcome::Success, &cfg, &stats).transition,
            Transition::Changed
        );
        assert!(s.host.is_routable());

        // A non-retriable active failure ignores unhealthy_threshold.
        let a = s.apply(Outcome::Active { retriable: false }, &cfg, &stats);
        assert_eq!(a.transition, Transition::Changed);
        assert!(!s.host.is_routable());
        // A retriable one counts.
        s.apply(Outcome::Success, &cfg, &stats);
        s.apply(Outcome::Success, &cfg, &stats);
        assert_eq!(
            s.apply(Outcome::Active { retriable: true }, &cfg, &stats)
                .transition,
            Transition::ChangePending
        );
        assert_eq!(stats.failure.get(), 5);
        assert_eq!(stats.network_failure.get(), 3);
        assert_eq!(stats.success.get(), 5);
    }

    #[test]
    fn a_first_failure_keeps_a_new_host_out_without_a_transition() {
        let stats = HealthCheckStats::default();
        let mut s = Session::new(host(), &stats);
        let a = s.apply(Outcome::Timeout, &config(), &stats);
        assert_eq!(a.transition, Transition::Unchanged);
        assert!(!a.routability_changed);
        assert!(!s.host.is_routable());
        // The pending flag (if set) is cleared and reported as a change.
        s.host.set_flags(flags::PENDING_ACTIVE_HC, true);
        let a = s.apply(Outcome::Network, &config(), &stats);
        assert_eq!(a.transition, Transition::Changed);
        assert_eq!(s.host.flags(), flags::FAILED_ACTIVE_HC);
    }

    #[test]
    fn intervals_follow_traffic_health_and_pending_transitions() {
        let cfg = config();
        let mut zero = || 0;
        let applied = |healthy, transition| Applied {
            transition,
            healthy,
            routability_changed: false,
            first: false,
        };
        let secs = |d: Duration| d.as_secs();
        let t = Transition::Unchanged;
        let p = Transition::ChangePending;
        assert_eq!(
            secs(next_interval(&cfg, false, &applied(true, t), &mut zero)),
            70
        );
        assert_eq!(
            secs(next_interval(&cfg, false, &applied(true, p), &mut zero)),
            60
        );
        assert_eq!(
            secs(next_interval(&cfg, false, &applied(false, t), &mut zero)),
            60
        );
        assert_eq!(
            secs(next_interval(&cfg, true, &applied(true, t), &mut zero)),
            10
        );
        assert_eq!(
            secs(next_interval(&cfg, true, &applied(true, p), &mut zero)),
            40
        );
        assert_eq!(
            secs(next_interval(&cfg, true, &applied(false, t), &mut zero)),
            20
        );
        assert_eq!(
            secs(next_interval(&cfg, true, &applied(false, p), &mut zero)),
            30
        );
    }

    #[test]
    fn jitter_is_envoys() {
        let mut r = || 1234;
        // 10% of 1000 ms → + 1234 % 100; jitter 50 ms → + 1234 % 50.
        assert_eq!(
            with_jitter(1000, 10, 50, &mut r),
            Duration::from_millis(1000 + 34 + 34)
        );
        assert_eq!(with_jitter(0, 0, 0, &mut r), Duration::from_millis(1));
    }

    #[tokio::test]
    async fn a_cds_cluster_warms_until_its_first_round_is_over() {
        // A host that accepts and never answers: its first check times out after 400 ms.
        let hole = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = hole.local_addr().expect("addr").port();
        let _held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = hole.accept().await {
                held.push(s);
            }
        });
        let yaml = format!(
            "name: web\nconnect_timeout: 1s\nhealth_checks: [{{ timeout: 0.4s, interval: 10s, unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: {{ path: /h }} }}]\nload_assignment: {{ cluster_name: web, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}] }}\n"
        );
        let pb: envoy_types::pb::envoy::config::cluster::v3::Cluster =
            capstan_proto::from_yaml(&yaml).expect("yaml");
        let mut errors = crate::config::Errors::new();
        let model =
            crate::config::cluster::translate(&pb, &crate::config::Path::new("c"), &mut errors)
                .expect("valid cluster");
        let cm = super::super::ClusterManager::new(crate::stats::Store::new());
        cm.cds_init.primary.initialize().wait().await;
        cm.cds_init.secondary.initialize().wait().await;
        let start = std::time::Instant::now();
        cm.apply_cds(vec![model]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(cm.get("web").is_none(), "active before its first round");
        assert_eq!(cm.warming_clusters().len(), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while cm.get("web").is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let c = cm.get("web").expect("warmed");
        assert!(start.elapsed() >= Duration::from_millis(400));
        assert_eq!(c.host_set().hosts[0].flags(), flags::FAILED_ACTIVE_HC);
        let stats = &c.health_checker().expect("checker").stats;
        assert_eq!(stats.network_failure.get(), 1);
        assert_eq!(stats.attempt.get(), 1);
        assert_eq!(stats.healthy.get(), 0);
    }

    async fn accepting() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = l.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        (address, task)
    }

    async fn until(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    #[tokio::test]
    async fn hosts_added_later_start_failed_and_removed_hosts_are_forgotten() {
        let (first, _t1) = accepting().await;
        let (second, _t2) = accepting().await;
        let yaml = format!(
            "name: c\nhealth_checks: [{{ timeout: 1s, interval: 0.05s, no_traffic_interval: 0.05s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {{}} }}]\nload_assignment: {{ cluster_name: c, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }}] }}] }}\n",
            first.port()
        );
        let pb: envoy_types::pb::envoy::config::cluster::v3::Cluster =
            capstan_proto::from_yaml(&yaml).expect("yaml");
        let mut errors = crate::config::Errors::new();
        let model =
            crate::config::cluster::translate(&pb, &crate::config::Path::new("c"), &mut errors)
                .expect("valid cluster");
        let c = Cluster::new(Arc::new(model), false);
        let stats = &c.health_checker().expect("checker").stats;
        assert_eq!(c.host_set().hosts[0].flags(), flags::FAILED_ACTIVE_HC);
        assert!(until(|| c.host_set().healthy.len() == 1).await);

        let ep = |address: SocketAddr| super::super::ResolvedEndpoint {
            address,
            hostname: String::new(),
            locality: crate::config::cluster::Locality::default(),
            health: crate::config::cluster::HealthStatus::Unknown,
            weight: 1,
            priority: 0,
        };
        c.update_hosts(&[ep(first), ep(second)]);
        let added = c.host_set().hosts[1].clone();
        assert_eq!(added.address, second);
        assert_eq!(
            added.flags(),
            flags::FAILED_ACTIVE_HC,
            "new hosts start failed"
        );
        assert!(
            c.host_set().hosts[0].is_routable(),
            "kept hosts keep their state"
        );
        assert!(until(|| added.is_routable()).await);
        assert!(until(|| c.host_set().healthy.len() == 2).await);
        assert_eq!(stats.healthy.get(), 2);

        c.update_hosts(&[ep(second)]);
        assert!(until(|| stats.healthy.get() == 1).await);
        let attempts = stats.attempt.get();
        assert!(until(|| stats.attempt.get() >= attempts + 3).await);
        assert_eq!(
            stats.healthy.get(),
            1,
            "the removed host is no longer counted"
        );
    }

    #[test]
    fn health_updates_are_merged_within_a_second() {
        let t0 = Instant::now();
        let mut w = MergeWindow::default();
        assert!(w.health_changed(t0), "the first update goes out at once");
        assert!(!w.health_changed(t0 + Duration::from_millis(300)));
        assert_eq!(w.deadline, Some(t0 + Duration::from_millis(1300)));
        assert!(!w.health_changed(t0 + Duration::from_millis(600)));
        assert_eq!(
            w.deadline,
            Some(t0 + Duration::from_millis(1300)),
            "one timer"
        );
        w.applied(t0 + Duration::from_millis(1300));
        assert!(w.health_changed(t0 + Duration::from_millis(2400)));
        assert_eq!(w.deadline, None);
    }

    #[test]
    fn payloads_match_in_order() {
        let segs = vec![b"PO".to_vec(), b"NG".to_vec()];
        assert!(payload_matches(&segs, b"xxPOyyNG"));
        assert!(!payload_matches(&segs, b"NGPO"));
        assert!(payload_matches(&[], b""));
    }

    #[test]
    fn grpc_health_responses_are_read() {
        // status = SERVING (1)
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 0x01]), Some(1));
        // An empty message: status UNKNOWN (0).
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Some(0));
        assert_eq!(serving_status(&[0, 0, 0, 0, 3, 0x08, 0x01]), None);
    }

    #[test]
    fn the_round_counts_hosts_not_yet_checked() {
        let checker = HealthChecker::new(config(), "c");
        let mut two = hosts(2);
        let (a, b) = (two.remove(0), two.remove(0));
        checker.completed(a.address, true);
        checker.begin_round(&[a.clone(), b.clone()]);
        assert!(!*checker.round_done.borrow());
        checker.completed(b.address, true);
        assert!(*checker.round_done.borrow());
    }
}
