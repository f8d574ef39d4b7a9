//! The Kubernetes provider against a fake API server that speaks real HTTP list/watch, driven
//! through kube-rs's real client: initial sync, updates, invalid objects, deletes, watch
//! restarts, `410 Gone` re-lists, API-server outages and namespace-limited watching; Secrets
//! (`--watch-secrets`): only referenced ones kept, bad rotations keep the last valid version.

use std::time::Duration;

use capstan_control_plane::provider::kube::{Options, run};
use capstan_control_plane::store::{ObjectKey, Store, StoreSnapshot};
use capstan_e2e::eventually;
use capstan_e2e::fake_kube::FakeApiServer;
use serde_json::{Value, json};
use tokio::sync::oneshot;

const SERVICES: &str = "api/v1/services";
const ROUTES: &str = "apis/capstan.dev/v1alpha1/serviceroutes";

fn service(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "ports": [{ "name": "http", "port": 80 }] },
    })
}

fn slice(ns: &str, service: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-abc"), "namespace": ns,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": [ip], "conditions": { "ready": true } }],
        "ports": [{ "name": "http", "port": 8080 }],
    })
}

fn route(ns: &str, name: &str, parent: &str, prefix: &str) -> Value {
    json!({
        "apiVersion": "capstan.dev/v1alpha1", "kind": "ServiceRoute",
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "parentRefs": [{ "name": parent }],
            "rules": [{
                "matches": [{ "path": { "type": "PathPrefix", "value": prefix } }],
                "backendRefs": [{ "name": parent, "port": 80 }],
            }],
        },
    })
}

struct Running {
    store: Store,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(api: &FakeApiServer, namespaces: &[&str]) -> Running {
        Self::start_with(
            api,
            Options {
                namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        )
        .await
    }

    async fn start_with(api: &FakeApiServer, options: Options) -> Running {
        let url = api.url().parse().expect("url");
        let client = kube::Client::try_from(kube::Config::new(url)).expect("kube client");
        let store = Store::new();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run(client, options, store.clone(), async {
            let _ = rx.await;
        }));
        Running {
            store,
            stop: Some(tx),
            task,
        }
    }

    async fn until(&self, what: &str, check: impl Fn(&StoreSnapshot) -> bool) -> StoreSnapshot {
        let store = self.store.clone();
        eventually(what, Duration::from_secs(20), || {
            let s = store.snapshot();
            let ok = check(&s);
            async move { ok.then(|| (*s).clone()) }
        })
        .await
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("provider stops on shutdown")
            .expect("provider task");
        result.expect("provider ends cleanly");
    }
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

#[tokio::test]
async fn syncs_then_follows_updates_invalid_objects_and_deletes() {
    let api = FakeApiServer::start().await;
    api.apply(service("shop", "web"));
    api.apply(slice("shop", "web", "10.0.0.1"));
    api.apply(route("shop", "r", "web", "/a"));
    let running = Running::start(&api, &[]).await;

    let s = running
        .until("the initial sync", |s| s.synced && s.routes.len() == 1)
        .await;
    assert_eq!(s.services.len(), 1);
    assert_eq!(s.endpoint_slices.len(), 1);
    assert!(s.diagnostics.is_empty(), "{:?}", s.diagnostics);

    // A valid update is followed.
    api.apply(route("shop", "r", "web", "/b"));
    running
        .until("the route update", |s| {
            s.routes.get(&key("shop", "r")).is_some_and(|r| {
                serde_json::to_value(&r.spec).expect("json")["rules"][0]["matches"][0]["path"]
                    ["value"]
                    == "/b"
            })
        })
        .await;

    // An invalid update keeps the last valid version and says why, naming the field.
    let mut bad = route("shop", "r", "web", "/c");
    bad["spec"]["parentRefs"][0]["port"] = json!(0);
    api.apply(bad);
    let s = running
        .until("the diagnostic", |s| !s.diagnostics.is_empty())
        .await;
    let d = &s.diagnostics[0];
    assert_eq!(d.object.as_deref(), Some("ServiceRoute shop/r"), "{d}");
    assert!(d.message.contains("spec.parentRefs[0].port"), "{d}");
    let kept = serde_json::to_value(&s.routes[&key("shop", "r")].spec).expect("json");
    assert_eq!(kept["rules"][0]["matches"][0]["path"]["value"], "/b");

    // An unknown field in our CRD is an error too (strict, like kubectl's field validation).
    let mut typo = route("shop", "other", "web", "/x");
    typo["spec"]["rulez"] = json!([]);
    api.apply(typo);
    let s = running
        .until("the typo diagnostic", |s| s.diagnostics.len() == 2)
        .await;
    assert!(
        s.diagnostics.iter().any(|d| d.message.contains("rulez")),
        "{:?}",
        s.diagnostics
    );
    assert!(!s.routes.contains_key(&key("shop", "other")));

    // Deletes remove the object and its diagnostic.
    assert!(api.delete(ROUTES, "shop", "r"));
    let s = running
        .until("the delete", |s| !s.routes.contains_key(&key("shop", "r")))
        .await;
    assert_eq!(s.diagnostics.len(), 1, "{:?}", s.diagnostics);
    running.stop().await;
}

#[tokio::test]
async fn outages_and_410_gone_keep_the_served_snapshot_until_the_relist_completes() {
    let api = FakeApiServer::start().await;
    api.apply(service("shop", "web"));
    api.apply(service("shop", "api"));
    api.apply(route("shop", "r", "web", "/a"));
    let running = Running::start(&api, &[]).await;
    running
        .until("the initial sync", |s| s.synced && s.services.len() == 2)
        .await;
    let generation = running.store.snapshot().generation;

    // The API server goes away; what was served stays, unchanged.
    api.set_down(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = running.store.snapshot();
    assert_eq!(during.services.len(), 2);
    assert_eq!(during.routes.len(), 1);
    assert_eq!(
        during.generation, generation,
        "nothing published while down"
    );

    // Meanwhile a Service is deleted and the history compacted (watches from the old
    // resourceVersion get 410 Gone): only a full re-list can see the delete.
    assert!(api.delete(SERVICES, "shop", "api"));
    api.apply(route("shop", "r2", "web", "/b"));
    api.compact();
    api.set_down(false);
    let s = running
        .until("the re-list after the outage", |s| {
            s.services.len() == 1 && s.routes.len() == 2
        })
        .await;
    assert!(s.services.contains_key(&key("shop", "web")));
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services") && !r.contains("watch=true"))
        .count();
    assert!(lists >= 2, "the 410 forced a re-list: {:?}", api.requests());

    // A watch cut by the server (timeout, restart) resumes and keeps following.
    api.break_watches();
    api.apply(service("shop", "late"));
    running
        .until("an update after the watch restarted", |s| {
            s.services.contains_key(&key("shop", "late"))
        })
        .await;
    running.stop().await;
}

#[tokio::test]
async fn watch_namespaces_limits_what_is_read() {
    let api = FakeApiServer::start().await;
    api.apply(service("shop", "web"));
    api.apply(service("other", "web"));
    api.apply(route("other", "r", "web", "/a"));
    let running = Running::start(&api, &["shop"]).await;
    let s = running.until("the initial sync", |s| s.synced).await;
    assert_eq!(
        s.services.keys().cloned().collect::<Vec<_>>(),
        vec![key("shop", "web")]
    );
    assert!(s.routes.is_empty());
    let requests = api.requests();
    assert!(
        requests.iter().all(|r| r.contains("/namespaces/shop/")),
        "every list/watch is namespaced: {requests:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn the_binary_serves_readiness_only_after_the_kubernetes_caches_synced() {
    let api = FakeApiServer::start().await;
    api.apply(service("shop", "web"));
    api.set_down(true);
    let dir = capstan_e2e::process::temp_dir("cp-kube");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{ server: \"{}\" }}\nusers:\n- name: u\n  user: {{ token: t }}\ncontexts:\n- name: c\n  context: {{ cluster: fake, user: u }}\ncurrent-context: c\n",
            api.url()
        ),
    )
    .expect("write kubeconfig");
    let admin = capstan_e2e::process::free_port();
    let xds = capstan_e2e::process::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_capstan-control-plane"))
        .args(["--provider", "kubernetes", "--watch-namespaces", "shop"])
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{admin}"))
        .arg("--xds-addr")
        .arg(format!("127.0.0.1:{xds}"))
        .env("KUBECONFIG", &kubeconfig)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the control plane");
    let readyz = move || async move {
        capstan_e2e::client::get(([127, 0, 0, 1], admin).into(), "localhost", "/readyz")
            .await
            .ok()
            .map(|r| r.status)
    };
    let first = eventually("the admin port", Duration::from_secs(20), || async {
        readyz().await
    })
    .await;
    assert_eq!(first, 503, "not ready while the API server is down");
    api.set_down(false);
    eventually(
        "readiness after the sync",
        Duration::from_secs(20),
        || async { (readyz().await == Some(200)).then_some(()) },
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
}

fn elector(
    api: &FakeApiServer,
    identity: &str,
) -> (
    tokio::sync::watch::Receiver<bool>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let url = api.url().parse().expect("url");
    let client = kube::Client::try_from(kube::Config::new(url)).expect("kube client");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (stop, stopped) = oneshot::channel::<()>();
    let config = capstan_control_plane::leader::Config {
        namespace: "capstan-system".into(),
        name: "capstan-control-plane".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(2),
        renew_every: Duration::from_millis(200),
    };
    let task = tokio::spawn(capstan_control_plane::leader::run(
        client,
        config,
        tx,
        async {
            let _ = stopped.await;
        },
    ));
    (rx, stop, task)
}

async fn becomes(rx: &mut tokio::sync::watch::Receiver<bool>, leading: bool, within: Duration) {
    tokio::time::timeout(within, rx.wait_for(|l| *l == leading))
        .await
        .unwrap_or_else(|_| panic!("leading={leading} not reached within {within:?}"))
        .expect("election running");
}

#[tokio::test]
async fn one_leader_fails_over_within_the_lease_and_hands_over_on_shutdown() {
    let api = FakeApiServer::start().await;
    let (mut a, stop_a, task_a) = elector(&api, "cp-a");
    becomes(&mut a, true, Duration::from_secs(5)).await;
    let (mut b, stop_b, task_b) = elector(&api, "cp-b");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(*a.borrow() && !*b.borrow(), "exactly one leader");
    let lease = api
        .get(
            "apis/coordination.k8s.io/v1/leases",
            "capstan-system",
            "capstan-control-plane",
        )
        .expect("the lease exists");
    assert_eq!(lease["spec"]["holderIdentity"], "cp-a");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 2);

    // A crashes (no release): B takes over once the lease has not been renewed for its
    // duration, and not before.
    task_a.abort();
    drop(stop_a);
    let crashed = std::time::Instant::now();
    becomes(&mut b, true, Duration::from_secs(5)).await;
    let took = crashed.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
        "fail-over after {took:?} (lease 2 s)"
    );
    let lease = api
        .get(
            "apis/coordination.k8s.io/v1/leases",
            "capstan-system",
            "capstan-control-plane",
        )
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "cp-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // A comes back as a follower; B shuts down cleanly and releases: A leads at once.
    let (mut a, stop_a, task_a) = elector(&api, "cp-a");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!*a.borrow(), "the returning replica follows");
    let _ = stop_b.send(());
    task_b.await.expect("b stops");
    let released = std::time::Instant::now();
    becomes(&mut a, true, Duration::from_secs(5)).await;
    assert!(
        released.elapsed() < Duration::from_millis(1500),
        "a released lease is taken at the next attempt, took {:?}",
        released.elapsed()
    );
    let _ = stop_a.send(());
    task_a.await.expect("a stops");
}

#[tokio::test]
async fn the_leader_writes_conditions_once_and_again_only_when_they_change() {
    let api = FakeApiServer::start().await;
    api.apply(service("shop", "web"));
    api.apply(slice("shop", "web", "10.0.0.1"));
    api.apply(route("shop", "good", "web", "/a"));
    let mut missing = route("shop", "bad", "web", "/b");
    missing["spec"]["rules"][0]["backendRefs"][0]["name"] = json!("nope");
    api.apply(missing);

    let running = Running::start(&api, &[]).await;
    let url = api.url().parse().expect("url");
    let client = kube::Client::try_from(kube::Config::new(url)).expect("kube client");
    let (leading_tx, leading_rx) = tokio::sync::watch::channel(false);
    let (stop, stopped) = oneshot::channel::<()>();
    let writer = tokio::spawn(capstan_control_plane::status_writer::run(
        client,
        running.store.clone(),
        std::sync::Arc::default(),
        leading_rx,
        async {
            let _ = stopped.await;
        },
    ));
    // Not the leader: nothing is written.
    running.until("the initial sync", |s| s.synced).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let patches = |api: &FakeApiServer| {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("PATCH") && r.contains("/status"))
            .count()
    };
    assert_eq!(patches(&api), 0, "a follower writes nothing");

    let _ = leading_tx.send(true);
    let condition = |o: &Value, t: &str| -> Option<Value> {
        o["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == t)
            .cloned()
    };
    let bad = eventually("the bad route's status", Duration::from_secs(10), || {
        let o = api.get(ROUTES, "shop", "bad");
        async move { o.filter(|o| condition(o, "ResolvedRefs").is_some()) }
    })
    .await;
    let resolved = condition(&bad, "ResolvedRefs").expect("ResolvedRefs");
    assert_eq!(resolved["status"], "False");
    assert_eq!(resolved["reason"], "BackendNotFound");
    assert!(
        resolved["message"].as_str().unwrap_or("").contains("nope"),
        "{resolved}"
    );
    assert_eq!(resolved["observedGeneration"], 1);
    assert!(resolved["lastTransitionTime"].is_string());
    let good = eventually("the good route's status", Duration::from_secs(10), || {
        let o = api.get(ROUTES, "shop", "good");
        async move { o.filter(|o| condition(o, "Accepted").is_some()) }
    })
    .await;
    assert_eq!(
        condition(&good, "Accepted").expect("Accepted")["status"],
        "True"
    );
    assert_eq!(
        condition(&good, "ResolvedRefs").expect("ResolvedRefs")["status"],
        "True"
    );

    // Settled: no more writes while nothing changes (the writer's own status updates come
    // back through the watch and match).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let settled = patches(&api);
    assert_eq!(settled, 2, "{:?}", api.requests());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(patches(&api), settled, "no rewrite of unchanged statuses");

    // Fixing the bad route (a new generation) is written once more, with the new generation
    // and a new transition time for the flipped condition.
    api.apply(route("shop", "bad", "web", "/b"));
    let fixed =
        eventually("the fixed route's status", Duration::from_secs(10), || {
            let o = api.get(ROUTES, "shop", "bad");
            async move {
                o.filter(|o| condition(o, "ResolvedRefs").is_some_and(|c| c["status"] == "True"))
            }
        })
        .await;
    let c = condition(&fixed, "ResolvedRefs").expect("ResolvedRefs");
    assert_eq!(c["observedGeneration"], 2);
    assert_ne!(c["lastTransitionTime"], resolved["lastTransitionTime"]);

    // A version our validation rejects (the API server let it through): its generation is
    // reported as not accepted, naming the field, while the last valid version stays served.
    let mut invalid = route("shop", "good", "web", "/a");
    invalid["spec"]["parentRefs"][0]["port"] = json!(0);
    api.apply(invalid);
    let rejected = eventually(
        "the rejected version's status",
        Duration::from_secs(10),
        || {
            let o = api.get(ROUTES, "shop", "good");
            async move { o.filter(|o| o["status"]["observedGeneration"] == 2) }
        },
    )
    .await;
    let accepted = condition(&rejected, "Accepted").expect("Accepted");
    assert_eq!(accepted["status"], "False", "{rejected}");
    assert_eq!(accepted["reason"], "Invalid");
    assert!(
        accepted["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.parentRefs[0].port") && m.contains("still in effect")),
        "{accepted}"
    );
    assert!(
        running
            .store
            .snapshot()
            .routes
            .contains_key(&key("shop", "good"))
    );
    let _ = stop.send(());
    writer.await.expect("writer stops");
    running.stop().await;
}

fn secret(ns: &str, name: &str, ca_pem: &str) -> Value {
    use base64::Engine;
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": name, "namespace": ns },
        "type": "Opaque",
        "data": { "ca.crt": base64::engine::general_purpose::STANDARD.encode(ca_pem) },
    })
}

fn tls_policy(ns: &str, name: &str, ca_secret: &str) -> Value {
    json!({
        "apiVersion": "capstan.dev/v1alpha1", "kind": "ServicePolicy",
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "targetRef": { "name": "web" },
            "tls": { "mode": "Simple", "caCertificateSecret": { "name": ca_secret } },
        },
    })
}

fn pem(body: &str) -> String {
    format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
}

#[tokio::test]
async fn referenced_secrets_are_watched_rotated_and_bad_versions_kept_out() {
    let api = FakeApiServer::start().await;
    api.apply(service("shop", "web"));
    api.apply(tls_policy("shop", "p", "mesh-ca"));
    api.apply(secret("shop", "mesh-ca", &pem("AAAA")));
    api.apply(secret("shop", "unrelated", &pem("CCCC")));
    let mut broken = secret("shop", "broken-unrelated", "x");
    broken["data"]["ca.crt"] = json!("%%%");
    api.apply(broken);
    let running = Running::start_with(
        &api,
        Options {
            secrets: true,
            ..Default::default()
        },
    )
    .await;
    let ca = |s: &StoreSnapshot| {
        s.secrets
            .get(&key("shop", "mesh-ca"))
            .and_then(|t| t.ca_crt.clone())
            .map(|b| String::from_utf8_lossy(&b).to_string())
    };
    let s = running
        .until("the initial sync with the Secret", |s| {
            s.synced && ca(s).is_some()
        })
        .await;
    assert_eq!(
        s.secrets.keys().cloned().collect::<Vec<_>>(),
        vec![key("shop", "mesh-ca")],
        "only referenced Secrets are kept"
    );
    assert!(s.diagnostics.is_empty(), "{:?}", s.diagnostics);
    assert!(
        api.requests().iter().any(|r| r.contains("api/v1/secrets")),
        "Secrets are listed and watched"
    );

    // Rotation is followed.
    api.apply(secret("shop", "mesh-ca", &pem("BBBB")));
    running
        .until("the rotation", |s| {
            ca(s).is_some_and(|p| p.contains("BBBB"))
        })
        .await;

    // A malformed version keeps the last valid one and is reported without its contents.
    api.apply(secret("shop", "mesh-ca", "hunter2"));
    let s = running
        .until("the bad Secret's diagnostic", |s| !s.diagnostics.is_empty())
        .await;
    assert!(ca(&s).is_some_and(|p| p.contains("BBBB")));
    let d = &s.diagnostics[0];
    assert_eq!(d.object.as_deref(), Some("Secret shop/mesh-ca"), "{d}");
    assert!(
        d.message.starts_with("ca.crt: no PEM CERTIFICATE block"),
        "{d}"
    );
    assert!(!d.to_string().contains("hunter2"), "{d}");

    // No longer referenced: dropped, and its problem with it.
    api.apply(tls_policy("shop", "p", "other-ca"));
    let s = running
        .until("the unreferenced Secret dropped", |s| s.secrets.is_empty())
        .await;
    assert!(s.diagnostics.is_empty(), "{:?}", s.diagnostics);
    running.stop().await;
}

#[tokio::test]
async fn secrets_are_not_watched_unless_asked() {
    let api = FakeApiServer::start().await;
    api.apply(service("shop", "web"));
    api.apply(tls_policy("shop", "p", "mesh-ca"));
    api.apply(secret("shop", "mesh-ca", &pem("AAAA")));
    let running = Running::start(&api, &[]).await;
    let s = running
        .until("the initial sync", |s| s.synced && s.policies.len() == 1)
        .await;
    assert!(s.secrets.is_empty());
    assert!(s.secrets_unwatched, "the translator can say why");
    assert!(
        !api.requests().iter().any(|r| r.contains("secrets")),
        "{:?}",
        api.requests()
    );
    running.stop().await;
}
