//! Route retry policies over real sockets, against in-test upstreams that fail on command.

mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted upstream does with its next request.
#[derive(Debug, Clone, Copy)]
enum Step {
    Status(u16),
    /// Close the connection without answering.
    Reset,
    /// Answer 200 after this many milliseconds.
    Delay(u64),
}

#[derive(Default)]
struct Script {
    steps: VecDeque<Step>,
    /// (Host header, body) of every request seen.
    seen: Vec<(String, String)>,
}

/// A raw HTTP/1.1 upstream that follows a script, then answers 200 `<name>`.
struct Flaky {
    address: SocketAddr,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Flaky {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Flaky {
    async fn start(name: &'static str, steps: &[Step]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let script = Arc::new(Mutex::new(Script {
            steps: steps.iter().copied().collect(),
            seen: Vec::new(),
        }));
        let shared = script.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, name, shared.clone()));
            }
        });
        Self {
            address,
            script,
            task,
        }
    }

    fn port(&self) -> u16 {
        self.address.port()
    }

    fn seen(&self) -> Vec<(String, String)> {
        self.script.lock().expect("lock").seen.clone()
    }
}

async fn serve(mut stream: TcpStream, name: &'static str, script: Arc<Mutex<Script>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .map(|v| v.trim().to_string())
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let host = header("host").unwrap_or_default();
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
        buf.drain(..head_end + length);
        let step = {
            let mut s = script.lock().expect("lock");
            s.seen.push((host, body));
            s.steps.pop_front().unwrap_or(Step::Status(200))
        };
        let status = match step {
            Step::Reset => return,
            Step::Delay(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                200
            }
            Step::Status(code) => code,
        };
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nx-backend: {name}\r\n\r\n{name}",
            name.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// One listener, one route `/` to cluster `up` (the given ports) with `route_extra` (YAML
/// lines at the route action's indentation, e.g. the retry policy).
async fn proxy(ports: &[u16], route_extra: &str) -> (Proxy, u16) {
    let port = free_port();
    let routes = format!(
        r#"
name: main
virtual_hosts:
- name: default
  domains: ["*"]
  routes:
  - match: {{ prefix: / }}
    route:
      cluster: up
{route_extra}"#
    );
    let proxy = Proxy::start(
        &bootstrap(&[static_cluster("up", ports, "")], port, &routes),
        &[],
    );
    proxy.wait_live().await;
    (proxy, port)
}

async fn stat(proxy: &Proxy, name: &str) -> Option<u64> {
    let text = proxy.admin_get("/stats").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn a_5xx_is_retried_and_the_second_try_answers() {
    let up = Flaky::start("up", &[Step::Status(503)]).await;
    let (proxy, port) = proxy(&[up.port()], "      retry_policy: { retry_on: 5xx }\n").await;
    let r = get(port, "svc", "/x").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "up");
    assert_eq!(up.seen().len(), 2);
    assert_eq!(stat(&proxy, "cluster.up.upstream_rq_retry").await, Some(1));
    assert_eq!(
        stat(&proxy, "cluster.up.upstream_rq_retry_success").await,
        Some(1)
    );
    assert_eq!(
        stat(&proxy, "cluster.up.upstream_rq_retry_overflow").await,
        Some(0)
    );
}

#[tokio::test]
async fn without_a_policy_nothing_is_retried() {
    let up = Flaky::start("up", &[Step::Status(503)]).await;
    let (_proxy, port) = proxy(&[up.port()], "").await;
    assert_eq!(get(port, "svc", "/x").await.status, 503);
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test]
async fn retriable_status_codes_are_retried_and_others_are_not() {
    let up = Flaky::start("up", &[Step::Status(409), Step::Status(503)]).await;
    let (_proxy, port) = proxy(
        &[up.port()],
        "      retry_policy: { retry_on: retriable-status-codes, retriable_status_codes: [409], num_retries: 3 }\n",
    )
    .await;
    // 409 is retried; the 503 that follows is not retriable under this policy.
    let r = get(port, "svc", "/x").await;
    assert_eq!(r.status, 503);
    assert_eq!(up.seen().len(), 2);
}

#[tokio::test]
async fn gateway_error_retries_502_but_not_500() {
    let up = Flaky::start("up", &[Step::Status(502), Step::Status(500)]).await;
    let (_proxy, port) = proxy(
        &[up.port()],
        "      retry_policy: { retry_on: gateway-error, num_retries: 3 }\n",
    )
    .await;
    assert_eq!(get(port, "svc", "/x").await.status, 500);
    assert_eq!(up.seen().len(), 2);
}

#[tokio::test]
async fn exhausted_retries_return_the_last_upstream_response() {
    let up = Flaky::start(
        "up",
        &[Step::Status(503), Step::Status(502), Step::Status(500)],
    )
    .await;
    let (proxy, port) = proxy(
        &[up.port()],
        "      retry_policy: { retry_on: 5xx, num_retries: 2 }\n",
    )
    .await;
    let r = get(port, "svc", "/x").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.text(), "up");
    assert_eq!(up.seen().len(), 3);
    assert_eq!(stat(&proxy, "cluster.up.upstream_rq_retry").await, Some(2));
    assert_eq!(
        stat(&proxy, "cluster.up.upstream_rq_retry_limit_exceeded").await,
        Some(1)
    );
    assert_eq!(
        stat(&proxy, "cluster.up.upstream_rq_retry_success").await,
        Some(0)
    );
}

#[tokio::test]
async fn a_reset_is_retried_under_reset() {
    let up = Flaky::start("up", &[Step::Reset]).await;
    let (_proxy, port) = proxy(&[up.port()], "      retry_policy: { retry_on: reset }\n").await;
    let r = get(port, "svc", "/x").await;
    assert_eq!(r.status, 200);
    assert_eq!(up.seen().len(), 2);
}

#[tokio::test]
async fn a_reset_is_not_retried_under_connect_failure() {
    let up = Flaky::start("up", &[Step::Reset]).await;
    let (_proxy, port) = proxy(
        &[up.port()],
        "      retry_policy: { retry_on: connect-failure }\n",
    )
    .await;
    let r = get(port, "svc", "/x").await;
    assert_eq!(r.status, 503);
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test]
async fn connect_failure_is_retried_on_another_host() {
    let up = Flaky::start("up", &[]).await;
    let dead = free_port();
    let (_proxy, port) = proxy(
        &[dead, up.port()],
        "      retry_policy: { retry_on: connect-failure, num_retries: 2 }\n",
    )
    .await;
    for _ in 0..6 {
        let r = get(port, "svc", "/x").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(up.seen().len(), 6);
}

#[tokio::test]
async fn a_request_body_is_replayed_on_retry() {
    let up = Flaky::start("up", &[Step::Status(503)]).await;
    let (_proxy, port) = proxy(&[up.port()], "      retry_policy: { retry_on: 5xx }\n").await;
    let r = post(port, "svc", "/x", "payload").await;
    assert_eq!(r.status, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|(_, body)| body == "payload"), "{seen:?}");
}

#[tokio::test]
async fn a_per_try_timeout_is_retried() {
    let up = Flaky::start("up", &[Step::Delay(2000)]).await;
    let (proxy, port) = proxy(
        &[up.port()],
        "      retry_policy: { retry_on: 5xx, per_try_timeout: 0.2s }\n",
    )
    .await;
    let started = Instant::now();
    let r = get(port, "svc", "/x").await;
    assert_eq!(r.status, 200);
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(up.seen().len(), 2);
    assert_eq!(
        stat(&proxy, "cluster.up.upstream_rq_per_try_timeout").await,
        Some(1)
    );
}

#[tokio::test]
async fn every_try_timing_out_is_a_504() {
    let up = Flaky::start("up", &[Step::Delay(2000), Step::Delay(2000)]).await;
    let (_proxy, port) = proxy(
        &[up.port()],
        "      retry_policy: { retry_on: 5xx, per_try_timeout: 0.2s }\n",
    )
    .await;
    let started = Instant::now();
    let r = get(port, "svc", "/x").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout");
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(up.seen().len(), 2);
}

#[tokio::test]
async fn the_route_timeout_caps_all_tries() {
    let up = Flaky::start("up", &[Step::Delay(3000); 10]).await;
    let (_proxy, port) = proxy(
        &[up.port()],
        "      timeout: 0.5s\n      retry_policy: { retry_on: 5xx, num_retries: 10, per_try_timeout: 0.2s }\n",
    )
    .await;
    let started = Instant::now();
    let r = get(port, "svc", "/x").await;
    let elapsed = started.elapsed();
    assert_eq!(r.status, 504);
    assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1200), "{elapsed:?}");
    let tries = up.seen().len();
    assert!((2..=3).contains(&tries), "{tries} tries");
}

#[tokio::test]
async fn a_virtual_host_policy_applies_and_a_route_policy_overrides_it() {
    let up = Flaky::start("up", &[Step::Status(503), Step::Status(503)]).await;
    let port = free_port();
    let routes = r#"
name: main
virtual_hosts:
- name: default
  domains: ["*"]
  retry_policy: { retry_on: 5xx }
  routes:
  - match: { prefix: /none }
    route: { cluster: up, retry_policy: { retry_on: connect-failure } }
  - match: { prefix: / }
    route: { cluster: up }
"#;
    let proxy = Proxy::start(
        &bootstrap(&[static_cluster("up", &[up.port()], "")], port, routes),
        &[],
    );
    proxy.wait_live().await;
    // The route's own policy (connect-failure only) replaces the virtual host's.
    assert_eq!(get(port, "svc", "/none").await.status, 503);
    assert_eq!(up.seen().len(), 1);
    // The virtual host's policy retries the second 503.
    assert_eq!(get(port, "svc", "/x").await.status, 200);
    assert_eq!(up.seen().len(), 3);
}

/// Route `/` to `up` with a mirror policy to `shadow`.
async fn mirrored(up: u16, shadow: u16, mirror: &str) -> (Proxy, u16) {
    let port = free_port();
    let routes = format!(
        r#"
name: main
virtual_hosts:
- name: default
  domains: ["*"]
  routes:
  - match: {{ prefix: / }}
    route:
      cluster: up
      request_mirror_policies: [{mirror}]
"#
    );
    let proxy = Proxy::start(
        &bootstrap(
            &[
                static_cluster("up", &[up], ""),
                static_cluster("shadow", &[shadow], ""),
            ],
            port,
            &routes,
        ),
        &[],
    );
    proxy.wait_live().await;
    (proxy, port)
}

#[tokio::test]
async fn a_mirror_gets_a_copy_with_a_shadow_host() {
    let up = Flaky::start("up", &[]).await;
    let shadow = Flaky::start("shadow", &[Step::Status(500)]).await;
    let (_proxy, port) = mirrored(up.port(), shadow.port(), "{ cluster: shadow }").await;
    let r = post(port, "svc.example:8080", "/x", "copy me").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "up");
    assert!(
        eventually(Duration::from_secs(3), async || !shadow.seen().is_empty()).await,
        "the mirror saw nothing"
    );
    assert_eq!(
        shadow.seen(),
        vec![("svc.example-shadow:8080".to_string(), "copy me".to_string())]
    );
    assert_eq!(
        up.seen(),
        vec![("svc.example:8080".to_string(), "copy me".to_string())]
    );
    // A failing mirror changes nothing for the client.
    let r = get(port, "plain", "/y").await;
    assert_eq!(r.status, 200);
    assert!(eventually(Duration::from_secs(3), async || shadow.seen().len() == 2).await);
    assert_eq!(shadow.seen()[1].0, "plain-shadow");
}

#[tokio::test]
async fn a_slow_mirror_does_not_delay_the_response() {
    let up = Flaky::start("up", &[]).await;
    let shadow = Flaky::start("shadow", &[Step::Delay(3000)]).await;
    let (_proxy, port) = mirrored(up.port(), shadow.port(), "{ cluster: shadow }").await;
    let started = Instant::now();
    let r = get(port, "svc", "/x").await;
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert!(eventually(Duration::from_secs(2), async || shadow.seen().len() == 1).await);
}

#[tokio::test]
async fn a_zero_fraction_mirrors_nothing() {
    let up = Flaky::start("up", &[]).await;
    let shadow = Flaky::start("shadow", &[]).await;
    let (_proxy, port) = mirrored(
        up.port(),
        shadow.port(),
        "{ cluster: shadow, runtime_fraction: { default_value: { numerator: 0 } } }",
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get(port, "svc", "/x").await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(shadow.seen().is_empty());
    assert_eq!(up.seen().len(), 5);
}

/// An upstream that accepts any WebSocket upgrade and then echoes bytes; it records the
/// request head it saw.
async fn websocket_echo() -> (u16, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                seen.lock().expect("lock").push(head);
                let _ = stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                    .await;
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (port, heads, task)
}

async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

async fn websocket_proxy(upstream: u16, hcm_upgrades: &str, route_extra: &str) -> (Proxy, u16) {
    let port = free_port();
    let routes = format!(
        r#"
name: main
virtual_hosts:
- name: default
  domains: ["*"]
  routes:
  - match: {{ prefix: /off }}
    route: {{ cluster: ws, upgrade_configs: [{{ upgrade_type: websocket, enabled: false }}] }}
  - match: {{ prefix: / }}
    route:
      cluster: ws
{route_extra}"#
    );
    let config = bootstrap(&[static_cluster("ws", &[upstream], "")], port, &routes).replace(
        "          stat_prefix: ingress\n",
        &format!("          stat_prefix: ingress\n{hcm_upgrades}"),
    );
    let proxy = Proxy::start(&config, &[]);
    proxy.wait_live().await;
    (proxy, port)
}

/// Opens a WebSocket through the proxy; returns the response head and the connection.
async fn open_websocket(port: u16, path: &str) -> (String, TcpStream) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let head = read_head(&mut stream).await.expect("response head");
    (head, stream)
}

#[tokio::test]
async fn a_websocket_is_spliced_through_when_upgrades_are_enabled() {
    let (upstream, heads, _task) = websocket_echo().await;
    let (_proxy, port) = websocket_proxy(
        upstream,
        "          upgrade_configs: [{ upgrade_type: websocket }]\n",
        "",
    )
    .await;
    let (head, mut stream) = open_websocket(port, "/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    for message in [&b"hello"[..], b"second frame"] {
        stream.write_all(message).await.expect("write");
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(echoed, message);
    }
    let seen = heads.lock().expect("lock")[0].to_ascii_lowercase();
    assert!(seen.contains("upgrade: websocket"), "{seen}");
    assert!(
        seen.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="),
        "{seen}"
    );

    // A route that disables upgrades overrides the connection manager.
    let (head, _) = open_websocket(port, "/off").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

#[tokio::test]
async fn websockets_are_refused_without_upgrade_configs_unless_the_route_enables_them() {
    let (upstream, _heads, _task) = websocket_echo().await;
    let (_proxy, port) = websocket_proxy(upstream, "", "").await;
    let (head, _) = open_websocket(port, "/chat").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    let (_proxy, port) = websocket_proxy(
        upstream,
        "",
        "      upgrade_configs: [{ upgrade_type: websocket }]\n",
    )
    .await;
    let (head, mut stream) = open_websocket(port, "/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream.write_all(b"ping").await.expect("write");
    let mut echoed = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echoed, b"ping");
}
