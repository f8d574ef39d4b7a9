//! The HTTP connection manager (`envoy.filters.network.http_connection_manager`) and its
//! router filter.
//!
//! A listener hands each accepted connection to [`HttpConnectionManager::serve_connection`],
//! which speaks HTTP/1.1 or h2c (detected from the preface, or fixed by `codec_type`) and runs
//! every request through [`proxy`]: route ([`router`], pure), then a direct response, a
//! redirect or a proxied request to a host of the route's cluster. Local failures become
//! responses only in [`local_reply`]. The route configuration is an immutable snapshot behind
//! an `ArcSwap` (RDS swaps it: [`HttpConnectionManager::set_route_config`]); a request holds the snapshot it started with.
//!
//! While the listener drains, HTTP/1 responses carry `Connection: close` and HTTP/2
//! connections get a GOAWAY; in the closing phase every connection shuts down gracefully.

pub mod body;
pub mod hash_policy;
pub mod headers;
pub mod local_ratelimit;
pub mod local_reply;
pub mod proxy;
pub mod retry;
pub mod router;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::tls::DownstreamStream;
use arc_swap::ArcSwap;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::Notify;

use crate::cluster::ClusterManager;
use crate::config::listener::{Codec, HttpConnectionManager as Config, RouteSpecifier};
use crate::config::route::RouteConfig;
use crate::listener::drain::{Drain, Phase};
use crate::stats::{CodeStats, Counter, Gauge, GaugeGuard, Sample, Scope, Source};

/// Envoy's `http.<stat_prefix>.*` stats (connection manager and router).
#[derive(Debug)]
pub struct HttpStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_http1_total: Counter,
    pub downstream_cx_http2_total: Counter,
    pub downstream_rq_total: Counter,
    pub downstream_rq_active: Gauge,
    pub downstream_rq_http1_total: Counter,
    pub downstream_rq_http2_total: Counter,
    pub downstream_rq: CodeStats,
    pub no_route: Counter,
    pub no_cluster: Counter,
    pub rq_redirect: Counter,
    pub rq_direct_response: Counter,
    pub rq_total: Counter,
}

impl Default for HttpStats {
    fn default() -> Self {
        Self {
            downstream_cx_total: Counter::default(),
            downstream_cx_active: Gauge::default(),
            downstream_cx_http1_total: Counter::default(),
            downstream_cx_http2_total: Counter::default(),
            downstream_rq_total: Counter::default(),
            downstream_rq_active: Gauge::default(),
            downstream_rq_http1_total: Counter::default(),
            downstream_rq_http2_total: Counter::default(),
            downstream_rq: CodeStats::new(false),
            no_route: Counter::default(),
            no_cluster: Counter::default(),
            rq_redirect: Counter::default(),
            rq_direct_response: Counter::default(),
            rq_total: Counter::default(),
        }
    }
}

impl AsRef<Gauge> for Arc<HttpStats> {
    fn as_ref(&self) -> &Gauge {
        &self.downstream_rq_active
    }
}

/// The stats of one connection manager, reported under its `stat_prefix`.
pub struct HttpStatsSource {
    pub stat_prefix: String,
    pub stats: Arc<HttpStats>,
}

impl Source for HttpStatsSource {
    fn collect(&self, out: &mut Vec<Sample>) {
        let s = &self.stats;
        let scope = Scope::tagged("http", "envoy_http_conn_manager_prefix", &self.stat_prefix);
        scope.counter("downstream_cx_total", s.downstream_cx_total.get(), out);
        scope.gauge("downstream_cx_active", s.downstream_cx_active.get(), out);
        scope.counter(
            "downstream_cx_http1_total",
            s.downstream_cx_http1_total.get(),
            out,
        );
        scope.counter(
            "downstream_cx_http2_total",
            s.downstream_cx_http2_total.get(),
            out,
        );
        scope.counter("downstream_rq_total", s.downstream_rq_total.get(), out);
        scope.gauge("downstream_rq_active", s.downstream_rq_active.get(), out);
        scope.counter(
            "downstream_rq_http1_total",
            s.downstream_rq_http1_total.get(),
            out,
        );
        scope.counter(
            "downstream_rq_http2_total",
            s.downstream_rq_http2_total.get(),
            out,
        );
        s.downstream_rq.collect(&scope, "downstream_rq", out);
        scope.counter("no_route", s.no_route.get(), out);
        scope.counter("no_cluster", s.no_cluster.get(), out);
        scope.counter("rq_redirect", s.rq_redirect.get(), out);
        scope.counter("rq_direct_response", s.rq_direct_response.get(), out);
        scope.counter("rq_total", s.rq_total.get(), out);
    }
}

/// One listener's HTTP connection manager.
pub struct HttpConnectionManager {
    config: Arc<Config>,
    route_config: ArcSwap<RouteConfig>,
    clusters: Arc<ClusterManager>,
    stats: Arc<HttpStats>,
    server_name: HeaderValue,
    drain: Drain,
}

impl std::fmt::Debug for HttpConnectionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConnectionManager")
            .field("stat_prefix", &self.config.stat_prefix)
            .finish_non_exhaustive()
    }
}

/// What the connection manager knows about one downstream connection.
#[derive(Debug)]
pub struct Connection {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// The connection is TLS-terminated (`x-forwarded-proto: https`).
    pub tls: bool,
    seen_request: AtomicBool,
    http2: AtomicBool,
    goaway: Notify,
}

impl HttpConnectionManager {
    pub fn new(
        config: Arc<Config>,
        clusters: Arc<ClusterManager>,
        stats: Arc<HttpStats>,
        drain: Drain,
    ) -> Self {
        let route_config = match &config.route {
            RouteSpecifier::Static(rc) => ArcSwap::new(rc.clone()),
            RouteSpecifier::Rds {
                route_config_name, ..
            } => ArcSwap::from_pointee(crate::config::route::empty_route_config(route_config_name)),
        };
        let server_name = HeaderValue::from_str(&config.server_name)
            .unwrap_or_else(|_| HeaderValue::from_static("envoy"));
        Self {
            config,
            route_config,
            clusters,
            stats,
            server_name,
            drain,
        }
    }

    pub fn stats(&self) -> &Arc<HttpStats> {
        &self.stats
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The route configuration new requests use.
    pub fn route_config(&self) -> Arc<RouteConfig> {
        self.route_config.load_full()
    }

    /// Replaces the route configuration (RDS); requests in flight keep the one they started
    /// with.
    pub fn set_route_config(&self, rc: Arc<RouteConfig>) {
        self.route_config.store(rc);
    }

    /// Serves one downstream connection until it closes.
    pub async fn serve_connection(
        self: Arc<Self>,
        stream: DownstreamStream,
        remote: SocketAddr,
        local: SocketAddr,
    ) {
        let _ = stream.set_nodelay(true);
        self.stats.downstream_cx_total.inc();
        let _active = CxGuard::new_counted(self.stats.clone());
        let conn = Arc::new(Connection {
            remote,
            local,
            tls: matches!(stream, DownstreamStream::Tls(_)),
            seen_request: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            goaway: Notify::new(),
        });
        let hcm = self.clone();
        let conn_for_service = conn.clone();
        let service = service_fn(move |req| {
            let hcm = hcm.clone();
            let conn = conn_for_service.clone();
            async move { Ok::<_, Infallible>(hcm.handle(&conn, req).await) }
        });

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new());
        builder.http2().timer(TokioTimer::new());
        let builder = match self.config.codec {
            Codec::Auto => builder,
            Codec::Http1 => builder.http1_only(),
            Codec::Http2 => builder.http2_only(),
        };
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        tokio::pin!(connection);
        let mut drain = self.drain.subscribe();
        let mut drain_open = true;
        let mut shutting_down = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%remote, error = %e, "downstream connection ended with an error");
                    }
                    break;
                }
                changed = drain.changed(), if drain_open && !shutting_down => {
                    let phase = match changed {
                        Ok(()) => *drain.borrow_and_update(),
                        Err(_) => {
                            drain_open = false;
                            Phase::Closing
                        }
                    };
                    let h2 = conn.http2.load(Ordering::Relaxed);
                    if phase == Phase::Closing || (phase == Phase::Draining && h2) {
                        shutting_down = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
                _ = conn.goaway.notified(), if !shutting_down => {
                    shutting_down = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

struct CxGuard(Arc<HttpStats>);

impl CxGuard {
    fn new_counted(stats: Arc<HttpStats>) -> Self {
        stats.downstream_cx_active.inc();
        Self(stats)
    }
}

impl Drop for CxGuard {
    fn drop(&mut self) {
        self.0.downstream_cx_active.dec();
    }
}

/// Active downstream request guard.
pub(crate) fn active_request(stats: &Arc<HttpStats>) -> GaugeGuard<Arc<HttpStats>> {
    GaugeGuard::new(stats.clone())
}
