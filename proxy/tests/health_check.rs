//! Active health checking against real upstreams that fail on command: an HTTP server whose
//! health endpoint answers 200 or 503 (or slowly) on a switch, a server that accepts and never
//! answers, a refused port, a TCP server with send/receive payloads and a real tonic gRPC
//! health server. Hosts leave and rejoin the rotation as Envoy's state machine says, the
//! first round holds initialization, and the stats count what happened.

mod support;

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An HTTP backend whose `/healthz` answers with a switchable status (after an optional
/// delay); every other path answers 200 with `x-backend: <name>` and the name as body.
struct HealthyBackend {
    name: String,
    address: SocketAddr,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    hits: Arc<AtomicUsize>,
    /// Connections that carried a health check.
    health_connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HealthyBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HealthyBackend {
    async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let hits = Arc::new(AtomicUsize::new(0));
        let health_connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (n, st, d, h, c, s) = (
            name.to_string(),
            status.clone(),
            delay_ms.clone(),
            hits.clone(),
            health_connections.clone(),
            seen.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (n, st, d, h, s) = (n.clone(), st.clone(), d.clone(), h.clone(), s.clone());
                let (c, counted) = (c.clone(), Arc::new(AtomicBool::new(false)));
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (n, st, d, h, s) =
                            (n.clone(), st.clone(), d.clone(), h.clone(), s.clone());
                        let (c, counted) = (c.clone(), counted.clone());
                        async move {
                            if req.uri().path() != "/healthz" {
                                return Ok::<_, Infallible>(
                                    Response::builder()
                                        .header("x-backend", n.as_str())
                                        .body(Full::new(Bytes::from(n)))
                                        .expect("response"),
                                );
                            }
                            let header = |k: &str| {
                                req.headers()
                                    .get(k)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            if !counted.swap(true, Ordering::SeqCst) {
                                c.fetch_add(1, Ordering::SeqCst);
                            }
                            s.lock()
                                .expect("lock")
                                .push((header("host"), header("user-agent")));
                            let delay = d.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            h.fetch_add(1, Ordering::SeqCst);
                            let code = st.load(Ordering::SeqCst);
                            Ok(Response::builder()
                                .status(code)
                                .body(Full::new(Bytes::new()))
                                .expect("response"))
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            name: name.to_string(),
            address,
            status,
            delay_ms,
            hits,
            health_connections,
            seen,
            task,
        }
    }

    fn port(&self) -> u16 {
        self.address.port()
    }

    fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Accepts connections and never answers (health checks time out).
async fn black_hole() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (port, task)
}

fn routes(cluster: &str) -> String {
    format!(
        r#"
virtual_hosts:
- {{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: {cluster} }} }}] }}
"#
    )
}

/// `health_flags` of each host of `cluster` in `/clusters`, by port.
async fn health_flags(proxy: &Proxy, cluster: &str) -> Vec<(u16, String)> {
    let text = proxy.admin_get("/clusters").await.text();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.split("::");
        let (Some(c), Some(host), Some(key), Some(value)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if c == cluster && key == "health_flags" {
            let port = host
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            out.push((port, value.to_string()));
        }
    }
    out.sort();
    out
}

async fn flags_of(proxy: &Proxy, cluster: &str, port: u16) -> String {
    health_flags(proxy, cluster)
        .await
        .into_iter()
        .find(|(p, _)| *p == port)
        .map(|(_, f)| f)
        .unwrap_or_default()
}

async fn stat(proxy: &Proxy, name: &str) -> Option<i64> {
    let text = proxy
        .admin_get(&format!("/stats?filter=^{}$", name.replace('.', "\\.")))
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Which backends answered `n` requests.
async fn backends_seen(port: u16, n: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..n {
        let r = get(port, "x", "/").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        seen.insert(r.header("x-backend").unwrap_or_default());
    }
    seen
}

/// Whether 12 requests eventually (within 5 s) reach exactly `want`.
async fn routes_to(port: u16, want: &HashSet<String>) -> bool {
    let mut last = HashSet::new();
    let ok = eventually(Duration::from_secs(5), async || {
        last = backends_seen(port, 12).await;
        last == *want
    })
    .await;
    if !ok {
        eprintln!("routed to {last:?}, expected {want:?}");
    }
    ok
}

fn set(names: &[&str]) -> HashSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn an_http_host_failing_its_check_leaves_the_rotation_and_returns() {
    let a = HealthyBackend::start("a").await;
    let b = HealthyBackend::start("b").await;
    let c = HealthyBackend::start("c").await;
    let port = free_port();
    let hc = "    health_checks:\n    - { timeout: 1s, interval: 0.1s, no_traffic_interval: 0.1s, unhealthy_threshold: 3, healthy_threshold: 2, http_health_check: { path: /healthz } }\n";
    let cluster = static_cluster("web", &[a.port(), b.port(), c.port()], hc);
    let proxy = Proxy::start(&bootstrap(&[cluster], port, &routes("web")), &[]);
    proxy.wait_live().await;
    assert_eq!(backends_seen(port, 12).await, set(&["a", "b", "c"]));
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.healthy").await,
        Some(3)
    );

    // 503 is not an expected status: Envoy ejects at once, whatever unhealthy_threshold says.
    b.set_status(503);
    let out = eventually(Duration::from_secs(10), async || {
        flags_of(&proxy, "web", b.port()).await == "/failed_active_hc"
    })
    .await;
    assert!(
        out,
        "b never failed: {:?}",
        health_flags(&proxy, "web").await
    );
    // The load balancer follows within Envoy's update_merge_window (1 s).
    assert!(routes_to(port, &set(&["a", "c"])).await);
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.healthy").await,
        Some(2)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.membership_healthy").await,
        Some(2)
    );

    // Back after healthy_threshold (2) successes.
    let before = b.hits();
    b.set_status(200);
    let back = eventually(Duration::from_secs(10), async || {
        flags_of(&proxy, "web", b.port()).await == "healthy"
    })
    .await;
    assert!(back, "b never returned");
    assert!(
        b.hits() >= before + 2,
        "back after {} checks, healthy_threshold is 2",
        b.hits() - before
    );
    assert!(routes_to(port, &set(&["a", "b", "c"])).await);

    // Every check went as Envoy/HC to the cluster's name, over one reused connection.
    let seen = b.seen.lock().expect("lock").clone();
    assert!(
        seen.iter()
            .all(|(host, ua)| host == "web" && ua == "Envoy/HC"),
        "{seen:?}"
    );
    let attempts = stat(&proxy, "cluster.web.health_check.attempt")
        .await
        .unwrap_or(0);
    let successes = stat(&proxy, "cluster.web.health_check.success")
        .await
        .unwrap_or(0);
    let failures = stat(&proxy, "cluster.web.health_check.failure")
        .await
        .unwrap_or(0);
    assert!(failures >= 1, "failure {failures}");
    assert!(successes >= 6, "success {successes}");
    assert!(attempts >= successes + failures, "attempt {attempts}");
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.network_failure").await,
        Some(0)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.passive_failure").await,
        Some(0)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.verify_cluster").await,
        Some(0)
    );
    let checked = eventually(Duration::from_secs(10), async || c.hits() >= 5).await;
    assert!(checked, "c was checked {} times", c.hits());
    assert_eq!(
        c.health_connections.load(Ordering::SeqCst),
        1,
        "reuse_connection: every check of c went over one connection"
    );
    assert_eq!(a.name, "a");
}

#[tokio::test]
async fn retriable_statuses_and_network_failures_count_to_the_thresholds() {
    let a = HealthyBackend::start("a").await;
    let b = HealthyBackend::start("b").await;
    let port = free_port();
    let hc = "    health_checks:\n    - { timeout: 1s, interval: 0.2s, no_traffic_interval: 0.2s, unhealthy_threshold: 3, healthy_threshold: 3, http_health_check: { path: /healthz, retriable_statuses: [{ start: 500, end: 600 }] } }\n";
    let cluster = static_cluster("web", &[a.port(), b.port()], hc);
    let proxy = Proxy::start(&bootstrap(&[cluster], port, &routes("web")), &[]);
    proxy.wait_live().await;

    let before = b.hits();
    b.set_status(503);
    let out = eventually(Duration::from_secs(10), async || {
        flags_of(&proxy, "web", b.port()).await == "/failed_active_hc"
    })
    .await;
    assert!(out, "b never failed");
    // Read after the flag: the third failure was answered before the host was ejected.
    let failed_after = b.hits() - before;
    assert!(
        failed_after >= 3,
        "ejected after {failed_after} retriable failures"
    );

    let before = b.hits();
    b.set_status(200);
    let back = eventually(Duration::from_secs(10), async || {
        flags_of(&proxy, "web", b.port()).await == "healthy"
    })
    .await;
    assert!(back, "b never returned");
    assert!(b.hits() - before >= 3, "healthy_threshold is 3");
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.network_failure").await,
        Some(0),
        "503 is an active failure"
    );
}

#[tokio::test]
async fn the_first_round_holds_initialization_and_failed_hosts_never_get_traffic() {
    let slow = HealthyBackend::start("slow").await;
    slow.delay_ms.store(1200, Ordering::SeqCst);
    let a2 = HealthyBackend::start("a2").await;
    let a3 = HealthyBackend::start("a3").await;
    let bad = HealthyBackend::start("bad").await;
    bad.set_status(503);
    let refused = free_port();
    let (hole, _hole_task) = black_hole().await;
    let port = free_port();
    // The long intervals make the first round the only one during this test.
    let hc = "    health_checks:\n    - { timeout: 2s, interval: 30s, unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: { path: /healthz } }\n";
    let cluster = static_cluster(
        "web",
        &[slow.port(), a2.port(), a3.port(), bad.port(), refused, hole],
        hc,
    );
    let started = Instant::now();
    let proxy = Proxy::start(&bootstrap(&[cluster], port, &routes("web")), &[]);
    let up = eventually(Duration::from_secs(5), async || {
        proxy.ready().await.is_some()
    })
    .await;
    assert!(up, "admin did not come up; stderr:\n{}", proxy.stderr());
    let (status, state) = proxy.ready().await.expect("ready answers");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(state, "PRE_INITIALIZING");
    assert!(!accepts(port).await, "the listener accepted before LIVE");
    let init = proxy.admin_get("/init_dump").await.text();
    assert!(init.contains("cluster web health check round"), "{init}");

    proxy.wait_live().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900),
        "LIVE after {waited:?}: before the black hole's check timed out (2s)"
    );
    assert!(slow.hits() >= 1, "the slow host's check completed");

    // Nothing routes to the hosts that failed the round; the first success made the others
    // healthy at once (healthy_threshold does not apply to a host's first check).
    assert_eq!(backends_seen(port, 30).await, set(&["slow", "a2", "a3"]));
    let flags = health_flags(&proxy, "web").await;
    for (p, f) in &flags {
        let expected = if [bad.port(), refused, hole].contains(p) {
            "/failed_active_hc"
        } else {
            "healthy"
        };
        assert_eq!(f, expected, "port {p}: {flags:?}");
    }
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.healthy").await,
        Some(3)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.attempt").await,
        Some(6)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.success").await,
        Some(3)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.failure").await,
        Some(3)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.network_failure").await,
        Some(2),
        "refused and timed out"
    );
}

#[tokio::test]
async fn without_traffic_checks_wait_for_no_traffic_interval() {
    let a = HealthyBackend::start("a").await;
    let port = free_port();
    let hc = "    health_checks:\n    - { timeout: 1s, interval: 0.05s, unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: { path: /healthz } }\n";
    let proxy = Proxy::start(
        &bootstrap(
            &[static_cluster("web", &[a.port()], hc)],
            port,
            &routes("web"),
        ),
        &[],
    );
    proxy.wait_live().await;
    // no_traffic_interval defaults to 60 s: with interval 50 ms, a second check within a
    // second would mean it was ignored.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a.hits(), 1, "checked again before no_traffic_interval");
}

/// A line server: answers `PING` with `PONG` while healthy (and stays silent otherwise);
/// answers `WHO` with its name. Counts connections that started with `PING`.
struct PingServer {
    port: u16,
    healthy: Arc<AtomicU16>,
    health_connections: Arc<AtomicUsize>,
    pings: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PingServer {
    async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let healthy = Arc::new(AtomicU16::new(1));
        let health_connections = Arc::new(AtomicUsize::new(0));
        let pings = Arc::new(AtomicUsize::new(0));
        let (h, hc, p) = (healthy.clone(), health_connections.clone(), pings.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (h, hc, p) = (h.clone(), hc.clone(), p.clone());
                tokio::spawn(async move {
                    let mut first = true;
                    let mut buf = [0u8; 64];
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let got = &buf[..n];
                        if got.starts_with(b"PING") {
                            if first {
                                hc.fetch_add(1, Ordering::SeqCst);
                            }
                            p.fetch_add(1, Ordering::SeqCst);
                            if h.load(Ordering::SeqCst) == 1 && s.write_all(b"..PO").await.is_err()
                            {
                                return;
                            }
                            if h.load(Ordering::SeqCst) == 1 && s.write_all(b"NG\n").await.is_err()
                            {
                                return;
                            }
                        } else if got.starts_with(b"WHO")
                            && s.write_all(name.as_bytes()).await.is_err()
                        {
                            return;
                        }
                        first = false;
                    }
                });
            }
        });
        Self {
            port,
            healthy,
            health_connections,
            pings,
            task,
        }
    }
}

fn tcp_bootstrap(cluster: &str, listener_port: u16) -> String {
    format!(
        r#"node: {{ id: test-0.default, cluster: test }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: ADMIN_PORT }} }} }}
static_resources:
  clusters:
{cluster}  listeners:
  - name: tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener_port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: pinged
"#
    )
}

async fn who(port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(b"WHO").await.expect("write");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("answer in time")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn tcp_checks_send_and_match_payloads_over_one_connection() {
    let a = PingServer::start("a").await;
    let b = PingServer::start("b").await;
    let port = free_port();
    // send "PING" as hex text, expect "PO" then "NG" (split over two writes) as hex and binary.
    let hc = "    health_checks:\n    - { timeout: 1s, interval: 0.1s, no_traffic_interval: 0.1s, unhealthy_threshold: 2, healthy_threshold: 1, tcp_health_check: { send: { text: '50494e47' }, receive: [{ text: '504f' }, { binary: 'Tkc=' }] } }\n";
    let cluster = static_cluster("pinged", &[a.port, b.port], hc);
    let proxy = Proxy::start(&tcp_bootstrap(&cluster, port), &[]);
    proxy.wait_live().await;
    let mut seen = HashSet::new();
    for _ in 0..10 {
        seen.insert(who(port).await);
    }
    assert_eq!(seen, set(&["a", "b"]));

    b.healthy.store(0, Ordering::SeqCst);
    let out = eventually(Duration::from_secs(10), async || {
        flags_of(&proxy, "pinged", b.port).await == "/failed_active_hc"
    })
    .await;
    assert!(out, "b never failed");
    let only_a = eventually(Duration::from_secs(5), async || {
        let mut seen = HashSet::new();
        for _ in 0..10 {
            seen.insert(who(port).await);
        }
        seen == set(&["a"])
    })
    .await;
    assert!(only_a, "connections still reach b");
    assert!(
        stat(&proxy, "cluster.pinged.health_check.network_failure")
            .await
            .unwrap_or(0)
            >= 2,
        "timeouts are network failures"
    );

    b.healthy.store(1, Ordering::SeqCst);
    let back = eventually(Duration::from_secs(10), async || {
        flags_of(&proxy, "pinged", b.port).await == "healthy"
    })
    .await;
    assert!(back, "b never returned");
    // a was never interrupted: all its checks went over the first connection.
    assert!(a.pings.load(Ordering::SeqCst) >= 5);
    assert_eq!(a.health_connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn grpc_checks_follow_the_serving_status() {
    use tonic_health::ServingStatus;
    async fn serve() -> (
        u16,
        tonic_health::server::HealthReporter,
        tokio::task::JoinHandle<()>,
    ) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        (port, reporter, task)
    }
    let (a, ra, _ta) = serve().await;
    let (b, rb, _tb) = serve().await;
    ra.set_service_status("shop.Cart", ServingStatus::Serving)
        .await;
    rb.set_service_status("shop.Cart", ServingStatus::Serving)
        .await;
    // Not a gRPC server: its check fails.
    let plain = HealthyBackend::start("plain").await;
    let port = free_port();
    let hc = "    health_checks:\n    - { timeout: 1s, interval: 0.1s, no_traffic_interval: 0.1s, unhealthy_threshold: 2, healthy_threshold: 2, grpc_health_check: { service_name: shop.Cart } }\n";
    let cluster = static_cluster("grpc", &[a, b, plain.port()], hc);
    let proxy = Proxy::start(&bootstrap(&[cluster], port, &routes("grpc")), &[]);
    proxy.wait_live().await;
    assert_eq!(health_flags(&proxy, "grpc").await, {
        let mut v = vec![
            (a, "healthy".to_string()),
            (b, "healthy".to_string()),
            (plain.port(), "/failed_active_hc".to_string()),
        ];
        v.sort();
        v
    });

    rb.set_service_status("shop.Cart", ServingStatus::NotServing)
        .await;
    let out = eventually(Duration::from_secs(10), async || {
        flags_of(&proxy, "grpc", b).await == "/failed_active_hc"
    })
    .await;
    assert!(out, "b never failed");
    assert_eq!(flags_of(&proxy, "grpc", a).await, "healthy");
    rb.set_service_status("shop.Cart", ServingStatus::Serving)
        .await;
    let back = eventually(Duration::from_secs(10), async || {
        flags_of(&proxy, "grpc", b).await == "healthy"
    })
    .await;
    assert!(back, "b never returned");
    assert_eq!(
        stat(&proxy, "cluster.grpc.health_check.healthy").await,
        Some(2)
    );
}

#[test]
fn bad_health_checks_are_named_by_path() {
    let dir = temp_dir("bad-hc");
    let path = dir.join("b.yaml");
    std::fs::write(
        &path,
        r#"
static_resources:
  clusters:
  - name: a
    health_checks:
    - { interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: { path: /h, expected_statuses: [{ start: 200, end: 700 }] } }
  - name: b
    health_checks:
    - { timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, custom_health_check: { name: redis }, event_log_path: /tmp/hc.log }
  - name: c
    health_checks:
    - { timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {} }
    - { timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {} }
"#,
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capstan-proxy"))
        .args(["-c", path.to_str().expect("path")])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for expected in [
        "static_resources.clusters[0].health_checks[0].timeout: required",
        "static_resources.clusters[0].health_checks[0].http_health_check.expected_statuses[0]: Invalid http expected status range: expecting end <= 600, but found end=700",
        "static_resources.clusters[1].health_checks[0].event_log_path: unsupported field",
        "static_resources.clusters[1].health_checks[0].custom_health_check: unsupported field",
        "static_resources.clusters[2].health_checks: Multiple health checks not supported",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Fixed xDS resources, served by the control plane's real `XdsServer`.
struct Fixed(Vec<(&'static str, String, envoy_types::pb::google::protobuf::Any)>);

impl capstan_control_plane::xds::ResourceSource for Fixed {
    fn resources_for(
        &self,
        _node: &envoy_types::pb::envoy::config::core::v3::Node,
    ) -> Arc<capstan_control_plane::xds::Resources> {
        let mut r = capstan_control_plane::xds::Resources::default();
        for (t, n, any) in &self.0 {
            r.by_type
                .entry((*t).to_string())
                .or_default()
                .insert(n.clone(), any.clone());
        }
        Arc::new(r)
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::channel(0).1
    }
}

fn any<M: prost::Message + prost::Name + Default>(
    text: &str,
) -> envoy_types::pb::google::protobuf::Any {
    envoy_types::util::pack_any(capstan_proto::from_yaml::<M>(text).expect("resource parses"))
}

#[tokio::test]
async fn a_cds_eds_cluster_holds_initialization_until_its_round_is_over() {
    use capstan_proxy::xds::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE};
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;

    let slow = HealthyBackend::start("slow").await;
    slow.delay_ms.store(800, Ordering::SeqCst);
    let good = HealthyBackend::start("good").await;
    let bad = HealthyBackend::start("bad").await;
    bad.set_status(503);
    let (hole, _hole_task) = black_hole().await;
    let port = free_port();
    let endpoints: Vec<String> = [slow.port(), good.port(), bad.port(), hole]
        .iter()
        .map(|p| format!("{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }} }}"))
        .collect();
    let resources = Fixed(vec![
        (
            CLUSTER_TYPE,
            "web".to_string(),
            any::<Cluster>(
                "name: web\ntype: EDS\nconnect_timeout: 1s\neds_cluster_config: { eds_config: { ads: {}, initial_fetch_timeout: 5s } }\nhealth_checks: [{ timeout: 2s, interval: 30s, unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: { path: /healthz } }]\n",
            ),
        ),
        (
            ENDPOINT_TYPE,
            "web".to_string(),
            any::<ClusterLoadAssignment>(&format!(
                "cluster_name: web\nendpoints: [{{ lb_endpoints: [{}] }}]\n",
                endpoints.join(", ")
            )),
        ),
        (
            LISTENER_TYPE,
            "ingress".to_string(),
            any::<Listener>(&format!(
                r#"name: ingress
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": {HCM}
      stat_prefix: ingress
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
      route_config:
        virtual_hosts:
        - {{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: web }} }}] }}
"#
            )),
        ),
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let xds_port = listener.local_addr().expect("addr").port();
    let server = capstan_control_plane::xds::XdsServer::new(Arc::new(resources));
    let _xds = tokio::spawn(async move {
        let _ = server.serve(listener, std::future::pending::<()>()).await;
    });
    let bootstrap = format!(
        r#"node: {{ id: proxy-0.default, cluster: proxy }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: ADMIN_PORT }} }} }}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}]
  cds_config: {{ ads: {{}}, initial_fetch_timeout: 10s }}
  lds_config: {{ ads: {{}}, initial_fetch_timeout: 10s }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {xds_port} }} }} }}
"#
    );
    let started = Instant::now();
    let proxy = Proxy::start(&bootstrap, &[]);
    let up = eventually(Duration::from_secs(5), async || {
        proxy.ready().await.is_some()
    })
    .await;
    assert!(up, "admin did not come up; stderr:\n{}", proxy.stderr());
    let warming = eventually(Duration::from_secs(5), async || {
        proxy
            .admin_get("/stats?filter=^cluster_manager\\.warming_clusters$")
            .await
            .text()
            == "cluster_manager.warming_clusters: 1\n"
    })
    .await;
    assert!(warming, "web never warmed");
    assert_ne!(proxy.ready().await.map(|r| r.0), Some(StatusCode::OK));

    proxy.wait_live().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900),
        "LIVE after {waited:?}: before the black hole's check timed out (2s)"
    );
    assert_eq!(backends_seen(port, 20).await, set(&["slow", "good"]));
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.healthy").await,
        Some(2)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.health_check.network_failure").await,
        Some(1)
    );
}
