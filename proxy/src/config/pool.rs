//! Upstream connection settings of a cluster → [`PoolOptions`]: the
//! `common_http_protocol_options` of its `HttpProtocolOptions` (`idle_timeout`,
//! `max_requests_per_connection`, `max_connection_duration`), the deprecated
//! `Cluster.max_requests_per_connection`, and `upstream_connection_options.tcp_keepalive`.
//!
//! Pure translation with Envoy's defaults; the pool (`cluster::pool`) applies them.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as pb;
use envoy_types::pb::envoy::config::core::v3 as core;

use super::duration;
use super::errors::{Errors, Path};

/// Envoy's default upstream `idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    /// Close a connection after this long without requests (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Requests a connection carries before it is closed (`None`: unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// Close (drain) a connection this long after it was established.
    pub max_connection_duration: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_requests_per_connection: None,
            max_connection_duration: None,
            tcp_keepalive: None,
        }
    }
}

/// `SO_KEEPALIVE` with the given overrides (`None`: the system's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

/// The common options of one `HttpProtocolOptions`, merged into `out`.
pub fn common_http(
    common: &core::HttpProtocolOptions,
    path: &Path,
    errors: &mut Errors,
    out: &mut PoolOptions,
) {
    if let Some(d) = &common.idle_timeout {
        out.idle_timeout = match duration(d) {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => {
                errors.push(&path.field("idle_timeout"), "must not be negative");
                None
            }
        };
    }
    if let Some(d) = &common.max_connection_duration {
        out.max_connection_duration = match duration(d) {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => {
                errors.push(
                    &path.field("max_connection_duration"),
                    "must not be negative",
                );
                None
            }
        };
    }
    if let Some(n) = common.max_requests_per_connection {
        out.max_requests_per_connection = (n.value > 0).then_some(n.value);
    }
}

/// The cluster-level parts: the deprecated `max_requests_per_connection` (exclusive with the
/// protocol options' one, as Envoy) and `upstream_connection_options`.
#[allow(deprecated)]
pub fn cluster_level(c: &pb::Cluster, path: &Path, errors: &mut Errors, out: &mut PoolOptions) {
    if let Some(n) = c.max_requests_per_connection {
        if out.max_requests_per_connection.is_some() {
            errors.push(
                &path.field("max_requests_per_connection"),
                "Only one of max_requests_per_connection from Cluster or HttpProtocolOptions can be specified",
            );
        } else {
            out.max_requests_per_connection = (n.value > 0).then_some(n.value);
        }
    }
    if let Some(k) = c
        .upstream_connection_options
        .as_ref()
        .and_then(|o| o.tcp_keepalive.as_ref())
    {
        out.tcp_keepalive = Some(TcpKeepalive {
            probes: k.keepalive_probes.map(|v| v.value),
            time: k
                .keepalive_time
                .map(|v| Duration::from_secs(u64::from(v.value))),
            interval: k
                .keepalive_interval
                .map(|v| Duration::from_secs(u64::from(v.value))),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(yaml: &str) -> Result<PoolOptions, Vec<String>> {
        let pb: pb::Cluster = capstan_proto::from_yaml(yaml).map_err(|e| vec![e.to_string()])?;
        let mut errors = Errors::new();
        let c = super::super::cluster::translate(&pb, &Path::new("cluster"), &mut errors);
        if errors.is_empty() {
            Ok(c.expect("no errors means a cluster").pool)
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    #[test]
    fn defaults_and_protocol_options() {
        assert_eq!(cluster("name: c").expect("valid"), PoolOptions::default());
        let o = cluster(
            r#"
name: c
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    common_http_protocol_options: { idle_timeout: 0s, max_requests_per_connection: 7, max_connection_duration: 60s }
    explicit_http_config: { http_protocol_options: {} }
upstream_connection_options: { tcp_keepalive: { keepalive_time: 30 } }
"#,
        )
        .expect("valid");
        assert_eq!(
            o,
            PoolOptions {
                idle_timeout: None,
                max_requests_per_connection: Some(7),
                max_connection_duration: Some(Duration::from_secs(60)),
                tcp_keepalive: Some(TcpKeepalive {
                    probes: None,
                    time: Some(Duration::from_secs(30)),
                    interval: None,
                }),
            }
        );
        let o = cluster("name: c\nmax_requests_per_connection: 1\n").expect("valid");
        assert_eq!(o.max_requests_per_connection, Some(1));
    }
}
