//! Compiles the Envoy `.proto` files that `envoy-types` ships inside its crate into one
//! `FileDescriptorSet`, so the JSON/YAML mapping (bootstrap files, `config_dump`, golden
//! files) needs no `protoc` and no proto parsing at run time.

use std::path::{Path, PathBuf};

/// The Envoy messages we render or parse through the proto3 JSON mapping. Their imports are
/// pulled in transitively; every extension a `typed_config` may carry must be listed here so
/// that its `Any` can be resolved.
const FILES: &[&str] = &[
    "envoy/config/bootstrap/v3/bootstrap.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/admin/v3/config_dump.proto",
    "envoy/admin/v3/clusters.proto",
    "envoy/admin/v3/listeners.proto",
    "envoy/admin/v3/server_info.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/http/local_ratelimit/v3/local_rate_limit.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/transport_sockets/tls/v3/cert.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/extensions/load_balancing_policies/round_robin/v3/round_robin.proto",
    "envoy/extensions/load_balancing_policies/least_request/v3/least_request.proto",
    "envoy/extensions/access_loggers/stream/v3/stream.proto",
    "envoy/extensions/access_loggers/file/v3/file.proto",
];

const INCLUDES: &[&str] = &[
    "data-plane-api",
    "xds",
    "protoc-gen-validate",
    "googleapis",
    "cel-spec/proto",
    "opentelemetry-proto",
    "client_model",
];

fn main() {
    let root = envoy_types_proto_dir();
    let includes: Vec<PathBuf> = INCLUDES.iter().map(|i| root.join(i)).collect();
    let fds = protox::compile(FILES, &includes).unwrap_or_else(|e| {
        panic!(
            "compiling envoy-types' .proto files from {}: {e}",
            root.display()
        )
    });
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(
        out.join("envoy_descriptor_set.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .expect("write descriptor set");
    println!("cargo:rerun-if-changed=build.rs");
}

/// `envoy-types` does not export its proto directory. Its sources sit in cargo's registry
/// cache under `envoy-types-<version>`, with the version our lock file pins.
/// `ENVOY_TYPES_PROTO_DIR` overrides the lookup (vendored builds).
fn envoy_types_proto_dir() -> PathBuf {
    println!("cargo:rerun-if-env-changed=ENVOY_TYPES_PROTO_DIR");
    if let Ok(dir) = std::env::var("ENVOY_TYPES_PROTO_DIR") {
        return PathBuf::from(dir);
    }
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let lock_path = manifest_dir.join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock_path.display());
    let lock = std::fs::read_to_string(&lock_path).expect("read the workspace Cargo.lock");
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"envoy-types\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"').to_string())
        .expect("envoy-types is in Cargo.lock");
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cargo")
        });
    let src = cargo_home.join("registry/src");
    let wanted = format!("envoy-types-{version}");
    for index in std::fs::read_dir(&src)
        .expect("read cargo's registry/src")
        .flatten()
    {
        let candidate: &Path = &index.path().join(&wanted).join("proto");
        if candidate.is_dir() {
            return candidate.to_path_buf();
        }
    }
    panic!(
        "could not find {wanted}/proto under {}; set ENVOY_TYPES_PROTO_DIR",
        src.display()
    );
}
