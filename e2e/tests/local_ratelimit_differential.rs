//! Differential test of the local rate limit filter (`envoy.filters.http.local_ratelimit`): the
//! same static bootstrap run by stock Envoy and by capstan-proxy, the same sequence of requests
//! through both. Buckets refill once an hour, so the sequence decides every outcome: the
//! connection manager's bucket shared by every virtual host without its own configuration,
//! virtual-host and route overrides (most specific wins), a custom status, the
//! not-enforced mode adding a request header, a filter without a bucket at the connection
//! manager with a route-configuration-level bucket, and the stats. Statuses, bodies and
//! headers must match request by request, and the `http_local_rate_limit` stats must be equal.
//!
//! Needs `envoy` on PATH (scripts/test.sh installs it); under `CI=true` its absence fails.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use capstan_e2e::client::{Reply, get};
use capstan_e2e::process::{Peer, free_port, start_static_peer, temp_dir};

const RL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const ALL: &str = "{ default_value: { numerator: 100, denominator: HUNDRED } }";

/// A `typed_per_filter_config` with a local rate limit of `max` tokens refilled once an hour,
/// indented by `indent` spaces, plus `extra` fields.
fn per_filter(indent: usize, prefix: &str, max: u32, extra: &[&str]) -> String {
    let pad = " ".repeat(indent);
    let mut lines = vec![
        "typed_per_filter_config:".to_string(),
        "  envoy.filters.http.local_ratelimit:".to_string(),
        format!("    \"@type\": {RL}"),
        format!("    stat_prefix: {prefix}"),
        format!(
            "    token_bucket: {{ max_tokens: {max}, tokens_per_fill: 1, fill_interval: 3600s }}"
        ),
        format!("    filter_enabled: {ALL}"),
    ];
    lines.extend(extra.iter().map(|e| format!("    {e}")));
    lines.iter().map(|l| format!("{pad}{l}\n")).collect()
}

fn bootstrap(admin: u16, main: u16, second: u16, conn: u16, backend: SocketAddr) -> String {
    let enforced = format!("filter_enforced: {ALL}");
    let route_level = per_filter(16, "rl_route", 2, &[&enforced, "status: { code: 503 }"]);
    let vhost_level = per_filter(14, "rl_vhost", 1, &[&enforced]);
    let own = per_filter(16, "rl_own", 4, &[&enforced]);
    let shadow = per_filter(
        16,
        "rl_shadow",
        1,
        &[
            "request_headers_to_add_when_not_enforced: [ { header: { key: x-shadow, value: limited } } ]",
        ],
    );
    let rc_level = per_filter(12, "rl_rc", 2, &[&enforced]);
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  clusters:
  - name: web
    connect_timeout: 1s
    load_assignment:
      cluster_name: web
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
  listeners:
  - name: main
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {main} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          route_config:
            virtual_hosts:
            - name: hcm
              domains: ["hcm"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: web }}
            - name: direct
              domains: ["direct"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: direct }} }}
            - name: route
              domains: ["route"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: web }}
{route_level}            - name: vhost
              domains: ["vhost"]
{vhost_level}              routes:
              - match: {{ prefix: "/own" }}
                route: {{ cluster: web }}
{own}              - match: {{ prefix: "/" }}
                route: {{ cluster: web }}
            - name: shadow
              domains: ["shadow"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: web }}
{shadow}          http_filters:
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": {RL}
              stat_prefix: rl_hcm
              token_bucket: {{ max_tokens: 3, tokens_per_fill: 1, fill_interval: 3600s }}
              filter_enabled: {ALL}
              filter_enforced: {ALL}
              response_headers_to_add: [ {{ header: {{ key: x-rl, value: "yes" }} }} ]
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  - name: second
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {second} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: second
          route_config:
{rc_level}            virtual_hosts:
            - name: any
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: second }} }}
          http_filters:
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": {RL}
              stat_prefix: rl_unused
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  - name: conn
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {conn} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit
          stat_prefix: conn_rl
          token_bucket: {{ max_tokens: 2, tokens_per_fill: 1, fill_interval: 3600s }}
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: conn
          route_config:
            virtual_hosts:
            - name: any
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: conn }} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#,
        port = backend.port()
    )
}

/// What one request observed.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    request: String,
    status: u16,
    body: String,
    x_rl: Option<String>,
    shadow_seen_by_backend: Option<String>,
}

fn seen(request: String, r: Reply) -> Seen {
    let body = if r.json().is_some() {
        "<backend>".to_string()
    } else {
        r.body.clone()
    };
    Seen {
        request,
        status: r.status,
        x_rl: r.header("x-rl").map(str::to_string),
        shadow_seen_by_backend: r.seen_header("x-shadow"),
        body,
    }
}

/// The request sequence (host, path, count) on the main listener, then the second listener.
const SEQUENCE: &[(&str, &str, usize)] = &[
    ("hcm", "/", 2),
    ("direct", "/", 2), // the connection manager's bucket: its third token, then empty
    ("nothing", "/", 1), // no route: still the connection manager's bucket
    ("route", "/", 3),
    ("vhost", "/", 2),
    ("vhost", "/own", 5),
    ("shadow", "/", 2),
    ("hcm", "/", 1),
];

async fn run(main: u16, second: u16, conn: u16) -> Vec<Seen> {
    let mut out = Vec::new();
    for (host, path, count) in SEQUENCE {
        for i in 0..*count {
            let r = get(([127, 0, 0, 1], main).into(), host, path)
                .await
                .unwrap_or_else(|e| panic!("{host}{path}: {e}"));
            out.push(seen(format!("{host}{path} #{i}"), r));
        }
    }
    for i in 0..3 {
        let r = get(([127, 0, 0, 1], second).into(), "any", "/")
            .await
            .unwrap_or_else(|e| panic!("second listener: {e}"));
        out.push(seen(format!("second #{i}"), r));
    }
    // The connection rate limit: two connections, then the third is closed unanswered.
    for i in 0..3 {
        let request = format!("conn #{i}");
        match get(([127, 0, 0, 1], conn).into(), "any", "/").await {
            Ok(r) => out.push(seen(request, r)),
            Err(_) => out.push(Seen {
                request,
                status: 0,
                body: "<connection closed>".to_string(),
                x_rl: None,
                shadow_seen_by_backend: None,
            }),
        }
    }
    out
}

async fn rate_limit_stats(admin: SocketAddr) -> BTreeMap<String, String> {
    let body = get(admin, "admin", "/stats")
        .await
        .map(|r| r.body)
        .unwrap_or_default();
    body.lines()
        // Envoy also reports `shadow_mode`, which only its descriptor mode moves.
        .filter(|l| {
            (l.contains(".http_local_rate_limit.") || l.starts_with("local_rate_limit."))
                && !l.contains("shadow_mode")
        })
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn local_rate_limits_answer_like_envoy() {
    let work = temp_dir("local-ratelimit-differential");
    let backend = capstan_e2e::backend::start("web").await;
    let mut results = Vec::new();
    for peer in [Peer::Envoy, Peer::Capstan] {
        let (main, second, conn) = (free_port(), free_port(), free_port());
        let Some(running) = start_static_peer(peer, &work, |admin| {
            bootstrap(admin, main, second, conn, backend)
        })
        .await
        else {
            eprintln!("envoy is not on PATH; local rate limit differential test not run");
            return;
        };
        let observed = run(main, second, conn).await;
        let stats = rate_limit_stats(running.admin).await;
        results.push((peer, observed, stats, running));
    }
    let (_, envoy_seen, envoy_stats, envoy) = &results[0];
    let (_, proxy_seen, proxy_stats, proxy) = &results[1];
    for (e, p) in envoy_seen.iter().zip(proxy_seen) {
        assert_eq!(
            p,
            e,
            "capstan-proxy (left) and Envoy (right) disagree\nenvoy log:\n{}\nproxy log:\n{}",
            envoy.proc.logs(),
            proxy.proc.logs()
        );
    }
    assert_eq!(proxy_seen.len(), envoy_seen.len());
    assert_eq!(
        proxy_stats, envoy_stats,
        "stats differ (left: capstan-proxy, right: Envoy)"
    );

    // And the agreement is the intended one.
    let statuses: Vec<u16> = proxy_seen.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        vec![
            200, 200, // hcm: tokens 1, 2
            200, 429, // direct: token 3, then empty
            429, // no route: still the connection manager's bucket
            200, 200, 503, // route: its own 2 tokens, status 503
            200, 429, // vhost: its 1 token
            200, 200, 200, 200, 429, // the route under vhost: its own 4
            200, 200, // shadow: 1 token, then limited but not enforced
            429, // hcm: still empty
            200, 200, 429, // second listener: the route configuration's 2 tokens
            200, 200, 0, // third listener: two connections, then closed
        ],
        "{proxy_seen:#?}"
    );
    let limited = &proxy_seen[3];
    assert_eq!(limited.body, "local_rate_limited");
    assert_eq!(limited.x_rl.as_deref(), Some("yes"));
    assert_eq!(
        proxy_seen[16].shadow_seen_by_backend.as_deref(),
        Some("limited")
    );
    assert_eq!(proxy_seen[15].shadow_seen_by_backend, None);
    assert_eq!(
        proxy_stats
            .get("rl_hcm.http_local_rate_limit.rate_limited")
            .map(String::as_str),
        Some("3"),
        "{proxy_stats:#?}"
    );
    assert_eq!(
        proxy_stats
            .get("local_rate_limit.conn_rl.rate_limited")
            .map(String::as_str),
        Some("1"),
        "{proxy_stats:#?}"
    );
}
