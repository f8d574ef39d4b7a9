//! CDS: one EDS `Cluster` per Service port (`outbound|<port>||<fqdn>`), shaped by the
//! `ServicePolicy` in effect for it, and the STATIC `inbound|<port>||` clusters that deliver
//! inbound traffic to the application on 127.0.0.1.
//!
//! One cluster per Service port, not per route backend, so health-check and outlier state is
//! shared by every route that sends there. Policy fields Envoy would reject are left out and
//! reported (`Accepted=False, Invalid`) so one bad value never gets the whole CDS response
//! NACKed.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection, UpstreamConnectionOptions, circuit_breakers,
    cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, DataSource, HealthCheck,
    Http1ProtocolOptions, Http2ProtocolOptions, HttpProtocolOptions as CommonHttpProtocolOptions,
    RoutingPriority, TcpKeepalive, TransportSocket, config_source, data_source, health_check,
    transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, TlsCertificate,
    UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::{CodecClientType, Int64Range};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use envoy_types::util::pack_any;

use super::secret::SecretRefs;
use super::service::{PortInfo, ServiceInfo};
use super::util::{
    duration, header_value_ok, pb_duration, positive_duration, socket_address, u32v, u64v,
};
use crate::api::{
    ConnectionPool, HealthCheck as HealthCheckSpec, LoadBalancer, LoadBalancerType,
    OutlierDetection as OutlierSpec, ServicePolicySpec, TlsMode, UpstreamProtocol, UpstreamTls,
};

/// The name Envoy knows `HttpProtocolOptions` by in `typed_extension_protocol_options`.
pub(crate) const HTTP_PROTOCOL_OPTIONS: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// Envoy's default connect timeout, set explicitly so the config says what it does.
const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Envoy's upper bound for `ring_hash_lb_config.minimum_ring_size`.
const MAX_RING_SIZE: u64 = 8_388_608;

/// ADS as the config source (`ads: {}`, resource API v3).
pub(crate) fn ads_config_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// The outbound EDS cluster of one Service port. `policy` problems (fields Envoy would reject)
/// are appended to `problems`, each naming the field; Secrets it references are collected in
/// `secrets` (with their problems).
pub(crate) fn outbound(
    svc: &ServiceInfo,
    port: &PortInfo,
    policy: Option<&ServicePolicySpec>,
    problems: &mut Vec<String>,
    secrets: &mut SecretRefs<'_>,
) -> Cluster {
    let mut c = Cluster {
        name: port.cluster.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: port.cluster.clone(),
        }),
        connect_timeout: Some(pb_duration(DEFAULT_CONNECT_TIMEOUT)),
        ..Default::default()
    };
    let spec = policy.cloned().unwrap_or_default();
    if let Some(text) = &spec.connect_timeout {
        match positive_duration(text) {
            Ok(d) => c.connect_timeout = Some(d),
            Err(e) => problems.push(format!("spec.connectTimeout: {e}")),
        }
    }
    if let Some(lb) = &spec.load_balancer {
        load_balancer(&mut c, lb, problems);
    }

    // The upstream protocol: the policy decides when it says; otherwise the port's appProtocol.
    let pool = spec.connection_pool.clone().unwrap_or_default();
    let mut protocol = pool.protocol.unwrap_or(if port.http2 {
        UpstreamProtocol::HTTP2
    } else {
        UpstreamProtocol::HTTP1
    });
    if let Some(hc) = &spec.health_check
        && hc.grpc.is_some()
        && protocol != UpstreamProtocol::HTTP2
    {
        if pool.protocol.is_none() {
            // gRPC health checks need HTTP/2 to the backend; a gRPC-checked backend speaks it.
            protocol = UpstreamProtocol::HTTP2;
        } else {
            problems.push(format!(
                "spec.healthCheck.grpc: gRPC health checks need HTTP/2 but spec.connectionPool.protocol is {:?}; health check left out",
                protocol
            ));
        }
    }
    if let Some(hc) = &spec.health_check
        && !(hc.grpc.is_some() && protocol != UpstreamProtocol::HTTP2)
        && let Some(check) = health_check(hc, protocol == UpstreamProtocol::HTTP2, problems)
    {
        c.health_checks.push(check);
    }
    if let Some(options) = protocol_options(&pool, protocol, problems) {
        c.typed_extension_protocol_options =
            HashMap::from([(HTTP_PROTOCOL_OPTIONS.to_string(), options)]);
    }
    if let Some(k) = &pool.tcp_keepalive {
        let secs = |field: &str, v: &Option<String>, problems: &mut Vec<String>| {
            v.as_ref()
                .and_then(|t| match crate::api::parse_duration(t) {
                    // TCP keepalive takes whole seconds; round up so 500ms does not become "off".
                    Ok(d) => u32v(
                        u32::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0))
                            .unwrap_or(u32::MAX)
                            .max(1),
                    ),
                    Err(e) => {
                        problems.push(format!("spec.connectionPool.tcpKeepalive.{field}: {e}"));
                        None
                    }
                })
        };
        c.upstream_connection_options = Some(UpstreamConnectionOptions {
            tcp_keepalive: Some(TcpKeepalive {
                keepalive_probes: k.probes.and_then(u32v),
                keepalive_time: secs("time", &k.time, problems),
                keepalive_interval: secs("interval", &k.interval, problems),
            }),
            ..Default::default()
        });
    }
    if let Some(od) = &spec.outlier_detection {
        c.outlier_detection = Some(outlier_detection(od, problems));
    }
    if let Some(cb) = &spec.circuit_breakers {
        c.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![circuit_breakers::Thresholds {
                priority: RoutingPriority::Default as i32,
                max_connections: cb.max_connections.and_then(u32v),
                max_pending_requests: cb.max_pending_requests.and_then(u32v),
                max_requests: cb.max_requests.and_then(u32v),
                max_retries: cb.max_retries.and_then(u32v),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    if let Some(tls) = &spec.tls
        && tls.mode != TlsMode::Disabled
    {
        c.transport_socket = Some(tls_transport_socket(
            svc,
            tls,
            protocol == UpstreamProtocol::HTTP2,
            problems,
            secrets,
        ));
    }
    c
}

/// The STATIC cluster that hands inbound traffic for `port` to the application.
pub(crate) fn inbound(port: u16) -> Cluster {
    let name = inbound_name(port);
    // Speak to the app in whatever protocol the caller used: a caller's proxy only sends HTTP/2
    // when the Service port says the app speaks it (gRPC, h2c).
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::UseDownstreamProtocolConfig(
                http_protocol_options::UseDownstreamHttpConfig {
                    http_protocol_options: Some(Http1ProtocolOptions::default()),
                    http2_protocol_options: Some(Http2ProtocolOptions::default()),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    };
    Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(pb_duration(DEFAULT_CONNECT_TIMEOUT)),
        typed_extension_protocol_options: HashMap::from([(
            HTTP_PROTOCOL_OPTIONS.to_string(),
            pack_any(options),
        )]),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name,
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket_address("127.0.0.1", port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `inbound|<port>||`.
pub(crate) fn inbound_name(port: u16) -> String {
    format!("inbound|{port}||")
}

fn load_balancer(c: &mut Cluster, lb: &LoadBalancer, problems: &mut Vec<String>) {
    use cluster::{LbConfig, LbPolicy};
    // Hash policies are configured on routes; report the ones routes leave out here.
    for (i, hp) in lb.hash_policies.iter().enumerate() {
        if let Some(problem) = super::rule::hash_policy_problem(hp) {
            problems.push(format!(
                "spec.loadBalancer.hashPolicies[{i}].{problem}; left out"
            ));
        }
    }
    match lb.type_ {
        LoadBalancerType::RoundRobin => c.lb_policy = LbPolicy::RoundRobin as i32,
        LoadBalancerType::Random => c.lb_policy = LbPolicy::Random as i32,
        LoadBalancerType::Maglev => c.lb_policy = LbPolicy::Maglev as i32,
        LoadBalancerType::LeastRequest => {
            c.lb_policy = LbPolicy::LeastRequest as i32;
            if let Some(n) = lb.choice_count {
                if n >= 2 {
                    c.lb_config = Some(LbConfig::LeastRequestLbConfig(
                        cluster::LeastRequestLbConfig {
                            choice_count: u32v(n),
                            ..Default::default()
                        },
                    ));
                } else {
                    problems.push(format!(
                        "spec.loadBalancer.choiceCount: {n} is below 2; Envoy's default (2) is used"
                    ));
                }
            }
        }
        LoadBalancerType::RingHash => {
            c.lb_policy = LbPolicy::RingHash as i32;
            if let Some(n) = lb.minimum_ring_size {
                if (1..=MAX_RING_SIZE).contains(&n) {
                    c.lb_config = Some(LbConfig::RingHashLbConfig(cluster::RingHashLbConfig {
                        minimum_ring_size: u64v(n),
                        ..Default::default()
                    }));
                } else {
                    problems.push(format!(
                        "spec.loadBalancer.minimumRingSize: {n} is out of range (1-{MAX_RING_SIZE}); Envoy's default (1024) is used"
                    ));
                }
            }
        }
    }
}

fn health_check(
    hc: &HealthCheckSpec,
    http2: bool,
    problems: &mut Vec<String>,
) -> Option<HealthCheck> {
    use health_check::HealthChecker;
    let mut field =
        |name: &str, value: &Option<String>, default: Option<u64>| -> Option<PbDuration> {
            match value.as_deref().map(positive_duration) {
                Some(Ok(d)) => Some(d),
                Some(Err(e)) => {
                    problems.push(format!("spec.healthCheck.{name}: {e}"));
                    default.map(|s| pb_duration(std::time::Duration::from_secs(s)))
                }
                None => default.map(|s| pb_duration(std::time::Duration::from_secs(s))),
            }
        };
    let interval = field("interval", &hc.interval, Some(10));
    let timeout = field("timeout", &hc.timeout, Some(1));
    let interval_jitter = field("jitter", &hc.jitter, None);
    let no_traffic_interval = field("noTrafficInterval", &hc.no_traffic_interval, None);
    let checker = if let Some(http) = &hc.http {
        let host = http.host.as_deref().unwrap_or_default();
        if !header_value_ok(&http.path) || !header_value_ok(host) {
            problems.push(
                "spec.healthCheck.http: CR, LF and NUL are not allowed in path and host; health check left out"
                    .to_string(),
            );
            return None;
        }
        HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
            host: http.host.clone().unwrap_or_default(),
            path: http.path.clone(),
            // Int64Range is half-open: [s, s+1) is exactly status s.
            expected_statuses: http
                .expected_statuses
                .iter()
                .map(|s| Int64Range {
                    start: i64::from(*s),
                    end: i64::from(*s) + 1,
                })
                .collect(),
            codec_client_type: if http2 {
                CodecClientType::Http2
            } else {
                CodecClientType::Http1
            } as i32,
            ..Default::default()
        })
    } else if let Some(tcp) = &hc.tcp {
        let payload = |text: &str| health_check::Payload {
            payload: Some(health_check::payload::Payload::Text(hex(text.as_bytes()))),
        };
        HealthChecker::TcpHealthCheck(health_check::TcpHealthCheck {
            send: tcp.send.as_deref().map(payload),
            receive: tcp.receive.as_deref().map(payload).into_iter().collect(),
            ..Default::default()
        })
    } else if let Some(grpc) = &hc.grpc {
        HealthChecker::GrpcHealthCheck(health_check::GrpcHealthCheck {
            service_name: grpc.service_name.clone().unwrap_or_default(),
            ..Default::default()
        })
    } else {
        problems.push(
            "spec.healthCheck: one of http, tcp, grpc is required; health check left out"
                .to_string(),
        );
        return None;
    };
    Some(HealthCheck {
        timeout,
        interval,
        interval_jitter,
        no_traffic_interval,
        unhealthy_threshold: u32v(hc.unhealthy_threshold.unwrap_or(3)),
        healthy_threshold: u32v(hc.healthy_threshold.unwrap_or(1)),
        health_checker: Some(checker),
        ..Default::default()
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn outlier_detection(od: &OutlierSpec, problems: &mut Vec<String>) -> OutlierDetection {
    let mut field = |name: &str, value: &Option<String>| -> Option<PbDuration> {
        match value.as_deref().map(positive_duration)? {
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(format!("spec.outlierDetection.{name}: {e}"));
                None
            }
        }
    };
    let interval = field("interval", &od.interval);
    let base_ejection_time = field("baseEjectionTime", &od.base_ejection_time);
    let local_origin = od.consecutive_local_origin_failure.is_some();
    OutlierDetection {
        consecutive_5xx: od.consecutive5xx.and_then(u32v),
        // Envoy enforces gateway-failure ejection at 0% unless told otherwise.
        consecutive_gateway_failure: od.consecutive_gateway_failure.and_then(u32v),
        enforcing_consecutive_gateway_failure: od.consecutive_gateway_failure.and(u32v(100)),
        // Local-origin failures are only counted apart from 5xx when split.
        split_external_local_origin_errors: od.split_external_local_origin_errors || local_origin,
        consecutive_local_origin_failure: od.consecutive_local_origin_failure.and_then(u32v),
        interval,
        base_ejection_time,
        max_ejection_percent: od.max_ejection_percent.map(|p| p.min(100)).and_then(u32v),
        success_rate_stdev_factor: od.success_rate_stdev_factor.and_then(u32v),
        success_rate_request_volume: od.success_rate_request_volume.and_then(u32v),
        success_rate_minimum_hosts: od.success_rate_minimum_hosts.and_then(u32v),
        ..Default::default()
    }
}

/// `HttpProtocolOptions` for the cluster, when anything differs from Envoy's default
/// (HTTP/1.1, default pool settings).
fn protocol_options(
    pool: &ConnectionPool,
    protocol: UpstreamProtocol,
    problems: &mut Vec<String>,
) -> Option<Any> {
    use http_protocol_options::{
        ExplicitHttpConfig, UpstreamProtocolOptions, UseDownstreamHttpConfig, explicit_http_config,
    };
    let mut common = CommonHttpProtocolOptions::default();
    let mut field = |name: &str, value: &Option<String>| -> Option<PbDuration> {
        match value.as_deref().map(duration)? {
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(format!("spec.connectionPool.{name}: {e}"));
                None
            }
        }
    };
    common.idle_timeout = field("idleTimeout", &pool.idle_timeout);
    common.max_connection_duration = field("maxConnectionDuration", &pool.max_connection_duration);
    common.max_requests_per_connection = pool
        .max_requests_per_connection
        .filter(|n| *n > 0)
        .and_then(u32v);
    let has_common = common != CommonHttpProtocolOptions::default();
    if protocol == UpstreamProtocol::HTTP1 && !has_common {
        return None;
    }
    let upstream = match protocol {
        UpstreamProtocol::HTTP1 => {
            UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                protocol_config: Some(explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                    Http1ProtocolOptions::default(),
                )),
            })
        }
        UpstreamProtocol::HTTP2 => {
            UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                protocol_config: Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                    Http2ProtocolOptions::default(),
                )),
            })
        }
        UpstreamProtocol::UseDownstream => {
            UpstreamProtocolOptions::UseDownstreamProtocolConfig(UseDownstreamHttpConfig {
                http_protocol_options: Some(Http1ProtocolOptions::default()),
                http2_protocol_options: Some(Http2ProtocolOptions::default()),
                ..Default::default()
            })
        }
    };
    Some(pack_any(HttpProtocolOptions {
        common_http_protocol_options: has_common.then_some(common),
        upstream_protocol_options: Some(upstream),
        ..Default::default()
    }))
}

fn tls_transport_socket(
    svc: &ServiceInfo,
    tls: &UpstreamTls,
    http2: bool,
    problems: &mut Vec<String>,
    secrets: &mut SecretRefs<'_>,
) -> TransportSocket {
    let file = |path: &str| DataSource {
        specifier: Some(data_source::Specifier::Filename(path.to_string())),
        ..Default::default()
    };
    let mut common = CommonTlsContext::default();
    if http2 {
        // Most TLS servers only speak HTTP/2 when ALPN negotiated it.
        common.alpn_protocols = vec!["h2".to_string()];
    }
    let namespace = &svc.key.namespace;
    let sans = || -> Vec<SubjectAltNameMatcher> {
        tls.subject_alt_names
            .iter()
            .map(|san| san_matcher(san))
            .collect()
    };
    match (&tls.ca_certificate_file, &tls.ca_certificate_secret) {
        (Some(ca), _) => {
            common.validation_context_type = Some(
                common_tls_context::ValidationContextType::ValidationContext(
                    CertificateValidationContext {
                        trusted_ca: Some(file(ca)),
                        match_typed_subject_alt_names: sans(),
                        ..Default::default()
                    },
                ),
            );
        }
        (None, Some(secret)) => {
            // The CA comes over SDS; the SAN matchers stay in the cluster (merged by Envoy).
            let sds = secrets.ca(namespace, &secret.name);
            common.validation_context_type = Some(if tls.subject_alt_names.is_empty() {
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds)
            } else {
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: sans(),
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds),
                        ..Default::default()
                    },
                )
            });
        }
        (None, None) if !tls.subject_alt_names.is_empty() => {
            // Envoy refuses SAN checks without a trusted CA (they would prove nothing).
            problems.push(
                "spec.tls.subjectAltNames: needs spec.tls.caCertificateFile or caCertificateSecret; not verified"
                    .to_string(),
            );
        }
        (None, None) => {}
    }
    if tls.mode == TlsMode::Mutual {
        match (
            &tls.certificate_chain_file,
            &tls.private_key_file,
            &tls.client_certificate_secret,
        ) {
            (Some(chain), Some(key), _) => common.tls_certificates.push(TlsCertificate {
                certificate_chain: Some(file(chain)),
                private_key: Some(file(key)),
                ..Default::default()
            }),
            (None, None, Some(secret)) => common
                .tls_certificate_sds_secret_configs
                .push(secrets.certificate(namespace, &secret.name)),
            _ => problems.push(
                "spec.tls: mode Mutual needs clientCertificateSecret, or certificateChainFile and privateKeyFile; no client certificate is sent".to_string(),
            ),
        }
    }
    let mut sni = tls.sni.clone().unwrap_or_else(|| svc.fqdn());
    if sni.len() > 255 || !header_value_ok(&sni) {
        problems.push(format!("spec.tls.sni: {sni:?} is not a valid server name (at most 255 bytes); the Service's name is sent"));
        sni = svc.fqdn();
    }
    let context = UpstreamTlsContext {
        common_tls_context: Some(common),
        sni,
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(context))),
    }
}

#[cfg(test)]
pub(crate) fn san_matcher_for_tests(san: &str) -> SubjectAltNameMatcher {
    san_matcher(san)
}

fn san_matcher(san: &str) -> SubjectAltNameMatcher {
    use subject_alt_name_matcher::SanType;
    let san_type = if san.contains("://") {
        SanType::Uri
    } else if san.parse::<std::net::IpAddr>().is_ok() {
        SanType::IpAddress
    } else {
        SanType::Dns
    };
    SubjectAltNameMatcher {
        san_type: san_type as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(san.to_string())),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_health_check_payloads_are_hex() {
        assert_eq!(hex(b"PING\r\n"), "50494e470d0a");
    }

    #[test]
    fn san_type_follows_the_value() {
        use subject_alt_name_matcher::SanType;
        assert_eq!(
            san_matcher("spiffe://cluster.local/ns/a/sa/b").san_type,
            SanType::Uri as i32
        );
        assert_eq!(san_matcher("10.0.0.1").san_type, SanType::IpAddress as i32);
        assert_eq!(san_matcher("web.shop.svc").san_type, SanType::Dns as i32);
    }
}
