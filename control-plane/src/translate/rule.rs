//! One `ServiceRoute` rule on one parent Service port → Envoy routes, one per match (named
//! `<ns>/<route>/rule/<i>/match/<j>`).
//!
//! Owns the Gateway API → Envoy mapping of matches (path, headers, query, method), filters
//! (header modifiers, redirect, URL rewrite, mirror), backends (single cluster or weighted),
//! timeouts and retries, and the hash policies a `ServicePolicy` asks of routes. Anything that
//! cannot be served is left out and reported on the route's status, never passed to Envoy.

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, RuntimeFractionalPercent,
    header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy, Route,
    RouteAction, RouteMatch as EnvoyRouteMatch, WeightedCluster, header_matcher,
    query_parameter_matcher, redirect_action, retry_policy, route, route_action, route_match,
    weighted_cluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use envoy_types::pb::google::protobuf::Duration as PbDuration;

use super::policy::Policies;
use super::re2;
use super::service::{PortInfo, Services};
use super::status::{ObjectKind, Statuses, reason};
use super::util::{duration, header_name_ok, header_value_ok, port_u16, u32v};
use crate::api::{
    BackendObjectRef, FilterType, HashPolicy, HeaderModifier, LoadBalancerType, PathMatchType,
    PathModifier, PathModifierType, RedirectScheme, RequestRedirect, RouteMatch, RouteRule,
    StringMatchType, UrlRewrite,
};
use crate::store::ObjectKey;

/// What a rule is translated against.
pub(crate) struct RuleInput<'a> {
    pub route_key: &'a ObjectKey,
    pub services: &'a Services,
    pub policies: &'a Policies<'a>,
    /// The virtual host's Service port (default backend, default backend port).
    pub parent_port: &'a PortInfo,
}

impl RuleInput<'_> {
    fn not_accepted(&self, statuses: &mut Statuses, reason: &'static str, message: String) {
        statuses.not_accepted(ObjectKind::ServiceRoute, self.route_key, reason, message);
    }

    fn unresolved(&self, statuses: &mut Statuses, reason: &'static str, message: String) {
        statuses.unresolved(ObjectKind::ServiceRoute, self.route_key, reason, message);
    }

    /// The Service port a backend reference names. The port defaults to the virtual host's
    /// port when the backend Service has it, else to the backend Service's only port.
    fn resolve(
        &self,
        field: &str,
        target: &BackendObjectRef,
    ) -> Result<(ObjectKey, &PortInfo), (&'static str, String)> {
        let group_ok = target
            .group
            .as_deref()
            .is_none_or(|g| g.is_empty() || g == "core");
        if !group_ok || target.kind.as_deref().is_some_and(|k| k != "Service") {
            return Err((
                reason::INVALID_KIND,
                format!(
                    "{field}: {}/{} is not a Service",
                    target.group.as_deref().unwrap_or(""),
                    target.kind.as_deref().unwrap_or("Service")
                ),
            ));
        }
        let key = ObjectKey::new(
            target
                .namespace
                .clone()
                .unwrap_or_else(|| self.route_key.namespace.clone()),
            target.name.clone(),
        );
        let Some(svc) = self.services.get(&key) else {
            return Err((
                reason::BACKEND_NOT_FOUND,
                format!("{field}: Service {key} not found"),
            ));
        };
        let port = match target.port {
            Some(p) => port_u16(p).and_then(|p| svc.port(p)).ok_or_else(|| {
                (
                    reason::BACKEND_NOT_FOUND,
                    format!("{field}.port: Service {key} has no TCP port {p}"),
                )
            })?,
            None => match (svc.port(self.parent_port.port), svc.ports.as_slice()) {
                (Some(p), _) | (None, [p]) => p,
                _ => {
                    return Err((
                        reason::BACKEND_NOT_FOUND,
                        format!(
                            "{field}.port: required, Service {key} has several ports and none is {}",
                            self.parent_port.port
                        ),
                    ));
                }
            },
        };
        Ok((key, port))
    }
}

/// The Envoy routes of rule `r`, each with the match it came from (for ordering).
pub(crate) fn build(
    input: &RuleInput<'_>,
    r: usize,
    rule: &RouteRule,
    statuses: &mut Statuses,
) -> Vec<(usize, RouteMatch, Route)> {
    let field = format!("spec.rules[{r}]");
    let matches: Vec<RouteMatch> = if rule.matches.is_empty() {
        vec![RouteMatch::default()]
    } else {
        rule.matches.clone()
    };
    let filters_of = |t: FilterType| {
        rule.filters
            .iter()
            .enumerate()
            .filter(move |(_, f)| f.type_ == t)
    };

    let mut request_add = Vec::new();
    let mut request_remove = Vec::new();
    let mut response_add = Vec::new();
    let mut response_remove = Vec::new();
    for (f, filter) in filters_of(FilterType::RequestHeaderModifier) {
        if let Some(m) = &filter.request_header_modifier {
            header_modifier(
                input,
                statuses,
                &format!("{field}.filters[{f}].requestHeaderModifier"),
                m,
                &mut request_add,
                &mut request_remove,
            );
        }
    }
    for (f, filter) in filters_of(FilterType::ResponseHeaderModifier) {
        if let Some(m) = &filter.response_header_modifier {
            header_modifier(
                input,
                statuses,
                &format!("{field}.filters[{f}].responseHeaderModifier"),
                m,
                &mut response_add,
                &mut response_remove,
            );
        }
    }
    let redirect = filters_of(FilterType::RequestRedirect)
        .find_map(|(f, x)| x.request_redirect.as_ref().map(|r| (f, r)));
    let rewrite = filters_of(FilterType::UrlRewrite)
        .find_map(|(f, x)| x.url_rewrite.as_ref().map(|r| (f, r)));

    // Paths a redirect or rewrite writes must be valid header values for Envoy.
    let mut bad_filter_path = false;
    for (f, filter) in rule.filters.iter().enumerate() {
        let (name, path) = match (&filter.request_redirect, &filter.url_rewrite) {
            (Some(r), _) => ("requestRedirect", r.path.as_ref()),
            (None, Some(r)) => ("urlRewrite", r.path.as_ref()),
            _ => continue,
        };
        let values = path
            .iter()
            .flat_map(|p| [&p.replace_full_path, &p.replace_prefix_match]);
        if values.flatten().any(|v| !header_value_ok(v)) {
            bad_filter_path = true;
            input.not_accepted(
                statuses,
                reason::UNSUPPORTED_VALUE,
                format!("{field}.filters[{f}].{name}.path: CR, LF and NUL are not allowed in a path; answering 500"),
            );
        }
    }

    // Backends and everything else that does not depend on the match: computed once.
    let action = if redirect.is_some() {
        None
    } else {
        Some(route_action(input, &field, rule, statuses))
    };

    let mut out = Vec::new();
    for (m, route_match) in matches.into_iter().enumerate() {
        if let Err(problem) = match_fits(&route_match, &format!("{field}.matches[{m}]")) {
            // Dropping only the regex condition would widen the match; drop the whole match.
            input.not_accepted(statuses, reason::UNSUPPORTED_VALUE, problem);
            continue;
        }
        let prefix = match &route_match.path {
            Some(p) if p.type_ == PathMatchType::PathPrefix => Some(p.value.as_str()),
            None => Some("/"),
            Some(_) => None,
        };
        // The ReplacePrefixMatch edit of a redirect or rewrite, for this match's prefix.
        let mut prefix_edit = |filter: String, path: Option<&PathModifier>| {
            let path = path.filter(|p| p.type_ == PathModifierType::ReplacePrefixMatch)?;
            let (prefix, replacement) = (prefix?, path.replace_prefix_match.as_deref()?);
            match prefix_rewrite(prefix, replacement) {
                PrefixRewrite::TooComplex(size) => {
                    input.not_accepted(
                        statuses,
                        reason::UNSUPPORTED_VALUE,
                        format!(
                            "{field}.{filter}.path: replacing the prefix {prefix:?} needs a regular expression too complex for Envoy (estimated RE2 program size {size} > {}); answering 500",
                            re2::ENVOY_MAX_PROGRAM_SIZE
                        ),
                    );
                    Some(PrefixRewrite::TooComplex(size))
                }
                edit => Some(edit),
            }
        };
        // Gateway API: a rule whose filter cannot be honoured answers 500.
        let internal_error = || {
            Some(route::Action::DirectResponse(DirectResponseAction {
                status: 500,
                ..Default::default()
            }))
        };
        let action = match (&redirect, &action) {
            _ if bad_filter_path => internal_error(),
            (Some((f, redirect)), _) => {
                let edit = prefix_edit(
                    format!("filters[{f}].requestRedirect"),
                    redirect.path.as_ref(),
                );
                match edit {
                    Some(PrefixRewrite::TooComplex(_)) => internal_error(),
                    edit => Some(route::Action::Redirect(redirect_action(redirect, edit))),
                }
            }
            (None, Some(RouteActionOrDirect::Direct500)) => internal_error(),
            (None, Some(RouteActionOrDirect::Route(action))) => {
                let mut action = RouteAction::clone(action);
                let edit = rewrite.and_then(|(f, rw)| {
                    prefix_edit(format!("filters[{f}].urlRewrite"), rw.path.as_ref())
                });
                match (rewrite, edit) {
                    (_, Some(PrefixRewrite::TooComplex(_))) => internal_error(),
                    (Some((_, rw)), edit) => {
                        url_rewrite(&mut action, rw, edit);
                        Some(route::Action::Route(action))
                    }
                    (None, _) => Some(route::Action::Route(action)),
                }
            }
            (None, None) => None,
        };
        let envoy_route = Route {
            name: format!(
                "{}/{}/rule/{r}/match/{m}",
                input.route_key.namespace, input.route_key.name
            ),
            r#match: Some(envoy_match(&route_match)),
            action,
            request_headers_to_add: request_add.clone(),
            request_headers_to_remove: request_remove.clone(),
            response_headers_to_add: response_add.clone(),
            response_headers_to_remove: response_remove.clone(),
            ..Default::default()
        };
        out.push((m, route_match, envoy_route));
    }
    out
}

/// A match must survive Envoy's own checks: every regex within the RE2 program size limit,
/// paths free of CR, LF and NUL.
fn match_fits(m: &RouteMatch, field: &str) -> Result<(), String> {
    if let Some(p) = &m.path
        && p.type_ != PathMatchType::RegularExpression
        && !header_value_ok(&p.value)
    {
        return Err(format!(
            "{field}.path.value: CR, LF and NUL are not allowed in a path; match not served"
        ));
    }
    let mut regexes: Vec<(String, &str)> = Vec::new();
    if let Some(p) = &m.path
        && p.type_ == PathMatchType::RegularExpression
    {
        regexes.push((format!("{field}.path.value"), &p.value));
    }
    for (h, hm) in m.headers.iter().enumerate() {
        if hm.type_ == StringMatchType::RegularExpression {
            regexes.push((format!("{field}.headers[{h}].value"), &hm.value));
        }
    }
    for (q, qm) in m.query_params.iter().enumerate() {
        if qm.type_ == StringMatchType::RegularExpression {
            regexes.push((format!("{field}.queryParams[{q}].value"), &qm.value));
        }
    }
    for (path, regex) in regexes {
        if let Err(size) = re2::check(regex) {
            return Err(format!(
                "{path}: regular expression too complex for Envoy (estimated RE2 program size {size} > {}); match not served",
                re2::ENVOY_MAX_PROGRAM_SIZE
            ));
        }
    }
    Ok(())
}

enum RouteActionOrDirect {
    Route(Box<RouteAction>),
    /// No backend resolved: Gateway API answers 500.
    Direct500,
}

/// Backends, mirrors, timeouts, retries and hash policies of a forwarding rule.
fn route_action(
    input: &RuleInput<'_>,
    field: &str,
    rule: &RouteRule,
    statuses: &mut Statuses,
) -> RouteActionOrDirect {
    // (cluster, weight, backend Service and port) of every backend that resolves.
    let mut backends: Vec<(String, u32, ObjectKey, u16)> = Vec::new();
    if rule.backend_refs.is_empty() {
        // No backends and no redirect: the parent Service itself.
        let p = input.parent_port;
        backends.push((p.cluster.clone(), 1, p.service.clone(), p.port));
    }
    for (b, backend) in rule.backend_refs.iter().enumerate() {
        let bf = format!("{field}.backendRefs[{b}]");
        match input.resolve(&bf, &backend.target) {
            Ok((key, port)) => {
                // Weight 0 means "send nothing here"; negative weights are rejected by validation.
                let weight = u32::try_from(backend.weight.unwrap_or(1)).unwrap_or(0);
                if weight > 0 {
                    backends.push((port.cluster.clone(), weight, key, port.port));
                }
            }
            Err((why, message)) => input.unresolved(statuses, why, message),
        }
    }
    if backends.is_empty() {
        // Gateway API: requests to a rule whose backends are all invalid get a 500.
        return RouteActionOrDirect::Direct500;
    }
    let cluster_specifier = Some(if let [(cluster, ..)] = backends.as_slice() {
        route_action::ClusterSpecifier::Cluster(cluster.clone())
    } else {
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: backends
                .iter()
                .map(|(cluster, weight, ..)| weighted_cluster::ClusterWeight {
                    name: cluster.clone(),
                    weight: u32v(*weight),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    });
    let mut action = RouteAction {
        cluster_specifier,
        ..Default::default()
    };

    action.hash_policy = hash_policies(
        input.policies,
        backends.iter().map(|(_, _, key, port)| (key, *port)),
    );

    for (f, filter) in rule.filters.iter().enumerate() {
        let Some(mirror) = filter
            .request_mirror
            .as_ref()
            .filter(|_| filter.type_ == FilterType::RequestMirror)
        else {
            continue;
        };
        let percent = u32::try_from(mirror.percent.unwrap_or(100).clamp(0, 100)).unwrap_or(100);
        if percent == 0 {
            continue;
        }
        match input.resolve(
            &format!("{field}.filters[{f}].requestMirror.backendRef"),
            &mirror.backend_ref,
        ) {
            Ok((_, port)) => {
                action
                    .request_mirror_policies
                    .push(route_action::RequestMirrorPolicy {
                        cluster: port.cluster.clone(),
                        runtime_fraction: (percent < 100).then(|| RuntimeFractionalPercent {
                            default_value: Some(FractionalPercent {
                                numerator: percent,
                                denominator: fractional_percent::DenominatorType::Hundred as i32,
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
            }
            Err((why, message)) => input.unresolved(statuses, why, message),
        }
    }

    let mut per_try = None;
    if let Some(t) = &rule.timeouts {
        if let Some(text) = &t.request {
            match duration(text) {
                // Envoy reads 0s as "no timeout", as Gateway API does.
                Ok(d) => action.timeout = Some(d),
                Err(e) => input.not_accepted(
                    statuses,
                    reason::UNSUPPORTED_VALUE,
                    format!("{field}.timeouts.request: {e}"),
                ),
            }
        }
        if let Some(text) = &t.backend_request {
            match duration(text) {
                Ok(d) if d != PbDuration::default() => per_try = Some(d),
                Ok(_) => {}
                Err(e) => input.not_accepted(
                    statuses,
                    reason::UNSUPPORTED_VALUE,
                    format!("{field}.timeouts.backendRequest: {e}"),
                ),
            }
        }
        // With only a per-try limit, that limit (times the tries) bounds the request; Envoy's
        // 15s route default must not cut it shorter.
        if per_try.is_some() && action.timeout.is_none() {
            action.timeout = Some(PbDuration::default());
        }
    }
    action.retry_policy = match &rule.retry {
        None => per_try.map(|d| RetryPolicy {
            // Unset means one retry in Envoy; a per-try timeout alone must not add retries.
            num_retries: u32v(0),
            per_try_timeout: Some(d),
            ..Default::default()
        }),
        Some(retry) => {
            let codes: Vec<u32> = retry
                .codes
                .iter()
                .filter_map(|c| u32::try_from(*c).ok())
                .collect();
            let mut retry_on = "connect-failure,refused-stream,reset".to_string();
            if !codes.is_empty() {
                retry_on.push_str(",retriable-status-codes");
            }
            let back_off = match retry.backoff.as_deref().map(duration) {
                Some(Ok(d)) if d != PbDuration::default() => Some(retry_policy::RetryBackOff {
                    base_interval: Some(d),
                    ..Default::default()
                }),
                Some(Err(e)) => {
                    input.not_accepted(
                        statuses,
                        reason::UNSUPPORTED_VALUE,
                        format!("{field}.retry.backoff: {e}"),
                    );
                    None
                }
                _ => None,
            };
            Some(RetryPolicy {
                retry_on,
                num_retries: u32v(u32::try_from(retry.attempts.unwrap_or(1)).unwrap_or(0)),
                per_try_timeout: per_try,
                retriable_status_codes: codes,
                retry_back_off: back_off,
                ..Default::default()
            })
        }
    };
    RouteActionOrDirect::Route(Box::new(action))
}

/// Gateway API match → Envoy match.
pub(crate) fn envoy_match(m: &RouteMatch) -> EnvoyRouteMatch {
    use route_match::PathSpecifier;
    let path_specifier = match &m.path {
        None => PathSpecifier::Prefix("/".to_string()),
        Some(p) => match p.type_ {
            PathMatchType::Exact => PathSpecifier::Path(p.value.clone()),
            PathMatchType::PathPrefix => {
                let value = p.value.trim_end_matches('/');
                if value.is_empty() {
                    PathSpecifier::Prefix("/".to_string())
                } else if value.contains(['?', '#']) {
                    // path_separated_prefix refuses these; no request path contains them.
                    PathSpecifier::Prefix(value.to_string())
                } else {
                    // /foo matches /foo and /foo/bar, not /foobar (Gateway API semantics).
                    PathSpecifier::PathSeparatedPrefix(value.to_string())
                }
            }
            PathMatchType::RegularExpression => PathSpecifier::SafeRegex(regex(&p.value)),
        },
    };
    let mut headers: Vec<HeaderMatcher> = Vec::new();
    for h in &m.headers {
        let name = h.name.to_ascii_lowercase();
        // Gateway API: of several matches on one header, only the first counts.
        if headers.iter().any(|x| x.name == name) {
            continue;
        }
        headers.push(HeaderMatcher {
            name,
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                string_match(h.type_, &h.value),
            )),
            ..Default::default()
        });
    }
    if let Some(method) = m.method {
        headers.push(HeaderMatcher {
            name: ":method".to_string(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                string_match(StringMatchType::Exact, method.as_str()),
            )),
            ..Default::default()
        });
    }
    let mut query_parameters: Vec<QueryParameterMatcher> = Vec::new();
    for q in &m.query_params {
        if query_parameters.iter().any(|x| x.name == q.name) {
            continue;
        }
        query_parameters.push(QueryParameterMatcher {
            name: q.name.clone(),
            query_parameter_match_specifier: Some(
                query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(string_match(
                    q.type_, &q.value,
                )),
            ),
        });
    }
    EnvoyRouteMatch {
        path_specifier: Some(path_specifier),
        headers,
        query_parameters,
        ..Default::default()
    }
}

fn regex(pattern: &str) -> RegexMatcher {
    RegexMatcher {
        regex: pattern.to_string(),
        ..Default::default()
    }
}

fn string_match(type_: StringMatchType, value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(match type_ {
            StringMatchType::Exact => string_matcher::MatchPattern::Exact(value.to_string()),
            StringMatchType::RegularExpression => {
                string_matcher::MatchPattern::SafeRegex(regex(value))
            }
        }),
        ..Default::default()
    }
}

/// Header edits. Envoy refuses to edit pseudo-headers and `host` (its config would be
/// NACKed whole), so those are dropped and reported: `URLRewrite.hostname` changes the host.
fn header_modifier(
    input: &RuleInput<'_>,
    statuses: &mut Statuses,
    field: &str,
    m: &HeaderModifier,
    add: &mut Vec<HeaderValueOption>,
    remove: &mut Vec<String>,
) {
    let mut reject = |path: String, why: &str| {
        input.not_accepted(
            statuses,
            reason::UNSUPPORTED_VALUE,
            format!("{path}: {why}"),
        );
    };
    let modifiable = |name: &str| !name.starts_with(':') && !name.eq_ignore_ascii_case("host");
    let host = |name: &str| {
        format!("header {name:?} cannot be modified (use a URLRewrite filter to change the host)")
    };
    for (kind, headers, action) in [
        ("set", &m.set, HeaderAppendAction::OverwriteIfExistsOrAdd),
        ("add", &m.add, HeaderAppendAction::AppendIfExistsOrAdd),
    ] {
        for (i, h) in headers.iter().enumerate() {
            if !modifiable(&h.name) {
                reject(format!("{field}.{kind}[{i}].name"), &host(&h.name));
            } else if !header_value_ok(&h.value) {
                reject(
                    format!("{field}.{kind}[{i}].value"),
                    "CR, LF and NUL are not allowed in a header value",
                );
            } else {
                add.push(HeaderValueOption {
                    header: Some(HeaderValue {
                        key: h.name.to_ascii_lowercase(),
                        value: h.value.clone(),
                        ..Default::default()
                    }),
                    append_action: action as i32,
                    ..Default::default()
                });
            }
        }
    }
    for (i, name) in m.remove.iter().enumerate() {
        if modifiable(name) {
            remove.push(name.to_ascii_lowercase());
        } else {
            reject(format!("{field}.remove[{i}]"), &host(name));
        }
    }
}

/// How a `ReplacePrefixMatch` of `prefix` (the route's PathPrefix match) becomes an Envoy
/// rewrite, with Gateway API semantics: `/api/x` with prefix `/api` → `/v2/x` for `/v2` and
/// `/x` for `/` (never `//x`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PrefixRewrite {
    Prefix(String),
    Regex(RegexMatchAndSubstitute),
    /// Replacing `/` with `/` changes nothing.
    None,
    /// The regex needed is beyond a stock Envoy's RE2 limit (a very long prefix).
    TooComplex(usize),
}

pub(crate) fn prefix_rewrite(prefix: &str, replacement: &str) -> PrefixRewrite {
    let prefix = prefix.trim_end_matches('/');
    let replacement = replacement.trim_end_matches('/');
    let regex_rewrite = |pattern: String, substitution: String| {
        PrefixRewrite::Regex(RegexMatchAndSubstitute {
            pattern: Some(regex(&pattern)),
            substitution,
        })
    };
    match (prefix.is_empty(), replacement.is_empty()) {
        (true, true) => PrefixRewrite::None,
        // Match `/`: put the replacement in front of the whole path.
        (true, false) => regex_rewrite("^/".to_string(), format!("{replacement}/")),
        // Strip the prefix and the slashes after it, keeping the path absolute.
        (false, true) => {
            let pattern = format!("^{}/*", regex::escape(prefix));
            match re2::check(&pattern) {
                Ok(()) => regex_rewrite(pattern, "/".to_string()),
                Err(size) => PrefixRewrite::TooComplex(size),
            }
        }
        (false, false) => PrefixRewrite::Prefix(replacement.to_string()),
    }
}

/// The full-path replacement as a regex rewrite of the whole path (query string untouched).
fn full_path_rewrite(path: &str) -> RegexMatchAndSubstitute {
    RegexMatchAndSubstitute {
        pattern: Some(regex("^/.*$")),
        substitution: path.to_string(),
    }
}

fn redirect_action(r: &RequestRedirect, prefix_edit: Option<PrefixRewrite>) -> RedirectAction {
    use redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier};
    let response_code = match r.status_code {
        Some(302) => RedirectResponseCode::Found,
        Some(303) => RedirectResponseCode::SeeOther,
        Some(307) => RedirectResponseCode::TemporaryRedirect,
        Some(308) => RedirectResponseCode::PermanentRedirect,
        _ => RedirectResponseCode::MovedPermanently,
    };
    let path_rewrite_specifier = r.path.as_ref().and_then(|p: &PathModifier| match p.type_ {
        PathModifierType::ReplaceFullPath => p
            .replace_full_path
            .clone()
            .map(PathRewriteSpecifier::PathRedirect),
        PathModifierType::ReplacePrefixMatch => match prefix_edit? {
            PrefixRewrite::Prefix(s) => Some(PathRewriteSpecifier::PrefixRewrite(s)),
            PrefixRewrite::Regex(rx) => Some(PathRewriteSpecifier::RegexRewrite(rx)),
            PrefixRewrite::None | PrefixRewrite::TooComplex(_) => None,
        },
    });
    RedirectAction {
        scheme_rewrite_specifier: r.scheme.map(|s| {
            SchemeRewriteSpecifier::SchemeRedirect(
                match s {
                    RedirectScheme::Http => "http",
                    RedirectScheme::Https => "https",
                }
                .to_string(),
            )
        }),
        host_redirect: r.hostname.as_ref().map(|h| h.0.clone()).unwrap_or_default(),
        port_redirect: r.port.and_then(port_u16).map(u32::from).unwrap_or(0),
        path_rewrite_specifier,
        response_code: response_code as i32,
        ..Default::default()
    }
}

fn url_rewrite(action: &mut RouteAction, rw: &UrlRewrite, prefix_edit: Option<PrefixRewrite>) {
    if let Some(host) = &rw.hostname {
        action.host_rewrite_specifier = Some(
            route_action::HostRewriteSpecifier::HostRewriteLiteral(host.0.clone()),
        );
    }
    let Some(path) = &rw.path else { return };
    match path.type_ {
        PathModifierType::ReplaceFullPath => {
            if let Some(p) = &path.replace_full_path {
                action.regex_rewrite = Some(full_path_rewrite(p));
            }
        }
        PathModifierType::ReplacePrefixMatch => match prefix_edit {
            Some(PrefixRewrite::Prefix(s)) => action.prefix_rewrite = s,
            Some(PrefixRewrite::Regex(rx)) => action.regex_rewrite = Some(rx),
            Some(PrefixRewrite::None | PrefixRewrite::TooComplex(_)) | None => {}
        },
    }
}

/// The route hash policies the backends' ServicePolicies ask for: consistent hashing is a
/// cluster setting in the API but hashes are computed per route in Envoy.
pub(crate) fn hash_policies<'k>(
    policies: &Policies<'_>,
    backends: impl Iterator<Item = (&'k ObjectKey, u16)>,
) -> Vec<route_action::HashPolicy> {
    let mut out = Vec::new();
    for (key, port) in backends {
        if let Some((_, policy)) = policies.for_port(key, port)
            && let Some(lb) = &policy.load_balancer
            && matches!(
                lb.type_,
                LoadBalancerType::RingHash | LoadBalancerType::Maglev
            )
        {
            for hp in &lb.hash_policies {
                if let Some(h) = hash_policy(hp)
                    && !out.contains(&h)
                {
                    out.push(h);
                }
            }
        }
    }
    out
}

/// Why Envoy would reject a hash policy, naming the field under `hashPolicies[i]`.
pub(crate) fn hash_policy_problem(hp: &HashPolicy) -> Option<String> {
    match (&hp.header, &hp.cookie, &hp.query_parameter) {
        (Some(h), ..) if !header_name_ok(h) => Some(format!("header: {h:?} is not a header name")),
        (None, Some(c), _) if c.name.is_empty() => Some("cookie.name: required".to_string()),
        (None, Some(c), _) if c.ttl.as_deref().is_some_and(|t| duration(t).is_err()) => {
            Some(format!(
                "cookie.ttl: invalid duration {:?}",
                c.ttl.as_deref().unwrap_or("")
            ))
        }
        (None, None, Some(q)) if q.is_empty() => Some("queryParameter: required".to_string()),
        _ => None,
    }
}

fn hash_policy(hp: &HashPolicy) -> Option<route_action::HashPolicy> {
    if hash_policy_problem(hp).is_some() {
        return None;
    }
    use route_action::hash_policy::{
        ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter,
    };
    let specifier = if let Some(header) = &hp.header {
        PolicySpecifier::Header(Header {
            header_name: header.to_ascii_lowercase(),
            ..Default::default()
        })
    } else if let Some(cookie) = &hp.cookie {
        PolicySpecifier::Cookie(Cookie {
            name: cookie.name.clone(),
            ttl: cookie.ttl.as_deref().and_then(|t| duration(t).ok()),
            path: cookie.path.clone().unwrap_or_default(),
            ..Default::default()
        })
    } else if hp.source_ip == Some(true) {
        PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
    } else if let Some(name) = &hp.query_parameter {
        PolicySpecifier::QueryParameter(QueryParameter { name: name.clone() })
    } else {
        return None;
    };
    Some(route_action::HashPolicy {
        policy_specifier: Some(specifier),
        terminal: hp.terminal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex_of(p: PrefixRewrite) -> (String, String) {
        match p {
            PrefixRewrite::Regex(r) => (
                r.pattern.map(|p| p.regex).unwrap_or_default(),
                r.substitution,
            ),
            other => panic!("regex rewrite expected, got {other:?}"),
        }
    }

    #[test]
    fn prefix_rewrite_follows_gateway_semantics() {
        assert_eq!(
            prefix_rewrite("/api", "/v2"),
            PrefixRewrite::Prefix("/v2".into())
        );
        assert_eq!(
            prefix_rewrite("/api", "/v2/"),
            PrefixRewrite::Prefix("/v2".into())
        );
        assert_eq!(
            regex_of(prefix_rewrite("/api.v1", "/")),
            (r"^/api\.v1/*".to_string(), "/".to_string())
        );
        assert_eq!(
            regex_of(prefix_rewrite("/", "/app")),
            ("^/".to_string(), "/app/".to_string())
        );
        assert_eq!(prefix_rewrite("/", "/"), PrefixRewrite::None);
    }

    #[test]
    fn path_prefix_is_segment_aware_and_root_is_plain_prefix() {
        use route_match::PathSpecifier;
        let m = |t, v: &str| RouteMatch {
            path: Some(crate::api::PathMatch {
                type_: t,
                value: v.into(),
            }),
            ..Default::default()
        };
        assert_eq!(
            envoy_match(&m(PathMatchType::PathPrefix, "/foo")).path_specifier,
            Some(PathSpecifier::PathSeparatedPrefix("/foo".into()))
        );
        assert_eq!(
            envoy_match(&m(PathMatchType::PathPrefix, "/")).path_specifier,
            Some(PathSpecifier::Prefix("/".into()))
        );
        assert_eq!(
            envoy_match(&RouteMatch::default()).path_specifier,
            Some(PathSpecifier::Prefix("/".into()))
        );
        assert_eq!(
            envoy_match(&m(PathMatchType::Exact, "/a")).path_specifier,
            Some(PathSpecifier::Path("/a".into()))
        );
    }
}
