//! Upstream connection pool settings through the proxy binary against a raw HTTP/1.1 upstream
//! that reports which connection served each request and sees connections close:
//! `max_requests_per_connection` (protocol options and the deprecated cluster field),
//! `idle_timeout`, `max_connection_duration`, and `tcp_keepalive` on the upstream socket.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers `200` with `x-conn: <n>` (the connection's number, from 0) and remembers which
/// connections were closed by the peer.
struct Upstream {
    port: u16,
    closed: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let closed = Arc::new(Mutex::new(Vec::new()));
        let seen = closed.clone();
        let task = tokio::spawn(async move {
            let mut next = 0u64;
            while let Ok((mut s, _)) = listener.accept().await {
                let id = next;
                next += 1;
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let reply = format!(
                                "HTTP/1.1 200 OK\r\nx-conn: {id}\r\ncontent-length: 2\r\n\r\nok"
                            );
                            if s.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                    seen.lock().expect("lock").push(id);
                });
            }
        });
        Self { port, closed, task }
    }

    fn closed(&self) -> Vec<u64> {
        let mut v = self.closed.lock().expect("lock").clone();
        v.sort_unstable();
        v
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

fn options(common: &str) -> String {
    format!(
        r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {{ {common} }}
        explicit_http_config: {{ http_protocol_options: {{}} }}
"#
    )
}

async fn start(upstream: &Upstream, extra: &str) -> (Proxy, u16) {
    let port = free_port();
    let cluster = static_cluster("web", &[upstream.port], extra);
    let proxy = Proxy::start(&bootstrap(&[cluster], port, ROUTES), &[]);
    proxy.wait_live().await;
    (proxy, port)
}

async fn stat(proxy: &Proxy, name: &str) -> Option<i64> {
    let stats = proxy.admin_get("/stats").await.text();
    stats.lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

async fn conn_of(port: u16) -> String {
    let r = get(port, "web", "/").await;
    assert_eq!(r.status, 200);
    r.header("x-conn").expect("x-conn")
}

#[tokio::test]
async fn max_requests_per_connection_closes_after_the_last_request() {
    let upstream = Upstream::start().await;
    let (proxy, port) = start(&upstream, &options("max_requests_per_connection: 2")).await;
    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(conn_of(port).await);
    }
    assert_eq!(conns, ["0", "0", "1", "1", "2"]);
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_cx_max_requests").await,
        Some(2)
    );
    assert!(
        eventually(Duration::from_secs(5), async || upstream.closed() == [0, 1]).await,
        "{:?}",
        upstream.closed()
    );
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_cx_active").await,
        Some(1)
    );
}

#[tokio::test]
async fn the_deprecated_cluster_field_works_and_both_together_are_rejected() {
    let upstream = Upstream::start().await;
    let (proxy, port) = start(&upstream, "    max_requests_per_connection: 1\n").await;
    let conns = [
        conn_of(port).await,
        conn_of(port).await,
        conn_of(port).await,
    ];
    assert_eq!(conns, ["0", "1", "2"]);
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_cx_max_requests").await,
        Some(3)
    );
    drop(proxy);

    let port = free_port();
    let extra = format!(
        "    max_requests_per_connection: 1\n{}",
        options("max_requests_per_connection: 3")
    );
    let cluster = static_cluster("web", &[upstream.port], &extra);
    let mut proxy = Proxy::start(&bootstrap(&[cluster], port, ROUTES), &[]);
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(64));
    assert!(
        proxy.stderr().contains(
            "static_resources.clusters[0].max_requests_per_connection: Only one of max_requests_per_connection from Cluster or HttpProtocolOptions can be specified"
        ),
        "{}",
        proxy.stderr()
    );
}

#[tokio::test]
async fn idle_connections_close_after_idle_timeout() {
    let upstream = Upstream::start().await;
    let (proxy, port) = start(&upstream, &options("idle_timeout: 0.3s")).await;
    assert_eq!(conn_of(port).await, "0");
    assert_eq!(conn_of(port).await, "0", "reused while not idle for long");
    assert!(
        eventually(Duration::from_secs(5), async || upstream.closed() == [0]).await,
        "the proxy closed the idle connection"
    );
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_cx_idle_timeout").await,
        Some(1)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_cx_active").await,
        Some(0)
    );
    assert_eq!(conn_of(port).await, "1");
}

#[tokio::test]
async fn connections_close_at_max_connection_duration() {
    let upstream = Upstream::start().await;
    let (proxy, port) = start(&upstream, &options("max_connection_duration: 0.4s")).await;
    assert_eq!(conn_of(port).await, "0");
    assert!(
        eventually(Duration::from_secs(5), async || upstream.closed() == [0]).await,
        "closed at its maximum duration although idle_timeout (1 h) is far away"
    );
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_cx_max_duration_reached").await,
        Some(1)
    );
    assert_eq!(
        stat(&proxy, "cluster.web.upstream_cx_idle_timeout").await,
        Some(0)
    );
    assert_eq!(conn_of(port).await, "1");
}

/// The `tr` (timer) field and the remaining time of the proxy's socket to `port` in
/// `/proc/net/tcp`: timer 2 is the keepalive timer.
fn keepalive_timer(port: u16) -> Option<(u32, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let remote_port = u16::from_str_radix(f.get(2)?.rsplit(':').next()?, 16).ok()?;
        let established = *f.get(3)? == "01";
        if remote_port != port || !established {
            return None;
        }
        let (tr, when) = f.get(5)?.split_once(':')?;
        Some((
            u32::from_str_radix(tr, 16).ok()?,
            u64::from_str_radix(when, 16).ok()?,
        ))
    })
}

#[tokio::test]
async fn tcp_keepalive_is_set_on_upstream_sockets() {
    let upstream = Upstream::start().await;
    let (_proxy, port) = start(
        &upstream,
        "    upstream_connection_options: { tcp_keepalive: { keepalive_time: 7, keepalive_interval: 2, keepalive_probes: 3 } }\n",
    )
    .await;
    assert_eq!(conn_of(port).await, "0");
    let timer = keepalive_timer(upstream.port);
    let Some((tr, when)) = timer else {
        panic!("no established socket to the upstream in /proc/net/tcp");
    };
    assert_eq!(tr, 2, "the keepalive timer runs");
    // Jiffies (USER_HZ is 100 or more): at most 7 s away.
    assert!(when <= 7 * 1000, "{when}");

    let plain = Upstream::start().await;
    let (_proxy, port) = start(&plain, "").await;
    assert_eq!(conn_of(port).await, "0");
    assert_eq!(
        keepalive_timer(plain.port).map(|t| t.0),
        Some(0),
        "no keepalive by default"
    );
}

#[tokio::test]
async fn unsupported_protocol_options_are_named() {
    let upstream = Upstream::start().await;
    let port = free_port();
    let cluster = static_cluster(
        "web",
        &[upstream.port],
        &options("max_headers_count: 10, idle_timeout: 1s"),
    );
    let mut proxy = Proxy::start(&bootstrap(&[cluster], port, ROUTES), &[]);
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(64));
    assert!(
        proxy
            .stderr()
            .contains("common_http_protocol_options.max_headers_count: unsupported field"),
        "{}",
        proxy.stderr()
    );
}
