//! Nothing accepts before LIVE: an EDS cluster with no xDS source holds initialization until
//! its `initial_fetch_timeout`; meanwhile `/ready` is 503 and the listener port refuses.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

#[tokio::test]
async fn listeners_refuse_connections_until_live() {
    let backend = Backend::start("a").await;
    let port = free_port();
    let eds = r#"  - name: reviews
    type: EDS
    connect_timeout: 1s
    eds_cluster_config:
      service_name: reviews.default
      eds_config: { ads: {}, resource_api_version: V3, initial_fetch_timeout: 1.5s }
"#
    .to_string();
    let clusters = vec![static_cluster("a", &[backend.port()], ""), eds];
    let routes = r#"
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - { match: { prefix: /reviews }, route: { cluster: reviews } }
  - { match: { prefix: / }, route: { cluster: a } }
"#;
    let started = Instant::now();
    let proxy = Proxy::start(&bootstrap(&clusters, port, routes), &[]);

    let up = eventually(Duration::from_secs(5), async || {
        proxy.ready().await.is_some()
    })
    .await;
    assert!(up, "admin did not come up; stderr:\n{}", proxy.stderr());
    let (status, state) = proxy.ready().await.expect("ready answers");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        state, "PRE_INITIALIZING",
        "the cluster manager is still initializing"
    );
    assert!(!accepts(port).await, "the listener accepted before LIVE");

    let readiness = get(proxy.readiness, "x", "/ready").await;
    assert_eq!(readiness.status, 503);
    assert_eq!(readiness.text(), "PRE_INITIALIZING\n");
    let info = proxy.admin_get("/server_info").await.json();
    assert_eq!(info["state"], "PRE_INITIALIZING");
    let init = proxy.admin_get("/init_dump").await.json();
    assert_eq!(
        init["unready_targets_dumps"][0]["target_names"][0], "cluster reviews (EDS)",
        "{init}"
    );
    let stats = proxy
        .admin_get("/stats?filter=^server\\.state$")
        .await
        .text();
    assert_eq!(stats, "server.state: 2\n");

    proxy.wait_live().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "LIVE after {waited:?}, before initial_fetch_timeout"
    );
    assert!(accepts(port).await, "the listener accepts once LIVE");

    let r = get(port, "x", "/reviews").await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.text(),
        "no healthy upstream",
        "the EDS cluster initialized empty"
    );
    assert_eq!(get(port, "x", "/").await.backend().as_deref(), Some("a"));
    assert_eq!(
        proxy
            .admin_get("/stats?filter=^server\\.state$")
            .await
            .text(),
        "server.state: 0\n"
    );
}

#[tokio::test]
async fn strict_dns_clusters_resolve_before_live() {
    let backend = Backend::start("dns").await;
    let port = free_port();
    let dns = format!(
        r#"  - name: by-name
    type: STRICT_DNS
    connect_timeout: 1s
    dns_lookup_family: V4_ONLY
    dns_refresh_rate: 0.2s
    load_assignment:
      cluster_name: by-name
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: localhost, port_value: {} }} }} }}
"#,
        backend.port()
    );
    let routes = r#"
virtual_hosts:
- { name: all, domains: ["*"], routes: [{ match: { prefix: / }, route: { cluster: by-name } }] }
"#;
    let proxy = Proxy::start(&bootstrap(&[dns], port, routes), &[]);
    proxy.wait_live().await;
    let r = get(port, "x", "/").await;
    assert_eq!(
        r.backend().as_deref(),
        Some("dns"),
        "resolved before the first request"
    );
    let clusters = proxy.admin_get("/clusters").await.text();
    assert!(
        clusters.contains(&format!(
            "by-name::127.0.0.1:{}::rq_total::1",
            backend.port()
        )),
        "{clusters}"
    );
}
