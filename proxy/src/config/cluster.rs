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
    /// `common_lb_config.healthy_panic_threshold` and the inline load assignment's
    /// `policy.overprovisioning_factor`.
    pub lb_settings: LbSettings,
    pub protocol: UpstreamProtocol,
    pub dns_lookup_family: DnsLookupFamily,
    pub dns_refresh_rate: Duration,
    /// The inline `load_assignment` (STATIC, STRICT_DNS, LOGICAL_DNS).
    pub endpoints: Vec<Endpoint>,
    /// `health_checks`: active health checking (`cluster::health_check`).
    pub health_checks: Vec<super::health_check::HealthCheck>,
    /// `circuit_breakers` (Envoy's defaults when absent).
    pub circuit_breakers: super::circuit_breaker::CircuitBreakers,
    /// `outlier_detection`: `None` means no detector, as in Envoy.
    pub outlier_detection: Option<super::outlier::OutlierDetection>,
    /// Connection pool settings (idle timeout, requests and duration per connection, keepalive).
    pub pool: super::pool::PoolOptions,
    /// `transport_socket` `envoy.transport_sockets.tls`: `None` connects in plaintext.
    pub tls: Option<Arc<super::tls::UpstreamTls>>,
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

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum LbPolicy {
    /// Round robin; weighted (EDF) when host weights differ.
    #[default]
    RoundRobin,
    /// Uniformly at random (Envoy's random balancer ignores host weights).
    Random,
    /// Power of `choice_count` choices (default 2) when weights are equal; EDF over
    /// `weight / (active + 1)^active_request_bias` (default bias 1.0) when they differ.
    LeastRequest {
        choice_count: u32,
        active_request_bias: f64,
    },
    /// Ketama ring hash over xxHash64 (`ring_hash_lb_config`).
    RingHash {
        minimum_ring_size: u64,
        maximum_ring_size: u64,
    },
    /// Maglev (`maglev_lb_config`); `table_size` is prime.
    Maglev { table_size: u64 },
}

impl LbPolicy {
    /// Whether the policy picks by the request's hash (route `hash_policy`).
    pub fn uses_hash(&self) -> bool {
        matches!(self, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. })
    }
}

/// Envoy's default `ring_hash_lb_config.minimum_ring_size`.
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;
/// Envoy's default (and largest) `ring_hash_lb_config.maximum_ring_size`.
pub const DEFAULT_MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's largest `maglev_lb_config.table_size`.
pub const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;
/// The largest `LocalityLbEndpoints.priority` accepted (Envoy has no limit; each level costs
/// memory, and meshes use a handful).
pub const MAX_PRIORITY: u32 = 127;

/// Load-balancing settings besides the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbSettings {
    /// Percent; 0 disables panic mode (Envoy's default 50).
    pub healthy_panic_threshold: u32,
    /// Percent (Envoy's default 140).
    pub overprovisioning_factor: u32,
    /// `common_lb_config.locality_weighted_lb_config` is set.
    pub locality_weighted: bool,
}

impl Default for LbSettings {
    fn default() -> Self {
        Self {
            healthy_panic_threshold: 50,
            overprovisioning_factor: 140,
            locality_weighted: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
    /// `auto_config`: HTTP/2 or HTTP/1.1 as the TLS handshake's ALPN decides (TLS only).
    Auto,
    /// `use_downstream_protocol_config`: the protocol of each request's downstream connection.
    UseDownstream,
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
    /// `load_balancing_weight` (1 when unset).
    pub weight: u32,
    /// The `priority` of its `LocalityLbEndpoints`.
    pub priority: u32,
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
    /// `LocalityLbEndpoints.load_balancing_weight`; 0 when unset (such a locality gets no load
    /// under locality-weighted balancing, as in Envoy; ignored otherwise).
    pub weight: u32,
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
    let mut lb_settings = lb_settings(c, path, errors);
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
    let mut pool = super::pool::PoolOptions::default();
    let protocol = protocol(c, path, errors, &mut pool);
    super::pool::cluster_level(c, path, errors, &mut pool);
    let circuit_breakers = super::circuit_breaker::translate(
        c.circuit_breakers.as_ref(),
        &path.field("circuit_breakers"),
        errors,
    );
    let outlier_detection = super::outlier::translate(
        c.outlier_detection.as_ref(),
        &path.field("outlier_detection"),
        errors,
    );
    let health_checks =
        super::health_check::translate(&c.health_checks, &path.field("health_checks"), errors);
    // Envoy's default ALPN for auto_config when the TLS context sets none.
    let default_alpn: &[&str] = if protocol == UpstreamProtocol::Auto {
        &["h2", "http/1.1"]
    } else {
        &[]
    };
    let tls = c.transport_socket.as_ref().and_then(|ts| {
        super::tls::upstream_transport_socket(
            ts,
            default_alpn,
            &path.field("transport_socket"),
            errors,
        )
    });
    if protocol == UpstreamProtocol::Auto && tls.is_none() {
        errors.push(
            &path.field("typed_extension_protocol_options"),
            "auto_config needs a TLS transport_socket: the upstream protocol is negotiated with ALPN (Envoy: \"ALPN configured for cluster which has a non-ALPN transport socket\")",
        );
    }

    let endpoints = match (&discovery, &c.load_assignment) {
        (Some(Discovery::Eds { .. }), Some(_)) => {
            errors.push(
                &path.field("load_assignment"),
                "EDS clusters receive their endpoints from EDS; remove the inline load_assignment",
            );
            Vec::new()
        }
        (Some(d), Some(la)) => {
            let la_path = path.field("load_assignment");
            if let Some(f) = overprovisioning_factor(la, &la_path, errors) {
                lb_settings.overprovisioning_factor = f;
            }
            load_assignment(la, d, &la_path, errors)
        }
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
        lb_settings,
        protocol,
        dns_lookup_family,
        dns_refresh_rate,
        endpoints,
        health_checks,
        circuit_breakers,
        outlier_detection,
        pool,
        tls,
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
    use pb::cluster::LbPolicy as Pb;
    let policy = match Pb::try_from(c.lb_policy) {
        Ok(p) => p,
        Err(_) => {
            errors.push(
                &path.field("lb_policy"),
                format!("unknown value {}", c.lb_policy),
            );
            return LbPolicy::RoundRobin;
        }
    };
    // A policy's own config with another policy is a mistake Envoy would silently ignore.
    let (config_field, config_policy) = match &c.lb_config {
        Some(LbConfig::LeastRequestLbConfig(_)) => ("least_request_lb_config", Pb::LeastRequest),
        Some(LbConfig::RingHashLbConfig(_)) => ("ring_hash_lb_config", Pb::RingHash),
        Some(LbConfig::MaglevLbConfig(_)) => ("maglev_lb_config", Pb::Maglev),
        // Others are reported as unsupported fields by the supported-subset check.
        _ => ("", policy),
    };
    if config_policy != policy {
        errors.push(
            &path.field(config_field),
            format!("only valid with lb_policy {}", config_policy.as_str_name()),
        );
    }
    match policy {
        Pb::RoundRobin => LbPolicy::RoundRobin,
        Pb::Random => LbPolicy::Random,
        Pb::LeastRequest => {
            let cfg = match &c.lb_config {
                Some(LbConfig::LeastRequestLbConfig(cfg)) => Some(cfg),
                _ => None,
            };
            let cfg_path = path.field("least_request_lb_config");
            let choice_count = cfg
                .and_then(|c| c.choice_count)
                .map(|v| v.value)
                .unwrap_or(2);
            if choice_count < 2 {
                errors.push(&cfg_path.field("choice_count"), "must be at least 2");
            }
            let mut active_request_bias = cfg
                .and_then(|c| c.active_request_bias.as_ref())
                .map(|b| b.default_value)
                .unwrap_or(1.0);
            if !(active_request_bias >= 0.0 && active_request_bias.is_finite()) {
                // Envoy logs this and falls back to 1.0.
                tracing::warn!(
                    bias = active_request_bias,
                    "invalid least_request_lb_config.active_request_bias; using 1.0"
                );
                active_request_bias = 1.0;
            }
            LbPolicy::LeastRequest {
                choice_count,
                active_request_bias,
            }
        }
        Pb::RingHash => {
            let cfg = match &c.lb_config {
                Some(LbConfig::RingHashLbConfig(cfg)) => Some(cfg),
                _ => None,
            };
            let cfg_path = path.field("ring_hash_lb_config");
            let min = cfg
                .and_then(|c| c.minimum_ring_size)
                .map(|v| v.value)
                .unwrap_or(DEFAULT_MIN_RING_SIZE);
            let max = cfg
                .and_then(|c| c.maximum_ring_size)
                .map(|v| v.value)
                .unwrap_or(DEFAULT_MAX_RING_SIZE);
            if min == 0 || min > DEFAULT_MAX_RING_SIZE {
                errors.push(
                    &cfg_path.field("minimum_ring_size"),
                    format!("must be between 1 and {DEFAULT_MAX_RING_SIZE}"),
                );
            }
            if max == 0 || max > DEFAULT_MAX_RING_SIZE {
                errors.push(
                    &cfg_path.field("maximum_ring_size"),
                    format!("must be between 1 and {DEFAULT_MAX_RING_SIZE}"),
                );
            }
            if min > max {
                errors.push(
                    &cfg_path,
                    format!("minimum_ring_size ({min}) > maximum_ring_size ({max})"),
                );
            }
            if let Some(cfg) = cfg {
                use pb::cluster::ring_hash_lb_config::HashFunction;
                match HashFunction::try_from(cfg.hash_function) {
                    Ok(HashFunction::XxHash) => {}
                    Ok(other) => errors.unsupported_value(
                        &cfg_path.field("hash_function"),
                        other.as_str_name(),
                        &["XX_HASH"],
                    ),
                    Err(_) => errors.push(
                        &cfg_path.field("hash_function"),
                        format!("unknown value {}", cfg.hash_function),
                    ),
                }
            }
            LbPolicy::RingHash {
                minimum_ring_size: min,
                maximum_ring_size: max,
            }
        }
        Pb::Maglev => {
            let table_size = match &c.lb_config {
                Some(LbConfig::MaglevLbConfig(cfg)) => cfg.table_size.map(|v| v.value),
                _ => None,
            }
            .unwrap_or(crate::cluster::hash::DEFAULT_MAGLEV_TABLE_SIZE);
            let size_path = path.field("maglev_lb_config").field("table_size");
            if table_size > MAX_MAGLEV_TABLE_SIZE {
                errors.push(
                    &size_path,
                    format!("must be at most {MAX_MAGLEV_TABLE_SIZE}"),
                );
            } else if !crate::cluster::hash::is_prime(table_size) {
                errors.push(
                    &size_path,
                    "the table size of maglev must be a prime number",
                );
            }
            LbPolicy::Maglev { table_size }
        }
        other => {
            errors.unsupported_value(
                &path.field("lb_policy"),
                other.as_str_name(),
                &[
                    "ROUND_ROBIN",
                    "LEAST_REQUEST",
                    "RANDOM",
                    "RING_HASH",
                    "MAGLEV",
                ],
            );
            LbPolicy::RoundRobin
        }
    }
}

/// `common_lb_config` (only `healthy_panic_threshold`; the rest is rejected by the
/// supported-subset check).
fn lb_settings(c: &pb::Cluster, path: &Path, errors: &mut Errors) -> LbSettings {
    let mut settings = LbSettings {
        locality_weighted: c
            .common_lb_config
            .as_ref()
            .is_some_and(|c| {
                matches!(
                    c.locality_config_specifier,
                    Some(pb::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
                )
            }),
        ..LbSettings::default()
    };
    if let Some(t) = c
        .common_lb_config
        .as_ref()
        .and_then(|c| c.healthy_panic_threshold.as_ref())
    {
        if (0.0..=100.0).contains(&t.value) {
            settings.healthy_panic_threshold = t.value.round() as u32;
        } else {
            errors.push(
                &path
                    .field("common_lb_config")
                    .field("healthy_panic_threshold")
                    .field("value"),
                "must be between 0 and 100",
            );
        }
    }
    settings
}

/// `ClusterLoadAssignment.policy.overprovisioning_factor`, if set.
pub fn overprovisioning_factor(
    la: &endpoint::ClusterLoadAssignment,
    path: &Path,
    errors: &mut Errors,
) -> Option<u32> {
    let f = la.policy.as_ref()?.overprovisioning_factor?.value;
    if f == 0 {
        errors.push(
            &path.field("policy").field("overprovisioning_factor"),
            "must be greater than 0",
        );
        return None;
    }
    Some(f)
}

/// `typed_extension_protocol_options`: only `HttpProtocolOptions` with an explicit HTTP/1.1 or
/// HTTP/2 choice.
fn protocol(
    c: &pb::Cluster,
    path: &Path,
    errors: &mut Errors,
    pool: &mut super::pool::PoolOptions,
) -> UpstreamProtocol {
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
        if let Some(common) = &options.common_http_protocol_options {
            super::pool::common_http(
                common,
                &entry_path.field("common_http_protocol_options"),
                errors,
                pool,
            );
        }
        if let Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(_)) =
            &options.upstream_protocol_options
        {
            // As Envoy: an HTTP/2 request goes upstream over HTTP/2 even without
            // http2_protocol_options (they only tune the codec).
            protocol = UpstreamProtocol::UseDownstream;
        }
        if let Some(UpstreamProtocolOptions::AutoConfig(_)) = &options.upstream_protocol_options {
            // Its HTTP/3 options and alternate protocol cache are rejected by the
            // supported-subset check; the TLS requirement is checked with the transport socket.
            protocol = UpstreamProtocol::Auto;
        }
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
    let mut out: Vec<Endpoint> = Vec::new();
    for (i, locality_endpoints) in la.endpoints.iter().enumerate() {
        let lpath = path.field("endpoints").index(i);
        let priority = locality_endpoints.priority;
        if priority > MAX_PRIORITY {
            errors.push(
                &lpath.field("priority"),
                format!("{priority} is above the largest supported priority {MAX_PRIORITY}"),
            );
        }
        let weight = match locality_endpoints.load_balancing_weight {
            Some(w) if w.value == 0 => {
                errors.push(&lpath.field("load_balancing_weight"), "must be at least 1");
                0
            }
            Some(w) => w.value,
            None => 0,
        };
        let locality = locality_endpoints
            .locality
            .as_ref()
            .map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
                weight,
            })
            .unwrap_or(Locality {
                weight,
                ..Locality::default()
            });
        for (j, lb) in locality_endpoints.lb_endpoints.iter().enumerate() {
            let epath = lpath.field("lb_endpoints").index(j);
            if let Some(e) = lb_endpoint(lb, discovery, &epath, errors) {
                out.push(Endpoint {
                    locality: locality.clone(),
                    priority,
                    ..e
                });
            }
        }
    }
    let mut sums = std::collections::BTreeMap::<u32, u64>::new();
    for e in &out {
        *sums.entry(e.priority).or_default() += u64::from(e.weight);
    }
    for (priority, sum) in sums {
        if sum > u64::from(u32::MAX) {
            errors.push(
                &path.field("endpoints"),
                format!(
                    "the load_balancing_weight of the endpoints of priority {priority} sum to {sum}, above {}",
                    u32::MAX
                ),
            );
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
    let weight = lb.load_balancing_weight.map(|w| w.value).unwrap_or(1);
    // Envoy places such a host on the ring / Maglev table by this key instead of its address.
    if lb
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get("envoy.lb"))
        .is_some_and(|s| s.fields.contains_key("hash_key"))
    {
        errors.push(
            &path
                .field("metadata")
                .field("filter_metadata")
                .key("envoy.lb")
                .field("hash_key"),
            "unsupported field (hash keys from endpoint metadata are not implemented yet)",
        );
    }
    if weight == 0 {
        errors.push(&path.field("load_balancing_weight"), "must be at least 1");
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
        weight: weight.max(1),
        priority: 0,
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
    fn auto_config_needs_a_tls_transport_socket() {
        let auto = r#"
name: a
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    auto_config: { http2_protocol_options: {} }
"#;
        let errs = cluster(auto).expect_err("plaintext auto_config");
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with(
                "cluster.typed_extension_protocol_options: auto_config needs a TLS transport_socket"
            ),
            "{errs:#?}"
        );
        let c = cluster(&format!(
            "{auto}transport_socket:\n  name: envoy.transport_sockets.tls\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n"
        ))
        .expect("auto_config over TLS");
        assert_eq!(c.protocol, UpstreamProtocol::Auto);
        let alpn = c.tls.as_ref().map(|t| t.common.alpn.clone());
        assert_eq!(alpn, Some(vec!["h2".to_string(), "http/1.1".to_string()]));
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
        assert_eq!(
            c.lb_policy,
            LbPolicy::LeastRequest {
                choice_count: 3,
                active_request_bias: 1.0
            }
        );
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
lb_policy: CLUSTER_PROVIDED
connect_timeout: 0s
circuit_breakers: { per_host_thresholds: [{}] }
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config: { http2_protocol_options: { max_concurrent_streams: 10 } }
"#,
        )
        .expect_err("invalid");
        let expected = [
            "cluster.circuit_breakers.per_host_thresholds: unsupported field (per-host circuit breakers are not implemented yet)",
            "cluster.typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"].explicit_http_config.http2_protocol_options.max_concurrent_streams: unsupported field",
            "cluster.type: unsupported value ORIGINAL_DST (supported: STATIC, STRICT_DNS, LOGICAL_DNS, EDS)",
            "cluster.connect_timeout: must be a positive duration",
            "cluster.lb_policy: unsupported value CLUSTER_PROVIDED (supported: ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV)",
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

    #[test]
    fn weights_priorities_and_lb_settings() {
        let c = cluster(
            r#"
name: w
lb_policy: LEAST_REQUEST
least_request_lb_config: { active_request_bias: { default_value: 0.5, runtime_key: k } }
common_lb_config: { healthy_panic_threshold: { value: 0 } }
load_assignment:
  policy: { overprovisioning_factor: 100 }
  endpoints:
  - lb_endpoints:
    - endpoint: { address: { socket_address: { address: 10.0.0.1, port_value: 80 } } }
      load_balancing_weight: 3
  - priority: 1
    locality: { zone: z }
    load_balancing_weight: 5
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 10.0.0.2, port_value: 80 } } }
"#,
        )
        .expect("valid");
        assert_eq!(
            c.lb_policy,
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: 0.5
            }
        );
        assert_eq!(
            c.lb_settings,
            LbSettings {
                healthy_panic_threshold: 0,
                overprovisioning_factor: 100,
                locality_weighted: false,
            }
        );
        assert_eq!((c.endpoints[0].weight, c.endpoints[0].priority), (3, 0));
        assert_eq!((c.endpoints[1].weight, c.endpoints[1].priority), (1, 1));
        assert_eq!(
            (
                c.endpoints[0].locality.weight,
                c.endpoints[1].locality.weight
            ),
            (0, 5)
        );
        assert_eq!(c.endpoints[1].locality.zone, "z");
        assert!(!c.lb_settings.locality_weighted);
        let d = cluster("name: d\n").expect("valid");
        assert_eq!(d.lb_settings, LbSettings::default());
        assert_eq!(d.lb_settings.healthy_panic_threshold, 50);
        assert_eq!(d.lb_settings.overprovisioning_factor, 140);
    }

    #[test]
    fn ring_hash_and_maglev_settings() {
        let c = cluster("name: r\nlb_policy: RING_HASH\n").expect("valid");
        assert_eq!(
            c.lb_policy,
            LbPolicy::RingHash {
                minimum_ring_size: 1024,
                maximum_ring_size: 8 * 1024 * 1024
            }
        );
        let c = cluster(
            "name: r\nlb_policy: RING_HASH\nring_hash_lb_config: { minimum_ring_size: 16, maximum_ring_size: 64 }\n",
        )
        .expect("valid");
        assert!(c.lb_policy.uses_hash());
        let c = cluster("name: m\nlb_policy: MAGLEV\nmaglev_lb_config: { table_size: 251 }\n")
            .expect("valid");
        assert_eq!(c.lb_policy, LbPolicy::Maglev { table_size: 251 });
        let errs = cluster(
            r#"
name: bad
lb_policy: RING_HASH
ring_hash_lb_config: { minimum_ring_size: 2048, maximum_ring_size: 1024, hash_function: MURMUR_HASH_2 }
common_lb_config: { healthy_panic_threshold: { value: 150 }, locality_weighted_lb_config: {}, update_merge_window: 1s }
load_assignment:
  policy: { overprovisioning_factor: 0 }
  endpoints:
  - priority: 200
    load_balancing_weight: 0
    lb_endpoints:
    - endpoint: { address: { socket_address: { address: 10.0.0.1, port_value: 80 } } }
      load_balancing_weight: 0
      metadata: { filter_metadata: { envoy.lb: { hash_key: h1 } } }
"#,
        )
        .expect_err("invalid");
        let expected = [
            "cluster.common_lb_config.update_merge_window: unsupported field",
            "cluster.ring_hash_lb_config: minimum_ring_size (2048) > maximum_ring_size (1024)",
            "cluster.ring_hash_lb_config.hash_function: unsupported value MURMUR_HASH_2 (supported: XX_HASH)",
            "cluster.common_lb_config.healthy_panic_threshold.value: must be between 0 and 100",
            "cluster.load_assignment.policy.overprovisioning_factor: must be greater than 0",
            "cluster.load_assignment.endpoints[0].priority: 200 is above the largest supported priority 127",
            "cluster.load_assignment.endpoints[0].load_balancing_weight: must be at least 1",
            "cluster.load_assignment.endpoints[0].lb_endpoints[0].load_balancing_weight: must be at least 1",
            "cluster.load_assignment.endpoints[0].lb_endpoints[0].metadata.filter_metadata[\"envoy.lb\"].hash_key: unsupported field (hash keys from endpoint metadata are not implemented yet)",
        ];
        for e in expected {
            assert!(errs.iter().any(|x| x == e), "missing {e:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
        let errs = cluster("name: m\nlb_policy: MAGLEV\nmaglev_lb_config: { table_size: 1000 }\n")
            .expect_err("not prime");
        assert_eq!(
            errs,
            vec![
                "cluster.maglev_lb_config.table_size: the table size of maglev must be a prime number"
            ]
        );
        let errs =
            cluster("name: m\nlb_policy: ROUND_ROBIN\nmaglev_lb_config: { table_size: 251 }\n")
                .expect_err("wrong policy");
        assert_eq!(
            errs,
            vec!["cluster.maglev_lb_config: only valid with lb_policy MAGLEV"]
        );
    }
}
