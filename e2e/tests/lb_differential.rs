//! Differential test of the load balancers: the same static bootstrap run by stock Envoy and by
//! capstan-proxy, four test backends that name themselves (`x-backend`), one route per
//! cluster.
//!
//! - Share tests, 10 000 requests each: weighted ROUND_ROBIN, weighted LEAST_REQUEST (one
//!   request at a time, so the weights alone decide), RANDOM with weights (which Envoy
//!   ignores), two priority levels with one priority-0 host UNHEALTHY (load 70/30 from the
//!   overprovisioning factor 1.4), panic mode (one of four hosts healthy), and
//!   locality-weighted round robin (zone weights 1 and 3, one host of the heavier zone
//!   UNHEALTHY: effective weights 1 and 3 × min(1, 1.4 × ½) = 2.1). Each backend's
//!   count must be within 5 standard deviations of a binomial around the expected share (in
//!   both proxies), and the two proxies within 5·√2 standard deviations of each other (the
//!   difference of two independent binomials); an expected share of 0 must be exactly 0.
//! - Hash tests: RING_HASH and MAGLEV (weighted; Maglev with one UNHEALTHY host) hashed on a
//!   request header (after a terminal policy that finds nothing): for 300 distinct keys the
//!   backend must be IDENTICAL through both. The same for the ring hashed on a query parameter
//!   (percent-encoded keys included), on a cookie, on `host` (`:authority`), and on the
//!   source IP (20 loopback
//!   addresses). A cookie policy with a `ttl` and no cookie must answer with the same
//!   `Set-Cookie` as Envoy: the hex xxHash64 of the connection's addresses.
//!
//! Needs `envoy` on PATH (scripts/test.sh installs it); under `CI=true` its absence fails.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use capstan_e2e::process::{Peer, free_port, start_static_peer, temp_dir};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

const BACKENDS: [&str; 4] = ["a", "b", "c", "d"];
const REQUESTS: usize = 10_000;
const HASH_KEYS: usize = 300;

/// One endpoint: backend index, weight, priority, health status.
type Ep = (usize, u32, u32, &'static str);

/// Locality-weighted clusters: per endpoint backend index, zone, zone weight, health status.
type ZoneEp = (usize, &'static str, u32, &'static str);

const ZONES_RR: &[ZoneEp] = &[
    (0, "z1", 1, "HEALTHY"),
    (1, "z1", 1, "HEALTHY"),
    (2, "z2", 3, "HEALTHY"),
    (3, "z2", 3, "UNHEALTHY"),
];
const ZONES_RING: &[ZoneEp] = &[
    (0, "z1", 1, "HEALTHY"),
    (1, "z1", 1, "HEALTHY"),
    (2, "z2", 2, "HEALTHY"),
    (3, "z3", 1, "HEALTHY"),
];

fn zone_cluster(name: &str, policy: &str, eps: &[ZoneEp], ports: &[u16; 4]) -> String {
    let mut zones: BTreeMap<(&str, u32), Vec<&ZoneEp>> = BTreeMap::new();
    for e in eps {
        zones.entry((e.1, e.2)).or_default().push(e);
    }
    let mut localities = String::new();
    for ((zone, weight), eps) in zones {
        localities.push_str(&format!(
            "      - locality: {{ zone: {zone} }}\n        load_balancing_weight: {weight}\n        lb_endpoints:\n"
        ));
        for (backend, _, _, health) in eps {
            localities.push_str(&format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}\n          health_status: {health}\n",
                ports[*backend]
            ));
        }
    }
    format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    lb_policy: {policy}\n    common_lb_config: {{ locality_weighted_lb_config: {{}} }}\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n{localities}"
    )
}

/// A share scenario: route prefix (= cluster name), policy, endpoints, expected shares,
/// concurrent connections.
struct Scenario {
    name: &'static str,
    policy: &'static str,
    endpoints: &'static [Ep],
    expected: [f64; 4],
    connections: usize,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "rr",
        policy: "ROUND_ROBIN",
        endpoints: &[
            (0, 1, 0, "HEALTHY"),
            (1, 2, 0, "HEALTHY"),
            (2, 3, 0, "HEALTHY"),
            (3, 4, 0, "HEALTHY"),
        ],
        expected: [0.1, 0.2, 0.3, 0.4],
        connections: 4,
    },
    Scenario {
        name: "lr",
        policy: "LEAST_REQUEST",
        endpoints: &[
            (0, 1, 0, "HEALTHY"),
            (1, 2, 0, "HEALTHY"),
            (2, 3, 0, "HEALTHY"),
            (3, 4, 0, "HEALTHY"),
        ],
        expected: [0.1, 0.2, 0.3, 0.4],
        // One at a time: no host has active requests at a pick, so weights alone decide.
        connections: 1,
    },
    Scenario {
        name: "random",
        policy: "RANDOM",
        endpoints: &[
            (0, 1, 0, "HEALTHY"),
            (1, 2, 0, "HEALTHY"),
            (2, 3, 0, "HEALTHY"),
            (3, 4, 0, "HEALTHY"),
        ],
        // Envoy's random balancer ignores endpoint weights.
        expected: [0.25, 0.25, 0.25, 0.25],
        connections: 4,
    },
    Scenario {
        name: "prio",
        policy: "ROUND_ROBIN",
        endpoints: &[
            (0, 1, 0, "HEALTHY"),
            (1, 1, 0, "UNHEALTHY"),
            (2, 1, 1, "HEALTHY"),
            (3, 1, 1, "HEALTHY"),
        ],
        // P0 health = 1.4 × 1/2 = 70 %; the remaining 30 % spills to P1.
        expected: [0.70, 0.0, 0.15, 0.15],
        connections: 4,
    },
    Scenario {
        name: "zones",
        policy: "ROUND_ROBIN",
        endpoints: &[],
        expected: [1.0 / 6.2, 1.0 / 6.2, 2.1 / 3.1, 0.0],
        connections: 4,
    },
    Scenario {
        name: "panic",
        policy: "ROUND_ROBIN",
        endpoints: &[
            (0, 1, 0, "HEALTHY"),
            (1, 1, 0, "UNHEALTHY"),
            (2, 1, 0, "UNHEALTHY"),
            (3, 1, 0, "DRAINING"),
        ],
        // 25 % healthy < the 50 % panic threshold: all four hosts.
        expected: [0.25, 0.25, 0.25, 0.25],
        connections: 4,
    },
];

const RING: &[Ep] = &[
    (0, 1, 0, "HEALTHY"),
    (1, 1, 0, "HEALTHY"),
    (2, 2, 0, "HEALTHY"),
    (3, 1, 0, "HEALTHY"),
];
const MAGLEV: &[Ep] = &[
    (0, 1, 0, "HEALTHY"),
    (1, 2, 0, "HEALTHY"),
    (2, 1, 0, "HEALTHY"),
    (3, 3, 0, "UNHEALTHY"),
];

fn cluster(name: &str, policy: &str, eps: &[Ep], ports: &[u16; 4]) -> String {
    let mut by_priority: BTreeMap<u32, Vec<&Ep>> = BTreeMap::new();
    for e in eps {
        by_priority.entry(e.2).or_default().push(e);
    }
    let mut localities = String::new();
    for (priority, eps) in by_priority {
        localities.push_str(&format!(
            "      - priority: {priority}\n        lb_endpoints:\n"
        ));
        for (backend, weight, _, health) in eps {
            localities.push_str(&format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}\n          load_balancing_weight: {weight}\n          health_status: {health}\n",
                ports[*backend]
            ));
        }
    }
    format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    lb_policy: {policy}\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n{localities}"
    )
}

fn bootstrap(admin: u16, listener: u16, ports: &[u16; 4]) -> String {
    let mut clusters = String::new();
    let mut routes = String::new();
    for s in SCENARIOS {
        if s.name == "zones" {
            clusters.push_str(&zone_cluster(s.name, s.policy, ZONES_RR, ports));
        } else {
            clusters.push_str(&cluster(s.name, s.policy, s.endpoints, ports));
        }
        routes.push_str(&format!(
            "              - match: {{ prefix: \"/{0}/\" }}\n                route: {{ cluster: {0} }}\n",
            s.name
        ));
    }
    clusters.push_str(&cluster("ring", "RING_HASH", RING, ports));
    clusters.push_str(&cluster("maglev", "MAGLEV", MAGLEV, ports));
    clusters.push_str(&zone_cluster("ring-zones", "RING_HASH", ZONES_RING, ports));
    clusters.push_str(&zone_cluster("maglev-zones", "MAGLEV", ZONES_RING, ports));
    for name in ["ring", "maglev", "ring-zones", "maglev-zones"] {
        routes.push_str(&format!(
            "              - match: {{ prefix: \"/{name}/\" }}\n                route: {{ cluster: {name}, hash_policy: [ {{ header: {{ header_name: x-missing }}, terminal: true }}, {{ header: {{ header_name: x-key }} }} ] }}\n"
        ));
    }
    for (prefix, policy) in [
        ("ring-query", "{ query_parameter: { name: u } }"),
        (
            "ring-cookie",
            "{ cookie: { name: sess, ttl: 60s, path: /, attributes: [ { name: SameSite, value: Lax } ] } }",
        ),
        ("ring-ip", "{ connection_properties: { source_ip: true } }"),
        ("ring-host", "{ header: { header_name: host } }"),
    ] {
        routes.push_str(&format!(
            "              - match: {{ prefix: \"/{prefix}/\" }}\n                route: {{ cluster: ring, hash_policy: [ {policy} ] }}\n"
        ));
    }
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  clusters:
{clusters}  listeners:
  - name: http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: lb
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    )
}

/// A minimal keep-alive HTTP/1.1 backend answering every (bodiless) request with an empty
/// 200 naming itself in `x-backend`: tens of thousands of requests must stay cheap, so no JSON
/// echo as in `capstan_e2e::backend`.
async fn backend(name: &'static str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let port = listener.local_addr().expect("address").port();
    let response =
        format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-backend: {name}\r\n\r\n").into_bytes();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if s.write_all(&response).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

/// A keep-alive HTTP/1.1 connection.
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    local: SocketAddr,
    last_set_cookie: Option<String>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Self {
        Self::open_from(addr, [127, 0, 0, 1].into()).await
    }

    async fn open_from(addr: SocketAddr, source: std::net::IpAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(source, 0)).expect("bind");
        let stream = socket.connect(addr).await.expect("connect to the proxy");
        let local = stream.local_addr().expect("local address");
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Self {
            sender,
            local,
            last_set_cookie: None,
        }
    }

    /// The backend that answered `GET path` (with `x-key: key` if given).
    async fn backend(&mut self, path: &str, key: Option<&str>) -> String {
        self.get(path, key.map(|k| ("x-key", k))).await
    }

    /// The backend that answered `GET path` with an optional extra header.
    async fn get(&mut self, path: &str, header: Option<(&str, &str)>) -> String {
        self.sender.ready().await.expect("connection stays open");
        let host = match header {
            Some(("host", h)) => h,
            _ => "lb",
        };
        let mut req = hyper::Request::get(path).header("host", host);
        if let Some((k, v)) = header.filter(|(k, _)| *k != "host") {
            req = req.header(k, v);
        }
        let response = self
            .sender
            .send_request(req.body(Empty::new()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        self.last_set_cookie = response
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let backend = response
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let _ = response.into_body().collect().await;
        backend.unwrap_or_else(|| panic!("{path}: status {status} without x-backend"))
    }
}

/// Per-backend counts of `REQUESTS` requests to `/name/` over `connections` connections.
async fn shares(addr: SocketAddr, name: &str, connections: usize) -> [usize; 4] {
    let per = REQUESTS / connections;
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let path = format!("/{name}/");
            tokio::spawn(async move {
                let mut conn = Conn::open(addr).await;
                let mut counts = [0usize; 4];
                for _ in 0..per {
                    let b = conn.backend(&path, None).await;
                    let i = BACKENDS
                        .iter()
                        .position(|x| *x == b)
                        .unwrap_or_else(|| panic!("unknown backend {b}"));
                    counts[i] += 1;
                }
                counts
            })
        })
        .collect();
    let mut total = [0usize; 4];
    for t in tasks {
        let c = t.await.expect("client task");
        for i in 0..4 {
            total[i] += c[i];
        }
    }
    total
}

/// The backend chosen for each of `HASH_KEYS` keys on `/name/`.
async fn hashed(addr: SocketAddr, name: &str) -> Vec<String> {
    let mut conn = Conn::open(addr).await;
    let mut out = Vec::with_capacity(HASH_KEYS);
    for k in 0..HASH_KEYS {
        out.push(
            conn.backend(&format!("/{name}/"), Some(&format!("user-{k}")))
                .await,
        );
    }
    out
}

/// The backend chosen for each key through the other hash policies: query parameter, cookie,
/// `host`, source IP.
async fn hashed_other(addr: SocketAddr) -> Vec<String> {
    let mut conn = Conn::open(addr).await;
    let mut out = Vec::new();
    for k in 0..HASH_KEYS {
        let key = match k % 3 {
            0 => format!("user-{k}"),
            1 => format!("user%20{k}"),
            _ => format!("user+{k}"),
        };
        out.push(
            conn.get(&format!("/ring-query/?x=1&u={key}&u=other"), None)
                .await,
        );
    }
    for k in 0..HASH_KEYS {
        let cookie = format!("a=b; sess=\"s-{k}\"");
        out.push(conn.get("/ring-cookie/", Some(("cookie", &cookie))).await);
    }
    for k in 0..100 {
        let host = format!("h-{k}");
        out.push(conn.get("/ring-host/", Some(("host", &host))).await);
    }
    for i in 2..22u8 {
        let mut c = Conn::open_from(addr, [127, 0, 0, i].into()).await;
        out.push(c.get("/ring-ip/", None).await);
    }
    out
}

/// A request without the cookie: the `Set-Cookie` it got, and the one expected from the
/// connection's addresses.
async fn generated_cookie(addr: SocketAddr) -> (Option<String>, String) {
    let mut conn = Conn::open(addr).await;
    conn.get("/ring-cookie/", None).await;
    let value = format!(
        "{:016x}",
        xxhash_rust::xxh64::xxh64(format!("{}{addr}", conn.local).as_bytes(), 0)
    );
    (
        conn.last_set_cookie.clone(),
        format!("sess=\"{value}\"; Max-Age=60; Path=/; SameSite=Lax; HttpOnly"),
    )
}

async fn stat(admin: SocketAddr, name: &str) -> Option<u64> {
    let body = capstan_e2e::client::get(admin, "admin", "/stats")
        .await
        .ok()?
        .body;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancers_agree_with_envoy() {
    let work = temp_dir("lb-differential");
    let mut ports = [0u16; 4];
    for (i, name) in BACKENDS.iter().enumerate() {
        ports[i] = backend(name).await;
    }
    let (envoy_port, proxy_port) = (free_port(), free_port());
    let Some(envoy) = start_static_peer(Peer::Envoy, &work, |admin| {
        bootstrap(admin, envoy_port, &ports)
    })
    .await
    else {
        eprintln!("envoy is not on PATH; differential load balancing test not run");
        return;
    };
    let proxy = start_static_peer(Peer::Capstan, &work, |admin| {
        bootstrap(admin, proxy_port, &ports)
    })
    .await
    .expect("capstan-proxy starts");
    let envoy_addr: SocketAddr = ([127, 0, 0, 1], envoy_port).into();
    let proxy_addr: SocketAddr = ([127, 0, 0, 1], proxy_port).into();

    let mut report = String::new();
    let mut failures = Vec::new();
    // Every scenario at once, through both proxies (clusters do not share hosts' request
    // counts, so least request still sees one request at a time on its cluster).
    let runs: Vec<_> = SCENARIOS
        .iter()
        .map(|s| {
            (
                tokio::spawn(shares(envoy_addr, s.name, s.connections)),
                tokio::spawn(shares(proxy_addr, s.name, s.connections)),
            )
        })
        .collect();
    for (s, (e, p)) in SCENARIOS.iter().zip(runs) {
        let (e, p) = (
            e.await.expect("envoy run"),
            p.await.expect("capstan-proxy run"),
        );
        let n = (REQUESTS / s.connections * s.connections) as f64;
        report.push_str(&format!(
            "{:>6}: envoy {e:?} capstan-proxy {p:?} expected {:?}\n",
            s.name,
            s.expected.map(|x| (x * n).round() as usize)
        ));
        for i in 0..4 {
            let share = s.expected[i];
            if share == 0.0 {
                if e[i] != 0 || p[i] != 0 {
                    failures.push(format!("{} {}: expected no requests", s.name, BACKENDS[i]));
                }
                continue;
            }
            let sd = (n * share * (1.0 - share)).sqrt();
            let mean = n * share;
            for (who, got) in [("envoy", e[i]), ("capstan-proxy", p[i])] {
                if (got as f64 - mean).abs() > 5.0 * sd {
                    failures.push(format!(
                        "{} {} through {who}: {got}, expected {mean} ± {:.0}",
                        s.name,
                        BACKENDS[i],
                        5.0 * sd
                    ));
                }
            }
            if (e[i] as f64 - p[i] as f64).abs() > 5.0 * 2f64.sqrt() * sd {
                failures.push(format!(
                    "{} {}: envoy {} vs capstan-proxy {} differ by more than {:.0}",
                    s.name,
                    BACKENDS[i],
                    e[i],
                    p[i],
                    5.0 * 2f64.sqrt() * sd
                ));
            }
        }
    }

    for name in ["ring", "maglev", "ring-zones", "maglev-zones"] {
        let (e, p) = tokio::join!(hashed(envoy_addr, name), hashed(proxy_addr, name));
        let differ: Vec<usize> = (0..HASH_KEYS).filter(|&k| e[k] != p[k]).collect();
        let distinct: std::collections::BTreeSet<&String> = e.iter().collect();
        report.push_str(&format!(
            "{name:>6}: {} of {HASH_KEYS} keys differ; envoy used {distinct:?}\n",
            differ.len()
        ));
        if !differ.is_empty() {
            failures.push(format!(
                "{name}: keys {:?} go elsewhere (first: user-{} envoy {} capstan-proxy {})",
                &differ[..differ.len().min(10)],
                differ[0],
                e[differ[0]],
                p[differ[0]]
            ));
        }
        if distinct.len() < 3 {
            failures.push(format!("{name}: only {distinct:?} chosen"));
        }
        if name == "maglev" && distinct.contains(&"d".to_string()) {
            failures.push("maglev: the UNHEALTHY host was chosen".to_string());
        }
    }

    let (e, p) = tokio::join!(hashed_other(envoy_addr), hashed_other(proxy_addr));
    let differ: Vec<usize> = (0..e.len()).filter(|&k| e[k] != p[k]).collect();
    report.push_str(&format!(
        "query/cookie/host/source-ip: {} of {} requests differ\n",
        differ.len(),
        e.len()
    ));
    if !differ.is_empty() {
        failures.push(format!(
            "query/cookie/host/source-ip: requests {:?} go elsewhere",
            &differ[..differ.len().min(10)]
        ));
    }
    for (who, addr) in [("envoy", envoy_addr), ("capstan-proxy", proxy_addr)] {
        let (got, expected) = generated_cookie(addr).await;
        if got.as_deref() != Some(expected.as_str()) {
            failures.push(format!("{who}: Set-Cookie {got:?}, expected {expected:?}"));
        }
    }

    // Panic mode is counted the same way: once per request of the panic scenario.
    for (who, admin) in [("envoy", envoy.admin), ("capstan-proxy", proxy.admin)] {
        let panics = stat(admin, "cluster.panic.lb_healthy_panic").await;
        if panics != Some(REQUESTS as u64) {
            failures.push(format!(
                "{who}: cluster.panic.lb_healthy_panic is {panics:?}, expected {REQUESTS}"
            ));
        }
        let rr_panics = stat(admin, "cluster.rr.lb_healthy_panic").await;
        if rr_panics != Some(0) {
            failures.push(format!(
                "{who}: cluster.rr.lb_healthy_panic is {rr_panics:?}"
            ));
        }
    }

    eprintln!("{report}");
    assert!(
        failures.is_empty(),
        "{}\n{report}\nenvoy log:\n{}\ncapstan-proxy log:\n{}",
        failures.join("\n"),
        envoy.proc.logs(),
        proxy.proc.logs()
    );
    let _ = std::fs::remove_dir_all(&work);
}
