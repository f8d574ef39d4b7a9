//! `ServiceRoute`: how traffic addressed to a Service is routed (Gateway API's HTTPRoute,
//! GAMMA-style, with a kind of its own).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ObjectStatus;

/// The desired routing for traffic addressed to the parent Services.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "capstan.dev",
    version = "v1alpha1",
    kind = "ServiceRoute",
    namespaced,
    status = "ObjectStatus",
    shortname = "svcroute",
    category = "capstan",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Proxies","type":"string","jsonPath":".status.proxies.acked"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRouteSpec {
    /// The Services (optionally one port of each) whose traffic this route applies to.
    #[schemars(length(min = 1, max = 32))]
    pub parent_refs: Vec<ParentRef>,
    /// Host names (as clients write them in `Host`) this route applies to, in addition to the
    /// parent Service's own DNS names. Empty: only the Service's names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub hostnames: Vec<Hostname>,
    /// Rules, tried in order of Gateway API precedence (most specific match first).
    #[serde(default = "default_rules")]
    #[schemars(length(max = 64))]
    pub rules: Vec<RouteRule>,
}

fn default_rules() -> Vec<RouteRule> {
    vec![RouteRule::default()]
}

/// A host name, optionally with a leading `*.` wildcard label.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(transparent)]
pub struct Hostname(
    #[schemars(
        regex(
            pattern = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
        ),
        length(min = 1, max = 253)
    )]
    pub String,
);

/// A reference to the Service a route attaches to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// API group of the parent: `""` (core) for a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind of the parent; only `Service` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name of the Service.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of the Service; defaults to the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// One port of the Service; unset: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// One routing rule: when any of `matches` holds, apply `filters` and send to `backendRefs`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.filters) && self.filters.exists(f, f.type == 'RequestRedirect') && has(self.backendRefs) && size(self.backendRefs) > 0)",
     "message": "a rule with a RequestRedirect filter must not have backendRefs"},
    {"rule": "!(has(self.filters) && self.filters.exists(f, f.type == 'RequestRedirect') && self.filters.exists(f, f.type == 'URLRewrite'))",
     "message": "RequestRedirect and URLRewrite cannot be used in the same rule"}
]))]
pub struct RouteRule {
    /// An optional name, used in route names and status messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Conditions, any of which selects this rule. Empty: match every request (`PathPrefix /`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub matches: Vec<RouteMatch>,
    /// Processing applied to matching requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub filters: Vec<RouteFilter>,
    /// Where matching requests go, split by weight. Empty (and no redirect): the parent Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub backend_refs: Vec<BackendRef>,
    /// Request and per-try timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// Retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// A request condition. All of its parts must hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// Path condition; unset: `PathPrefix /`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Header conditions (all must hold).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<HeaderMatch>,
    /// Query parameter conditions (all must hold).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub query_params: Vec<QueryParamMatch>,
    /// HTTP method condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
}

/// How a path is matched.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

/// A path condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type == 'RegularExpression' || self.value.startsWith('/')",
     "message": "value must be an absolute path (start with '/')"},
    {"rule": "self.type != 'PathPrefix' || !self.value.endsWith('/') || self.value == '/'",
     "message": "a PathPrefix value must not end with '/' (except '/')"}
]))]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression` (RE2 syntax).
    #[serde(rename = "type", default)]
    pub type_: PathMatchType,
    /// The path, prefix or regular expression.
    #[serde(default = "default_path")]
    #[schemars(length(min = 1, max = 1024))]
    pub value: String,
}

fn default_path() -> String {
    "/".into()
}

/// How a header or query parameter value is matched.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum StringMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// A header condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type", default)]
    pub type_: StringMatchType,
    /// Header name, case-insensitive.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
    )]
    pub name: String,
    /// Value or regular expression.
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// A query parameter condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueryParamMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type", default)]
    pub type_: StringMatchType,
    /// Parameter name, case-sensitive.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Value or regular expression.
    #[schemars(length(max = 1024))]
    pub value: String,
}

/// HTTP methods a route can match.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[allow(clippy::upper_case_acronyms)]
pub enum HttpMethod {
    GET,
    HEAD,
    POST,
    PUT,
    DELETE,
    CONNECT,
    OPTIONS,
    TRACE,
    PATCH,
}

impl HttpMethod {
    /// The method as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GET => "GET",
            Self::HEAD => "HEAD",
            Self::POST => "POST",
            Self::PUT => "PUT",
            Self::DELETE => "DELETE",
            Self::CONNECT => "CONNECT",
            Self::OPTIONS => "OPTIONS",
            Self::TRACE => "TRACE",
            Self::PATCH => "PATCH",
        }
    }
}

/// The kinds of filter a rule can apply.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestMirror,
}

/// One filter; exactly the field named by `type` is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(self.type == 'RequestHeaderModifier') == has(self.requestHeaderModifier)", "message": "requestHeaderModifier must be set exactly when type is RequestHeaderModifier"},
    {"rule": "(self.type == 'ResponseHeaderModifier') == has(self.responseHeaderModifier)", "message": "responseHeaderModifier must be set exactly when type is ResponseHeaderModifier"},
    {"rule": "(self.type == 'RequestRedirect') == has(self.requestRedirect)", "message": "requestRedirect must be set exactly when type is RequestRedirect"},
    {"rule": "(self.type == 'URLRewrite') == has(self.urlRewrite)", "message": "urlRewrite must be set exactly when type is URLRewrite"},
    {"rule": "(self.type == 'RequestMirror') == has(self.requestMirror)", "message": "requestMirror must be set exactly when type is RequestMirror"}
]))]
pub struct RouteFilter {
    /// Which filter this is.
    #[serde(rename = "type")]
    pub type_: FilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "urlRewrite"
    )]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

/// Header edits: `set` overwrites, `add` appends, `remove` deletes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub set: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub add: Vec<HttpHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct HttpHeader {
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
    )]
    pub name: String,
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// How a redirect or rewrite changes the path.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

/// A path replacement.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(self.type == 'ReplaceFullPath') == has(self.replaceFullPath)", "message": "replaceFullPath must be set exactly when type is ReplaceFullPath"},
    {"rule": "(self.type == 'ReplacePrefixMatch') == has(self.replacePrefixMatch)", "message": "replacePrefixMatch must be set exactly when type is ReplacePrefixMatch"}
]))]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub type_: PathModifierType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub replace_prefix_match: Option<String>,
}

/// Redirect schemes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RedirectScheme {
    Http,
    Https,
}

/// Answer with a redirect instead of forwarding.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestRedirect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<RedirectScheme>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<Hostname>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// 301 (default), 302, 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = [301, 302, 303, 307, 308]))]
    pub status_code: Option<i32>,
}

/// Rewrite the request before forwarding.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<Hostname>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

/// Send a copy of each matching request to another Service; its responses are discarded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: BackendObjectRef,
    /// Share of requests mirrored, 0–100; default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<i32>,
}

/// A Service port to send traffic to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendObjectRef {
    /// `""` (core) for a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Only `Service` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Defaults to the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Required unless the Service has exactly one port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// A weighted backend.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(flatten)]
    pub target: BackendObjectRef,
    /// Relative weight, 0–1000000; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub weight: Option<i32>,
}

/// Timeouts for a rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Whole request, retries included. `0s` disables the timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub request: Option<super::Duration>,
    /// Each try to a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub backend_request: Option<super::Duration>,
}

/// Retries for a rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// HTTP status codes that are retried (in addition to connect failures and resets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub codes: Vec<i32>,
    /// Retries after the first try; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub attempts: Option<i32>,
    /// Base interval of exponential backoff between tries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub backoff: Option<super::Duration>,
}
