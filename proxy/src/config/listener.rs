//! Envoy `Listener` → [`Listener`]: address, filter chains (with their `filter_chain_match`
//! and the `default_filter_chain`), and each chain's terminal network filter: the HTTP
//! connection manager (inline route configuration or RDS, router filter) or the TCP proxy.
//!
//! Filter chain matching supports the criteria that need no listener filter (destination
//! port and IP, direct source and source IP, source type, source port, `transport_protocol`
//! `raw_buffer`); `server_names`, `transport_protocol: tls` and `application_protocols` need
//! the TLS or HTTP inspector and are rejected by name. Selection itself lives in
//! `crate::listener::filter_chain`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::listener::v3 as pb;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
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
/// The TCP proxy's extension name.
pub const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
/// The transport protocol of a connection no listener filter inspected (Envoy's default).
pub const RAW_BUFFER: &str = "raw_buffer";
/// The transport protocol the TLS inspector sets for a TLS ClientHello.
pub const TLS: &str = "tls";
/// The TLS inspector listener filter's extension name.
pub const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
/// Envoy's default TCP proxy `idle_timeout`.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// Prefix of this listener's `listener.<prefix>.*` stats: `stat_prefix` or the address.
    pub stat_prefix: String,
    /// In configuration order; a connection gets the chain [`FilterChainMatch`] selects.
    pub filter_chains: Vec<FilterChain>,
    /// The chain of connections no `filter_chains` entry matches (else they are closed).
    pub default_filter_chain: Option<FilterChain>,
    /// `listener_filters` has `envoy.filters.listener.tls_inspector`: connections are peeked
    /// for a TLS ClientHello (SNI, ALPN) before a chain is chosen.
    pub tls_inspector: bool,
    /// The resource as received, for `/config_dump`.
    pub source: Arc<pb::Listener>,
}

#[derive(Debug, Clone)]
pub struct FilterChain {
    pub name: String,
    pub matcher: FilterChainMatch,
    /// The terminal network filter.
    pub filter: NetworkFilter,
    /// `envoy.filters.network.local_ratelimit` before the terminal filter: one token per
    /// connection, or the connection is closed at once.
    pub connection_rate_limit: Option<Arc<super::local_ratelimit::ConnectionRateLimit>>,
    /// `transport_socket` `envoy.transport_sockets.tls`: TLS is terminated before the filter.
    pub tls: Option<Arc<super::tls::DownstreamTls>>,
}

/// A chain's `filter_chain_match`; empty criteria match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterChainMatch {
    pub destination_port: Option<u16>,
    pub prefix_ranges: Vec<Cidr>,
    /// `server_names`, lower-case: exact names and `*.suffix` wildcards.
    pub server_names: Vec<String>,
    /// Empty, [`RAW_BUFFER`] or [`TLS`].
    pub transport_protocol: String,
    /// `application_protocols` (ALPN values offered by the client).
    pub application_protocols: Vec<String>,
    pub direct_source_prefix_ranges: Vec<Cidr>,
    pub source_type: SourceType,
    pub source_prefix_ranges: Vec<Cidr>,
    pub source_ports: Vec<u16>,
}

/// `FilterChainMatch.source_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceType {
    #[default]
    Any,
    /// `SAME_IP_OR_LOOPBACK`: the peer is a loopback address or the local address.
    SameIpOrLoopback,
    External,
}

/// A CIDR range, normalized as Envoy does (address bits past the prefix cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub address: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn new(address: IpAddr, len: u8) -> Option<Self> {
        let address = match address {
            IpAddr::V4(a) if len <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) if len <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
            _ => return None,
        };
        Some(Self { address, len })
    }

    /// Whether `ip` (of the same family) is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Cidr::new(ip, self.len).is_some_and(|c| c.address == self.address)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.len)
    }
}

#[derive(Debug, Clone)]
pub enum NetworkFilter {
    HttpConnectionManager(Arc<HttpConnectionManager>),
    TcpProxy(Arc<TcpProxy>),
}

/// `envoy.filters.network.tcp_proxy`.
#[derive(Debug, Clone)]
pub struct TcpProxy {
    pub stat_prefix: String,
    pub route: TcpRoute,
    /// `None`: disabled (`0s`).
    pub idle_timeout: Option<Duration>,
    /// At least 1.
    pub max_connect_attempts: u32,
}

/// Where a TCP proxy connects. Cluster names are not checked against the known clusters:
/// as in Envoy, a connection to a missing cluster is closed (`downstream_cx_no_route`).
#[derive(Debug, Clone)]
pub enum TcpRoute {
    Cluster(String),
    /// `weighted_clusters`: (name, weight), weights at least 1.
    Weighted(Vec<(String, u32)>),
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
    /// The local rate limit filter before the router, if any: its name in `http_filters`
    /// (the key of its per-route configurations) and its own configuration.
    pub local_rate_limit: Option<(String, Arc<super::local_ratelimit::LocalRateLimit>)>,
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
    /// Every filter chain: `filter_chains` in order, then the default one.
    pub fn all_filter_chains(&self) -> impl Iterator<Item = &FilterChain> {
        self.filter_chains
            .iter()
            .chain(self.default_filter_chain.iter())
    }

    /// The RDS route configuration names this listener's filter chains wait for (the union
    /// over its chains, sorted, each once).
    pub fn rds_names(&self) -> Vec<String> {
        let names: BTreeSet<String> = self
            .all_filter_chains()
            .filter_map(|fc| match &fc.filter {
                NetworkFilter::HttpConnectionManager(h) => h.rds_name().map(str::to_string),
                NetworkFilter::TcpProxy(_) => None,
            })
            .collect();
        names.into_iter().collect()
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
    if l.filter_chains.is_empty() && l.default_filter_chain.is_none() {
        errors.push(
            &fpath,
            "at least one filter chain (or default_filter_chain) is required",
        );
    }
    let filter_chains: Vec<Option<FilterChain>> = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, fc)| filter_chain(fc, known_clusters, &fpath.index(i), errors))
        .collect();
    let tls_inspector = listener_filters(l, &path.field("listener_filters"), errors);
    let dpath = path.field("default_filter_chain");
    // Envoy ignores the default chain's filter_chain_match.
    let default_filter_chain = l
        .default_filter_chain
        .as_ref()
        .and_then(|fc| filter_chain(fc, known_clusters, &dpath, errors))
        .map(|fc| FilterChain {
            matcher: FilterChainMatch::default(),
            ..fc
        });
    if errors.len() == before {
        check_distinct_matches(l, &filter_chains, &fpath, errors);
    }
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
        filter_chains: filter_chains.into_iter().collect::<Option<Vec<_>>>()?,
        default_filter_chain,
        tls_inspector,
        source: Arc::new(l.clone()),
    })
}

/// Envoy's check that no two chains claim the same connections: identical
/// `filter_chain_match` messages, or two chains sharing one combination of criteria values
/// (each chain stands for every combination of its lists' entries).
fn check_distinct_matches(
    l: &pb::Listener,
    chains: &[Option<FilterChain>],
    path: &Path,
    errors: &mut Errors,
) {
    let chain_name = |i: usize| {
        let name = &l.filter_chains[i].name;
        if name.is_empty() {
            format!("filter_chains[{i}]")
        } else {
            name.clone()
        }
    };
    for (i, fc) in l.filter_chains.iter().enumerate() {
        let same = l.filter_chains[..i].iter().position(|o| {
            o.filter_chain_match.clone().unwrap_or_default()
                == fc.filter_chain_match.clone().unwrap_or_default()
        });
        if let Some(j) = same {
            errors.push(
                &path.index(i).field("filter_chain_match"),
                format!(
                    "filter chain '{}' has the same matching rules defined as '{}'",
                    chain_name(i),
                    chain_name(j)
                ),
            );
            return;
        }
    }
    let mut seen: HashMap<MatchKey, usize> = HashMap::new();
    for (i, fc) in chains.iter().enumerate() {
        let Some(fc) = fc else { continue };
        for key in expand(&fc.matcher) {
            if let Some(j) = seen.insert(key, i)
                && j != i
            {
                errors.push(
                    &path.index(i).field("filter_chain_match"),
                    format!(
                        "multiple filter chains with overlapping matching rules are defined ('{}' and '{}')",
                        chain_name(j),
                        chain_name(i)
                    ),
                );
                return;
            }
        }
    }
}

/// One combination of criteria values of a chain (`None`: the criterion is not set).
type MatchKey = (
    Option<u16>,
    Option<Cidr>,
    Option<String>,
    String,
    Option<String>,
    Option<Cidr>,
    SourceType,
    Option<Cidr>,
    Option<u16>,
);

fn expand(m: &FilterChainMatch) -> Vec<MatchKey> {
    fn or_none<T: Copy>(v: &[T]) -> Vec<Option<T>> {
        if v.is_empty() {
            vec![None]
        } else {
            v.iter().copied().map(Some).collect()
        }
    }
    fn names(v: &[String]) -> Vec<Option<String>> {
        if v.is_empty() {
            vec![None]
        } else {
            v.iter().cloned().map(Some).collect()
        }
    }
    let mut out = Vec::new();
    for dst in or_none(&m.prefix_ranges) {
        for server_name in names(&m.server_names) {
            for alpn in names(&m.application_protocols) {
                for direct in or_none(&m.direct_source_prefix_ranges) {
                    for src in or_none(&m.source_prefix_ranges) {
                        for port in or_none(&m.source_ports) {
                            out.push((
                                m.destination_port,
                                dst,
                                server_name.clone(),
                                m.transport_protocol.clone(),
                                alpn.clone(),
                                direct,
                                m.source_type,
                                src,
                                port,
                            ));
                        }
                    }
                }
            }
        }
    }
    out
}

/// `listener_filters`: only the TLS inspector (without options). Returns whether it is there.
fn listener_filters(l: &pb::Listener, path: &Path, errors: &mut Errors) -> bool {
    use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
    use pb::listener_filter::ConfigType;
    let mut tls_inspector = false;
    for (i, f) in l.listener_filters.iter().enumerate() {
        let fpath = path.index(i);
        let tpath = fpath.field("typed_config");
        match &f.config_type {
            Some(ConfigType::TypedConfig(any)) if any.type_url == TlsInspector::type_url() => {
                match decode::<TlsInspector>(any, &tpath, errors) {
                    Some(t) if t != TlsInspector::default() => errors.push(
                        &tpath,
                        "TLS inspector options (fingerprinting, initial_read_buffer_size) are not supported",
                    ),
                    Some(_) if tls_inspector => {
                        errors.push(&fpath, "the TLS inspector is configured twice")
                    }
                    Some(_) => tls_inspector = true,
                    None => {}
                }
            }
            Some(ConfigType::TypedConfig(any)) => errors.push(
                &tpath,
                format!(
                    "unsupported listener filter {} (supported: {TLS_INSPECTOR})",
                    any.type_url
                ),
            ),
            // Reported as an unsupported field by the supported-subset check.
            Some(_) => {}
            None => errors.push(&tpath, format!("required (name {:?})", f.name)),
        }
    }
    tls_inspector
}

fn filter_chain_match(
    m: &pb::FilterChainMatch,
    path: &Path,
    errors: &mut Errors,
) -> FilterChainMatch {
    use pb::filter_chain_match::ConnectionSourceType as S;
    let destination_port = m
        .destination_port
        .and_then(|p| match u16::try_from(p.value) {
            Ok(port) if port > 0 => Some(port),
            _ => {
                errors.push(
                    &path.field("destination_port"),
                    format!("{} is not a port (1 to 65535)", p.value),
                );
                None
            }
        });
    let transport_protocol = match m.transport_protocol.as_str() {
        "" | RAW_BUFFER | TLS => m.transport_protocol.clone(),
        other => {
            errors.unsupported_value(&path.field("transport_protocol"), other, &[RAW_BUFFER, TLS]);
            String::new()
        }
    };
    let mut server_names: Vec<String> = Vec::new();
    for (i, n) in m.server_names.iter().enumerate() {
        let lower = n.to_ascii_lowercase();
        let bare = lower.strip_prefix("*.").unwrap_or(&lower);
        if bare.is_empty() || bare.contains('*') {
            errors.push(
                &path.field("server_names").index(i),
                format!("{n:?} is not a server name (wildcards only as a leading \"*.\")"),
            );
        } else if !server_names.contains(&lower) {
            server_names.push(lower);
        }
    }
    let source_type = match S::try_from(m.source_type) {
        Ok(S::Any) => SourceType::Any,
        Ok(S::SameIpOrLoopback) => SourceType::SameIpOrLoopback,
        Ok(S::External) => SourceType::External,
        Err(_) => {
            errors.push(
                &path.field("source_type"),
                format!("unknown value {}", m.source_type),
            );
            SourceType::Any
        }
    };
    let mut source_ports = Vec::new();
    for (i, p) in m.source_ports.iter().enumerate() {
        match u16::try_from(*p) {
            Ok(port) if port > 0 => source_ports.push(port),
            _ => errors.push(
                &path.field("source_ports").index(i),
                format!("{p} is not a port (1 to 65535)"),
            ),
        }
    }
    FilterChainMatch {
        destination_port,
        prefix_ranges: cidrs(&m.prefix_ranges, &path.field("prefix_ranges"), errors),
        server_names,
        transport_protocol,
        application_protocols: m.application_protocols.clone(),
        direct_source_prefix_ranges: cidrs(
            &m.direct_source_prefix_ranges,
            &path.field("direct_source_prefix_ranges"),
            errors,
        ),
        source_type,
        source_prefix_ranges: cidrs(
            &m.source_prefix_ranges,
            &path.field("source_prefix_ranges"),
            errors,
        ),
        source_ports,
    }
}

fn cidrs(ranges: &[CidrRange], path: &Path, errors: &mut Errors) -> Vec<Cidr> {
    let mut out = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        let rpath = path.index(i);
        let Ok(address) = r.address_prefix.parse::<IpAddr>() else {
            errors.push(
                &rpath.field("address_prefix"),
                format!("malformed IP address {:?}", r.address_prefix),
            );
            continue;
        };
        let len = r.prefix_len.map(|l| l.value).unwrap_or(0);
        if len > 128 {
            errors.push(
                &rpath.field("prefix_len"),
                format!("{len} is more than 128"),
            );
            continue;
        }
        // Envoy clamps an IPv4 length to 32.
        let len = match address {
            IpAddr::V4(_) => len.min(32),
            IpAddr::V6(_) => len,
        };
        if let Some(c) = u8::try_from(len).ok().and_then(|l| Cidr::new(address, l))
            && !out.contains(&c)
        {
            out.push(c);
        }
    }
    out
}

fn filter_chain(
    fc: &pb::FilterChain,
    known_clusters: &HashSet<String>,
    path: &Path,
    errors: &mut Errors,
) -> Option<FilterChain> {
    let matcher = match &fc.filter_chain_match {
        Some(m) => filter_chain_match(m, &path.field("filter_chain_match"), errors),
        None => FilterChainMatch::default(),
    };
    let fpath = path.field("filters");
    let (rate_limit, filter) = match fc.filters.as_slice() {
        [filter] => (None, filter),
        [first, filter] => (Some(first), filter),
        _ => {
            errors.push(
                &fpath,
                "exactly one terminal network filter (envoy.filters.network.http_connection_manager or envoy.filters.network.tcp_proxy) is required, optionally after envoy.filters.network.local_ratelimit",
            );
            return None;
        }
    };
    let connection_rate_limit = match rate_limit {
        None => None,
        Some(f) => {
            let rpath = fpath.index(0).field("typed_config");
            match &f.config_type {
                Some(pb::filter::ConfigType::TypedConfig(any))
                    if any.type_url == super::local_ratelimit::NetworkPb::type_url() =>
                {
                    decode::<super::local_ratelimit::NetworkPb>(any, &rpath, errors)
                        .and_then(|c| {
                            super::local_ratelimit::connection_rate_limit(&c, &rpath, errors)
                        })
                        .map(Arc::new)
                }
                Some(pb::filter::ConfigType::TypedConfig(any)) => {
                    errors.push(
                        &rpath,
                        format!(
                            "unsupported filter {} (only envoy.filters.network.local_ratelimit may precede the terminal filter)",
                            any.type_url
                        ),
                    );
                    None
                }
                // Reported as an unsupported field by the supported-subset check.
                Some(_) => None,
                None => {
                    errors.push(&rpath, format!("required (name {:?})", f.name));
                    None
                }
            }
        }
    };
    let fpath = fpath.index(fc.filters.len() - 1);
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
    let filter = if any.type_url == hcm::HttpConnectionManager::type_url() {
        let config = decode::<hcm::HttpConnectionManager>(any, &tpath, errors)?;
        let manager = http_connection_manager(&config, known_clusters, &tpath, errors)?;
        NetworkFilter::HttpConnectionManager(Arc::new(manager))
    } else if any.type_url == tcp::TcpProxy::type_url() {
        let config = decode::<tcp::TcpProxy>(any, &tpath, errors)?;
        NetworkFilter::TcpProxy(Arc::new(tcp_proxy(&config, &tpath, errors)?))
    } else {
        errors.push(&tpath, format!("unsupported filter {}", any.type_url));
        return None;
    };
    let tls = fc.transport_socket.as_ref().and_then(|ts| {
        super::tls::downstream_transport_socket(ts, &path.field("transport_socket"), errors)
    });
    Some(FilterChain {
        name: fc.name.clone(),
        matcher,
        filter,
        connection_rate_limit,
        tls,
    })
}

/// The TCP proxy's supported subset (other fields are rejected by the supported-subset
/// check); values validated as Envoy's proto constraints do.
fn tcp_proxy(c: &tcp::TcpProxy, path: &Path, errors: &mut Errors) -> Option<TcpProxy> {
    use tcp::tcp_proxy::ClusterSpecifier as C;
    let before = errors.len();
    if c.stat_prefix.is_empty() {
        errors.push(&path.field("stat_prefix"), "required");
    }
    let route = match &c.cluster_specifier {
        Some(C::Cluster(name)) => {
            if name.is_empty() {
                errors.push(&path.field("cluster"), "must not be empty");
            }
            Some(TcpRoute::Cluster(name.clone()))
        }
        Some(C::WeightedClusters(w)) => {
            let wpath = path.field("weighted_clusters").field("clusters");
            if w.clusters.is_empty() {
                errors.push(&wpath, "at least one cluster is required");
            }
            let mut clusters = Vec::new();
            for (i, cw) in w.clusters.iter().enumerate() {
                let cpath = wpath.index(i);
                if cw.name.is_empty() {
                    errors.push(&cpath.field("name"), "required");
                }
                if cw.weight == 0 {
                    errors.push(&cpath.field("weight"), "must be at least 1");
                }
                clusters.push((cw.name.clone(), cw.weight));
            }
            Some(TcpRoute::Weighted(clusters))
        }
        None => {
            errors.push(
                &path.field("cluster"),
                "one of cluster, weighted_clusters is required",
            );
            None
        }
    };
    let idle_timeout = match &c.idle_timeout {
        None => Some(DEFAULT_TCP_IDLE_TIMEOUT),
        Some(d) => match super::duration(d) {
            Some(Duration::ZERO) => None,
            Some(d) => Some(d),
            None => {
                errors.push(&path.field("idle_timeout"), "must not be negative");
                None
            }
        },
    };
    let max_connect_attempts = c.max_connect_attempts.map(|v| v.value).unwrap_or(1);
    if max_connect_attempts == 0 {
        errors.push(&path.field("max_connect_attempts"), "must be at least 1");
    }
    if errors.len() > before {
        return None;
    }
    Some(TcpProxy {
        stat_prefix: c.stat_prefix.clone(),
        route: route?,
        idle_timeout,
        max_connect_attempts,
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
    let (suppress_envoy_headers, local_rate_limit) =
        http_filters(c, &path.field("http_filters"), errors);
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
        local_rate_limit,
        upgrades,
    })
}

/// The HTTP filter chain: optionally one local rate limit filter, then the router (an empty
/// chain is read as the router alone, as Envoy does). Returns the router's
/// `suppress_envoy_headers` and the local rate limit filter.
#[allow(clippy::type_complexity)]
fn http_filters(
    c: &hcm::HttpConnectionManager,
    path: &Path,
    errors: &mut Errors,
) -> (
    bool,
    Option<(String, Arc<super::local_ratelimit::LocalRateLimit>)>,
) {
    use super::local_ratelimit::{self as rl, Level};
    use hcm::http_filter::ConfigType;
    let mut suppress = false;
    let mut rate_limit = None;
    for (i, f) in c.http_filters.iter().enumerate() {
        let fpath = path.index(i);
        let last = i + 1 == c.http_filters.len();
        match &f.config_type {
            Some(ConfigType::TypedConfig(any)) if any.type_url == Router::type_url() => {
                if let Some(r) = decode::<Router>(any, &fpath.field("typed_config"), errors) {
                    suppress = r.suppress_envoy_headers;
                }
            }
            Some(ConfigType::TypedConfig(any))
                if any.type_url == <rl::Pb as prost::Name>::type_url() =>
            {
                if last {
                    errors.push(&fpath, "the router must be the last HTTP filter");
                }
                if rate_limit.is_some() {
                    errors.push(&fpath, "only one local rate limit filter is supported");
                } else if let Some(r) = rl::from_any(
                    any,
                    Level::ConnectionManager,
                    &fpath.field("typed_config"),
                    errors,
                ) {
                    rate_limit = Some((f.name.clone(), Arc::new(r)));
                }
                continue;
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
    (suppress, rate_limit)
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
        let NetworkFilter::HttpConnectionManager(h) = &l.filter_chains[0].filter else {
            panic!("an HTTP connection manager")
        };
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
        let NetworkFilter::HttpConnectionManager(h) = &l.filter_chains[0].filter else {
            panic!("an HTTP connection manager")
        };
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
            "listener.listener_filters[0].typed_config: required (name \"envoy.filters.listener.tls_inspector\")",
            "listener.filter_chains[0].filters[0].typed_config.codec_type: unsupported value HTTP3 (supported: AUTO, HTTP1, HTTP2)",
            "listener.filter_chains[0].filters[0].typed_config.http_filters[0]: the router must be the last HTTP filter",
        ];
        for e in expected {
            assert!(errs.iter().any(|x| x == e), "missing {e:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    }

    const TCP: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

    fn tcp_chain(matcher: &str, config: &str) -> String {
        format!(
            r#"
- filter_chain_match: {matcher}
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": {TCP}
      {config}
"#
        )
    }

    fn tcp_listener(chains: &str) -> Result<Listener, Vec<String>> {
        listener(&format!(
            "name: tcp\naddress: {{ socket_address: {{ address: 0.0.0.0, port_value: 9000 }} }}\nfilter_chains:{chains}"
        ))
    }

    #[test]
    fn tcp_proxy_with_envoy_defaults() {
        let l = tcp_listener(&tcp_chain("{}", "stat_prefix: tcp\n      cluster: missing"))
            .expect("an unknown cluster is accepted, as in Envoy");
        let NetworkFilter::TcpProxy(t) = &l.filter_chains[0].filter else {
            panic!("a TCP proxy")
        };
        assert_eq!(t.stat_prefix, "tcp");
        assert!(matches!(&t.route, TcpRoute::Cluster(c) if c == "missing"));
        assert_eq!(t.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(t.max_connect_attempts, 1);
        assert!(l.rds_names().is_empty());

        let l = tcp_listener(&tcp_chain(
            "{}",
            "stat_prefix: tcp\n      idle_timeout: 0s\n      max_connect_attempts: 3\n      weighted_clusters: { clusters: [{ name: a, weight: 1 }, { name: b, weight: 3 }] }",
        ))
        .expect("valid");
        let NetworkFilter::TcpProxy(t) = &l.filter_chains[0].filter else {
            panic!("a TCP proxy")
        };
        assert_eq!(t.idle_timeout, None, "0s disables the idle timeout");
        assert_eq!(t.max_connect_attempts, 3);
        assert!(
            matches!(&t.route, TcpRoute::Weighted(w) if *w == vec![("a".to_string(), 1), ("b".to_string(), 3)])
        );
    }

    #[test]
    fn tcp_proxy_errors_are_named() {
        let errs = tcp_listener(&tcp_chain(
            "{}",
            "max_connect_attempts: 0\n      access_log: [{ name: x }]\n      weighted_clusters: { clusters: [{ name: a, weight: 0 }] }",
        ))
        .expect_err("invalid");
        let expected = [
            "listener.filter_chains[0].filters[0].typed_config.access_log: unsupported field (access logs are not implemented yet)",
            "listener.filter_chains[0].filters[0].typed_config.stat_prefix: required",
            "listener.filter_chains[0].filters[0].typed_config.weighted_clusters.clusters[0].weight: must be at least 1",
            "listener.filter_chains[0].filters[0].typed_config.max_connect_attempts: must be at least 1",
        ];
        for e in expected {
            assert!(errs.iter().any(|x| x == e), "missing {e:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
        let errs = tcp_listener(&tcp_chain("{}", "stat_prefix: t")).expect_err("invalid");
        assert_eq!(
            errs,
            vec![
                "listener.filter_chains[0].filters[0].typed_config.cluster: one of cluster, weighted_clusters is required"
            ]
        );
    }

    #[test]
    fn filter_chain_matches_are_translated_and_bad_values_rejected() {
        let l = tcp_listener(&format!(
            "{}{}",
            tcp_chain(
                "{ destination_port: 9000, prefix_ranges: [{ address_prefix: 127.0.0.77, prefix_len: 8 }], transport_protocol: raw_buffer, source_type: SAME_IP_OR_LOOPBACK, source_prefix_ranges: [{ address_prefix: '::1', prefix_len: 128 }], source_ports: [1234] }",
                "stat_prefix: a\n      cluster: a"
            ),
            tcp_chain("{}", "stat_prefix: b\n      cluster: b"),
        ))
        .expect("valid");
        let m = &l.filter_chains[0].matcher;
        assert_eq!(m.destination_port, Some(9000));
        assert_eq!(m.prefix_ranges[0].to_string(), "127.0.0.0/8");
        assert_eq!(m.source_prefix_ranges[0].to_string(), "::1/128");
        assert_eq!(m.source_type, SourceType::SameIpOrLoopback);
        assert_eq!(m.source_ports, vec![1234]);
        assert_eq!(l.filter_chains[1].matcher, FilterChainMatch::default());

        let l = tcp_listener(&tcp_chain(
            "{ server_names: [A.example, '*.b.example'], transport_protocol: tls, application_protocols: [h2] }",
            "stat_prefix: a\n      cluster: a",
        ))
        .expect("valid");
        let m = &l.filter_chains[0].matcher;
        assert_eq!(m.server_names, vec!["a.example", "*.b.example"]);
        assert_eq!(m.transport_protocol, TLS);
        assert_eq!(m.application_protocols, vec!["h2"]);

        let errs = tcp_listener(&format!(
            "{}{}{}",
            tcp_chain(
                "{ server_names: ['a.*.example'] }",
                "stat_prefix: a\n      cluster: a"
            ),
            tcp_chain(
                "{ transport_protocol: quic }",
                "stat_prefix: a\n      cluster: a"
            ),
            tcp_chain(
                "{ prefix_ranges: [{ address_prefix: '::', prefix_len: 129 }] }",
                "stat_prefix: a\n      cluster: a"
            ),
        ))
        .expect_err("invalid");
        let expected = [
            "listener.filter_chains[0].filter_chain_match.server_names[0]: \"a.*.example\" is not a server name (wildcards only as a leading \"*.\")",
            "listener.filter_chains[1].filter_chain_match.transport_protocol: unsupported value quic (supported: raw_buffer, tls)",
            "listener.filter_chains[2].filter_chain_match.prefix_ranges[0].prefix_len: 129 is more than 128",
        ];
        for e in expected {
            assert!(errs.iter().any(|x| x == e), "missing {e:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    }

    #[test]
    fn chains_with_the_same_matching_rules_are_rejected() {
        let errs = tcp_listener(&format!(
            "{}{}",
            tcp_chain("{ source_ports: [1] }", "stat_prefix: a\n      cluster: a"),
            tcp_chain("{ source_ports: [1] }", "stat_prefix: a\n      cluster: a"),
        ))
        .expect_err("invalid");
        assert_eq!(
            errs,
            vec![
                "listener.filter_chains[1].filter_chain_match: filter chain 'filter_chains[1]' has the same matching rules defined as 'filter_chains[0]'"
            ]
        );
        // Envoy clamps IPv4 lengths to 32: 10.0.0.1/40 overlaps 10.0.0.1/32.
        let errs = tcp_listener(&format!(
            "{}{}",
            tcp_chain(
                "{ prefix_ranges: [{ address_prefix: 10.0.0.1, prefix_len: 40 }] }",
                "stat_prefix: a\n      cluster: a"
            ),
            tcp_chain(
                "{ prefix_ranges: [{ address_prefix: 10.0.0.1, prefix_len: 32 }] }",
                "stat_prefix: a\n      cluster: a"
            ),
        ))
        .expect_err("invalid");
        assert_eq!(errs.len(), 1, "{errs:#?}");
        let errs = tcp_listener(&format!(
            "{}{}",
            tcp_chain(
                "{ source_prefix_ranges: [{ address_prefix: 10.1.2.3, prefix_len: 16 }] }",
                "stat_prefix: a\n      cluster: a"
            ),
            tcp_chain(
                "{ source_prefix_ranges: [{ address_prefix: 10.2.0.0, prefix_len: 16 }, { address_prefix: 10.1.0.0, prefix_len: 16 }] }",
                "stat_prefix: a\n      cluster: a"
            ),
        ))
        .expect_err("invalid");
        assert_eq!(
            errs,
            vec![
                "listener.filter_chains[1].filter_chain_match: multiple filter chains with overlapping matching rules are defined ('filter_chains[0]' and 'filter_chains[1]')"
            ]
        );
    }

    #[test]
    fn mixed_chains_and_the_default_chain_union_their_rds_names() {
        let hcm = |rds: &str| {
            format!(
                r#"
  filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": {HCM}
      stat_prefix: h
      rds: {{ route_config_name: {rds}, config_source: {{ ads: {{}} }} }}
"#
            )
        };
        let l = listener(&format!(
            "name: mixed\naddress: {{ socket_address: {{ address: 0.0.0.0, port_value: 9000 }} }}\nfilter_chains:\n- filter_chain_match: {{ destination_port: 80 }}{}\n- filter_chain_match: {{ destination_port: 81 }}{}{}\ndefault_filter_chain:{}",
            hcm("r2"),
            hcm("r1"),
            tcp_chain(
                "{ destination_port: 82 }",
                "stat_prefix: t\n      cluster: web"
            ),
            hcm("r3"),
        ));
        let l = match l {
            Ok(l) => l,
            Err(e) => panic!("{e:#?}"),
        };
        assert_eq!(l.rds_names(), vec!["r1", "r2", "r3"]);
        assert_eq!(l.filter_chains.len(), 3);
        assert!(l.default_filter_chain.is_some());
    }
}
