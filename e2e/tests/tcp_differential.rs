//! Differential test of the TCP proxy and filter chain matching: the same static bootstrap run
//! by stock Envoy and by capstan-proxy. A listener with TCP proxy chains selected by source
//! address (longest prefix, no backtracking to less specific chains, a default chain naming a
//! cluster that does not exist, a cluster whose host refuses connections) routes to two echo backends that greet with their name; from
//! each source address both proxies must reach the same backend (or close the connection), and
//! pass a half-close through the same way.
//!
//! Needs `envoy` on PATH (scripts/test.sh installs it); under `CI=true` its absence fails.

use std::net::SocketAddr;
use std::time::Duration;

use capstan_e2e::process::{Peer, free_port, start_static_peer, temp_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

const TCP: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";

/// An echo backend: greets with `<name>\n`, echoes, answers end of stream with `bye <name>\n`
/// and closes.
async fn echo_backend(name: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(format!("bye {name}\n").as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

fn chain(matcher: &str, cluster: &str) -> String {
    format!(
        r#"
    - filter_chain_match: {matcher}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {TCP}
          stat_prefix: {cluster}
          cluster: {cluster}"#
    )
}

fn bootstrap(admin: u16, listener: u16, a: u16, b: u16, dead: u16) -> String {
    let cluster = |name: &str, port: u16| {
        format!(
            "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}\n"
        )
    };
    let chains = [
        chain(
            "{ source_prefix_ranges: [{ address_prefix: 127.0.0.2, prefix_len: 32 }] }",
            "a",
        ),
        chain(
            "{ source_prefix_ranges: [{ address_prefix: 127.0.0.0, prefix_len: 24 }] }",
            "b",
        ),
        // The longest prefix for 127.0.0.4, but its source port never matches: no fall back
        // to the /24 chain, the default chain takes it.
        chain(
            "{ source_prefix_ranges: [{ address_prefix: 127.0.0.4, prefix_len: 32 }], source_ports: [1] }",
            "a",
        ),
        // Nothing listens on the backend port: the connection is closed.
        chain(
            "{ source_prefix_ranges: [{ address_prefix: 127.0.0.5, prefix_len: 32 }] }",
            "dead",
        ),
        // A destination port other than the listener's: never selected.
        chain(&format!("{{ destination_port: {} }}", listener ^ 1), "a"),
    ];
    format!(
        r#"node: {{ id: tcp-diff.default, cluster: tcp-diff }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  clusters:
{ca}{cb}{cd}  listeners:
  - name: tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener} }} }}
    filter_chains:{chains}
    default_filter_chain:
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": {TCP}
          stat_prefix: nowhere
          cluster: nowhere
"#,
        ca = cluster("a", a),
        cb = cluster("b", b),
        cd = cluster("dead", dead),
        chains = chains.concat(),
    )
}

/// What a connection from `source` saw: the greeting, and everything after a half-close.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    source: &'static str,
    transcript: Option<String>,
}

async fn observe(source: &'static str, port: u16) -> Seen {
    let transcript = async {
        let socket = TcpSocket::new_v4().ok()?;
        let ip: std::net::IpAddr = source.parse().ok()?;
        socket.bind(SocketAddr::new(ip, 0)).ok()?;
        let mut s = socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .ok()?;
        // Whatever arrives before end of stream; a closed connection reads nothing.
        let mut greeting = [0u8; 2];
        let n = s.read(&mut greeting).await.ok()?;
        if n == 0 {
            return Some(String::new());
        }
        s.write_all(b"ping\n").await.ok()?;
        s.shutdown().await.ok()?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.ok()?;
        let mut all = greeting[..n].to_vec();
        all.extend(rest);
        String::from_utf8(all).ok()
    };
    Seen {
        source,
        transcript: tokio::time::timeout(Duration::from_secs(5), transcript)
            .await
            .ok()
            .flatten(),
    }
}

const SOURCES: [&str; 6] = [
    "127.0.0.1",
    "127.0.0.2",
    "127.0.0.3",
    "127.0.0.4",
    "127.0.0.5",
    "127.0.1.1",
];

async fn observe_all(port: u16) -> Vec<Seen> {
    let mut out = Vec::new();
    for source in SOURCES {
        out.push(observe(source, port).await);
    }
    out
}

#[tokio::test]
async fn tcp_chains_select_the_same_backend_as_envoy() {
    let work = temp_dir("tcp-differential");
    let a = echo_backend("a").await;
    let b = echo_backend("b").await;
    let dead = free_port();
    let envoy_port = free_port();
    let Some(envoy) = start_static_peer(Peer::Envoy, &work, |admin| {
        bootstrap(admin, envoy_port, a, b, dead)
    })
    .await
    else {
        eprintln!("envoy is not on PATH; differential TCP test not run");
        return;
    };
    let proxy_port = free_port();
    let proxy = start_static_peer(Peer::Capstan, &work, |admin| {
        bootstrap(admin, proxy_port, a, b, dead)
    })
    .await
    .expect("capstan-proxy starts");
    let (envoy_admin, proxy_admin) = (envoy.admin.port(), proxy.admin.port());

    let through_envoy = observe_all(envoy_port).await;
    let through_proxy = observe_all(proxy_port).await;
    assert_eq!(
        through_proxy, through_envoy,
        "capstan-proxy and Envoy disagree (left: capstan-proxy, right: Envoy)"
    );
    // And the agreement is the intended one, not two identical failures.
    let expected = [
        Some("b\nping\nbye b\n"),
        Some("a\nping\nbye a\n"),
        Some("b\nping\nbye b\n"),
        Some(""),
        Some(""),
        Some(""),
    ];
    let got: Vec<Option<&str>> = through_proxy
        .iter()
        .map(|s| s.transcript.as_deref())
        .collect();
    assert_eq!(got, expected, "{through_proxy:#?}");

    // Both count the connection to the missing cluster as Envoy does.
    for (name, admin) in [("envoy", envoy_admin), ("capstan-proxy", proxy_admin)] {
        let stats = capstan_e2e::client::get(([127, 0, 0, 1], admin).into(), "admin", "/stats")
            .await
            .map(|r| r.body)
            .unwrap_or_default();
        assert!(
            stats.contains("tcp.nowhere.downstream_cx_no_route: 2"),
            "{name}: no_route not counted:\n{stats}"
        );
        for expected in [
            "tcp.a.downstream_cx_total: 1",
            "tcp.dead.downstream_cx_total: 1",
            "cluster.dead.upstream_cx_connect_fail: 1",
            "cluster.b.upstream_cx_total: 2",
            "cluster.b.upstream_cx_active: 0",
        ] {
            assert!(
                stats.contains(expected),
                "{name}: no {expected:?} in\n{stats}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}
