//! Differential test of active health checking: the same static bootstrap (an HTTP cluster of
//! two backends with an HTTP health check) run by stock Envoy and by capstan-proxy. One
//! backend's health endpoint flaps 200 → 503 → 200; both proxies must stop routing to it, show
//! the same `/clusters` `health_flags` and `health_check.healthy` gauge, and route to it again
//! once it recovered.
//!
//! Needs `envoy` on PATH (scripts/test.sh installs it); under `CI=true` its absence fails.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use bytes::Bytes;
use capstan_e2e::client;
use capstan_e2e::process::{PATIENCE, Peer, free_port, start_static_peer, temp_dir};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// An HTTP backend: `/healthz` answers the switchable status, anything else 200 with
/// `x-backend: <name>`.
async fn backend(name: &'static str) -> (u16, Arc<AtomicU16>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let status = Arc::new(AtomicU16::new(200));
    let st = status.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let st = st.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let code = if req.uri().path() == "/healthz" {
                        st.load(Ordering::SeqCst)
                    } else {
                        200
                    };
                    async move {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(code)
                                .header("x-backend", name)
                                .body(Full::new(Bytes::from(name)))
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
    (port, status)
}

fn bootstrap(admin: u16, listener: u16, a: u16, b: u16) -> String {
    format!(
        r#"node: {{ id: hc-diff.default, cluster: hc-diff }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  clusters:
  - name: web
    type: STATIC
    connect_timeout: 1s
    health_checks:
    - timeout: 1s
      interval: 0.2s
      no_traffic_interval: 0.2s
      unhealthy_threshold: 2
      healthy_threshold: 2
      http_health_check: {{ path: /healthz }}
    load_assignment:
      cluster_name: web
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {a} }} }} }}
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {b} }} }} }}
  listeners:
  - name: ingress
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
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - {{ match: {{ prefix: / }}, route: {{ cluster: web }} }}
"#
    )
}

/// `web`'s `health_flags` by host port, from `/clusters`.
async fn health_flags(admin: u16) -> BTreeMap<u16, String> {
    let text = client::get(([127, 0, 0, 1], admin).into(), "admin", "/clusters")
        .await
        .map(|r| r.body)
        .unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split("::").collect();
            match parts.as_slice() {
                ["web", host, "health_flags", flags] => {
                    let port = host.rsplit(':').next()?.parse().ok()?;
                    Some((port, flags.to_string()))
                }
                _ => None,
            }
        })
        .collect()
}

async fn healthy_gauge(admin: u16) -> Option<String> {
    let text = client::get(
        ([127, 0, 0, 1], admin).into(),
        "admin",
        "/stats?filter=^cluster\\.web\\.health_check\\.healthy$",
    )
    .await
    .map(|r| r.body)
    .unwrap_or_default();
    text.lines().next().map(str::to_string)
}

/// Which backends answered 12 requests.
async fn routed_to(port: u16) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let r = client::get(addr, "x", "/").await.expect("response");
        assert_eq!(r.status, 200, "{}", r.body);
        seen.insert(r.header("x-backend").unwrap_or_default().to_string());
    }
    seen
}

/// Waits until requests reach exactly `want`: a health change reaches the load balancer
/// within Envoy's `update_merge_window` (1 s), later than `/clusters` shows it.
async fn routes_eventually(port: u16, want: &BTreeSet<String>) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if routed_to(port).await == *want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits until `web`'s flags on `admin` are `want`.
async fn wait_flags(admin: u16, want: &BTreeMap<u16, String>) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if health_flags(admin).await == *want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_flapping_host_leaves_and_rejoins_the_rotation_as_in_envoy() {
    let work = temp_dir("hc-differential");
    let (a, _) = backend("a").await;
    let (b, b_status) = backend("b").await;
    let envoy_port = free_port();
    let Some(envoy) = start_static_peer(Peer::Envoy, &work, |admin| {
        bootstrap(admin, envoy_port, a, b)
    })
    .await
    else {
        eprintln!("envoy is not on PATH; differential health-check test not run");
        return;
    };
    let proxy_port = free_port();
    let proxy = start_static_peer(Peer::Capstan, &work, |admin| {
        bootstrap(admin, proxy_port, a, b)
    })
    .await
    .expect("capstan-proxy starts");
    let (envoy_admin, proxy_admin) = (envoy.admin.port(), proxy.admin.port());
    let peers = [
        ("envoy", envoy_admin, envoy_port),
        ("capstan-proxy", proxy_admin, proxy_port),
    ];
    let all: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
    let only_a: BTreeSet<String> = ["a".to_string()].into();
    let healthy = |b_flags: &str| -> BTreeMap<u16, String> {
        [(a, "healthy".to_string()), (b, b_flags.to_string())].into()
    };

    for (name, admin, port) in peers {
        assert_eq!(health_flags(admin).await, healthy("healthy"), "{name}");
        assert_eq!(routed_to(port).await, all, "{name}");
    }

    b_status.store(503, Ordering::SeqCst);
    for (name, admin, port) in peers {
        assert!(
            wait_flags(admin, &healthy("/failed_active_hc")).await,
            "{name}: b never failed: {:?}",
            health_flags(admin).await
        );
        assert!(
            routes_eventually(port, &only_a).await,
            "{name} still routes to b"
        );
    }
    assert_eq!(
        healthy_gauge(proxy_admin).await,
        healthy_gauge(envoy_admin).await,
        "health_check.healthy (left: capstan-proxy, right: Envoy)"
    );
    assert_eq!(
        healthy_gauge(proxy_admin).await.as_deref(),
        Some("cluster.web.health_check.healthy: 1")
    );

    b_status.store(200, Ordering::SeqCst);
    for (name, admin, port) in peers {
        assert!(
            wait_flags(admin, &healthy("healthy")).await,
            "{name}: b never returned: {:?}",
            health_flags(admin).await
        );
        assert!(
            routes_eventually(port, &all).await,
            "{name} never routed to b again"
        );
    }
    assert_eq!(
        healthy_gauge(proxy_admin).await,
        healthy_gauge(envoy_admin).await
    );
    let _ = std::fs::remove_dir_all(&work);
}
