//! The bootstrap's `dynamic_resources` → [`Dynamic`]: where the ADS stream goes and which
//! types (CDS, LDS) come from it.
//!
//! Only ADS is implemented: `ads_config` with `api_type` `GRPC` (state of the world) or
//! `DELTA_GRPC` (delta) and one `envoy_grpc` service naming a STATIC cluster of
//! `static_resources`, whose first endpoint is the control plane (plaintext HTTP/2); and
//! `cds_config` / `lds_config` of `ads: {}`. Every other config source is an error naming the
//! field. `set_node_on_first_message_only` is accepted with either value: the xDS client
//! always sends the node on the first request of each stream only, which every `xds_protocol`
//! server must accept. Pure: it resolves no names and opens no sockets.

use std::time::Duration;

use envoy_types::pb::envoy::config::bootstrap::v3 as pb;
use envoy_types::pb::envoy::config::core::v3 as core;

use super::cluster::{Cluster, Discovery, EndpointAddress};
use super::errors::{Errors, Path};
use super::{ConfigSource, config_source};

/// Which ADS variant (`api_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsApi {
    /// `GRPC`: `StreamAggregatedResources`.
    Sotw,
    /// `DELTA_GRPC`: `DeltaAggregatedResources`.
    Delta,
}

/// The ADS stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ads {
    pub api: AdsApi,
    /// The control plane as a URI, `http://ip:port`.
    pub endpoint: String,
    /// The STATIC cluster it came from (empty with `--xds-address`).
    pub cluster_name: String,
}

/// A translated `dynamic_resources`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dynamic {
    pub ads: Ads,
    /// `cds_config`, when clusters come from CDS.
    pub cds: Option<ConfigSource>,
    /// `lds_config`, when listeners come from LDS.
    pub lds: Option<ConfigSource>,
}

impl Dynamic {
    /// What `--xds-address URL` means without a bootstrap: ADS state of the world, CDS and
    /// LDS over it, Envoy's default `initial_fetch_timeout`.
    pub fn from_address(endpoint: &str) -> Self {
        let source = ConfigSource {
            initial_fetch_timeout: Some(super::cluster::DEFAULT_INITIAL_FETCH_TIMEOUT),
        };
        Self {
            ads: Ads {
                api: AdsApi::Sotw,
                endpoint: endpoint.to_string(),
                cluster_name: String::new(),
            },
            cds: Some(source),
            lds: Some(source),
        }
    }
}

/// Translates `dynamic_resources`; `clusters` are the translated static clusters (the ADS
/// cluster must be one of them). Unsupported fields were already reported by the
/// supported-subset check.
pub fn translate(
    d: &pb::bootstrap::DynamicResources,
    clusters: &[Cluster],
    path: &Path,
    errors: &mut Errors,
) -> Option<Dynamic> {
    let before = errors.len();
    let cds = d
        .cds_config
        .as_ref()
        .map(|s| config_source(s, &path.field("cds_config"), errors));
    let lds = d
        .lds_config
        .as_ref()
        .map(|s| config_source(s, &path.field("lds_config"), errors));
    let apath = path.field("ads_config");
    let ads = match &d.ads_config {
        Some(a) => ads(a, clusters, &apath, errors),
        None => {
            if cds.is_some() || lds.is_some() {
                errors.push(
                    &apath,
                    "required: cds_config and lds_config use ads: {}, which needs ads_config",
                );
            }
            None
        }
    };
    if errors.len() > before {
        return None;
    }
    Some(Dynamic {
        ads: ads?,
        cds,
        lds,
    })
}

#[allow(deprecated)] // V2 is named only to reject it.
fn ads(
    a: &core::ApiConfigSource,
    clusters: &[Cluster],
    path: &Path,
    errors: &mut Errors,
) -> Option<Ads> {
    use core::api_config_source::ApiType;
    let api = match ApiType::try_from(a.api_type) {
        Ok(ApiType::Grpc) => Some(AdsApi::Sotw),
        Ok(ApiType::DeltaGrpc) => Some(AdsApi::Delta),
        Ok(other) => {
            errors.unsupported_value(
                &path.field("api_type"),
                other.as_str_name(),
                &["GRPC", "DELTA_GRPC"],
            );
            None
        }
        Err(_) => {
            errors.push(
                &path.field("api_type"),
                format!("unknown value {}", a.api_type),
            );
            None
        }
    };
    if a.transport_api_version == core::ApiVersion::V2 as i32 {
        errors.unsupported_value(&path.field("transport_api_version"), "V2", &["V3", "AUTO"]);
    }
    let gpath = path.field("grpc_services");
    let cluster_name = match a.grpc_services.as_slice() {
        [] => {
            errors.push(&gpath, "exactly one grpc_service is required");
            None
        }
        [g] => {
            use core::grpc_service::TargetSpecifier;
            match &g.target_specifier {
                Some(TargetSpecifier::EnvoyGrpc(e)) => Some(e.cluster_name.clone()),
                // google_grpc is reported as an unsupported field.
                Some(TargetSpecifier::GoogleGrpc(_)) => None,
                None => {
                    errors.push(&gpath.index(0).field("envoy_grpc"), "required");
                    None
                }
            }
        }
        [_, rest @ ..] => {
            errors.push(
                &gpath.index(rest.len()),
                "only one grpc_service is supported (failover is not implemented)",
            );
            None
        }
    };
    let cpath = gpath.index(0).field("envoy_grpc").field("cluster_name");
    let endpoint = cluster_name.as_ref().and_then(|name| {
        let Some(c) = clusters.iter().find(|c| &c.name == name) else {
            errors.push(
                &cpath,
                format!(
                    "unknown cluster {name:?} (it must be a STATIC cluster of static_resources)"
                ),
            );
            return None;
        };
        if c.discovery != Discovery::Static {
            errors.push(
                &cpath,
                format!(
                    "cluster {name:?} is {}; the xDS cluster must be STATIC",
                    c.discovery.name()
                ),
            );
            return None;
        }
        match c.endpoints.first().map(|e| &e.address) {
            Some(EndpointAddress::Ip(a)) => Some(format!("http://{a}")),
            _ => {
                errors.push(
                    &cpath,
                    format!("cluster {name:?} has no endpoint to reach the control plane at"),
                );
                None
            }
        }
    });
    Some(Ads {
        api: api?,
        endpoint: endpoint?,
        cluster_name: cluster_name?,
    })
}

/// `initial_fetch_timeout` as the xDS client takes it (`None`: forever).
pub fn fetch_timeout(s: Option<ConfigSource>) -> Option<Duration> {
    s.and_then(|s| s.initial_fetch_timeout)
}

#[cfg(test)]
mod tests {
    use crate::config::translate_bootstrap;

    fn errors(yaml: &str) -> Vec<String> {
        let pb = capstan_proto::from_yaml(yaml).expect("parses");
        match translate_bootstrap(&pb) {
            Ok(_) => Vec::new(),
            Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    const XDS_CLUSTER: &str = r#"
static_resources:
  clusters:
  - name: xds
    type: STATIC
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 18000 } } }
"#;

    #[test]
    fn ads_bootstrap_names_the_control_plane_by_its_static_cluster() {
        let yaml = format!(
            "{XDS_CLUSTER}dynamic_resources:\n  ads_config: {{ api_type: DELTA_GRPC, grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}] }}\n  cds_config: {{ ads: {{}}, initial_fetch_timeout: 0s }}\n  lds_config: {{ ads: {{}}, initial_fetch_timeout: 2s }}\n"
        );
        let pb = capstan_proto::from_yaml(&yaml).expect("parses");
        let b = translate_bootstrap(&pb).expect("valid");
        let d = b.dynamic.expect("dynamic");
        assert_eq!(d.ads.endpoint, "http://127.0.0.1:18000");
        assert_eq!(d.ads.api, super::AdsApi::Delta);
        assert_eq!(d.cds.and_then(|c| c.initial_fetch_timeout), None);
        assert_eq!(
            d.lds.and_then(|c| c.initial_fetch_timeout),
            Some(std::time::Duration::from_secs(2))
        );
    }

    #[test]
    fn the_quickstart_envoy_bootstrap_is_accepted_unchanged() {
        let text = include_str!("../../../examples/envoy/quickstart-bootstrap.yaml");
        let pb = capstan_proto::from_yaml(text).expect("parses");
        let b = translate_bootstrap(&pb).expect("valid for capstan-proxy too");
        let d = b.dynamic.expect("dynamic");
        assert_eq!(d.ads.endpoint, "http://127.0.0.1:18000");
        assert_eq!(d.ads.api, super::AdsApi::Sotw);
        assert!(d.cds.is_some() && d.lds.is_some());
    }

    #[test]
    fn unsupported_config_sources_are_named() {
        let errs = errors(&format!(
            "{XDS_CLUSTER}dynamic_resources:\n  ads_config: {{ api_type: REST, grpc_services: [{{ envoy_grpc: {{ cluster_name: nope }} }}] }}\n  cds_config: {{ api_config_source: {{ api_type: GRPC }} }}\n  lds_config: {{ path_config_source: {{ path: /x }} }}\n"
        ));
        let expected = [
            "dynamic_resources.cds_config.api_config_source: unsupported field (only ADS config sources (ads: {}) are supported)",
            "dynamic_resources.lds_config.path_config_source: unsupported field (only ADS config sources (ads: {}) are supported)",
            "dynamic_resources.ads_config.api_type: unsupported value REST (supported: GRPC, DELTA_GRPC)",
            "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name: unknown cluster \"nope\" (it must be a STATIC cluster of static_resources)",
        ];
        for e in expected {
            assert!(errs.iter().any(|x| x == e), "missing {e:?} in {errs:#?}");
        }
    }
}
