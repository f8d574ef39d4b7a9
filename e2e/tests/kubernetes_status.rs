//! The control plane in Kubernetes mode, end to end without a cluster: the real binary
//! watches the fake API server, stock Envoy connects over ADS, and the ServiceRoute's status
//! says so — conditions from translation, and `status.proxies` counting the proxy that ACKed
//! a configuration containing the route, then not counting it once it disconnects.

use std::process::{Child, Command};
use std::time::Duration;

use capstan_e2e::eventually;
use capstan_e2e::fake_kube::FakeApiServer;
use capstan_e2e::process::{
    AdsMode, OutboundPortLock, free_port, start_envoy, temp_dir, workspace_bin,
};
use serde_json::{Value, json};

const ROUTES: &str = "apis/capstan.dev/v1alpha1/serviceroutes";

fn seed(api: &FakeApiServer) {
    api.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web", "namespace": "shop" },
        "spec": { "ports": [{ "name": "http", "port": 80 }] },
    }));
    api.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": "web-1", "namespace": "shop",
                      "labels": { "kubernetes.io/service-name": "web" } },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": ["127.0.0.1"], "conditions": { "ready": true } }],
        "ports": [{ "name": "http", "port": 9 }],
    }));
    api.apply(json!({
        "apiVersion": "capstan.dev/v1alpha1", "kind": "ServiceRoute",
        "metadata": { "name": "web", "namespace": "shop" },
        "spec": {
            "parentRefs": [{ "name": "web" }],
            "rules": [{ "backendRefs": [{ "name": "web", "port": 80 }] }],
        },
    }));
}

fn proxies(route: &Value) -> (i64, i64) {
    let p = &route["status"]["proxies"];
    (
        p["connected"].as_i64().unwrap_or(-1),
        p["acked"].as_i64().unwrap_or(-1),
    )
}

#[tokio::test]
async fn route_status_counts_the_proxies_that_acked_it() {
    let api = FakeApiServer::start().await;
    seed(&api);
    let work = temp_dir("k8s-status");
    let kubeconfig = work.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{ server: \"{}\" }}\nusers:\n- name: u\n  user: {{ token: t }}\ncontexts:\n- name: c\n  context: {{ cluster: fake, user: u }}\ncurrent-context: c\n",
            api.url()
        ),
    )
    .expect("kubeconfig");
    let xds: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let log = std::fs::File::create(work.join("control-plane.log")).expect("log");
    let cp = Command::new(workspace_bin(
        "capstan-control-plane",
        "capstan-control-plane",
    ))
    .args(["--provider", "kubernetes", "--pod-name", "cp-0"])
    .args(["--lease-duration-s", "3", "--lease-renew-s", "1"])
    .arg("--xds-addr")
    .arg(xds.to_string())
    .arg("--admin-addr")
    .arg(format!("127.0.0.1:{}", free_port()))
    .env("KUBECONFIG", &kubeconfig)
    .env("RUST_LOG", "info")
    .stdout(log.try_clone().expect("log"))
    .stderr(log)
    .spawn()
    .map(Killed)
    .expect("start the control plane");

    // Conditions first: the control plane leads (one replica) and writes them.
    let route = eventually("the route's conditions", Duration::from_secs(30), || {
        let r = api.get(ROUTES, "shop", "web");
        async move { r.filter(|r| r["status"]["conditions"].is_array()) }
    })
    .await;
    let accepted = route["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(accepted["status"], "True", "{route}");
    assert_eq!(proxies(&route), (0, 0), "no proxy yet: {route}");

    let _port = OutboundPortLock::acquire();
    let Some(envoy) = start_envoy("web-0.shop", "web", xds, AdsMode::StateOfTheWorld, &work) else {
        eprintln!("NOT RUN: envoy is not installed (scripts/test.sh installs it)");
        return;
    };
    let route = eventually(
        "status.proxies to count Envoy",
        Duration::from_secs(30),
        || {
            let r = api.get(ROUTES, "shop", "web");
            async move { r.filter(|r| proxies(r) == (1, 1)) }
        },
    )
    .await;
    assert!(
        route["status"]["proxies"]["nacked"].is_null(),
        "Envoy rejected nothing: {route}"
    );

    // A new version of the route (new generation) is counted once Envoy ACKs it.
    let mut changed = api.get(ROUTES, "shop", "web").expect("route");
    changed["spec"]["rules"][0]["matches"] =
        json!([{ "path": { "type": "PathPrefix", "value": "/v2" } }]);
    api.apply(changed);
    eventually("the new generation to be ACKed", Duration::from_secs(30), || {
        let r = api.get(ROUTES, "shop", "web");
        async move {
            r.filter(|r| r["status"]["observedGeneration"] == 2 && proxies(r) == (1, 1))
        }
    })
    .await;

    // Envoy goes away: nothing connected, nothing counted.
    drop(envoy);
    eventually("the disconnect to show", Duration::from_secs(30), || {
        let r = api.get(ROUTES, "shop", "web");
        async move { r.filter(|r| proxies(r) == (0, 0)) }
    })
    .await;
    drop(cp);
    let _ = std::fs::remove_dir_all(&work);
}

/// Kills the control plane however the test ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
