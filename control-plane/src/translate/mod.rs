//! The translator: a pure function from a [`StoreSnapshot`] and the [`NodeInfo`] of the proxy
//! asking to the Envoy xDS v3 resources that proxy receives, plus the status of every
//! `ServiceRoute` and `ServicePolicy`.
//!
//! ```text
//! Services ─────► service ──┬─► cluster  CDS: outbound|<port>||<fqdn> (EDS), inbound|<port>|| (STATIC)
//! EndpointSlices ───────────┼─► endpoint EDS: one assignment per Service port, zones as localities
//! ServicePolicies ─► policy ┤   (which policy configures which port; conflicts)
//! Secrets ─► secret ────────┤   SDS: kubernetes://<ns>/<name>[/ca.crt] for spec.tls.*Secret
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
mod secret;
mod service;
mod status;
mod util;

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;

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
    /// SDS resources (the Secrets clusters reference), sorted by name.
    pub secrets: Vec<Secret>,
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
    let mut secret_refs = secret::SecretRefs::new(snapshot);
    for svc in services.by_key.values() {
        for port in &svc.ports {
            let policy = policies.for_port(&svc.key, port.port);
            let mut problems = Vec::new();
            clusters.push(cluster::outbound(
                svc,
                port,
                policy.map(|(_, p)| p),
                &mut problems,
                &mut secret_refs,
            ));
            let unresolved = std::mem::take(&mut secret_refs.unresolved);
            if let Some((key, _)) = policy {
                policy_problems
                    .entry(key.clone())
                    .or_default()
                    .extend(problems);
                for (reason, message) in unresolved {
                    statuses.unresolved(ObjectKind::ServicePolicy, key, reason, message);
                }
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
        secrets: secret_refs.resources.into_values().collect(),
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

    mod tls_secrets {
        use super::*;
        use crate::store::{Diagnostic, TlsSecret};
        use envoy_types::pb::envoy::config::core::v3::{
            AggregatedConfigSource, ApiVersion, ConfigSource, DataSource, config_source,
            data_source, transport_socket,
        };
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
            CertificateValidationContext, CommonTlsContext, SdsSecretConfig, TlsCertificate,
            UpstreamTlsContext, common_tls_context, secret,
        };
        use prost::Message;

        const MUTUAL: &str = "apiVersion: capstan.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  targetRef: {name: web}\n  tls:\n    mode: Mutual\n    subjectAltNames: [web.shop.svc]\n    caCertificateSecret: {name: ca}\n    clientCertificateSecret: {name: client}\n";

        fn tls_secret(ca: Option<&str>, crt: Option<&str>, key: Option<&str>) -> TlsSecret {
            let b = |v: Option<&str>| v.map(|t| t.as_bytes().to_vec());
            TlsSecret {
                ca_crt: b(ca),
                tls_crt: b(crt),
                tls_key: b(key),
            }
        }

        fn with_secrets(secrets: &[(&str, TlsSecret)]) -> StoreSnapshot {
            let mut s = snapshot(&[WEB], &[], &[MUTUAL]);
            for (name, secret) in secrets {
                s.secrets
                    .insert(ObjectKey::new("shop", *name), secret.clone());
            }
            s
        }

        fn upstream_tls(t: &Translation) -> UpstreamTlsContext {
            let c = t
                .clusters
                .iter()
                .find(|c| c.name == "outbound|80||web.shop.svc.cluster.local")
                .expect("cluster");
            let Some(transport_socket::ConfigType::TypedConfig(any)) = &c
                .transport_socket
                .as_ref()
                .expect("transport socket")
                .config_type
            else {
                panic!("typed config expected")
            };
            assert_eq!(
                any.type_url,
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
            );
            UpstreamTlsContext::decode(any.value.as_slice()).expect("decodes")
        }

        fn sds(name: &str) -> SdsSecretConfig {
            SdsSecretConfig {
                name: name.to_string(),
                sds_config: Some(ConfigSource {
                    resource_api_version: ApiVersion::V3 as i32,
                    config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                        AggregatedConfigSource {},
                    )),
                    ..Default::default()
                }),
            }
        }

        fn bytes(v: &str) -> Option<DataSource> {
            Some(DataSource {
                specifier: Some(data_source::Specifier::InlineBytes(v.as_bytes().to_vec())),
                ..Default::default()
            })
        }

        #[test]
        fn secret_references_become_sds_configs_and_secrets_are_served() {
            let t = translate(
                &with_secrets(&[
                    ("ca", tls_secret(Some("CA PEM"), None, None)),
                    ("client", tls_secret(None, Some("CRT PEM"), Some("KEY PEM"))),
                ]),
                &NodeInfo::default(),
            );
            let expected = UpstreamTlsContext {
                common_tls_context: Some(CommonTlsContext {
                    tls_certificate_sds_secret_configs: vec![sds("kubernetes://shop/client")],
                    validation_context_type: Some(
                        common_tls_context::ValidationContextType::CombinedValidationContext(
                            common_tls_context::CombinedCertificateValidationContext {
                                default_validation_context: Some(CertificateValidationContext {
                                    match_typed_subject_alt_names: vec![
                                        super::super::cluster::san_matcher_for_tests(
                                            "web.shop.svc",
                                        ),
                                    ],
                                    ..Default::default()
                                }),
                                validation_context_sds_secret_config: Some(sds(
                                    "kubernetes://shop/ca/ca.crt",
                                )),
                                ..Default::default()
                            },
                        ),
                    ),
                    ..Default::default()
                }),
                sni: "web.shop.svc.cluster.local".to_string(),
                ..Default::default()
            };
            assert_eq!(upstream_tls(&t), expected);
            assert_eq!(
                t.secrets,
                vec![
                    Secret {
                        name: "kubernetes://shop/ca/ca.crt".into(),
                        r#type: Some(secret::Type::ValidationContext(
                            CertificateValidationContext {
                                trusted_ca: bytes("CA PEM"),
                                ..Default::default()
                            }
                        )),
                    },
                    Secret {
                        name: "kubernetes://shop/client".into(),
                        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                            certificate_chain: bytes("CRT PEM"),
                            private_key: bytes("KEY PEM"),
                            ..Default::default()
                        })),
                    },
                ]
            );
            assert_eq!(
                condition(&t, ObjectKind::ServicePolicy, "p", "ResolvedRefs").0,
                "True"
            );
            let yaml = render_yaml(&t);
            assert!(yaml.contains("kubernetes://shop/client"), "{yaml}");
            assert!(
                !yaml.contains(&base64_of("KEY PEM")) && yaml.contains("[redacted: 7 bytes]"),
                "private keys are redacted: {yaml}"
            );
        }

        fn base64_of(v: &str) -> String {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(v)
        }

        #[test]
        fn a_ca_secret_without_sans_is_a_plain_sds_validation_context() {
            let policy = MUTUAL
                .replace("    subjectAltNames: [web.shop.svc]\n", "")
                .replace("mode: Mutual", "mode: Simple");
            let mut s = snapshot(&[WEB], &[], &[&policy]);
            s.secrets.insert(
                ObjectKey::new("shop", "ca"),
                tls_secret(Some("CA PEM"), Some("C"), Some("K")),
            );
            let t = translate(&s, &NodeInfo::default());
            let common = upstream_tls(&t).common_tls_context.expect("common");
            assert_eq!(
                common.validation_context_type,
                Some(
                    common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                        sds("kubernetes://shop/ca/ca.crt")
                    )
                )
            );
            assert!(common.tls_certificate_sds_secret_configs.is_empty());
            assert_eq!(
                t.secrets.len(),
                1,
                "Simple mode serves no client certificate"
            );
        }

        #[test]
        fn missing_or_incomplete_secrets_fail_closed_and_say_why() {
            let t = translate(
                &with_secrets(&[("client", tls_secret(Some("CA only"), None, None))]),
                &NodeInfo::default(),
            );
            // Still referenced: the proxy waits for them instead of skipping verification.
            let common = upstream_tls(&t).common_tls_context.expect("common");
            assert_eq!(
                common.tls_certificate_sds_secret_configs,
                vec![sds("kubernetes://shop/client")]
            );
            assert!(common.validation_context_type.is_some());
            assert!(t.secrets.is_empty(), "{:?}", t.secrets);
            let (status, reason, message) =
                condition(&t, ObjectKind::ServicePolicy, "p", "ResolvedRefs");
            assert_eq!(
                (status.as_str(), reason.as_str()),
                ("False", "InvalidCACertificateRef")
            );
            assert_eq!(
                message,
                "spec.tls.caCertificateSecret: Secret shop/ca not found; \
                 spec.tls.clientCertificateSecret: Secret shop/client has no tls.crt and tls.key"
            );
            assert_eq!(
                condition(&t, ObjectKind::ServicePolicy, "p", "Accepted").0,
                "True"
            );
        }

        #[test]
        fn a_missing_secret_names_the_switch_when_secrets_are_not_watched() {
            let mut s = with_secrets(&[]);
            s.secrets_unwatched = true;
            let t = translate(&s, &NodeInfo::default());
            let (_, _, message) = condition(&t, ObjectKind::ServicePolicy, "p", "ResolvedRefs");
            assert!(
                message.starts_with(
                    "spec.tls.caCertificateSecret: Secret shop/ca cannot be read: the control plane does not watch Secrets (--watch-secrets"
                ),
                "{message}"
            );
        }

        #[test]
        fn a_rejected_update_keeps_serving_the_last_valid_secret_and_is_reported() {
            let mut s = with_secrets(&[
                ("ca", tls_secret(Some("CA PEM"), None, None)),
                ("client", tls_secret(None, Some("CRT PEM"), Some("KEY PEM"))),
            ]);
            s.diagnostics.push(Diagnostic {
                source: "kubernetes".into(),
                object: Some("Secret shop/client".into()),
                message: "tls.key: no PEM private key (PKCS#8, RSA or EC); keeping its last valid version".into(),
            });
            let t = translate(&s, &NodeInfo::default());
            assert_eq!(t.secrets.len(), 2, "last valid version still served");
            let (status, reason, message) =
                condition(&t, ObjectKind::ServicePolicy, "p", "ResolvedRefs");
            assert_eq!(
                (status.as_str(), reason.as_str()),
                ("False", "InvalidCertificateRef")
            );
            assert_eq!(
                message,
                "spec.tls.clientCertificateSecret: Secret shop/client is invalid: tls.key: no PEM private key (PKCS#8, RSA or EC); keeping its last valid version"
            );
        }
    }
}
