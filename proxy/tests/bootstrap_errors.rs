//! A bad bootstrap names every problem and exits 64 (EX_USAGE) before anything binds.

mod support;

use std::process::Command;

use support::*;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_capstan-proxy"))
        .args(args)
        .output()
        .expect("run capstan-proxy");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn every_unsupported_field_is_named_and_nothing_binds() {
    let admin = free_port();
    let readiness = free_port();
    let listener = free_port();
    let dir = temp_dir("bad-bootstrap");
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  clusters:
  - name: ok
    load_assignment: {{ endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 1 }} }} }} }}] }}] }}
  - name: original
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
  - name: checked
    health_checks: [{{ timeout: 1s, interval: 1s, http_health_check: {{ path: /healthz }} }}]
  listeners:
  - name: tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: ok
          access_log: [{{ name: x }}]
"#
        ),
    )
    .expect("write bootstrap");
    let readiness_address = format!("127.0.0.1:{readiness}");
    let (code, stderr) = run(&[
        "-c",
        path.to_str().expect("path"),
        "--readiness-address",
        &readiness_address,
    ]);
    assert_eq!(code, Some(64), "{stderr}");
    for expected in [
        "static_resources.clusters[1].type: unsupported value ORIGINAL_DST (supported: STATIC, STRICT_DNS, LOGICAL_DNS, EDS)",
        "static_resources.clusters[1].lb_policy: unsupported value CLUSTER_PROVIDED (supported: ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV)",
        "static_resources.clusters[2].health_checks[0].unhealthy_threshold: required",
        "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.access_log: unsupported field (access logs are not implemented yet)",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    for port in [admin, readiness, listener] {
        assert!(!accepts(port).await, "port {port} was bound");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unknown_fields_and_bad_flags_are_usage_errors() {
    let dir = temp_dir("unknown-field");
    let path = dir.join("b.json");
    std::fs::write(
        &path,
        r#"{"static_resources": {"clusters": [{"name": "a", "conect_timeout": "1s"}]}}"#,
    )
    .expect("write");
    let (code, stderr) = run(&["-c", path.to_str().expect("path")]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("conect_timeout"), "{stderr}");

    let (code, stderr) = run(&["-c", "/nonexistent/bootstrap.yaml"]);
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("cannot read /nonexistent/bootstrap.yaml"),
        "{stderr}"
    );

    let (code, stderr) = run(&[]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("no configuration"), "{stderr}");

    let (code, _) = run(&["--no-such-flag"]);
    assert_eq!(code, Some(64));

    let (code, stderr) = run(&["-c", path.to_str().expect("path"), "--log-level", "loud"]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("--log-level"), "{stderr}");

    let (code, stderr) = run(&[
        "--xds-address",
        "http://127.0.0.1:18000",
        "--node-id",
        "a.b",
        "--node-metadata",
        "APP_PORTS",
    ]);
    assert_eq!(code, Some(64));
    assert!(stderr.contains("--node-metadata"), "{stderr}");
    assert!(stderr.contains("KEY=VALUE"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn unsupported_config_sources_are_named_and_exit_64() {
    let admin = free_port();
    let dir = temp_dir("bad-dynamic");
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        format!(
            r#"
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
dynamic_resources:
  ads_config: {{ api_type: REST, grpc_services: [{{ envoy_grpc: {{ cluster_name: missing }} }}] }}
  cds_config: {{ api_config_source: {{ api_type: GRPC }} }}
  lds_config: {{ path_config_source: {{ path: /etc/lds.yaml }} }}
"#
        ),
    )
    .expect("write bootstrap");
    let (code, stderr) = run(&["-c", path.to_str().expect("path")]);
    assert_eq!(code, Some(64), "{stderr}");
    for expected in [
        "dynamic_resources.cds_config.api_config_source: unsupported field (only ADS config sources (ads: {}) are supported)",
        "dynamic_resources.lds_config.path_config_source: unsupported field",
        "dynamic_resources.ads_config.api_type: unsupported value REST (supported: GRPC, DELTA_GRPC)",
        "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name: unknown cluster \"missing\"",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in\n{stderr}"
        );
    }
    assert!(!accepts(admin).await, "nothing binds");
    let (code, stderr) = run(&["--xds-address", "grpc://cp:18000", "--node-id", "a"]);
    assert_eq!(code, Some(64), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
