//! Outlier detection: Envoy's `DetectorImpl`, one per cluster that configures it.
//!
//! Per host, a [`HostMonitor`] (kept in the host's pool) counts consecutive 5xx, gateway
//! failures (502/503/504) and local-origin failures, and the requests and successes of the
//! current success-rate interval, all with atomics: the request path ([`Detector::report`])
//! takes no lock. A consecutive counter reaching its threshold (exactly, as Envoy's `==`)
//! calls into the detector, which decides under its own lock: the host must still be in the
//! cluster and not ejected; `ejections_detected_*` counts; `max_ejection_percent` (Envoy's
//! `(active + 1) * 100 / hosts <= max`, unless `always_eject_one_host` and none is ejected) may
//! refuse (`ejections_overflow`); the `enforcing_*` percentage decides whether the ejection
//! happens (`ejections_enforced_*`). An ejected host gets `FAILED_OUTLIER_CHECK` and the
//! cluster rebuilds its routable set.
//!
//! Every `interval` (one timer task per cluster): hosts whose ejection time —
//! `min(base_ejection_time × backoff, max_ejection_time)`, the backoff growing with each
//! ejection and shrinking by one per interval spent healthy — has passed return, with their
//! counters reset; the success-rate buckets turn over; success-rate (mean − stdev × factor /
//! 1000) and failure-percentage ejections are computed from the interval just ended.
//!
//! Outcomes are mapped as Envoy's router and TCP proxy report them ([`Outcome`]); without
//! `split_external_local_origin_errors` local-origin failures count as 503 (connect failure,
//! reset) or 504 (timeout). This module must not pick hosts or build responses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::time::Instant;

use super::Cluster;
use super::host::{Host, flags};
use crate::config::outlier::OutlierDetection;
use crate::stats::{Counter, Sample, Scope};

/// What happened to one upstream request or connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers with this status, on an established connection.
    Response(u16),
    /// The connection could not be established (refused, connect timeout).
    ConnectFailed,
    /// The connection was established, then reset or closed before response headers.
    Reset,
    /// The request timed out before response headers (per-try or route timeout).
    Timeout,
    /// A TCP proxy connection was established (Envoy's `LOCAL_ORIGIN_CONNECT_SUCCESS_FINAL`).
    ConnectSuccessFinal,
    /// A TCP proxy connect timeout.
    ConnectTimeout,
}

impl Outcome {
    /// How a failed HTTP try is reported; `None` for a circuit-breaker overflow, which Envoy
    /// does not hold against the host.
    pub fn of_error(e: &super::pool::UpstreamError) -> Option<Self> {
        use super::pool::UpstreamError as E;
        match e {
            E::ConnectTimeout | E::ConnectFailure(_) => Some(Outcome::ConnectFailed),
            E::Handshake(_) | E::Reset(_) => Some(Outcome::Reset),
            E::Overflow => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    LocalOriginSuccessRate,
    FailurePercentage,
    LocalOriginFailurePercentage,
}

/// Envoy's `cluster.<name>.outlier_detection.*` counters.
#[derive(Debug, Default)]
pub struct OutlierStats {
    pub ejections_enforced_total: Counter,
    pub ejections_overflow: Counter,
    pub ejections_total: Counter,
    pub ejections_consecutive_5xx: Counter,
    pub ejections_success_rate: Counter,
    enforced: [Counter; 7],
    detected: [Counter; 7],
}

const KIND_NAMES: [&str; 7] = [
    "consecutive_5xx",
    "consecutive_gateway_failure",
    "consecutive_local_origin_failure",
    "success_rate",
    "local_origin_success_rate",
    "failure_percentage",
    "local_origin_failure_percentage",
];

impl OutlierStats {
    fn index(kind: Kind) -> usize {
        match kind {
            Kind::Consecutive5xx => 0,
            Kind::ConsecutiveGatewayFailure => 1,
            Kind::ConsecutiveLocalOriginFailure => 2,
            Kind::SuccessRate => 3,
            Kind::LocalOriginSuccessRate => 4,
            Kind::FailurePercentage => 5,
            Kind::LocalOriginFailurePercentage => 6,
        }
    }
}

/// One host's counters; lives in the host's pool.
#[derive(Debug, Default)]
pub struct HostMonitor {
    consecutive_5xx: AtomicU64,
    consecutive_gateway_failure: AtomicU64,
    consecutive_local_origin_failure: AtomicU64,
    /// Current success-rate bucket: external (HTTP status) and local-origin.
    ext_total: AtomicU64,
    ext_success: AtomicU64,
    local_total: AtomicU64,
    local_success: AtomicU64,
    /// Only the detector touches this, under its lock.
    state: Mutex<EjectionState>,
}

#[derive(Debug, Default)]
struct EjectionState {
    num_ejections: u64,
    backoff: u32,
    last_ejection: Option<Instant>,
    last_unejection: Option<Instant>,
    /// The last complete interval's (total, success), external and local-origin.
    ext_bucket: (u64, u64),
    local_bucket: (u64, u64),
}

impl HostMonitor {
    /// Times this host was ejected (for `/clusters`).
    pub fn num_ejections(&self) -> u64 {
        lock(&self.state).num_ejections
    }

    fn reset_consecutive(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway_failure.store(0, Ordering::Relaxed);
        self.consecutive_local_origin_failure
            .store(0, Ordering::Relaxed);
    }
}

/// The detector of one cluster.
#[derive(Debug)]
pub struct Detector {
    config: OutlierDetection,
    pub stats: OutlierStats,
    /// Serializes ejection decisions (Envoy makes them on its main thread).
    decide: Mutex<()>,
}

impl Detector {
    pub fn new(config: OutlierDetection) -> Arc<Self> {
        Arc::new(Self {
            config,
            stats: OutlierStats::default(),
            decide: Mutex::new(()),
        })
    }

    pub fn interval(&self) -> std::time::Duration {
        self.config.interval
    }

    /// Records one outcome for `host` (request path: atomics, plus a locked decision only
    /// when a consecutive threshold is reached).
    pub fn report(&self, cluster: &Cluster, host: &Arc<Host>, outcome: Outcome) {
        let m = &host.pool.outlier;
        let split = self.config.split_external_local_origin_errors;
        match outcome {
            Outcome::Response(code) => {
                if split {
                    self.local_no_failure(m);
                }
                self.http_code(cluster, host, code);
            }
            Outcome::ConnectFailed | Outcome::ConnectTimeout if split => {
                self.local_failure(cluster, host)
            }
            Outcome::ConnectFailed => self.http_code(cluster, host, 503),
            Outcome::ConnectTimeout => self.http_code(cluster, host, 504),
            Outcome::Reset if split => {
                // Envoy reports the connection as ready, then the reset.
                self.local_no_failure(m);
                self.local_failure(cluster, host);
            }
            Outcome::Reset => self.http_code(cluster, host, 503),
            Outcome::Timeout if split => {
                self.local_no_failure(m);
                self.local_failure(cluster, host);
            }
            Outcome::Timeout => self.http_code(cluster, host, 504),
            Outcome::ConnectSuccessFinal if split => self.local_no_failure(m),
            Outcome::ConnectSuccessFinal => self.http_code(cluster, host, 200),
        }
    }

    fn http_code(&self, cluster: &Cluster, host: &Arc<Host>, code: u16) {
        let m = &host.pool.outlier;
        m.ext_total.fetch_add(1, Ordering::Relaxed);
        if (500..600).contains(&code) {
            if matches!(code, 502..=504) {
                let n = m.consecutive_gateway_failure.fetch_add(1, Ordering::AcqRel) + 1;
                if n == self.config.consecutive_gateway_failure {
                    self.on_consecutive(cluster, host, Kind::ConsecutiveGatewayFailure);
                }
            } else {
                m.consecutive_gateway_failure.store(0, Ordering::Relaxed);
            }
            let n = m.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1;
            if n == self.config.consecutive_5xx {
                self.on_consecutive(cluster, host, Kind::Consecutive5xx);
            }
        } else {
            m.ext_success.fetch_add(1, Ordering::Relaxed);
            m.consecutive_5xx.store(0, Ordering::Relaxed);
            m.consecutive_gateway_failure.store(0, Ordering::Relaxed);
        }
    }

    fn local_failure(&self, cluster: &Cluster, host: &Arc<Host>) {
        let m = &host.pool.outlier;
        m.local_total.fetch_add(1, Ordering::Relaxed);
        let n = m
            .consecutive_local_origin_failure
            .fetch_add(1, Ordering::AcqRel)
            + 1;
        if n == self.config.consecutive_local_origin_failure {
            self.on_consecutive(cluster, host, Kind::ConsecutiveLocalOriginFailure);
        }
    }

    fn local_no_failure(&self, m: &HostMonitor) {
        m.local_total.fetch_add(1, Ordering::Relaxed);
        m.local_success.fetch_add(1, Ordering::Relaxed);
        m.consecutive_local_origin_failure
            .store(0, Ordering::Relaxed);
    }

    fn on_consecutive(&self, cluster: &Cluster, host: &Arc<Host>, kind: Kind) {
        let _decide = lock(&self.decide);
        let set = cluster.host_set();
        if !set.hosts.iter().any(|h| Arc::ptr_eq(h, host)) {
            return;
        }
        if host.flags() & flags::FAILED_OUTLIER_CHECK != 0 {
            return;
        }
        self.stats.detected[OutlierStats::index(kind)].inc();
        let changed = self.eject(&set.hosts, host, kind, Instant::now());
        let m = &host.pool.outlier;
        match kind {
            Kind::Consecutive5xx => {
                self.stats.ejections_consecutive_5xx.inc();
                m.consecutive_5xx.store(0, Ordering::Relaxed);
            }
            Kind::ConsecutiveGatewayFailure => {
                m.consecutive_gateway_failure.store(0, Ordering::Relaxed)
            }
            _ => m
                .consecutive_local_origin_failure
                .store(0, Ordering::Relaxed),
        }
        if changed {
            cluster.refresh_health();
        }
    }

    /// Envoy's `ejectHost`; returns whether the host's routability changed.
    fn eject(&self, hosts: &[Arc<Host>], host: &Arc<Host>, kind: Kind, now: Instant) -> bool {
        let active = ejected(hosts);
        let percent = 100.0 * (active + 1) as f64 / hosts.len().max(1) as f64;
        let mut should = percent <= self.config.max_ejection_percent as f64;
        if self.config.always_eject_one_host {
            should = should || active == 0;
        }
        if !should {
            self.stats.ejections_overflow.inc();
            return false;
        }
        if matches!(kind, Kind::Consecutive5xx | Kind::SuccessRate) {
            self.stats.ejections_total.inc();
        }
        if !enabled(self.enforcing(kind)) {
            return false;
        }
        self.stats.ejections_enforced_total.inc();
        self.stats.enforced[OutlierStats::index(kind)].inc();
        let changed = host.set_flags(flags::FAILED_OUTLIER_CHECK, true);
        let mut st = lock(&host.pool.outlier.state);
        st.num_ejections += 1;
        st.last_ejection = Some(now);
        let base = self.config.base_ejection_time;
        if base * st.backoff < self.config.max_ejection_time + base {
            st.backoff += 1;
        }
        tracing::info!(host = %host.address, ?kind, ejections = st.num_ejections,
            "outlier detection ejected a host");
        changed
    }

    fn enforcing(&self, kind: Kind) -> u64 {
        let c = &self.config;
        match kind {
            Kind::Consecutive5xx => c.enforcing_consecutive_5xx,
            Kind::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            Kind::ConsecutiveLocalOriginFailure => c.enforcing_consecutive_local_origin_failure,
            Kind::SuccessRate => c.enforcing_success_rate,
            Kind::LocalOriginSuccessRate => c.enforcing_local_origin_success_rate,
            Kind::FailurePercentage => c.enforcing_failure_percentage,
            Kind::LocalOriginFailurePercentage => c.enforcing_failure_percentage_local_origin,
        }
    }

    /// Envoy's default `successful_active_health_check_uneject_host`: when an active health
    /// check of `host` passes while it is ejected (and not failing active health checks), it
    /// returns at once, its counters reset. For the health checker to call.
    pub fn on_health_check_success(&self, cluster: &Cluster, host: &Arc<Host>) {
        if !self.config.uneject_on_health_check_success {
            return;
        }
        let f = host.flags();
        if f & flags::FAILED_OUTLIER_CHECK == 0 || f & flags::FAILED_ACTIVE_HC != 0 {
            return;
        }
        let _decide = lock(&self.decide);
        let changed = host.set_flags(flags::FAILED_OUTLIER_CHECK, false);
        host.pool.outlier.reset_consecutive();
        lock(&host.pool.outlier.state).last_unejection = Some(Instant::now());
        if changed {
            cluster.refresh_health();
        }
    }

    /// Envoy's `onIntervalTimer`.
    pub fn on_interval(&self, cluster: &Cluster) {
        let _decide = lock(&self.decide);
        let now = Instant::now();
        let set = cluster.host_set();
        let mut changed = false;
        for h in &set.hosts {
            let m = &h.pool.outlier;
            let mut st = lock(&m.state);
            if h.flags() & flags::FAILED_OUTLIER_CHECK != 0
                && let Some(at) = st.last_ejection
            {
                let time = (self.config.base_ejection_time * st.backoff)
                    .min(self.config.max_ejection_time);
                if now.duration_since(at) >= time {
                    changed |= h.set_flags(flags::FAILED_OUTLIER_CHECK, false);
                    m.reset_consecutive();
                    st.last_unejection = Some(now);
                    tracing::info!(host = %h.address, "outlier detection returned a host");
                }
            }
            st.ext_bucket = (
                m.ext_total.swap(0, Ordering::AcqRel),
                m.ext_success.swap(0, Ordering::AcqRel),
            );
            st.local_bucket = (
                m.local_total.swap(0, Ordering::AcqRel),
                m.local_success.swap(0, Ordering::AcqRel),
            );
        }
        changed |= self.success_rate_ejections(&set.hosts, false, now);
        if self.config.split_external_local_origin_errors {
            changed |= self.success_rate_ejections(&set.hosts, true, now);
        }
        for h in &set.hosts {
            if h.flags() & flags::FAILED_OUTLIER_CHECK != 0 {
                continue;
            }
            let mut st = lock(&h.pool.outlier.state);
            if st
                .last_unejection
                .is_some_and(|t| now.duration_since(t) >= self.config.interval)
                && st.backoff > 0
            {
                st.backoff -= 1;
            }
        }
        if changed {
            cluster.refresh_health();
        }
    }

    /// Envoy's `processSuccessRateEjections` for one monitor type.
    fn success_rate_ejections(&self, hosts: &[Arc<Host>], local: bool, now: Instant) -> bool {
        let c = &self.config;
        let n = hosts.len() as u64;
        if n < c.success_rate_minimum_hosts && n < c.failure_percentage_minimum_hosts {
            return false;
        }
        let mut sr_hosts = Vec::new();
        let mut fp_hosts = Vec::new();
        for h in hosts {
            if h.flags() & flags::FAILED_OUTLIER_CHECK != 0 {
                continue;
            }
            let st = lock(&h.pool.outlier.state);
            let (total, success) = if local {
                st.local_bucket
            } else {
                st.ext_bucket
            };
            if total == 0 {
                continue;
            }
            let rate = success as f64 * 100.0 / total as f64;
            if total >= c.success_rate_request_volume {
                sr_hosts.push((h.clone(), rate));
            }
            if total >= c.failure_percentage_request_volume {
                fp_hosts.push((h.clone(), rate));
            }
        }
        let mut changed = false;
        if !sr_hosts.is_empty() && sr_hosts.len() as u64 >= c.success_rate_minimum_hosts {
            let threshold = success_rate_threshold(
                &sr_hosts.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
                c.success_rate_stdev_factor as f64 / 1000.0,
            );
            let kind = if local {
                Kind::LocalOriginSuccessRate
            } else {
                Kind::SuccessRate
            };
            for (h, rate) in &sr_hosts {
                if *rate < threshold {
                    self.stats.ejections_success_rate.inc();
                    self.stats.detected[OutlierStats::index(kind)].inc();
                    changed |= self.eject(hosts, h, kind, now);
                }
            }
        }
        if !fp_hosts.is_empty() && fp_hosts.len() as u64 >= c.failure_percentage_minimum_hosts {
            let kind = if local {
                Kind::LocalOriginFailurePercentage
            } else {
                Kind::FailurePercentage
            };
            for (h, rate) in &fp_hosts {
                if 100.0 - rate >= c.failure_percentage_threshold as f64 {
                    self.stats.detected[OutlierStats::index(kind)].inc();
                    changed |= self.eject(hosts, h, kind, now);
                }
            }
        }
        changed
    }

    pub fn collect(&self, cluster: &Cluster, scope: &Scope, out: &mut Vec<Sample>) {
        let s = &self.stats;
        let name = |n: &str| format!("outlier_detection.{n}");
        let active = ejected(&cluster.host_set().hosts);
        scope.gauge(
            &name("ejections_active"),
            i64::try_from(active).unwrap_or(i64::MAX),
            out,
        );
        scope.counter(
            &name("ejections_enforced_total"),
            s.ejections_enforced_total.get(),
            out,
        );
        scope.counter(&name("ejections_overflow"), s.ejections_overflow.get(), out);
        scope.counter(&name("ejections_total"), s.ejections_total.get(), out);
        scope.counter(
            &name("ejections_consecutive_5xx"),
            s.ejections_consecutive_5xx.get(),
            out,
        );
        scope.counter(
            &name("ejections_success_rate"),
            s.ejections_success_rate.get(),
            out,
        );
        for (i, kind) in KIND_NAMES.iter().enumerate() {
            scope.counter(
                &name(&format!("ejections_enforced_{kind}")),
                s.enforced[i].get(),
                out,
            );
            scope.counter(
                &name(&format!("ejections_detected_{kind}")),
                s.detected[i].get(),
                out,
            );
        }
    }
}

/// Runs the detector's interval timer until the cluster goes away.
pub async fn run(detector: Arc<Detector>, cluster: Weak<Cluster>) {
    loop {
        tokio::time::sleep(detector.interval()).await;
        let Some(c) = cluster.upgrade() else { return };
        detector.on_interval(&c);
    }
}

/// Envoy's success-rate threshold: mean − factor × population standard deviation.
fn success_rate_threshold(rates: &[f64], factor: f64) -> f64 {
    let n = rates.len() as f64;
    let mean = rates.iter().sum::<f64>() / n;
    let variance = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
    mean - factor * variance.sqrt()
}

fn ejected(hosts: &[Arc<Host>]) -> u64 {
    hosts
        .iter()
        .filter(|h| h.flags() & flags::FAILED_OUTLIER_CHECK != 0)
        .count() as u64
}

/// Envoy's `featureEnabled(key, percent)`: true with probability `percent` / 100.
fn enabled(percent: u64) -> bool {
    percent >= 100 || (percent > 0 && fastrand::u64(..100) < percent)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_rate_threshold_matches_envoys_example() {
        // Envoy's comment: {50, 100, 100, 100, 100} → mean 90, stdev 20, threshold 52 (1.9).
        let t = success_rate_threshold(&[50.0, 100.0, 100.0, 100.0, 100.0], 1.9);
        assert!((t - 52.0).abs() < 1e-9, "{t}");
    }

    #[test]
    fn enforcing_percentages() {
        assert!(enabled(100));
        assert!(!enabled(0));
    }
}
