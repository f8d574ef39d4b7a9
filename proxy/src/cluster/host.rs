//! Hosts (one upstream address each, with its stats and connection pool) and host sets.
//!
//! A [`HostSet`] is an immutable snapshot; the cluster swaps in a new one when DNS or EDS
//! changes membership, reusing the `Host` (and so its pooled connections) of every address
//! that stays; the snapshot also holds its priority levels and the load balancer built over
//! them ([`lb::Balancer`]). It must not decide which host serves a request (that is `lb`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use super::ClusterStats;
use super::lb::{self, Balancer, LbContext, LbParams};
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
    /// Not checked yet. Envoy sets it only with `ignore_new_hosts_until_first_hc`, which the
    /// proxy does not implement, so today it is only ever cleared (new hosts start with
    /// `FAILED_ACTIVE_HC` alone, as in Envoy).
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
    /// `load_balancing_weight` (1 when unset).
    weight: AtomicU32,
    /// The `LocalityLbEndpoints.priority` it was assigned with.
    priority: AtomicU32,
    /// Its locality's `load_balancing_weight` (0 when unset).
    locality_weight: AtomicU32,
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
        let locality_weight = AtomicU32::new(locality.weight);
        Self {
            address,
            hostname,
            locality,
            health: AtomicU8::new(encode(health)),
            flags: AtomicU32::new(0),
            weight: AtomicU32::new(1),
            priority: AtomicU32::new(0),
            locality_weight,
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

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Sets the weight (at least 1); the owner rebuilds the host set afterwards.
    pub fn set_weight(&self, w: u32) {
        self.weight.store(w.max(1), Ordering::Relaxed);
    }

    pub fn priority(&self) -> u32 {
        self.priority.load(Ordering::Relaxed)
    }

    /// Sets the priority level; the owner rebuilds the host set afterwards.
    pub fn set_priority(&self, p: u32) {
        self.priority.store(p, Ordering::Relaxed);
    }

    pub fn locality_weight(&self) -> u32 {
        self.locality_weight.load(Ordering::Relaxed)
    }

    /// Sets the locality weight; the owner rebuilds the host set afterwards.
    pub fn set_locality_weight(&self, w: u32) {
        self.locality_weight.store(w, Ordering::Relaxed);
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
#[derive(Debug)]
pub struct HostSet {
    /// Every host, in assignment order.
    pub hosts: Vec<Arc<Host>>,
    /// The routable ones ([`Host::is_routable`]).
    pub healthy: Vec<Arc<Host>>,
    /// Per priority level (index = priority): all hosts, routable hosts.
    pub priorities: Vec<lb::LevelHosts>,
    params: LbParams,
    balancer: Balancer,
}

impl Default for HostSet {
    fn default() -> Self {
        Self::with_params(Vec::new(), LbParams::default())
    }
}

impl HostSet {
    /// A snapshot balanced with the default parameters (round robin).
    pub fn new(hosts: Vec<Arc<Host>>) -> Self {
        Self::with_params(hosts, LbParams::default())
    }

    /// A snapshot over `hosts`, split into priority levels by [`Host::priority`], with its
    /// load balancer built for `params`.
    pub fn with_params(hosts: Vec<Arc<Host>>, params: LbParams) -> Self {
        let healthy: Vec<Arc<Host>> = hosts.iter().filter(|h| h.is_routable()).cloned().collect();
        let levels = hosts
            .iter()
            .map(|h| h.priority() as usize + 1)
            .max()
            .unwrap_or(0);
        let mut priorities = vec![(Vec::new(), Vec::new()); levels];
        for h in &hosts {
            let level = &mut priorities[h.priority() as usize];
            level.0.push(h.clone());
            if h.is_routable() {
                level.1.push(h.clone());
            }
        }
        let balancer = Balancer::new(&priorities, params);
        Self {
            hosts,
            healthy,
            priorities,
            params,
            balancer,
        }
    }

    /// The same hosts, re-read (health, flags, weights): a new snapshot.
    pub fn rebuild(&self) -> Self {
        Self::with_params(self.hosts.clone(), self.params)
    }

    pub fn params(&self) -> &LbParams {
        &self.params
    }

    /// Per priority level: the percentage of requests it gets and whether it is in panic.
    pub fn priority_load(&self) -> &lb::PriorityLoad {
        &self.balancer.load
    }

    /// Picks a host; see [`Balancer::choose`].
    pub fn choose(&self, ctx: &LbContext) -> lb::Pick {
        self.balancer.choose(ctx)
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
                tls: None,
            },
            Arc::new(ClusterStats::default()),
        ))
    }

    fn picks(set: &HostSet) -> (std::collections::BTreeSet<SocketAddr>, bool) {
        let mut seen = std::collections::BTreeSet::new();
        let mut panic = false;
        for _ in 0..200 {
            let p = set.choose(&LbContext::default());
            panic |= p.panic;
            seen.extend(p.host.map(|h| h.address));
        }
        (seen, panic)
    }

    #[test]
    fn unhealthy_hosts_are_skipped_until_the_panic_threshold() {
        let set = HostSet::new(vec![
            host("10.0.0.1:80", HealthStatus::Healthy),
            host("10.0.0.2:80", HealthStatus::Unknown),
            host("10.0.0.3:80", HealthStatus::Unhealthy),
        ]);
        let (hosts, panic) = picks(&set);
        assert_eq!(hosts.len(), 2);
        assert!(!panic);

        let set = HostSet::new(vec![
            host("10.0.0.1:80", HealthStatus::Healthy),
            host("10.0.0.2:80", HealthStatus::Draining),
            host("10.0.0.3:80", HealthStatus::Unhealthy),
        ]);
        let (hosts, panic) = picks(&set);
        assert_eq!(hosts.len(), 3, "below 50% healthy: all hosts");
        assert!(panic);

        assert!(picks(&HostSet::default()).0.is_empty());
    }

    #[test]
    fn priorities_split_the_hosts_and_rebuild_rereads_them() {
        let a = host("10.0.0.1:80", HealthStatus::Healthy);
        let b = host("10.0.0.2:80", HealthStatus::Healthy);
        b.set_priority(2);
        let set = HostSet::new(vec![a.clone(), b.clone()]);
        assert_eq!(set.priorities.len(), 3);
        assert!(set.priorities[1].0.is_empty());
        assert_eq!(set.priority_load().load, vec![100, 0, 0]);
        a.set_health(HealthStatus::Unhealthy);
        let set = set.rebuild();
        assert_eq!(set.priority_load().load, vec![0, 0, 100]);
        assert_eq!(
            picks(&set).0.into_iter().collect::<Vec<_>>(),
            vec![b.address]
        );
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
