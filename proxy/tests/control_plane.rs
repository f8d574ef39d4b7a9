//! The proxy against the real `capstan-control-plane` binary, started with no bootstrap file
//! at all (`--xds-address URL --node-id ID`): Services, EndpointSlices and a ServiceRoute in a
//! watched directory → the control plane's outbound listener on 127.0.0.1:15001 → in-test
//! backends; editing the ServiceRoute file changes routing.
//!
//! The control plane's outbound listener is fixed at 127.0.0.1:15001 and the proxy's default
//! admin at 127.0.0.1:15000, so this is the only test here that uses them, and it holds the
//! lock file `/tmp/capstan-15001.lock` (the e2e harness's `OutboundPortLock`) while it runs.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use capstan_e2e::process::{OutboundPortLock, workspace_bin};
use http::StatusCode;
use support::{Backend, eventually, free_port, get, temp_dir};

const OUTBOUND_PORT: u16 = 15001;
/// Kills the child on drop.
struct Proc(Child, PathBuf);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
    let out = std::fs::File::create(&log).expect("log file");
    let err = out.try_clone().expect("log file");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn");
    Proc(child, log)
}

fn service(name: &str, addr: SocketAddr) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{ name: {name}, namespace: default }}
spec:
  ports: [{{ name: http, port: 80, targetPort: {port} }}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abc
  namespace: default
  labels: {{ kubernetes.io/service-name: {name} }}
addressType: IPv4
ports: [{{ name: http, port: {port} }}]
endpoints:
- addresses: ["{ip}"]
  conditions: {{ ready: true }}
"#,
        port = addr.port(),
        ip = addr.ip(),
    )
}

fn route(backend: &str) -> String {
    format!(
        "apiVersion: capstan.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {{ name: reviews, namespace: default }}\nspec:\n  parentRefs: [{{ name: reviews }}]\n  rules:\n  - matches: [{{ path: {{ type: PathPrefix, value: /v2 }} }}]\n    backendRefs: [{{ name: reviews-v2, port: 80 }}]\n  - backendRefs: [{{ name: {backend}, port: 80 }}]\n"
    )
}

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

/// `/ready`'s status, `None` while nothing listens.
async fn ready(port: u16) -> Option<StatusCode> {
    let req = http::Request::get(format!("http://127.0.0.1:{port}/ready"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .ok()?;
    let resp = support::http1_client().request(req).await.ok()?;
    Some(resp.status())
}

async fn backend_for(path: &str) -> Option<String> {
    let reply = get(OUTBOUND_PORT, "reviews", path).await;
    (reply.status == StatusCode::OK)
        .then(|| reply.backend())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_real_control_plane_drives_the_proxy_and_a_file_edit_changes_routing() {
    let _lock = OutboundPortLock::acquire();
    let work = temp_dir("control-plane");
    let config = work.join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    let mut backends = Vec::new();
    for name in ["reviews", "reviews-v1", "reviews-v2"] {
        let b = Backend::start(name).await;
        write(
            &config,
            &format!("svc-{name}.yaml"),
            &service(name, b.address),
        );
        backends.push(b);
    }
    write(&config, "route.yaml", &route("reviews-v1"));

    let xds = format!("127.0.0.1:{}", free_port());
    let mut cp = Command::new(workspace_bin(
        "capstan-control-plane",
        "capstan-control-plane",
    ));
    cp.args(["--provider", "file", "--config-dir"])
        .arg(&config)
        .args(["--xds-addr", &xds])
        .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--debounce-ms", "50"]);
    let cp = spawn(cp, work.join("control-plane.log"));

    let readiness = format!("127.0.0.1:{}", free_port());
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_capstan-proxy"));
    proxy
        .args(["--xds-address", &format!("http://{xds}")])
        .args([
            "--node-id",
            "sidecar-0.default",
            "--service-cluster",
            "client",
        ])
        .args(["--readiness-address", &readiness])
        .args(["--drain-time-s", "1", "--concurrency", "2"]);
    let proxy = spawn(proxy, work.join("proxy.log"));
    let logs = || {
        format!(
            "--- control plane ---\n{}\n--- proxy ---\n{}",
            cp.logs(),
            proxy.logs()
        )
    };

    let live = eventually(Duration::from_secs(20), async || {
        ready(15000).await == Some(StatusCode::OK)
    })
    .await;
    assert!(live, "proxy never LIVE\n{}", logs());

    assert_eq!(
        backend_for("/").await.as_deref(),
        Some("reviews-v1"),
        "{}",
        logs()
    );
    assert_eq!(backend_for("/v2/x").await.as_deref(), Some("reviews-v2"));

    // Editing the ServiceRoute re-routes through CDS/RDS updates, without a failed request.
    write(&config, "route.yaml", &route("reviews"));
    let moved = eventually(Duration::from_secs(10), async || {
        backend_for("/").await.as_deref() == Some("reviews")
    })
    .await;
    assert!(moved, "routing did not follow the file\n{}", logs());
    let _ = std::fs::remove_dir_all(&work);
}
