//! Envoy `Cluster.health_checks` (`envoy.config.core.v3.HealthCheck`) → [`HealthCheck`].
//!
//! Pure translation with Envoy's defaults and validation (required `timeout`, `interval`,
//! `unhealthy_threshold`, `healthy_threshold`; `no_traffic_interval` 60 s; the edge and
//! unhealthy intervals defaulting to `interval`; `reuse_connection` true; expected statuses
//! `[200, 201)`). Which fields may be present at all is decided by the supported-subset table
//! (`supported.rs`): `custom_health_check`, event logging, `tls_options`, `alt_port`, … are
//! rejected there by name. It opens no sockets; `cluster::health_check` runs the checks.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::core::v3::health_check as pb;

use super::duration;
use super::errors::{Errors, Path};
use super::route::{HeaderMutations, header_mutations};

/// Envoy's default `no_traffic_interval`.
pub const DEFAULT_NO_TRAFFIC_INTERVAL: Duration = Duration::from_secs(60);

/// One active health checker of a cluster.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub timeout: Duration,
    pub interval: Duration,
    pub initial_jitter: Duration,
    pub interval_jitter: Duration,
    pub interval_jitter_percent: u32,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub no_traffic_interval: Duration,
    pub no_traffic_healthy_interval: Duration,
    pub unhealthy_interval: Duration,
    pub unhealthy_edge_interval: Duration,
    pub healthy_edge_interval: Duration,
    pub reuse_connection: bool,
    pub checker: Checker,
}

/// What one check does.
#[derive(Debug, Clone)]
pub enum Checker {
    Http(HttpCheck),
    Tcp(TcpCheck),
    Grpc(GrpcCheck),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Http1,
    Http2,
}

#[derive(Debug, Clone)]
pub struct HttpCheck {
    /// `host`; empty: the cluster's name (Envoy's default `:authority`).
    pub host: String,
    pub path: String,
    pub method: http::Method,
    pub headers: HeaderMutations,
    /// Half-open `[start, end)` ranges.
    pub expected_statuses: Vec<(u16, u16)>,
    pub retriable_statuses: Vec<(u16, u16)>,
    pub codec: Codec,
}

impl HttpCheck {
    pub fn expected(&self, status: u16) -> bool {
        in_ranges(status, &self.expected_statuses)
    }

    pub fn retriable(&self, status: u16) -> bool {
        in_ranges(status, &self.retriable_statuses)
    }
}

fn in_ranges(status: u16, ranges: &[(u16, u16)]) -> bool {
    ranges.iter().any(|(s, e)| status >= *s && status < *e)
}

#[derive(Debug, Clone, Default)]
pub struct TcpCheck {
    /// Written after connecting (and on every check over a reused connection). Only a `text`
    /// payload: Envoy never writes a `binary` one.
    pub send: Vec<u8>,
    /// Each segment must appear in what was read, in order; empty: connecting is enough.
    pub receive: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, Default)]
pub struct GrpcCheck {
    pub service_name: String,
    /// Empty: the cluster's name.
    pub authority: String,
}

/// Translates `health_checks`; `path` names the list.
pub fn translate(list: &[core::HealthCheck], path: &Path, errors: &mut Errors) -> Vec<HealthCheck> {
    if list.len() > 1 {
        // Envoy's cluster factory: "Multiple health checks not supported".
        errors.push(path, "Multiple health checks not supported");
    }
    list.iter()
        .enumerate()
        .filter_map(|(i, hc)| health_check(hc, &path.index(i), errors))
        .collect()
}

fn health_check(hc: &core::HealthCheck, path: &Path, errors: &mut Errors) -> Option<HealthCheck> {
    let before = errors.len();
    let positive = |d: &Option<envoy_types::pb::google::protobuf::Duration>,
                    name: &str,
                    errors: &mut Errors|
     -> Option<Duration> {
        let d = d.as_ref()?;
        match duration(d) {
            Some(d) if !d.is_zero() => Some(d),
            _ => {
                errors.push(&path.field(name), "must be a positive duration");
                None
            }
        }
    };
    let non_negative = |d: &Option<envoy_types::pb::google::protobuf::Duration>,
                        name: &str,
                        errors: &mut Errors|
     -> Duration {
        match d.as_ref().map(duration) {
            None => Duration::ZERO,
            Some(Some(d)) => d,
            Some(None) => {
                errors.push(&path.field(name), "must not be negative");
                Duration::ZERO
            }
        }
    };
    let timeout = positive(&hc.timeout, "timeout", errors);
    if hc.timeout.is_none() {
        errors.push(&path.field("timeout"), "required");
    }
    let interval = positive(&hc.interval, "interval", errors);
    if hc.interval.is_none() {
        errors.push(&path.field("interval"), "required");
    }
    let initial_jitter = non_negative(&hc.initial_jitter, "initial_jitter", errors);
    let interval_jitter = non_negative(&hc.interval_jitter, "interval_jitter", errors);
    let unhealthy_threshold = hc.unhealthy_threshold.map(|v| v.value);
    if unhealthy_threshold.is_none() {
        errors.push(&path.field("unhealthy_threshold"), "required");
    }
    let healthy_threshold = hc.healthy_threshold.map(|v| v.value);
    if healthy_threshold.is_none() {
        errors.push(&path.field("healthy_threshold"), "required");
    }
    let no_traffic_interval = positive(&hc.no_traffic_interval, "no_traffic_interval", errors)
        .unwrap_or(DEFAULT_NO_TRAFFIC_INTERVAL);
    let no_traffic_healthy_interval = positive(
        &hc.no_traffic_healthy_interval,
        "no_traffic_healthy_interval",
        errors,
    )
    .unwrap_or(no_traffic_interval);
    let base = interval.unwrap_or(Duration::from_secs(1));
    let unhealthy_interval =
        positive(&hc.unhealthy_interval, "unhealthy_interval", errors).unwrap_or(base);
    let unhealthy_edge_interval = positive(
        &hc.unhealthy_edge_interval,
        "unhealthy_edge_interval",
        errors,
    )
    .unwrap_or(unhealthy_interval);
    let healthy_edge_interval =
        positive(&hc.healthy_edge_interval, "healthy_edge_interval", errors).unwrap_or(base);
    let reuse_connection = hc.reuse_connection.map(|v| v.value).unwrap_or(true);

    let checker = match &hc.health_checker {
        Some(pb::HealthChecker::HttpHealthCheck(h)) => {
            http_check(h, &path.field("http_health_check"), errors).map(Checker::Http)
        }
        Some(pb::HealthChecker::TcpHealthCheck(t)) => {
            let tpath = path.field("tcp_health_check");
            // Envoy (1.40 `TcpHealthCheckerImpl`) sends the payload only when it is `text`: a
            // `binary` send payload is accepted and never written. So here.
            let send = match &t.send {
                Some(
                    p @ pb::Payload {
                        payload: Some(pb::payload::Payload::Text(_)),
                    },
                ) => payload(p, &tpath.field("send"), errors),
                _ => Vec::new(),
            };
            let receive = t
                .receive
                .iter()
                .enumerate()
                .map(|(i, p)| payload(p, &tpath.field("receive").index(i), errors))
                .collect();
            Some(Checker::Tcp(TcpCheck { send, receive }))
        }
        Some(pb::HealthChecker::GrpcHealthCheck(g)) => Some(Checker::Grpc(GrpcCheck {
            service_name: g.service_name.clone(),
            authority: g.authority.clone(),
        })),
        // Reported by name by the supported-subset check.
        Some(pb::HealthChecker::CustomHealthCheck(_)) => None,
        None => {
            errors.push(
                path,
                "one of http_health_check, tcp_health_check, grpc_health_check is required",
            );
            None
        }
    };
    if errors.len() > before {
        return None;
    }
    Some(HealthCheck {
        timeout: timeout?,
        interval: interval?,
        initial_jitter,
        interval_jitter,
        interval_jitter_percent: hc.interval_jitter_percent,
        unhealthy_threshold: unhealthy_threshold?,
        healthy_threshold: healthy_threshold?,
        no_traffic_interval,
        no_traffic_healthy_interval,
        unhealthy_interval,
        unhealthy_edge_interval,
        healthy_edge_interval,
        reuse_connection,
        checker: checker?,
    })
}

fn http_check(h: &pb::HttpHealthCheck, path: &Path, errors: &mut Errors) -> Option<HttpCheck> {
    use envoy_types::pb::envoy::r#type::v3::CodecClientType;
    if h.path.is_empty() {
        errors.push(&path.field("path"), "required");
    } else if !h.path.starts_with('/')
        || http::uri::PathAndQuery::try_from(h.path.as_str()).is_err()
    {
        errors.push(
            &path.field("path"),
            format!("invalid request path {:?}", h.path),
        );
    }
    if !h.host.is_empty() && http::HeaderValue::from_str(&h.host).is_err() {
        errors.push(
            &path.field("host"),
            format!("invalid host header value {:?}", h.host),
        );
    }
    let method = match core::RequestMethod::try_from(h.method) {
        Ok(core::RequestMethod::MethodUnspecified | core::RequestMethod::Get) => http::Method::GET,
        Ok(core::RequestMethod::Head) => http::Method::HEAD,
        Ok(core::RequestMethod::Post) => http::Method::POST,
        Ok(core::RequestMethod::Put) => http::Method::PUT,
        Ok(core::RequestMethod::Delete) => http::Method::DELETE,
        Ok(core::RequestMethod::Options) => http::Method::OPTIONS,
        Ok(core::RequestMethod::Trace) => http::Method::TRACE,
        Ok(core::RequestMethod::Patch) => http::Method::PATCH,
        Ok(core::RequestMethod::Connect) => {
            errors.push(&path.field("method"), "CONNECT is not allowed");
            http::Method::GET
        }
        Err(_) => {
            errors.push(&path.field("method"), format!("unknown value {}", h.method));
            http::Method::GET
        }
    };
    let headers = header_mutations(
        &h.request_headers_to_add,
        &h.request_headers_to_remove,
        path,
        "request",
        errors,
    );
    let ranges = |list: &[envoy_types::pb::envoy::r#type::v3::Int64Range],
                  field: &str,
                  kind: &str,
                  errors: &mut Errors| {
        let mut out = Vec::new();
        for (i, r) in list.iter().enumerate() {
            let rpath = path.field(field).index(i);
            if r.start >= r.end {
                errors.push(
                    &rpath,
                    format!(
                        "Invalid http {kind} status range: expecting start < end, but found start={} and end={}",
                        r.start, r.end
                    ),
                );
            } else if r.start < 100 {
                errors.push(
                    &rpath,
                    format!(
                        "Invalid http {kind} status range: expecting start >= 100, but found start={}",
                        r.start
                    ),
                );
            } else if r.end > 600 {
                errors.push(
                    &rpath,
                    format!(
                        "Invalid http {kind} status range: expecting end <= 600, but found end={}",
                        r.end
                    ),
                );
            } else {
                // Bounded to [100, 600] just above.
                out.push((r.start as u16, r.end as u16));
            }
        }
        out
    };
    let mut expected_statuses = ranges(
        &h.expected_statuses,
        "expected_statuses",
        "expected",
        errors,
    );
    if expected_statuses.is_empty() && h.expected_statuses.is_empty() {
        expected_statuses.push((200, 201));
    }
    let retriable_statuses = ranges(
        &h.retriable_statuses,
        "retriable_statuses",
        "retriable",
        errors,
    );
    let codec = match CodecClientType::try_from(h.codec_client_type) {
        Ok(CodecClientType::Http1) => Codec::Http1,
        Ok(CodecClientType::Http2) => Codec::Http2,
        Ok(CodecClientType::Http3) => {
            errors.unsupported_value(
                &path.field("codec_client_type"),
                "HTTP3",
                &["HTTP1", "HTTP2"],
            );
            Codec::Http1
        }
        Err(_) => {
            errors.push(
                &path.field("codec_client_type"),
                format!("unknown value {}", h.codec_client_type),
            );
            Codec::Http1
        }
    };
    Some(HttpCheck {
        host: h.host.clone(),
        path: h.path.clone(),
        method,
        headers,
        expected_statuses,
        retriable_statuses,
        codec,
    })
}

/// A `Payload`: `text` is hex (Envoy's `PayloadMatcher::loadProtoBytes`), `binary` raw bytes.
fn payload(p: &pb::Payload, path: &Path, errors: &mut Errors) -> Vec<u8> {
    match &p.payload {
        Some(pb::payload::Payload::Text(t)) => match hex(t) {
            Some(b) if !b.is_empty() => b,
            _ => {
                errors.push(&path.field("text"), format!("invalid hex string '{t}'"));
                Vec::new()
            }
        },
        Some(pb::payload::Payload::Binary(b)) if !b.is_empty() => b.clone(),
        _ => {
            errors.push(path, "one of text, binary is required");
            Vec::new()
        }
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate_yaml(yaml: &str) -> Result<Vec<HealthCheck>, Vec<String>> {
        let c: envoy_types::pb::envoy::config::cluster::v3::Cluster =
            capstan_proto::from_yaml(yaml).map_err(|e| vec![e.to_string()])?;
        let mut errors = Errors::new();
        let out = translate(
            &c.health_checks,
            &Path::new("c").field("health_checks"),
            &mut errors,
        );
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    #[test]
    fn envoy_defaults_apply() {
        let hc = translate_yaml(
            "name: c\nhealth_checks:\n- { timeout: 1s, interval: 2s, unhealthy_threshold: 3, healthy_threshold: 2, http_health_check: { path: /healthz } }\n",
        )
        .expect("valid");
        let hc = &hc[0];
        assert_eq!(hc.timeout, Duration::from_secs(1));
        assert_eq!(hc.no_traffic_interval, Duration::from_secs(60));
        assert_eq!(hc.no_traffic_healthy_interval, Duration::from_secs(60));
        assert_eq!(hc.unhealthy_interval, Duration::from_secs(2));
        assert_eq!(hc.unhealthy_edge_interval, Duration::from_secs(2));
        assert_eq!(hc.healthy_edge_interval, Duration::from_secs(2));
        assert!(hc.reuse_connection);
        let Checker::Http(h) = &hc.checker else {
            panic!("http")
        };
        assert!(h.expected(200));
        assert!(!h.expected(201));
        assert!(!h.expected(204));
        assert_eq!(h.codec, Codec::Http1);
        assert_eq!(h.method, http::Method::GET);
    }

    #[test]
    fn unhealthy_edge_interval_defaults_to_unhealthy_interval() {
        let hc = translate_yaml(
            "name: c\nhealth_checks:\n- { timeout: 1s, interval: 2s, unhealthy_interval: 5s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: { send: { text: '50494e47' }, receive: [{ text: '504f4e47' }, { binary: 'IQ==' }] } }\n",
        )
        .expect("valid");
        assert_eq!(hc[0].unhealthy_edge_interval, Duration::from_secs(5));
        let Checker::Tcp(t) = &hc[0].checker else {
            panic!("tcp")
        };
        assert_eq!(t.send, b"PING");
        assert_eq!(t.receive, vec![b"PONG".to_vec(), b"!".to_vec()]);

        let hc = translate_yaml(
            "name: c\nhealth_checks:\n- { timeout: 1s, interval: 2s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: { send: { binary: 'UElORw==' }, receive: [{ text: '504f4e47' }] } }\n",
        )
        .expect("valid");
        let Checker::Tcp(t) = &hc[0].checker else {
            panic!("tcp")
        };
        assert!(
            t.send.is_empty(),
            "Envoy never writes a binary send payload"
        );
    }

    #[test]
    fn required_fields_and_bad_values_are_named() {
        let err = translate_yaml(
            "name: c\nhealth_checks:\n- { interval: 0s, http_health_check: { path: '', expected_statuses: [{ start: 300, end: 200 }] } }\n- { timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: { send: { text: 'zz' } } }\n- { timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1 }\n",
        )
        .expect_err("invalid");
        assert_eq!(
            err,
            vec![
                "c.health_checks: Multiple health checks not supported",
                "c.health_checks[0].timeout: required",
                "c.health_checks[0].interval: must be a positive duration",
                "c.health_checks[0].unhealthy_threshold: required",
                "c.health_checks[0].healthy_threshold: required",
                "c.health_checks[0].http_health_check.path: required",
                "c.health_checks[0].http_health_check.expected_statuses[0]: Invalid http expected status range: expecting start < end, but found start=300 and end=200",
                "c.health_checks[1].tcp_health_check.send.text: invalid hex string 'zz'",
                "c.health_checks[2]: one of http_health_check, tcp_health_check, grpc_health_check is required",
            ]
        );
    }
}
