//! Rules the schema cannot express fully (or that need an API server's CEL), checked in Rust.
//!
//! Every rule of the CRD schema that matters for translation is repeated here, so an object
//! read from a file is held to the same standard as one admitted by an API server. Errors
//! carry the field path (`spec.rules[2].matches[0].path.value`) and a reason.

use std::fmt;

use super::*;

/// One thing wrong with an object, at a field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON-path-like location: `spec.rules[0].backendRefs[1].weight`.
    pub path: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
    fn duration(&mut self, path: String, value: &Option<Duration>) {
        if let Some(v) = value
            && let Err(e) = parse_duration(v)
        {
            self.push(path, e);
        }
    }
    fn regex(&mut self, path: String, value: &str) {
        if let Err(e) = regex::Regex::new(value) {
            let first = e
                .to_string()
                .lines()
                .last()
                .unwrap_or("invalid")
                .trim()
                .to_string();
            self.push(
                path,
                format!("invalid regular expression {value:?}: {first}"),
            );
        }
    }
    fn service_kind(&mut self, path: &str, group: &Option<String>, kind: &Option<String>) {
        if let Some(g) = group
            && !g.is_empty()
            && g != "core"
        {
            self.push(
                format!("{path}.group"),
                format!("unsupported group {g:?} (expected \"\")"),
            );
        }
        if let Some(k) = kind
            && k != "Service"
        {
            self.push(
                format!("{path}.kind"),
                format!("unsupported kind {k:?} (expected Service)"),
            );
        }
    }
}

fn header_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn hostname_ok(h: &str) -> bool {
    let body = h.strip_prefix("*.").unwrap_or(h);
    !body.is_empty()
        && h.len() <= 253
        && body.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A Kubernetes object name (DNS subdomain: lowercase alphanumerics, `-` and `.`).
fn secret_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn port_ok(p: Option<i32>) -> bool {
    p.is_none_or(|p| (1..=65535).contains(&p))
}

/// Checks a ServiceRoute spec. Empty means valid.
pub fn service_route(spec: &ServiceRouteSpec) -> Vec<FieldError> {
    let mut e = Errors(Vec::new());
    if spec.parent_refs.is_empty() {
        e.push("spec.parentRefs", "at least one parent Service is required");
    }
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let path = format!("spec.parentRefs[{i}]");
        e.service_kind(&path, &p.group, &p.kind);
        if p.name.is_empty() {
            e.push(format!("{path}.name"), "required");
        }
        if !port_ok(p.port) {
            e.push(format!("{path}.port"), "must be 1-65535");
        }
    }
    for (i, h) in spec.hostnames.iter().enumerate() {
        if !hostname_ok(&h.0) {
            e.push(
                format!("spec.hostnames[{i}]"),
                format!(
                    "invalid hostname {:?} (lower-case DNS name, optionally starting with \"*.\")",
                    h.0
                ),
            );
        }
    }
    if spec.rules.len() > 64 {
        e.push("spec.rules", "at most 64 rules");
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        let rp = format!("spec.rules[{r}]");
        for (m, mat) in rule.matches.iter().enumerate() {
            let mp = format!("{rp}.matches[{m}]");
            if let Some(path) = &mat.path {
                let pp = format!("{mp}.path.value");
                match path.type_ {
                    PathMatchType::RegularExpression => e.regex(pp, &path.value),
                    PathMatchType::Exact | PathMatchType::PathPrefix => {
                        if !path.value.starts_with('/') {
                            e.push(
                                pp,
                                format!(
                                    "{:?} must be an absolute path (start with '/')",
                                    path.value
                                ),
                            );
                        } else if path.type_ == PathMatchType::PathPrefix
                            && path.value.len() > 1
                            && path.value.ends_with('/')
                        {
                            e.push(
                                pp,
                                format!("PathPrefix {:?} must not end with '/'", path.value),
                            );
                        }
                    }
                }
            }
            for (h, hm) in mat.headers.iter().enumerate() {
                let hp = format!("{mp}.headers[{h}]");
                if !header_name_ok(&hm.name) {
                    e.push(
                        format!("{hp}.name"),
                        format!("invalid header name {:?}", hm.name),
                    );
                }
                if hm.type_ == StringMatchType::RegularExpression {
                    e.regex(format!("{hp}.value"), &hm.value);
                }
            }
            for (q, qm) in mat.query_params.iter().enumerate() {
                let qp = format!("{mp}.queryParams[{q}]");
                if qm.name.is_empty() {
                    e.push(format!("{qp}.name"), "required");
                }
                if qm.type_ == StringMatchType::RegularExpression {
                    e.regex(format!("{qp}.value"), &qm.value);
                }
            }
        }
        let has_redirect = rule
            .filters
            .iter()
            .any(|f| f.type_ == FilterType::RequestRedirect);
        let has_rewrite = rule
            .filters
            .iter()
            .any(|f| f.type_ == FilterType::UrlRewrite);
        if has_redirect && !rule.backend_refs.is_empty() {
            e.push(
                format!("{rp}.backendRefs"),
                "a rule with a RequestRedirect filter must not have backendRefs",
            );
        }
        if has_redirect && has_rewrite {
            e.push(
                format!("{rp}.filters"),
                "RequestRedirect and URLRewrite cannot be used in the same rule",
            );
        }
        for (f, filter) in rule.filters.iter().enumerate() {
            validate_filter(&mut e, &format!("{rp}.filters[{f}]"), filter, rule);
        }
        for (b, backend) in rule.backend_refs.iter().enumerate() {
            let bp = format!("{rp}.backendRefs[{b}]");
            e.service_kind(&bp, &backend.target.group, &backend.target.kind);
            if backend.target.name.is_empty() {
                e.push(format!("{bp}.name"), "required");
            }
            if !port_ok(backend.target.port) {
                e.push(format!("{bp}.port"), "must be 1-65535");
            }
            if let Some(w) = backend.weight
                && !(0..=1_000_000).contains(&w)
            {
                e.push(
                    format!("{bp}.weight"),
                    format!("{w} out of range (0-1000000)"),
                );
            }
        }
        if let Some(t) = &rule.timeouts {
            e.duration(format!("{rp}.timeouts.request"), &t.request);
            e.duration(format!("{rp}.timeouts.backendRequest"), &t.backend_request);
            if let (Some(req), Some(be)) = (&t.request, &t.backend_request)
                && let (Ok(req), Ok(be)) = (parse_duration(req), parse_duration(be))
                && !req.is_zero()
                && be > req
            {
                e.push(
                    format!("{rp}.timeouts.backendRequest"),
                    "must not be longer than timeouts.request",
                );
            }
        }
        if let Some(retry) = &rule.retry {
            for (c, code) in retry.codes.iter().enumerate() {
                if !(400..=599).contains(code) {
                    e.push(
                        format!("{rp}.retry.codes[{c}]"),
                        format!("{code} is not a retriable status (400-599)"),
                    );
                }
            }
            if let Some(a) = retry.attempts
                && !(0..=16).contains(&a)
            {
                e.push(
                    format!("{rp}.retry.attempts"),
                    format!("{a} out of range (0-16)"),
                );
            }
            e.duration(format!("{rp}.retry.backoff"), &retry.backoff);
        }
    }
    e.0
}

fn validate_filter(e: &mut Errors, fp: &str, filter: &RouteFilter, rule: &RouteRule) {
    let set = [
        (
            FilterType::RequestHeaderModifier,
            "requestHeaderModifier",
            filter.request_header_modifier.is_some(),
        ),
        (
            FilterType::ResponseHeaderModifier,
            "responseHeaderModifier",
            filter.response_header_modifier.is_some(),
        ),
        (
            FilterType::RequestRedirect,
            "requestRedirect",
            filter.request_redirect.is_some(),
        ),
        (
            FilterType::UrlRewrite,
            "urlRewrite",
            filter.url_rewrite.is_some(),
        ),
        (
            FilterType::RequestMirror,
            "requestMirror",
            filter.request_mirror.is_some(),
        ),
    ];
    for (ty, field, present) in set {
        if (filter.type_ == ty) != present {
            if present {
                e.push(
                    format!("{fp}.{field}"),
                    format!("must not be set when type is {:?}", filter.type_),
                );
            } else {
                e.push(
                    format!("{fp}.{field}"),
                    format!("required when type is {ty:?}"),
                );
            }
        }
    }
    for (field, modifier) in [
        ("requestHeaderModifier", &filter.request_header_modifier),
        ("responseHeaderModifier", &filter.response_header_modifier),
    ] {
        if let Some(m) = modifier {
            for (kind, headers) in [("set", &m.set), ("add", &m.add)] {
                for (i, h) in headers.iter().enumerate() {
                    if !header_name_ok(&h.name) {
                        e.push(
                            format!("{fp}.{field}.{kind}[{i}].name"),
                            format!("invalid header name {:?}", h.name),
                        );
                    }
                }
            }
            for (i, h) in m.remove.iter().enumerate() {
                if !header_name_ok(h) {
                    e.push(
                        format!("{fp}.{field}.remove[{i}]"),
                        format!("invalid header name {h:?}"),
                    );
                }
            }
        }
    }
    let path_modifier = |e: &mut Errors, p: &str, m: &PathModifier| {
        match m.type_ {
            PathModifierType::ReplaceFullPath => {
                if m.replace_full_path.is_none() {
                    e.push(
                        format!("{p}.replaceFullPath"),
                        "required when type is ReplaceFullPath",
                    );
                }
                if m.replace_prefix_match.is_some() {
                    e.push(
                        format!("{p}.replacePrefixMatch"),
                        "must not be set when type is ReplaceFullPath",
                    );
                }
            }
            PathModifierType::ReplacePrefixMatch => {
                if m.replace_prefix_match.is_none() {
                    e.push(
                        format!("{p}.replacePrefixMatch"),
                        "required when type is ReplacePrefixMatch",
                    );
                }
                if m.replace_full_path.is_some() {
                    e.push(
                        format!("{p}.replaceFullPath"),
                        "must not be set when type is ReplacePrefixMatch",
                    );
                }
                // Gateway API: ReplacePrefixMatch needs exactly one PathPrefix match to replace.
                let prefix_only = !rule.matches.is_empty()
                    && rule.matches.iter().all(|m| {
                        m.path
                            .as_ref()
                            .is_none_or(|p| p.type_ == PathMatchType::PathPrefix)
                    });
                if !prefix_only {
                    e.push(
                        format!("{p}.type"),
                        "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
                    );
                }
            }
        }
    };
    if let Some(r) = &filter.request_redirect {
        if let Some(code) = r.status_code
            && ![301, 302, 303, 307, 308].contains(&code)
        {
            e.push(
                format!("{fp}.requestRedirect.statusCode"),
                format!("{code} is not one of 301, 302, 303, 307, 308"),
            );
        }
        if !port_ok(r.port) {
            e.push(format!("{fp}.requestRedirect.port"), "must be 1-65535");
        }
        if let Some(p) = &r.path {
            path_modifier(e, &format!("{fp}.requestRedirect.path"), p);
        }
    }
    if let Some(r) = &filter.url_rewrite
        && let Some(p) = &r.path
    {
        path_modifier(e, &format!("{fp}.urlRewrite.path"), p);
    }
    if let Some(m) = &filter.request_mirror {
        let mp = format!("{fp}.requestMirror.backendRef");
        e.service_kind(&mp, &m.backend_ref.group, &m.backend_ref.kind);
        if !port_ok(m.backend_ref.port) {
            e.push(format!("{mp}.port"), "must be 1-65535");
        }
        if let Some(p) = m.percent
            && !(0..=100).contains(&p)
        {
            e.push(
                format!("{fp}.requestMirror.percent"),
                format!("{p} out of range (0-100)"),
            );
        }
    }
}

/// Checks a ServicePolicy spec. Empty means valid.
pub fn service_policy(spec: &ServicePolicySpec) -> Vec<FieldError> {
    let mut e = Errors(Vec::new());
    e.service_kind(
        "spec.targetRef",
        &spec.target_ref.group,
        &spec.target_ref.kind,
    );
    if spec.target_ref.name.is_empty() {
        e.push("spec.targetRef.name", "required");
    }
    if !port_ok(spec.target_ref.port) {
        e.push("spec.targetRef.port", "must be 1-65535");
    }
    e.duration("spec.connectTimeout".into(), &spec.connect_timeout);
    if let Some(lb) = &spec.load_balancer {
        let hashing = matches!(
            lb.type_,
            LoadBalancerType::RingHash | LoadBalancerType::Maglev
        );
        if !lb.hash_policies.is_empty() && !hashing {
            e.push(
                "spec.loadBalancer.hashPolicies",
                format!(
                    "hashPolicies need type RingHash or Maglev (type is {:?})",
                    lb.type_
                ),
            );
        }
        for (i, h) in lb.hash_policies.iter().enumerate() {
            let n = [
                h.header.is_some(),
                h.cookie.is_some(),
                h.source_ip.is_some(),
                h.query_parameter.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if n != 1 {
                e.push(
                    format!("spec.loadBalancer.hashPolicies[{i}]"),
                    "exactly one of header, cookie, sourceIP, queryParameter must be set",
                );
            }
            if let Some(c) = &h.cookie {
                e.duration(
                    format!("spec.loadBalancer.hashPolicies[{i}].cookie.ttl"),
                    &c.ttl,
                );
            }
        }
        if lb.choice_count.is_some() && lb.type_ != LoadBalancerType::LeastRequest {
            e.push(
                "spec.loadBalancer.choiceCount",
                "only applies to type LeastRequest",
            );
        }
        if lb.minimum_ring_size.is_some() && lb.type_ != LoadBalancerType::RingHash {
            e.push(
                "spec.loadBalancer.minimumRingSize",
                "only applies to type RingHash",
            );
        }
    }
    if let Some(hc) = &spec.health_check {
        let n = [hc.http.is_some(), hc.tcp.is_some(), hc.grpc.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if n != 1 {
            e.push(
                "spec.healthCheck",
                "exactly one of http, tcp, grpc must be set",
            );
        }
        for (f, v) in [
            ("interval", &hc.interval),
            ("timeout", &hc.timeout),
            ("jitter", &hc.jitter),
            ("noTrafficInterval", &hc.no_traffic_interval),
        ] {
            e.duration(format!("spec.healthCheck.{f}"), v);
        }
        if let Some(http) = &hc.http {
            if !http.path.starts_with('/') {
                e.push(
                    "spec.healthCheck.http.path",
                    format!("{:?} must start with '/'", http.path),
                );
            }
            for (i, s) in http.expected_statuses.iter().enumerate() {
                if !(100..=599).contains(s) {
                    e.push(
                        format!("spec.healthCheck.http.expectedStatuses[{i}]"),
                        format!("{s} is not an HTTP status"),
                    );
                }
            }
        }
    }
    if let Some(od) = &spec.outlier_detection {
        e.duration("spec.outlierDetection.interval".into(), &od.interval);
        e.duration(
            "spec.outlierDetection.baseEjectionTime".into(),
            &od.base_ejection_time,
        );
        if od.max_ejection_percent.is_some_and(|p| p > 100) {
            e.push("spec.outlierDetection.maxEjectionPercent", "must be 0-100");
        }
    }
    if let Some(cp) = &spec.connection_pool {
        e.duration("spec.connectionPool.idleTimeout".into(), &cp.idle_timeout);
        e.duration(
            "spec.connectionPool.maxConnectionDuration".into(),
            &cp.max_connection_duration,
        );
        if cp.max_requests_per_connection == Some(0) {
            e.push(
                "spec.connectionPool.maxRequestsPerConnection",
                "must be at least 1",
            );
        }
        if let Some(k) = &cp.tcp_keepalive {
            e.duration("spec.connectionPool.tcpKeepalive.time".into(), &k.time);
            e.duration(
                "spec.connectionPool.tcpKeepalive.interval".into(),
                &k.interval,
            );
        }
    }
    if let Some(tls) = &spec.tls {
        let files = tls.certificate_chain_file.is_some() && tls.private_key_file.is_some();
        if tls.mode == TlsMode::Mutual && !files && tls.client_certificate_secret.is_none() {
            e.push(
                "spec.tls",
                "mode Mutual needs clientCertificateSecret, or certificateChainFile and privateKeyFile",
            );
        }
        if tls.ca_certificate_file.is_some() && tls.ca_certificate_secret.is_some() {
            e.push(
                "spec.tls.caCertificateSecret",
                "excludes caCertificateFile (use one of them)",
            );
        }
        if tls.client_certificate_secret.is_some()
            && (tls.certificate_chain_file.is_some() || tls.private_key_file.is_some())
        {
            e.push(
                "spec.tls.clientCertificateSecret",
                "excludes certificateChainFile and privateKeyFile (use one of them)",
            );
        }
        for (field, secret) in [
            ("caCertificateSecret", &tls.ca_certificate_secret),
            ("clientCertificateSecret", &tls.client_certificate_secret),
        ] {
            if let Some(s) = secret
                && !secret_name_ok(&s.name)
            {
                e.push(
                    format!("spec.tls.{field}.name"),
                    format!("{:?} is not a valid Secret name (a DNS subdomain)", s.name),
                );
            }
        }
    }
    e.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(yaml: &str) -> ServiceRouteSpec {
        serde_saphyr::from_str(yaml).expect("test spec parses")
    }

    #[test]
    fn valid_route_has_no_errors() {
        let spec = route(
            "parentRefs: [{name: reviews, port: 9080}]\nrules:\n- matches: [{path: {type: PathPrefix, value: /api}}]\n  backendRefs: [{name: reviews-v2, port: 9080, weight: 90}]\n",
        );
        assert_eq!(service_route(&spec), vec![]);
    }

    #[test]
    fn errors_name_the_field() {
        let spec = route(
            "parentRefs: [{name: r, kind: Pod}]\nrules:\n- matches: [{path: {type: RegularExpression, value: '(['}}, {path: {value: 'api'}}]\n  filters: [{type: RequestRedirect}]\n  backendRefs: [{name: x, weight: -1}]\n",
        );
        let errors: Vec<String> = service_route(&spec)
            .iter()
            .map(ToString::to_string)
            .collect();
        let has = |p: &str| errors.iter().any(|e| e.starts_with(p));
        assert!(
            has("spec.parentRefs[0].kind: unsupported kind \"Pod\""),
            "{errors:?}"
        );
        assert!(
            has("spec.rules[0].matches[0].path.value: invalid regular expression"),
            "{errors:?}"
        );
        assert!(
            has("spec.rules[0].matches[1].path.value: \"api\" must be an absolute path"),
            "{errors:?}"
        );
        assert!(
            has("spec.rules[0].filters[0].requestRedirect: required"),
            "{errors:?}"
        );
        assert!(
            has("spec.rules[0].backendRefs: a rule with a RequestRedirect"),
            "{errors:?}"
        );
        assert!(
            has("spec.rules[0].backendRefs[0].weight: -1 out of range"),
            "{errors:?}"
        );
    }

    #[test]
    fn policy_rules() {
        let spec: ServicePolicySpec = serde_saphyr::from_str(
            "targetRef: {name: s}\nloadBalancer: {type: RoundRobin, hashPolicies: [{header: x-user}]}\nhealthCheck: {interval: 5x}\nconnectTimeout: 1.5s\n",
        )
        .expect("parses");
        let errors: Vec<String> = service_policy(&spec)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors.iter().any(|e| {
            e.starts_with("spec.loadBalancer.hashPolicies: hashPolicies need type RingHash")
        }));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.healthCheck: exactly one of"))
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.healthCheck.interval: invalid duration"))
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.connectTimeout: invalid duration"))
        );
    }

    #[test]
    fn tls_secrets_exclude_the_matching_files() {
        let errors = |yaml: &str| -> Vec<String> {
            let spec: ServicePolicySpec = serde_saphyr::from_str(yaml).expect("parses");
            service_policy(&spec)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            errors(
                "targetRef: {name: s}\ntls: {mode: Mutual, caCertificateSecret: {name: ca}, clientCertificateSecret: {name: client}}\n"
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            errors("targetRef: {name: s}\ntls: {mode: Mutual, caCertificateFile: /ca.pem, caCertificateSecret: {name: ca}, clientCertificateSecret: {name: c}, privateKeyFile: /k.pem}\n"),
            vec![
                "spec.tls.caCertificateSecret: excludes caCertificateFile (use one of them)".to_string(),
                "spec.tls.clientCertificateSecret: excludes certificateChainFile and privateKeyFile (use one of them)".to_string(),
            ]
        );
        assert_eq!(
            errors("targetRef: {name: s}\ntls: {mode: Mutual, caCertificateSecret: {name: Bad_Name}}\n"),
            vec![
                "spec.tls: mode Mutual needs clientCertificateSecret, or certificateChainFile and privateKeyFile".to_string(),
                "spec.tls.caCertificateSecret.name: \"Bad_Name\" is not a valid Secret name (a DNS subdomain)".to_string(),
            ]
        );
    }
}
