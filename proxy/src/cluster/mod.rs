//! The cluster manager: every upstream cluster, its hosts, load balancer and connection pools.
//!
//! Clusters live in an immutable map swapped atomically ([`arc_swap`]), and each cluster's
//! membership is an immutable [`HostSet`] swapped the same way, so the request path
//! ([`ClusterManager::get`], [`Cluster::choose_host`]) takes no lock. Writers (static
//! clusters, CDS and EDS through [`cds`]) build a new snapshot and swap it in.
//!
//! Initialization follows Envoy: each cluster registers an init target in the phase its type
//! belongs to — STATIC, STRICT_DNS and LOGICAL_DNS in the primary phase (DNS resolved once),
//! EDS in the secondary phase (first assignment or `initial_fetch_timeout`) — plus one target in
//! the health-check phase, ready once the cluster's first round of active health checks is over
//! (at once without `health_checks`; see [`health_check`]).
//! This module must not know about listeners or HTTP routing.

pub mod cds;
pub mod circuit_breaker;
pub mod dns;
pub mod h1;
pub mod hash;
pub mod health_check;
pub mod host;
pub mod lb;
pub mod outlier;
pub mod pool;
pub mod stream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;

use crate::config::cluster::{self as model, Discovery, EndpointAddress, HealthStatus, Locality};
use crate::init;
use crate::stats::{CodeStats, Counter, Gauge, Sample, Scope, Source, Store};
use host::{Host, HostSet};
pub use lb::LbContext;
use lb::LbParams;
use pool::PoolSettings;

/// Envoy's `cluster.<name>.*` stats for what the proxy implements.
#[derive(Debug)]
pub struct ClusterStats {
    pub upstream_rq_total: Counter,
    pub upstream_rq: CodeStats,
    pub upstream_rq_active: Gauge,
    pub upstream_rq_timeout: Counter,
    pub upstream_rq_retry: Counter,
    pub upstream_rq_retry_success: Counter,
    pub upstream_rq_retry_overflow: Counter,
    pub upstream_rq_retry_limit_exceeded: Counter,
    pub upstream_rq_per_try_timeout: Counter,
    pub upstream_cx_total: Counter,
    pub upstream_cx_active: Gauge,
    pub upstream_cx_connect_fail: Counter,
    pub upstream_cx_connect_timeout: Counter,
    pub upstream_cx_http1_total: Counter,
    pub upstream_cx_http2_total: Counter,
    pub upstream_cx_none_healthy: Counter,
    pub lb_healthy_panic: Counter,
    pub update_attempt: Counter,
    pub update_success: Counter,
    pub update_failure: Counter,
    pub upstream_rq_pending_overflow: Counter,
    /// `max_requests` reached when a request would start (Envoy 1.38+).
    pub upstream_rq_active_overflow: Counter,
    pub upstream_cx_overflow: Counter,
    pub upstream_cx_idle_timeout: Counter,
    pub upstream_cx_max_requests: Counter,
    pub upstream_cx_max_duration_reached: Counter,
    /// The cluster's circuit breakers and pool settings, set once when the cluster is built;
    /// every host's pool reaches them through these stats (Envoy's `ClusterInfo`).
    pub shared: std::sync::OnceLock<Arc<pool::Shared>>,
}

impl Default for ClusterStats {
    fn default() -> Self {
        Self {
            upstream_rq_total: Counter::default(),
            upstream_rq: CodeStats::new(true),
            upstream_rq_active: Gauge::default(),
            upstream_rq_timeout: Counter::default(),
            upstream_rq_retry: Counter::default(),
            upstream_rq_retry_success: Counter::default(),
            upstream_rq_retry_overflow: Counter::default(),
            upstream_rq_retry_limit_exceeded: Counter::default(),
            upstream_rq_per_try_timeout: Counter::default(),
            upstream_cx_total: Counter::default(),
            upstream_cx_active: Gauge::default(),
            upstream_cx_connect_fail: Counter::default(),
            upstream_cx_connect_timeout: Counter::default(),
            upstream_cx_http1_total: Counter::default(),
            upstream_cx_http2_total: Counter::default(),
            upstream_cx_none_healthy: Counter::default(),
            lb_healthy_panic: Counter::default(),
            update_attempt: Counter::default(),
            update_success: Counter::default(),
            update_failure: Counter::default(),
            upstream_rq_pending_overflow: Counter::default(),
            upstream_rq_active_overflow: Counter::default(),
            upstream_cx_overflow: Counter::default(),
            upstream_cx_idle_timeout: Counter::default(),
            upstream_cx_max_requests: Counter::default(),
            upstream_cx_max_duration_reached: Counter::default(),
            shared: std::sync::OnceLock::new(),
        }
    }
}

impl AsRef<Gauge> for Arc<ClusterStats> {
    fn as_ref(&self) -> &Gauge {
        &self.upstream_rq_active
    }
}

/// One endpoint after name resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    pub address: SocketAddr,
    pub hostname: String,
    pub locality: Locality,
    pub health: HealthStatus,
    /// `load_balancing_weight` (1 when unset).
    pub weight: u32,
    /// `LocalityLbEndpoints.priority`.
    pub priority: u32,
}

/// A running cluster.
pub struct Cluster {
    config: Arc<model::Cluster>,
    hosts: ArcSwap<HostSet>,
    lb: LbParams,
    /// The last EDS assignment's `policy.overprovisioning_factor` (0: none, the cluster's
    /// own applies).
    eds_overprovisioning: std::sync::atomic::AtomicU32,
    stats: Arc<ClusterStats>,
    settings: PoolSettings,
    added_via_api: bool,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Serializes host-set writers (discovery, health); readers never take it.
    membership: Mutex<()>,
    /// Outlier detection, when configured.
    outlier: Option<Arc<outlier::Detector>>,
    /// Active health checking, when configured (`health_check`).
    health_checker: Option<Arc<health_check::HealthChecker>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.config.name)
            .field("discovery", &self.config.discovery)
            .finish_non_exhaustive()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

impl Cluster {
    pub fn new(config: Arc<model::Cluster>, added_via_api: bool) -> Arc<Self> {
        let settings = PoolSettings {
            protocol: config.protocol,
            connect_timeout: config.connect_timeout,
            tls: config.tls.clone(),
        };
        let cluster = Arc::new(Self {
            lb: LbParams {
                policy: config.lb_policy,
                healthy_panic_threshold: config.lb_settings.healthy_panic_threshold,
                overprovisioning_factor: config.lb_settings.overprovisioning_factor,
                locality_weighted: config.lb_settings.locality_weighted,
            },
            eds_overprovisioning: std::sync::atomic::AtomicU32::new(0),
            hosts: ArcSwap::from_pointee(HostSet::default()),
            stats: Arc::new(ClusterStats::default()),
            settings,
            added_via_api,
            tasks: Mutex::new(Vec::new()),
            membership: Mutex::new(()),
            outlier: config.outlier_detection.clone().map(outlier::Detector::new),
            health_checker: config
                .health_checks
                .first()
                .map(|hc| Arc::new(health_check::HealthChecker::new(hc.clone(), &config.name))),
            config,
        });
        let _ = cluster.stats.shared.set(Arc::new(pool::Shared {
            breakers: circuit_breaker::Breakers::new(&cluster.config.circuit_breakers),
            options: cluster.config.pool,
            idle: Default::default(),
        }));
        cluster.start_outlier_detection();
        cluster.start_idle_sweeper();
        cluster.start_health_checking();
        if cluster.config.discovery == Discovery::Static {
            let endpoints: Vec<ResolvedEndpoint> = cluster
                .config
                .endpoints
                .iter()
                .filter_map(|e| match &e.address {
                    EndpointAddress::Ip(a) => Some(ResolvedEndpoint {
                        address: *a,
                        hostname: e.hostname.clone(),
                        locality: e.locality.clone(),
                        health: e.health,
                        weight: e.weight,
                        priority: e.priority,
                    }),
                    EndpointAddress::Dns { .. } => None,
                })
                .collect();
            cluster.update_hosts(&endpoints);
        }
        cluster
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &Arc<model::Cluster> {
        &self.config
    }

    pub fn stats(&self) -> &Arc<ClusterStats> {
        &self.stats
    }

    pub fn added_via_api(&self) -> bool {
        self.added_via_api
    }

    /// The cluster's outlier detector, if it has one.
    pub fn outlier(&self) -> Option<&Arc<outlier::Detector>> {
        self.outlier.as_ref()
    }

    /// Reports what happened to a request or connection on `host` to outlier detection.
    pub fn report_outcome(&self, host: &Arc<Host>, outcome: outlier::Outcome) {
        if let Some(d) = &self.outlier {
            d.report(self, host, outcome);
        }
    }

    /// The cluster's circuit breakers.
    pub fn breakers(&self) -> Option<&circuit_breaker::Breakers> {
        self.stats.shared.get().map(|s| &s.breakers)
    }

    /// One interval timer per cluster with outlier detection (needs a runtime; clusters built
    /// outside one, in unit tests, run no timer).
    fn start_outlier_detection(self: &Arc<Self>) {
        let Some(d) = &self.outlier else { return };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = rt.spawn(outlier::run(d.clone(), Arc::downgrade(self)));
        lock(&self.tasks).push(task.abort_handle());
    }

    /// The cluster's idle-connection timer (`idle_timeout`, `max_connection_duration`).
    fn start_idle_sweeper(self: &Arc<Self>) {
        let (Some(shared), Ok(rt)) = (
            self.stats.shared.get(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let task = rt.spawn(pool::sweeper(Arc::downgrade(self), shared.clone()));
        lock(&self.tasks).push(task.abort_handle());
    }

    /// The cluster's active health checker, when `health_checks` is configured.
    pub fn health_checker(&self) -> Option<&Arc<health_check::HealthChecker>> {
        self.health_checker.as_ref()
    }

    /// One health-check task per cluster with `health_checks` (needs a runtime, as above).
    fn start_health_checking(self: &Arc<Self>) {
        let Some(hc) = &self.health_checker else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = rt.spawn(health_check::run(Arc::downgrade(self), hc.clone()));
        lock(&self.tasks).push(task.abort_handle());
    }

    /// The cluster's own discovery finished (Envoy's `onInitDone`): the health-check round
    /// over the hosts it has now begins.
    fn begin_health_check_round(&self) {
        if let Some(hc) = &self.health_checker {
            hc.begin_round(&self.hosts.load().hosts);
        }
    }

    /// The health-check init target: ready once the first round is over (at once without
    /// health checks).
    pub fn health_check_round(&self, ready: init::TargetHandle) {
        match &self.health_checker {
            Some(hc) => hc.wait_round(ready),
            None => ready.ready(),
        }
    }

    /// The current membership snapshot.
    pub fn host_set(&self) -> Arc<HostSet> {
        self.hosts.load_full()
    }

    /// Picks a host for one request (`ctx` carries the route's hash for ring hash and
    /// Maglev); `None` means "no healthy upstream".
    pub fn choose_host(&self, ctx: &LbContext) -> Option<Arc<Host>> {
        let pick = self.hosts.load().choose(ctx);
        if pick.panic {
            self.stats.lb_healthy_panic.inc();
        }
        match pick.host {
            Some(h) => Some(h),
            None => {
                self.stats.upstream_cx_none_healthy.inc();
                None
            }
        }
    }

    /// Rebuilds the host set over the same hosts after a host's routability changed (active
    /// health checking, outlier detection); the request path sees the new set atomically.
    pub fn refresh_health(&self) {
        let _writer = lock(&self.membership);
        let next = self.hosts.load().rebuild();
        self.hosts.store(Arc::new(next));
    }

    /// The balancing parameters, with an EDS assignment's overprovisioning factor.
    fn lb_params(&self) -> LbParams {
        let mut params = self.lb;
        let eds = self
            .eds_overprovisioning
            .load(std::sync::atomic::Ordering::Relaxed);
        if eds > 0 {
            params.overprovisioning_factor = eds;
        }
        params
    }

    /// Applies an EDS assignment: its hosts and its `policy.overprovisioning_factor` (`None`:
    /// Envoy's default, 140, or the cluster's inline one).
    pub fn apply_assignment(&self, a: &cds::Assignment) {
        self.eds_overprovisioning.store(
            a.overprovisioning_factor.unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.update_hosts(&a.endpoints);
    }

    /// Replaces the membership, keeping the `Host` (and its connections) of every address
    /// that stays.
    pub fn update_hosts(&self, endpoints: &[ResolvedEndpoint]) {
        let _writer = lock(&self.membership);
        let current = self.hosts.load();
        let by_address: HashMap<SocketAddr, &Arc<Host>> =
            current.hosts.iter().map(|h| (h.address, h)).collect();
        let mut hosts = Vec::with_capacity(endpoints.len());
        let mut seen = std::collections::HashSet::new();
        for e in endpoints {
            if !seen.insert(e.address) {
                continue;
            }
            match by_address.get(&e.address) {
                Some(h) => {
                    h.set_health(e.health);
                    h.set_weight(e.weight);
                    h.set_priority(e.priority);
                    h.set_locality_weight(e.locality.weight);
                    hosts.push(Arc::clone(h));
                }
                None => {
                    let h = Host::new(
                        e.address,
                        e.hostname.clone(),
                        e.locality.clone(),
                        e.health,
                        self.settings.clone(),
                        self.stats.clone(),
                    );
                    h.set_weight(e.weight);
                    h.set_priority(e.priority);
                    if self.health_checker.is_some() {
                        // Envoy: hosts of a health-checked cluster start failed until checked.
                        h.set_flags(host::flags::FAILED_ACTIVE_HC, true);
                    }
                    hosts.push(Arc::new(h));
                }
            }
        }
        self.hosts
            .store(Arc::new(HostSet::with_params(hosts, self.lb_params())));
        if let Some(hc) = &self.health_checker {
            hc.hosts_changed();
        }
    }

    /// Starts this cluster's initialization; `ready` is reported once it has its first hosts
    /// (or gave up waiting for them, as Envoy does).
    fn initialize(
        self: &Arc<Self>,
        ready: init::TargetHandle,
        eds: Option<Arc<dyn cds::EdsSource>>,
    ) {
        match &self.config.discovery {
            Discovery::Static => {
                self.begin_health_check_round();
                ready.ready();
            }
            Discovery::StrictDns | Discovery::LogicalDns => {
                let task = tokio::spawn(dns_refresh(Arc::downgrade(self), ready));
                lock(&self.tasks).push(task.abort_handle());
            }
            Discovery::Eds {
                service_name,
                initial_fetch_timeout,
            } => {
                let name = self.config.name.clone();
                let service = if service_name.is_empty() {
                    name.clone()
                } else {
                    service_name.clone()
                };
                let timeout = *initial_fetch_timeout;
                let cluster = Arc::downgrade(self);
                let task = tokio::spawn(async move {
                    let outcome = match eds {
                        Some(eds) => eds.first_assignment(&service, timeout).await,
                        None => {
                            // No ADS configured: nothing will ever answer, so the wait ends on
                            // `initial_fetch_timeout` and the cluster initializes without hosts.
                            tracing::warn!(cluster = %name, eds_service = %service, ?timeout,
                                "EDS cluster has no xDS source; waiting for initial_fetch_timeout");
                            init::initial_fetch(
                                std::future::pending::<Result<(), String>>(),
                                timeout,
                            )
                            .await
                        }
                    };
                    tracing::info!(cluster = %name, ?outcome, "EDS cluster initialized");
                    if let Some(c) = cluster.upgrade() {
                        c.begin_health_check_round();
                    }
                    ready.ready();
                });
                lock(&self.tasks).push(task.abort_handle());
            }
        }
    }
}

/// Resolves a DNS cluster's names now and every `dns_refresh_rate`. The first pass, success
/// or not, ends the cluster's initialization; a failed name keeps its previous addresses.
async fn dns_refresh(cluster: Weak<Cluster>, ready: init::TargetHandle) {
    let mut ready = Some(ready);
    let mut last: Vec<Vec<SocketAddr>> = Vec::new();
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let refresh = c.config.dns_refresh_rate;
        let family = c.config.dns_lookup_family;
        let logical = c.config.discovery == Discovery::LogicalDns;
        let endpoints = c.config.endpoints.clone();
        last.resize(endpoints.len(), Vec::new());
        let mut all_ok = true;
        let mut resolved = Vec::new();
        for (i, e) in endpoints.iter().enumerate() {
            c.stats.update_attempt.inc();
            let addrs = match &e.address {
                EndpointAddress::Ip(a) => Ok(vec![*a]),
                EndpointAddress::Dns { host, port } => dns::resolve(host, *port, family).await,
            };
            match addrs {
                Ok(mut a) => {
                    c.stats.update_success.inc();
                    if logical {
                        // LOGICAL_DNS: one logical host, the first address of the answer.
                        a.truncate(1);
                    }
                    last[i] = a;
                }
                Err(err) => {
                    all_ok = false;
                    c.stats.update_failure.inc();
                    tracing::warn!(cluster = %c.config.name, error = %err, "DNS resolution failed");
                }
            }
            resolved.extend(last[i].iter().map(|a| ResolvedEndpoint {
                address: *a,
                hostname: e.hostname.clone(),
                locality: e.locality.clone(),
                health: e.health,
                weight: e.weight,
                priority: e.priority,
            }));
        }
        c.update_hosts(&resolved);
        tracing::debug!(cluster = %c.config.name, hosts = resolved.len(), all_ok, "DNS refresh");
        if let Some(r) = ready.take() {
            c.begin_health_check_round();
            r.ready();
        }
        drop(c);
        tokio::time::sleep(refresh).await;
    }
}

impl Source for Cluster {
    fn collect(&self, out: &mut Vec<Sample>) {
        let s = &self.stats;
        let scope = Scope::tagged("cluster", "envoy_cluster_name", &self.config.name);
        scope.counter("upstream_rq_total", s.upstream_rq_total.get(), out);
        s.upstream_rq.collect(&scope, "upstream_rq", out);
        scope.gauge("upstream_rq_active", s.upstream_rq_active.get(), out);
        scope.counter("upstream_rq_timeout", s.upstream_rq_timeout.get(), out);
        scope.counter("upstream_rq_retry", s.upstream_rq_retry.get(), out);
        scope.counter(
            "upstream_rq_retry_success",
            s.upstream_rq_retry_success.get(),
            out,
        );
        scope.counter(
            "upstream_rq_retry_overflow",
            s.upstream_rq_retry_overflow.get(),
            out,
        );
        scope.counter(
            "upstream_rq_retry_limit_exceeded",
            s.upstream_rq_retry_limit_exceeded.get(),
            out,
        );
        scope.counter(
            "upstream_rq_per_try_timeout",
            s.upstream_rq_per_try_timeout.get(),
            out,
        );
        scope.counter("upstream_cx_total", s.upstream_cx_total.get(), out);
        scope.gauge("upstream_cx_active", s.upstream_cx_active.get(), out);
        if let Some(tls) = &self.config.tls {
            tls.stats.collect(&scope, out);
        }
        scope.counter(
            "upstream_cx_connect_fail",
            s.upstream_cx_connect_fail.get(),
            out,
        );
        scope.counter(
            "upstream_cx_connect_timeout",
            s.upstream_cx_connect_timeout.get(),
            out,
        );
        scope.counter(
            "upstream_cx_http1_total",
            s.upstream_cx_http1_total.get(),
            out,
        );
        scope.counter(
            "upstream_cx_http2_total",
            s.upstream_cx_http2_total.get(),
            out,
        );
        scope.counter(
            "upstream_cx_none_healthy",
            s.upstream_cx_none_healthy.get(),
            out,
        );
        scope.counter("lb_healthy_panic", s.lb_healthy_panic.get(), out);
        scope.counter(
            "upstream_rq_pending_overflow",
            s.upstream_rq_pending_overflow.get(),
            out,
        );
        scope.counter(
            "upstream_rq_active_overflow",
            s.upstream_rq_active_overflow.get(),
            out,
        );
        scope.counter("upstream_cx_overflow", s.upstream_cx_overflow.get(), out);
        scope.counter(
            "upstream_cx_idle_timeout",
            s.upstream_cx_idle_timeout.get(),
            out,
        );
        scope.counter(
            "upstream_cx_max_requests",
            s.upstream_cx_max_requests.get(),
            out,
        );
        scope.counter(
            "upstream_cx_max_duration_reached",
            s.upstream_cx_max_duration_reached.get(),
            out,
        );
        if let Some(shared) = s.shared.get() {
            shared.breakers.collect(&scope, out);
        }
        if let Some(d) = &self.outlier {
            d.collect(self, &scope, out);
        }
        if self.config.discovery != Discovery::Static {
            scope.counter("update_attempt", s.update_attempt.get(), out);
            scope.counter("update_success", s.update_success.get(), out);
            scope.counter("update_failure", s.update_failure.get(), out);
        }
        let set = self.hosts.load();
        scope.gauge("membership_total", set.hosts.len() as i64, out);
        scope.gauge("membership_healthy", set.healthy.len() as i64, out);
        if let Some(hc) = &self.health_checker {
            hc.collect(&scope, out);
        }
    }
}

/// The init managers of the cluster manager's phases.
#[derive(Debug, Clone)]
pub struct InitPhases {
    pub primary: init::Manager,
    pub secondary: init::Manager,
    pub health_check: init::Manager,
}

impl Default for InitPhases {
    fn default() -> Self {
        Self {
            primary: init::Manager::new("cluster_manager primary"),
            secondary: init::Manager::new("cluster_manager secondary"),
            health_check: init::Manager::new("cluster_manager health check round"),
        }
    }
}

/// Every cluster, by name.
pub struct ClusterManager {
    clusters: ArcSwap<HashMap<String, Arc<Cluster>>>,
    /// Serializes writers; readers never take it.
    update: Mutex<()>,
    store: Arc<Store>,
    cluster_added: Counter,
    /// CDS: clusters waiting for their first hosts before replacing (or joining) the active
    /// ones; see [`cds`].
    warming: Mutex<HashMap<String, Arc<Cluster>>>,
    /// The last accepted `ClusterLoadAssignment` of each EDS service.
    assignments: Mutex<HashMap<String, cds::Assignment>>,
    eds: std::sync::OnceLock<Arc<dyn cds::EdsSource>>,
    /// The phases CDS clusters initialize in during the server's initialization.
    pub cds_init: InitPhases,
    cluster_modified: Counter,
    cluster_removed: Counter,
}

impl std::fmt::Debug for ClusterManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.clusters.load().keys().cloned().collect();
        f.debug_struct("ClusterManager")
            .field("clusters", &names)
            .finish()
    }
}

impl ClusterManager {
    pub fn new(store: Arc<Store>) -> Arc<Self> {
        let cm = Arc::new(Self {
            clusters: ArcSwap::from_pointee(HashMap::new()),
            update: Mutex::new(()),
            store: store.clone(),
            cluster_added: Counter::default(),
            warming: Mutex::new(HashMap::new()),
            assignments: Mutex::new(HashMap::new()),
            eds: std::sync::OnceLock::new(),
            cds_init: InitPhases {
                primary: init::Manager::new("cluster_manager cds primary"),
                secondary: init::Manager::new("cluster_manager cds secondary"),
                health_check: init::Manager::new("cluster_manager cds health check round"),
            },
            cluster_modified: Counter::default(),
            cluster_removed: Counter::default(),
        });
        let weak: Weak<dyn Source> = Arc::downgrade(&cm) as Weak<dyn Source>;
        store.register_weak(weak);
        cm
    }

    /// Adds the bootstrap's clusters and registers their init targets in `phases`.
    pub fn add_static_clusters(
        &self,
        configs: &[model::Cluster],
        phases: &InitPhases,
    ) -> Result<(), init::Error> {
        let _writer = lock(&self.update);
        let mut next = HashMap::clone(&self.clusters.load());
        for config in configs {
            let cluster = Cluster::new(Arc::new(config.clone()), false);
            let weak: Weak<dyn Source> = Arc::downgrade(&cluster) as Weak<dyn Source>;
            self.store.register_weak(weak);
            let phase = if config.discovery.is_primary() {
                &phases.primary
            } else {
                &phases.secondary
            };
            let c = cluster.clone();
            let eds = self.eds.get().cloned();
            phase.add_target(
                format!("cluster {} ({})", config.name, config.discovery.name()),
                move |h| c.initialize(h, eds),
            )?;
            // A TLS context with SDS secrets holds initialization until they arrive (or their
            // initial_fetch_timeout passes), as Envoy's secret providers hold its init
            // manager; in the secondary phase, with ADS running.
            if let Some(tls) = config.tls.clone()
                && tls.common.sds_refs().next().is_some()
            {
                let name = config.name.clone();
                phases.secondary.add_target(
                    format!("cluster {} SDS secrets", config.name),
                    move |h| {
                        tokio::spawn(async move {
                            if !crate::tls::sds::wait_ready(tls).await {
                                tracing::warn!(cluster = %name,
                                    "SDS secrets did not arrive within initial_fetch_timeout; TLS connections fail until they do");
                            }
                            h.ready();
                        });
                    },
                )?;
            }
            // Held until the first health-check round is over (at once without health checks).
            let c = cluster.clone();
            phases.health_check.add_target(
                format!("cluster {} health check round", config.name),
                move |h| c.health_check_round(h),
            )?;
            self.cluster_added.inc();
            next.insert(config.name.clone(), cluster);
        }
        self.clusters.store(Arc::new(next));
        drop(_writer);
        self.update_eds_subscription();
        Ok(())
    }

    /// The cluster named `name`, as of now.
    pub fn get(&self, name: &str) -> Option<Arc<Cluster>> {
        self.clusters.load().get(name).cloned()
    }

    /// Every cluster, sorted by name.
    pub fn clusters(&self) -> Vec<Arc<Cluster>> {
        let mut v: Vec<Arc<Cluster>> = self.clusters.load().values().cloned().collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }
}

impl Source for ClusterManager {
    fn collect(&self, out: &mut Vec<Sample>) {
        let scope = Scope::fixed("cluster_manager");
        scope.gauge("active_clusters", self.clusters.load().len() as i64, out);
        scope.gauge("warming_clusters", lock(&self.warming).len() as i64, out);
        scope.counter("cluster_added", self.cluster_added.get(), out);
        scope.counter("cluster_modified", self.cluster_modified.get(), out);
        scope.counter("cluster_removed", self.cluster_removed.get(), out);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::Endpoint;
    use std::time::Duration;

    fn config(discovery: Discovery, endpoints: Vec<Endpoint>) -> model::Cluster {
        model::Cluster {
            name: "c".into(),
            discovery,
            connect_timeout: Duration::from_secs(1),
            dns_lookup_family: model::DnsLookupFamily::V4Only,
            dns_refresh_rate: Duration::from_millis(50),
            endpoints,
            source: Arc::default(),
            ..Default::default()
        }
    }

    fn endpoint(address: EndpointAddress) -> Endpoint {
        Endpoint {
            address,
            hostname: String::new(),
            health: HealthStatus::Unknown,
            locality: Locality::default(),
            weight: 1,
            priority: 0,
        }
    }

    #[test]
    fn round_robin_over_static_hosts() {
        let c = Cluster::new(
            Arc::new(config(
                Discovery::Static,
                vec![
                    endpoint(EndpointAddress::Ip("10.0.0.1:80".parse().expect("addr"))),
                    endpoint(EndpointAddress::Ip("10.0.0.2:80".parse().expect("addr"))),
                ],
            )),
            false,
        );
        let picks: Vec<SocketAddr> = (0..4)
            .filter_map(|_| c.choose_host(&LbContext::default()).map(|h| h.address))
            .collect();
        assert_eq!(picks.len(), 4);
        assert_ne!(picks[0], picks[1]);
        assert_eq!(picks[0], picks[2]);
    }

    #[test]
    fn an_empty_cluster_has_no_healthy_upstream() {
        let c = Cluster::new(Arc::new(config(Discovery::Static, vec![])), false);
        assert!(c.choose_host(&LbContext::default()).is_none());
        assert_eq!(c.stats().upstream_cx_none_healthy.get(), 1);
    }

    #[test]
    fn membership_updates_keep_existing_hosts() {
        let c = Cluster::new(Arc::new(config(Discovery::Static, vec![])), false);
        let ep = |a: &str| ResolvedEndpoint {
            address: a.parse().expect("addr"),
            hostname: String::new(),
            locality: Locality::default(),
            health: HealthStatus::Healthy,
            weight: 1,
            priority: 0,
        };
        c.update_hosts(&[ep("10.0.0.1:80"), ep("10.0.0.2:80")]);
        let before = c.host_set().hosts[1].clone();
        c.update_hosts(&[ep("10.0.0.2:80"), ep("10.0.0.3:80")]);
        let after = c.host_set();
        assert_eq!(after.hosts.len(), 2);
        assert!(
            Arc::ptr_eq(&before, &after.hosts[0]),
            "10.0.0.2 kept its Host"
        );
    }

    #[test]
    fn membership_updates_carry_weights_priorities_and_the_lb_policy() {
        let mut cfg = config(Discovery::Static, vec![]);
        cfg.lb_policy = model::LbPolicy::RoundRobin;
        cfg.lb_settings.healthy_panic_threshold = 0;
        let c = Cluster::new(Arc::new(cfg), false);
        let ep = |a: &str, weight: u32, priority: u32| ResolvedEndpoint {
            address: a.parse().expect("addr"),
            hostname: String::new(),
            locality: Locality::default(),
            health: HealthStatus::Healthy,
            weight,
            priority,
        };
        c.update_hosts(&[ep("10.0.0.1:80", 1, 0), ep("10.0.0.2:80", 1, 1)]);
        let set = c.host_set();
        assert_eq!(set.priorities.len(), 2);
        assert_eq!(set.priority_load().load, vec![100, 0]);
        // The same hosts, reweighted and moved: the kept Host takes the new values.
        c.update_hosts(&[ep("10.0.0.1:80", 3, 1), ep("10.0.0.2:80", 1, 0)]);
        let set = c.host_set();
        assert_eq!(set.hosts[0].weight(), 3);
        assert_eq!(set.hosts[0].priority(), 1);
        assert_eq!(set.priorities[0].0[0].address, set.hosts[1].address);
        // Health changes rebuild with the cluster's parameters (panic disabled here).
        set.hosts[1].set_health(HealthStatus::Unhealthy);
        c.refresh_health();
        assert_eq!(c.host_set().params().healthy_panic_threshold, 0);
        assert_eq!(c.host_set().priority_load().load, vec![0, 100]);
        let picks: Vec<SocketAddr> = (0..4)
            .filter_map(|_| c.choose_host(&LbContext::default()).map(|h| h.address))
            .collect();
        assert_eq!(picks.len(), 4);
        assert!(picks.iter().all(|a| a.ip().to_string() == "10.0.0.1"));
    }

    #[test]
    fn an_eds_assignment_brings_its_overprovisioning_factor() {
        let mut cfg = config(Discovery::Static, vec![]);
        cfg.lb_settings.healthy_panic_threshold = 0;
        let c = Cluster::new(Arc::new(cfg), false);
        let ep = |a: &str, priority: u32, health: HealthStatus| ResolvedEndpoint {
            address: a.parse().expect("addr"),
            hostname: String::new(),
            locality: Locality::default(),
            health,
            weight: 1,
            priority,
        };
        let endpoints = vec![
            ep("10.0.0.1:80", 0, HealthStatus::Healthy),
            ep("10.0.0.2:80", 0, HealthStatus::Unhealthy),
            ep("10.0.0.3:80", 1, HealthStatus::Healthy),
        ];
        // Priority 0 is 50 % healthy: × 1.4 (Envoy's default) keeps 70 % of the load.
        c.apply_assignment(&cds::Assignment {
            endpoints: endpoints.clone(),
            overprovisioning_factor: None,
        });
        assert_eq!(c.host_set().priority_load().load, vec![70, 30]);
        // The assignment's factor 200 keeps all of it at priority 0.
        c.apply_assignment(&cds::Assignment {
            endpoints: endpoints.clone(),
            overprovisioning_factor: Some(200),
        });
        assert_eq!(c.host_set().priority_load().load, vec![100, 0]);
        // It stays for health-only rebuilds, and a later assignment without one drops it.
        c.refresh_health();
        assert_eq!(c.host_set().priority_load().load, vec![100, 0]);
        c.apply_assignment(&cds::Assignment {
            endpoints,
            overprovisioning_factor: None,
        });
        assert_eq!(c.host_set().priority_load().load, vec![70, 30]);
    }

    #[tokio::test]
    async fn strict_dns_initializes_after_the_first_resolution() {
        let phases = InitPhases::default();
        let cm = ClusterManager::new(Store::new());
        cm.add_static_clusters(
            &[config(
                Discovery::StrictDns,
                vec![endpoint(EndpointAddress::Dns {
                    host: "localhost".into(),
                    port: 8080,
                })],
            )],
            &phases,
        )
        .expect("added");
        assert!(cm.get("c").expect("cluster").host_set().hosts.is_empty());
        phases.primary.initialize().wait().await;
        let hosts = cm.get("c").expect("cluster").host_set();
        assert!(!hosts.hosts.is_empty());
        assert!(hosts.hosts.iter().all(|h| h.address.port() == 8080));
        phases.secondary.initialize().wait().await;
        phases.health_check.initialize().wait().await;
    }

    #[tokio::test]
    async fn logical_dns_keeps_one_host_and_dns_clusters_refresh() {
        let phases = InitPhases::default();
        let cm = ClusterManager::new(Store::new());
        let mut logical = config(
            Discovery::LogicalDns,
            vec![endpoint(EndpointAddress::Dns {
                host: "localhost".into(),
                port: 9,
            })],
        );
        logical.dns_lookup_family = model::DnsLookupFamily::All;
        cm.add_static_clusters(&[logical], &phases).expect("added");
        phases.primary.initialize().wait().await;
        let c = cm.get("c").expect("cluster");
        assert_eq!(c.host_set().hosts.len(), 1, "one logical host");
        let first = c.stats().update_attempt.get();
        assert_eq!(first, 1);
        tokio::time::sleep(Duration::from_millis(180)).await;
        assert!(
            c.stats().update_attempt.get() >= 3,
            "re-resolved every dns_refresh_rate (50ms)"
        );
        assert_eq!(c.host_set().hosts.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn eds_without_a_source_initializes_empty_after_initial_fetch_timeout() {
        let phases = InitPhases::default();
        let cm = ClusterManager::new(Store::new());
        cm.add_static_clusters(
            &[config(
                Discovery::Eds {
                    service_name: String::new(),
                    initial_fetch_timeout: Some(Duration::from_secs(2)),
                },
                vec![],
            )],
            &phases,
        )
        .expect("added");
        phases.primary.initialize().wait().await;
        let start = tokio::time::Instant::now();
        phases.secondary.initialize().wait().await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert!(
            cm.get("c")
                .expect("cluster")
                .choose_host(&LbContext::default())
                .is_none()
        );
    }
}
