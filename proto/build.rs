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
    "envoy/extensions/filters/network/local_ratelimit/v3/local_rate_limit.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/transport_sockets/tls/v3/cert.proto",
    "envoy/extensions/transport_sockets/raw_buffer/v3/raw_buffer.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
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
    // No source info: comments are never read, and they were a third of the decoded pool.
    let fds = protox::Compiler::new(&includes)
        .and_then(|mut c| {
            c.include_source_info(false).include_imports(true);
            c.open_files(FILES)?;
            Ok(c.file_descriptor_set())
        })
        .unwrap_or_else(|e| {
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
    std::fs::write(out.join("envoy_schema.rs"), schema_source(&fds)).expect("write schema");
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

/// `schema.rs`'s static table: for every message in the set (sorted by full name), its fields
/// (sorted by number) with their names, whether they repeat, and what they hold.
fn schema_source(fds: &prost_types::FileDescriptorSet) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;

    const TYPE_MESSAGE: i32 = 11;
    const LABEL_REPEATED: i32 = 3;

    struct Msg<'a> {
        map_entry: bool,
        proto: &'a prost_types::DescriptorProto,
    }
    fn collect<'a>(
        prefix: &str,
        msgs: &'a [prost_types::DescriptorProto],
        out: &mut BTreeMap<String, Msg<'a>>,
    ) {
        for m in msgs {
            let name = format!("{prefix}.{}", m.name());
            collect(&name, &m.nested_type, out);
            let map_entry = m.options.as_ref().and_then(|o| o.map_entry) == Some(true);
            out.insert(
                name,
                Msg {
                    map_entry,
                    proto: m,
                },
            );
        }
    }
    let mut messages = BTreeMap::new();
    for file in &fds.file {
        let package = file.package();
        collect(package, &file.message_type, &mut messages);
    }
    let message_type = |f: &prost_types::FieldDescriptorProto| -> Option<String> {
        (f.r#type == Some(TYPE_MESSAGE)).then(|| f.type_name().trim_start_matches('.').to_string())
    };
    let mut src = String::from(
        "// @generated by proto/build.rs from the compiled Envoy descriptor set.\n\
         pub(crate) static MESSAGES: &[MessageSchema] = &[\n",
    );
    for (name, msg) in &messages {
        let mut fields: Vec<_> = msg.proto.field.iter().collect();
        fields.sort_by_key(|f| f.number());
        let _ = writeln!(src, "MessageSchema {{ name: {name:?}, fields: &[");
        for f in fields {
            let repeated = f.label == Some(LABEL_REPEATED);
            let kind = match message_type(f) {
                Some(t) => match messages.get(&t) {
                    Some(entry) if entry.map_entry => {
                        let value = entry.proto.field.iter().find(|v| v.number() == 2);
                        match value.and_then(message_type) {
                            Some(v) => format!("FieldKind::Map(Some({v:?}))"),
                            None => "FieldKind::Map(None)".to_string(),
                        }
                    }
                    _ => format!("FieldKind::Message({t:?})"),
                },
                None => "FieldKind::Scalar".to_string(),
            };
            let _ = writeln!(
                src,
                "  FieldSchema {{ number: {}, name: {:?}, repeated: {repeated}, kind: {kind} }},",
                f.number(),
                f.name()
            );
        }
        src.push_str("] },\n");
    }
    src.push_str("];\n");
    src
}
