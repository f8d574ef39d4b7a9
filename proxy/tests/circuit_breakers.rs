//! Circuit breakers (`Cluster.circuit_breakers`) through the proxy binary against real, slow
//! or failing upstreams: `max_requests`, `max_pending_requests` with `max_connections`
//! (requests wait as pending, overflow answers 503 `x-envoy-overloaded`), `max_retries`, the
//! TCP proxy's `max_connections`, and the `circuit_breakers.*` gauges.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncReadExt;

const ROUTES: &str = r#"
name: local
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: { prefix: "/" }
    route: { cluster: web, timeout: 10s }
"#;

/// One value of `/stats` (text format).
async fn stat(proxy: &Proxy, name: &str) -> Option<i64> {
    let stats = proxy.admin_get("/stats").await.text();
    stats.lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

async fn stat_becomes(proxy: &Proxy, name: &str, value: i64) -> bool {
    eventually(Duration::from_secs(5), async || {
        stat(proxy, name).await == Some(value)
    })
    .await
}

async fn start(thresholds: &str, routes: &str, backend: &Backend) -> (Proxy, u16) {
    let port = free_port();
    let cluster = static_cluster(
        "web",
        &[backend.port()],
        &format!("    circuit_breakers: {{ thresholds: [{thresholds}] }}\n"),
    );
    let proxy = Proxy::start(&bootstrap(&[cluster], port, routes), &[]);
    proxy.wait_live().await;
    (proxy, port)
}

#[tokio::test]
async fn max_requests_overflow_is_a_503_with_x_envoy_overloaded() {
    let backend = Backend::start("web").await;
    let (proxy, port) = start("{ max_requests: 1 }", ROUTES, &backend).await;
    assert_eq!(
        stat(&proxy, "cluster.web.circuit_breakers.default.rq_open").await,
        Some(0)
    );

    let slow = tokio::spawn(async move { get(port, "web", "/slow/1500").await });
    // The slow request holds the only `max_requests` slot while it waits for headers.
    assert!(stat_becomes(&proxy, "cluster.web.circuit_breakers.default.rq_open", 1).await);

    let r = get(port, "web", "/fast").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-envoy-overloaded").as_deref(), Some("true"));
    assert_eq!(
        r.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: overflow"
    );
    // Envoy 1.38+ counts a request refused by max_requests as an active, not a pending,
    // overflow.
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_rq_active_overflow").await,
        Some(1)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_rq_pending_overflow").await,
        Some(0)
    );
    assert_eq!(stat(&proxy, "cluster.web.upstream_rq_503").await, Some(1));

    let r = slow.await.expect("slow request");
    assert_eq!(r.status, 200);
    assert!(stat_becomes(&proxy, "cluster.web.circuit_breakers.default.rq_open", 0).await);
    // Once the first request is done the limit has room again.
    assert_eq!(get(port, "web", "/fast").await.status, 200);
    assert_eq!(stat(&proxy, "cluster.web.upstream_rq_total").await, Some(2));
}

#[tokio::test]
async fn at_max_connections_requests_wait_as_pending_until_max_pending_overflows() {
    let backend = Backend::start("web").await;
    let (proxy, port) = start(
        "{ max_connections: 1, max_pending_requests: 1, track_remaining: true }",
        ROUTES,
        &backend,
    )
    .await;
    assert_eq!(
        stat(&proxy, "cluster.web.circuit_breakers.default.remaining_cx").await,
        Some(1)
    );
    let first = tokio::spawn(async move { get(port, "web", "/slow/1200").await });
    assert!(stat_becomes(&proxy, "cluster.web.circuit_breakers.default.cx_open", 1).await);
    assert!(
        stat_becomes(
            &proxy,
            "cluster.web.circuit_breakers.default.remaining_rq",
            1023
        )
        .await
    );

    // The second request finds no idle connection and may not open one: it waits.
    let second = tokio::spawn(async move { get(port, "web", "/after").await });
    assert!(
        eventually(Duration::from_secs(5), async || {
            stat(&proxy, "cluster.web.upstream_cx_overflow").await >= Some(1)
        })
        .await
    );
    assert!(
        stat_becomes(
            &proxy,
            "cluster.web.circuit_breakers.default.remaining_pending",
            0
        )
        .await
    );
    assert_eq!(
        stat(
            &proxy,
            "cluster.web.circuit_breakers.default.rq_pending_open"
        )
        .await,
        Some(1)
    );
    // A third has no pending slot left.
    let third = get(port, "web", "/third").await;
    assert_eq!(third.status, 503);
    assert_eq!(third.header("x-envoy-overloaded").as_deref(), Some("true"));
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_rq_pending_overflow").await,
        Some(1)
    );

    assert_eq!(first.await.expect("first").status, 200);
    let second = second.await.expect("second");
    assert_eq!(
        second.status, 200,
        "the pending request got the released connection"
    );
    assert_eq!(second.json()["path"], "/after");
    assert_eq!(stat(&proxy, "cluster.web.upstream_cx_total").await, Some(1));
    assert_eq!(stat(&proxy, "cluster.web.upstream_rq_total").await, Some(2));
}

#[tokio::test]
async fn suppress_envoy_headers_drops_x_envoy_overloaded() {
    let backend = Backend::start("web").await;
    let port = free_port();
    let cluster = static_cluster(
        "web",
        &[backend.port()],
        "    circuit_breakers: { thresholds: [{ max_requests: 0 }] }\n",
    );
    let config = bootstrap(&[cluster], port, ROUTES).replace(
        "router.v3.Router }",
        "router.v3.Router, suppress_envoy_headers: true }",
    );
    let proxy = Proxy::start(&config, &[]);
    proxy.wait_live().await;
    let r = get(port, "web", "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-envoy-overloaded"), None);
    assert!(r.text().ends_with("reset reason: overflow"), "{}", r.text());
}

#[tokio::test]
async fn max_retries_overflow_returns_the_failed_response_without_retrying() {
    let backend = Backend::start("web").await;
    let routes = ROUTES.replace(
        "route: { cluster: web, timeout: 10s }",
        "route: { cluster: web, timeout: 10s, retry_policy: { retry_on: 5xx, num_retries: 3 } }",
    );
    let (proxy, port) = start("{ max_retries: 0 }", &routes, &backend).await;
    let r = get(port, "web", "/status/503").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.header("x-backend").as_deref(),
        Some("web"),
        "the upstream's own 503"
    );
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_rq_retry_overflow").await,
        Some(1)
    );
    assert_eq!(stat(&proxy, "cluster.web.upstream_rq_retry").await, Some(0));
    assert_eq!(stat(&proxy, "cluster.web.upstream_rq_total").await, Some(1));
    assert_eq!(
        stat(&proxy, "cluster.web.circuit_breakers.default.rq_retry_open").await,
        Some(1),
        "max_retries 0 is always open"
    );
}

#[tokio::test]
async fn a_retry_budget_allows_min_retry_concurrency() {
    let backend = Backend::start("web").await;
    let routes = ROUTES.replace(
        "route: { cluster: web, timeout: 10s }",
        "route: { cluster: web, timeout: 10s, retry_policy: { retry_on: 5xx, num_retries: 2, retry_back_off: { base_interval: 0.001s } } }",
    );
    let (proxy, port) = start(
        "{ max_retries: 0, retry_budget: { budget_percent: { value: 0 }, min_retry_concurrency: 1 } }",
        &routes,
        &backend,
    )
    .await;
    let r = get(port, "web", "/status/500").await;
    assert_eq!(r.status, 500);
    // The budget (not max_retries 0) decides: one retry at a time, so both retries happen.
    assert_eq!(stat(&proxy, "cluster.web.upstream_rq_retry").await, Some(2));
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_rq_retry_overflow").await,
        Some(0)
    );
    assert_eq!(stat(&proxy, "cluster.web.upstream_rq_total").await, Some(3));
}

#[tokio::test]
async fn tcp_proxy_closes_connections_over_max_connections() {
    const TCP: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream_port = upstream.local_addr().expect("address").port();
    // Accepts and holds connections open.
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = upstream.accept().await {
            conns.push(s);
        }
    });
    let port = free_port();
    let cluster = static_cluster(
        "db",
        &[upstream_port],
        "    circuit_breakers: { thresholds: [{ max_connections: 1 }] }\n",
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
    let _first = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    assert!(stat_becomes(&proxy, "cluster.db.upstream_cx_active", 1).await);
    let mut second = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the second connection is closed: {read:?}"
    );
    assert_eq!(
        stat(&proxy, "cluster.db.upstream_cx_overflow").await,
        Some(1)
    );
    assert_eq!(stat(&proxy, "cluster.db.upstream_cx_total").await, Some(1));
    held.abort();
}

#[tokio::test]
async fn unsupported_breaker_fields_are_named() {
    let backend = Backend::start("web").await;
    let port = free_port();
    let cluster = static_cluster(
        "web",
        &[backend.port()],
        "    circuit_breakers: { thresholds: [{ max_connection_pools: 2 }], per_host_thresholds: [{ max_connections: 1 }] }\n",
    );
    let mut proxy = Proxy::start(&bootstrap(&[cluster], port, ROUTES), &[]);
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(64));
    let stderr = proxy.stderr();
    assert!(
        stderr.contains("circuit_breakers.thresholds[0].max_connection_pools: unsupported field"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "circuit_breakers.per_host_thresholds: unsupported field (per-host circuit breakers are not implemented yet)"
        ),
        "{stderr}"
    );
}

/// `RouteAction.priority: HIGH` counts against the HIGH thresholds: with DEFAULT
/// `max_requests: 1` a second concurrent request overflows on a DEFAULT route but not on a HIGH
/// one (HIGH `max_requests: 5`), and each priority's gauges move on their own.
#[tokio::test]
async fn high_priority_routes_use_the_high_thresholds() {
    let backend = Backend::start("web").await;
    let routes = r#"
name: local
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: { prefix: "/high/" }
    route: { cluster: web, timeout: 10s, priority: HIGH, prefix_rewrite: "/" }
  - match: { prefix: "/" }
    route: { cluster: web, timeout: 10s }
"#;
    let (proxy, port) = start(
        "{ max_requests: 1 }, { priority: HIGH, max_requests: 5, track_remaining: true }",
        routes,
        &backend,
    )
    .await;
    let slow = tokio::spawn(async move { get(port, "web", "/slow/1500").await });
    assert!(stat_becomes(&proxy, "cluster.web.circuit_breakers.default.rq_open", 1).await);
    assert_eq!(
        get(port, "web", "/fast").await.status,
        503,
        "DEFAULT is full"
    );

    let high: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { get(port, "web", "/high/slow/1000").await }))
        .collect();
    assert!(
        stat_becomes(&proxy, "cluster.web.circuit_breakers.high.remaining_rq", 3).await,
        "the two HIGH requests count against HIGH's max_requests of 5"
    );
    assert_eq!(
        stat(&proxy, "cluster.web.circuit_breakers.high.rq_open").await,
        Some(0)
    );
    for h in high {
        assert_eq!(h.await.expect("high request").status, 200);
    }
    assert_eq!(slow.await.expect("slow request").status, 200);
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_rq_active_overflow").await,
        Some(1),
        "only the DEFAULT request overflowed"
    );
}
