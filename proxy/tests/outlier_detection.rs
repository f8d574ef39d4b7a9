//! Outlier detection (`Cluster.outlier_detection`) through the proxy binary against upstreams
//! that fail on command: consecutive 5xx (ejection, return after `base_ejection_time`, longer
//! on a repeated ejection), consecutive gateway failures (enforcing 0 by default), local-origin
//! failures with and without `split_external_local_origin_errors`, success-rate ejection,
//! `max_ejection_percent`, and the TCP proxy's connect failures.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

/// An HTTP upstream answering every request with the status it is told to, counting them.
struct Switch {
    port: u16,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Switch {
    async fn start(status: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let status = Arc::new(AtomicU16::new(status));
        let hits = Arc::new(AtomicU64::new(0));
        let (s, h) = (status.clone(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, h) = (s.clone(), h.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let code = s.load(Ordering::SeqCst);
                        async move {
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(code)
                                    .header("x-port", port.to_string())
                                    .body(Full::new(Bytes::from_static(b"x")))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            port,
            status,
            hits,
            task,
        }
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

const ROUTES: &str = r#"
name: local
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: { prefix: "/" }
    route: { cluster: web }
"#;

async fn stat(proxy: &Proxy, name: &str) -> Option<i64> {
    let stats = proxy.admin_get("/stats").await.text();
    stats.lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

async fn stat_becomes(proxy: &Proxy, name: &str, value: i64) -> bool {
    eventually(Duration::from_secs(10), async || {
        stat(proxy, name).await == Some(value)
    })
    .await
}

async fn start(ports: &[u16], outlier: &str) -> (Proxy, u16) {
    let port = free_port();
    let cluster = static_cluster(
        "web",
        ports,
        &format!("    outlier_detection: {{ {outlier} }}\n"),
    );
    let proxy = Proxy::start(&bootstrap(&[cluster], port, ROUTES), &[]);
    proxy.wait_live().await;
    (proxy, port)
}

const OD: &str = "cluster.web.outlier_detection";

#[tokio::test]
async fn consecutive_5xx_ejects_the_host_until_base_ejection_time_passes() {
    let good = Switch::start(200).await;
    let bad = Switch::start(500).await;
    let (proxy, port) = start(
        &[good.port, bad.port],
        "consecutive_5xx: 3, interval: 0.2s, base_ejection_time: 1s, max_ejection_percent: 50",
    )
    .await;
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_active")).await,
        Some(0)
    );
    for _ in 0..20 {
        get(port, "web", "/").await;
    }
    assert_eq!(bad.hits(), 3, "the failing host got exactly 3 requests");
    assert_eq!(good.hits(), 17);
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_active")).await,
        Some(1)
    );
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_enforced_consecutive_5xx")).await,
        Some(1)
    );
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_detected_consecutive_5xx")).await,
        Some(1)
    );
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_enforced_total")).await,
        Some(1)
    );
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_total")).await,
        Some(1)
    );

    // It returns after base_ejection_time (1 s) at an interval tick.
    let ejected_at = Instant::now();
    bad.set(200);
    assert!(stat_becomes(&proxy, &format!("{OD}.ejections_active"), 0).await);
    assert!(ejected_at.elapsed() >= Duration::from_millis(700));
    let before = bad.hits();
    for _ in 0..4 {
        assert_eq!(get(port, "web", "/").await.status, 200);
    }
    assert_eq!(bad.hits() - before, 2, "back in the round robin");
}

#[tokio::test]
async fn a_host_ejected_again_at_once_stays_out_twice_as_long() {
    let good = Switch::start(200).await;
    let bad = Switch::start(503).await;
    let (proxy, port) = start(
        &[good.port, bad.port],
        "consecutive_5xx: 2, interval: 1s, base_ejection_time: 1s, max_ejection_percent: 50",
    )
    .await;
    for _ in 0..4 {
        get(port, "web", "/").await;
    }
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_active")).await,
        Some(1)
    );
    // Back after ~1 s; failing again within the next interval ejects it with backoff 2.
    assert!(stat_becomes(&proxy, &format!("{OD}.ejections_active"), 0).await);
    while stat(&proxy, &format!("{OD}.ejections_active")).await == Some(0) {
        get(port, "web", "/").await;
    }
    let second = Instant::now();
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_enforced_consecutive_5xx")).await,
        Some(2)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_active")).await,
        Some(1),
        "still ejected after 1.5 s (2 × base_ejection_time)"
    );
    bad.set(200);
    assert!(stat_becomes(&proxy, &format!("{OD}.ejections_active"), 0).await);
    assert!(second.elapsed() >= Duration::from_secs(2));
}

#[tokio::test]
async fn gateway_failures_are_detected_but_not_enforced_by_default() {
    let good = Switch::start(200).await;
    let bad = Switch::start(502).await;
    let (proxy, port) = start(
        &[good.port, bad.port],
        "consecutive_5xx: 100, consecutive_gateway_failure: 2, max_ejection_percent: 50",
    )
    .await;
    for _ in 0..10 {
        get(port, "web", "/").await;
    }
    assert_eq!(
        bad.hits(),
        5,
        "not ejected: enforcing_consecutive_gateway_failure is 0"
    );
    assert_eq!(
        stat(
            &proxy,
            &format!("{OD}.ejections_detected_consecutive_gateway_failure")
        )
        .await,
        Some(2)
    );
    assert_eq!(
        stat(
            &proxy,
            &format!("{OD}.ejections_enforced_consecutive_gateway_failure")
        )
        .await,
        Some(0)
    );
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_active")).await,
        Some(0)
    );
}

#[tokio::test]
async fn enforced_gateway_failures_eject() {
    let good = Switch::start(200).await;
    let bad = Switch::start(504).await;
    let (proxy, port) = start(
        &[good.port, bad.port],
        "consecutive_5xx: 100, consecutive_gateway_failure: 2, enforcing_consecutive_gateway_failure: 100, max_ejection_percent: 50",
    )
    .await;
    for _ in 0..10 {
        get(port, "web", "/").await;
    }
    assert_eq!(bad.hits(), 2);
    assert_eq!(
        stat(
            &proxy,
            &format!("{OD}.ejections_enforced_consecutive_gateway_failure")
        )
        .await,
        Some(1)
    );
}

#[tokio::test]
async fn max_ejection_percent_refuses_ejections_past_it() {
    let good = Switch::start(200).await;
    let bad = Switch::start(500).await;
    // Envoy's default 10 %: with two hosts no ejection is allowed.
    let (proxy, port) = start(&[good.port, bad.port], "consecutive_5xx: 2").await;
    for _ in 0..8 {
        get(port, "web", "/").await;
    }
    assert_eq!(bad.hits(), 4);
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_overflow")).await,
        Some(2)
    );
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_active")).await,
        Some(0)
    );
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_detected_consecutive_5xx")).await,
        Some(2)
    );
}

#[tokio::test]
async fn refused_connections_count_as_5xx_or_as_local_origin_failures_when_split() {
    let good = Switch::start(200).await;
    let refused = free_port();
    let (proxy, port) = start(
        &[good.port, refused],
        "consecutive_5xx: 2, max_ejection_percent: 50",
    )
    .await;
    for _ in 0..6 {
        get(port, "web", "/").await;
    }
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_enforced_consecutive_5xx")).await,
        Some(1)
    );
    drop(proxy);

    let (proxy, port) = start(
        &[good.port, refused],
        "consecutive_5xx: 2, split_external_local_origin_errors: true, consecutive_local_origin_failure: 3, max_ejection_percent: 50",
    )
    .await;
    for _ in 0..10 {
        get(port, "web", "/").await;
    }
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_enforced_consecutive_5xx")).await,
        Some(0)
    );
    assert_eq!(
        stat(
            &proxy,
            &format!("{OD}.ejections_enforced_consecutive_local_origin_failure")
        )
        .await,
        Some(1)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_cx_connect_fail").await,
        Some(3)
    );
}

#[tokio::test]
async fn success_rate_ejects_the_outlier_at_an_interval() {
    let a = Switch::start(200).await;
    let b = Switch::start(200).await;
    let bad = Switch::start(500).await;
    let (proxy, port) = start(
        &[a.port, b.port, bad.port],
        "consecutive_5xx: 100000, interval: 0.5s, success_rate_minimum_hosts: 3, success_rate_request_volume: 10, success_rate_stdev_factor: 1000, max_ejection_percent: 50",
    )
    .await;
    let ejected = eventually(Duration::from_secs(10), async || {
        for _ in 0..30 {
            get(port, "web", "/").await;
        }
        stat(&proxy, &format!("{OD}.ejections_enforced_success_rate")).await >= Some(1)
    })
    .await;
    assert!(
        ejected,
        "the host failing every request is a success-rate outlier"
    );
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_active")).await,
        Some(1)
    );
    let before = bad.hits();
    for _ in 0..6 {
        assert_eq!(get(port, "web", "/").await.status, 200);
    }
    assert_eq!(bad.hits(), before);
}

#[tokio::test]
async fn tcp_proxy_connect_failures_eject_the_host() {
    const TCP: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
    let good = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let good_port = good.local_addr().expect("address").port();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = good.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    let refused = free_port();
    let port = free_port();
    let cluster = static_cluster(
        "db",
        &[good_port, refused],
        "    outlier_detection: { consecutive_5xx: 2, max_ejection_percent: 50 }\n",
    );
    let config = format!(
        r#"node: {{ id: tcp-0.default, cluster: tcp }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: ADMIN_PORT }} }} }}
static_resources:
  clusters:
{cluster}  listeners:
  - name: tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {TCP}
          stat_prefix: db
          cluster: db
"#
    );
    let proxy = Proxy::start(&config, &[]);
    proxy.wait_live().await;
    let mut conns = Vec::new();
    for _ in 0..10 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        // A refused upstream closes the downstream connection; a good one keeps it open.
        let mut b = [0u8; 1];
        let closed = matches!(
            tokio::time::timeout(
                Duration::from_millis(300),
                tokio::io::AsyncReadExt::read(&mut s, &mut b)
            )
            .await,
            Ok(Ok(0)) | Ok(Err(_))
        );
        conns.push((s, closed));
    }
    let closed = conns.iter().filter(|(_, c)| *c).count();
    assert_eq!(closed, 2, "two connects failed before the host was ejected");
    assert_eq!(accepted.load(Ordering::SeqCst), 8);
    assert_eq!(
        stat(
            &proxy,
            "cluster.db.outlier_detection.ejections_enforced_consecutive_5xx"
        )
        .await,
        Some(1)
    );
    task.abort();
}

/// Envoy's default `successful_active_health_check_uneject_host`: an ejected host whose active
/// health check passes returns at once, long before `base_ejection_time`.
#[tokio::test]
async fn a_passing_active_health_check_returns_an_ejected_host_at_once() {
    let good = Switch::start(200).await;
    let bad = Switch::start(500).await;
    let port = free_port();
    let cluster = static_cluster(
        "web",
        &[good.port, bad.port],
        "    outlier_detection: { consecutive_5xx: 3, interval: 60s, base_ejection_time: 60s, max_ejection_percent: 50 }\n    health_checks: [ { timeout: 1s, interval: 0.2s, no_traffic_interval: 0.2s, unhealthy_threshold: 2, healthy_threshold: 1, tcp_health_check: {} } ]\n",
    );
    let proxy = Proxy::start(&bootstrap(&[cluster], port, ROUTES), &[]);
    proxy.wait_live().await;
    for _ in 0..20 {
        get(port, "web", "/").await;
    }
    assert!(
        bad.hits() >= 3,
        "the failing host was tried: {} hits",
        bad.hits()
    );
    let ejections = stat(&proxy, &format!("{OD}.ejections_enforced_total")).await;
    assert!(ejections >= Some(1), "ejected: {ejections:?}");
    // The TCP health check keeps passing (the host accepts connections), so the next check
    // returns it: well within the 60 s ejection time and the 60 s interval.
    let started = Instant::now();
    assert!(
        stat_becomes(&proxy, &format!("{OD}.ejections_active"), 0).await,
        "the ejected host did not return on a passing health check"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let before = bad.hits();
    bad.set(200);
    for _ in 0..4 {
        assert_eq!(get(port, "web", "/").await.status, 200);
    }
    assert_eq!(bad.hits() - before, 2, "back in the round robin");
}

/// `successful_active_health_check_uneject_host: false`: passing health checks leave an
/// ejected host out until its ejection time is over.
#[tokio::test]
async fn without_uneject_on_health_check_success_the_host_stays_ejected() {
    let good = Switch::start(200).await;
    let bad = Switch::start(500).await;
    let port = free_port();
    let cluster = static_cluster(
        "web",
        &[good.port, bad.port],
        "    outlier_detection: { consecutive_5xx: 3, interval: 60s, base_ejection_time: 60s, max_ejection_percent: 50, successful_active_health_check_uneject_host: false }\n    health_checks: [ { timeout: 1s, interval: 0.1s, no_traffic_interval: 0.1s, unhealthy_threshold: 2, healthy_threshold: 1, tcp_health_check: {} } ]\n",
    );
    let proxy = Proxy::start(&bootstrap(&[cluster], port, ROUTES), &[]);
    proxy.wait_live().await;
    for _ in 0..20 {
        get(port, "web", "/").await;
    }
    assert!(stat_becomes(&proxy, &format!("{OD}.ejections_active"), 1).await);
    let checks = stat(&proxy, "cluster.web.health_check.success").await;
    // Many passing checks later (every 100 ms), still ejected.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(stat(&proxy, "cluster.web.health_check.success").await > checks);
    assert_eq!(
        stat(&proxy, &format!("{OD}.ejections_active")).await,
        Some(1)
    );
}
