//! The admin interface and the readiness listener, with Envoy's endpoints and formats.

mod support;

use std::time::Duration;

use support::*;

async fn live_proxy() -> (Proxy, u16, Backend) {
    let backend = Backend::start("a").await;
    let port = free_port();
    let routes = r#"
name: local_routes
virtual_hosts:
- { name: all, domains: ["*"], routes: [{ match: { prefix: / }, route: { cluster: web } }] }
"#;
    let proxy = Proxy::start(
        &bootstrap(
            &[static_cluster("web", &[backend.port()], "")],
            port,
            routes,
        ),
        &["--service-node", "web-0.shop"],
    );
    proxy.wait_live().await;
    (proxy, port, backend)
}

#[tokio::test]
async fn ready_server_info_and_healthcheck_fail_ok() {
    let (proxy, _, _b) = live_proxy().await;
    let r = proxy.admin_get("/ready").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "LIVE\n"));

    let info = proxy.admin_get("/server_info").await.json();
    assert_eq!(info["state"], "LIVE");
    assert_eq!(
        info["node"]["id"], "web-0.shop",
        "--service-node overrides the bootstrap"
    );
    assert_eq!(info["command_line_options"]["concurrency"], 2);

    let r = proxy.admin_get("/healthcheck/fail").await;
    assert_eq!(r.status, 405, "mutating endpoints need POST");
    assert_eq!(proxy.admin_post("/healthcheck/fail").await.status, 200);
    let r = proxy.admin_get("/ready").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (503, "DRAINING\n"));
    let r = get(proxy.readiness, "x", "/ready").await;
    assert_eq!(r.status, 503);
    assert_eq!(proxy.admin_post("/healthcheck/ok").await.status, 200);
    assert_eq!(proxy.admin_get("/ready").await.status, 200);

    let r = get(proxy.readiness, "x", "/ready").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "LIVE\n"));
    assert_eq!(
        get(proxy.readiness, "x", "/stats").await.status,
        404,
        "readiness serves /ready alone"
    );
    assert_eq!(get(proxy.readiness, "x", "/quitquitquit").await.status, 404);
}

#[tokio::test]
async fn stats_use_envoy_names_in_text_and_prometheus() {
    let (proxy, port, _b) = live_proxy().await;
    let client = http1_client();
    for _ in 0..3 {
        assert_eq!(get_with(&client, port, "x", "/", &[]).await.status, 200);
    }
    assert_eq!(
        get_with(&client, port, "x", "/status/503", &[])
            .await
            .status,
        503
    );
    let text = proxy.admin_get("/stats").await.text();
    for line in [
        "server.state: 0",
        "server.live: 1",
        "listener_manager.total_listeners_active: 1",
        "listener_manager.workers_started: 1",
        "cluster_manager.active_clusters: 1",
        "cluster.web.upstream_rq_total: 4",
        "cluster.web.upstream_rq_200: 3",
        "cluster.web.upstream_rq_2xx: 3",
        "cluster.web.upstream_rq_503: 1",
        "cluster.web.membership_total: 1",
        "http.ingress.downstream_rq_total: 4",
        "http.ingress.downstream_rq_2xx: 3",
        "http.ingress.downstream_rq_5xx: 1",
        &format!("listener.127.0.0.1_{port}.downstream_cx_total: 1"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    let active: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("cluster.web.upstream_cx_active: "))
        .and_then(|v| v.parse().ok())
        .expect("upstream_cx_active");
    assert_eq!(active, 1, "one kept-alive upstream connection");

    let prom = proxy.admin_get("/stats/prometheus").await.text();
    for line in [
        "# TYPE envoy_cluster_upstream_rq counter",
        "envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"web\"} 3",
        "envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"5\",envoy_cluster_name=\"web\"} 1",
        "envoy_cluster_upstream_rq_total{envoy_cluster_name=\"web\"} 4",
        "# TYPE envoy_server_state gauge",
        "envoy_server_state{} 0",
        "envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix=\"ingress\"} 4",
        "envoy_listener_manager_total_listeners_active{} 1",
    ] {
        assert!(
            prom.lines().any(|l| l == line),
            "missing {line:?} in\n{prom}"
        );
    }

    let json = proxy
        .admin_get("/stats?format=json&filter=upstream_rq_total")
        .await
        .json();
    assert_eq!(json["stats"][0]["name"], "cluster.web.upstream_rq_total");
    assert_eq!(json["stats"][0]["value"], 4);
    assert_eq!(proxy.admin_get("/stats?filter=(").await.status, 400);
}

#[tokio::test]
async fn clusters_listeners_and_config_dump() {
    let (proxy, port, backend) = live_proxy().await;
    assert_eq!(get(port, "x", "/").await.status, 200);

    let clusters = proxy.admin_get("/clusters").await.text();
    let host = format!("web::127.0.0.1:{}", backend.port());
    for line in [
        "web::observability_name::web".to_string(),
        "web::added_via_api::false".to_string(),
        format!("{host}::rq_total::1"),
        format!("{host}::health_flags::healthy"),
        format!("{host}::cx_active::1"),
    ] {
        assert!(
            clusters.lines().any(|l| l == line),
            "missing {line:?} in\n{clusters}"
        );
    }
    let json = proxy.admin_get("/clusters?format=json").await.json();
    let status = &json["cluster_statuses"][0];
    assert_eq!(status["name"], "web");
    assert_eq!(
        status["host_statuses"][0]["address"]["socket_address"]["port_value"],
        backend.port()
    );

    let listeners = proxy.admin_get("/listeners").await.text();
    assert_eq!(listeners, format!("ingress::127.0.0.1:{port}\n"));
    let json = proxy.admin_get("/listeners?format=json").await.json();
    assert_eq!(json["listener_statuses"][0]["name"], "ingress");

    let dump = proxy.admin_get("/config_dump").await.json();
    let types: Vec<&str> = dump["configs"]
        .as_array()
        .expect("configs")
        .iter()
        .filter_map(|c| c["@type"].as_str())
        .collect();
    assert_eq!(
        types,
        vec![
            "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
            "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
            "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
        ]
    );
    assert_eq!(dump["configs"][0]["bootstrap"]["node"]["id"], "web-0.shop");
    let cluster = &dump["configs"][1]["static_clusters"][0]["cluster"];
    assert_eq!(
        cluster["@type"],
        "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    );
    assert_eq!(cluster["name"], "web");
    let listener = &dump["configs"][2]["static_listeners"][0]["listener"];
    assert_eq!(listener["name"], "ingress");
    assert_eq!(
        listener["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"],
        "ingress"
    );
    assert_eq!(
        dump["configs"][3]["static_route_configs"][0]["route_config"]["name"],
        "local_routes"
    );
    assert!(dump["configs"][1]["static_clusters"][0]["last_updated"].is_string());

    let init = proxy.admin_get("/init_dump").await.json();
    assert_eq!(init["unready_targets_dumps"], serde_json::json!([]));
    assert_eq!(proxy.admin_get("/nope").await.status, 404);
}

#[tokio::test]
async fn quitquitquit_exits_zero() {
    let (mut proxy, port, _b) = live_proxy().await;
    assert_eq!(proxy.admin_post("/quitquitquit").await.status, 200);
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)).await, Some(0));
    assert!(!accepts(port).await);
}
