//! Hosts (one upstream address each, with its stats and connection pool) and host sets.
//!
//! A [`HostSet`] is an immutable snapshot; the cluster swaps in a new one when DNS or EDS
//! changes membership, reusing the `Host` (and so its pooled connections) of every address
//! that stays. It must not decide which host serves a request (that is `lb`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use super::ClusterStats;
use super::pool::{Pool, PoolSettings};
use crate::config::cluster::{HealthStatus, Locality};
use crate::stats::{Counter, Gauge};

/// Per-host counters, as in Envoy's `/clusters` output.
#[derive(Debug, Default)]
pub struct HostStats {
    pub cx_active: Gauge,
    pub cx_total: Counter,
    pub cx_connect_fail: Counter,
    pub rq_active: Gauge,
    pub rq_total: Counter,
    pub rq_success: Counter,
    pub rq_error: Counter,
    pub rq_timeout: Counter,
}

impl AsRef<Gauge> for Arc<HostStats> {
    fn as_ref(&self) -> &Gauge {
        &self.rq_active
    }
}

/// Envoy's host health flags besides the EDS status (`/clusters` prints them). A host is
/// routable when its EDS status is and none of these is set. Active health checking owns the
/// two `*_ACTIVE_HC` bits, outlier detection owns `FAILED_OUTLIER_CHECK`.
pub mod flags {
    /// Failed active health checking (or not yet passed it: new hosts start with this set).
    pub const FAILED_ACTIVE_HC: u32 = 1;
    /// Ejected by outlier detection.
    pub const FAILED_OUTLIER_CHECK: u32 = 1 << 1;
    /// Added while health checking is configured and not checked yet.
    pub const PENDING_ACTIVE_HC: u32 = 1 << 2;
    /// The flags that take a host out of rotation.
    pub const UNROUTABLE: u32 = FAILED_ACTIVE_HC | FAILED_OUTLIER_CHECK;
}

#[derive(Debug)]
pub struct Host {
    pub address: SocketAddr,
    pub hostname: String,
    pub locality: Locality,
    health: AtomicU8,
    flags: AtomicU32,
    pub stats: Arc<HostStats>,
    pub pool: Arc<Pool>,
}

impl Host {
    pub fn new(
        address: SocketAddr,
        hostname: String,
        locality: Locality,
        health: HealthStatus,
        settings: PoolSettings,
        cluster_stats: Arc<ClusterStats>,
    ) -> Self {
        let stats = Arc::new(HostStats::default());
        Self {
            address,
            hostname,
            locality,
            health: AtomicU8::new(encode(health)),
            flags: AtomicU32::new(0),
            pool: Arc::new(Pool::new(address, settings, stats.clone(), cluster_stats)),
            stats,
        }
    }

    pub fn health(&self) -> HealthStatus {
        decode(self.health.load(Ordering::Relaxed))
    }

    pub fn set_health(&self, h: HealthStatus) {
        self.health.store(encode(h), Ordering::Relaxed);
    }

    /// The [`flags`] set now.
    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Relaxed)
    }

    /// Sets (`on`) or clears the given [`flags`]; returns whether routability changed, in
    /// which case the owner must rebuild the cluster's host set
    /// ([`super::Cluster::refresh_health`]).
    pub fn set_flags(&self, bits: u32, on: bool) -> bool {
        let before = if on {
            self.flags.fetch_or(bits, Ordering::AcqRel)
        } else {
            self.flags.fetch_and(!bits, Ordering::AcqRel)
        };
        let after = if on { before | bits } else { before & !bits };
        (before & flags::UNROUTABLE == 0) != (after & flags::UNROUTABLE == 0)
    }

    /// Whether the load balancer may pick this host: its EDS status allows it and neither
    /// active health checking nor outlier detection took it out.
    pub fn is_routable(&self) -> bool {
        self.health().is_routable() && self.flags() & flags::UNROUTABLE == 0
    }

    /// Active requests, what least-request balancing compares.
    pub fn active_requests(&self) -> i64 {
        self.stats.rq_active.get()
    }
}

fn encode(h: HealthStatus) -> u8 {
    match h {
        HealthStatus::Unknown => 0,
        HealthStatus::Healthy => 1,
        HealthStatus::Unhealthy => 2,
        HealthStatus::Draining => 3,
        HealthStatus::Timeout => 4,
    }
}

fn decode(v: u8) -> HealthStatus {
    match v {
        1 => HealthStatus::Healthy,
        2 => HealthStatus::Unhealthy,
        3 => HealthStatus::Draining,
        4 => HealthStatus::Timeout,
        _ => HealthStatus::Unknown,
    }
}

/// An immutable membership snapshot.
#[derive(Debug, Default)]
pub struct HostSet {
    pub hosts: Vec<Arc<Host>>,
    pub healthy: Vec<Arc<Host>>,
}

/// Envoy's default `healthy_panic_threshold`: below 50% healthy hosts, balance over all.
pub const HEALTHY_PANIC_THRESHOLD_PERCENT: usize = 50;

impl HostSet {
    pub fn new(hosts: Vec<Arc<Host>>) -> Self {
        let healthy = hosts.iter().filter(|h| h.is_routable()).cloned().collect();
        Self { hosts, healthy }
    }

    /// The hosts to balance over, and whether the cluster is in panic mode (too few healthy
    /// hosts, so Envoy routes to all of them).
    pub fn routable(&self) -> (&[Arc<Host>], bool) {
        if self.hosts.is_empty() {
            return (&[], false);
        }
        if self.healthy.len() * 100 < self.hosts.len() * HEALTHY_PANIC_THRESHOLD_PERCENT {
            (&self.hosts, true)
        } else {
            (&self.healthy, false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::UpstreamProtocol;
    use std::time::Duration;

    pub(crate) fn host(addr: &str, health: HealthStatus) -> Arc<Host> {
        Arc::new(Host::new(
            addr.parse().expect("address"),
            String::new(),
            Locality::default(),
            health,
            PoolSettings {
                protocol: UpstreamProtocol::Http1,
                connect_timeout: Duration::from_secs(1),
            },
            Arc::new(ClusterStats::default()),
        ))
    }

    #[test]
    fn unhealthy_hosts_are_skipped_until_the_panic_threshold() {
        let set = HostSet::new(vec![
            host("10.0.0.1:80", HealthStatus::Healthy),
            host("10.0.0.2:80", HealthStatus::Unknown),
            host("10.0.0.3:80", HealthStatus::Unhealthy),
        ]);
        let (hosts, panic) = set.routable();
        assert_eq!(hosts.len(), 2);
        assert!(!panic);

        let set = HostSet::new(vec![
            host("10.0.0.1:80", HealthStatus::Healthy),
            host("10.0.0.2:80", HealthStatus::Draining),
            host("10.0.0.3:80", HealthStatus::Unhealthy),
        ]);
        let (hosts, panic) = set.routable();
        assert_eq!(hosts.len(), 3, "below 50% healthy: all hosts");
        assert!(panic);

        assert!(HostSet::default().routable().0.is_empty());
    }

    #[test]
    fn health_flags_take_hosts_out_of_rotation() {
        let h = host("10.0.0.1:80", HealthStatus::Healthy);
        assert!(h.is_routable());
        assert!(
            !h.set_flags(flags::PENDING_ACTIVE_HC, true),
            "not a routing flag"
        );
        assert!(h.set_flags(flags::FAILED_ACTIVE_HC, true));
        assert!(!h.is_routable());
        assert!(
            !h.set_flags(flags::FAILED_OUTLIER_CHECK, true),
            "already out"
        );
        assert!(
            !h.set_flags(flags::FAILED_ACTIVE_HC, false),
            "still ejected"
        );
        assert!(h.set_flags(flags::FAILED_OUTLIER_CHECK, false));
        assert!(h.is_routable());
        assert_eq!(h.flags(), flags::PENDING_ACTIVE_HC);
    }
}
