//! `ServicePolicy` end to end: the real control plane (file provider on a temporary YAML
//! directory) drives capstan-proxy over ADS, and everything a user sets on how a Service's
//! backends are reached is observed through the proxy's outbound listener (127.0.0.1:15001)
//! against real backends that fail on command.
//!
//! One test per policy area. Each asserts that the proxy ACKed the control plane's resources
//! for the policy (the cluster with the field is active in the proxy's `/config_dump`, and the
//! control plane counted no NACK; a NACK fails the test at once with the proxy's error text),
//! then the behaviour a user expects:
//! - `loadBalancer`: RingHash and Maglev with header (also through a ServiceRoute rule), query
//!   parameter, cookie (generated with its ttl when absent) and source IP hash policies keep one
//!   key on one backend and spread different keys; LeastRequest and Random spread.
//! - `healthCheck` (HTTP): the proxy is LIVE only after the first round, a backend that fails
//!   it starts unhealthy and gets no traffic, a failing backend leaves the rotation and returns
//!   once it recovers.
//! - `outlierDetection`: a backend answering 5xx is ejected (`consecutive5xx`) and gets traffic
//!   again only after the base ejection time; a backend refusing connections is ejected
//!   (`consecutiveLocalOriginFailure`).
//! - `circuitBreakers`: with a slow backend and one request in flight, concurrent requests get
//!   Envoy's 503 with `x-envoy-overloaded: true` (`maxRequests`), or one waits as pending and
//!   the rest overflow (`maxConnections` + `maxPendingRequests`).
//! - `connectionPool`: `maxRequestsPerConnection: 1` opens a connection per request;
//!   `idleTimeout` closes an idle upstream connection; `maxConnectionDuration` replaces a busy
//!   one once it is old.
//! - `tls`: Simple and Mutual origination with files, a SAN mismatch failing closed, and Mutual
//!   with Kubernetes Secrets served over SDS, against rustls backends (rcgen throwaway CA).
//! - Every other field at once, over state-of-the-world and delta ADS (all hash policy kinds, connect timeout, TCP and gRPC health
//!   checks, every outlier and breaker threshold, HTTP/2, `UseDownstream`, keepalive, TLS
//!   without a CA) is accepted; HTTP/2 upstream, `UseDownstream` following the client's
//!   protocol, the hash cookie and the health-check `host` are observed.
//!
//! Every scenario also runs through stock Envoy when it is installed (under `CI=true` its
//! absence fails), so both proxies are held to the same expectations; ring hash and Maglev
//! must map every key to the same backend in both. `SERVICE_POLICY_PEER=envoy` runs Envoy
//! only (to tell a test's mistake from a proxy's).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capstan_e2e::client::{self, Reply};
use capstan_e2e::eventually;
use capstan_e2e::fixtures::write;
use capstan_e2e::pki::Pki;
use capstan_e2e::process::{
    self, AdsMode, ControlPlane, Envoy, OUTBOUND, OutboundPortLock, PATIENCE, Peer,
};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------------
// Backends that fail on command.

/// What a backend is told to do, and what it saw.
#[derive(Default)]
struct State {
    /// Status of ordinary requests (0: 200).
    status: AtomicU16,
    /// `GET /healthz` answers 503 while set.
    health_failing: AtomicBool,
    /// `GET /healthz` does not answer while set.
    hold_health: AtomicBool,
    /// Delay before answering ordinary requests, in milliseconds.
    delay_ms: AtomicU64,
    hits: AtomicU64,
    health_hits: AtomicU64,
    in_flight: AtomicI64,
    /// TCP connections accepted, and those still open.
    connections: AtomicU64,
    open: AtomicI64,
    last_closed: Mutex<Option<Instant>>,
    /// The authority (`Host` / `:authority`) of the latest health check.
    health_host: Mutex<Option<String>>,
}

/// An HTTP/1.1 + h2c backend answering its name (body and `x-backend`) and the HTTP version
/// it saw (`x-seen-version`).
#[derive(Clone)]
struct Backend {
    name: String,
    addr: SocketAddr,
    s: Arc<State>,
}

impl Backend {
    async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let b = Self {
            name: name.to_string(),
            addr,
            s: Arc::default(),
        };
        let me = b.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                me.s.connections.fetch_add(1, Ordering::SeqCst);
                me.s.open.fetch_add(1, Ordering::SeqCst);
                let me = me.clone();
                tokio::spawn(async move {
                    let b = me.clone();
                    let service = service_fn(move |req| b.clone().respond(req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    *me.s.last_closed.lock().expect("lock") = Some(Instant::now());
                    me.s.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        b
    }

    async fn respond(
        self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
        let s = &self.s;
        let version = req.version();
        let status = if req.uri().path() == "/healthz" {
            s.health_hits.fetch_add(1, Ordering::SeqCst);
            let host = req
                .headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .or(req.uri().authority().map(|a| a.as_str()))
                .map(str::to_string);
            *s.health_host.lock().expect("lock") = host;
            while s.hold_health.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if s.health_failing.load(Ordering::SeqCst) {
                503
            } else {
                200
            }
        } else {
            s.hits.fetch_add(1, Ordering::SeqCst);
            s.in_flight.fetch_add(1, Ordering::SeqCst);
            let delay = s.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            s.in_flight.fetch_sub(1, Ordering::SeqCst);
            match s.status.load(Ordering::SeqCst) {
                0 => 200,
                code => code,
            }
        };
        Ok(hyper::Response::builder()
            .status(status)
            .header("x-backend", self.name.as_str())
            .header("x-seen-version", format!("{version:?}"))
            .body(Full::new(Bytes::from(self.name.clone())))
            .expect("response"))
    }

    fn hits(&self) -> u64 {
        self.s.hits.load(Ordering::SeqCst)
    }

    /// Back to a healthy, fast backend with fresh counters.
    fn reset(&self) {
        let s = &self.s;
        s.status.store(0, Ordering::SeqCst);
        s.health_failing.store(false, Ordering::SeqCst);
        s.hold_health.store(false, Ordering::SeqCst);
        s.delay_ms.store(0, Ordering::SeqCst);
        s.hits.store(0, Ordering::SeqCst);
        s.health_hits.store(0, Ordering::SeqCst);
        s.connections.store(0, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration.

/// A Service `name` on port 80 with one EndpointSlice per backend (they listen on different
/// ports of 127.0.0.1).
fn service(name: &str, backends: &[SocketAddr]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  ports: [{{ name: http, port: 80, targetPort: http }}]\n"
    );
    for (i, addr) in backends.iter().enumerate() {
        out.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{i}\n  namespace: default\n  labels: {{ kubernetes.io/service-name: {name} }}\naddressType: IPv4\nports: [{{ name: http, port: {port} }}]\nendpoints:\n- addresses: [\"{ip}\"]\n  conditions: {{ ready: true }}\n",
            port = addr.port(),
            ip = addr.ip(),
        ));
    }
    out
}

/// A ServicePolicy for Service `name`; `spec` is the YAML under `spec:` after `targetRef`.
fn policy(name: &str, spec: &str) -> String {
    let spec: String = spec
        .trim_end()
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    format!(
        "apiVersion: capstan.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {{ name: {name}, namespace: default }}\nspec:\n  targetRef: {{ name: {name} }}\n{spec}"
    )
}

fn cluster_name(service: &str) -> String {
    format!("outbound|80||{service}.default.svc.cluster.local")
}

fn addrs(backends: &[&Backend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr).collect()
}

/// The peers every scenario runs through: capstan-proxy, and stock Envoy when installed
/// (under `CI=true` a missing Envoy panics in `envoy_binary`).
fn peers() -> Vec<Peer> {
    // Debugging aid: SERVICE_POLICY_PEER=envoy runs stock Envoy only.
    if std::env::var("SERVICE_POLICY_PEER").is_ok_and(|p| p == "envoy") {
        return vec![Peer::Envoy];
    }
    let mut peers = vec![Peer::Capstan];
    if process::envoy_binary().is_some() {
        peers.push(Peer::Envoy);
    } else {
        eprintln!("stock Envoy not on PATH: running capstan-proxy only");
    }
    peers
}

// ---------------------------------------------------------------------------------------------
// The control plane and one proxy.

struct Mesh {
    peer: Peer,
    cp: ControlPlane,
    proxy: Envoy,
}

impl Mesh {
    /// Writes `files` into a fresh config directory and starts the control plane and `peer`
    /// on it (state-of-the-world ADS). Does not wait for the proxy.
    fn start(peer: Peer, prefix: &str, files: &[(&str, String)]) -> Self {
        Self::start_with(peer, AdsMode::StateOfTheWorld, prefix, files)
    }

    /// [`Mesh::start`] with the given ADS flavour.
    fn start_with(peer: Peer, mode: AdsMode, prefix: &str, files: &[(&str, String)]) -> Self {
        let work = process::temp_dir(&format!("policy-{prefix}-{}", peer.name()));
        let config = work.join("config");
        std::fs::create_dir_all(&config).expect("mkdir");
        for (name, text) in files {
            write(&config, name, text);
        }
        let cp = process::start_control_plane(&config, &work);
        let node = "sidecar-0.default";
        let proxy = match peer {
            Peer::Capstan => process::start_capstan_proxy(node, "client", cp.xds, mode, &work),
            Peer::Envoy => {
                process::start_envoy(node, "client", cp.xds, mode, &work).expect("envoy present")
            }
        };
        Self { peer, cp, proxy }
    }

    fn name(&self) -> &'static str {
        self.peer.name()
    }

    /// The NACKs the control plane logged (with the proxy's error text).
    fn nacks(&self) -> Vec<String> {
        self.cp
            .proc
            .logs()
            .lines()
            .filter(|l| l.contains("NACK"))
            .map(str::to_string)
            .collect()
    }

    fn logs(&self) -> String {
        format!(
            "--- control plane ---\n{}\n--- {} ---\n{}",
            tail(&self.cp.proc.logs()),
            self.name(),
            tail(&self.proxy.proc.logs())
        )
    }

    /// The proxy's `/clusters` (host health flags), for failure messages.
    async fn clusters(&self) -> String {
        client::get(self.proxy.admin, "admin", "/clusters")
            .await
            .map(|r| r.body)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("health_flags") || l.contains("::rq_total"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Panics with the NACK text if the proxy rejected anything.
    fn fail_on_nack(&self, context: &str) {
        let nacks = self.nacks();
        assert!(
            nacks.is_empty(),
            "{}: {context}: the proxy NACKed the control plane's configuration:\n{}\n{}",
            self.name(),
            nacks.join("\n"),
            self.logs()
        );
    }

    /// Waits until the proxy's admin `/ready` answers `LIVE`; a NACK fails at once.
    async fn wait_live(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.fail_on_nack("waiting for LIVE");
            if self.ready().await.as_deref() == Some("LIVE") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never became LIVE\n{}",
                self.name(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ready(&self) -> Option<String> {
        let r = client::get(self.proxy.admin, "admin", "/ready")
            .await
            .ok()?;
        Some(r.body.trim().to_string())
    }

    /// The proxy's active dynamic cluster `name` from `/config_dump`, once present.
    async fn cluster(&self, service: &str) -> serde_json::Value {
        let name = cluster_name(service);
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.fail_on_nack(&format!("waiting for cluster {name}"));
            if let Some(c) = self.dumped_cluster(&name).await {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "{}: cluster {name} never became active\n{}",
                self.name(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn dumped_cluster(&self, name: &str) -> Option<serde_json::Value> {
        let dump = client::get(self.proxy.admin, "admin", "/config_dump")
            .await
            .ok()?
            .json()?;
        dump.get("configs")?
            .as_array()?
            .iter()
            .filter_map(|c| c.get("dynamic_active_clusters")?.as_array())
            .flatten()
            .filter_map(|c| c.get("cluster"))
            .find(|c| c.get("name").and_then(|n| n.as_str()) == Some(name))
            .cloned()
    }

    /// Asserts that the proxy holds `service`'s cluster with `field` (a JSON pointer into the
    /// cluster) equal to `want` (or present, for `None`), i.e. that it ACKed the policy.
    async fn assert_cluster_field(&self, service: &str, pointer: &str, want: Option<&str>) {
        let cluster = self.cluster(service).await;
        let got = cluster.pointer(pointer);
        let ok = match (got, want) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(w)) => {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                text == w
            }
        };
        assert!(
            ok,
            "{}: cluster {} has {pointer} = {got:?}, expected {want:?}:\n{cluster:#}",
            self.name(),
            cluster_name(service)
        );
    }

    /// A counter or gauge from the proxy's `/stats` (0 when absent).
    async fn stat(&self, name: &str) -> u64 {
        let body = client::get(self.proxy.admin, "admin", "/stats")
            .await
            .map(|r| r.body)
            .unwrap_or_default();
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(": ")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// Asserts the control plane counted no NACK.
    async fn assert_no_nacks(&self) {
        self.fail_on_nack("at the end");
        let metrics = client::get(self.cp.admin, "admin", "/metrics")
            .await
            .expect("metrics")
            .body;
        assert!(
            metrics.contains("capstan_xds_nacks_total 0"),
            "{}: NACKs counted:\n{metrics}\n{}",
            self.name(),
            self.logs()
        );
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

async fn send(host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    client::request(OUTBOUND, "GET", host, path, headers)
        .await
        .unwrap_or_else(|e| panic!("request to {host}{path}: {e}"))
}

/// Which backend answered (the `x-backend` header), or `status:<code>`.
async fn who(host: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let r = send(host, path, headers).await;
    match (r.status, r.header("x-backend")) {
        (200, Some(b)) => b.to_string(),
        (status, _) => format!("status:{status}"),
    }
}

/// The HTTP version the backend saw for one `GET /` to `host`, sent over HTTP/1.1 or (h2c,
/// prior knowledge) HTTP/2 to the outbound listener.
async fn seen_version(host: &str, h2: bool) -> anyhow::Result<String> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(OUTBOUND).await?;
    let io = TokioIo::new(stream);
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        let request = hyper::Request::builder()
            .uri(format!("http://{host}/"))
            .body(Empty::<Bytes>::new())?;
        sender.send_request(request).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let request = hyper::Request::builder()
            .uri("/")
            .header("host", host)
            .body(Empty::<Bytes>::new())?;
        sender.send_request(request).await?
    };
    let status = response.status();
    let version = response
        .headers()
        .get("x-seen-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let _ = response.into_body().collect().await?;
    anyhow::ensure!(status == 200, "status {status}");
    Ok(version)
}

// ---------------------------------------------------------------------------------------------
// loadBalancer

const LB_ROUTE: &str = r#"apiVersion: capstan.dev/v1alpha1
kind: ServiceRoute
metadata: { name: web, namespace: default }
spec:
  parentRefs: [{ name: web }]
  rules:
  - matches: [{ path: { type: PathPrefix, value: /cart } }]
    backendRefs: [{ name: ring, port: 80 }]
  - backendRefs: [{ name: web, port: 80 }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancers_hash_consistently_and_spread() {
    let _port = OutboundPortLock::acquire();
    let web = Backend::start("web").await;
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let three = addrs(&[&a, &b, &c]);
    let files = vec![
        ("web.yaml", service("web", &[web.addr])),
        ("web-route.yaml", LB_ROUTE.to_string()),
        ("ring.yaml", service("ring", &three)),
        (
            "ring-policy.yaml",
            policy(
                "ring",
                "loadBalancer:\n  type: RingHash\n  minimumRingSize: 1024\n  hashPolicies: [{ header: x-user }]",
            ),
        ),
        ("maglev.yaml", service("maglev", &three)),
        (
            "maglev-policy.yaml",
            policy(
                "maglev",
                "loadBalancer:\n  type: Maglev\n  hashPolicies: [{ header: x-user }]",
            ),
        ),
        ("least.yaml", service("least", &three)),
        (
            "least-policy.yaml",
            policy(
                "least",
                "loadBalancer: { type: LeastRequest, choiceCount: 2 }",
            ),
        ),
        ("random.yaml", service("random", &three)),
        (
            "random-policy.yaml",
            policy("random", "loadBalancer: { type: Random }"),
        ),
        ("query.yaml", service("query", &three)),
        (
            "query-policy.yaml",
            policy(
                "query",
                "loadBalancer:\n  type: RingHash\n  hashPolicies: [{ queryParameter: tenant }]",
            ),
        ),
        ("cookie.yaml", service("cookie", &three)),
        (
            "cookie-policy.yaml",
            policy(
                "cookie",
                "loadBalancer:\n  type: Maglev\n  hashPolicies: [{ cookie: { name: session, ttl: 1h, path: / } }]",
            ),
        ),
        ("source.yaml", service("source", &three)),
        (
            "source-policy.yaml",
            policy(
                "source",
                "loadBalancer:\n  type: RingHash\n  hashPolicies: [{ sourceIP: true }]",
            ),
        ),
    ];
    // (peer, host + path) -> key -> backend
    let mut maps: BTreeMap<(&'static str, &'static str), BTreeMap<String, String>> =
        BTreeMap::new();
    for peer in peers() {
        let mesh = Mesh::start(peer, "lb", &files);
        mesh.wait_live().await;
        mesh.assert_cluster_field("ring", "/lb_policy", Some("RING_HASH"))
            .await;
        mesh.assert_cluster_field(
            "ring",
            "/ring_hash_lb_config/minimum_ring_size",
            Some("1024"),
        )
        .await;
        mesh.assert_cluster_field("maglev", "/lb_policy", Some("MAGLEV"))
            .await;
        mesh.assert_cluster_field("least", "/lb_policy", Some("LEAST_REQUEST"))
            .await;
        mesh.assert_cluster_field("random", "/lb_policy", Some("RANDOM"))
            .await;

        // Consistent hashing on a header (directly, and through a ServiceRoute rule to
        // `ring`), a query parameter and a cookie: one key stays on one backend, different keys
        // spread.
        for (host, kind) in [
            ("ring", "header"),
            ("maglev", "header"),
            ("web", "header"),
            ("query", "query"),
            ("cookie", "cookie"),
        ] {
            let mut map = BTreeMap::new();
            for user in 0..24 {
                let key = format!("user-{user}");
                let (path, header) = match kind {
                    "header" if host == "web" => {
                        ("/cart/items".to_string(), ("x-user", key.clone()))
                    }
                    "header" => ("/".to_string(), ("x-user", key.clone())),
                    "query" => (format!("/?tenant={key}"), ("x-other", "1".to_string())),
                    _ => ("/".to_string(), ("cookie", format!("session={key}"))),
                };
                let headers = [(header.0, header.1.as_str())];
                let first = who(host, &path, &headers).await;
                assert!(
                    ["a", "b", "c"].contains(&first.as_str()),
                    "{}: {host}{path} {headers:?}: {first}\n{}",
                    mesh.name(),
                    mesh.logs()
                );
                for _ in 0..4 {
                    let again = who(host, &path, &headers).await;
                    assert_eq!(
                        again,
                        first,
                        "{}: {host}{path} {headers:?} moved from {first} to {again}",
                        mesh.name()
                    );
                }
                map.insert(key, first);
            }
            let used: BTreeSet<&String> = map.values().collect();
            assert!(
                used.len() >= 2,
                "{}: {host}: 24 different {kind} keys all went to {used:?}",
                mesh.name()
            );
            eprintln!(
                "{}: {host} ({kind}): keys spread over {used:?}",
                mesh.name()
            );
            maps.insert((mesh.name(), host), map);
        }
        // Without the cookie the proxy generates one (ttl set) and the request goes where
        // that cookie hashes to.
        for _ in 0..5 {
            let r = send("cookie", "/", &[]).await;
            let set = r.header("set-cookie").unwrap_or_default().to_string();
            let value = set
                .strip_prefix("session=")
                .and_then(|v| v.split(';').next())
                .unwrap_or_else(|| panic!("{}: no session cookie set: {r:?}", mesh.name()))
                .to_string();
            let first = r.header("x-backend").unwrap_or_default().to_string();
            let cookie = format!("session={value}");
            for _ in 0..3 {
                let again = who("cookie", "/", &[("cookie", &cookie)]).await;
                assert_eq!(
                    again,
                    first,
                    "{}: generated {cookie} moved from {first} to {again}",
                    mesh.name()
                );
            }
        }
        // Source IP: every request here comes from 127.0.0.1.
        let first = who("source", "/", &[]).await;
        for _ in 0..10 {
            assert_eq!(who("source", "/", &[]).await, first, "{}", mesh.name());
        }

        // LeastRequest and Random spread 300 sequential requests: each backend gets at least
        // 15 % (expected a third; binomial σ ≈ 2.7 points).
        for host in ["least", "random"] {
            let mut counts: BTreeMap<String, u32> = BTreeMap::new();
            for _ in 0..300 {
                *counts.entry(who(host, "/", &[]).await).or_default() += 1;
            }
            for name in ["a", "b", "c"] {
                let n = counts.get(name).copied().unwrap_or(0);
                assert!(
                    n >= 45,
                    "{}: {host}: {name} got {n}/300: {counts:?}",
                    mesh.name()
                );
            }
            eprintln!("{}: {host}: {counts:?}", mesh.name());
        }
        mesh.assert_no_nacks().await;
    }
    // Where both ran, ring hash and Maglev map every key to the same backend.
    for host in ["ring", "maglev", "web", "query", "cookie"] {
        if let (Some(ours), Some(envoy)) = (
            maps.get(&(Peer::Capstan.name(), host)),
            maps.get(&(Peer::Envoy.name(), host)),
        ) {
            assert_eq!(
                ours, envoy,
                "{host}: capstan-proxy and Envoy hash keys differently"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// healthCheck

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_gates_readiness_and_moves_traffic_off_failing_backends() {
    let _port = OutboundPortLock::acquire();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let c = Backend::start("c").await;
    let files = vec![
        ("hc.yaml", service("hc", &addrs(&[&a, &b, &c]))),
        (
            "hc-policy.yaml",
            policy(
                "hc",
                "healthCheck:\n  interval: 200ms\n  noTrafficInterval: 200ms\n  timeout: 5s\n  unhealthyThreshold: 2\n  healthyThreshold: 1\n  http: { path: /healthz }",
            ),
        ),
    ];
    for peer in peers() {
        for backend in [&a, &b, &c] {
            backend.reset();
        }
        // Every backend holds its first health-check answer; `b` will fail the round. (All
        // are held because, as in Envoy, the round counts completed checks, not hosts: with a
        // 200ms interval the others' second checks would complete the round for a held one.)
        for backend in [&a, &b, &c] {
            backend.s.hold_health.store(true, Ordering::SeqCst);
        }
        b.s.health_failing.store(true, Ordering::SeqCst);
        let mesh = Mesh::start(peer, "hc", &files);
        eventually(
            &format!("{}: the first health checks to arrive", peer.name()),
            PATIENCE,
            || async {
                mesh.fail_on_nack("waiting for the first health check");
                [&a, &b, &c]
                    .iter()
                    .all(|x| x.s.health_hits.load(Ordering::SeqCst) > 0)
                    .then_some(())
            },
        )
        .await;
        // The round is not over while the answers are held: not LIVE.
        for _ in 0..10 {
            if mesh.ready().await.as_deref() == Some("LIVE") {
                panic!(
                    "{}: LIVE before the first health-check round finished (a saw {} checks, none answered)\n{}\n{}",
                    mesh.name(),
                    a.s.health_hits.load(Ordering::SeqCst),
                    mesh.clusters().await,
                    mesh.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for backend in [&a, &b, &c] {
            backend.s.hold_health.store(false, Ordering::SeqCst);
        }
        mesh.wait_live().await;
        // (A cluster waiting for its first round is warming, not active, in /config_dump.)
        mesh.assert_cluster_field(
            "hc",
            "/health_checks/0/http_health_check/path",
            Some("/healthz"),
        )
        .await;

        // b failed the first round: it starts unhealthy and gets nothing.
        for _ in 0..30 {
            let got = who("hc", "/", &[]).await;
            if got != "a" && got != "c" {
                panic!(
                    "{}: request went to {got}, b failed its health check (b saw {} checks)\n{}\n{}",
                    mesh.name(),
                    b.s.health_hits.load(Ordering::SeqCst),
                    mesh.clusters().await,
                    mesh.logs()
                );
            }
        }
        // b recovers: it gets traffic again.
        b.s.health_failing.store(false, Ordering::SeqCst);
        eventually(
            &format!("{}: b back in rotation after recovering", mesh.name()),
            PATIENCE,
            || async { (who("hc", "/", &[]).await == "b").then_some(()) },
        )
        .await;
        // a starts failing its health checks: it leaves the rotation...
        a.s.health_failing.store(true, Ordering::SeqCst);
        eventually(
            &format!("{}: a out of rotation after failing", mesh.name()),
            PATIENCE,
            || async {
                let before = a.hits();
                for _ in 0..30 {
                    let got = who("hc", "/", &[]).await;
                    assert!(got == "a" || got == "b" || got == "c", "{got}");
                }
                (a.hits() == before).then_some(())
            },
        )
        .await;
        // ...and returns once it recovers.
        a.s.health_failing.store(false, Ordering::SeqCst);
        eventually(
            &format!("{}: a back in rotation after recovering", mesh.name()),
            PATIENCE,
            || async { (who("hc", "/", &[]).await == "a").then_some(()) },
        )
        .await;
        let failures = mesh
            .stat(&format!(
                "cluster.{}.health_check.failure",
                cluster_name("hc")
            ))
            .await;
        assert!(
            failures >= 3,
            "{}: health_check.failure = {failures}",
            mesh.name()
        );
        mesh.assert_no_nacks().await;
    }
}

// ---------------------------------------------------------------------------------------------
// outlierDetection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_failing_backends_until_the_ejection_time_passed() {
    let _port = OutboundPortLock::acquire();
    let good = Backend::start("good").await;
    let bad = Backend::start("bad").await;
    let live = Backend::start("live").await;
    // An address nothing listens on: every connection is refused.
    let refusing = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind");
    let files = vec![
        ("od.yaml", service("od", &addrs(&[&good, &bad]))),
        (
            "od-policy.yaml",
            policy(
                "od",
                "outlierDetection:\n  consecutive5xx: 3\n  interval: 200ms\n  baseEjectionTime: 1s\n  maxEjectionPercent: 50",
            ),
        ),
        ("local.yaml", service("local", &[live.addr, refusing])),
        (
            "local-policy.yaml",
            policy(
                "local",
                "outlierDetection:\n  consecutiveLocalOriginFailure: 2\n  interval: 200ms\n  baseEjectionTime: 30s\n  maxEjectionPercent: 50",
            ),
        ),
    ];
    let base_ejection = Duration::from_secs(1);
    for peer in peers() {
        good.reset();
        bad.reset();
        bad.s.status.store(503, Ordering::SeqCst);
        let mesh = Mesh::start(peer, "od", &files);
        mesh.wait_live().await;
        mesh.assert_cluster_field("od", "/outlier_detection/consecutive_5xx", Some("3"))
            .await;

        // Until bad has answered three 5xx in a row it gets its share of the traffic.
        let mut sent = 0;
        while bad.hits() < 3 {
            let r = send("od", "/", &[]).await;
            assert!(r.status == 200 || r.status == 503, "{r:?}");
            sent += 1;
            assert!(
                sent < 100,
                "{}: bad got {} of {sent} requests",
                mesh.name(),
                bad.hits()
            );
        }
        // Its third 5xx ejected it; from now on it would answer 200.
        let ejected_at = Instant::now();
        bad.s.status.store(200, Ordering::SeqCst);
        let mut to_good = 0;
        let returned_after = loop {
            let got = who("od", "/", &[]).await;
            match got.as_str() {
                "good" => to_good += 1,
                "bad" => break ejected_at.elapsed(),
                other => panic!("{}: unexpected answer {other}", mesh.name()),
            }
            assert!(
                ejected_at.elapsed() < PATIENCE,
                "{}: the ejected backend never returned\n{}",
                mesh.name(),
                mesh.logs()
            );
        };
        eprintln!(
            "{}: bad returned after {returned_after:?} ({to_good} requests to good meanwhile)",
            mesh.name()
        );
        assert_eq!(
            bad.hits(),
            4,
            "{}: bad got requests while ejected",
            mesh.name()
        );
        assert!(
            returned_after >= base_ejection - Duration::from_millis(100),
            "{}: bad returned after {returned_after:?}, before the base ejection time",
            mesh.name()
        );
        assert!(
            to_good >= 3,
            "{}: {to_good} requests while ejected",
            mesh.name()
        );
        let prefix = format!("cluster.{}.outlier_detection", cluster_name("od"));
        let enforced = mesh
            .stat(&format!("{prefix}.ejections_enforced_consecutive_5xx"))
            .await;
        assert_eq!(
            enforced,
            1,
            "{}: ejections_enforced_consecutive_5xx",
            mesh.name()
        );

        // consecutiveLocalOriginFailure: a backend that refuses connections is ejected after
        // two refusals, and every later request succeeds on the live one.
        let mut failed = 0;
        for _ in 0..4 {
            if who("local", "/", &[]).await != "live" {
                failed += 1;
            }
        }
        assert!(
            (1..=2).contains(&failed),
            "{}: {failed} of 4 requests failed before the ejection",
            mesh.name()
        );
        for _ in 0..30 {
            assert_eq!(
                who("local", "/", &[]).await,
                "live",
                "{}: the refusing backend is still in rotation",
                mesh.name()
            );
        }
        let stat = format!(
            "cluster.{}.outlier_detection.ejections_enforced_consecutive_local_origin_failure",
            cluster_name("local")
        );
        assert_eq!(mesh.stat(&stat).await, 1, "{}: {stat}", mesh.name());
        mesh.assert_no_nacks().await;
    }
}

// ---------------------------------------------------------------------------------------------
// circuitBreakers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breakers_overflow_with_503_x_envoy_overloaded() {
    let _port = OutboundPortLock::acquire();
    let slow_requests = Backend::start("slow-requests").await;
    let slow_pending = Backend::start("slow-pending").await;
    let files = vec![
        ("cbreq.yaml", service("cbreq", &[slow_requests.addr])),
        (
            "cbreq-policy.yaml",
            policy("cbreq", "circuitBreakers: { maxRequests: 1 }"),
        ),
        ("cbpend.yaml", service("cbpend", &[slow_pending.addr])),
        (
            "cbpend-policy.yaml",
            policy(
                "cbpend",
                "circuitBreakers: { maxConnections: 1, maxPendingRequests: 1 }",
            ),
        ),
    ];
    for peer in peers() {
        slow_requests.reset();
        slow_pending.reset();
        let mesh = Mesh::start(peer, "cb", &files);
        mesh.wait_live().await;
        let thresholds = "/circuit_breakers/thresholds/0";
        mesh.assert_cluster_field("cbreq", &format!("{thresholds}/max_requests"), Some("1"))
            .await;
        mesh.assert_cluster_field(
            "cbpend",
            &format!("{thresholds}/max_pending_requests"),
            Some("1"),
        )
        .await;
        mesh.assert_cluster_field(
            "cbpend",
            &format!("{thresholds}/max_connections"),
            Some("1"),
        )
        .await;

        // maxRequests 1: with one request in flight, every concurrent one overflows.
        let (first, others) = overload(&mesh, "cbreq", &slow_requests).await;
        assert_eq!(first.status, 200, "{}: {first:?}", mesh.name());
        for r in &others {
            assert_overflow(&mesh, r);
        }
        assert_eq!(
            slow_requests.hits(),
            2,
            "{}: overflowed requests reached the backend",
            mesh.name()
        );
        // Envoy 1.38+ counts max_requests refusals as active, not pending, overflows.
        let stat = format!(
            "cluster.{}.upstream_rq_active_overflow",
            cluster_name("cbreq")
        );
        assert_eq!(mesh.stat(&stat).await, 3, "{}: {stat}", mesh.name());

        // maxConnections 1, maxPendingRequests 1: with the one connection busy, one
        // concurrent request waits (and succeeds once the connection is free), the others
        // overflow.
        let (first, others) = overload(&mesh, "cbpend", &slow_pending).await;
        assert_eq!(first.status, 200, "{}: {first:?}", mesh.name());
        let waited = others.iter().filter(|r| r.status == 200).count();
        assert_eq!(waited, 1, "{}: {others:?}", mesh.name());
        for r in others.iter().filter(|r| r.status != 200) {
            assert_overflow(&mesh, r);
        }
        assert_eq!(slow_pending.hits(), 3, "{}", mesh.name());
        let stat = format!(
            "cluster.{}.upstream_rq_pending_overflow",
            cluster_name("cbpend")
        );
        assert_eq!(mesh.stat(&stat).await, 2, "{}: {stat}", mesh.name());

        // With nothing in flight the breakers let requests through again.
        slow_requests.s.delay_ms.store(0, Ordering::SeqCst);
        slow_pending.s.delay_ms.store(0, Ordering::SeqCst);
        assert_eq!(
            who("cbreq", "/", &[]).await,
            "slow-requests",
            "{}",
            mesh.name()
        );
        assert_eq!(
            who("cbpend", "/", &[]).await,
            "slow-pending",
            "{}",
            mesh.name()
        );
        mesh.assert_no_nacks().await;
    }
}

/// Warms up `host`'s connection, makes `backend` slow, then sends one request and — while it
/// is in flight — three concurrent ones. Returns the first reply and the three others.
async fn overload(mesh: &Mesh, host: &'static str, backend: &Backend) -> (Reply, Vec<Reply>) {
    assert_eq!(who(host, "/", &[]).await, backend.name, "{}", mesh.name());
    backend.s.delay_ms.store(1_500, Ordering::SeqCst);
    let first = tokio::spawn(async move { send(host, "/", &[]).await });
    eventually("the slow request in flight", PATIENCE, || async {
        (backend.s.in_flight.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let concurrent: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { send(host, "/", &[]).await }))
        .collect();
    let mut others = Vec::new();
    for task in concurrent {
        others.push(task.await.expect("task"));
    }
    (first.await.expect("task"), others)
}

/// Envoy's overflow answer: 503 with `x-envoy-overloaded: true`.
fn assert_overflow(mesh: &Mesh, r: &Reply) {
    assert_eq!(r.status, 503, "{}: {r:?}", mesh.name());
    assert_eq!(
        r.header("x-envoy-overloaded"),
        Some("true"),
        "{}: {r:?}",
        mesh.name()
    );
}

// ---------------------------------------------------------------------------------------------
// connectionPool

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_pool_limits_requests_age_and_idle_time_of_upstream_connections() {
    let _port = OutboundPortLock::acquire();
    let once = Backend::start("once").await;
    let idle = Backend::start("idle").await;
    let aging = Backend::start("aging").await;
    let files = vec![
        ("once.yaml", service("once", &[once.addr])),
        (
            "once-policy.yaml",
            policy("once", "connectionPool: { maxRequestsPerConnection: 1 }"),
        ),
        ("idle.yaml", service("idle", &[idle.addr])),
        (
            "idle-policy.yaml",
            policy("idle", "connectionPool: { idleTimeout: 1s }"),
        ),
        ("aging.yaml", service("aging", &[aging.addr])),
        (
            "aging-policy.yaml",
            policy("aging", "connectionPool: { maxConnectionDuration: 1s }"),
        ),
    ];
    for peer in peers() {
        once.reset();
        idle.reset();
        aging.reset();
        let mesh = Mesh::start(peer, "pool", &files);
        mesh.wait_live().await;
        let options = "/typed_extension_protocol_options/envoy.extensions.upstreams.http.v3.HttpProtocolOptions/common_http_protocol_options";
        mesh.assert_cluster_field(
            "once",
            &format!("{options}/max_requests_per_connection"),
            Some("1"),
        )
        .await;
        mesh.assert_cluster_field("idle", &format!("{options}/idle_timeout"), Some("1s"))
            .await;

        // One request per upstream connection.
        for i in 1..=5u64 {
            assert_eq!(who("once", "/", &[]).await, "once", "{}", mesh.name());
            assert_eq!(
                once.s.connections.load(Ordering::SeqCst),
                i,
                "{}: request {i} did not get a new upstream connection",
                mesh.name()
            );
        }
        eventually(
            &format!("{}: the used-up connections closed", mesh.name()),
            PATIENCE,
            || async { (once.s.open.load(Ordering::SeqCst) == 0).then_some(()) },
        )
        .await;
        let max_requests = mesh
            .stat(&format!(
                "cluster.{}.upstream_cx_max_requests",
                cluster_name("once")
            ))
            .await;
        assert_eq!(max_requests, 5, "{}: upstream_cx_max_requests", mesh.name());

        // Idle timeout: requests share a connection, which closes once idle for 1s.
        // (`last_request` is taken before the last request is sent: the connection cannot have
        // gone idle earlier.)
        let mut last_request = Instant::now();
        for _ in 0..3 {
            last_request = Instant::now();
            assert_eq!(who("idle", "/", &[]).await, "idle", "{}", mesh.name());
        }
        assert_eq!(
            idle.s.connections.load(Ordering::SeqCst),
            1,
            "{}: sequential requests did not reuse the upstream connection",
            mesh.name()
        );
        eventually(
            &format!("{}: the idle connection closed", mesh.name()),
            PATIENCE,
            || async { (idle.s.open.load(Ordering::SeqCst) == 0).then_some(()) },
        )
        .await;
        let closed_after = idle
            .s
            .last_closed
            .lock()
            .expect("lock")
            .map(|t| t.duration_since(last_request))
            .unwrap_or_default();
        eprintln!(
            "{}: idle connection closed after {closed_after:?}",
            mesh.name()
        );
        assert!(
            closed_after >= Duration::from_millis(950),
            "{}: idle connection closed after {closed_after:?}, before idleTimeout 1s",
            mesh.name()
        );
        let idle_closed = mesh
            .stat(&format!(
                "cluster.{}.upstream_cx_idle_timeout",
                cluster_name("idle")
            ))
            .await;
        assert_eq!(idle_closed, 1, "{}: upstream_cx_idle_timeout", mesh.name());
        assert_eq!(who("idle", "/", &[]).await, "idle", "{}", mesh.name());
        assert_eq!(
            idle.s.connections.load(Ordering::SeqCst),
            2,
            "{}",
            mesh.name()
        );

        // maxConnectionDuration: a connection in steady use is replaced once it is 1s old.
        let started = Instant::now();
        while aging.s.connections.load(Ordering::SeqCst) < 2 {
            assert_eq!(who("aging", "/", &[]).await, "aging", "{}", mesh.name());
            assert!(
                started.elapsed() < PATIENCE,
                "{}: the first connection was never closed",
                mesh.name()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let replaced_after = started.elapsed();
        eprintln!(
            "{}: aged connection replaced after {replaced_after:?}",
            mesh.name()
        );
        assert!(
            replaced_after >= Duration::from_millis(950),
            "{}: connection replaced after {replaced_after:?}, before maxConnectionDuration 1s",
            mesh.name()
        );
        let aged = mesh
            .stat(&format!(
                "cluster.{}.upstream_cx_max_duration_reached",
                cluster_name("aging")
            ))
            .await;
        assert_eq!(aged, 1, "{}: upstream_cx_max_duration_reached", mesh.name());
        mesh.assert_no_nacks().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Every field at once

/// Every ServicePolicy field not exercised above, with values a user would write.
const EVERY_FIELD: &str = r#"loadBalancer:
  type: RingHash
  minimumRingSize: 64
  hashPolicies:
  - header: x-user
  - cookie: { name: session, ttl: 1h, path: / }
  - sourceIP: true
    terminal: true
  - queryParameter: tenant
connectTimeout: 250ms
healthCheck:
  interval: 1s
  timeout: 500ms
  jitter: 100ms
  unhealthyThreshold: 2
  healthyThreshold: 2
  noTrafficInterval: 5s
  http: { path: /healthz, host: health.local, expectedStatuses: [200, 204] }
outlierDetection:
  consecutive5xx: 3
  consecutiveGatewayFailure: 2
  consecutiveLocalOriginFailure: 4
  interval: 5s
  baseEjectionTime: 30s
  maxEjectionPercent: 50
  successRateStdevFactor: 1900
  successRateRequestVolume: 50
  successRateMinimumHosts: 3
  splitExternalLocalOriginErrors: true
circuitBreakers: { maxConnections: 100, maxPendingRequests: 50, maxRequests: 200, maxRetries: 5 }
connectionPool:
  idleTimeout: 30s
  maxRequestsPerConnection: 100
  maxConnectionDuration: 10m
  protocol: HTTP2
  tcpKeepalive: { probes: 3, time: 60s, interval: 10s }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_field_is_accepted_and_takes_effect() {
    let _port = OutboundPortLock::acquire();
    let all = Backend::start("all").await;
    let other = Backend::start("other").await;
    let files = vec![
        ("all.yaml", service("all", &[all.addr])),
        ("all-policy.yaml", policy("all", EVERY_FIELD)),
        ("tcphc.yaml", service("tcphc", &[other.addr])),
        (
            "tcphc-policy.yaml",
            policy(
                "tcphc",
                "healthCheck:\n  timeout: 500ms\n  tcp: { send: \"GET /healthz HTTP/1.0\\r\\n\\r\\n\", receive: \"HTTP/1.1 200\" }",
            ),
        ),
        ("grpchc.yaml", service("grpchc", &[other.addr])),
        (
            "grpchc-policy.yaml",
            policy(
                "grpchc",
                "healthCheck:\n  timeout: 500ms\n  grpc: { serviceName: shop.v1.Cart }",
            ),
        ),
        ("downstream.yaml", service("downstream", &[other.addr])),
        (
            "downstream-policy.yaml",
            policy(
                "downstream",
                "connectionPool: { protocol: UseDownstream, idleTimeout: 5m }",
            ),
        ),
        ("plain-tls.yaml", service("plain-tls", &[other.addr])),
        (
            "plain-tls-policy.yaml",
            policy("plain-tls", "tls: { mode: Simple }"),
        ),
    ];
    let runs = peers()
        .into_iter()
        .flat_map(|p| [(p, AdsMode::StateOfTheWorld), (p, AdsMode::Delta)]);
    for (peer, mode) in runs {
        eprintln!("{}: {mode:?} ADS", peer.name());
        all.reset();
        other.reset();
        let mesh = Mesh::start_with(peer, mode, "all", &files);
        mesh.wait_live().await;
        for svc in ["all", "tcphc", "grpchc", "downstream", "plain-tls"] {
            mesh.cluster(svc).await;
        }
        mesh.assert_cluster_field("all", "/connect_timeout", Some("0.250s"))
            .await;
        mesh.assert_cluster_field(
            "all",
            "/health_checks/0/http_health_check/host",
            Some("health.local"),
        )
        .await;
        mesh.assert_cluster_field(
            "all",
            "/outlier_detection/split_external_local_origin_errors",
            Some("true"),
        )
        .await;
        mesh.assert_cluster_field(
            "all",
            "/upstream_connection_options/tcp_keepalive/keepalive_probes",
            Some("3"),
        )
        .await;
        // UseDownstream: the upstream protocol follows the client's.
        for (h2, want) in [(false, "HTTP/1.1"), (true, "HTTP/2.0")] {
            let got = seen_version("downstream", h2)
                .await
                .unwrap_or_else(|e| panic!("{}: downstream h2={h2}: {e}", mesh.name()));
            assert_eq!(got, want, "{}: UseDownstream, h2 client {h2}", mesh.name());
        }
        // HTTP/2 to the backend (prior knowledge), and a generated hash cookie with its ttl.
        let r = send("all", "/", &[]).await;
        assert_eq!(r.status, 200, "{}: {r:?}\n{}", mesh.name(), mesh.logs());
        assert_eq!(
            r.header("x-seen-version"),
            Some("HTTP/2.0"),
            "{}: {r:?}",
            mesh.name()
        );
        let cookie = r.header("set-cookie").unwrap_or_default();
        assert!(
            cookie.starts_with("session=") && cookie.contains("Max-Age=3600"),
            "{}: set-cookie {cookie:?}",
            mesh.name()
        );
        // The health checks ran with the configured Host.
        assert_eq!(
            all.s.health_host.lock().expect("lock").as_deref(),
            Some("health.local"),
            "{}: health-check authority",
            mesh.name()
        );
        assert!(
            all.s.health_hits.load(Ordering::SeqCst) >= 1,
            "{}",
            mesh.name()
        );
        mesh.assert_no_nacks().await;
    }
}

// ---------------------------------------------------------------------------------------------
// tls

/// Names the backends' certificate carries (the Services' DNS names, sent as SNI by default).
const TLS_SERVICES: [&str; 4] = ["simple", "mutual", "wrongsan", "sds"];

/// A CA, one server certificate for every TLS Service's DNS name, and client certificates.
fn pki() -> Pki {
    let names: Vec<String> = TLS_SERVICES
        .iter()
        .map(|s| format!("{s}.default.svc.cluster.local"))
        .collect();
    capstan_e2e::pki::pki_for(&names)
}

/// A rustls HTTP/1.1 backend: answers `tls client=<CN-less marker>` — `client=yes` when the
/// proxy presented a certificate issued by the CA, `client=none` otherwise — and closes.
/// With `require_client` a handshake without a client certificate fails. Returns the address
/// and the number of HTTP requests answered.
async fn start_tls_backend(pki: &Pki, require_client: bool) -> (SocketAddr, Arc<AtomicU64>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("add root");
    }
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let verifier = if require_client {
        builder.build()
    } else {
        builder.allow_unauthenticated().build()
    }
    .expect("verifier");
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.server.0.as_bytes())
            .collect::<Result<_, _>>()
            .expect("server chain");
    let key = PrivateKeyDer::from_pem_slice(pki.server.1.as_bytes()).expect("server key");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answered = Arc::new(AtomicU64::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client = if tls.get_ref().1.peer_certificates().is_some() {
                    "yes"
                } else {
                    "none"
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, Ordering::SeqCst);
                let body = format!("tls client={client}");
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, answered)
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_simple_and_mutual_from_files_and_from_secrets_over_sds() {
    let _port = OutboundPortLock::acquire();
    let pki = pki();
    let (server_only, server_only_answers) = start_tls_backend(&pki, false).await;
    let (mtls, _) = start_tls_backend(&pki, true).await;
    let files_dir = process::temp_dir("policy-tls-files");
    let ca = files_dir.join("ca.pem");
    let chain = files_dir.join("client.pem");
    let key = files_dir.join("client-key.pem");
    std::fs::write(&ca, &pki.ca_pem).expect("write ca");
    std::fs::write(&chain, &pki.clients[0].0).expect("write chain");
    std::fs::write(&key, &pki.clients[0].1).expect("write key");
    let p = |p: &Path| p.display().to_string();
    let files = vec![
        ("simple.yaml", service("simple", &[server_only])),
        (
            "simple-policy.yaml",
            policy(
                "simple",
                &format!(
                    "tls:\n  mode: Simple\n  caCertificateFile: {}\n  subjectAltNames: [simple.default.svc.cluster.local]",
                    p(&ca)
                ),
            ),
        ),
        ("mutual.yaml", service("mutual", &[mtls])),
        (
            "mutual-policy.yaml",
            policy(
                "mutual",
                &format!(
                    "tls:\n  mode: Mutual\n  caCertificateFile: {}\n  certificateChainFile: {}\n  privateKeyFile: {}\n  subjectAltNames: [mutual.default.svc.cluster.local]",
                    p(&ca),
                    p(&chain),
                    p(&key)
                ),
            ),
        ),
        ("wrongsan.yaml", service("wrongsan", &[server_only])),
        (
            "wrongsan-policy.yaml",
            policy(
                "wrongsan",
                &format!(
                    "tls:\n  mode: Simple\n  caCertificateFile: {}\n  subjectAltNames: [someone-else.example]",
                    p(&ca)
                ),
            ),
        ),
        ("sds.yaml", service("sds", &[mtls])),
        (
            "sds-policy.yaml",
            policy(
                "sds",
                "tls:\n  mode: Mutual\n  subjectAltNames: [sds.default.svc.cluster.local]\n  caCertificateSecret: { name: mesh-ca }\n  clientCertificateSecret: { name: client-cert }",
            ),
        ),
        (
            "secret-ca.yaml",
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{ name: mesh-ca, namespace: default }}\nstringData:\n  ca.crt: |\n{}",
                indent(&pki.ca_pem)
            ),
        ),
        (
            "secret-client.yaml",
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{ name: client-cert, namespace: default }}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
                indent(&pki.clients[0].0),
                indent(&pki.clients[0].1)
            ),
        ),
    ];
    for peer in peers() {
        let mesh = Mesh::start(peer, "tls", &files);
        mesh.wait_live().await;
        let tls = "/transport_socket/typed_config";
        mesh.assert_cluster_field(
            "simple",
            &format!("{tls}/sni"),
            Some("simple.default.svc.cluster.local"),
        )
        .await;
        mesh.assert_cluster_field(
            "mutual",
            &format!("{tls}/common_tls_context/tls_certificates/0/private_key"),
            None,
        )
        .await;
        mesh.assert_cluster_field(
            "sds",
            &format!("{tls}/common_tls_context/tls_certificate_sds_secret_configs/0/name"),
            Some("kubernetes://default/client-cert"),
        )
        .await;

        // Simple: the backend's certificate verified, no client certificate.
        let r = send("simple", "/", &[]).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "tls client=none"),
            "{}: Simple TLS\n{}",
            mesh.name(),
            mesh.logs()
        );
        // Mutual from files, and Mutual from Secrets over SDS: the backend requires the
        // client certificate. (SDS secrets may arrive a moment after LIVE on some proxies:
        // poll.)
        for svc in ["mutual", "sds"] {
            let body = eventually(
                &format!("{}: {svc}: a request over mTLS", mesh.name()),
                PATIENCE,
                || async {
                    let r = send(svc, "/", &[]).await;
                    (r.status == 200).then_some(r.body)
                },
            )
            .await;
            assert_eq!(body, "tls client=yes", "{}: {svc}", mesh.name());
        }
        // A certificate without the required SAN: fails closed, nothing reaches the backend.
        let answered = server_only_answers.load(Ordering::SeqCst);
        for _ in 0..3 {
            let r = send("wrongsan", "/", &[]).await;
            assert_eq!(r.status, 503, "{}: SAN mismatch: {r:?}", mesh.name());
        }
        assert_eq!(
            server_only_answers.load(Ordering::SeqCst),
            answered,
            "{}: a request reached a backend whose SAN does not match",
            mesh.name()
        );
        let handshake_errors = mesh
            .stat(&format!(
                "cluster.{}.ssl.fail_verify_san",
                cluster_name("wrongsan")
            ))
            .await;
        assert!(
            handshake_errors >= 1,
            "{}: ssl.fail_verify_san = {handshake_errors}",
            mesh.name()
        );
        mesh.assert_no_nacks().await;
    }
}
