//! The translator: a pure function from a [`StoreSnapshot`] and the [`NodeInfo`] of the proxy
//! asking to the Envoy xDS v3 resources that proxy receives, plus the status of every
//! `ServiceRoute` and `ServicePolicy`.
//!
//! ```text
//! Services ─────► service ──┬─► cluster  CDS: outbound|<port>||<fqdn> (EDS), inbound|<port>|| (STATIC)
//! EndpointSlices ───────────┼─► endpoint EDS: one assignment per Service port, zones as localities
//! ServicePolicies ─► policy ┤   (which policy configures which port; conflicts)
//! ServiceRoutes ────────────┴─► route    RDS `outbound`: a virtual host per Service port, domains,
//!                                 └─ rule  precedence; one Envoy route per (rule, match); re2 guard
//! NodeInfo ─► node ─────────────► listener LDS: `outbound` 127.0.0.1:15001, `inbound` 0.0.0.0:15006
//! every problem found ──────────► status   Accepted / ResolvedRefs per ServiceRoute, ServicePolicy
//! ```
//!
//! What a proxy receives depends on its node only through the namespace (which Service a short
//! name like `web` means; GAMMA consumer routes) and the application ports (inbound listener).
//!
//! Statuses are an output, never a side effect, and a bad object never stops the rest from
//! being served: whatever Envoy would reject is left out and reported on the object. Output is
//! deterministic (sorted by name), so equal snapshots give byte-equal [`render_yaml`] output.
//!
//! Must not know about kube, tonic or where the snapshot came from; the xDS server packs the
//! resources and the status writer writes the statuses.

mod cluster;
mod endpoint;
mod listener;
mod node;
mod policy;
mod re2;
mod render;
mod route;
mod rule;
mod service;
mod status;
mod util;

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;

pub use node::NodeInfo;
pub use render::render_yaml;
pub use status::ObjectKind;

use crate::api::ObjectStatus;
use crate::store::{ObjectKey, StoreSnapshot};

/// Everything one proxy receives, and the statuses the snapshot's objects should carry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translation {
    /// CDS resources, sorted by name.
    pub clusters: Vec<Cluster>,
    /// EDS resources (one per EDS cluster), sorted by cluster name.
    pub endpoints: Vec<ClusterLoadAssignment>,
    /// LDS resources, sorted by name.
    pub listeners: Vec<Listener>,
    /// RDS resources, sorted by name.
    pub routes: Vec<RouteConfiguration>,
    /// `Accepted` and `ResolvedRefs` for every ServiceRoute and ServicePolicy.
    pub statuses: BTreeMap<(ObjectKind, ObjectKey), ObjectStatus>,
}

/// Translates a store snapshot into the resources of one proxy.
pub fn translate(snapshot: &StoreSnapshot, node: &NodeInfo) -> Translation {
    let mut statuses = status::Statuses::default();
    let services = service::Services::index(snapshot);
    let policies = policy::Policies::resolve(snapshot, &services, &mut statuses);

    let mut clusters = Vec::new();
    let mut endpoints = Vec::new();
    let mut policy_problems: BTreeMap<ObjectKey, Vec<String>> = BTreeMap::new();
    for svc in services.by_key.values() {
        for port in &svc.ports {
            let policy = policies.for_port(&svc.key, port.port);
            let mut problems = Vec::new();
            clusters.push(cluster::outbound(
                svc,
                port,
                policy.map(|(_, p)| p),
                &mut problems,
            ));
            if let Some((key, _)) = policy {
                policy_problems
                    .entry(key.clone())
                    .or_default()
                    .extend(problems);
            }
            endpoints.push(endpoint::assignment(snapshot, svc, port));
        }
    }
    for (key, problems) in policy_problems {
        for problem in problems {
            statuses.not_accepted(
                ObjectKind::ServicePolicy,
                &key,
                status::reason::INVALID,
                problem,
            );
        }
    }
    clusters.extend(node.app_ports.iter().map(|p| cluster::inbound(*p)));

    let routes = vec![route::outbound(
        snapshot,
        &services,
        &policies,
        node,
        &mut statuses,
    )];
    let listeners = listener::listeners(&node.app_ports);

    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    endpoints.sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
    Translation {
        clusters,
        endpoints,
        listeners,
        routes,
        statuses: statuses.finish(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ServicePolicy, ServiceRoute};
    use k8s_openapi::api::core::v1::Service;

    fn snapshot(services: &[&str], routes: &[&str], policies: &[&str]) -> StoreSnapshot {
        let key = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            ObjectKey::new(
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        };
        let mut s = StoreSnapshot::default();
        for y in services {
            let svc: Service = serde_saphyr::from_str(y).expect("service");
            s.services.insert(key(&svc.metadata), svc);
        }
        for y in routes {
            let r: ServiceRoute = serde_saphyr::from_str(y).expect("route");
            s.routes.insert(key(&r.metadata), r);
        }
        for y in policies {
            let p: ServicePolicy = serde_saphyr::from_str(y).expect("policy");
            s.policies.insert(key(&p.metadata), p);
        }
        s
    }

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{port: 80}]\n";

    fn condition(
        t: &Translation,
        kind: ObjectKind,
        name: &str,
        type_: &str,
    ) -> (String, String, String) {
        let status = &t.statuses[&(kind, ObjectKey::new("shop", name))];
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    /// Objects from an API server that skipped our CEL rules (or an older CRD) can still name
    /// other kinds; they are reported, not served, and the rest still is.
    #[test]
    fn references_to_other_kinds_are_invalid_kind() {
        let route = "apiVersion: capstan.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: gw, kind: Gateway, group: gateway.networking.k8s.io}, {name: web}]\n  rules:\n  - backendRefs: [{name: p, kind: Pod}]\n";
        let policy = "apiVersion: capstan.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  targetRef: {name: web, kind: Deployment, group: apps}\n";
        let t = translate(&snapshot(&[WEB], &[route], &[policy]), &NodeInfo::default());
        let (status, reason, message) = condition(&t, ObjectKind::ServiceRoute, "r", "Accepted");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidKind"));
        assert!(
            message.starts_with(
                "spec.parentRefs[0]: gateway.networking.k8s.io/Gateway is not a Service"
            ),
            "{message}"
        );
        let (status, reason, message) =
            condition(&t, ObjectKind::ServiceRoute, "r", "ResolvedRefs");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidKind"));
        assert!(
            message.starts_with("spec.rules[0].backendRefs[0]: /Pod is not a Service"),
            "{message}"
        );
        // Attached to shop/web through the second parentRef; its only backend is invalid.
        let vhost = &t.routes[0].virtual_hosts[0];
        assert_eq!(vhost.name, "web.shop.svc.cluster.local:80");
        assert!(matches!(
            vhost.routes[0].action,
            Some(envoy_types::pb::envoy::config::route::v3::route::Action::DirectResponse(ref d)) if d.status == 500
        ));
        let (status, reason, _) = condition(&t, ObjectKind::ServicePolicy, "p", "Accepted");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidKind"));
    }

    #[test]
    fn empty_snapshot_still_gets_an_outbound_listener_and_route_configuration() {
        let t = translate(&StoreSnapshot::default(), &NodeInfo::default());
        assert!(t.clusters.is_empty() && t.endpoints.is_empty() && t.statuses.is_empty());
        assert_eq!(
            t.listeners
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>(),
            vec!["outbound"]
        );
        assert_eq!(t.routes.len(), 1);
        assert!(t.routes[0].virtual_hosts.is_empty());
    }

    #[test]
    fn every_eds_cluster_has_an_assignment_and_every_route_cluster_exists() {
        use envoy_types::pb::envoy::config::route::v3::{
            route::Action, route_action::ClusterSpecifier,
        };
        let route = "apiVersion: capstan.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - backendRefs: [{name: web, weight: 1}, {name: api, port: 9090, weight: 1}]\n";
        let api = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  ports: [{port: 8080}, {port: 9090}]\n";
        let node = NodeInfo {
            app_ports: vec![8080],
            ..Default::default()
        };
        let t = translate(&snapshot(&[WEB, api], &[route], &[]), &node);
        let names: Vec<&str> = t.clusters.iter().map(|c| c.name.as_str()).collect();
        let eds: Vec<&str> = t
            .clusters
            .iter()
            .filter(|c| c.eds_cluster_config.is_some())
            .map(|c| c.name.as_str())
            .collect();
        let assigned: Vec<&str> = t
            .endpoints
            .iter()
            .map(|e| e.cluster_name.as_str())
            .collect();
        assert_eq!(eds, assigned);
        assert!(names.contains(&"inbound|8080||"));
        for vhost in &t.routes[0].virtual_hosts {
            for r in &vhost.routes {
                if let Some(Action::Route(a)) = &r.action {
                    let targets: Vec<String> = match &a.cluster_specifier {
                        Some(ClusterSpecifier::Cluster(c)) => vec![c.clone()],
                        Some(ClusterSpecifier::WeightedClusters(w)) => {
                            w.clusters.iter().map(|c| c.name.clone()).collect()
                        }
                        _ => vec![],
                    };
                    for c in targets {
                        assert!(names.contains(&c.as_str()), "{c} missing from CDS");
                    }
                }
            }
        }
    }
}
