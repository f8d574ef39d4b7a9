//! The supported subset of Envoy's configuration, as one table.
//!
//! Every message the proxy reads is walked in its wire form against `capstan_proto::schema`
//! (field numbers and names generated from the Envoy protos; no descriptor pool, whose ≈10 MB
//! would outweigh the rest of the proxy at rest); any field that is set but not listed for its message
//! type is reported as unsupported, with its path. This is default-deny: a message type missing
//! from the table is itself an error, so a new nested message cannot slip through unchecked.
//! Values (enum members, ranges, cross references) are checked by the typed translation in the
//! sibling modules; this module only decides which *fields* may be present.
//!
//! It must not interpret values or build the configuration model.

use std::collections::HashMap;
use std::sync::OnceLock;

use capstan_proto::schema::{self, FieldKind};
use prost::{Message, Name};

use super::errors::{Errors, Path};

/// Message types whose every field is accepted: well-known wrappers and informational messages
/// that do not change how traffic flows.
const OPEN: &[&str] = &[
    "google.protobuf.Duration",
    "google.protobuf.BoolValue",
    "google.protobuf.UInt32Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int64Value",
    "google.protobuf.DoubleValue",
    "google.protobuf.StringValue",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Empty",
    // Identity sent to the control plane; it does not change the data path.
    "envoy.config.core.v3.Node",
    "envoy.config.core.v3.Metadata",
    "envoy.config.core.v3.Locality",
];

/// For each message type, the fields the proxy implements.
const SUPPORTED: &[(&str, &[&str])] = &[
    (
        "envoy.config.bootstrap.v3.Bootstrap",
        &["node", "static_resources", "dynamic_resources", "admin"],
    ),
    (
        "envoy.config.bootstrap.v3.Bootstrap.DynamicResources",
        &["ads_config", "cds_config", "lds_config"],
    ),
    (
        "envoy.config.core.v3.ApiConfigSource",
        &[
            "api_type",
            "transport_api_version",
            "grpc_services",
            "set_node_on_first_message_only",
        ],
    ),
    ("envoy.config.core.v3.GrpcService", &["envoy_grpc"]),
    (
        "envoy.config.core.v3.GrpcService.EnvoyGrpc",
        &["cluster_name"],
    ),
    (
        "envoy.config.bootstrap.v3.Bootstrap.StaticResources",
        &["listeners", "clusters"],
    ),
    ("envoy.config.bootstrap.v3.Admin", &["address"]),
    ("envoy.config.core.v3.Address", &["socket_address"]),
    (
        "envoy.config.core.v3.SocketAddress",
        &["protocol", "address", "port_value"],
    ),
    // Clusters.
    (
        "envoy.config.cluster.v3.Cluster",
        &[
            "name",
            "type",
            "connect_timeout",
            "lb_policy",
            "least_request_lb_config",
            "ring_hash_lb_config",
            "maglev_lb_config",
            "common_lb_config",
            "load_assignment",
            "dns_refresh_rate",
            "dns_lookup_family",
            "eds_cluster_config",
            "typed_extension_protocol_options",
            "metadata",
            "health_checks",
            "circuit_breakers",
            "outlier_detection",
            "max_requests_per_connection",
            "upstream_connection_options",
            "transport_socket",
        ],
    ),
    ("envoy.config.cluster.v3.CircuitBreakers", &["thresholds"]),
    (
        "envoy.config.cluster.v3.UpstreamConnectionOptions",
        &["tcp_keepalive"],
    ),
    (
        "envoy.config.core.v3.TcpKeepalive",
        &["keepalive_probes", "keepalive_time", "keepalive_interval"],
    ),
    (
        "envoy.config.core.v3.HttpProtocolOptions",
        &[
            "idle_timeout",
            "max_connection_duration",
            "max_requests_per_connection",
        ],
    ),
    (
        "envoy.config.cluster.v3.CircuitBreakers.Thresholds",
        &[
            "priority",
            "max_connections",
            "max_pending_requests",
            "max_requests",
            "max_retries",
            "retry_budget",
            "track_remaining",
        ],
    ),
    (
        "envoy.config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget",
        &["budget_percent", "min_retry_concurrency"],
    ),
    (
        "envoy.config.cluster.v3.OutlierDetection",
        &[
            "consecutive_5xx",
            "interval",
            "base_ejection_time",
            "max_ejection_percent",
            "enforcing_consecutive_5xx",
            "enforcing_success_rate",
            "success_rate_minimum_hosts",
            "success_rate_request_volume",
            "success_rate_stdev_factor",
            "consecutive_gateway_failure",
            "enforcing_consecutive_gateway_failure",
            "split_external_local_origin_errors",
            "consecutive_local_origin_failure",
            "enforcing_consecutive_local_origin_failure",
            "enforcing_local_origin_success_rate",
            "failure_percentage_threshold",
            "enforcing_failure_percentage",
            "enforcing_failure_percentage_local_origin",
            "failure_percentage_minimum_hosts",
            "failure_percentage_request_volume",
            "max_ejection_time",
            "always_eject_one_host",
            "successful_active_health_check_uneject_host",
        ],
    ),
    (
        "envoy.config.core.v3.HealthCheck",
        &[
            "timeout",
            "interval",
            "initial_jitter",
            "interval_jitter",
            "interval_jitter_percent",
            "unhealthy_threshold",
            "healthy_threshold",
            "reuse_connection",
            "no_traffic_interval",
            "no_traffic_healthy_interval",
            "unhealthy_interval",
            "unhealthy_edge_interval",
            "healthy_edge_interval",
            "http_health_check",
            "tcp_health_check",
            "grpc_health_check",
        ],
    ),
    (
        "envoy.config.core.v3.HealthCheck.HttpHealthCheck",
        &[
            "host",
            "path",
            "request_headers_to_add",
            "request_headers_to_remove",
            "expected_statuses",
            "retriable_statuses",
            "codec_client_type",
            "method",
        ],
    ),
    (
        "envoy.config.core.v3.HealthCheck.TcpHealthCheck",
        &["send", "receive"],
    ),
    (
        "envoy.config.core.v3.HealthCheck.GrpcHealthCheck",
        &["service_name", "authority"],
    ),
    (
        "envoy.config.core.v3.HealthCheck.Payload",
        &["text", "binary"],
    ),
    ("envoy.type.v3.Int64Range", &["start", "end"]),
    (
        "envoy.config.cluster.v3.Cluster.EdsClusterConfig",
        &["eds_config", "service_name"],
    ),
    (
        "envoy.config.cluster.v3.Cluster.LeastRequestLbConfig",
        &["choice_count", "active_request_bias"],
    ),
    (
        "envoy.config.core.v3.RuntimeDouble",
        &["default_value", "runtime_key"],
    ),
    (
        "envoy.config.cluster.v3.Cluster.RingHashLbConfig",
        &["minimum_ring_size", "maximum_ring_size", "hash_function"],
    ),
    (
        "envoy.config.cluster.v3.Cluster.MaglevLbConfig",
        &["table_size"],
    ),
    (
        "envoy.config.cluster.v3.Cluster.CommonLbConfig",
        &["healthy_panic_threshold", "locality_weighted_lb_config"],
    ),
    (
        "envoy.config.cluster.v3.Cluster.CommonLbConfig.LocalityWeightedLbConfig",
        &[],
    ),
    ("envoy.type.v3.Percent", &["value"]),
    (
        "envoy.config.core.v3.ConfigSource",
        &["ads", "initial_fetch_timeout", "resource_api_version"],
    ),
    ("envoy.config.core.v3.AggregatedConfigSource", &[]),
    (
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        &["cluster_name", "endpoints", "policy"],
    ),
    (
        "envoy.config.endpoint.v3.ClusterLoadAssignment.Policy",
        &["overprovisioning_factor"],
    ),
    (
        "envoy.config.endpoint.v3.LocalityLbEndpoints",
        &[
            "locality",
            "lb_endpoints",
            "priority",
            "metadata",
            "load_balancing_weight",
        ],
    ),
    (
        "envoy.config.endpoint.v3.LbEndpoint",
        &[
            "endpoint",
            "health_status",
            "metadata",
            "load_balancing_weight",
        ],
    ),
    (
        "envoy.config.endpoint.v3.Endpoint",
        &["address", "hostname"],
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        &[
            "explicit_http_config",
            "auto_config",
            "use_downstream_protocol_config",
            "common_http_protocol_options",
        ],
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.AutoHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions.ExplicitHttpConfig",
        &["http_protocol_options", "http2_protocol_options"],
    ),
    ("envoy.config.core.v3.Http1ProtocolOptions", &[]),
    ("envoy.config.core.v3.Http2ProtocolOptions", &[]),
    // Listeners and the HTTP connection manager.
    (
        "envoy.config.listener.v3.Listener",
        &[
            "name",
            "address",
            "filter_chains",
            "default_filter_chain",
            "stat_prefix",
            "traffic_direction",
            "metadata",
            "listener_filters",
        ],
    ),
    (
        "envoy.config.listener.v3.ListenerFilter",
        &["name", "typed_config"],
    ),
    (
        "envoy.config.listener.v3.FilterChain",
        &[
            "filters",
            "name",
            "metadata",
            "filter_chain_match",
            "transport_socket",
        ],
    ),
    // TLS (`envoy.transport_sockets.tls`) on filter chains and clusters.
    (
        "envoy.config.core.v3.TransportSocket",
        &["name", "typed_config"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        &["common_tls_context", "require_client_certificate"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        &["common_tls_context", "sni"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext",
        &[
            "tls_params",
            "tls_certificates",
            "validation_context",
            "alpn_protocols",
            "tls_certificate_sds_secret_configs",
            "validation_context_sds_secret_config",
            "combined_validation_context",
        ],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CommonTlsContext.CombinedCertificateValidationContext",
        &[
            "default_validation_context",
            "validation_context_sds_secret_config",
        ],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig",
        &["name", "sds_config"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.Secret",
        &["name", "tls_certificate", "validation_context"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.TlsParameters",
        &[
            "tls_minimum_protocol_version",
            "tls_maximum_protocol_version",
        ],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.TlsCertificate",
        &["certificate_chain", "private_key"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.CertificateValidationContext",
        &["trusted_ca", "match_typed_subject_alt_names"],
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.SubjectAltNameMatcher",
        &["san_type", "matcher"],
    ),
    (
        "envoy.config.listener.v3.FilterChainMatch",
        &[
            "destination_port",
            "prefix_ranges",
            "direct_source_prefix_ranges",
            "source_type",
            "source_prefix_ranges",
            "source_ports",
            "transport_protocol",
            "server_names",
            "application_protocols",
        ],
    ),
    (
        "envoy.config.core.v3.CidrRange",
        &["address_prefix", "prefix_len"],
    ),
    // The TCP proxy.
    (
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        &[
            "stat_prefix",
            "cluster",
            "weighted_clusters",
            "idle_timeout",
            "max_connect_attempts",
        ],
    ),
    (
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster",
        &["clusters"],
    ),
    (
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy.WeightedCluster.ClusterWeight",
        &["name", "weight"],
    ),
    ("envoy.config.listener.v3.Filter", &["name", "typed_config"]),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        &[
            "codec_type",
            "stat_prefix",
            "route_config",
            "rds",
            "http_filters",
            "server_name",
            "server_header_transformation",
            "generate_request_id",
            "strip_matching_host_port",
            "strip_any_host_port",
            "upgrade_configs",
        ],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.UpgradeConfig",
        &["upgrade_type", "enabled"],
    ),
    (
        "envoy.config.route.v3.RouteAction.UpgradeConfig",
        &["upgrade_type", "enabled"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.Rds",
        &["route_config_name", "config_source"],
    ),
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
        &["name", "typed_config"],
    ),
    (
        "envoy.extensions.filters.http.router.v3.Router",
        &["suppress_envoy_headers"],
    ),
    (
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        &[
            "stat_prefix",
            "status",
            "token_bucket",
            "filter_enabled",
            "filter_enforced",
            "request_headers_to_add_when_not_enforced",
            "response_headers_to_add",
            "local_rate_limit_per_downstream_connection",
        ],
    ),
    ("envoy.type.v3.HttpStatus", &["code"]),
    (
        "envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit",
        &["stat_prefix", "token_bucket", "runtime_enabled"],
    ),
    // No runtime layer: `default_value` applies, as in an Envoy without runtime overrides.
    (
        "envoy.config.core.v3.RuntimeFeatureFlag",
        &["default_value", "runtime_key"],
    ),
    (
        "envoy.type.v3.TokenBucket",
        &["max_tokens", "tokens_per_fill", "fill_interval"],
    ),
    // Routes.
    (
        "envoy.config.route.v3.RouteConfiguration",
        &[
            "name",
            "virtual_hosts",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "validate_clusters",
            "ignore_port_in_host_matching",
            "max_direct_response_body_size_bytes",
            "typed_per_filter_config",
        ],
    ),
    (
        "envoy.config.route.v3.VirtualHost",
        &[
            "name",
            "domains",
            "routes",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "metadata",
            "retry_policy",
            "typed_per_filter_config",
        ],
    ),
    (
        "envoy.config.route.v3.Route",
        &[
            "name",
            "match",
            "route",
            "redirect",
            "direct_response",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "metadata",
            "typed_per_filter_config",
        ],
    ),
    (
        "envoy.config.route.v3.RouteMatch",
        &[
            "prefix",
            "path",
            "safe_regex",
            "path_separated_prefix",
            "case_sensitive",
            "headers",
            "query_parameters",
            "grpc",
        ],
    ),
    (
        "envoy.config.route.v3.RouteMatch.GrpcRouteMatchOptions",
        &[],
    ),
    (
        "envoy.config.route.v3.HeaderMatcher",
        &[
            "name",
            "exact_match",
            "safe_regex_match",
            "present_match",
            "prefix_match",
            "suffix_match",
            "contains_match",
            "string_match",
            "invert_match",
            "treat_missing_header_as_empty",
        ],
    ),
    (
        "envoy.config.route.v3.QueryParameterMatcher",
        &["name", "string_match", "present_match"],
    ),
    (
        "envoy.type.matcher.v3.StringMatcher",
        &[
            "exact",
            "prefix",
            "suffix",
            "safe_regex",
            "contains",
            "ignore_case",
        ],
    ),
    (
        "envoy.type.matcher.v3.RegexMatcher",
        &["regex", "google_re2"],
    ),
    ("envoy.type.matcher.v3.RegexMatcher.GoogleRE2", &[]),
    (
        "envoy.type.matcher.v3.RegexMatchAndSubstitute",
        &["pattern", "substitution"],
    ),
    (
        "envoy.config.route.v3.RouteAction",
        &[
            "cluster",
            "weighted_clusters",
            "cluster_not_found_response_code",
            "prefix_rewrite",
            "regex_rewrite",
            "host_rewrite_literal",
            "timeout",
            "retry_policy",
            "request_mirror_policies",
            "upgrade_configs",
            "hash_policy",
            "priority",
        ],
    ),
    (
        "envoy.config.route.v3.RouteAction.HashPolicy",
        &[
            "header",
            "cookie",
            "connection_properties",
            "query_parameter",
            "terminal",
        ],
    ),
    (
        "envoy.config.route.v3.RouteAction.HashPolicy.Header",
        &["header_name"],
    ),
    (
        "envoy.config.route.v3.RouteAction.HashPolicy.Cookie",
        &["name", "ttl", "path", "attributes"],
    ),
    (
        "envoy.config.route.v3.RouteAction.HashPolicy.CookieAttribute",
        &["name", "value"],
    ),
    (
        "envoy.config.route.v3.RouteAction.HashPolicy.ConnectionProperties",
        &["source_ip"],
    ),
    (
        "envoy.config.route.v3.RouteAction.HashPolicy.QueryParameter",
        &["name"],
    ),
    (
        "envoy.config.route.v3.RouteAction.RequestMirrorPolicy",
        &[
            "cluster",
            "runtime_fraction",
            "disable_shadow_host_suffix_append",
        ],
    ),
    (
        "envoy.config.core.v3.RuntimeFractionalPercent",
        &["default_value"],
    ),
    (
        "envoy.type.v3.FractionalPercent",
        &["numerator", "denominator"],
    ),
    (
        "envoy.config.route.v3.RetryPolicy",
        &[
            "retry_on",
            "num_retries",
            "per_try_timeout",
            "retriable_status_codes",
            "retry_back_off",
        ],
    ),
    (
        "envoy.config.route.v3.RetryPolicy.RetryBackOff",
        &["base_interval", "max_interval"],
    ),
    (
        "envoy.config.route.v3.WeightedCluster",
        &["clusters", "total_weight"],
    ),
    (
        "envoy.config.route.v3.WeightedCluster.ClusterWeight",
        &[
            "name",
            "weight",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "host_rewrite_literal",
        ],
    ),
    (
        "envoy.config.route.v3.RedirectAction",
        &[
            "https_redirect",
            "scheme_redirect",
            "host_redirect",
            "port_redirect",
            "path_redirect",
            "prefix_rewrite",
            "regex_rewrite",
            "response_code",
            "strip_query",
        ],
    ),
    (
        "envoy.config.route.v3.DirectResponseAction",
        &["status", "body"],
    ),
    (
        "envoy.config.core.v3.DataSource",
        &["inline_string", "inline_bytes", "filename"],
    ),
    (
        "envoy.config.core.v3.HeaderValueOption",
        &["header", "append", "append_action", "keep_empty_value"],
    ),
    (
        "envoy.config.core.v3.HeaderValue",
        &["key", "value", "raw_value"],
    ),
];

/// Why a field users commonly set is not accepted yet, appended to the error.
const HINTS: &[(&str, &str)] = &[
    (
        "api_config_source",
        "only ADS config sources (ads: {}) are supported",
    ),
    (
        "path_config_source",
        "only ADS config sources (ads: {}) are supported",
    ),
    ("google_grpc", "use envoy_grpc naming a STATIC cluster"),
    (
        "custom_health_check",
        "only http_health_check, tcp_health_check and grpc_health_check are implemented",
    ),
    (
        "per_host_thresholds",
        "per-host circuit breakers are not implemented yet",
    ),
    (
        "max_ejection_time_jitter",
        "ejection time jitter is not implemented yet",
    ),
    (
        "match_subject_alt_names",
        "use match_typed_subject_alt_names",
    ),
    (
        "request_mirror_policies",
        "request mirroring is supported on routes only (route.request_mirror_policies)",
    ),
    (
        "upgrade_configs",
        "only HTTP/1.1 WebSocket upgrades are implemented",
    ),
    ("access_log", "access logs are not implemented yet"),
    (
        "hash_policy",
        "hash policies are implemented on routes only (route.hash_policy)",
    ),
];

fn table() -> &'static HashMap<&'static str, &'static [&'static str]> {
    static TABLE: OnceLock<HashMap<&'static str, &'static [&'static str]>> = OnceLock::new();
    TABLE.get_or_init(|| SUPPORTED.iter().copied().collect())
}

/// Reports every field of `msg` (recursively) that the proxy does not implement.
pub fn check<M: Message + Name>(msg: &M, path: &Path, errors: &mut Errors) {
    walk(&M::full_name(), &msg.encode_to_vec(), path, errors);
}

/// Walks a serialized message of type `type_name` against the table.
fn walk(type_name: &str, bytes: &[u8], path: &Path, errors: &mut Errors) {
    if OPEN.contains(&type_name) {
        return;
    }
    if type_name == "google.protobuf.Any" {
        return walk_any(bytes, path, errors);
    }
    let Some(allowed) = table().get(type_name) else {
        errors.push(path, format!("unsupported message {type_name}"));
        return;
    };
    let Some(message) = schema::message(type_name) else {
        errors.push(path, format!("unknown message type {type_name}"));
        return;
    };
    let fields = match schema::set_fields(message, bytes) {
        Ok(fields) => fields,
        Err(e) => return errors.push(path, format!("cannot read {type_name}: {e}")),
    };
    for field in fields {
        let Some(schema) = field.schema else {
            errors.push(
                path,
                format!("unknown field number {} of {type_name}", field.number),
            );
            continue;
        };
        let name = schema.name;
        let field_path = path.field(name);
        if !allowed.contains(&name) {
            let hint = HINTS
                .iter()
                .find(|(f, _)| *f == name)
                .map(|(_, h)| format!(" ({h})"))
                .unwrap_or_default();
            errors.push(&field_path, format!("unsupported field{hint}"));
            continue;
        }
        match schema.kind {
            FieldKind::Scalar | FieldKind::Map(None) => {}
            FieldKind::Message(inner) if schema.repeated => {
                for (i, payload) in field.payloads.iter().enumerate() {
                    walk(inner, payload, &field_path.index(i), errors);
                }
            }
            FieldKind::Message(inner) => {
                // A singular message sent twice is merged by decoders; each part is checked.
                for payload in &field.payloads {
                    walk(inner, payload, &field_path, errors);
                }
            }
            FieldKind::Map(Some(inner)) => {
                let mut entries = Vec::with_capacity(field.payloads.len());
                for payload in &field.payloads {
                    match schema::map_entry(payload) {
                        Ok(entry) => entries.push(entry),
                        Err(e) => errors.push(&field_path, format!("cannot read entry: {e}")),
                    }
                }
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                for (key, value) in entries {
                    walk(inner, value, &field_path.key(&key), errors);
                }
            }
        }
    }
}

/// An `Any` is checked as the message it carries when that message type is in the table; an
/// extension type the proxy does not know is reported by the typed translation, which names
/// the extension (`unsupported filter type.googleapis.com/...`).
fn walk_any(bytes: &[u8], path: &Path, errors: &mut Errors) {
    let (type_url, value) = match schema::any(bytes) {
        Ok(parts) => parts,
        Err(e) => return errors.push(path, format!("cannot read Any: {e}")),
    };
    let name = type_url.rsplit('/').next().unwrap_or(&type_url);
    if table().contains_key(name) {
        walk(name, value, path, errors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    #[test]
    fn every_table_entry_names_real_fields() {
        for (message, fields) in SUPPORTED {
            let desc = schema::message(message)
                .unwrap_or_else(|| panic!("{message} is not in the compiled schema"));
            for f in *fields {
                assert!(
                    desc.fields.iter().any(|d| d.name == *f),
                    "{message} has no field {f}"
                );
            }
        }
    }

    #[test]
    fn unsupported_fields_are_named_with_hints() {
        let cluster: Cluster = capstan_proto::from_yaml(
            "name: c\nconnect_timeout: 1s\nhealth_checks: [{timeout: 1s, interval: 1s, custom_health_check: {name: x}}]\nper_connection_buffer_limit_bytes: 10\n",
        )
        .expect("parses");
        let mut errors = Errors::new();
        check(&cluster, &Path::new("cluster"), &mut errors);
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            text,
            vec![
                "cluster.per_connection_buffer_limit_bytes: unsupported field".to_string(),
                "cluster.health_checks[0].custom_health_check: unsupported field (only http_health_check, tcp_health_check and grpc_health_check are implemented)".to_string(),
            ]
        );
    }
}
