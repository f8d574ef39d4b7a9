//! The command line (Envoy's flag names) and loading the bootstrap file.
//!
//! `capstan-proxy -c FILE` reads an Envoy bootstrap in YAML or JSON through the proto3 JSON
//! mapping (unknown fields are errors), applies `--service-node` / `--service-cluster` as
//! Envoy does, and translates it with [`crate::config::translate_bootstrap`].
//! `capstan-proxy --xds-address http://IP:PORT --node-id ID` runs with no file at all: ADS
//! state of the world, CDS and LDS over it, the default admin address. Every error is
//! returned before anything binds; `main` exits with [`EX_USAGE`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use envoy_types::pb::envoy::config::bootstrap::v3 as pb;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use crate::config::{self, ConfigError};
use crate::server::Options;

/// `EX_USAGE` from `sysexits.h`: the command line or configuration is wrong.
pub const EX_USAGE: u8 = 64;

/// The command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "capstan-proxy",
    version,
    about = "Capstan's Envoy-compatible sidecar proxy"
)]
pub struct Args {
    /// Envoy bootstrap file (YAML or JSON).
    #[arg(short = 'c', long = "config-path", value_name = "FILE")]
    pub config_path: Option<PathBuf>,

    /// Worker threads (default: the number of CPUs, as Envoy).
    #[arg(long)]
    pub concurrency: Option<usize>,

    /// Seconds listeners keep accepting, telling clients to go away, after SIGTERM.
    #[arg(long = "drain-time-s", default_value_t = 45, value_name = "SECONDS")]
    pub drain_time_s: u64,

    /// Seconds in-flight requests get to finish once listeners stop accepting.
    #[arg(
        long = "shutdown-grace-s",
        default_value_t = 15,
        value_name = "SECONDS"
    )]
    pub shutdown_grace_s: u64,

    /// trace, debug, info, warning, error, critical or off.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    pub log_level: String,

    /// Overrides `node.id`.
    #[arg(long = "service-node")]
    pub service_node: Option<String>,

    /// Overrides `node.cluster`.
    #[arg(long = "service-cluster")]
    pub service_cluster: Option<String>,

    /// Run without a bootstrap file: the control plane's ADS address (`http://IP:PORT`).
    #[arg(
        long = "xds-address",
        value_name = "URL",
        conflicts_with = "config_path"
    )]
    pub xds_address: Option<String>,

    /// `node.id` (same as `--service-node`), required with `--xds-address`.
    #[arg(long = "node-id", value_name = "ID")]
    pub node_id: Option<String>,

    /// Adds a string field to `node.metadata` (repeatable; a later KEY wins, and the flag wins
    /// over the bootstrap file's value), e.g. `--node-metadata APP_PORTS=8080,9090`.
    #[arg(long = "node-metadata", value_name = "KEY=VALUE", value_parser = parse_node_metadata)]
    pub node_metadata: Vec<(String, String)>,

    /// Address of the readiness-only listener (serves `/ready`).
    #[arg(long = "readiness-address", default_value = "0.0.0.0:15021")]
    pub readiness_address: SocketAddr,
}

impl Args {
    pub fn concurrency(&self) -> usize {
        self.concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }

    pub fn options(&self) -> Options {
        Options {
            concurrency: self.concurrency(),
            drain_time: Duration::from_secs(self.drain_time_s),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s),
            readiness_address: self.readiness_address,
            config_path: self
                .config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            log_level: self.log_level.clone(),
        }
    }

    /// The `tracing` filter for `--log-level` (Envoy's level names).
    pub fn tracing_level(&self) -> Result<&'static str, String> {
        match self.log_level.as_str() {
            "trace" => Ok("trace"),
            "debug" => Ok("debug"),
            "info" => Ok("info"),
            "warning" | "warn" => Ok("warn"),
            "error" | "critical" => Ok("error"),
            "off" => Ok("off"),
            other => Err(format!(
                "--log-level: unknown level {other:?} (trace, debug, info, warning, error, critical, off)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("no configuration: pass -c FILE, or --xds-address URL --node-id ID")]
    NoConfig,
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid bootstrap {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("invalid bootstrap {path}:\n{}", indent(.errors))]
    Invalid { path: String, errors: ConfigError },
}

fn indent(e: &ConfigError) -> String {
    e.errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads, parses and translates the bootstrap named on the command line.
pub fn load(args: &Args) -> Result<config::Bootstrap, BootstrapError> {
    if let Some(address) = &args.xds_address {
        return from_xds_address(address, args);
    }
    let path = args.config_path.as_ref().ok_or(BootstrapError::NoConfig)?;
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| BootstrapError::Read {
        path: shown.clone(),
        source,
    })?;
    from_text(&text, args, &shown)
}

/// Parses and translates bootstrap text (YAML or JSON).
pub fn from_text(
    text: &str,
    args: &Args,
    shown: &str,
) -> Result<config::Bootstrap, BootstrapError> {
    let mut bootstrap: pb::Bootstrap =
        capstan_proto::from_yaml(text).map_err(|e| BootstrapError::Parse {
            path: shown.to_string(),
            reason: e.to_string(),
        })?;
    apply_node_flags(&mut bootstrap, args);
    config::translate_bootstrap(&bootstrap).map_err(|errors| BootstrapError::Invalid {
        path: shown.to_string(),
        errors,
    })
}

/// `--xds-address URL --node-id ID`: a bootstrap with only a node, ADS for CDS and LDS.
pub fn from_xds_address(address: &str, args: &Args) -> Result<config::Bootstrap, BootstrapError> {
    let uri: http::Uri = address.parse().map_err(|e| {
        BootstrapError::Usage(format!("--xds-address: invalid URL {address:?}: {e}"))
    })?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(BootstrapError::Usage(format!(
            "--xds-address: expected http://HOST:PORT, got {address:?} (TLS to the control plane is not implemented)"
        )));
    }
    let mut b = pb::Bootstrap::default();
    apply_node_flags(&mut b, args);
    if b.node.as_ref().is_none_or(|n| n.id.is_empty()) {
        return Err(BootstrapError::Usage(
            "--xds-address needs --node-id ID (or --service-node ID)".to_string(),
        ));
    }
    let mut translated =
        config::translate_bootstrap(&b).map_err(|errors| BootstrapError::Invalid {
            path: "--xds-address".to_string(),
            errors,
        })?;
    translated.dynamic = Some(config::dynamic::Dynamic::from_address(address));
    Ok(translated)
}

/// `--service-node` (or `--node-id`) and `--service-cluster` override the bootstrap's node,
/// as in Envoy; `--node-metadata KEY=VALUE` sets string fields of its metadata.
fn apply_node_flags(b: &mut pb::Bootstrap, args: &Args) {
    let id = args.node_id.as_ref().or(args.service_node.as_ref());
    if id.is_none() && args.service_cluster.is_none() && args.node_metadata.is_empty() {
        return;
    }
    let node = b.node.get_or_insert_with(Node::default);
    if let Some(id) = id {
        node.id = id.clone();
    }
    if let Some(cluster) = &args.service_cluster {
        node.cluster = cluster.clone();
    }
    if !args.node_metadata.is_empty() {
        let metadata = node.metadata.get_or_insert_with(Struct::default);
        for (key, value) in &args.node_metadata {
            metadata.fields.insert(
                key.clone(),
                Value {
                    kind: Some(Kind::StringValue(value.clone())),
                },
            );
        }
    }
}

/// `--node-metadata KEY=VALUE`: a non-empty key without whitespace; the value may be empty
/// and may itself contain `=`.
fn parse_node_metadata(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() && !key.chars().any(char::is_whitespace) => {
            Ok((key.to_string(), value.to_string()))
        }
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["capstan-proxy"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).expect("valid arguments")
    }

    #[test]
    fn defaults_are_sidecar_sized() {
        let a = args(&[]);
        assert_eq!(a.drain_time_s, 45);
        assert_eq!(a.readiness_address.to_string(), "0.0.0.0:15021");
        assert_eq!(a.tracing_level(), Ok("info"));
        assert!(a.concurrency() >= 1);
    }

    #[test]
    fn node_flags_override_the_bootstrap() {
        let a = args(&["--service-node", "web-0.shop", "--service-cluster", "web"]);
        let b = from_text("node: { id: old, cluster: old }\n", &a, "b.yaml").expect("valid");
        assert_eq!(b.node.id, "web-0.shop");
        assert_eq!(b.node.cluster, "web");
        assert_eq!(
            b.source.node.as_ref().map(|n| n.id.as_str()),
            Some("web-0.shop")
        );
    }

    fn metadata(b: &config::Bootstrap, key: &str) -> Option<String> {
        // What the xDS client sends: the bootstrap's node as given (with its metadata).
        let field = b.source.node.as_ref()?.metadata.as_ref()?.fields.get(key)?;
        match &field.kind {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        }
    }

    #[test]
    fn node_metadata_flags_add_string_fields() {
        let a = args(&[
            "--xds-address",
            "http://127.0.0.1:18000",
            "--node-id",
            "web-0.shop",
            "--node-metadata",
            "NAMESPACE=shop",
            "--node-metadata",
            "APP_PORTS=8080,9090",
            "--node-metadata",
            "EMPTY=",
            "--node-metadata",
            "EXPR=a=b",
        ]);
        let b = load(&a).expect("valid");
        assert_eq!(metadata(&b, "NAMESPACE").as_deref(), Some("shop"));
        assert_eq!(metadata(&b, "APP_PORTS").as_deref(), Some("8080,9090"));
        assert_eq!(metadata(&b, "EMPTY").as_deref(), Some(""));
        assert_eq!(metadata(&b, "EXPR").as_deref(), Some("a=b"));
    }

    #[test]
    fn node_metadata_flags_merge_into_the_bootstrap_node() {
        let a = args(&["--node-metadata", "APP_PORTS=8080"]);
        let b = from_text(
            "node: { id: web-0.shop, metadata: { APP_PORTS: \"1\", OTHER: kept } }\n",
            &a,
            "b.yaml",
        )
        .expect("valid");
        assert_eq!(b.node.id, "web-0.shop");
        assert_eq!(metadata(&b, "APP_PORTS").as_deref(), Some("8080"));
        assert_eq!(metadata(&b, "OTHER").as_deref(), Some("kept"));
    }

    #[test]
    fn node_metadata_needs_key_equals_value() {
        for bad in ["APP_PORTS", "=8080", "A B=1"] {
            let err = Args::try_parse_from(["capstan-proxy", "--node-metadata", bad])
                .expect_err("invalid");
            assert!(err.to_string().contains("--node-metadata"), "{err}");
        }
    }

    #[test]
    fn every_error_is_listed_under_the_file_name() {
        let err = from_text(
            "static_resources:\n  clusters:\n  - { name: a, type: ORIGINAL_DST }\n  - { name: b, connect_timeout: 0s }\n",
            &args(&[]),
            "b.yaml",
        )
        .expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "invalid bootstrap b.yaml:\n  static_resources.clusters[0].type: unsupported value ORIGINAL_DST (supported: STATIC, STRICT_DNS, LOGICAL_DNS, EDS)\n  static_resources.clusters[1].connect_timeout: must be a positive duration"
        );
    }

    #[test]
    fn unknown_fields_are_parse_errors_naming_the_field() {
        let err = from_text("static_resources: { clustrs: [] }\n", &args(&[]), "b.yaml")
            .expect_err("invalid");
        assert!(err.to_string().contains("clustrs"), "{err}");
    }

    #[test]
    fn xds_address_alone_is_a_complete_configuration() {
        let a = args(&[
            "--xds-address",
            "http://127.0.0.1:18000",
            "--node-id",
            "p.ns",
        ]);
        let b = load(&a).expect("valid");
        assert_eq!(b.node.id, "p.ns");
        let d = b.dynamic.expect("dynamic");
        assert_eq!(d.ads.endpoint, "http://127.0.0.1:18000");
        assert!(d.cds.is_some() && d.lds.is_some());
        assert_eq!(b.admin_address.to_string(), config::DEFAULT_ADMIN_ADDRESS);
    }

    #[test]
    fn xds_address_needs_a_node_id_and_plain_http() {
        let no_id = load(&args(&["--xds-address", "http://127.0.0.1:18000"]));
        assert!(
            no_id
                .expect_err("invalid")
                .to_string()
                .contains("--node-id")
        );
        let tls = load(&args(&[
            "--xds-address",
            "https://cp:18000",
            "--node-id",
            "a",
        ]));
        assert!(
            tls.expect_err("invalid")
                .to_string()
                .contains("http://HOST:PORT")
        );
    }

    #[test]
    fn envoy_log_levels_are_accepted() {
        assert_eq!(args(&["-l", "warning"]).tracing_level(), Ok("warn"));
        assert_eq!(
            args(&["--log-level", "critical"]).tracing_level(),
            Ok("error")
        );
        assert!(args(&["-l", "loud"]).tracing_level().is_err());
    }
}
