//! A static listener → routes → STATIC clusters → in-test backends, over real sockets.

mod support;

use std::collections::HashMap;

use support::*;

struct Setup {
    proxy: Proxy,
    port: u16,
    _backends: Vec<Backend>,
}

/// Clusters `a` and `b` (one backend each), `ab` (both), `empty` (no hosts), `dead` (nothing
/// listens), and a route configuration exercising every router feature.
async fn setup() -> Setup {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let dead = free_port();
    let port = free_port();
    let clusters = vec![
        static_cluster("a", &[a.port()], ""),
        static_cluster("b", &[b.port()], ""),
        static_cluster(
            "ab",
            &[a.port(), b.port()],
            "    lb_policy: LEAST_REQUEST\n",
        ),
        static_cluster("empty", &[], ""),
        static_cluster("dead", &[dead], ""),
        static_cluster(
            "h2",
            &[a.port()],
            "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }\n",
        ),
    ];
    let routes = r#"
name: main
request_headers_to_add:
- header: { key: x-global, value: global }
response_headers_to_add:
- header: { key: x-global-response, value: "1" }
virtual_hosts:
- name: api
  domains: ["api.example.com", "api.example.com:*"]
  routes:
  - match: { prefix: /v1/ }
    route: { cluster: a, prefix_rewrite: /internal/ }
  - match: { safe_regex: { regex: "/users/[0-9]+" } }
    route: { cluster: b, regex_rewrite: { pattern: { regex: "^/users/([0-9]+)$" }, substitution: "/u/\\1" } }
- name: wild
  domains: ["*.wild.test"]
  routes:
  - match: { prefix: / }
    route: { cluster: b, host_rewrite_literal: rewritten.internal }
- name: default
  domains: ["*"]
  request_headers_to_add:
  - header: { key: x-vhost, value: default }
  request_headers_to_remove: [x-remove-me]
  response_headers_to_remove: [x-upstream-secret]
  routes:
  - match: { path: /direct }
    direct_response: { status: 418, body: { inline_string: "short and stout" } }
  - match: { prefix: /redirect }
    redirect: { https_redirect: true, response_code: TEMPORARY_REDIRECT }
  - match: { prefix: /split }
    route:
      weighted_clusters:
        clusters:
        - name: a
          weight: 80
          request_headers_to_add: [{ header: { key: x-split, value: a } }]
        - name: b
          weight: 20
  - match: { prefix: /canary, headers: [{ name: x-canary, string_match: { exact: "yes" } }] }
    route: { cluster: b }
  - match: { prefix: /q, query_parameters: [{ name: debug, present_match: true }] }
    route: { cluster: b }
  - match: { prefix: /empty }
    route: { cluster: empty }
  - match: { prefix: /dead }
    route: { cluster: dead }
  - match: { prefix: /slow/ }
    route: { cluster: a, timeout: 0.3s }
    response_headers_to_add:
    - header: { key: x-route, value: slow }
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
  - match: { prefix: /stall/ }
    route: { cluster: a, timeout: 0.3s }
  - match: { prefix: /balanced }
    route: { cluster: ab }
  - match: { prefix: /h2up }
    route: { cluster: h2 }
  - match: { prefix: / }
    route: { cluster: a }
    request_headers_to_add:
    - header: { key: x-route, value: catch-all }
"#;
    let proxy = Proxy::start(&bootstrap(&clusters, port, routes), &[]);
    proxy.wait_live().await;
    Setup {
        proxy,
        port,
        _backends: vec![a, b],
    }
}

#[tokio::test]
async fn virtual_hosts_and_paths_pick_the_cluster_and_rewrite() {
    let s = setup().await;

    let r = get(s.port, "api.example.com", "/v1/items?x=1").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.backend().as_deref(), Some("a"));
    assert_eq!(r.json()["path"], "/internal/items?x=1");
    assert_eq!(
        r.seen_header("x-envoy-original-path").as_deref(),
        Some("/v1/items?x=1")
    );

    let r = get(s.port, "api.example.com", "/users/42").await;
    assert_eq!(r.backend().as_deref(), Some("b"));
    assert_eq!(r.json()["path"], "/u/42");

    let r = get(s.port, "api.example.com", "/users/x").await;
    assert_eq!(r.status, 404, "no route in the api virtual host");
    assert!(r.body.is_empty(), "Envoy's 404 has no body");

    let r = get(s.port, "shop.wild.test", "/").await;
    assert_eq!(r.backend().as_deref(), Some("b"));
    assert_eq!(r.json()["host"], "rewritten.internal");

    let r = get(s.port, "other", "/anything").await;
    assert_eq!(r.backend().as_deref(), Some("a"));
    assert_eq!(r.json()["host"], "other");

    let r = get_with(
        &http1_client(),
        s.port,
        "other",
        "/canary",
        &[("x-canary", "yes")],
    )
    .await;
    assert_eq!(r.backend().as_deref(), Some("b"));
    let r = get(s.port, "other", "/canary").await;
    assert_eq!(
        r.backend().as_deref(),
        Some("a"),
        "falls through to the catch-all"
    );

    let r = get(s.port, "other", "/q?debug").await;
    assert_eq!(r.backend().as_deref(), Some("b"));
}

#[tokio::test]
async fn headers_are_added_and_removed_at_every_level() {
    let s = setup().await;
    let r = get_with(
        &http1_client(),
        s.port,
        "other",
        "/hello",
        &[("x-remove-me", "1"), ("x-forwarded-proto", "https")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen_header("x-global").as_deref(), Some("global"));
    assert_eq!(r.seen_header("x-vhost").as_deref(), Some("default"));
    assert_eq!(r.seen_header("x-route").as_deref(), Some("catch-all"));
    assert_eq!(r.seen_header("x-remove-me"), None);
    assert_eq!(
        r.seen_header("x-forwarded-proto").as_deref(),
        Some("https"),
        "kept when present"
    );
    assert_eq!(
        r.seen_header("x-envoy-expected-rq-timeout-ms").as_deref(),
        Some("15000")
    );
    let id = r
        .seen_header("x-request-id")
        .expect("x-request-id generated");
    assert_eq!(id.len(), 36);
    assert_eq!(r.header("x-global-response").as_deref(), Some("1"));
    assert_eq!(
        r.header("x-upstream-secret"),
        None,
        "removed from the response"
    );
    assert_eq!(r.header("x-backend").as_deref(), Some("a"));
    assert_eq!(r.header("server").as_deref(), Some("envoy"));
    let service_time: u64 = r
        .header("x-envoy-upstream-service-time")
        .and_then(|v| v.parse().ok())
        .expect("x-envoy-upstream-service-time");
    assert!(service_time < 5_000);

    let r = get_with(
        &http1_client(),
        s.port,
        "other",
        "/hello",
        &[("x-request-id", "mine")],
    )
    .await;
    assert_eq!(r.seen_header("x-request-id").as_deref(), Some("mine"));
    assert_eq!(
        r.seen_header("x-forwarded-proto").as_deref(),
        Some("http"),
        "set when absent"
    );
}

#[tokio::test]
async fn weighted_clusters_split_within_tolerance() {
    let s = setup().await;
    let client = http1_client();
    let mut counts: HashMap<String, u32> = HashMap::new();
    let n = 400;
    for _ in 0..n {
        let r = get_with(&client, s.port, "other", "/split", &[]).await;
        assert_eq!(r.status, 200);
        let backend = r.backend().expect("backend");
        if backend == "a" {
            assert_eq!(r.seen_header("x-split").as_deref(), Some("a"));
        } else {
            assert_eq!(r.seen_header("x-split"), None);
        }
        *counts.entry(backend).or_default() += 1;
    }
    let a = f64::from(*counts.get("a").unwrap_or(&0)) / f64::from(n);
    assert!((0.70..=0.90).contains(&a), "80/20 split, got {counts:?}");
}

#[tokio::test]
async fn least_request_uses_every_host() {
    let s = setup().await;
    let client = http1_client();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        seen.insert(
            get_with(&client, s.port, "other", "/balanced", &[])
                .await
                .backend(),
        );
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test]
async fn direct_responses_redirects_and_local_failures_match_envoy() {
    let s = setup().await;

    let r = get(s.port, "other", "/direct").await;
    assert_eq!(r.status, 418);
    assert_eq!(r.text(), "short and stout");
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));

    let r = get(s.port, "shop.example:80", "/redirect/x?y=1").await;
    assert_eq!(r.status, 307);
    assert_eq!(
        r.header("location").as_deref(),
        Some("https://shop.example/redirect/x?y=1")
    );

    let r = get(s.port, "other", "/empty").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "no healthy upstream");

    let r = get(s.port, "other", "/dead").await;
    assert_eq!(r.status, 503);
    assert!(
        r.text().starts_with("upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"),
        "{}",
        r.text()
    );

    let r = get(s.port, "other", "/slow/2000").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout");
    assert_eq!(
        r.header("x-route").as_deref(),
        Some("slow"),
        "route response headers apply to local replies"
    );

    let r = get(s.port, "other", "/slow/10").await;
    assert_eq!(r.status, 200, "under the route timeout");

    let stats = s.proxy.admin_get("/stats").await.text();
    for line in [
        "cluster.a.upstream_rq_504: 1",
        "cluster.a.upstream_rq_timeout: 1",
        "cluster.dead.upstream_rq_503: 1",
        "cluster.dead.upstream_cx_connect_fail: 1",
        "cluster.empty.upstream_cx_none_healthy: 1",
        "http.ingress.rq_direct_response: 1",
        "http.ingress.rq_redirect: 1",
    ] {
        assert!(
            stats.lines().any(|l| l == line),
            "missing {line:?} in\n{stats}"
        );
    }
}

#[tokio::test]
async fn the_route_timeout_covers_the_response_body() {
    let s = setup().await;
    let req = http::Request::get(format!("http://127.0.0.1:{}/stall/2000", s.port))
        .header("host", "other")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let started = std::time::Instant::now();
    let resp = http1_client().request(req).await.expect("response headers");
    assert_eq!(resp.status(), 200, "headers arrived before the timeout");
    let body = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(body.is_err(), "the stalled body was reset");
    assert!(started.elapsed() < std::time::Duration::from_millis(1500));
    let stats = s
        .proxy
        .admin_get("/stats?filter=^cluster\\.a\\.upstream_rq_timeout$")
        .await
        .text();
    assert_eq!(stats, "cluster.a.upstream_rq_timeout: 1\n");
}

#[tokio::test]
async fn h2c_downstream_is_detected_and_routed() {
    let s = setup().await;
    for r in h2_get(s.port, "api.example.com", "/v1/h2", 3).await {
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], "/internal/h2");
        assert_eq!(
            r.json()["host"],
            "api.example.com",
            "authority becomes Host upstream"
        );
        assert_eq!(r.json()["version"], "HTTP/1.1");
    }
    let stats = s
        .proxy
        .admin_get("/stats?filter=^http\\.ingress\\.downstream_(rq|cx)_http2_total$")
        .await
        .text();
    assert_eq!(
        stats,
        "http.ingress.downstream_cx_http2_total: 1\nhttp.ingress.downstream_rq_http2_total: 3\n"
    );
}

#[tokio::test]
async fn upstream_http11_connections_are_reused() {
    let s = setup().await;
    let client = http1_client();
    for _ in 0..20 {
        assert_eq!(
            get_with(&client, s.port, "other", "/keepalive", &[])
                .await
                .status,
            200
        );
    }
    let stats = s
        .proxy
        .admin_get("/stats?filter=^cluster\\.a\\.upstream_cx_total$")
        .await
        .text();
    let total: u64 = stats
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("upstream_cx_total");
    assert!(
        total <= 2,
        "sequential requests reuse one connection: {stats}"
    );
}

#[tokio::test]
async fn request_bodies_stream_upstream_over_http1_and_http2() {
    let s = setup().await;
    let r = post(s.port, "other", "/upload", "hello, upstream").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["method"], "POST");
    assert_eq!(r.json()["body"], "hello, upstream");
    let r = post(s.port, "other", "/h2up/upload", "over h2").await;
    assert_eq!(r.json()["body"], "over h2");
    assert_eq!(r.json()["version"], "HTTP/2.0");
}

#[tokio::test]
async fn clusters_with_explicit_http2_speak_h2c_upstream() {
    let s = setup().await;
    let client = http1_client();
    for _ in 0..5 {
        let r = get_with(&client, s.port, "other", "/h2up/x", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["version"], "HTTP/2.0");
        assert_eq!(r.json()["host"], "other");
    }
    let stats = s
        .proxy
        .admin_get("/stats?filter=^cluster\\.h2\\.upstream_cx_(http2_)?total$")
        .await
        .text();
    assert_eq!(
        stats,
        "cluster.h2.upstream_cx_http2_total: 1\ncluster.h2.upstream_cx_total: 1\n"
    );
}

/// `use_downstream_protocol_config`: each request goes upstream over the protocol it came
/// in on (HTTP/1.1 or h2c), on one connection per protocol.
#[tokio::test]
async fn use_downstream_protocol_follows_each_request() {
    let backend = Backend::start("both").await;
    let cluster = static_cluster(
        "follow",
        &[backend.port()],
        "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        use_downstream_protocol_config: { http_protocol_options: {}, http2_protocol_options: {} }\n",
    );
    let port = free_port();
    let rc = "virtual_hosts:\n- name: all\n  domains: [\"*\"]\n  routes:\n  - { match: { prefix: \"/\" }, route: { cluster: follow } }\n";
    let proxy = Proxy::start(&bootstrap(&[cluster], port, rc), &[]);
    proxy.wait_live().await;
    let client = http1_client();
    for _ in 0..2 {
        let r = get_with(&client, port, "x", "/one", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["version"], "HTTP/1.1");
    }
    for r in h2_get(port, "x", "/two", 2).await {
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["version"], "HTTP/2.0");
        assert_eq!(r.json()["host"], "x");
    }
    let stats = proxy
        .admin_get("/stats?filter=^cluster\\.follow\\.upstream_cx_http[12]_total$")
        .await
        .text();
    assert_eq!(
        stats,
        "cluster.follow.upstream_cx_http1_total: 1\ncluster.follow.upstream_cx_http2_total: 1\n"
    );
}
