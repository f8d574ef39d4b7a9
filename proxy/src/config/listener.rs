//! Envoy `Listener` → [`Listener`]: address, the one filter chain, and its HTTP connection
//! manager with an inline route configuration and the router filter.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::listener::v3 as pb;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use super::cluster::ip_socket_address;
use super::errors::{Errors, Path};
use super::route::{self, RouteConfig, RouteContext};
use super::supported;

/// The HTTP connection manager's extension name and type.
pub const HTTP_CONNECTION_MANAGER: &str = "envoy.filters.network.http_connection_manager";
/// The router filter's extension name.
pub const ROUTER: &str = "envoy.filters.http.router";

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// Prefix of this listener's `listener.<prefix>.*` stats: `stat_prefix` or the address.
    pub stat_prefix: String,
    pub filter_chain: FilterChain,
    /// The resource as received, for `/config_dump`.
    pub source: Arc<pb::Listener>,
}

#[derive(Debug, Clone)]
pub struct FilterChain {
    pub name: String,
    /// The terminal network filter (the only filter supported today).
    pub filter: NetworkFilter,
}

#[derive(Debug, Clone)]
pub enum NetworkFilter {
    HttpConnectionManager(Arc<HttpConnectionManager>),
}

#[derive(Debug, Clone)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    pub codec: Codec,
    pub route: RouteSpecifier,
    pub server_name: String,
    pub server_header_transformation: ServerHeaderTransformation,
    pub generate_request_id: bool,
    pub strip_port: StripPort,
    /// The router filter's `suppress_envoy_headers`.
    pub suppress_envoy_headers: bool,
    /// `upgrade_configs`: (lower-case upgrade type, enabled). Only `websocket` is supported.
    pub upgrades: Vec<(String, bool)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// HTTP/1.1 or h2c, detected from the connection preface.
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone)]
pub enum RouteSpecifier {
    /// An inline `route_config`.
    Static(Arc<RouteConfig>),
    /// `rds`: the route configuration named `route_config_name`, over ADS. The listener warms
    /// until it arrives (or `initial_fetch_timeout` passes).
    Rds {
        route_config_name: String,
        /// `None`: wait forever.
        initial_fetch_timeout: Option<std::time::Duration>,
    },
}

impl HttpConnectionManager {
    /// The RDS route configuration this connection manager uses, if any.
    pub fn rds_name(&self) -> Option<&str> {
        match &self.route {
            RouteSpecifier::Rds {
                route_config_name, ..
            } => Some(route_config_name),
            RouteSpecifier::Static(_) => None,
        }
    }
}

impl Listener {
    /// The RDS route configuration names this listener's filter chain waits for.
    pub fn rds_names(&self) -> Vec<String> {
        let NetworkFilter::HttpConnectionManager(h) = &self.filter_chain.filter;
        h.rds_name().map(str::to_string).into_iter().collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerHeaderTransformation {
    Overwrite,
    AppendIfAbsent,
    PassThrough,
}

/// Which port the HTTP connection manager strips from `Host` before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripPort {
    None,
    /// `strip_matching_host_port`: only the listener's own port.
    Matching,
    /// `strip_any_host_port`.
    Any,
}

/// Envoy's default `server_name`.
pub const DEFAULT_SERVER_NAME: &str = "envoy";

pub fn translate(
    l: &pb::Listener,
    known_clusters: &HashSet<String>,
    path: &Path,
    errors: &mut Errors,
) -> Option<Listener> {
    let before = errors.len();
    supported::check(l, path, errors);
    let apath = path.field("address");
    let address = match &l.address {
        Some(a) => ip_socket_address(a, &apath, errors),
        None => {
            errors.push(&apath, "required");
            None
        }
    };
    let fpath = path.field("filter_chains");
    let filter_chain = match l.filter_chains.as_slice() {
        [] => {
            errors.push(&fpath, "exactly one filter chain is required");
            None
        }
        [fc] => filter_chain(fc, known_clusters, &fpath.index(0), errors),
        [_, rest @ ..] => {
            errors.push(
                &fpath.index(rest.len()),
                "only one filter chain is supported (filter chain matching is not implemented yet)",
            );
            None
        }
    };
    if errors.len() > before {
        return None;
    }
    let address = address?;
    let stat_prefix = if l.stat_prefix.is_empty() {
        address.to_string().replace(':', "_")
    } else {
        l.stat_prefix.clone()
    };
    Some(Listener {
        name: if l.name.is_empty() {
            address.to_string()
        } else {
            l.name.clone()
        },
        address,
        stat_prefix,
        filter_chain: filter_chain?,
        source: Arc::new(l.clone()),
    })
}

fn filter_chain(
    fc: &pb::FilterChain,
    known_clusters: &HashSet<String>,
    path: &Path,
    errors: &mut Errors,
) -> Option<FilterChain> {
    let fpath = path.field("filters");
    let [filter] = fc.filters.as_slice() else {
        errors.push(
            &fpath,
            "exactly one network filter (envoy.filters.network.http_connection_manager) is required",
        );
        return None;
    };
    let fpath = fpath.index(0);
    let tpath = fpath.field("typed_config");
    let any = match &filter.config_type {
        Some(pb::filter::ConfigType::TypedConfig(any)) => any,
        // Reported as an unsupported field by the supported-subset check.
        Some(_) => return None,
        None => {
            errors.push(&tpath, format!("required (name {:?})", filter.name));
            return None;
        }
    };
    if any.type_url != hcm::HttpConnectionManager::type_url() {
        errors.push(&tpath, format!("unsupported filter {}", any.type_url));
        return None;
    }
    let config = decode::<hcm::HttpConnectionManager>(any, &tpath, errors)?;
    let manager = http_connection_manager(&config, known_clusters, &tpath, errors)?;
    Some(FilterChain {
        name: fc.name.clone(),
        filter: NetworkFilter::HttpConnectionManager(Arc::new(manager)),
    })
}

fn decode<M: Message + Default>(any: &Any, path: &Path, errors: &mut Errors) -> Option<M> {
    match M::decode(any.value.as_slice()) {
        Ok(m) => Some(m),
        Err(e) => {
            errors.push(path, format!("cannot decode {}: {e}", any.type_url));
            None
        }
    }
}

fn http_connection_manager(
    c: &hcm::HttpConnectionManager,
    known_clusters: &HashSet<String>,
    path: &Path,
    errors: &mut Errors,
) -> Option<HttpConnectionManager> {
    use hcm::http_connection_manager::{
        CodecType, RouteSpecifier as R, ServerHeaderTransformation as S, StripPortMode,
    };
    if c.stat_prefix.is_empty() {
        errors.push(&path.field("stat_prefix"), "required");
    }
    let codec = match CodecType::try_from(c.codec_type) {
        Ok(CodecType::Auto) => Codec::Auto,
        Ok(CodecType::Http1) => Codec::Http1,
        Ok(CodecType::Http2) => Codec::Http2,
        Ok(other) => {
            errors.unsupported_value(
                &path.field("codec_type"),
                other.as_str_name(),
                &["AUTO", "HTTP1", "HTTP2"],
            );
            Codec::Auto
        }
        Err(_) => {
            errors.push(
                &path.field("codec_type"),
                format!("unknown value {}", c.codec_type),
            );
            Codec::Auto
        }
    };
    let server_header_transformation = match S::try_from(c.server_header_transformation) {
        Ok(S::Overwrite) => ServerHeaderTransformation::Overwrite,
        Ok(S::AppendIfAbsent) => ServerHeaderTransformation::AppendIfAbsent,
        Ok(S::PassThrough) => ServerHeaderTransformation::PassThrough,
        Err(_) => {
            errors.push(
                &path.field("server_header_transformation"),
                format!("unknown value {}", c.server_header_transformation),
            );
            ServerHeaderTransformation::Overwrite
        }
    };
    let strip_any = matches!(
        c.strip_port_mode,
        Some(StripPortMode::StripAnyHostPort(true))
    );
    if strip_any && c.strip_matching_host_port {
        errors.push(
            &path.field("strip_any_host_port"),
            "cannot be combined with strip_matching_host_port",
        );
    }
    let strip_port = if strip_any {
        StripPort::Any
    } else if c.strip_matching_host_port {
        StripPort::Matching
    } else {
        StripPort::None
    };
    let suppress_envoy_headers = router_filter(c, &path.field("http_filters"), errors);
    let mut upgrades = Vec::new();
    for (i, u) in c.upgrade_configs.iter().enumerate() {
        let upath = path.field("upgrade_configs").index(i);
        let kind = u.upgrade_type.to_ascii_lowercase();
        if kind != "websocket" {
            errors.push(
                &upath.field("upgrade_type"),
                format!(
                    "unsupported upgrade type {:?} (only websocket is supported)",
                    u.upgrade_type
                ),
            );
            continue;
        }
        if upgrades.iter().any(|(k, _)| *k == kind) {
            errors.push(
                &upath.field("upgrade_type"),
                format!("duplicate upgrade {kind}"),
            );
            continue;
        }
        upgrades.push((kind, u.enabled.as_ref().is_none_or(|e| e.value)));
    }
    let rpath = path.field("route_config");
    let route = match &c.route_specifier {
        Some(R::RouteConfig(rc)) => Some(RouteSpecifier::Static(Arc::new(route::translate(
            rc,
            &RouteContext {
                known_clusters: Some(known_clusters),
                validate_clusters_default: true,
            },
            &rpath,
            errors,
        )))),
        Some(R::Rds(rds)) => {
            let path = path.field("rds");
            if rds.route_config_name.is_empty() {
                errors.push(&path.field("route_config_name"), "required");
            }
            let spath = path.field("config_source");
            let source = match &rds.config_source {
                Some(s) => Some(super::config_source(s, &spath, errors)),
                None => {
                    errors.push(&spath, "required");
                    None
                }
            };
            source.map(|s| RouteSpecifier::Rds {
                route_config_name: rds.route_config_name.clone(),
                initial_fetch_timeout: s.initial_fetch_timeout,
            })
        }
        // Reported as unsupported fields by the supported-subset check.
        Some(_) => None,
        None => {
            errors.push(&rpath, "one of route_config, rds is required");
            None
        }
    };
    Some(HttpConnectionManager {
        stat_prefix: c.stat_prefix.clone(),
        codec,
        route: route?,
        server_name: if c.server_name.is_empty() {
            DEFAULT_SERVER_NAME.to_string()
        } else {
            c.server_name.clone()
        },
        server_header_transformation,
        generate_request_id: c.generate_request_id.map(|v| v.value).unwrap_or(true),
        strip_port,
        suppress_envoy_headers,
        upgrades,
    })
}

/// The HTTP filter chain must be the router alone (or empty, which Envoy reads as the router).
/// Returns the router's `suppress_envoy_headers`.
fn router_filter(c: &hcm::HttpConnectionManager, path: &Path, errors: &mut Errors) -> bool {
    use hcm::http_filter::ConfigType;
    let mut suppress = false;
    for (i, f) in c.http_filters.iter().enumerate() {
        let fpath = path.index(i);
        let last = i + 1 == c.http_filters.len();
        match &f.config_type {
            Some(ConfigType::TypedConfig(any)) if any.type_url == Router::type_url() => {
                if let Some(r) = decode::<Router>(any, &fpath.field("typed_config"), errors) {
                    suppress = r.suppress_envoy_headers;
                }
            }
            Some(ConfigType::TypedConfig(any)) => {
                errors.push(
                    &fpath.field("typed_config"),
                    format!("unsupported HTTP filter {}", any.type_url),
                );
                continue;
            }
            // Reported as an unsupported field by the supported-subset check.
            Some(ConfigType::ConfigDiscovery(_)) => continue,
            None if f.name == ROUTER => {}
            None => {
                errors.push(
                    &fpath.field("typed_config"),
                    format!("required (name {:?})", f.name),
                );
                continue;
            }
        }
        if !last {
            errors.push(&fpath, "the router must be the last HTTP filter");
        }
    }
    suppress
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(yaml: &str) -> Result<Listener, Vec<String>> {
        let pb: pb::Listener = capstan_proto::from_yaml(yaml).map_err(|e| vec![e.to_string()])?;
        let known: HashSet<String> = ["web".to_string()].into();
        let mut errors = Errors::new();
        let l = translate(&pb, &known, &Path::new("listener"), &mut errors);
        if errors.is_empty() {
            Ok(l.expect("no errors means a listener"))
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

    #[test]
    fn http_listener_with_inline_routes() {
        let l = listener(&format!(
            r#"
name: out
address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15001 }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": {HCM}
      stat_prefix: outbound
      strip_matching_host_port: true
      http_filters:
      - name: envoy.filters.http.router
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          suppress_envoy_headers: true
      route_config:
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes: [{{ match: {{ prefix: / }}, route: {{ cluster: web }} }}]
"#
        ))
        .expect("valid");
        assert_eq!(l.stat_prefix, "127.0.0.1_15001");
        let NetworkFilter::HttpConnectionManager(h) = &l.filter_chain.filter;
        assert_eq!(h.stat_prefix, "outbound");
        assert_eq!(h.strip_port, StripPort::Matching);
        assert!(h.suppress_envoy_headers);
        assert!(h.generate_request_id);
        assert_eq!(h.server_name, "envoy");
    }

    #[test]
    fn websocket_is_the_only_upgrade_type() {
        let hcm = |upgrades: &str| {
            format!(
                r#"
name: out
address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15001 }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": {HCM}
      stat_prefix: outbound
      upgrade_configs: {upgrades}
      http_filters:
      - name: envoy.filters.http.router
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
      route_config:
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes: [{{ match: {{ prefix: / }}, route: {{ cluster: web }} }}]
"#
            )
        };
        let l = listener(&hcm("[{ upgrade_type: WebSocket }]")).expect("valid");
        let NetworkFilter::HttpConnectionManager(h) = &l.filter_chain.filter;
        assert_eq!(h.upgrades, vec![("websocket".to_string(), true)]);
        let errs = listener(&hcm(
            "[{ upgrade_type: websocket, enabled: false }, { upgrade_type: CONNECT }]",
        ))
        .expect_err("invalid");
        assert_eq!(
            errs,
            vec![
                "listener.filter_chains[0].filters[0].typed_config.upgrade_configs[1].upgrade_type: unsupported upgrade type \"CONNECT\" (only websocket is supported)"
                    .to_string()
            ]
        );
    }

    #[test]
    fn unsupported_filters_are_named_and_rds_is_accepted() {
        let errs = listener(&format!(
            r#"
name: out
address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15001 }} }}
listener_filters: [{{ name: envoy.filters.listener.tls_inspector }}]
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": {HCM}
      stat_prefix: outbound
      codec_type: HTTP3
      rds: {{ route_config_name: r, config_source: {{ ads: {{}}, initial_fetch_timeout: 3s }} }}
      http_filters:
      - name: envoy.filters.http.cors
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
      - name: envoy.filters.http.router
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
        ))
        .expect_err("invalid");
        let expected = [
            "listener.listener_filters: unsupported field (listener filters are not implemented yet)",
            "listener.filter_chains[0].filters[0].typed_config.codec_type: unsupported value HTTP3 (supported: AUTO, HTTP1, HTTP2)",
            "listener.filter_chains[0].filters[0].typed_config.http_filters[0]: the router must be the last HTTP filter",
        ];
        for e in expected {
            assert!(errs.iter().any(|x| x == e), "missing {e:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    }

    #[test]
    fn tcp_proxy_is_named_as_unsupported() {
        let errs = listener(
            r#"
name: tcp
address: { socket_address: { address: 0.0.0.0, port_value: 9000 } }
filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: tcp
      cluster: web
"#,
        )
        .expect_err("invalid");
        assert_eq!(
            errs,
            vec![
                "listener.filter_chains[0].filters[0].typed_config: unsupported filter type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
            ]
        );
    }
}
