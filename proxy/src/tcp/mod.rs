//! The TCP proxy network filter (`envoy.filters.network.tcp_proxy`): one upstream connection
//! per downstream connection, bytes copied both ways.
//!
//! Per connection, as Envoy: pick the cluster (`cluster`, or `weighted_clusters` by weight);
//! a cluster that does not exist closes the connection (`downstream_cx_no_route`). Pick a
//! host with the cluster's load balancer and connect through its pool's
//! [`connect_raw`](crate::cluster::pool::Pool::connect_raw) (the cluster's `connect_timeout`
//! and connection stats); a failed connection is retried on a newly picked host up to
//! `max_connect_attempts`; no healthy host or no successful attempt closes the downstream
//! connection. Downstream bytes are not read before the upstream connection exists.
//!
//! Then bytes flow both ways; an end of stream (FIN) read from one side is passed on as a
//! half-close to the other, which may keep sending; the connection ends once both directions
//! have ended, on an error of either side (both are closed), after `idle_timeout` without
//! bytes in either direction (`idle_timeout` stat), or when the listener's drain reaches
//! `Closing` (Envoy closes TCP proxy connections when a drained listener goes away).
//! This module must not select filter chains or know about HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::cluster::stream::UpstreamStream;
use crate::tls::DownstreamStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::cluster::ClusterManager;
use crate::cluster::outlier::Outcome as OutlierOutcome;
use crate::cluster::pool::ConnectionGuard;
use crate::cluster::pool::UpstreamError;
use crate::config::listener::{TcpProxy as Config, TcpRoute};
use crate::listener::drain::{Drain, Phase};
use crate::stats::{Counter, Sample, Scope, Source};

/// Envoy's `tcp.<stat_prefix>.*` stats (shared by TCP proxies with the same prefix).
#[derive(Debug, Default)]
pub struct TcpStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_no_route: Counter,
    pub downstream_cx_rx_bytes_total: Counter,
    pub downstream_cx_tx_bytes_total: Counter,
    pub idle_timeout: Counter,
}

/// Reports one stat prefix's [`TcpStats`].
#[derive(Debug)]
pub struct TcpStatsSource {
    pub stat_prefix: String,
    pub stats: Arc<TcpStats>,
}

impl Source for TcpStatsSource {
    fn collect(&self, out: &mut Vec<Sample>) {
        let s = &self.stats;
        let scope = Scope::tagged("tcp", "envoy_tcp_prefix", &self.stat_prefix);
        scope.counter("downstream_cx_total", s.downstream_cx_total.get(), out);
        scope.counter(
            "downstream_cx_no_route",
            s.downstream_cx_no_route.get(),
            out,
        );
        scope.counter(
            "downstream_cx_rx_bytes_total",
            s.downstream_cx_rx_bytes_total.get(),
            out,
        );
        scope.counter(
            "downstream_cx_tx_bytes_total",
            s.downstream_cx_tx_bytes_total.get(),
            out,
        );
        scope.counter("idle_timeout", s.idle_timeout.get(), out);
    }
}

/// One configured TCP proxy (of one filter chain).
pub struct TcpProxy {
    config: Arc<Config>,
    clusters: Arc<ClusterManager>,
    stats: Arc<TcpStats>,
    drain: Drain,
}

impl std::fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProxy")
            .field("stat_prefix", &self.config.stat_prefix)
            .finish_non_exhaustive()
    }
}

/// Copy buffer per direction.
const BUFFER: usize = 16 * 1024;

impl TcpProxy {
    pub fn new(
        config: Arc<Config>,
        clusters: Arc<ClusterManager>,
        stats: Arc<TcpStats>,
        drain: Drain,
    ) -> Self {
        Self {
            config,
            clusters,
            stats,
            drain,
        }
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Proxies one downstream connection until both directions end (or it is closed).
    pub async fn serve_connection(
        self: Arc<Self>,
        downstream: DownstreamStream,
        remote: SocketAddr,
        _local: SocketAddr,
    ) {
        self.stats.downstream_cx_total.inc();
        let _ = downstream.set_nodelay(true);
        let mut phase = self.drain.subscribe();
        let upstream = tokio::select! {
            u = self.connect_upstream() => u,
            _ = phase.wait_for(|p| *p == Phase::Closing) => None,
        };
        let Some((upstream, _guard)) = upstream else {
            tracing::debug!(%remote, stat_prefix = %self.config.stat_prefix,
                "TCP proxy: no upstream connection; closing the downstream connection");
            return;
        };
        let start = Instant::now();
        let last_activity = AtomicU64::new(0);
        let (dr, dw) = tokio::io::split(downstream);
        let (ur, uw) = tokio::io::split(upstream);
        let copy = async {
            tokio::try_join!(
                pipe(
                    dr,
                    uw,
                    &self.stats.downstream_cx_rx_bytes_total,
                    &last_activity,
                    start
                ),
                pipe(
                    ur,
                    dw,
                    &self.stats.downstream_cx_tx_bytes_total,
                    &last_activity,
                    start
                ),
            )
        };
        tokio::select! {
            r = copy => {
                if let Err(e) = r {
                    tracing::debug!(%remote, error = %e, "TCP proxy connection ended with an error");
                }
            }
            () = idle(self.config.idle_timeout, &last_activity, start) => {
                self.stats.idle_timeout.inc();
                tracing::debug!(%remote, "TCP proxy connection idle; closing");
            }
            _ = phase.wait_for(|p| *p == Phase::Closing) => {
                tracing::debug!(%remote, "listener drained; closing the TCP proxy connection");
            }
        }
    }

    /// The cluster for this connection (`None`: no route).
    fn cluster_name(&self) -> Option<&str> {
        match &self.config.route {
            TcpRoute::Cluster(name) => Some(name),
            TcpRoute::Weighted(clusters) => pick_weighted(clusters, fastrand::u64(..)),
        }
    }

    async fn connect_upstream(&self) -> Option<(UpstreamStream, ConnectionGuard)> {
        let cluster = self.cluster_name().and_then(|n| self.clusters.get(n));
        let Some(cluster) = cluster else {
            self.stats.downstream_cx_no_route.inc();
            return None;
        };
        for attempt in 1..=self.config.max_connect_attempts {
            // Counts `upstream_cx_none_healthy` when it finds none.
            let host = cluster.choose_host(&crate::cluster::LbContext::default())?;
            match host.pool.connect_raw().await {
                Ok(c) => {
                    cluster.report_outcome(&host, OutlierOutcome::ConnectSuccessFinal);
                    return Some(c);
                }
                // `max_connections` reached (`upstream_cx_overflow`): closed at once, as Envoy.
                Err(UpstreamError::Overflow) => return None,
                Err(e) => {
                    let outcome = match e {
                        UpstreamError::ConnectTimeout => OutlierOutcome::ConnectTimeout,
                        _ => OutlierOutcome::ConnectFailed,
                    };
                    cluster.report_outcome(&host, outcome);
                    tracing::debug!(cluster = %cluster.name(), host = %host.address, attempt,
                        error = %e, "TCP proxy: upstream connection failed");
                }
            }
        }
        None
    }
}

/// Envoy's weighted choice: `random % total weight` falls in one cluster's range.
fn pick_weighted(clusters: &[(String, u32)], random: u64) -> Option<&str> {
    let total: u64 = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let selected = random % total;
    let mut end = 0u64;
    clusters
        .iter()
        .find(|(_, w)| {
            end += u64::from(*w);
            selected < end
        })
        .map(|(name, _)| name.as_str())
}

/// Copies `from` to `to` until end of stream, then half-closes `to` (passes the FIN on).
async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    bytes: &Counter,
    last_activity: &AtomicU64,
    start: Instant,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        touch(last_activity, start);
        if n == 0 {
            return to.shutdown().await;
        }
        bytes.add(n as u64);
        to.write_all(&buf[..n]).await?;
        touch(last_activity, start);
    }
}

fn touch(last_activity: &AtomicU64, start: Instant) {
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    last_activity.store(ms, Ordering::Relaxed);
}

/// Completes once `timeout` passed without activity (never when `None`).
async fn idle(timeout: Option<Duration>, last_activity: &AtomicU64, start: Instant) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    loop {
        let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
        let deadline = start + last + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_choice_uses_ranges_of_the_total() {
        let clusters = vec![("a".to_string(), 1), ("b".to_string(), 3)];
        assert_eq!(pick_weighted(&clusters, 0), Some("a"));
        assert_eq!(pick_weighted(&clusters, 1), Some("b"));
        assert_eq!(pick_weighted(&clusters, 3), Some("b"));
        assert_eq!(pick_weighted(&clusters, 4), Some("a"));
        assert_eq!(pick_weighted(&[], 4), None);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_fires_after_the_last_activity() {
        let start = Instant::now();
        let last = AtomicU64::new(0);
        tokio::time::advance(Duration::from_secs(3)).await;
        touch(&last, start);
        let before = Instant::now();
        idle(Some(Duration::from_secs(5)), &last, start).await;
        assert_eq!(before.elapsed(), Duration::from_secs(5));
    }
}
