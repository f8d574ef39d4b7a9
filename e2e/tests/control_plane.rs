//! The control plane as a process: usage errors, operations endpoints, clean shutdown.

use std::process::Command;
use std::time::Duration;

use capstan_e2e::client::get;
use capstan_e2e::eventually;
use capstan_e2e::process::{self, PATIENCE};

fn binary() -> std::path::PathBuf {
    process::workspace_bin("capstan-control-plane", "capstan-control-plane")
}

#[test]
fn missing_config_dir_exits_with_usage_error_naming_it() {
    let out = Command::new(binary())
        .args([
            "--config-dir",
            "/nonexistent/capstan",
            "--xds-addr",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--config-dir /nonexistent/capstan: not a directory"),
        "{stderr}"
    );
}

#[test]
fn crds_subcommand_prints_both_crds() {
    let out = Command::new(binary()).arg("crds").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("name: serviceroutes.capstan.dev"));
    assert!(text.contains("name: servicepolicies.capstan.dev"));
}

#[test]
fn translate_subcommand_prints_what_a_node_receives_for_the_clean_quickstart() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/quickstart");
    let out = Command::new(binary())
        .args([
            "translate",
            "--config-dir",
            dir,
            "--node-id",
            "web-0.default",
        ])
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(
        warnings.is_empty(),
        "the quickstart configuration has problems:\n{warnings}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("outbound|80||reviews.default.svc.cluster.local"),
        "{text}"
    );
    assert!(text.contains("15001"), "{text}");
}

#[tokio::test]
async fn serves_health_readiness_and_metrics_then_stops_on_sigterm() {
    let work = process::temp_dir("cp");
    let config = work.join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::write(
        config.join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n",
    )
    .expect("write");
    let mut cp = process::start_control_plane(&config, &work);
    let admin = cp.admin;
    eventually("/readyz to answer 200", PATIENCE, || async move {
        get(admin, "admin", "/readyz")
            .await
            .ok()
            .filter(|r| r.status == 200)
    })
    .await;
    let health = get(admin, "admin", "/healthz").await.expect("healthz");
    assert_eq!(health.status, 200);
    let metrics = get(admin, "admin", "/metrics").await.expect("metrics");
    assert!(
        metrics
            .body
            .contains("# TYPE capstan_xds_connected_streams gauge"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains("capstan_config_diagnostics 0"),
        "{}",
        metrics.body
    );
    let missing = get(admin, "admin", "/nope").await.expect("404");
    assert_eq!(missing.status, 404);

    let status = Command::new("kill")
        .args(["-TERM", &cp.proc.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let status = eventually(
        "the control plane to exit after SIGTERM",
        Duration::from_secs(10),
        || {
            let status = cp.proc.exit_status();
            async move { status }
        },
    )
    .await;
    assert!(status.success(), "exit status {status}");
    assert!(
        cp.proc.logs().contains("shutting down"),
        "{}",
        cp.proc.logs()
    );
}
