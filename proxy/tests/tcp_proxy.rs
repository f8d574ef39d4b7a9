//! The TCP proxy and filter chain matching, through the proxy binary with real sockets:
//! echo with half-close, connect failures and retries, missing clusters, idle timeout,
//! weighted clusters, chain selection by source address / destination port / default chain,
//! mixed HTTP and TCP chains, drain, and configuration errors.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use support::*;

const TCP: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

/// A TCP backend: on connect it sends `<name>\n`, then echoes everything; on end of stream
/// from the client it sends `bye <name>\n` and closes.
struct TcpBackend {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpBackend {
    async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    if stream
                        .write_all(format!("{name}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                    let _ = stream.write_all(format!("bye {name}\n").as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { port, task }
    }
}

/// A TCP proxy filter chain (YAML list item at the indentation of `filter_chains` entries).
fn tcp_chain(matcher: &str, config: &str) -> String {
    format!(
        r#"
    - filter_chain_match: {matcher}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {TCP}
          {config}"#
    )
}

/// A listener on 127.0.0.1:`port` with `chains` (and `default`, a chain without its
/// `filter_chain_match` line, if not empty).
fn listener(name: &str, port: u16, chains: &[String], default: &str) -> String {
    let default = if default.is_empty() {
        String::new()
    } else {
        format!("\n    default_filter_chain:{default}")
    };
    format!(
        "  - name: {name}\n    stat_prefix: {name}\n    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}\n    filter_chains:{}{default}\n",
        chains.concat()
    )
}

/// A default chain for [`listener`].
fn default_tcp(config: &str) -> String {
    format!(
        r#"
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {TCP}
          {config}"#
    )
}

fn bootstrap(clusters: &[String], listeners: &[String]) -> String {
    format!(
        "node: {{ id: tcp-0.default, cluster: tcp }}\nadmin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: ADMIN_PORT }} }} }}\nstatic_resources:\n  clusters:\n{}  listeners:\n{}",
        clusters.concat(),
        listeners.concat()
    )
}

async fn start(clusters: &[String], listeners: &[String], args: &[&str]) -> Proxy {
    let proxy = Proxy::start(&bootstrap(clusters, listeners), args);
    proxy.wait_live().await;
    proxy
}

/// Connects to 127.0.0.1:`port` from `source` (127.0.0.1 or 127.0.0.2: all of 127/8 is
/// loopback on Linux).
async fn connect_from(source: &str, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    let source: IpAddr = source.parse().expect("source address");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind the source address");
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("connect")
}

/// Reads one `\n`-terminated line (without it); `None` on end of stream or error.
async fn read_line(stream: &mut TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
            Ok(Ok(1)) if byte[0] == b'\n' => return String::from_utf8(line).ok(),
            Ok(Ok(1)) => line.push(byte[0]),
            _ => return None,
        }
    }
}

/// Reads until end of stream; `None` on error or after 5 s.
async fn read_to_end(stream: &mut TcpStream) -> Option<String> {
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await {
        Ok(Ok(_)) => String::from_utf8(out).ok(),
        _ => None,
    }
}

/// The backend a connection from `source` reaches (its greeting), `None` if it was closed.
async fn backend_of(source: &str, port: u16) -> Option<String> {
    let mut s = connect_from(source, port).await;
    read_line(&mut s).await
}

/// One value of `/stats`.
async fn stat(proxy: &Proxy, name: &str) -> Option<i64> {
    let stats = proxy.admin_get("/stats").await.text();
    stats.lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        if n == name {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

async fn stat_becomes(proxy: &Proxy, name: &str, value: i64) -> bool {
    eventually(Duration::from_secs(5), async || {
        stat(proxy, name).await == Some(value)
    })
    .await
}

#[tokio::test]
async fn echo_with_half_close_and_stats() {
    let echo = TcpBackend::start("echo").await;
    let port = free_port();
    let proxy = start(
        &[static_cluster("echo", &[echo.port], "")],
        &[listener(
            "tcp",
            port,
            &[tcp_chain(
                "{}",
                "stat_prefix: echo\n          cluster: echo",
            )],
            "",
        )],
        &[],
    )
    .await;

    let mut s = connect_from("127.0.0.1", port).await;
    assert_eq!(read_line(&mut s).await.as_deref(), Some("echo"));
    s.write_all(b"hello\n").await.expect("write");
    assert_eq!(read_line(&mut s).await.as_deref(), Some("hello"));
    // Half-close: the client is done sending but still reads what the backend sends after
    // seeing the end of stream.
    s.write_all(b"last\n").await.expect("write");
    s.shutdown().await.expect("shutdown");
    assert_eq!(
        read_to_end(&mut s).await.as_deref(),
        Some("last\nbye echo\n")
    );

    assert!(stat_becomes(&proxy, "tcp.echo.downstream_cx_total", 1).await);
    assert!(stat_becomes(&proxy, "tcp.echo.downstream_cx_rx_bytes_total", 11).await);
    // "echo\n" + "hello\n" + "last\n" + "bye echo\n"
    assert!(stat_becomes(&proxy, "tcp.echo.downstream_cx_tx_bytes_total", 25).await);
    assert!(stat_becomes(&proxy, "cluster.echo.upstream_cx_total", 1).await);
    assert!(stat_becomes(&proxy, "cluster.echo.upstream_cx_active", 0).await);
    assert!(stat_becomes(&proxy, "listener.tcp.downstream_cx_total", 1).await);

    // The upstream closing first: the client reads everything, then end of stream.
    let mut s = connect_from("127.0.0.1", port).await;
    assert_eq!(read_line(&mut s).await.as_deref(), Some("echo"));
    s.write_all(b"x\n").await.expect("write");
    assert_eq!(read_line(&mut s).await.as_deref(), Some("x"));
    drop(s);
    assert!(stat_becomes(&proxy, "cluster.echo.upstream_cx_active", 0).await);
}

#[tokio::test]
async fn connect_failures_missing_clusters_and_retries() {
    let live = TcpBackend::start("live").await;
    let dead = free_port();
    let (port, empty, retry) = (free_port(), free_port(), free_port());
    let proxy = start(
        &[
            static_cluster("dead", &[dead], ""),
            static_cluster("empty", &[], ""),
            static_cluster("mixed", &[dead, live.port], ""),
        ],
        &[
            listener(
                "dead",
                port,
                &[tcp_chain(
                    "{ source_prefix_ranges: [{ address_prefix: 127.0.0.1, prefix_len: 32 }] }",
                    "stat_prefix: dead\n          cluster: dead",
                )],
                &default_tcp("stat_prefix: missing\n          cluster: nowhere"),
            ),
            listener(
                "empty",
                empty,
                &[tcp_chain("{}", "stat_prefix: empty\n          cluster: empty")],
                "",
            ),
            listener(
                "retry",
                retry,
                &[tcp_chain(
                    "{}",
                    "stat_prefix: retry\n          cluster: mixed\n          max_connect_attempts: 2",
                )],
                "",
            ),
        ],
        &[],
    )
    .await;

    // Refused upstream: the downstream connection is closed.
    let started = Instant::now();
    let mut s = connect_from("127.0.0.1", port).await;
    assert_eq!(read_to_end(&mut s).await.as_deref(), Some(""));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(stat_becomes(&proxy, "cluster.dead.upstream_cx_connect_fail", 1).await);

    // A cluster that does not exist: accepted configuration, connections closed.
    assert_eq!(backend_of("127.0.0.2", port).await, None);
    assert!(stat_becomes(&proxy, "tcp.missing.downstream_cx_no_route", 1).await);

    // No host at all.
    assert_eq!(backend_of("127.0.0.1", empty).await, None);
    assert!(stat_becomes(&proxy, "cluster.empty.upstream_cx_none_healthy", 1).await);

    // max_connect_attempts: 2 over [dead, live] (round robin): every connection gets through.
    for _ in 0..4 {
        assert_eq!(
            backend_of("127.0.0.1", retry).await.as_deref(),
            Some("live")
        );
    }
    // Round robin alternates: each connection's first attempt may hit the dead host.
    let fails = stat(&proxy, "cluster.mixed.upstream_cx_connect_fail").await;
    assert!(matches!(fails, Some(1..=4)), "{fails:?}");
    assert!(stat_becomes(&proxy, "cluster.mixed.upstream_cx_total", 4).await);
}

#[tokio::test]
async fn idle_connections_are_closed_after_idle_timeout() {
    let echo = TcpBackend::start("echo").await;
    let port = free_port();
    let proxy = start(
        &[static_cluster("echo", &[echo.port], "")],
        &[listener(
            "tcp",
            port,
            &[tcp_chain(
                "{}",
                "stat_prefix: idle\n          cluster: echo\n          idle_timeout: 1s",
            )],
            "",
        )],
        &[],
    )
    .await;
    let mut s = connect_from("127.0.0.1", port).await;
    assert_eq!(read_line(&mut s).await.as_deref(), Some("echo"));
    // Activity keeps it open.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(b"ping\n").await.expect("write");
        assert_eq!(read_line(&mut s).await.as_deref(), Some("ping"));
    }
    let quiet = Instant::now();
    assert_eq!(read_to_end(&mut s).await.as_deref(), Some(""));
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    assert!(stat_becomes(&proxy, "tcp.idle.idle_timeout", 1).await);
}

#[tokio::test]
async fn weighted_clusters_follow_their_weights() {
    let a = TcpBackend::start("a").await;
    let b = TcpBackend::start("b").await;
    let port = free_port();
    let _proxy = start(
        &[
            static_cluster("a", &[a.port], ""),
            static_cluster("b", &[b.port], ""),
        ],
        &[listener(
            "tcp",
            port,
            &[tcp_chain(
                "{}",
                "stat_prefix: w\n          weighted_clusters: { clusters: [{ name: a, weight: 1 }, { name: b, weight: 3 }] }",
            )],
            "",
        )],
        &[],
    )
    .await;
    let mut b_count = 0;
    let n = 200;
    for _ in 0..n {
        match backend_of("127.0.0.1", port).await.as_deref() {
            Some("b") => b_count += 1,
            Some("a") => {}
            other => panic!("unexpected backend {other:?}"),
        }
    }
    // Expected 150 of 200; 110..=185 is far outside any plausible random deviation.
    assert!((110..=185).contains(&b_count), "b got {b_count} of {n}");
}

#[tokio::test]
async fn filter_chains_are_selected_like_envoy() {
    let a = TcpBackend::start("a").await;
    let b = TcpBackend::start("b").await;
    let c = TcpBackend::start("c").await;
    let http = Backend::start("http").await;
    let (p1, p2, p3, p4) = (free_port(), free_port(), free_port(), free_port());
    let from_2 = "{ source_prefix_ranges: [{ address_prefix: 127.0.0.2, prefix_len: 32 }] }";
    let hcm_chain = format!(
        r#"
    - filter_chain_match: {from_2}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: mixed
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - {{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: http }} }}] }}"#
    );
    let proxy = start(
        &[
            static_cluster("a", &[a.port], ""),
            static_cluster("b", &[b.port], ""),
            static_cluster("c", &[c.port], ""),
            static_cluster("http", &[http.port()], ""),
        ],
        &[
            // Source address, else the default chain (the destination port chain names
            // another port).
            listener(
                "source",
                p1,
                &[
                    tcp_chain(from_2, "stat_prefix: a\n          cluster: a"),
                    tcp_chain(
                        &format!("{{ destination_port: {p2} }}"),
                        "stat_prefix: c\n          cluster: c",
                    ),
                ],
                &default_tcp("stat_prefix: b\n          cluster: b"),
            ),
            // The destination port is matched first: it wins over the source address.
            listener(
                "port",
                p2,
                &[
                    tcp_chain(from_2, "stat_prefix: a\n          cluster: a"),
                    tcp_chain(
                        &format!("{{ destination_port: {p2} }}"),
                        "stat_prefix: c\n          cluster: c",
                    ),
                ],
                "",
            ),
            // No default chain: unmatched connections are closed.
            listener(
                "nodefault",
                p3,
                &[tcp_chain(from_2, "stat_prefix: a\n          cluster: a")],
                "",
            ),
            // HTTP for one source, TCP for the others.
            listener(
                "mixed",
                p4,
                &[hcm_chain],
                &default_tcp("stat_prefix: b\n          cluster: b"),
            ),
        ],
        &[],
    )
    .await;

    assert_eq!(backend_of("127.0.0.2", p1).await.as_deref(), Some("a"));
    assert_eq!(backend_of("127.0.0.1", p1).await.as_deref(), Some("b"));
    assert_eq!(backend_of("127.0.0.2", p2).await.as_deref(), Some("c"));
    assert_eq!(backend_of("127.0.0.1", p2).await.as_deref(), Some("c"));
    assert_eq!(backend_of("127.0.0.2", p3).await.as_deref(), Some("a"));
    assert_eq!(backend_of("127.0.0.1", p3).await, None);
    assert!(stat_becomes(&proxy, "listener.nodefault.no_filter_chain_match", 1).await);
    assert!(stat_becomes(&proxy, "listener.nodefault.downstream_cx_total", 1).await);

    assert_eq!(backend_of("127.0.0.1", p4).await.as_deref(), Some("b"));
    let mut s = connect_from("127.0.0.2", p4).await;
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let response = read_to_end(&mut s).await.unwrap_or_default();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("x-backend: http"),
        "{response}"
    );
    assert!(stat_becomes(&proxy, "http.mixed.downstream_rq_total", 1).await);
}

#[tokio::test]
async fn tcp_connections_close_when_the_drain_time_ends() {
    let echo = TcpBackend::start("echo").await;
    let port = free_port();
    let mut proxy = start(
        &[static_cluster("echo", &[echo.port], "")],
        &[listener(
            "tcp",
            port,
            &[tcp_chain(
                "{}",
                "stat_prefix: echo\n          cluster: echo",
            )],
            "",
        )],
        &["--drain-time-s", "1"],
    )
    .await;
    let mut s = connect_from("127.0.0.1", port).await;
    assert_eq!(read_line(&mut s).await.as_deref(), Some("echo"));
    let signalled = Instant::now();
    proxy.signal("TERM");
    // Still proxying during the drain time.
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(b"during drain\n").await.expect("write");
    assert_eq!(read_line(&mut s).await.as_deref(), Some("during drain"));
    // Closed when it ends.
    assert_eq!(read_to_end(&mut s).await.as_deref(), Some(""));
    let closed = signalled.elapsed();
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(4),
        "closed after {closed:?}"
    );
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test]
async fn configuration_errors_are_named() {
    let port = free_port();
    let chains = [
        tcp_chain(
            "{ server_names: ['a.*.example'] }",
            "stat_prefix: a\n          cluster: a",
        ),
        tcp_chain(
            "{ transport_protocol: quic }",
            "stat_prefix: a\n          cluster: a\n          access_log: [{ name: x }]",
        ),
        tcp_chain(
            "{ application_protocols: [h2] }",
            "stat_prefix: a\n          cluster: a",
        ),
    ];
    let mut proxy = Proxy::start(
        &bootstrap(
            &[static_cluster("a", &[1], "")],
            &[listener("bad", port, &chains, "")],
        ),
        &[],
    );
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(64));
    let stderr = proxy.stderr();
    for expected in [
        "static_resources.listeners[0].filter_chains[0].filter_chain_match.server_names[0]: \"a.*.example\" is not a server name",
        "static_resources.listeners[0].filter_chains[1].filter_chain_match.transport_protocol: unsupported value quic (supported: raw_buffer, tls)",
        "static_resources.listeners[0].filter_chains[1].filters[0].typed_config.access_log: unsupported field",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }

    let same = [
        tcp_chain(
            "{ destination_port: 80 }",
            "stat_prefix: a\n          cluster: a",
        ),
        tcp_chain(
            "{ destination_port: 80 }",
            "stat_prefix: b\n          cluster: a",
        ),
    ];
    let mut proxy = Proxy::start(
        &bootstrap(
            &[static_cluster("a", &[1], "")],
            &[listener("same", port, &same, "")],
        ),
        &[],
    );
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)).await, Some(64));
    let stderr = proxy.stderr();
    assert!(
        stderr.contains("static_resources.listeners[0].filter_chains[1].filter_chain_match: filter chain 'filter_chains[1]' has the same matching rules defined as 'filter_chains[0]'"),
        "{stderr}"
    );
}

/// LDS: a TCP proxy listener warms at once (no RDS); an update on the same address takes over
/// the socket, and the old listener's TCP connections keep flowing for the drain time, then
/// are closed.
mod lds {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use capstan_control_plane::xds::{ResourceSource, Resources, XdsServer};
    use capstan_proxy::xds::{CLUSTER_TYPE, LISTENER_TYPE};
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::google::protobuf::Any;
    use envoy_types::util::pack_any;
    use tokio::sync::watch;

    use super::*;

    struct Source {
        items: Mutex<BTreeMap<(&'static str, String), Any>>,
        changes: watch::Sender<u64>,
    }

    impl Source {
        fn put(&self, type_url: &'static str, name: &str, any: Any) {
            self.items
                .lock()
                .expect("lock")
                .insert((type_url, name.to_string()), any);
            self.changes.send_modify(|v| *v += 1);
        }
    }

    impl ResourceSource for Source {
        fn resources_for(&self, _node: &Node) -> Arc<Resources> {
            let mut r = Resources::default();
            for ((t, n), any) in self.items.lock().expect("lock").iter() {
                r.by_type
                    .entry((*t).to_string())
                    .or_default()
                    .insert(n.clone(), any.clone());
            }
            Arc::new(r)
        }

        fn changes(&self) -> watch::Receiver<u64> {
            self.changes.subscribe()
        }
    }

    fn yaml<M: prost::Message + prost::Name + Default>(text: &str) -> Any {
        pack_any(capstan_proto::from_yaml::<M>(text).expect("test resource parses"))
    }

    fn cluster(name: &str, port: u16) -> Any {
        yaml::<Cluster>(&format!(
            "name: {name}\ntype: STATIC\nconnect_timeout: 1s\nload_assignment: {{ cluster_name: {name}, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}] }}\n"
        ))
    }

    fn tcp_listener(port: u16, cluster: &str) -> Any {
        yaml::<Listener>(&format!(
            r#"name: tcp
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": {TCP}
      stat_prefix: tcp
      cluster: {cluster}
"#
        ))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn tcp_listeners_warm_at_once_and_drain_on_update() {
        let one = TcpBackend::start("one").await;
        let two = TcpBackend::start("two").await;
        let source = Arc::new(Source {
            items: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
        });
        let xds = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let xds_port = xds.local_addr().expect("addr").port();
        let server = XdsServer::new(source.clone());
        tokio::spawn(async move {
            let _ = server.serve(xds, std::future::pending::<()>()).await;
        });
        let port = free_port();
        source.put(CLUSTER_TYPE, "one", cluster("one", one.port));
        source.put(CLUSTER_TYPE, "two", cluster("two", two.port));
        source.put(LISTENER_TYPE, "tcp", tcp_listener(port, "one"));
        let bootstrap = format!(
            r#"node: {{ id: tcp-0.default, cluster: tcp }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: ADMIN_PORT }} }} }}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}]
  cds_config: {{ ads: {{}} }}
  lds_config: {{ ads: {{}} }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {xds_port} }} }} }}
"#
        );
        let proxy = Proxy::start(&bootstrap, &["--drain-time-s", "1"]);
        proxy.wait_live().await;
        let mut old = connect_from("127.0.0.1", port).await;
        assert_eq!(read_line(&mut old).await.as_deref(), Some("one"));

        source.put(LISTENER_TYPE, "tcp", tcp_listener(port, "two"));
        assert!(
            eventually(Duration::from_secs(10), async || {
                backend_of("127.0.0.1", port).await.as_deref() == Some("two")
            })
            .await,
            "the updated listener did not take over:\n{}",
            proxy.stderr()
        );
        let replaced = Instant::now();
        assert!(stat_becomes(&proxy, "listener_manager.listener_modified", 1).await);
        // The old listener's connection keeps flowing while it drains...
        old.write_all(b"still\n").await.expect("write");
        assert_eq!(read_line(&mut old).await.as_deref(), Some("still"));
        // ...and is closed when the drain time ends.
        assert_eq!(read_to_end(&mut old).await.as_deref(), Some(""));
        let closed = replaced.elapsed();
        assert!(
            closed >= Duration::from_millis(500) && closed < Duration::from_secs(4),
            "closed after {closed:?}"
        );
    }
}
