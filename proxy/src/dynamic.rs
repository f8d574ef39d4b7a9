//! Dynamic configuration: the proxy's [`XdsHandler`], which translates CDS, EDS, LDS and RDS
//! resources through the same translators as the bootstrap and applies them to the cluster
//! and listener managers.
//!
//! ```text
//!  XdsClient ─ on_sotw / on_delta ─► DynamicConfig ─ translate (config::*) ─┬─ Err → NACK,
//!                                        │                                  │  nothing changes
//!                                        │                                  └─ Ok  → apply:
//!   CDS → ClusterManager::apply_cds (cluster warming)   EDS → apply_eds (host sets)
//!   LDS → ListenerManager::apply_lds (listener warming) RDS → apply_rds (route swap)
//! ```
//!
//! Every response is validated completely before anything is applied, and every problem is
//! named with its resource (`Cluster outbound|80||x: health_checks: unsupported field …`), so
//! a NACKed update changes nothing. The handler also implements [`EdsSource`] and
//! [`RdsSource`] over the client: the managers tell it which EDS and RDS names they need, and
//! warming waits on the client's `resource_fetch`. It must not bind sockets or route requests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster_pb;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint_pb;
use envoy_types::pb::envoy::config::listener::v3 as listener_pb;
use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use crate::cluster::cds::{Assignment, EdsSource};
use crate::cluster::{ClusterManager, ResolvedEndpoint};
use crate::config::cluster::{self as cluster_cfg, Discovery, EndpointAddress};
use crate::config::errors::{Errors, Path};
use crate::config::listener::{self as listener_cfg, Listener};
use crate::config::route::{self, RouteContext};
use crate::config::supported;
use crate::init::{self, FetchOutcome};
use crate::listener::{ListenerManager, RdsSource};
use crate::stats::{Sample, Scope, Source};
use crate::xds::{
    CLUSTER_TYPE, ENDPOINT_TYPE, InitialFetch, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE,
    SubscriptionNames, XdsClient, XdsHandler,
};

/// Applies xDS updates to the proxy's managers.
pub struct DynamicConfig {
    clusters: Arc<ClusterManager>,
    listeners: Arc<ListenerManager>,
    server_init: init::Manager,
    client: OnceLock<XdsClient>,
    /// The accepted CDS clusters and LDS listeners, by name (a delta update changes these).
    cds: Mutex<BTreeMap<String, cluster_cfg::Cluster>>,
    lds: Mutex<BTreeMap<String, Listener>>,
    /// The accepted RDS route configurations as received, for `/config_dump`.
    routes: Mutex<BTreeMap<String, Any>>,
}

impl std::fmt::Debug for DynamicConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicConfig").finish_non_exhaustive()
    }
}

impl DynamicConfig {
    pub fn new(
        clusters: Arc<ClusterManager>,
        listeners: Arc<ListenerManager>,
        server_init: init::Manager,
    ) -> Arc<Self> {
        Arc::new(Self {
            clusters,
            listeners,
            server_init,
            client: OnceLock::new(),
            cds: Mutex::new(BTreeMap::new()),
            lds: Mutex::new(BTreeMap::new()),
            routes: Mutex::new(BTreeMap::new()),
        })
    }

    /// Connects the handler to its client (which was built with this handler).
    pub fn set_client(&self, client: XdsClient) {
        let sds = client.clone();
        if self.client.set(client).is_err() {
            tracing::warn!("xDS client set twice; keeping the first");
            return;
        }
        // SDS: the secret names the TLS contexts need (`crate::tls::sds`).
        crate::tls::sds::store().set_subscriber(Arc::new(move |names| {
            sds.subscribe(SECRET_TYPE, SubscriptionNames::Names(names));
        }));
    }

    /// SDS secrets: all are validated (a bad one NACKs the response, naming its field), then
    /// the TLS contexts using them are rebuilt.
    fn apply_secrets(&self, updated: Vec<(String, Any)>) -> Result<(), String> {
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
        let mut problems = Vec::new();
        let mut translated = Vec::new();
        for (name, any) in &updated {
            let mut errors = Errors::new();
            if let Some(mut s) = decode::<Secret>(any, &mut errors) {
                supported::check(&s, &Path::root(), &mut errors);
                if let Some(secret) = crate::config::tls::secret(&s, &Path::root(), &mut errors) {
                    crate::config::tls::redact(&mut s);
                    translated.push((name.clone(), secret, envoy_types::util::pack_any(s)));
                }
            }
            collect(&mut problems, "Secret", name, &errors);
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        crate::tls::sds::store().apply(translated);
        Ok(())
    }

    pub fn client(&self) -> Option<&XdsClient> {
        self.client.get()
    }

    /// The RDS route configurations in use, as received (for `/config_dump`).
    pub fn route_configs(&self) -> Vec<(String, Any)> {
        let used = self.listeners.rds_names();
        lock(&self.routes)
            .iter()
            .filter(|(n, _)| used.contains(*n))
            .map(|(n, a)| (n.clone(), a.clone()))
            .collect()
    }

    fn apply_clusters(
        &self,
        updated: Vec<(String, Any)>,
        removed: Vec<String>,
        complete: bool,
    ) -> Result<(), String> {
        let mut problems = Vec::new();
        let mut translated = Vec::new();
        for (name, any) in &updated {
            let mut errors = Errors::new();
            let decoded = decode::<cluster_pb::Cluster>(any, &mut errors);
            let c = decoded.and_then(|c| cluster_cfg::translate(&c, &Path::root(), &mut errors));
            if self.clusters.is_static(name) {
                errors.push(
                    &Path::new("name"),
                    "a static cluster of this name exists; CDS may not replace it",
                );
            }
            collect(&mut problems, "Cluster", name, &errors);
            translated.extend(c.filter(|_| errors.is_empty()));
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let desired = {
            let mut cds = lock(&self.cds);
            if complete {
                cds.clear();
            }
            for name in &removed {
                cds.remove(name);
            }
            for c in translated {
                cds.insert(c.name.clone(), c);
            }
            cds.values().cloned().collect()
        };
        self.clusters.apply_cds(desired);
        // Secrets only removed clusters used are unsubscribed.
        crate::tls::sds::store().update_subscription();
        Ok(())
    }

    fn apply_endpoints(
        &self,
        updated: Vec<(String, Any)>,
        removed: Vec<String>,
    ) -> Result<(), String> {
        let mut problems = Vec::new();
        let mut translated = Vec::new();
        for (name, any) in &updated {
            let mut errors = Errors::new();
            if let Some(cla) = decode::<endpoint_pb::ClusterLoadAssignment>(any, &mut errors) {
                let endpoints = assignment(&cla, &mut errors);
                let overprovisioning_factor =
                    cluster_cfg::overprovisioning_factor(&cla, &Path::root(), &mut errors);
                translated.push((
                    name.clone(),
                    Assignment {
                        endpoints,
                        overprovisioning_factor,
                    },
                ));
            }
            collect(&mut problems, "ClusterLoadAssignment", name, &errors);
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        for (name, a) in translated {
            self.clusters.apply_eds(&name, a);
        }
        for name in removed {
            self.clusters.apply_eds(&name, Assignment::default());
        }
        Ok(())
    }

    fn apply_listeners(
        &self,
        updated: Vec<(String, Any)>,
        removed: Vec<String>,
        complete: bool,
    ) -> Result<(), String> {
        let known = self.clusters.known_names();
        let statics: HashMap<String, std::net::SocketAddr> = self
            .listeners
            .listeners()
            .iter()
            .chain(self.listeners.warming_listeners().iter())
            .filter(|l| !l.added_via_api())
            .map(|l| (l.name().to_string(), l.config().address))
            .collect();
        let mut problems = Vec::new();
        let mut translated = Vec::new();
        for (name, any) in &updated {
            let mut errors = Errors::new();
            let l = decode::<listener_pb::Listener>(any, &mut errors)
                .and_then(|l| listener_cfg::translate(&l, &known, &Path::root(), &mut errors));
            if statics.contains_key(name) {
                errors.push(
                    &Path::new("name"),
                    "a static listener of this name exists; LDS may not replace it",
                );
            }
            collect(&mut problems, "Listener", name, &errors);
            translated.extend(l.filter(|_| errors.is_empty()));
        }
        let desired: Vec<Listener> = {
            let lds = lock(&self.lds);
            let mut next = if complete {
                BTreeMap::new()
            } else {
                lds.clone()
            };
            for name in &removed {
                next.remove(name);
            }
            for l in &translated {
                next.insert(l.name.clone(), l.clone());
            }
            next.into_values().collect()
        };
        // Two listeners may not share an address (port 0 means "any free port").
        let mut by_address: HashMap<std::net::SocketAddr, &str> =
            statics.iter().map(|(n, a)| (*a, n.as_str())).collect();
        for l in &desired {
            if l.address.port() == 0 {
                continue;
            }
            if let Some(other) = by_address.insert(l.address, &l.name) {
                problems.push(format!(
                    "Listener {}: address: listener {other:?} has the same address {}",
                    l.name, l.address
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        {
            let mut lds = lock(&self.lds);
            *lds = desired
                .iter()
                .map(|l| (l.name.clone(), l.clone()))
                .collect();
        }
        self.listeners.apply_lds(desired, &self.server_init);
        crate::tls::sds::store().update_subscription();
        Ok(())
    }

    fn apply_routes(&self, updated: Vec<(String, Any)>) -> Result<(), String> {
        let known = self.clusters.known_names();
        let mut problems = Vec::new();
        let mut translated = Vec::new();
        for (name, any) in &updated {
            let mut errors = Errors::new();
            if let Some(rc) = decode::<route_pb::RouteConfiguration>(any, &mut errors) {
                // Inline route configurations are checked with their listener; RDS ones here.
                supported::check(&rc, &Path::root(), &mut errors);
                let ctx = RouteContext {
                    known_clusters: Some(&known),
                    validate_clusters_default: false,
                };
                let rc = route::translate(&rc, &ctx, &Path::root(), &mut errors);
                translated.push((name.clone(), Arc::new(rc)));
            }
            collect(&mut problems, "RouteConfiguration", name, &errors);
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        {
            let mut routes = lock(&self.routes);
            for (name, any) in updated {
                routes.insert(name, any);
            }
            let used = self.listeners.rds_names();
            routes.retain(|n, _| used.contains(n) || translated.iter().any(|(t, _)| t == n));
        }
        for (name, rc) in translated {
            self.listeners.apply_rds(&name, rc);
        }
        Ok(())
    }
}

impl XdsHandler for DynamicConfig {
    fn on_sotw(
        &self,
        type_url: &str,
        _version: &str,
        resources: Vec<(String, Any)>,
    ) -> Result<(), String> {
        match type_url {
            CLUSTER_TYPE => self.apply_clusters(resources, Vec::new(), true),
            ENDPOINT_TYPE => self.apply_endpoints(resources, Vec::new()),
            LISTENER_TYPE => self.apply_listeners(resources, Vec::new(), true),
            ROUTE_TYPE => self.apply_routes(resources),
            SECRET_TYPE => self.apply_secrets(resources),
            other => Err(format!("unsupported resource type {other}")),
        }
    }

    fn on_delta(
        &self,
        type_url: &str,
        updated: Vec<(String, Any)>,
        removed: Vec<String>,
    ) -> Result<(), String> {
        match type_url {
            CLUSTER_TYPE => self.apply_clusters(updated, removed, false),
            ENDPOINT_TYPE => self.apply_endpoints(updated, removed),
            LISTENER_TYPE => self.apply_listeners(updated, removed, false),
            // A removed route configuration keeps serving until no listener uses it.
            ROUTE_TYPE => self.apply_routes(updated),
            // A removed secret keeps serving, as in Envoy.
            SECRET_TYPE => self.apply_secrets(updated),
            other => Err(format!("unsupported resource type {other}")),
        }
    }
}

fn outcome(f: InitialFetch) -> FetchOutcome {
    match f {
        InitialFetch::Applied => FetchOutcome::Response,
        InitialFetch::Rejected(m) | InitialFetch::Failed(m) => FetchOutcome::Failure(m),
        InitialFetch::TimedOut => FetchOutcome::Timeout,
    }
}

/// Waits on the client's `resource_fetch`; with no client nothing arrives but the timeout.
fn fetch(
    client: Option<XdsClient>,
    type_url: &str,
    name: &str,
    timeout: Option<Duration>,
) -> Pin<Box<dyn Future<Output = FetchOutcome> + Send>> {
    match client {
        Some(c) => {
            let f = c.resource_fetch(type_url, name, timeout);
            Box::pin(async move { outcome(f.await) })
        }
        None => Box::pin(init::initial_fetch(
            std::future::pending::<Result<(), String>>(),
            timeout,
        )),
    }
}

impl EdsSource for DynamicConfig {
    fn first_assignment(
        &self,
        service: &str,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Future<Output = FetchOutcome> + Send>> {
        fetch(self.client.get().cloned(), ENDPOINT_TYPE, service, timeout)
    }

    fn subscribe(&self, services: BTreeSet<String>) {
        if let Some(c) = self.client.get() {
            c.subscribe(ENDPOINT_TYPE, SubscriptionNames::Names(services));
        }
    }
}

impl RdsSource for DynamicConfig {
    fn first_route_config(
        &self,
        name: &str,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Future<Output = FetchOutcome> + Send>> {
        fetch(self.client.get().cloned(), ROUTE_TYPE, name, timeout)
    }

    fn subscribe(&self, names: BTreeSet<String>) {
        if let Some(c) = self.client.get() {
            c.subscribe(ROUTE_TYPE, SubscriptionNames::Names(names));
        }
    }
}

/// Reports the xDS client's stats (`control_plane.connected_state`, `cluster_manager.cds.*`,
/// `listener_manager.lds.*`, …) in `/stats`.
pub struct ClientStats(pub Weak<DynamicConfig>);

impl Source for ClientStats {
    fn collect(&self, out: &mut Vec<Sample>) {
        let Some(d) = self.0.upgrade() else { return };
        let Some(client) = d.client.get() else { return };
        for (name, value) in client.stats() {
            let (prefix, stat) = name.rsplit_once('.').unwrap_or(("xds", name.as_str()));
            let scope = Scope::fixed(prefix);
            if name == crate::xds::CONNECTED_STATE {
                scope.gauge(stat, i64::try_from(value).unwrap_or(i64::MAX), out);
            } else {
                scope.counter(stat, value, out);
            }
        }
    }
}

/// Decodes a packed resource of type `M`, naming a mismatch or malformed bytes.
fn decode<M: Message + Name + Default>(any: &Any, errors: &mut Errors) -> Option<M> {
    if any.type_url != M::type_url() {
        errors.push(
            &Path::root(),
            format!("expected {}, got {}", M::type_url(), any.type_url),
        );
        return None;
    }
    match M::decode(any.value.as_slice()) {
        Ok(m) => Some(m),
        Err(e) => {
            errors.push(&Path::root(), format!("cannot decode: {e}"));
            None
        }
    }
}

/// A `ClusterLoadAssignment` → the hosts of its clusters (IP endpoints only; hosts that are
/// UNHEALTHY, DRAINING or TIMEOUT are kept with that status and never picked).
pub fn assignment(
    cla: &endpoint_pb::ClusterLoadAssignment,
    errors: &mut Errors,
) -> Vec<ResolvedEndpoint> {
    supported::check(cla, &Path::root(), errors);
    let discovery = Discovery::Eds {
        service_name: cla.cluster_name.clone(),
        initial_fetch_timeout: None,
    };
    let la = endpoint_pb::ClusterLoadAssignment {
        cluster_name: cla.cluster_name.clone(),
        endpoints: cla.endpoints.clone(),
        ..Default::default()
    };
    cluster_cfg::load_assignment(&la, &discovery, &Path::root(), errors)
        .into_iter()
        .filter_map(|e| match e.address {
            EndpointAddress::Ip(address) => Some(ResolvedEndpoint {
                address,
                hostname: e.hostname,
                locality: e.locality,
                health: e.health,
                weight: e.weight,
                priority: e.priority,
            }),
            EndpointAddress::Dns { .. } => None,
        })
        .collect()
}

fn collect(problems: &mut Vec<String>, kind: &str, name: &str, errors: &Errors) {
    for e in errors.iter() {
        problems.push(format!("{kind} {name}: {e}"));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::HealthStatus;

    fn cla(yaml: &str) -> Result<Vec<ResolvedEndpoint>, Vec<String>> {
        let cla: endpoint_pb::ClusterLoadAssignment =
            capstan_proto::from_yaml(yaml).map_err(|e| vec![e.to_string()])?;
        let mut errors = Errors::new();
        let eps = assignment(&cla, &mut errors);
        if errors.is_empty() {
            Ok(eps)
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    #[test]
    fn an_assignment_becomes_hosts_with_locality_and_health() {
        let eps = cla(r#"
cluster_name: web
endpoints:
- locality: { zone: a }
  lb_endpoints:
  - endpoint: { address: { socket_address: { address: 10.0.0.1, port_value: 80 } } }
  - endpoint: { address: { socket_address: { address: 10.0.0.2, port_value: 80 } } }
    health_status: DRAINING
  - endpoint: { address: { socket_address: { address: 10.0.0.3, port_value: 80 } } }
    health_status: UNHEALTHY
"#)
        .expect("valid");
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[0].locality.zone, "a");
        assert!(eps[0].health.is_routable());
        assert_eq!(eps[1].health, HealthStatus::Draining);
        assert!(!eps[1].health.is_routable() && !eps[2].health.is_routable());
        let eps = cla(r#"
cluster_name: web
endpoints:
- priority: 2
  lb_endpoints:
  - endpoint: { address: { socket_address: { address: 10.0.0.1, port_value: 80 } } }
    load_balancing_weight: 7
"#)
        .expect("valid");
        assert_eq!((eps[0].weight, eps[0].priority), (7, 2));
    }

    #[test]
    fn unsupported_assignment_fields_are_named() {
        let errs = cla(r#"
cluster_name: web
endpoints:
- priority: 300
  lb_endpoints:
  - endpoint: { address: { socket_address: { address: web.local, port_value: 80 } } }
    load_balancing_weight: 0
"#)
        .expect_err("invalid");
        let expected = [
            "endpoints[0].priority: 300 is above the largest supported priority 127",
            "endpoints[0].lb_endpoints[0].load_balancing_weight: must be at least 1",
            "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: malformed IP address \"web.local\" (EDS clusters need IP addresses)",
        ];
        for e in expected {
            assert!(errs.iter().any(|x| x == e), "missing {e:?} in {errs:#?}");
        }
    }
}
