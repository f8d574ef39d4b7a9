//! Envoy `Cluster` → [`Cluster`]: discovery type, endpoints, load balancing, upstream protocol.
//!
//! Pure translation with every problem collected; it resolves no names and opens no sockets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as pb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
};
use prost::{Message, Name};

use super::errors::{Errors, Path};
use super::{duration, supported};

/// Envoy's default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default `dns_refresh_rate`.
pub const DEFAULT_DNS_REFRESH_RATE: Duration = Duration::from_secs(5);
/// Envoy's default `initial_fetch_timeout`.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// An upstream cluster, as the cluster manager runs it. `Default` exists for tests and for
/// building one field at a time; a default cluster is an empty STATIC one.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub name: String,
    pub discovery: Discovery,
    pub connect_timeout: Duration,
    pub lb_policy: LbPolicy,
    pub protocol: UpstreamProtocol,
    pub dns_lookup_family: DnsLookupFamily,
    pub dns_refresh_rate: Duration,
    /// The inline `load_assignment` (STATIC, STRICT_DNS, LOGICAL_DNS).
    pub endpoints: Vec<Endpoint>,
    /// The resource as received, for `/config_dump`.
    pub source: Arc<pb::Cluster>,
}

/// How a cluster learns its hosts (Envoy's `Cluster.type`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Discovery {
    #[default]
    Static,
    StrictDns,
    LogicalDns,
    Eds {
        service_name: String,
        /// `None` waits forever (`initial_fetch_timeout: 0s`).
        initial_fetch_timeout: Option<Duration>,
    },
}

impl Discovery {
    /// Envoy's name for the type, as in `/clusters` and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Discovery::Static => "STATIC",
            Discovery::StrictDns => "STRICT_DNS",
            Discovery::LogicalDns => "LOGICAL_DNS",
            Discovery::Eds { .. } => "EDS",
        }
    }

    /// Primary clusters initialize in the first phase; EDS clusters in the secondary one.
    pub fn is_primary(&self) -> bool {
        !matches!(self, Discovery::Eds { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Power of `choice_count` choices (default 2).
    LeastRequest { choice_count: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DnsLookupFamily {
    #[default]
    Auto,
    V4Only,
    V6Only,
    V4Preferred,
    All,
}

/// One `lb_endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: EndpointAddress,
    pub hostname: String,
    pub health: HealthStatus,
    pub locality: Locality,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddress {
    Ip(SocketAddr),
    /// A name resolved by STRICT_DNS / LOGICAL_DNS clusters.
    Dns {
        host: String,
        port: u16,
    },
}

impl EndpointAddress {
    pub fn port(&self) -> u16 {
        match self {
            EndpointAddress::Ip(a) => a.port(),
            EndpointAddress::Dns { port, .. } => *port,
        }
    }
}

/// Envoy's `HealthStatus` as set by the management server (EDS) or the static assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    Unknown,
    Healthy,
    Unhealthy,
    Draining,
    Timeout,
}

impl HealthStatus {
    /// Whether the load balancer may pick a host with this status.
    pub fn is_routable(self) -> bool {
        matches!(self, HealthStatus::Unknown | HealthStatus::Healthy)
    }

    pub fn as_proto(self) -> core::HealthStatus {
        match self {
            HealthStatus::Unknown => core::HealthStatus::Unknown,
            HealthStatus::Healthy => core::HealthStatus::Healthy,
            HealthStatus::Unhealthy => core::HealthStatus::Unhealthy,
            HealthStatus::Draining => core::HealthStatus::Draining,
            HealthStatus::Timeout => core::HealthStatus::Timeout,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

/// Translates one cluster; `path` names it in errors.
#[allow(deprecated)] // Envoy still accepts the deprecated form; so do we.
pub fn translate(c: &pb::Cluster, path: &Path, errors: &mut Errors) -> Option<Cluster> {
    let before = errors.len();
    supported::check(c, path, errors);
    if c.name.is_empty() {
        errors.push(&path.field("name"), "required");
    }

    let discovery = discovery(c, path, errors);
    let connect_timeout = match &c.connect_timeout {
        Some(d) => match duration(d) {
            Some(d) if !d.is_zero() => d,
            _ => {
                errors.push(
                    &path.field("connect_timeout"),
                    "must be a positive duration",
                );
                DEFAULT_CONNECT_TIMEOUT
            }
        },
        None => DEFAULT_CONNECT_TIMEOUT,
    };
    let dns_refresh_rate = match &c.dns_refresh_rate {
        Some(d) => match duration(d) {
            Some(d) if d >= Duration::from_millis(1) => d,
            _ => {
                errors.push(&path.field("dns_refresh_rate"), "must be at least 1ms");
                DEFAULT_DNS_REFRESH_RATE
            }
        },
        None => DEFAULT_DNS_REFRESH_RATE,
    };
    let lb_policy = lb_policy(c, path, errors);
    let dns_lookup_family = match pb::cluster::DnsLookupFamily::try_from(c.dns_lookup_family) {
        Ok(pb::cluster::DnsLookupFamily::Auto) => DnsLookupFamily::Auto,
        Ok(pb::cluster::DnsLookupFamily::V4Only) => DnsLookupFamily::V4Only,
        Ok(pb::cluster::DnsLookupFamily::V6Only) => DnsLookupFamily::V6Only,
        Ok(pb::cluster::DnsLookupFamily::V4Preferred) => DnsLookupFamily::V4Preferred,
        Ok(pb::cluster::DnsLookupFamily::All) => DnsLookupFamily::All,
        Err(_) => {
            errors.push(
                &path.field("dns_lookup_family"),
                format!("unknown value {}", c.dns_lookup_family),
            );
            DnsLookupFamily::Auto
        }
    };
    let protocol = protocol(c, path, errors);

    let endpoints = match (&discovery, &c.load_assignment) {
        (Some(Discovery::Eds { .. }), Some(_)) => {
            errors.push(
                &path.field("load_assignment"),
                "EDS clusters receive their endpoints from EDS; remove the inline load_assignment",
            );
            Vec::new()
        }
        (Some(d), Some(la)) => load_assignment(la, d, &path.field("load_assignment"), errors),
        (Some(Discovery::Eds { .. }), None) | (None, _) => Vec::new(),
        (Some(_), None) => Vec::new(),
    };
    if let Some(Discovery::LogicalDns) = discovery
        && endpoints.len() != 1
    {
        errors.push(
            &path.field("load_assignment"),
            "LOGICAL_DNS clusters must have exactly one locality with exactly one lb_endpoint",
        );
    }

    if errors.len() > before {
        return None;
    }
    Some(Cluster {
        name: c.name.clone(),
        discovery: discovery?,
        connect_timeout,
        lb_policy,
        protocol,
        dns_lookup_family,
        dns_refresh_rate,
        endpoints,
        source: Arc::new(c.clone()),
    })
}

fn discovery(c: &pb::Cluster, path: &Path, errors: &mut Errors) -> Option<Discovery> {
    use pb::cluster::{ClusterDiscoveryType, DiscoveryType};
    const SUPPORTED: &[&str] = &["STATIC", "STRICT_DNS", "LOGICAL_DNS", "EDS"];
    let raw = match &c.cluster_discovery_type {
        None => DiscoveryType::Static as i32,
        Some(ClusterDiscoveryType::Type(t)) => *t,
        // Reported as an unsupported field by the supported-subset check.
        Some(ClusterDiscoveryType::ClusterType(_)) => return None,
    };
    let type_path = path.field("type");
    match DiscoveryType::try_from(raw) {
        Ok(DiscoveryType::Static) => Some(Discovery::Static),
        Ok(DiscoveryType::StrictDns) => Some(Discovery::StrictDns),
        Ok(DiscoveryType::LogicalDns) => Some(Discovery::LogicalDns),
        Ok(DiscoveryType::Eds) => {
            let eds_path = path.field("eds_cluster_config");
            let Some(eds) = &c.eds_cluster_config else {
                errors.push(&eds_path, "required for EDS clusters");
                return None;
            };
            let source_path = eds_path.field("eds_config");
            let Some(source) = &eds.eds_config else {
                errors.push(&source_path, "required");
                return None;
            };
            let initial_fetch_timeout =
                super::config_source(source, &source_path, errors).initial_fetch_timeout;
            Some(Discovery::Eds {
                service_name: eds.service_name.clone(),
                initial_fetch_timeout,
            })
        }
        Ok(other) => {
            errors.unsupported_value(&type_path, other.as_str_name(), SUPPORTED);
            None
        }
        Err(_) => {
            errors.push(&type_path, format!("unknown value {raw}"));
            None
        }
    }
}

fn lb_policy(c: &pb::Cluster, path: &Path, errors: &mut Errors) -> LbPolicy {
    use pb::cluster::LbConfig;
    let choice_count = match &c.lb_config {
        Some(LbConfig::LeastRequestLbConfig(cfg)) => cfg.choice_count.map(|v| v.value),
        _ => None,
    };
    match pb::cluster::LbPolicy::try_from(c.lb_policy) {
        Ok(pb::cluster::LbPolicy::RoundRobin) => {
            if choice_count.is_some() {
                errors.push(
                    &path.field("least_request_lb_config"),
                    "only valid with lb_policy LEAST_REQUEST",
                );
            }
            LbPolicy::RoundRobin
        }
        Ok(pb::cluster::LbPolicy::LeastRequest) => {
            let choice_count = choice_count.unwrap_or(2);
            if choice_count < 2 {
                errors.push(
                    &path.field("least_request_lb_config").field("choice_count"),
                    "must be at least 2",
                );
            }
            LbPolicy::LeastRequest { choice_count }
        }
        Ok(pb::cluster::LbPolicy::Random) => {
            if choice_count.is_some() {
                errors.push(
                    &path.field("least_request_lb_config"),
                    "only valid with lb_policy LEAST_REQUEST",
                );
            }
            LbPolicy::Random
        }
        Ok(other) => {
            errors.unsupported_value(
                &path.field("lb_policy"),
                other.as_str_name(),
                &["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"],
            );
            LbPolicy::RoundRobin
        }
        Err(_) => {
            errors.push(
                &path.field("lb_policy"),
                format!("unknown value {}", c.lb_policy),
            );
            LbPolicy::RoundRobin
        }
    }
}

/// `typed_extension_protocol_options`: only `HttpProtocolOptions` with an explicit HTTP/1.1 or
/// HTTP/2 choice.
fn protocol(c: &pb::Cluster, path: &Path, errors: &mut Errors) -> UpstreamProtocol {
    let options_path = path.field("typed_extension_protocol_options");
    let mut protocol = UpstreamProtocol::Http1;
    let mut keys: Vec<&String> = c.typed_extension_protocol_options.keys().collect();
    keys.sort();
    for key in keys {
        let any = &c.typed_extension_protocol_options[key];
        let entry_path = options_path.key(key);
        if any.type_url != HttpProtocolOptions::type_url() {
            errors.push(
                &entry_path,
                format!("unsupported protocol options {}", any.type_url),
            );
            continue;
        }
        let options = match HttpProtocolOptions::decode(any.value.as_slice()) {
            Ok(o) => o,
            Err(e) => {
                errors.push(&entry_path, format!("cannot decode: {e}"));
                continue;
            }
        };
        // Other choices are rejected field by field by the supported-subset check.
        if let Some(UpstreamProtocolOptions::ExplicitHttpConfig(explicit)) =
            options.upstream_protocol_options
        {
            match explicit.protocol_config {
                Some(ProtocolConfig::HttpProtocolOptions(_)) => protocol = UpstreamProtocol::Http1,
                Some(ProtocolConfig::Http2ProtocolOptions(_)) => protocol = UpstreamProtocol::Http2,
                // Reported as an unsupported field by the supported-subset check.
                Some(ProtocolConfig::Http3ProtocolOptions(_)) => {}
                None => errors.push(
                    &entry_path.field("explicit_http_config"),
                    "one of http_protocol_options, http2_protocol_options is required",
                ),
            }
        }
    }
    protocol
}

pub fn load_assignment(
    la: &endpoint::ClusterLoadAssignment,
    discovery: &Discovery,
    path: &Path,
    errors: &mut Errors,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (i, locality_endpoints) in la.endpoints.iter().enumerate() {
        let lpath = path.field("endpoints").index(i);
        if locality_endpoints.priority != 0 {
            errors.unsupported_value(
                &lpath.field("priority"),
                locality_endpoints.priority,
                &["0"],
            );
        }
        let locality = locality_endpoints
            .locality
            .as_ref()
            .map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
            })
            .unwrap_or_default();
        for (j, lb) in locality_endpoints.lb_endpoints.iter().enumerate() {
            let epath = lpath.field("lb_endpoints").index(j);
            if let Some(e) = lb_endpoint(lb, discovery, &epath, errors) {
                out.push(Endpoint {
                    locality: locality.clone(),
                    ..e
                });
            }
        }
    }
    out
}

/// One `LbEndpoint` (shared with EDS later: `discovery` says whether names are allowed).
pub fn lb_endpoint(
    lb: &endpoint::LbEndpoint,
    discovery: &Discovery,
    path: &Path,
    errors: &mut Errors,
) -> Option<Endpoint> {
    use endpoint::lb_endpoint::HostIdentifier;
    if let Some(w) = lb.load_balancing_weight
        && w.value != 1
    {
        errors.unsupported_value(
            &path.field("load_balancing_weight"),
            w.value,
            &["1 (weighted hosts are not implemented yet)"],
        );
    }
    let health = match core::HealthStatus::try_from(lb.health_status) {
        Ok(core::HealthStatus::Unknown) => HealthStatus::Unknown,
        Ok(core::HealthStatus::Healthy) => HealthStatus::Healthy,
        Ok(core::HealthStatus::Unhealthy) => HealthStatus::Unhealthy,
        Ok(core::HealthStatus::Draining) => HealthStatus::Draining,
        Ok(core::HealthStatus::Timeout) => HealthStatus::Timeout,
        Ok(core::HealthStatus::Degraded) => {
            errors.unsupported_value(
                &path.field("health_status"),
                "DEGRADED",
                &["UNKNOWN", "HEALTHY", "UNHEALTHY", "DRAINING", "TIMEOUT"],
            );
            HealthStatus::Unknown
        }
        Err(_) => {
            errors.push(
                &path.field("health_status"),
                format!("unknown value {}", lb.health_status),
            );
            HealthStatus::Unknown
        }
    };
    let endpoint = match &lb.host_identifier {
        Some(HostIdentifier::Endpoint(e)) => e,
        Some(HostIdentifier::EndpointName(_)) => {
            errors.push(&path.field("endpoint_name"), "unsupported field");
            return None;
        }
        None => {
            errors.push(&path.field("endpoint"), "required");
            return None;
        }
    };
    let apath = path.field("endpoint").field("address");
    let sa = endpoint
        .address
        .as_ref()
        .and_then(|a| socket_address(a, &apath, errors))?;
    let address = match sa.address.parse::<IpAddr>() {
        Ok(ip) => EndpointAddress::Ip(SocketAddr::new(ip, sa.port)),
        Err(_) if matches!(discovery, Discovery::StrictDns | Discovery::LogicalDns) => {
            EndpointAddress::Dns {
                host: sa.address.clone(),
                port: sa.port,
            }
        }
        Err(_) => {
            errors.push(
                &apath.field("socket_address").field("address"),
                format!(
                    "malformed IP address {:?} ({} clusters need IP addresses)",
                    sa.address,
                    discovery.name()
                ),
            );
            return None;
        }
    };
    Some(Endpoint {
        address,
        hostname: endpoint.hostname.clone(),
        health,
        locality: Locality::default(),
    })
}

/// A `SocketAddress` whose host may still be a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub address: String,
    pub port: u16,
}

/// Reads an `Address` that must be a TCP `socket_address` with a `port_value`.
pub fn socket_address(a: &core::Address, path: &Path, errors: &mut Errors) -> Option<HostPort> {
    use core::address::Address as Kind;
    use core::socket_address::PortSpecifier;
    let Some(Kind::SocketAddress(sa)) = &a.address else {
        errors.push(&path.field("socket_address"), "required");
        return None;
    };
    let sa_path = path.field("socket_address");
    if sa.protocol != core::socket_address::Protocol::Tcp as i32 {
        errors.unsupported_value(&sa_path.field("protocol"), "UDP", &["TCP"]);
    }
    if sa.address.is_empty() {
        errors.push(&sa_path.field("address"), "required");
        return None;
    }
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => match u16::try_from(p) {
            Ok(p) => p,
            Err(_) => {
                errors.push(
                    &sa_path.field("port_value"),
                    format!("{p} is not a TCP port"),
                );
                return None;
            }
        },
        _ => {
            errors.push(&sa_path.field("port_value"), "required");
            return None;
        }
    };
    Some(HostPort {
        address: sa.address.clone(),
        port,
    })
}

/// Reads an `Address` that must be an IP socket address (listeners, admin).
pub fn ip_socket_address(
    a: &core::Address,
    path: &Path,
    errors: &mut Errors,
) -> Option<SocketAddr> {
    let hp = socket_address(a, path, errors)?;
    match hp.address.parse::<IpAddr>() {
        Ok(ip) => Some(SocketAddr::new(ip, hp.port)),
        Err(_) => {
            errors.push(
                &path.field("socket_address").field("address"),
                format!("malformed IP address {:?}", hp.address),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(yaml: &str) -> Result<Cluster, Vec<String>> {
        let pb: pb::Cluster = capstan_proto::from_yaml(yaml).map_err(|e| vec![e.to_string()])?;
        let mut errors = Errors::new();
        let c = translate(&pb, &Path::new("cluster"), &mut errors);
        if errors.is_empty() {
            Ok(c.expect("no errors means a cluster"))
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    #[test]
    fn static_cluster_with_defaults() {
        let c = cluster(
            r#"
name: web
load_assignment:
  cluster_name: web
  endpoints:
  - lb_endpoints:
    - endpoint: { address: { socket_address: { address: 10.0.0.1, port_value: 8080 } } }
    - endpoint: { address: { socket_address: { address: "::1", port_value: 8081 } } }
      health_status: UNHEALTHY
"#,
        )
        .expect("valid");
        assert_eq!(c.discovery, Discovery::Static);
        assert_eq!(c.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.lb_policy, LbPolicy::RoundRobin);
        assert_eq!(c.protocol, UpstreamProtocol::Http1);
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(
            c.endpoints[0].address,
            EndpointAddress::Ip("10.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!(c.endpoints[1].health, HealthStatus::Unhealthy);
    }

    #[test]
    fn explicit_http2_and_least_request() {
        let c = cluster(
            r#"
name: grpc
type: STRICT_DNS
lb_policy: LEAST_REQUEST
least_request_lb_config: { choice_count: 3 }
connect_timeout: 0.25s
dns_lookup_family: V4_ONLY
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config: { http2_protocol_options: {} }
load_assignment:
  cluster_name: grpc
  endpoints:
  - lb_endpoints:
    - endpoint: { address: { socket_address: { address: backend.local, port_value: 50051 } } }
"#,
        )
        .expect("valid");
        assert_eq!(c.protocol, UpstreamProtocol::Http2);
        assert_eq!(c.lb_policy, LbPolicy::LeastRequest { choice_count: 3 });
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.dns_lookup_family, DnsLookupFamily::V4Only);
        assert_eq!(
            c.endpoints[0].address,
            EndpointAddress::Dns {
                host: "backend.local".into(),
                port: 50051
            }
        );
    }

    #[test]
    fn eds_cluster_reads_initial_fetch_timeout() {
        let c = cluster(
            r#"
name: reviews
type: EDS
eds_cluster_config:
  service_name: reviews.default
  eds_config: { ads: {}, resource_api_version: V3, initial_fetch_timeout: 0.5s }
"#,
        )
        .expect("valid");
        assert_eq!(
            c.discovery,
            Discovery::Eds {
                service_name: "reviews.default".into(),
                initial_fetch_timeout: Some(Duration::from_millis(500)),
            }
        );
        assert!(!c.discovery.is_primary());
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let errs = cluster(
            r#"
name: bad
type: ORIGINAL_DST
lb_policy: MAGLEV
connect_timeout: 0s
circuit_breakers: {}
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config: { http2_protocol_options: { max_concurrent_streams: 10 } }
"#,
        )
        .expect_err("invalid");
        let expected = [
            "cluster.circuit_breakers: unsupported field (circuit breakers are not implemented yet)",
            "cluster.typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"].explicit_http_config.http2_protocol_options.max_concurrent_streams: unsupported field",
            "cluster.type: unsupported value ORIGINAL_DST (supported: STATIC, STRICT_DNS, LOGICAL_DNS, EDS)",
            "cluster.connect_timeout: must be a positive duration",
            "cluster.lb_policy: unsupported value MAGLEV (supported: ROUND_ROBIN, LEAST_REQUEST, RANDOM)",
        ];
        for e in expected {
            assert!(errs.iter().any(|x| x == e), "missing {e:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    }

    #[test]
    fn static_clusters_need_ip_addresses_and_logical_dns_one_endpoint() {
        let errs = cluster(
            r#"
name: s
load_assignment:
  endpoints:
  - lb_endpoints:
    - endpoint: { address: { socket_address: { address: example.com, port_value: 80 } } }
"#,
        )
        .expect_err("invalid");
        assert_eq!(
            errs,
            vec![
                "cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: malformed IP address \"example.com\" (STATIC clusters need IP addresses)"
            ]
        );
        let errs = cluster(
            r#"
name: l
type: LOGICAL_DNS
load_assignment:
  endpoints:
  - lb_endpoints:
    - endpoint: { address: { socket_address: { address: a.example, port_value: 80 } } }
    - endpoint: { address: { socket_address: { address: b.example, port_value: 80 } } }
"#,
        )
        .expect_err("invalid");
        assert_eq!(
            errs,
            vec![
                "cluster.load_assignment: LOGICAL_DNS clusters must have exactly one locality with exactly one lb_endpoint"
            ]
        );
    }
}
