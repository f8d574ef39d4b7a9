//! Differential test of outlier detection and circuit breaking: the same static bootstrap run
//! by stock Envoy and by capstan-proxy, each with its own upstreams that fail on command.
//!
//! (a) Consecutive 5xx: a cluster of a good and a failing host; both proxies let the same
//!     number of requests reach the failing host before ejecting it, count the ejection in the
//!     same `outlier_detection.*` stats, and route to it again once `base_ejection_time` passed.
//! (b) Circuit breakers: with a slow upstream and one request in flight, three more concurrent
//!     requests get the same answers (503 `x-envoy-overloaded`, Envoy's body) under
//!     `max_requests: 1`, and under `max_connections: 1, max_pending_requests: 1` one waits as
//!     pending and succeeds while two overflow; the overflow stats agree.
//!
//! Needs `envoy` on PATH (scripts/test.sh installs it); under `CI=true` its absence fails.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capstan_e2e::client;
use capstan_e2e::process::{self, Peer, free_port, start_static_peer, temp_dir};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// An HTTP upstream: answers the switchable status after `delay`, counting requests and
/// those in flight.
#[derive(Clone)]
struct Upstream {
    port: u16,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicU64>,
    in_flight: Arc<AtomicI64>,
    last_hit: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Upstream {
    async fn start(status: u16, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let up = Self {
            port,
            status: Arc::new(AtomicU16::new(status)),
            hits: Arc::new(AtomicU64::new(0)),
            in_flight: Arc::new(AtomicI64::new(0)),
            last_hit: Arc::default(),
        };
        let u = up.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let u = u.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let u = u.clone();
                        async move {
                            u.hits.fetch_add(1, Ordering::SeqCst);
                            *u.last_hit.lock().expect("lock") = Some(Instant::now());
                            u.in_flight.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            u.in_flight.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(u.status.load(Ordering::SeqCst))
                                    .body(Full::new(Bytes::from_static(b"upstream")))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        up
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// One proxy under test with its own upstreams.
struct Side {
    name: &'static str,
    admin: u16,
    port: u16,
    #[allow(dead_code)] // Kept alive for the proxy under test.
    good: Upstream,
    bad: Upstream,
    slow: Upstream,
    process: process::Envoy,
}

fn cluster(name: &str, port: u16, extra: &str) -> String {
    format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n{extra}    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}\n"
    )
}

fn bootstrap(admin: u16, listener: u16, good: u16, bad: u16, slow: u16) -> String {
    let od = format!(
        "  - name: od\n    type: STATIC\n    connect_timeout: 1s\n    outlier_detection: {{ consecutive_5xx: 3, interval: 0.5s, base_ejection_time: 2s, max_ejection_percent: 50 }}\n    load_assignment:\n      cluster_name: od\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {good} }} }} }}\n        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {bad} }} }} }}\n"
    );
    let cb_rq = cluster(
        "cb_rq",
        slow,
        "    circuit_breakers: { thresholds: [{ max_requests: 1 }] }\n",
    );
    let cb_cx = cluster(
        "cb_cx",
        slow,
        "    circuit_breakers: { thresholds: [{ max_connections: 1, max_pending_requests: 1 }] }\n",
    );
    format!(
        r#"node: {{ id: resilience-diff.default, cluster: resilience-diff }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  clusters:
{od}{cb_rq}{cb_cx}  listeners:
  - name: http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener} }} }}
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
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/od" }}
                route: {{ cluster: od, timeout: 10s }}
              - match: {{ prefix: "/rq" }}
                route: {{ cluster: cb_rq, timeout: 10s }}
              - match: {{ prefix: "/cx" }}
                route: {{ cluster: cb_cx, timeout: 10s }}
"#
    )
}

async fn start_side(peer: Peer, work: &Path) -> Option<Side> {
    let good = Upstream::start(200, Duration::ZERO).await;
    let bad = Upstream::start(500, Duration::ZERO).await;
    let slow = Upstream::start(200, Duration::from_millis(1500)).await;
    let port = free_port();
    let process = start_static_peer(peer, work, |admin| {
        bootstrap(admin, port, good.port, bad.port, slow.port)
    })
    .await?;
    Some(Side {
        name: peer.name(),
        admin: process.admin.port(),
        port,
        good,
        bad,
        slow,
        process,
    })
}

async fn start_both(tag: &str) -> Option<(Side, Side, PathBuf)> {
    let work = temp_dir(tag);
    let e = start_side(Peer::Envoy, &work).await?;
    let p = start_side(Peer::Capstan, &work)
        .await
        .expect("capstan-proxy starts");
    Some((e, p, work))
}

async fn stat(admin: u16, name: &str) -> Option<i64> {
    let stats = client::get(([127, 0, 0, 1], admin).into(), "admin", "/stats")
        .await
        .ok()?
        .body;
    stats.lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The values of `names` on both sides, for one assertion that shows every difference.
async fn compare(e: &Side, p: &Side, names: &[String]) {
    let mut envoy = Vec::new();
    let mut proxy = Vec::new();
    for n in names {
        envoy.push((n.clone(), stat(e.admin, n).await));
        proxy.push((n.clone(), stat(p.admin, n).await));
    }
    assert_eq!(
        proxy,
        envoy,
        "stats differ (left: capstan-proxy, right: Envoy)\ncapstan-proxy log:\n{}",
        p.process.proc.logs()
    );
}

/// How long after the failing host's last request (its ejection) the host was returned.
async fn returned_after(side: &Side) -> Duration {
    let ejected = side
        .bad
        .last_hit
        .lock()
        .expect("lock")
        .expect("the failing host was hit");
    let od = "cluster.od.outlier_detection.ejections_active";
    let back = eventually(Duration::from_secs(10), async || {
        stat(side.admin, od).await == Some(0)
    })
    .await;
    assert!(back, "{}: the host did not return", side.name);
    ejected.elapsed()
}

/// What the failing host saw, and what the client got, over `n` sequential requests.
async fn run_outlier(side: &Side, n: usize) -> (u64, usize) {
    let mut errors = 0;
    for _ in 0..n {
        let r = client::get(([127, 0, 0, 1], side.port).into(), "od", "/od")
            .await
            .expect("response");
        if r.status == 500 {
            errors += 1;
        }
        // Envoy ejects on its main thread and then updates its workers: let it settle.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    (side.bad.hits(), errors)
}

#[tokio::test]
async fn consecutive_5xx_ejection_and_return_match_envoy() {
    let Some((e, p, work)) = start_both("resilience-od").await else {
        eprintln!("envoy is not on PATH; differential resilience test not run");
        return;
    };
    let envoy = run_outlier(&e, 20).await;
    let proxy = run_outlier(&p, 20).await;
    assert_eq!(
        proxy, envoy,
        "(failing host hits, 500s) left: capstan-proxy, right: Envoy"
    );
    assert_eq!(
        envoy,
        (3, 3),
        "the failing host is ejected after consecutive_5xx (3)"
    );
    let od = |s: &str| format!("cluster.od.outlier_detection.{s}");
    let names: Vec<String> = [
        "ejections_active",
        "ejections_total",
        "ejections_enforced_total",
        "ejections_overflow",
        "ejections_enforced_consecutive_5xx",
        "ejections_detected_consecutive_5xx",
        "ejections_consecutive_5xx",
        "ejections_enforced_consecutive_gateway_failure",
        "ejections_detected_consecutive_gateway_failure",
        "ejections_enforced_success_rate",
        "ejections_detected_success_rate",
    ]
    .iter()
    .map(|s| od(s))
    .chain(["cluster.od.upstream_rq_500".to_string()])
    .collect();
    compare(&e, &p, &names).await;
    assert_eq!(stat(p.admin, &od("ejections_active")).await, Some(1));

    // The host recovers; both return it after base_ejection_time (2 s), at an interval
    // (0.5 s) tick, counted from its last failed request (which ejected it).
    e.bad.status.store(200, Ordering::SeqCst);
    p.bad.status.store(200, Ordering::SeqCst);
    let (e_back, p_back) = tokio::join!(returned_after(&e), returned_after(&p));
    for (name, t) in [("envoy", e_back), ("capstan-proxy", p_back)] {
        assert!(
            t >= Duration::from_millis(1900) && t < Duration::from_millis(4000),
            "{name}: returned {t:?} after its ejection (Envoy {e_back:?}, capstan-proxy {p_back:?})"
        );
    }
    for side in [&e, &p] {
        let before = side.bad.hits();
        for _ in 0..4 {
            let r = client::get(([127, 0, 0, 1], side.port).into(), "od", "/od")
                .await
                .expect("response");
            assert_eq!(r.status, 200);
        }
        assert_eq!(
            side.bad.hits() - before,
            2,
            "{}: back in the round robin",
            side.name
        );
    }
    drop((e, p));
    let _ = std::fs::remove_dir_all(&work);
}

/// Sends one slow request, waits until the upstream has it, then `n` concurrent ones; returns
/// the (status, x-envoy-overloaded, body) of the concurrent ones, sorted, and the first's
/// status.
async fn overflow(side: &Side, path: &'static str, n: usize) -> (u16, Vec<(u16, String, String)>) {
    let addr = ([127, 0, 0, 1], side.port).into();
    let first = tokio::spawn(async move { client::get(addr, "cb", path).await });
    let slow = side.slow.clone();
    let arrived = eventually(Duration::from_secs(10), async || {
        slow.in_flight.load(Ordering::SeqCst) >= 1
    })
    .await;
    if !arrived {
        let first = first.await.expect("task");
        panic!(
            "{}: the first request {path} did not reach the upstream: {:?}\n{}",
            side.name,
            first.map(|r| (r.status, r.body)),
            side.process.proc.logs()
        );
    }
    let rest: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { client::get(addr, "cb", path).await }))
        .collect();
    let mut out = Vec::new();
    for r in rest {
        let r = r.await.expect("task").expect("response");
        out.push((
            r.status,
            r.header("x-envoy-overloaded").unwrap_or("").to_string(),
            if r.status == 503 {
                r.body.clone()
            } else {
                String::new()
            },
        ));
    }
    out.sort();
    let first = first.await.expect("task").expect("response").status;
    (first, out)
}

#[tokio::test]
async fn circuit_breaker_overflow_matches_envoy() {
    let Some((e, p, work)) = start_both("resilience-cb").await else {
        eprintln!("envoy is not on PATH; differential resilience test not run");
        return;
    };
    let overloaded = (
        503,
        "true".to_string(),
        "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            .to_string(),
    );

    // max_requests: 1.
    let envoy = overflow(&e, "/rq", 3).await;
    let proxy = overflow(&p, "/rq", 3).await;
    assert_eq!(proxy, envoy, "left: capstan-proxy, right: Envoy");
    assert_eq!(envoy, (200, vec![overloaded.clone(); 3]));

    // max_connections: 1, max_pending_requests: 1: one waits for the connection.
    let envoy = overflow(&e, "/cx", 3).await;
    let proxy = overflow(&p, "/cx", 3).await;
    assert_eq!(proxy, envoy, "left: capstan-proxy, right: Envoy");
    assert_eq!(
        envoy,
        (
            200,
            vec![
                (200, String::new(), String::new()),
                overloaded.clone(),
                overloaded
            ]
        )
    );

    let mut names = Vec::new();
    for c in ["cb_rq", "cb_cx"] {
        for s in [
            "upstream_rq_pending_overflow",
            "upstream_rq_active_overflow",
            "upstream_cx_overflow",
            "upstream_rq_retry_overflow",
            "upstream_cx_total",
            "upstream_rq_total",
            "upstream_rq_200",
            "circuit_breakers.default.cx_open",
            "circuit_breakers.default.rq_open",
            "circuit_breakers.default.rq_pending_open",
            "circuit_breakers.default.rq_retry_open",
            "circuit_breakers.high.rq_open",
        ] {
            names.push(format!("cluster.{c}.{s}"));
        }
    }
    compare(&e, &p, &names).await;
    // Envoy 1.38+: max_requests refusals are active, not pending, overflows.
    assert_eq!(
        stat(p.admin, "cluster.cb_rq.upstream_rq_active_overflow").await,
        Some(3)
    );
    assert_eq!(
        stat(p.admin, "cluster.cb_rq.upstream_rq_pending_overflow").await,
        Some(0)
    );
    assert_eq!(
        stat(p.admin, "cluster.cb_cx.upstream_rq_pending_overflow").await,
        Some(2)
    );
    assert_eq!(
        stat(p.admin, "cluster.cb_cx.upstream_cx_overflow").await,
        Some(1)
    );
    drop((e, p));
    let _ = std::fs::remove_dir_all(&work);
}
