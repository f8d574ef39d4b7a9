//! Envoy `RouteConfiguration` → [`RouteConfig`]: virtual hosts with their domain index, routes,
//! matchers (regexes compiled here, once), actions and header mutations.
//!
//! The model is immutable once built; matching it against a request is the job of
//! `http::router`, which holds the decisions. Nothing here looks at a request.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use http::{HeaderName, HeaderValue, StatusCode};
use regex::Regex;

use super::duration;
use super::errors::{Errors, Path};

/// Envoy's default route timeout.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's default `max_direct_response_body_size_bytes`.
pub const DEFAULT_MAX_DIRECT_RESPONSE_BODY: u32 = 4096;

/// A route configuration: what `http::router` matches requests against.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    pub domains: DomainIndex,
    pub ignore_port_in_host_matching: bool,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    /// `typed_per_filter_config` (local rate limits), the least specific level.
    pub per_filter: super::local_ratelimit::PerFilter,
}

/// Virtual host lookup tables in Envoy's selection order: exact domains, then `*.suffix`
/// wildcards (longest first), then `prefix.*` wildcards (longest first), then `*`.
#[derive(Debug, Clone, Default)]
pub struct DomainIndex {
    pub exact: HashMap<String, usize>,
    /// (suffix without the `*`, virtual host), longest suffix first.
    pub suffixes: Vec<(String, usize)>,
    /// (prefix without the `*`, virtual host), longest prefix first.
    pub prefixes: Vec<(String, usize)>,
    pub default: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    /// Used by routes that have no retry policy of their own.
    pub retry_policy: Option<RetryPolicy>,
    pub per_filter: super::local_ratelimit::PerFilter,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub action: Action,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    /// `typed_per_filter_config`, the most specific level.
    pub per_filter: super::local_ratelimit::PerFilter,
}

#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
    pub query_parameters: Vec<QueryParameterMatcher>,
    /// `grpc: {}`: only requests with a gRPC content type.
    pub grpc: bool,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Matched against the whole `:path`, query included (as Envoy does).
    Prefix(String),
    /// Matched against the path without the query.
    Path(String),
    /// The path equals the prefix or continues with `/` after it.
    PathSeparatedPrefix(String),
    /// Full match of the path without the query.
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    pub name: MatchedHeader,
    pub kind: HeaderMatch,
    pub invert: bool,
    pub treat_missing_as_empty: bool,
}

/// What a header matcher looks at: a header, or one of the pseudo-headers Envoy exposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchedHeader {
    Header(HeaderName),
    Authority,
    Method,
    Path,
    Scheme,
}

#[derive(Debug, Clone)]
pub enum HeaderMatch {
    /// `present_match`: `true` matches a present header, `false` an absent one.
    Present(bool),
    Value(StringMatcher),
}

#[derive(Debug, Clone)]
pub struct QueryParameterMatcher {
    pub name: String,
    /// `None`: the parameter only has to be present.
    pub value: Option<StringMatcher>,
}

#[derive(Debug, Clone)]
pub struct StringMatcher {
    pub pattern: StringPattern,
    pub ignore_case: bool,
}

#[derive(Debug, Clone)]
pub enum StringPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// Full match.
    Regex(Regex),
}

// Actions live in the route table, built once per configuration and never moved on the
// request path, so the size difference between variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Action {
    Route(RouteAction),
    Redirect(Redirect),
    DirectResponse(DirectResponse),
}

#[derive(Debug, Clone)]
pub struct RouteAction {
    pub cluster: ClusterSpecifier,
    pub cluster_not_found_response_code: StatusCode,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<RegexRewrite>,
    pub host_rewrite: Option<HeaderValue>,
    /// `None`: no timeout (`timeout: 0s`).
    pub timeout: Option<Duration>,
    /// Overrides the virtual host's policy entirely, as in Envoy.
    pub retry_policy: Option<RetryPolicy>,
    pub mirrors: Vec<MirrorPolicy>,
    /// Route-level `upgrade_configs`: (lower-case upgrade type, enabled); they override the
    /// connection manager's.
    pub upgrades: Vec<(String, bool)>,
    /// `hash_policy`, in order (see `http::hash_policy`).
    pub hash_policy: Vec<HashPolicy>,
    /// `priority`: which of the cluster's circuit-breaker thresholds the request counts
    /// against.
    pub priority: crate::cluster::circuit_breaker::Priority,
}

/// One of a route's `hash_policy` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashPolicy {
    pub source: HashSource,
    /// Stop at this policy when it produced a hash.
    pub terminal: bool,
}

/// What a hash policy hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashSource {
    /// Every value of a header (lower-case name; pseudo-headers read the request line).
    Header(String),
    /// A cookie's value; with a `ttl`, a missing cookie is generated and set on the response
    /// (`Max-Age` = whole seconds of `ttl`, none when 0).
    Cookie {
        name: String,
        ttl: Option<Duration>,
        path: String,
        /// `attributes`: (name, value); an empty value is a bare attribute.
        attributes: Vec<(String, String)>,
    },
    /// The downstream address without its port.
    SourceIp,
    /// The first value of a query parameter.
    QueryParameter(String),
}

fn hash_policy(
    h: &pb::route_action::HashPolicy,
    path: &Path,
    errors: &mut Errors,
) -> Option<HashPolicy> {
    use pb::route_action::hash_policy::PolicySpecifier as P;
    let source = match &h.policy_specifier {
        Some(P::Header(hd)) => {
            let name = hd.header_name.to_ascii_lowercase();
            if name.is_empty()
                || http::HeaderName::from_bytes(name.trim_start_matches(':').as_bytes()).is_err()
            {
                errors.push(
                    &path.field("header").field("header_name"),
                    format!("invalid header name {:?}", hd.header_name),
                );
                return None;
            }
            HashSource::Header(name)
        }
        Some(P::Cookie(c)) => {
            if c.name.is_empty() {
                errors.push(&path.field("cookie").field("name"), "required");
                return None;
            }
            let cpath = path.field("cookie");
            let ttl = match &c.ttl {
                None => None,
                Some(d) => match duration(d) {
                    Some(d) => Some(d),
                    None => {
                        errors.push(&cpath.field("ttl"), "must not be negative");
                        None
                    }
                },
            };
            let mut attributes = Vec::new();
            for (i, a) in c.attributes.iter().enumerate() {
                let apath = cpath.field("attributes").index(i);
                let name_ok = !a.name.is_empty()
                    && a.name
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"=;,\"".contains(&b));
                if !name_ok {
                    errors.push(
                        &apath.field("name"),
                        format!("invalid cookie attribute name {:?}", a.name),
                    );
                } else if a.value.bytes().any(|b| b == b';' || b.is_ascii_control()) {
                    errors.push(
                        &apath.field("value"),
                        format!("invalid cookie attribute value {:?}", a.value),
                    );
                } else {
                    attributes.push((a.name.clone(), a.value.clone()));
                }
            }
            if c.path.bytes().any(|b| b == b';' || b.is_ascii_control()) {
                errors.push(
                    &cpath.field("path"),
                    format!("invalid cookie path {:?}", c.path),
                );
            }
            HashSource::Cookie {
                name: c.name.clone(),
                ttl,
                path: c.path.clone(),
                attributes,
            }
        }
        Some(P::ConnectionProperties(c)) => {
            if !c.source_ip {
                // Envoy hashes nothing then; say so rather than keep a policy that never hashes.
                errors.push(
                    &path.field("connection_properties").field("source_ip"),
                    "must be true (it is the only connection property)",
                );
                return None;
            }
            HashSource::SourceIp
        }
        Some(P::QueryParameter(q)) => {
            if q.name.is_empty() {
                errors.push(&path.field("query_parameter").field("name"), "required");
                return None;
            }
            HashSource::QueryParameter(q.name.clone())
        }
        // Other kinds are reported as unsupported fields by the supported-subset check.
        Some(_) => return None,
        None => {
            errors.push(
                path,
                "one of header, cookie, connection_properties, query_parameter is required",
            );
            return None;
        }
    };
    Some(HashPolicy {
        source,
        terminal: h.terminal,
    })
}

/// One of a route's `request_mirror_policies`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorPolicy {
    pub cluster: String,
    /// The share of requests mirrored: `numerator / denominator`.
    pub numerator: u64,
    pub denominator: u64,
    /// `disable_shadow_host_suffix_append`: keep the host as it is.
    pub keep_host: bool,
}

fn mirror_policy(
    m: &pb::route_action::RequestMirrorPolicy,
    check_known: &dyn Fn(&str, &Path, &mut Errors),
    path: &Path,
    errors: &mut Errors,
) -> Option<MirrorPolicy> {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    if m.cluster.is_empty() {
        errors.push(&path.field("cluster"), "required");
        return None;
    }
    check_known(&m.cluster, &path.field("cluster"), errors);
    let (numerator, denominator) = match m
        .runtime_fraction
        .as_ref()
        .and_then(|f| f.default_value.as_ref())
    {
        None => (100, 100),
        Some(f) => {
            let denominator = match DenominatorType::try_from(f.denominator) {
                Ok(DenominatorType::Hundred) => 100,
                Ok(DenominatorType::TenThousand) => 10_000,
                Ok(DenominatorType::Million) => 1_000_000,
                Err(_) => {
                    errors.push(
                        &path
                            .field("runtime_fraction")
                            .field("default_value")
                            .field("denominator"),
                        format!("unknown value {}", f.denominator),
                    );
                    100
                }
            };
            (u64::from(f.numerator).min(denominator), denominator)
        }
    };
    Some(MirrorPolicy {
        cluster: m.cluster.clone(),
        numerator,
        denominator,
        keep_host: m.disable_shadow_host_suffix_append,
    })
}

/// The `retry_on` conditions the proxy implements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub retriable_status_codes: bool,
}

/// Envoy's `RetryPolicy`, for the supported subset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    pub base_interval: Duration,
    pub max_interval: Duration,
}

/// Envoy's default retry back-off base interval.
pub const DEFAULT_RETRY_BASE_INTERVAL: Duration = Duration::from_millis(25);

fn retry_policy(p: &pb::RetryPolicy, path: &Path, errors: &mut Errors) -> RetryPolicy {
    let mut retry_on = RetryOn::default();
    let values: Vec<&str> = p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    for value in values.iter().copied() {
        match value {
            // A refused stream is one kind of reset, so next to `reset` it retries nothing more
            // (Gateway API translators, ours included, emit both). Alone it would need telling
            // REFUSED_STREAM apart from other resets, which the upstream errors cannot yet.
            "refused-stream" if values.contains(&"reset") => {}
            "refused-stream" => errors.push(
                &path.field("retry_on"),
                "unsupported retry condition \"refused-stream\" without \"reset\" (it is covered by \"reset\"; on its own it is not implemented)",
            ),
            "5xx" => retry_on.five_xx = true,
            "gateway-error" => retry_on.gateway_error = true,
            "reset" => retry_on.reset = true,
            "connect-failure" => retry_on.connect_failure = true,
            "retriable-status-codes" => retry_on.retriable_status_codes = true,
            other => errors.push(
                &path.field("retry_on"),
                format!(
                    "unsupported retry condition {other:?} (supported: 5xx, gateway-error, reset, connect-failure, retriable-status-codes)"
                ),
            ),
        }
    }
    let mut retriable_status_codes = Vec::new();
    for (i, code) in p.retriable_status_codes.iter().enumerate() {
        match u16::try_from(*code) {
            Ok(c) if (100..600).contains(&c) => retriable_status_codes.push(c),
            _ => errors.push(
                &path.field("retriable_status_codes").index(i),
                format!("{code} is not a status code"),
            ),
        }
    }
    let per_try_timeout = match &p.per_try_timeout {
        None => None,
        Some(d) => match duration(d) {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => {
                errors.push(&path.field("per_try_timeout"), "must not be negative");
                None
            }
        },
    };
    let (base_interval, max_interval) = match &p.retry_back_off {
        None => (
            DEFAULT_RETRY_BASE_INTERVAL,
            DEFAULT_RETRY_BASE_INTERVAL * 10,
        ),
        Some(b) => {
            let bpath = path.field("retry_back_off");
            let base = match b.base_interval.as_ref().map(duration) {
                Some(Some(d)) if !d.is_zero() => d,
                Some(_) => {
                    errors.push(&bpath.field("base_interval"), "must be greater than 0");
                    DEFAULT_RETRY_BASE_INTERVAL
                }
                None => {
                    errors.push(&bpath.field("base_interval"), "required");
                    DEFAULT_RETRY_BASE_INTERVAL
                }
            };
            let max = match b.max_interval.as_ref().map(duration) {
                None => base * 10,
                Some(Some(d)) if !d.is_zero() => d,
                Some(_) => {
                    errors.push(&bpath.field("max_interval"), "must be greater than 0");
                    base * 10
                }
            };
            if max < base {
                errors.push(
                    &bpath.field("max_interval"),
                    "max_interval must be greater than or equal to the base_interval",
                );
            }
            (base, max)
        }
    };
    RetryPolicy {
        retry_on,
        num_retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout,
        retriable_status_codes,
        base_interval,
        max_interval,
    }
}

#[derive(Debug, Clone)]
pub enum ClusterSpecifier {
    Cluster(String),
    Weighted {
        clusters: Vec<WeightedClusterEntry>,
        total_weight: u64,
    },
}

#[derive(Debug, Clone)]
pub struct WeightedClusterEntry {
    pub name: String,
    pub weight: u32,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub host_rewrite: Option<HeaderValue>,
}

#[derive(Debug, Clone)]
pub struct RegexRewrite {
    pub pattern: Regex,
    /// In the `regex` crate's syntax (`${1}`), translated from RE2's `\1`.
    pub substitution: String,
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: RedirectPath,
    pub response_code: StatusCode,
    pub strip_query: bool,
}

#[derive(Debug, Clone)]
pub enum RedirectPath {
    Keep,
    Path(String),
    PrefixRewrite(String),
    RegexRewrite(RegexRewrite),
}

#[derive(Debug, Clone)]
pub struct DirectResponse {
    pub status: StatusCode,
    pub body: Option<Bytes>,
}

/// `*_headers_to_add` / `*_headers_to_remove` of one level (removals apply first, as in Envoy).
#[derive(Debug, Clone, Default)]
pub struct HeaderMutations {
    pub remove: Vec<HeaderName>,
    pub add: Vec<HeaderAddition>,
}

impl HeaderMutations {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct HeaderAddition {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub action: AppendAction,
}

/// Envoy's `HeaderValueOption.HeaderAppendAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

/// Context a route configuration is translated in.
pub struct RouteContext<'a> {
    /// With `validate_clusters` (the default for static route configurations), every cluster
    /// a route names must be one of these.
    pub known_clusters: Option<&'a HashSet<String>>,
    /// Whether `validate_clusters` defaults to true (inline route configurations) or false (RDS).
    pub validate_clusters_default: bool,
}

/// A route configuration with no virtual hosts (every request: 404 no route), what an RDS
/// connection manager holds until its routes arrive.
pub fn empty_route_config(name: &str) -> RouteConfig {
    translate(
        &pb::RouteConfiguration {
            name: name.to_string(),
            ..Default::default()
        },
        &RouteContext {
            known_clusters: None,
            validate_clusters_default: false,
        },
        &Path::root(),
        &mut Errors::new(),
    )
}

pub fn translate(
    rc: &pb::RouteConfiguration,
    ctx: &RouteContext<'_>,
    path: &Path,
    errors: &mut Errors,
) -> RouteConfig {
    let validate = rc
        .validate_clusters
        .map(|v| v.value)
        .unwrap_or(ctx.validate_clusters_default);
    let max_body = rc
        .max_direct_response_body_size_bytes
        .map(|v| v.value)
        .unwrap_or(DEFAULT_MAX_DIRECT_RESPONSE_BODY);
    let known = if validate { ctx.known_clusters } else { None };

    let mut virtual_hosts = Vec::with_capacity(rc.virtual_hosts.len());
    let mut domains = DomainIndex::default();
    let mut seen_domains: HashSet<String> = HashSet::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let vpath = path.field("virtual_hosts").index(i);
        let vh_model = virtual_host(vh, known, max_body, &vpath, errors);
        for (j, d) in vh_model.domains.iter().enumerate() {
            let dpath = vpath.field("domains").index(j);
            if !seen_domains.insert(d.clone()) {
                errors.push(
                    &dpath,
                    format!("only unique values for domains are permitted; duplicate entry of domain {d}"),
                );
                continue;
            }
            index_domain(&mut domains, d, virtual_hosts.len(), &dpath, errors);
        }
        virtual_hosts.push(vh_model);
    }
    domains
        .suffixes
        .sort_by_key(|s| std::cmp::Reverse(s.0.len()));
    domains
        .prefixes
        .sort_by_key(|p| std::cmp::Reverse(p.0.len()));

    RouteConfig {
        name: rc.name.clone(),
        virtual_hosts,
        domains,
        ignore_port_in_host_matching: rc.ignore_port_in_host_matching,
        per_filter: super::local_ratelimit::per_filter(&rc.typed_per_filter_config, path, errors),
        request_headers: header_mutations(
            &rc.request_headers_to_add,
            &rc.request_headers_to_remove,
            path,
            "request",
            errors,
        ),
        response_headers: header_mutations(
            &rc.response_headers_to_add,
            &rc.response_headers_to_remove,
            path,
            "response",
            errors,
        ),
    }
}

fn index_domain(index: &mut DomainIndex, d: &str, vh: usize, path: &Path, errors: &mut Errors) {
    if d == "*" {
        index.default = Some(vh);
        return;
    }
    let stars = d.matches('*').count();
    if stars == 0 {
        index.exact.insert(d.to_string(), vh);
    } else if stars == 1 && d.starts_with('*') {
        index.suffixes.push((d[1..].to_string(), vh));
    } else if stars == 1 && d.ends_with('*') {
        index.prefixes.push((d[..d.len() - 1].to_string(), vh));
    } else {
        errors.push(
            path,
            format!(
                "invalid domain {d:?}: a wildcard is only allowed as the first or last character"
            ),
        );
    }
}

fn virtual_host(
    vh: &pb::VirtualHost,
    known: Option<&HashSet<String>>,
    max_body: u32,
    path: &Path,
    errors: &mut Errors,
) -> VirtualHost {
    if vh.name.is_empty() {
        errors.push(&path.field("name"), "required");
    }
    if vh.domains.is_empty() {
        errors.push(&path.field("domains"), "at least one domain is required");
    }
    let domains = vh.domains.iter().map(|d| d.to_ascii_lowercase()).collect();
    let routes = vh
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| route(r, known, max_body, &path.field("routes").index(i), errors))
        .collect();
    let retry_policy = vh
        .retry_policy
        .as_ref()
        .map(|p| retry_policy(p, &path.field("retry_policy"), errors));
    VirtualHost {
        name: vh.name.clone(),
        domains,
        routes,
        retry_policy,
        per_filter: super::local_ratelimit::per_filter(&vh.typed_per_filter_config, path, errors),
        request_headers: header_mutations(
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            path,
            "request",
            errors,
        ),
        response_headers: header_mutations(
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
            path,
            "response",
            errors,
        ),
    }
}

fn route(
    r: &pb::Route,
    known: Option<&HashSet<String>>,
    max_body: u32,
    path: &Path,
    errors: &mut Errors,
) -> Option<Route> {
    let mpath = path.field("match");
    let matcher = match &r.r#match {
        Some(m) => route_match(m, &mpath, errors),
        None => {
            errors.push(&mpath, "required");
            None
        }
    };
    let action = match &r.action {
        Some(pb::route::Action::Route(a)) => {
            route_action(a, known, &path.field("route"), errors).map(Action::Route)
        }
        Some(pb::route::Action::Redirect(a)) => {
            redirect(a, &path.field("redirect"), errors).map(Action::Redirect)
        }
        Some(pb::route::Action::DirectResponse(a)) => {
            direct_response(a, max_body, &path.field("direct_response"), errors)
                .map(Action::DirectResponse)
        }
        // Reported as unsupported fields by the supported-subset check.
        Some(_) => None,
        None => {
            errors.push(path, "one of route, redirect, direct_response is required");
            None
        }
    };
    let request_headers = header_mutations(
        &r.request_headers_to_add,
        &r.request_headers_to_remove,
        path,
        "request",
        errors,
    );
    let response_headers = header_mutations(
        &r.response_headers_to_add,
        &r.response_headers_to_remove,
        path,
        "response",
        errors,
    );
    let per_filter = super::local_ratelimit::per_filter(&r.typed_per_filter_config, path, errors);
    Some(Route {
        name: r.name.clone(),
        matcher: matcher?,
        action: action?,
        request_headers,
        response_headers,
        per_filter,
    })
}

fn route_match(m: &pb::RouteMatch, path: &Path, errors: &mut Errors) -> Option<RouteMatch> {
    use pb::route_match::PathSpecifier;
    let case_sensitive = m.case_sensitive.map(|v| v.value).unwrap_or(true);
    let path_match = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => Some(PathMatch::Prefix(p.clone())),
        Some(PathSpecifier::Path(p)) => Some(PathMatch::Path(p.clone())),
        Some(PathSpecifier::PathSeparatedPrefix(p)) => {
            let ppath = path.field("path_separated_prefix");
            if !p.starts_with('/') || (p.len() > 1 && p.ends_with('/')) || p.contains(['?', '#']) {
                errors.push(
                    &ppath,
                    "must start with '/', must not end with '/' and must not contain '?' or '#'",
                );
                None
            } else {
                Some(PathMatch::PathSeparatedPrefix(p.clone()))
            }
        }
        Some(PathSpecifier::SafeRegex(r)) => {
            regex_matcher(r, &path.field("safe_regex"), errors).map(PathMatch::Regex)
        }
        // Reported as unsupported fields by the supported-subset check.
        Some(_) => None,
        None => {
            errors.push(
                path,
                "one of prefix, path, safe_regex, path_separated_prefix is required",
            );
            None
        }
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .filter_map(|(i, h)| header_matcher(h, &path.field("headers").index(i), errors))
        .collect();
    let query_parameters = m
        .query_parameters
        .iter()
        .enumerate()
        .filter_map(|(i, q)| {
            let qpath = path.field("query_parameters").index(i);
            if q.name.is_empty() {
                errors.push(&qpath.field("name"), "required");
                return None;
            }
            use pb::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
            let value = match &q.query_parameter_match_specifier {
                Some(Q::StringMatch(s)) => {
                    Some(string_matcher(s, &qpath.field("string_match"), errors)?)
                }
                Some(Q::PresentMatch(_)) | None => None,
            };
            Some(QueryParameterMatcher {
                name: q.name.clone(),
                value,
            })
        })
        .collect();
    Some(RouteMatch {
        path: path_match?,
        case_sensitive,
        headers,
        query_parameters,
        grpc: m.grpc.is_some(),
    })
}

#[allow(deprecated)] // Envoy still accepts the deprecated form; so do we.
fn header_matcher(
    h: &pb::HeaderMatcher,
    path: &Path,
    errors: &mut Errors,
) -> Option<HeaderMatcher> {
    use pb::header_matcher::HeaderMatchSpecifier as S;
    let name = match h.name.as_str() {
        ":authority" => MatchedHeader::Authority,
        ":method" => MatchedHeader::Method,
        ":path" => MatchedHeader::Path,
        ":scheme" => MatchedHeader::Scheme,
        other => match HeaderName::from_bytes(other.as_bytes()) {
            Ok(n) => MatchedHeader::Header(n),
            Err(_) => {
                errors.push(
                    &path.field("name"),
                    format!("invalid header name {other:?}"),
                );
                return None;
            }
        },
    };
    let exact = |s: &str| StringMatcher {
        pattern: StringPattern::Exact(s.to_string()),
        ignore_case: false,
    };
    let kind = match &h.header_match_specifier {
        Some(S::ExactMatch(s)) => HeaderMatch::Value(exact(s)),
        Some(S::PrefixMatch(s)) => HeaderMatch::Value(StringMatcher {
            pattern: StringPattern::Prefix(s.clone()),
            ignore_case: false,
        }),
        Some(S::SuffixMatch(s)) => HeaderMatch::Value(StringMatcher {
            pattern: StringPattern::Suffix(s.clone()),
            ignore_case: false,
        }),
        Some(S::ContainsMatch(s)) => HeaderMatch::Value(StringMatcher {
            pattern: StringPattern::Contains(s.clone()),
            ignore_case: false,
        }),
        Some(S::SafeRegexMatch(r)) => HeaderMatch::Value(StringMatcher {
            pattern: StringPattern::Regex(regex_matcher(
                r,
                &path.field("safe_regex_match"),
                errors,
            )?),
            ignore_case: false,
        }),
        Some(S::StringMatch(s)) => {
            HeaderMatch::Value(string_matcher(s, &path.field("string_match"), errors)?)
        }
        Some(S::PresentMatch(p)) => HeaderMatch::Present(*p),
        // Reported as an unsupported field by the supported-subset check.
        Some(S::RangeMatch(_)) => return None,
        // Envoy: no specifier means "the header is present".
        None => HeaderMatch::Present(true),
    };
    Some(HeaderMatcher {
        name,
        kind,
        invert: h.invert_match,
        treat_missing_as_empty: h.treat_missing_header_as_empty,
    })
}

pub fn string_matcher(
    s: &matcher::StringMatcher,
    path: &Path,
    errors: &mut Errors,
) -> Option<StringMatcher> {
    use matcher::string_matcher::MatchPattern as P;
    let lower = |v: &str| {
        if s.ignore_case {
            v.to_ascii_lowercase()
        } else {
            v.to_string()
        }
    };
    let pattern = match &s.match_pattern {
        Some(P::Exact(v)) => StringPattern::Exact(lower(v)),
        Some(P::Prefix(v)) if !v.is_empty() => StringPattern::Prefix(lower(v)),
        Some(P::Suffix(v)) if !v.is_empty() => StringPattern::Suffix(lower(v)),
        Some(P::Contains(v)) if !v.is_empty() => StringPattern::Contains(lower(v)),
        Some(P::Prefix(_)) => return empty(errors, &path.field("prefix")),
        Some(P::Suffix(_)) => return empty(errors, &path.field("suffix")),
        Some(P::Contains(_)) => return empty(errors, &path.field("contains")),
        Some(P::SafeRegex(r)) => {
            if s.ignore_case {
                errors.push(
                    &path.field("ignore_case"),
                    "has no effect on safe_regex; use (?i) in the regex",
                );
            }
            StringPattern::Regex(regex_matcher(r, &path.field("safe_regex"), errors)?)
        }
        // Reported as an unsupported field by the supported-subset check.
        Some(P::Custom(_)) => return None,
        None => {
            errors.push(
                path,
                "one of exact, prefix, suffix, safe_regex, contains is required",
            );
            return None;
        }
    };
    Some(StringMatcher {
        pattern,
        ignore_case: s.ignore_case,
    })
}

fn empty<T>(errors: &mut Errors, path: &Path) -> Option<T> {
    errors.push(path, "must not be empty");
    None
}

/// Compiles an RE2 pattern for full matching.
pub fn regex_matcher(r: &matcher::RegexMatcher, path: &Path, errors: &mut Errors) -> Option<Regex> {
    compile(&r.regex, true, &path.field("regex"), errors)
}

fn compile(pattern: &str, anchored: bool, path: &Path, errors: &mut Errors) -> Option<Regex> {
    // Validate the pattern as written, so the error points into what the user wrote.
    if let Err(e) = Regex::new(pattern) {
        let text = e.to_string();
        let reason = text
            .lines()
            .last()
            .unwrap_or(&text)
            .trim_start_matches("error: ");
        errors.push(path, format!("invalid regex {pattern:?}: {reason}"));
        return None;
    }
    let source = if anchored {
        format!("^(?:{pattern})$")
    } else {
        pattern.to_string()
    };
    match Regex::new(&source) {
        Ok(r) => Some(r),
        Err(e) => {
            errors.push(path, format!("invalid regex {pattern:?}: {e}"));
            None
        }
    }
}

fn regex_rewrite(
    r: &matcher::RegexMatchAndSubstitute,
    path: &Path,
    errors: &mut Errors,
) -> Option<RegexRewrite> {
    let Some(pattern) = &r.pattern else {
        errors.push(&path.field("pattern"), "required");
        return None;
    };
    // Rewrites replace every match anywhere in the path, so the pattern is not anchored.
    let pattern = compile(
        &pattern.regex,
        false,
        &path.field("pattern").field("regex"),
        errors,
    )?;
    Some(RegexRewrite {
        pattern,
        substitution: re2_substitution(&r.substitution),
    })
}

/// RE2 writes capture groups as `\1`; the `regex` crate as `${1}` and treats `$` specially.
fn re2_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(d) if d.is_ascii_digit() => {
                    out.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn route_action(
    a: &pb::RouteAction,
    known: Option<&HashSet<String>>,
    path: &Path,
    errors: &mut Errors,
) -> Option<RouteAction> {
    use pb::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as H};
    let check_known = |name: &str, p: &Path, errors: &mut Errors| {
        if let Some(known) = known
            && !known.contains(name)
        {
            errors.push(p, format!("unknown cluster {name:?}"));
        }
    };
    let cluster = match &a.cluster_specifier {
        Some(C::Cluster(name)) if !name.is_empty() => {
            check_known(name, &path.field("cluster"), errors);
            Some(ClusterSpecifier::Cluster(name.clone()))
        }
        Some(C::Cluster(_)) => {
            errors.push(&path.field("cluster"), "must not be empty");
            None
        }
        Some(C::WeightedClusters(w)) => {
            weighted_clusters(w, &check_known, &path.field("weighted_clusters"), errors)
        }
        // Reported as unsupported fields by the supported-subset check.
        Some(_) => None,
        None => {
            errors.push(path, "one of cluster, weighted_clusters is required");
            None
        }
    };
    let cluster_not_found_response_code =
        match pb::route_action::ClusterNotFoundResponseCode::try_from(
            a.cluster_not_found_response_code,
        ) {
            Ok(pb::route_action::ClusterNotFoundResponseCode::ServiceUnavailable) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Ok(pb::route_action::ClusterNotFoundResponseCode::NotFound) => StatusCode::NOT_FOUND,
            Ok(pb::route_action::ClusterNotFoundResponseCode::InternalServerError) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Err(_) => {
                errors.push(
                    &path.field("cluster_not_found_response_code"),
                    format!("unknown value {}", a.cluster_not_found_response_code),
                );
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
    let prefix_rewrite = (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone());
    let regex_rewrite = a
        .regex_rewrite
        .as_ref()
        .and_then(|r| regex_rewrite(r, &path.field("regex_rewrite"), errors));
    if prefix_rewrite.is_some() && a.regex_rewrite.is_some() {
        errors.push(
            &path.field("regex_rewrite"),
            "cannot be combined with prefix_rewrite",
        );
    }
    let host_rewrite = match &a.host_rewrite_specifier {
        Some(H::HostRewriteLiteral(h)) => {
            header_value(h.as_bytes(), &path.field("host_rewrite_literal"), errors)
        }
        // Reported as unsupported fields by the supported-subset check.
        _ => None,
    };
    let timeout = match &a.timeout {
        None => Some(DEFAULT_ROUTE_TIMEOUT),
        Some(d) => match duration(d) {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => {
                errors.push(&path.field("timeout"), "must not be negative");
                None
            }
        },
    };
    let retry_policy = a
        .retry_policy
        .as_ref()
        .map(|p| retry_policy(p, &path.field("retry_policy"), errors));
    let mirrors = a
        .request_mirror_policies
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            mirror_policy(
                m,
                &check_known,
                &path.field("request_mirror_policies").index(i),
                errors,
            )
        })
        .collect();
    let mut upgrades = Vec::new();
    for (i, u) in a.upgrade_configs.iter().enumerate() {
        let kind = u.upgrade_type.to_ascii_lowercase();
        if kind != "websocket" {
            errors.push(
                &path.field("upgrade_configs").index(i).field("upgrade_type"),
                format!(
                    "unsupported upgrade type {:?} (only websocket is supported)",
                    u.upgrade_type
                ),
            );
            continue;
        }
        upgrades.push((kind, u.enabled.as_ref().is_none_or(|e| e.value)));
    }
    let hash_policy = a
        .hash_policy
        .iter()
        .enumerate()
        .filter_map(|(i, h)| hash_policy(h, &path.field("hash_policy").index(i), errors))
        .collect();
    let priority = {
        use crate::cluster::circuit_breaker::Priority;
        use core::RoutingPriority as P;
        match P::try_from(a.priority) {
            Ok(P::Default) => Priority::Default,
            Ok(P::High) => Priority::High,
            Err(_) => {
                errors.push(
                    &path.field("priority"),
                    format!("unknown value {}", a.priority),
                );
                Priority::Default
            }
        }
    };
    Some(RouteAction {
        cluster: cluster?,
        cluster_not_found_response_code,
        prefix_rewrite,
        regex_rewrite,
        host_rewrite,
        timeout,
        retry_policy,
        mirrors,
        upgrades,
        hash_policy,
        priority,
    })
}

#[allow(deprecated)] // Envoy still accepts the deprecated form; so do we.
fn weighted_clusters(
    w: &pb::WeightedCluster,
    check_known: &dyn Fn(&str, &Path, &mut Errors),
    path: &Path,
    errors: &mut Errors,
) -> Option<ClusterSpecifier> {
    use pb::weighted_cluster::cluster_weight::HostRewriteSpecifier as H;
    if w.clusters.is_empty() {
        errors.push(&path.field("clusters"), "at least one cluster is required");
        return None;
    }
    let mut clusters = Vec::with_capacity(w.clusters.len());
    let mut total: u64 = 0;
    for (i, cw) in w.clusters.iter().enumerate() {
        let cpath = path.field("clusters").index(i);
        if cw.name.is_empty() {
            errors.push(&cpath.field("name"), "required");
            continue;
        }
        check_known(&cw.name, &cpath.field("name"), errors);
        let weight = cw.weight.map(|v| v.value).unwrap_or(0);
        total += u64::from(weight);
        let host_rewrite = match &cw.host_rewrite_specifier {
            Some(H::HostRewriteLiteral(h)) => {
                header_value(h.as_bytes(), &cpath.field("host_rewrite_literal"), errors)
            }
            None => None,
        };
        clusters.push(WeightedClusterEntry {
            name: cw.name.clone(),
            weight,
            request_headers: header_mutations(
                &cw.request_headers_to_add,
                &cw.request_headers_to_remove,
                &cpath,
                "request",
                errors,
            ),
            response_headers: header_mutations(
                &cw.response_headers_to_add,
                &cw.response_headers_to_remove,
                &cpath,
                "response",
                errors,
            ),
            host_rewrite,
        });
    }
    if total == 0 {
        errors.push(
            &path.field("clusters"),
            "the sum of weights must be greater than 0",
        );
        return None;
    }
    if let Some(t) = w.total_weight
        && u64::from(t.value) != total
    {
        errors.push(
            &path.field("total_weight"),
            format!("is {} but the weights sum to {total}", t.value),
        );
    }
    Some(ClusterSpecifier::Weighted {
        clusters,
        total_weight: total,
    })
}

fn redirect(a: &pb::RedirectAction, path: &Path, errors: &mut Errors) -> Option<Redirect> {
    use pb::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode as R, SchemeRewriteSpecifier as S,
    };
    let scheme = match &a.scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => Some("https".to_string()),
        Some(S::HttpsRedirect(false)) | None => None,
        Some(S::SchemeRedirect(s)) if !s.is_empty() => Some(s.to_ascii_lowercase()),
        Some(S::SchemeRedirect(_)) => None,
    };
    let port = match a.port_redirect {
        0 => None,
        p => match u16::try_from(p) {
            Ok(p) => Some(p),
            Err(_) => {
                errors.push(
                    &path.field("port_redirect"),
                    format!("{p} is not a TCP port"),
                );
                None
            }
        },
    };
    let rpath = match &a.path_rewrite_specifier {
        None => RedirectPath::Keep,
        Some(P::PathRedirect(p)) => RedirectPath::Path(p.clone()),
        Some(P::PrefixRewrite(p)) => RedirectPath::PrefixRewrite(p.clone()),
        Some(P::RegexRewrite(r)) => {
            RedirectPath::RegexRewrite(regex_rewrite(r, &path.field("regex_rewrite"), errors)?)
        }
        // Reported as an unsupported field by the supported-subset check.
        Some(P::PathRewrite(_)) => return None,
    };
    let response_code = match R::try_from(a.response_code) {
        Ok(R::MovedPermanently) => StatusCode::MOVED_PERMANENTLY,
        Ok(R::Found) => StatusCode::FOUND,
        Ok(R::SeeOther) => StatusCode::SEE_OTHER,
        Ok(R::TemporaryRedirect) => StatusCode::TEMPORARY_REDIRECT,
        Ok(R::PermanentRedirect) => StatusCode::PERMANENT_REDIRECT,
        Err(_) => {
            errors.push(
                &path.field("response_code"),
                format!("unknown value {}", a.response_code),
            );
            return None;
        }
    };
    Some(Redirect {
        scheme,
        host: (!a.host_redirect.is_empty()).then(|| a.host_redirect.clone()),
        port,
        path: rpath,
        response_code,
        strip_query: a.strip_query,
    })
}

fn direct_response(
    a: &pb::DirectResponseAction,
    max_body: u32,
    path: &Path,
    errors: &mut Errors,
) -> Option<DirectResponse> {
    use core::data_source::Specifier;
    let status = match u16::try_from(a.status)
        .ok()
        .filter(|s| (200..600).contains(s))
    {
        Some(s) => StatusCode::from_u16(s).ok(),
        None => None,
    };
    if status.is_none() {
        errors.push(
            &path.field("status"),
            format!("{} is not a status code in [200, 600)", a.status),
        );
    }
    let body = match a.body.as_ref().and_then(|b| b.specifier.as_ref()) {
        Some(Specifier::InlineString(s)) => Some(Bytes::from(s.clone())),
        Some(Specifier::InlineBytes(b)) => Some(Bytes::from(b.clone())),
        // The table accepts `filename` for TLS certificates (`DataSource` is shared).
        Some(Specifier::Filename(_)) => {
            errors.push(
                &path.field("body").field("filename"),
                "unsupported field (use inline_string or inline_bytes)",
            );
            None
        }
        // Reported as unsupported fields by the supported-subset check.
        Some(_) => None,
        None => None,
    };
    if let Some(b) = &body
        && b.len() > max_body as usize
    {
        errors.push(
            &path.field("body"),
            format!(
                "is {} bytes, more than max_direct_response_body_size_bytes ({max_body})",
                b.len()
            ),
        );
    }
    Some(DirectResponse {
        status: status?,
        body,
    })
}

/// Reads one level of `{direction}_headers_to_add` / `{direction}_headers_to_remove`.
pub fn header_mutations(
    add: &[core::HeaderValueOption],
    remove: &[String],
    path: &Path,
    direction: &str,
    errors: &mut Errors,
) -> HeaderMutations {
    let mut out = HeaderMutations::default();
    let remove_field = format!("{direction}_headers_to_remove");
    for (i, name) in remove.iter().enumerate() {
        if let Some(n) = modifiable_header(name, &path.field(&remove_field).index(i), errors) {
            out.remove.push(n);
        }
    }
    let add_field = format!("{direction}_headers_to_add");
    for (i, option) in add.iter().enumerate() {
        let opath = path.field(&add_field).index(i);
        if let Some(a) = header_addition(option, &opath, errors) {
            out.add.push(a);
        }
    }
    out
}

#[allow(deprecated)] // Envoy still accepts the deprecated form; so do we.
pub(crate) fn header_addition(
    o: &core::HeaderValueOption,
    path: &Path,
    errors: &mut Errors,
) -> Option<HeaderAddition> {
    use core::header_value_option::HeaderAppendAction as A;
    let hpath = path.field("header");
    let Some(h) = &o.header else {
        errors.push(&hpath, "required");
        return None;
    };
    let name = modifiable_header(&h.key, &hpath.field("key"), errors);
    let raw = if !h.raw_value.is_empty() {
        if !h.value.is_empty() {
            errors.push(&hpath, "only one of value, raw_value may be set");
        }
        match String::from_utf8(h.raw_value.clone()) {
            Ok(s) => s,
            Err(_) => {
                errors.push(&hpath.field("raw_value"), "must be valid UTF-8");
                return None;
            }
        }
    } else {
        h.value.clone()
    };
    let vpath = hpath.field(if h.raw_value.is_empty() {
        "value"
    } else {
        "raw_value"
    });
    let literal = unescape_formatter(&raw, &vpath, errors)?;
    let action = if let Some(append) = o.append {
        if o.append_action != A::AppendIfExistsOrAdd as i32 {
            errors.push(path, "append and append_action are mutually exclusive");
        }
        if append.value {
            AppendAction::AppendIfExistsOrAdd
        } else {
            AppendAction::OverwriteIfExistsOrAdd
        }
    } else {
        match A::try_from(o.append_action) {
            Ok(A::AppendIfExistsOrAdd) => AppendAction::AppendIfExistsOrAdd,
            Ok(A::AddIfAbsent) => AppendAction::AddIfAbsent,
            Ok(A::OverwriteIfExistsOrAdd) => AppendAction::OverwriteIfExistsOrAdd,
            Ok(A::OverwriteIfExists) => AppendAction::OverwriteIfExists,
            Err(_) => {
                errors.push(
                    &path.field("append_action"),
                    format!("unknown value {}", o.append_action),
                );
                return None;
            }
        }
    };
    // An empty value is not added unless keep_empty_value (Envoy's behaviour).
    if literal.is_empty() && !o.keep_empty_value {
        return None;
    }
    let value = header_value(literal.as_bytes(), &vpath, errors)?;
    Some(HeaderAddition {
        name: name?,
        value,
        action,
    })
}

/// Header values are Envoy substitution format strings; `%%` is a literal `%` and any other
/// `%COMMAND%` would need the formatter, which is not implemented.
fn unescape_formatter(v: &str, path: &Path, errors: &mut Errors) -> Option<String> {
    let mut out = String::with_capacity(v.len());
    let mut rest = v;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('%') {
            out.push('%');
            rest = stripped;
        } else {
            let command = after.split('%').next().unwrap_or(after);
            errors.push(
                path,
                format!(
                    "substitution formatter command %{command}% is not implemented (write %% for a literal %)"
                ),
            );
            return None;
        }
    }
    out.push_str(rest);
    Some(out)
}

fn modifiable_header(name: &str, path: &Path, errors: &mut Errors) -> Option<HeaderName> {
    if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
        errors.push(
            path,
            format!(":-prefixed or host headers may not be modified ({name})"),
        );
        return None;
    }
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(n) => Some(n),
        Err(_) => {
            errors.push(path, format!("invalid header name {name:?}"));
            None
        }
    }
}

fn header_value(v: &[u8], path: &Path, errors: &mut Errors) -> Option<HeaderValue> {
    match HeaderValue::from_bytes(v) {
        Ok(v) => Some(v),
        Err(_) => {
            errors.push(path, "invalid header value");
            None
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn route_config(yaml: &str, clusters: &[&str]) -> Result<RouteConfig, Vec<String>> {
        let pb: pb::RouteConfiguration =
            capstan_proto::from_yaml(yaml).map_err(|e| vec![e.to_string()])?;
        let known: HashSet<String> = clusters.iter().map(|s| s.to_string()).collect();
        let mut errors = Errors::new();
        crate::config::supported::check(&pb, &Path::new("route_config"), &mut errors);
        let rc = translate(
            &pb,
            &RouteContext {
                known_clusters: Some(&known),
                validate_clusters_default: true,
            },
            &Path::new("route_config"),
            &mut errors,
        );
        if errors.is_empty() {
            Ok(rc)
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    #[test]
    fn domains_are_indexed_in_envoy_order() {
        let rc = route_config(
            r#"
virtual_hosts:
- { name: a, domains: ["Example.com", "*.example.com"], routes: [] }
- { name: b, domains: ["*.com", "api.*", "*"], routes: [] }
- { name: c, domains: ["*.b.example.com", "api.v1.*"], routes: [] }
"#,
            &[],
        )
        .expect("valid");
        assert_eq!(rc.domains.exact.get("example.com"), Some(&0));
        let suffixes: Vec<&str> = rc.domains.suffixes.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(suffixes, vec![".b.example.com", ".example.com", ".com"]);
        let prefixes: Vec<&str> = rc.domains.prefixes.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(prefixes, vec!["api.v1.", "api."]);
        assert_eq!(rc.domains.default, Some(1));
    }

    #[test]
    fn retry_policies_take_envoy_defaults() {
        let rc = route_config(
            r#"
virtual_hosts:
- name: a
  domains: ["*"]
  retry_policy: { retry_on: "5xx, gateway-error", retry_back_off: { base_interval: 0.1s } }
  routes:
  - match: { prefix: /x }
    route:
      cluster: web
      retry_policy:
        retry_on: reset,connect-failure,refused-stream,retriable-status-codes
        retriable_status_codes: [409]
        num_retries: 3
        per_try_timeout: 0.25s
        retry_back_off: { base_interval: 0.01s, max_interval: 0.05s }
      request_mirror_policies:
      - cluster: web
      - cluster: web
        runtime_fraction: { default_value: { numerator: 5, denominator: TEN_THOUSAND } }
        disable_shadow_host_suffix_append: true
      upgrade_configs: [{ upgrade_type: WebSocket, enabled: false }]
"#,
            &["web"],
        )
        .expect("valid");
        let vh = &rc.virtual_hosts[0];
        let p = vh.retry_policy.as_ref().expect("vhost policy");
        assert!(p.retry_on.five_xx && p.retry_on.gateway_error && !p.retry_on.reset);
        assert_eq!(p.num_retries, 1);
        assert_eq!(p.per_try_timeout, None);
        assert_eq!(p.base_interval, Duration::from_millis(100));
        assert_eq!(p.max_interval, Duration::from_secs(1));
        let Action::Route(a) = &vh.routes[0].action else {
            panic!("route action");
        };
        let p = a.retry_policy.as_ref().expect("route policy");
        assert_eq!(
            p.retry_on,
            RetryOn {
                reset: true,
                connect_failure: true,
                retriable_status_codes: true,
                ..RetryOn::default()
            }
        );
        assert_eq!(p.retriable_status_codes, vec![409]);
        assert_eq!(p.num_retries, 3);
        assert_eq!(p.per_try_timeout, Some(Duration::from_millis(250)));
        assert_eq!(p.base_interval, Duration::from_millis(10));
        assert_eq!(p.max_interval, Duration::from_millis(50));
        assert_eq!(
            a.mirrors,
            vec![
                MirrorPolicy {
                    cluster: "web".into(),
                    numerator: 100,
                    denominator: 100,
                    keep_host: false,
                },
                MirrorPolicy {
                    cluster: "web".into(),
                    numerator: 5,
                    denominator: 10_000,
                    keep_host: true,
                },
            ]
        );
        assert_eq!(a.upgrades, vec![("websocket".to_string(), false)]);
    }

    #[test]
    fn unimplemented_retry_mirror_and_upgrade_settings_are_rejected() {
        let errs = route_config(
            r#"
virtual_hosts:
- name: a
  domains: ["*"]
  include_request_attempt_count: true
  request_mirror_policies: [{ cluster: web }]
  routes:
  - match: { prefix: / }
    route:
      cluster: web
      retry_policy:
        retry_on: refused-stream
        retry_host_predicate: [{ name: envoy.retry_host_predicates.previous_hosts }]
        retry_back_off: { base_interval: 1s, max_interval: 0.5s }
      request_mirror_policies:
      - { cluster: nope, runtime_fraction: { runtime_key: k, default_value: { numerator: 1 } } }
      upgrade_configs: [{ upgrade_type: CONNECT }]
"#,
            &["web"],
        )
        .expect_err("invalid");
        let expected = [
            "route_config.virtual_hosts[0].include_request_attempt_count: unsupported field",
            "route_config.virtual_hosts[0].request_mirror_policies: unsupported field (request mirroring is supported on routes only (route.request_mirror_policies))",
            "route_config.virtual_hosts[0].routes[0].route.retry_policy.retry_host_predicate: unsupported field",
            "route_config.virtual_hosts[0].routes[0].route.request_mirror_policies[0].runtime_fraction.runtime_key: unsupported field",
            "route_config.virtual_hosts[0].routes[0].route.retry_policy.retry_on: unsupported retry condition \"refused-stream\" without \"reset\" (it is covered by \"reset\"; on its own it is not implemented)",
            "route_config.virtual_hosts[0].routes[0].route.retry_policy.retry_back_off.max_interval: max_interval must be greater than or equal to the base_interval",
            "route_config.virtual_hosts[0].routes[0].route.request_mirror_policies[0].cluster: unknown cluster \"nope\"",
            "route_config.virtual_hosts[0].routes[0].route.upgrade_configs[0].upgrade_type: unsupported upgrade type \"CONNECT\" (only websocket is supported)",
        ];
        for e in expected {
            assert!(
                errs.iter().any(|x| x.starts_with(e)),
                "missing {e:?} in {errs:#?}"
            );
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    }

    #[test]
    fn bad_routes_are_all_reported() {
        let errs = route_config(
            r#"
virtual_hosts:
- name: a
  domains: ["a", "x*y"]
  routes:
  - match: { safe_regex: { regex: "(" } }
    route: { cluster: missing }
  - match: { prefix: / }
    route:
      weighted_clusters: { clusters: [{ name: web, weight: 0 }] }
      retry_policy: { retry_on: "5xx,retriable-4xx" }
  - match: { prefix: / }
    direct_response: { status: 99 }
    request_headers_to_add: [{ header: { key: x-a, value: "%REQ(x)%" } }]
    response_headers_to_remove: [":status"]
- name: b
  domains: ["a"]
  routes: []
"#,
            &["web"],
        )
        .expect_err("invalid");
        let expected = [
            "route_config.virtual_hosts[0].routes[1].route.retry_policy.retry_on: unsupported retry condition \"retriable-4xx\" (supported: 5xx, gateway-error, reset, connect-failure, retriable-status-codes)",
            "route_config.virtual_hosts[0].routes[0].match.safe_regex.regex: invalid regex \"(\": unclosed group",
            "route_config.virtual_hosts[0].routes[0].route.cluster: unknown cluster \"missing\"",
            "route_config.virtual_hosts[0].routes[1].route.weighted_clusters.clusters: the sum of weights must be greater than 0",
            "route_config.virtual_hosts[0].routes[2].direct_response.status: 99 is not a status code in [200, 600)",
            "route_config.virtual_hosts[0].routes[2].request_headers_to_add[0].header.value: substitution formatter command %REQ(x)% is not implemented (write %% for a literal %)",
            "route_config.virtual_hosts[0].routes[2].response_headers_to_remove[0]: :-prefixed or host headers may not be modified (:status)",
            "route_config.virtual_hosts[0].domains[1]: invalid domain \"x*y\": a wildcard is only allowed as the first or last character",
            "route_config.virtual_hosts[1].domains[0]: only unique values for domains are permitted; duplicate entry of domain a",
        ];
        for e in expected {
            assert!(errs.iter().any(|x| x == e), "missing {e:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), expected.len(), "{errs:#?}");
    }

    #[test]
    fn header_options_follow_envoy_append_rules() {
        let rc = route_config(
            r#"
virtual_hosts:
- name: a
  domains: ["*"]
  routes: []
  request_headers_to_add:
  - header: { key: X-A, value: "50%% off" }
  - header: { key: x-b, value: b }
    append: false
  - header: { key: x-c, value: c }
    append_action: ADD_IF_ABSENT
  - header: { key: x-empty, value: "" }
  - header: { key: x-kept, value: "" }
    keep_empty_value: true
"#,
            &[],
        )
        .expect("valid");
        let adds = &rc.virtual_hosts[0].request_headers.add;
        let summary: Vec<(&str, &str, AppendAction)> = adds
            .iter()
            .map(|a| (a.name.as_str(), a.value.to_str().unwrap_or("?"), a.action))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("x-a", "50% off", AppendAction::AppendIfExistsOrAdd),
                ("x-b", "b", AppendAction::OverwriteIfExistsOrAdd),
                ("x-c", "c", AppendAction::AddIfAbsent),
                ("x-kept", "", AppendAction::AppendIfExistsOrAdd),
            ]
        );
    }

    #[test]
    fn re2_substitutions_become_regex_crate_syntax() {
        assert_eq!(re2_substitution(r"/v2/\1/x$"), "/v2/${1}/x$$");
    }
}
