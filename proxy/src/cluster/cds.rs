//! Clusters from CDS and their endpoints from EDS, with Envoy's *cluster warming*.
//!
//! [`ClusterManager::apply_cds`] takes the complete, already validated set of CDS clusters.
//! An unchanged cluster (same resource) is left alone; a new or changed one is built aside as
//! *warming* and replaces the active cluster of that name only once it has initialized — a
//! STATIC cluster at once, a DNS cluster after its first resolution, an EDS cluster on its
//! first `ClusterLoadAssignment` (or its `initial_fetch_timeout`), and with `health_checks`
//! only after its first round of health checks — so the old one keeps serving meanwhile. Clusters absent from the set are removed (and their warming versions
//! dropped). During the server's initialization the warming targets register in
//! [`ClusterManager::cds_init`] (primary, then secondary), which the server waits on after the
//! first CDS response; afterwards each cluster warms on its own.
//!
//! The EDS subscription follows the set of EDS clusters (active and warming, static and
//! dynamic): [`EdsSource::subscribe`] gets every `service_name` (or cluster name) after each
//! change. [`ClusterManager::apply_eds`] stores an assignment and updates every cluster of
//! that service. This module validates nothing: the xDS handler translates resources first.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Cluster, ClusterManager, ResolvedEndpoint, lock};
use crate::config::cluster::{self as model, Discovery};
use crate::init;

/// One accepted EDS `ClusterLoadAssignment`: its hosts and `policy.overprovisioning_factor`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Assignment {
    pub endpoints: Vec<ResolvedEndpoint>,
    pub overprovisioning_factor: Option<u32>,
}

/// Where EDS clusters get their assignments from (the xDS client, through the proxy's
/// handler). Implementations must not call back into the cluster manager synchronously.
pub trait EdsSource: Send + Sync + 'static {
    /// Completes on the first assignment of `service`, on failure, or after `timeout`
    /// (`None`: never).
    fn first_assignment(
        &self,
        service: &str,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Future<Output = init::FetchOutcome> + Send>>;

    /// The EDS service names the cluster manager needs now.
    fn subscribe(&self, services: BTreeSet<String>);
}

/// The EDS service a cluster reads (`eds_cluster_config.service_name`, else its name).
pub fn eds_service(c: &model::Cluster) -> Option<String> {
    match &c.discovery {
        Discovery::Eds { service_name, .. } if service_name.is_empty() => Some(c.name.clone()),
        Discovery::Eds { service_name, .. } => Some(service_name.clone()),
        _ => None,
    }
}

impl ClusterManager {
    /// Sets where EDS clusters get their assignments; before any cluster is added.
    pub fn set_eds_source(&self, source: Arc<dyn EdsSource>) {
        if self.eds.set(source).is_err() {
            tracing::warn!("EDS source set twice; keeping the first");
        }
    }

    /// Whether a cluster of this name came from the bootstrap (CDS may not replace it).
    pub fn is_static(&self, name: &str) -> bool {
        self.get(name).is_some_and(|c| !c.added_via_api())
    }

    /// Every cluster name, active or warming (what routes may refer to).
    pub fn known_names(&self) -> std::collections::HashSet<String> {
        let mut names: std::collections::HashSet<String> =
            self.clusters.load().keys().cloned().collect();
        names.extend(lock(&self.warming).keys().cloned());
        names
    }

    /// Clusters waiting to replace (or join) the active ones, sorted by name.
    pub fn warming_clusters(&self) -> Vec<Arc<Cluster>> {
        let mut v: Vec<Arc<Cluster>> = lock(&self.warming).values().cloned().collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    /// Applies the complete set of CDS clusters (see the module documentation).
    pub fn apply_cds(self: &Arc<Self>, desired: Vec<model::Cluster>) {
        let writer = lock(&self.update);
        let wanted: BTreeSet<String> = desired.iter().map(|c| c.name.clone()).collect();
        let mut to_warm = Vec::new();
        for config in desired {
            let same = |c: &Arc<Cluster>| *c.config.source == *config.source;
            if let Some(w) = lock(&self.warming).get(&config.name) {
                if same(w) {
                    continue;
                }
            } else if self.get(&config.name).is_some_and(|c| same(&c)) {
                continue;
            }
            to_warm.push(Cluster::new(Arc::new(config), true));
        }
        // Removals: dynamic clusters no longer in the set, active or warming.
        lock(&self.warming).retain(|name, _| wanted.contains(name));
        let current = self.clusters.load_full();
        let removed: Vec<String> = current
            .values()
            .filter(|c| c.added_via_api() && !wanted.contains(c.name()))
            .map(|c| c.name().to_string())
            .collect();
        if !removed.is_empty() {
            let mut next = HashMap::clone(&current);
            for name in &removed {
                next.remove(name);
                self.cluster_removed.inc();
                tracing::info!(cluster = %name, "cluster removed (CDS)");
            }
            self.clusters.store(Arc::new(next));
        }
        for cluster in &to_warm {
            lock(&self.warming).insert(cluster.name().to_string(), cluster.clone());
            if let Some(service) = eds_service(&cluster.config)
                && let Some(a) = lock(&self.assignments).get(&service)
            {
                cluster.apply_assignment(a);
            }
        }
        drop(writer);
        self.update_eds_subscription();
        for cluster in to_warm {
            self.warm(cluster);
        }
    }

    /// Starts a warming cluster's initialization; [`Self::warmed`] swaps it in.
    fn warm(self: &Arc<Self>, cluster: Arc<Cluster>) {
        let name = cluster.name().to_string();
        tracing::info!(cluster = %name, discovery = cluster.config.discovery.name(), "cluster warming (CDS)");
        let weak_cm: Weak<ClusterManager> = Arc::downgrade(self);
        let eds = self.eds.get().cloned();
        let primary = cluster.config.discovery.is_primary();
        let target_name = format!("cluster {name} ({})", cluster.config.discovery.name());
        let start = move |ready: init::TargetHandle| {
            let own = init::Manager::new(format!("cluster {name} warming"));
            let c = cluster.clone();
            if let Err(e) = own.add_target(format!("cluster {name}"), move |h| c.initialize(h, eds))
            {
                tracing::warn!(error = %e, "cannot warm cluster");
            }
            // A TLS context naming SDS secrets keeps the cluster warming until they arrive.
            if let Some(tls) = cluster
                .config
                .tls
                .clone()
                .filter(|t| t.common.sds_refs().next().is_some())
            {
                let registered = own.add_target(format!("cluster {name} SDS secrets"), move |h| {
                    tokio::spawn(async move {
                        let ok = crate::tls::sds::wait_ready(tls).await;
                        tracing::info!(ready = ok, "cluster TLS secrets initial fetch ended");
                        h.ready();
                    });
                });
                if let Err(e) = registered {
                    tracing::warn!(error = %e, "cannot register the SDS init target");
                }
            }
            let warm = own.initialize();
            tokio::spawn(async move {
                warm.wait().await;
                // Envoy's cluster initialization (and so warming) includes the first round
                // of active health checks.
                let round = cluster.health_checker().map(|hc| hc.round_finished());
                if let Some(round) = round {
                    round.await;
                }
                if let Some(cm) = weak_cm.upgrade() {
                    cm.warmed(&cluster);
                }
                ready.ready();
                drop(own);
            });
        };
        let phase = if primary {
            &self.cds_init.primary
        } else {
            &self.cds_init.secondary
        };
        if phase.state() == init::State::Initialized {
            let standalone = init::Manager::new("cluster warming");
            let _ = standalone.add_target(target_name, start);
            standalone.initialize();
        } else if let Err(e) = phase.add_target(target_name, start) {
            tracing::warn!(error = %e, "cannot register cluster warming target");
        }
    }

    /// A warming cluster initialized: it replaces the active one, unless it was superseded or
    /// removed meanwhile.
    fn warmed(&self, cluster: &Arc<Cluster>) {
        let writer = lock(&self.update);
        {
            let mut warming = lock(&self.warming);
            match warming.get(cluster.name()) {
                Some(w) if Arc::ptr_eq(w, cluster) => {
                    warming.remove(cluster.name());
                }
                _ => return,
            }
        }
        let mut next = HashMap::clone(&self.clusters.load());
        let weak: Weak<dyn crate::stats::Source> =
            Arc::downgrade(cluster) as Weak<dyn crate::stats::Source>;
        self.store.register_weak(weak);
        if next
            .insert(cluster.name().to_string(), cluster.clone())
            .is_some()
        {
            self.cluster_modified.inc();
            tracing::info!(cluster = %cluster.name(), "cluster updated (CDS, warmed)");
        } else {
            self.cluster_added.inc();
            tracing::info!(cluster = %cluster.name(), "cluster added (CDS, warmed)");
        }
        self.clusters.store(Arc::new(next));
        drop(writer);
        // The replaced cluster's EDS service may no longer be needed.
        self.update_eds_subscription();
    }

    /// Applies one accepted `ClusterLoadAssignment` to every cluster of `service`.
    pub fn apply_eds(&self, service: &str, assignment: Assignment) {
        let _writer = lock(&self.update);
        for c in self.clusters.load().values() {
            if eds_service(&c.config).as_deref() == Some(service) {
                c.apply_assignment(&assignment);
                c.stats.update_success.inc();
            }
        }
        for c in lock(&self.warming).values() {
            if eds_service(&c.config).as_deref() == Some(service) {
                c.apply_assignment(&assignment);
            }
        }
        lock(&self.assignments).insert(service.to_string(), assignment);
    }

    /// Tells the EDS source the services of every EDS cluster, active and warming.
    pub fn update_eds_subscription(&self) {
        let Some(eds) = self.eds.get() else { return };
        let mut services: BTreeSet<String> = self
            .clusters
            .load()
            .values()
            .filter_map(|c| eds_service(&c.config))
            .collect();
        services.extend(
            lock(&self.warming)
                .values()
                .filter_map(|c| eds_service(&c.config)),
        );
        lock(&self.assignments).retain(|s, _| services.contains(s));
        eds.subscribe(services);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::{HealthStatus, Locality};
    use crate::stats::Store;
    use std::sync::Mutex;
    use tokio::sync::watch;

    /// EDS that answers when the test says so, and records subscriptions.
    #[derive(Default)]
    struct FakeEds {
        released: Mutex<Option<watch::Sender<bool>>>,
        subscribed: Mutex<Vec<BTreeSet<String>>>,
    }

    impl EdsSource for FakeEds {
        fn first_assignment(
            &self,
            _service: &str,
            _timeout: Option<Duration>,
        ) -> Pin<Box<dyn Future<Output = init::FetchOutcome> + Send>> {
            let mut rx = lock(&self.released)
                .get_or_insert_with(|| watch::channel(false).0)
                .subscribe();
            Box::pin(async move {
                let _ = rx.wait_for(|r| *r).await;
                init::FetchOutcome::Response
            })
        }

        fn subscribe(&self, services: BTreeSet<String>) {
            lock(&self.subscribed).push(services);
        }
    }

    fn eds(name: &str, service: &str, connect_ms: u64) -> model::Cluster {
        let mut source = cluster_pb();
        source.name = name.into();
        source.connect_timeout = Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 0,
            nanos: i32::try_from(connect_ms * 1_000_000).expect("small"),
        });
        model::Cluster {
            name: name.into(),
            discovery: Discovery::Eds {
                service_name: service.into(),
                initial_fetch_timeout: None,
            },
            connect_timeout: Duration::from_millis(connect_ms),
            dns_refresh_rate: Duration::from_secs(5),
            endpoints: Vec::new(),
            source: Arc::new(source),
            ..Default::default()
        }
    }

    fn cluster_pb() -> envoy_types::pb::envoy::config::cluster::v3::Cluster {
        Default::default()
    }

    fn assignment(addresses: &[&str]) -> Assignment {
        Assignment {
            endpoints: addresses.iter().map(|a| host(a)).collect(),
            overprovisioning_factor: None,
        }
    }

    fn host(address: &str) -> ResolvedEndpoint {
        ResolvedEndpoint {
            address: address.parse().expect("address"),
            hostname: String::new(),
            locality: Locality::default(),
            health: HealthStatus::Healthy,
            weight: 1,
            priority: 0,
        }
    }

    #[tokio::test]
    async fn a_changed_eds_cluster_replaces_the_active_one_only_once_it_has_endpoints() {
        let cm = ClusterManager::new(Store::new());
        let fake = Arc::new(FakeEds::default());
        cm.set_eds_source(fake.clone());
        // Past initialization: clusters warm on their own.
        cm.cds_init.primary.initialize().wait().await;
        cm.cds_init.secondary.initialize().wait().await;

        *lock(&fake.released) = Some(watch::channel(true).0);
        cm.apply_cds(vec![eds("web", "", 1000)]);
        cm.apply_eds("web", assignment(&["10.0.0.1:80"]));
        // First version: its assignment arrives (the fake answers at once now).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while cm.get("web").is_none() && tokio::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let first = cm.get("web").expect("web active");
        assert_eq!(first.host_set().hosts.len(), 1);

        // A changed web (service web-v2) waits for its assignment; the old one serves.
        *lock(&fake.released) = Some(watch::channel(false).0);
        cm.apply_cds(vec![eds("web", "web-v2", 2000)]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(cm.warming_clusters().len(), 1);
        assert!(Arc::ptr_eq(&cm.get("web").expect("web"), &first));
        assert_eq!(
            lock(&fake.subscribed).last().cloned(),
            Some(BTreeSet::from(["web".to_string(), "web-v2".to_string()]))
        );

        cm.apply_eds("web-v2", assignment(&["10.0.0.2:80"]));
        if let Some(tx) = lock(&fake.released).as_ref() {
            tx.send_replace(true);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !cm.warming_clusters().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = cm.get("web").expect("web");
        assert!(!Arc::ptr_eq(&second, &first));
        assert_eq!(
            second.host_set().hosts[0].address,
            "10.0.0.2:80".parse().expect("addr")
        );
        assert_eq!(
            lock(&fake.subscribed).last().cloned(),
            Some(BTreeSet::from(["web-v2".to_string()])),
            "EDS follows the clusters"
        );

        // Removal.
        cm.apply_cds(Vec::new());
        assert!(cm.get("web").is_none());
        assert_eq!(
            lock(&fake.subscribed).last().cloned(),
            Some(BTreeSet::new())
        );
    }
}
