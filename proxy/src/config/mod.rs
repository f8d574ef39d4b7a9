//! The proxy's own configuration model, and its translation from Envoy's protos.
//!
//! Envoy resources (from the bootstrap, and from xDS through `crate::dynamic`) are translated here into plain,
//! immutable Rust types that the rest of the proxy runs on; regexes are compiled and header
//! names validated once. Translation is where "never silently ignore a field that changes
//! behaviour" is enforced: [`supported`] rejects every field outside the implemented subset,
//! the typed translators reject unsupported values, and every problem is collected with its
//! path ([`errors`]) so a single run names all of them.
//!
//! This module does no I/O and starts nothing; it must not depend on the runtime modules.

pub mod circuit_breaker;
pub mod cluster;
pub mod dynamic;
pub mod errors;
pub mod health_check;
pub mod listener;
pub mod local_ratelimit;
pub mod outlier;
pub mod pool;
pub mod route;
pub mod supported;
pub mod tls;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::bootstrap::v3 as pb;
use envoy_types::pb::envoy::config::core::v3 as core;

pub use cluster::Cluster;
pub use errors::{ConfigError, Errors, Path};
pub use listener::Listener;

/// The admin address when the bootstrap has no `admin` (sidecar default).
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:15000";

/// A translated bootstrap.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub node: Node,
    pub admin_address: SocketAddr,
    pub clusters: Vec<Cluster>,
    pub listeners: Vec<Listener>,
    /// `dynamic_resources` (or `--xds-address`): the ADS stream, CDS and LDS.
    pub dynamic: Option<dynamic::Dynamic>,
    /// The bootstrap as read (with the node as overridden by flags), for `/config_dump`.
    pub source: Arc<pb::Bootstrap>,
}

/// The proxy's identity towards the control plane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub cluster: String,
}

/// The part of a `ConfigSource` the proxy acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSource {
    /// `None`: wait forever (`initial_fetch_timeout: 0s`).
    pub initial_fetch_timeout: Option<Duration>,
}

/// Translates a whole bootstrap, reporting every problem at once.
pub fn translate_bootstrap(b: &pb::Bootstrap) -> Result<Bootstrap, ConfigError> {
    let mut errors = Errors::new();
    let root = Path::root();
    // Fields of the bootstrap itself; nested resources are checked by their translators, so
    // the walk stops at the resource lists.
    let shallow = pb::Bootstrap {
        static_resources: b
            .static_resources
            .as_ref()
            .map(|s| pb::bootstrap::StaticResources {
                listeners: Vec::new(),
                clusters: Vec::new(),
                ..s.clone()
            }),
        ..b.clone()
    };
    supported::check(&shallow, &root, &mut errors);

    let admin_address = match b.admin.as_ref().and_then(|a| a.address.as_ref()) {
        Some(a) => {
            cluster::ip_socket_address(a, &root.field("admin").field("address"), &mut errors)
        }
        None => DEFAULT_ADMIN_ADDRESS.parse().ok(),
    };

    let statics = b.static_resources.clone().unwrap_or_default();
    let spath = root.field("static_resources");
    let mut clusters = Vec::with_capacity(statics.clusters.len());
    let mut names = HashSet::new();
    for (i, c) in statics.clusters.iter().enumerate() {
        let cpath = spath.field("clusters").index(i);
        if !c.name.is_empty() && !names.insert(c.name.clone()) {
            errors.push(
                &cpath.field("name"),
                format!("duplicate cluster {:?}", c.name),
            );
        }
        if let Some(c) = cluster::translate(c, &cpath, &mut errors) {
            clusters.push(c);
        }
    }

    let mut listeners: Vec<Listener> = Vec::with_capacity(statics.listeners.len());
    for (i, l) in statics.listeners.iter().enumerate() {
        let lpath = spath.field("listeners").index(i);
        if let Some(l) = listener::translate(l, &names, &lpath, &mut errors) {
            if listeners.iter().any(|o| o.name == l.name) {
                errors.push(
                    &lpath.field("name"),
                    format!("duplicate listener {:?}", l.name),
                );
            } else if let Some(o) = listeners
                .iter()
                .find(|o| o.address == l.address && l.address.port() != 0)
            {
                errors.push(
                    &lpath.field("address"),
                    format!("listener {:?} has the same address {}", o.name, l.address),
                );
            }
            listeners.push(l);
        }
    }

    let dynamic = b.dynamic_resources.as_ref().and_then(|d| {
        dynamic::translate(d, &clusters, &root.field("dynamic_resources"), &mut errors)
    });
    if b.dynamic_resources.is_none() {
        // RDS and EDS arrive over ADS; without it they could never be satisfied.
        for (i, l) in listeners.iter().enumerate() {
            if !l.rds_names().is_empty() {
                errors.push(
                    &spath.field("listeners").index(i),
                    "its HTTP connection manager uses rds, which needs dynamic_resources.ads_config",
                );
            }
        }
    }

    let node = b
        .node
        .as_ref()
        .map(|n| Node {
            id: n.id.clone(),
            cluster: n.cluster.clone(),
        })
        .unwrap_or_default();
    let admin_address = admin_address.unwrap_or_else(|| {
        // Only reached with an error recorded for the admin address.
        SocketAddr::from(([127, 0, 0, 1], 15000))
    });
    errors.into_result(Bootstrap {
        node,
        admin_address,
        clusters,
        listeners,
        dynamic,
        source: Arc::new(b.clone()),
    })
}

/// A `ConfigSource` the proxy can subscribe with (ADS only, for now).
#[allow(deprecated)] // Envoy still accepts the deprecated form; so do we.
pub fn config_source(s: &core::ConfigSource, path: &Path, errors: &mut Errors) -> ConfigSource {
    use core::config_source::ConfigSourceSpecifier as S;
    match &s.config_source_specifier {
        Some(S::Ads(_)) => {}
        // Reported as unsupported fields by the supported-subset check.
        Some(_) => {}
        None => errors.push(path, "one of ads is required"),
    }
    if s.resource_api_version == core::ApiVersion::V2 as i32 {
        errors.unsupported_value(&path.field("resource_api_version"), "V2", &["V3", "AUTO"]);
    }
    let initial_fetch_timeout = match &s.initial_fetch_timeout {
        None => Some(cluster::DEFAULT_INITIAL_FETCH_TIMEOUT),
        Some(d) => match duration(d) {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => {
                errors.push(&path.field("initial_fetch_timeout"), "must not be negative");
                None
            }
        },
    };
    ConfigSource {
        initial_fetch_timeout,
    }
}

/// A protobuf duration, `None` when negative.
pub fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap(yaml: &str) -> Result<Bootstrap, Vec<String>> {
        let pb: pb::Bootstrap = capstan_proto::from_yaml(yaml).map_err(|e| vec![e.to_string()])?;
        translate_bootstrap(&pb).map_err(|e| e.errors.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn minimal_bootstrap_uses_sidecar_defaults() {
        let b = bootstrap("node: { id: a.b, cluster: c }\n").expect("valid");
        assert_eq!(b.admin_address.to_string(), DEFAULT_ADMIN_ADDRESS);
        assert_eq!(b.node.id, "a.b");
        assert!(b.clusters.is_empty() && b.listeners.is_empty());
    }

    #[test]
    fn every_unsupported_field_in_a_bootstrap_is_reported_at_once() {
        let errs = bootstrap(
            r#"
dynamic_resources: { lds_config: { ads: {} } }
layered_runtime: {}
admin: { address: { socket_address: { address: localhost, port_value: 15000 } } }
static_resources:
  clusters:
  - { name: a, type: STATIC }
  - { name: a, type: ORIGINAL_DST, lb_policy: CLUSTER_PROVIDED }
  listeners:
  - name: l
    address: { socket_address: { address: 127.0.0.1, port_value: 1 } }
    filter_chains:
    - filters:
      - name: x
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: a
          access_log: [{ name: x }]
"#,
        )
        .expect_err("invalid");
        let expected = [
            "dynamic_resources.ads_config: required: cds_config and lds_config use ads: {}, which needs ads_config",
            "layered_runtime: unsupported field",
            "admin.address.socket_address.address: malformed IP address \"localhost\"",
            "static_resources.clusters[1].name: duplicate cluster \"a\"",
            "static_resources.clusters[1].type: unsupported value ORIGINAL_DST (supported: STATIC, STRICT_DNS, LOGICAL_DNS, EDS)",
            "static_resources.clusters[1].lb_policy: unsupported value CLUSTER_PROVIDED (supported: ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV)",
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.access_log: unsupported field (access logs are not implemented yet)",
        ];
        for e in expected {
            assert!(errs.iter().any(|x| x == e), "missing {e:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    }

    #[test]
    fn duplicate_listener_addresses_are_rejected() {
        let listener = |name: &str| {
            format!(
                r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 8080 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: s
          route_config: {{ virtual_hosts: [] }}
"#
            )
        };
        let errs = bootstrap(&format!(
            "static_resources:\n  listeners:{}{}",
            listener("a"),
            listener("b")
        ))
        .expect_err("invalid");
        assert_eq!(
            errs,
            vec![
                "static_resources.listeners[1].address: listener \"a\" has the same address 127.0.0.1:8080"
            ]
        );
    }
}
