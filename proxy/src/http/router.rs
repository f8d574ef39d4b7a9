//! Routing decisions, as pure functions: virtual host selection, route matching, weighted
//! cluster choice, path rewrites, redirect locations and Host port stripping — each with
//! Envoy's exact rules.
//!
//! Nothing here performs I/O or reads a clock; randomness is an argument. The connection
//! manager (`http::proxy`) calls these and acts on the answers.

use std::borrow::Cow;

use http::{HeaderMap, Method};

use crate::config::listener::StripPort;
use crate::config::route::{
    HeaderMatch, HeaderMatcher, MatchedHeader, PathMatch, QueryParameterMatcher, Redirect,
    RedirectPath, RegexRewrite, Route, RouteConfig, RouteMatch, StringMatcher, StringPattern,
    VirtualHost, WeightedClusterEntry,
};

/// What routing looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// `:authority` / `Host`, after port stripping.
    pub authority: &'a str,
    /// `:path`, query included.
    pub path: &'a str,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
}

/// The virtual host and route a request matched.
#[derive(Debug, Clone, Copy)]
pub struct Selected<'r> {
    pub virtual_host: &'r VirtualHost,
    pub route: &'r Route,
}

/// Finds the virtual host, then the first route of it that matches.
pub fn route<'r>(rc: &'r RouteConfig, req: &RequestView<'_>) -> Option<Selected<'r>> {
    let virtual_host = find_virtual_host(rc, req.authority)?;
    let route = virtual_host
        .routes
        .iter()
        .find(|r| route_matches(&r.matcher, req))?;
    Some(Selected {
        virtual_host,
        route,
    })
}

/// Envoy's virtual host selection: exact domain, then the longest matching `*.suffix`, then
/// the longest matching `prefix.*`, then `*`. Hosts compare case-insensitively; a wildcard
/// never matches the empty string. The port takes part unless `ignore_port_in_host_matching`.
pub fn find_virtual_host<'r>(rc: &'r RouteConfig, authority: &str) -> Option<&'r VirtualHost> {
    let index = &rc.domains;
    let host = if rc.ignore_port_in_host_matching {
        host_without_port(authority)
    } else {
        authority
    };
    let host: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    let found = index
        .exact
        .get(host.as_ref())
        .or_else(|| {
            index
                .suffixes
                .iter()
                .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
                .map(|(_, i)| i)
        })
        .or_else(|| {
            index
                .prefixes
                .iter()
                .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
                .map(|(_, i)| i)
        })
        .or(index.default.as_ref())?;
    rc.virtual_hosts.get(*found)
}

/// Every condition of a route's match: path, headers, query parameters, gRPC.
pub fn route_matches(m: &RouteMatch, req: &RequestView<'_>) -> bool {
    path_matches(&m.path, m.case_sensitive, req.path)
        && m.headers.iter().all(|h| header_matches(h, req))
        && query_matches(&m.query_parameters, req.path)
        && (!m.grpc || is_grpc(req.headers))
}

/// Matches the path part of a route. Prefixes see the whole `:path` (query included, as in
/// Envoy); exact paths, separated prefixes and regexes see the path without its query.
pub fn path_matches(m: &PathMatch, case_sensitive: bool, path: &str) -> bool {
    let eq = |a: &str, b: &str| {
        if case_sensitive {
            a == b
        } else {
            a.eq_ignore_ascii_case(b)
        }
    };
    let starts = |s: &str, prefix: &str| {
        s.len() >= prefix.len()
            && s.is_char_boundary(prefix.len())
            && eq(&s[..prefix.len()], prefix)
    };
    match m {
        PathMatch::Prefix(p) => starts(path, p),
        PathMatch::Path(p) => eq(path_only(path), p),
        PathMatch::PathSeparatedPrefix(p) => {
            let path = path_only(path);
            starts(path, p) && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
        }
        PathMatch::Regex(r) => r.is_match(path_only(path)),
    }
}

/// The path without query and fragment.
pub fn path_only(path: &str) -> &str {
    match path.find(['?', '#']) {
        Some(i) => &path[..i],
        None => path,
    }
}

/// Envoy's header matching, including its rules for missing headers and inversion.
pub fn header_matches(h: &HeaderMatcher, req: &RequestView<'_>) -> bool {
    let value: Option<Cow<'_, str>> = match &h.name {
        MatchedHeader::Authority => Some(Cow::Borrowed(req.authority)),
        MatchedHeader::Method => Some(Cow::Borrowed(req.method.as_str())),
        MatchedHeader::Path => Some(Cow::Borrowed(req.path)),
        MatchedHeader::Scheme => Some(Cow::Borrowed(req.scheme)),
        MatchedHeader::Header(name) => {
            let mut values = req.headers.get_all(name).iter();
            match (values.next(), values.next()) {
                (None, _) => None,
                (Some(v), None) => Some(String::from_utf8_lossy(v.as_bytes())),
                (Some(first), Some(second)) => {
                    // Several values are matched as one, joined with commas.
                    let mut joined = String::from_utf8_lossy(first.as_bytes()).into_owned();
                    for v in std::iter::once(second).chain(values) {
                        joined.push(',');
                        joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
                    }
                    Some(Cow::Owned(joined))
                }
            }
        }
    };
    let value = match value {
        Some(v) => v,
        None if h.treat_missing_as_empty => Cow::Borrowed(""),
        None => {
            return match h.kind {
                HeaderMatch::Present(present) => present == h.invert,
                HeaderMatch::Value(_) => false,
            };
        }
    };
    let matched = match &h.kind {
        HeaderMatch::Present(present) => *present,
        HeaderMatch::Value(m) => string_matches(m, &value),
    };
    matched != h.invert
}

/// A `StringMatcher` against a value (patterns were lower-cased at translation when
/// `ignore_case`).
pub fn string_matches(m: &StringMatcher, value: &str) -> bool {
    let value: Cow<'_, str> = if m.ignore_case && !matches!(m.pattern, StringPattern::Regex(_)) {
        Cow::Owned(value.to_ascii_lowercase())
    } else {
        Cow::Borrowed(value)
    };
    match &m.pattern {
        StringPattern::Exact(p) => value == p.as_str(),
        StringPattern::Prefix(p) => value.starts_with(p.as_str()),
        StringPattern::Suffix(p) => value.ends_with(p.as_str()),
        StringPattern::Contains(p) => value.contains(p.as_str()),
        StringPattern::Regex(r) => r.is_match(&value),
    }
}

/// Every query parameter matcher holds against the first value of its parameter.
pub fn query_matches(matchers: &[QueryParameterMatcher], path: &str) -> bool {
    if matchers.is_empty() {
        return true;
    }
    let query = match path.split_once('?') {
        Some((_, q)) => q.split('#').next().unwrap_or(q),
        None => "",
    };
    matchers.iter().all(|m| match query_param(query, &m.name) {
        None => false,
        Some(v) => m.value.as_ref().is_none_or(|sm| string_matches(sm, &v)),
    })
}

/// The first value of a query parameter, percent-decoded (`a` alone has the value "").
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes (invalid escapes stay as written).
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// gRPC requests carry `content-type: application/grpc` (or `+proto`, `;...`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct == "application/grpc"
                || ct.starts_with("application/grpc+")
                || ct.starts_with("application/grpc;")
        })
}

/// Envoy's weighted cluster choice: `random % total_weight` falls in one cluster's range.
pub fn pick_weighted(
    clusters: &[WeightedClusterEntry],
    total_weight: u64,
    random: u64,
) -> Option<&WeightedClusterEntry> {
    if total_weight == 0 {
        return None;
    }
    let selected = random % total_weight;
    let mut end = 0u64;
    clusters.iter().find(|c| {
        end += u64::from(c.weight);
        selected < end
    })
}

/// The path after `prefix_rewrite` or `regex_rewrite`, `None` when neither applies. A prefix
/// rewrite replaces what the route matched (the prefix, or the whole path for exact and
/// regex matches) and keeps the rest, query included; a regex rewrite replaces every match in
/// the path and keeps the query.
pub fn rewrite_path(
    matcher: &RouteMatch,
    prefix_rewrite: Option<&str>,
    regex_rewrite: Option<&RegexRewrite>,
    path: &str,
) -> Option<String> {
    if let Some(prefix) = prefix_rewrite {
        let matched = match &matcher.path {
            PathMatch::Prefix(p) | PathMatch::PathSeparatedPrefix(p) => p.len(),
            PathMatch::Path(_) | PathMatch::Regex(_) => path_only(path).len(),
        };
        let rest = path.get(matched..).unwrap_or("");
        return Some(format!("{prefix}{rest}"));
    }
    let r = regex_rewrite?;
    let just_path = path_only(path);
    let replaced = r.pattern.replace_all(just_path, r.substitution.as_str());
    Some(format!("{replaced}{}", &path[just_path.len()..]))
}

/// What a redirect is computed from.
#[derive(Debug, Clone, Copy)]
pub struct RedirectInput<'a> {
    /// The request's scheme as the router sees it (`x-forwarded-proto`).
    pub scheme: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
}

/// The `location` of a redirect, built as Envoy's `Http::Utility::newUri` does.
pub fn redirect_location(r: &Redirect, matcher: &RouteMatch, req: &RedirectInput<'_>) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(req.scheme);
    let port = r.port.map(|p| format!(":{p}")).unwrap_or_default();
    let host: Cow<'_, str> = match &r.host {
        Some(h) => Cow::Borrowed(h.as_str()),
        None => Cow::Borrowed(redirect_host(
            req.authority,
            req.scheme,
            scheme,
            !port.is_empty(),
        )),
    };
    let (mut path, path_has_query) = match &r.path {
        RedirectPath::Keep => (req.path.to_string(), false),
        RedirectPath::Path(p) => {
            if p.contains('?') {
                (p.clone(), true)
            } else {
                // The request's query string follows a path_redirect without one.
                let query = req.path.find('?').map(|i| &req.path[i..]).unwrap_or("");
                (format!("{p}{query}"), false)
            }
        }
        RedirectPath::PrefixRewrite(p) => (
            rewrite_path(matcher, Some(p), None, req.path).unwrap_or_default(),
            false,
        ),
        RedirectPath::RegexRewrite(rr) => (
            rewrite_path(matcher, None, Some(rr), req.path).unwrap_or_default(),
            false,
        ),
    };
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    if r.strip_query
        && !path_has_query
        && let Some(i) = path.find('?')
    {
        path.truncate(i);
    }
    format!("{scheme}://{host}{port}{path}")
}

/// The request's host for a redirect: its port is dropped when the redirect sets one, or when
/// the scheme changes and the port was the old scheme's default.
fn redirect_host<'a>(
    authority: &'a str,
    old_scheme: &str,
    new_scheme: &str,
    new_port: bool,
) -> &'a str {
    let Some(port_at) = port_start(authority) else {
        return authority;
    };
    let port = &authority[port_at..];
    let mut remove = new_port;
    if new_scheme != old_scheme {
        remove |= old_scheme == "https" && port == ":443";
        remove |= old_scheme == "http" && port == ":80";
    }
    if remove {
        &authority[..port_at]
    } else {
        authority
    }
}

/// Where `:port` starts in an authority, if it has one (`[::1]:80` → 5).
fn port_start(authority: &str) -> Option<usize> {
    let i = if authority.starts_with('[') {
        authority.rfind("]:").map(|i| i + 1)?
    } else {
        authority.rfind(':')?
    };
    let digits = &authority[i + 1..];
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(i)
}

/// The authority without its port.
pub fn host_without_port(authority: &str) -> &str {
    match port_start(authority) {
        Some(i) => &authority[..i],
        None => authority,
    }
}

/// The authority after the connection manager's port stripping (`strip_matching_host_port`,
/// `strip_any_host_port`).
pub fn strip_port(authority: &str, mode: StripPort, listener_port: u16) -> &str {
    match mode {
        StripPort::None => authority,
        StripPort::Any => host_without_port(authority),
        StripPort::Matching => match port_start(authority) {
            Some(i) if authority[i + 1..].parse::<u16>().ok() == Some(listener_port) => {
                &authority[..i]
            }
            _ => authority,
        },
    }
}

/// Whether an upgrade of type `kind` (lower case) is allowed: a route-level setting for the
/// type overrides the connection manager's; with neither, upgrades are refused.
pub fn upgrade_allowed(hcm: &[(String, bool)], route: &[(String, bool)], kind: &str) -> bool {
    let find = |list: &[(String, bool)]| {
        list.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(kind))
            .map(|(_, enabled)| *enabled)
    };
    find(route).or_else(|| find(hcm)).unwrap_or(false)
}

/// Whether a request falls in a `numerator / denominator` share, as Envoy's runtime
/// `featureEnabled` decides it (`random % denominator < numerator`).
pub fn sampled(numerator: u64, denominator: u64, random: u64) -> bool {
    denominator > 0 && random % denominator < numerator
}

/// The host a mirrored request carries: Envoy appends `-shadow` to the host name, before the
/// port if there is one (`a:8080` → `a-shadow:8080`).
pub fn shadow_host(authority: &str) -> String {
    let mut parts = authority.split(':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(host), Some(port), None) => format!("{host}-shadow:{port}"),
        _ => format!("{authority}-shadow"),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn route_upgrade_settings_override_the_connection_manager() {
        let on = vec![("websocket".to_string(), true)];
        let off = vec![("websocket".to_string(), false)];
        assert!(!upgrade_allowed(&[], &[], "websocket"));
        assert!(upgrade_allowed(&on, &[], "websocket"));
        assert!(upgrade_allowed(&on, &[], "WebSocket"));
        assert!(!upgrade_allowed(&on, &[], "h2c"));
        assert!(!upgrade_allowed(&on, &off, "websocket"));
        assert!(upgrade_allowed(&off, &on, "websocket"));
        assert!(upgrade_allowed(&[], &on, "websocket"));
        assert!(!upgrade_allowed(&off, &[], "websocket"));
    }

    #[test]
    fn shadow_hosts_get_the_suffix_before_the_port() {
        assert_eq!(shadow_host("api.example.com"), "api.example.com-shadow");
        assert_eq!(shadow_host("api:8080"), "api-shadow:8080");
        assert_eq!(shadow_host("127.0.0.1:80"), "127.0.0.1-shadow:80");
    }

    #[test]
    fn sampling_follows_the_fraction() {
        assert!(sampled(100, 100, 99));
        assert!(!sampled(0, 100, 0));
        assert!(sampled(50, 100, 149));
        assert!(!sampled(50, 100, 150));
        let hits = (0..10_000u64).filter(|r| sampled(25, 100, *r)).count();
        assert_eq!(hits, 2_500);
    }
    use super::*;
    use crate::config::route::{Action, tests::route_config};
    use http::HeaderValue;

    const ALL: &[&str] = &["a", "b", "c", "web"];

    fn req<'a>(authority: &'a str, path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            method: &Method::GET,
            authority,
            path,
            scheme: "http",
            headers,
        }
    }

    fn vhost_name(rc: &RouteConfig, host: &str) -> Option<String> {
        find_virtual_host(rc, host).map(|v| v.name.clone())
    }

    #[test]
    fn virtual_hosts_follow_envoy_selection_order() {
        let rc = route_config(
            r#"
virtual_hosts:
- { name: exact, domains: ["api.example.com", "api.example.com:8080"] }
- { name: long-suffix, domains: ["*.b.example.com"] }
- { name: suffix, domains: ["*.example.com"] }
- { name: prefix, domains: ["api.*"] }
- { name: longer-prefix, domains: ["api.ex*"] }
- { name: default, domains: ["*"] }
"#,
            ALL,
        )
        .expect("valid");
        let cases = [
            ("api.example.com", "exact"),
            ("API.Example.COM", "exact"),
            ("api.example.com:8080", "exact"),
            ("x.b.example.com", "long-suffix"),
            ("b.example.com", "suffix"),
            (".example.com", "default"),
            // The port is part of the host, so `*.example.com` does not match; `api.ex*` does.
            ("api.example.com:9090", "longer-prefix"),
            ("api.other", "prefix"),
            ("api.exotic", "longer-prefix"),
            ("api.", "default"),
            ("other", "default"),
        ];
        for (host, want) in cases {
            assert_eq!(vhost_name(&rc, host).as_deref(), Some(want), "{host}");
        }
    }

    #[test]
    fn ports_take_part_in_host_matching_unless_ignored() {
        let yaml = |ignore: bool| {
            format!(
                "ignore_port_in_host_matching: {ignore}\nvirtual_hosts:\n- {{ name: a, domains: [\"a.local\"] }}\n"
            )
        };
        let rc = route_config(&yaml(false), ALL).expect("valid");
        assert_eq!(vhost_name(&rc, "a.local:8080"), None);
        let rc = route_config(&yaml(true), ALL).expect("valid");
        assert_eq!(vhost_name(&rc, "a.local:8080").as_deref(), Some("a"));
        assert_eq!(vhost_name(&rc, "A.LOCAL").as_deref(), Some("a"));
    }

    #[test]
    fn host_port_stripping_follows_envoy() {
        assert_eq!(strip_port("a:80", StripPort::Matching, 80), "a");
        assert_eq!(strip_port("a:8080", StripPort::Matching, 80), "a:8080");
        assert_eq!(strip_port("a:8080", StripPort::Any, 80), "a");
        assert_eq!(strip_port("[::1]:80", StripPort::Any, 80), "[::1]");
        assert_eq!(strip_port("[::1]", StripPort::Any, 80), "[::1]");
        assert_eq!(strip_port("a:80", StripPort::None, 80), "a:80");
    }

    fn first_route(
        yaml_routes: &str,
        authority: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<String> {
        let rc = route_config(
            &format!("virtual_hosts:\n- name: v\n  domains: [\"*\"]\n  routes:\n{yaml_routes}"),
            ALL,
        )
        .expect("valid");
        route(&rc, &req(authority, path, headers)).map(|s| s.route.name.clone())
    }

    #[test]
    fn path_matches_follow_envoy() {
        let routes = r#"
  - { name: exact, match: { path: /exact }, route: { cluster: a } }
  - { name: sep, match: { path_separated_prefix: /api }, route: { cluster: a } }
  - { name: regex, match: { safe_regex: { regex: "/v[0-9]+/.*" } }, route: { cluster: a } }
  - { name: nocase, match: { prefix: /CI, case_sensitive: false }, route: { cluster: a } }
  - { name: prefix, match: { prefix: /p }, route: { cluster: a } }
"#;
        let h = HeaderMap::new();
        let cases = [
            ("/exact", Some("exact")),
            ("/exact?x=1", Some("exact")),
            ("/exact/more", None),
            ("/api", Some("sep")),
            ("/api/x", Some("sep")),
            ("/apix", None),
            ("/api?q", Some("sep")),
            ("/v2/items", Some("regex")),
            ("/v2", None),
            ("/ci/x", Some("nocase")),
            ("/Ci", Some("nocase")),
            ("/prefix", Some("prefix")),
            ("/other", None),
        ];
        for (path, want) in cases {
            assert_eq!(
                first_route(routes, "h", path, &h).as_deref(),
                want,
                "{path}"
            );
        }
    }

    #[test]
    fn header_matches_follow_envoy_including_missing_and_inverted() {
        let routes = r#"
  - name: exact
    match: { prefix: /, headers: [{ name: x-v, string_match: { exact: "1" } }] }
    route: { cluster: a }
  - name: not-canary
    match: { prefix: /, headers: [{ name: x-canary, string_match: { exact: "yes" }, invert_match: true }, { name: x-which, present_match: true }] }
    route: { cluster: a }
  - name: absent
    match: { prefix: /, headers: [{ name: x-which, present_match: false }, { name: x-re, safe_regex_match: { regex: "a+b" } }] }
    route: { cluster: a }
  - name: suffix-nocase
    match: { prefix: /, headers: [{ name: x-which, string_match: { suffix: END, ignore_case: true } }] }
    route: { cluster: a }
  - name: method
    match: { prefix: /, headers: [{ name: ":method", string_match: { exact: POST } }] }
    route: { cluster: a }
"#;
        let mut h = HeaderMap::new();
        h.insert("x-v", HeaderValue::from_static("1"));
        assert_eq!(first_route(routes, "h", "/", &h).as_deref(), Some("exact"));

        let mut h = HeaderMap::new();
        h.insert("x-which", HeaderValue::from_static("the-end"));
        h.insert("x-canary", HeaderValue::from_static("no"));
        assert_eq!(
            first_route(routes, "h", "/", &h).as_deref(),
            Some("not-canary")
        );
        h.insert("x-canary", HeaderValue::from_static("yes"));
        assert_eq!(
            first_route(routes, "h", "/", &h).as_deref(),
            Some("suffix-nocase")
        );
        h.remove("x-canary");
        assert_eq!(
            first_route(routes, "h", "/", &h).as_deref(),
            Some("suffix-nocase"),
            "an inverted value matcher does not match a missing header"
        );

        let mut h = HeaderMap::new();
        h.insert("x-re", HeaderValue::from_static("aab"));
        assert_eq!(first_route(routes, "h", "/", &h).as_deref(), Some("absent"));
        h.insert("x-re", HeaderValue::from_static("aabx"));
        assert_eq!(
            first_route(routes, "h", "/", &h).as_deref(),
            None,
            "regex is a full match"
        );

        let mut h = HeaderMap::new();
        h.append("x-v", HeaderValue::from_static("1"));
        h.append("x-v", HeaderValue::from_static("2"));
        assert_eq!(
            first_route(routes, "h", "/", &h),
            None,
            "values are joined: \"1,2\""
        );
    }

    #[test]
    fn inverted_value_matchers_do_not_match_missing_headers() {
        let routes = r#"
  - name: inverted
    match: { prefix: /, headers: [{ name: x-a, string_match: { exact: "1" }, invert_match: true }] }
    route: { cluster: a }
  - name: missing-as-empty
    match: { prefix: /, headers: [{ name: x-a, string_match: { exact: "" }, treat_missing_header_as_empty: true }] }
    route: { cluster: a }
"#;
        let h = HeaderMap::new();
        assert_eq!(
            first_route(routes, "h", "/", &h).as_deref(),
            Some("missing-as-empty")
        );
    }

    #[test]
    fn query_parameters_match_the_first_decoded_value() {
        let routes = r#"
  - name: q
    match: { prefix: /, query_parameters: [{ name: debug, string_match: { exact: "on now" } }, { name: flag, present_match: true }] }
    route: { cluster: a }
"#;
        let h = HeaderMap::new();
        assert_eq!(
            first_route(routes, "h", "/x?flag&debug=on%20now", &h).as_deref(),
            Some("q")
        );
        assert_eq!(first_route(routes, "h", "/x?debug=on%20now", &h), None);
        assert_eq!(
            first_route(routes, "h", "/x?flag=1&debug=off&debug=on%20now", &h),
            None
        );
    }

    #[test]
    fn grpc_matcher_needs_a_grpc_content_type() {
        let routes = "  - { name: g, match: { prefix: /, grpc: {} }, route: { cluster: a } }\n";
        let mut h = HeaderMap::new();
        assert_eq!(first_route(routes, "h", "/", &h), None);
        h.insert(
            "content-type",
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert_eq!(first_route(routes, "h", "/", &h).as_deref(), Some("g"));
    }

    #[test]
    fn weighted_choice_uses_ranges_of_the_total() {
        let rc = route_config(
            r#"
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: { prefix: / }
    route: { weighted_clusters: { clusters: [{ name: a, weight: 1 }, { name: b, weight: 0 }, { name: c, weight: 3 }] } }
"#,
            ALL,
        )
        .expect("valid");
        let Action::Route(a) = &rc.virtual_hosts[0].routes[0].action else {
            panic!("route action");
        };
        let crate::config::route::ClusterSpecifier::Weighted {
            clusters,
            total_weight,
        } = &a.cluster
        else {
            panic!("weighted");
        };
        let names: Vec<&str> = (0..8)
            .filter_map(|r| pick_weighted(clusters, *total_weight, r))
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, vec!["a", "c", "c", "c", "a", "c", "c", "c"]);
    }

    fn action_of(rc: &RouteConfig, i: usize) -> (&RouteMatch, &Action) {
        let r = &rc.virtual_hosts[0].routes[i];
        (&r.matcher, &r.action)
    }

    #[test]
    fn rewrites_replace_what_was_matched_and_keep_the_query() {
        let rc = route_config(
            r#"
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - { match: { prefix: /old/ }, route: { cluster: a, prefix_rewrite: /new/ } }
  - { match: { path: /exact }, route: { cluster: a, prefix_rewrite: /replaced } }
  - { match: { prefix: /r }, route: { cluster: a, regex_rewrite: { pattern: { regex: "^/r/([^/]+)/(.*)$" }, substitution: "/\\2/\\1" } } }
  - { match: { prefix: /strip }, route: { cluster: a, prefix_rewrite: / } }
"#,
            ALL,
        )
        .expect("valid");
        let rewrite = |i: usize, path: &str| {
            let (m, a) = action_of(&rc, i);
            let Action::Route(a) = a else { panic!("route") };
            rewrite_path(
                m,
                a.prefix_rewrite.as_deref(),
                a.regex_rewrite.as_ref(),
                path,
            )
        };
        assert_eq!(rewrite(0, "/old/x?y=1").as_deref(), Some("/new/x?y=1"));
        assert_eq!(rewrite(1, "/exact?q").as_deref(), Some("/replaced?q"));
        assert_eq!(rewrite(2, "/r/a/b/c?z").as_deref(), Some("/b/c/a?z"));
        assert_eq!(rewrite(3, "/strip").as_deref(), Some("/"));
    }

    #[test]
    fn redirects_follow_envoy_new_uri() {
        let rc = route_config(
            r#"
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - { match: { prefix: /secure }, redirect: { https_redirect: true } }
  - { match: { prefix: /moved }, redirect: { host_redirect: new.example, path_redirect: /landing, response_code: FOUND } }
  - { match: { prefix: /port }, redirect: { port_redirect: 8443, strip_query: true } }
  - { match: { prefix: /pre/ }, redirect: { prefix_rewrite: /post/ } }
  - { match: { prefix: /q }, redirect: { path_redirect: "/with?own=query", strip_query: true } }
"#,
            ALL,
        )
        .expect("valid");
        let loc = |i: usize, authority: &str, path: &str| {
            let (m, a) = action_of(&rc, i);
            let Action::Redirect(r) = a else {
                panic!("redirect")
            };
            redirect_location(
                r,
                m,
                &RedirectInput {
                    scheme: "http",
                    authority,
                    path,
                },
            )
        };
        assert_eq!(
            loc(0, "a.example:80", "/secure?x"),
            "https://a.example/secure?x"
        );
        assert_eq!(
            loc(0, "a.example:8080", "/secure"),
            "https://a.example:8080/secure"
        );
        assert_eq!(
            loc(1, "a.example", "/moved?k=v"),
            "http://new.example/landing?k=v"
        );
        assert_eq!(
            loc(2, "a.example:80", "/port?x"),
            "http://a.example:8443/port"
        );
        assert_eq!(loc(3, "a.example", "/pre/x?y"), "http://a.example/post/x?y");
        assert_eq!(
            loc(4, "a.example", "/q?drop"),
            "http://a.example/with?own=query"
        );
        let (_, a) = action_of(&rc, 1);
        let Action::Redirect(r) = a else {
            panic!("redirect")
        };
        assert_eq!(r.response_code, http::StatusCode::FOUND);
    }
}
