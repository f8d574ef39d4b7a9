//! Differential test: the same control-plane configuration served to stock Envoy and to
//! capstan-proxy; a few hundred requests covering every router feature must reach the same
//! backend, with the same status code, the same forwarded headers and the same response
//! headers through both.
//!
//! Needs `envoy` on PATH (scripts/test.sh installs it); under `CI=true` its absence fails.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use capstan_e2e::client::{Reply, request};
use capstan_e2e::fixtures;
use capstan_e2e::process::{self, AdsMode, Envoy, OUTBOUND};

/// Request headers whose forwarded value must agree (others, like `x-request-id`, differ by
/// design).
const FORWARDED: &[&str] = &[
    "host",
    "x-set",
    "x-added",
    "x-remove-me",
    "x-version",
    "x-forwarded-proto",
    "x-envoy-original-path",
    "x-envoy-expected-rq-timeout-ms",
];
/// Response headers whose value must agree.
const RESPONSE: &[&str] = &["location", "x-response", "x-backend", "content-type"];

/// What one request observed through one proxy.
#[derive(Debug, PartialEq, Eq)]
struct Observation {
    status: u16,
    backend: Option<String>,
    path_seen: Option<String>,
    forwarded: BTreeMap<&'static str, Option<String>>,
    response: BTreeMap<&'static str, Option<String>>,
}

impl Observation {
    fn of(reply: &Reply) -> Self {
        Self {
            status: reply.status,
            backend: reply.backend(),
            path_seen: reply.seen_path(),
            forwarded: FORWARDED
                .iter()
                .map(|h| (*h, reply.seen_header(h)))
                .collect(),
            response: RESPONSE
                .iter()
                .map(|h| (*h, reply.header(h).map(str::to_string)))
                .collect(),
        }
    }
}

type Req = (
    &'static str,
    String,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

fn requests() -> Vec<Req> {
    let hosts = [
        "reviews",
        "reviews:80",
        "reviews.default",
        "reviews.default.svc.cluster.local",
        "reviews.default.svc.cluster.local:80",
        "details",
        "unknown.example",
    ];
    let paths = [
        "/",
        "/exact",
        "/exact/",
        "/exact/more",
        "/v2",
        "/v2/",
        "/v2/deeper?x=1",
        "/v2x",
        "/re/42",
        "/re/42/x",
        "/any?version=v2",
        "/any?version=v1",
        "/any",
        "/headers",
        "/old",
        "/old/page?q=1",
        "/moved/x",
        "/rewrite",
        "/rewrite/x?y=2",
        "/full/anything",
    ];
    let header_sets: [Vec<(&'static str, &'static str)>; 3] = [
        vec![],
        vec![("x-version", "v3")],
        vec![
            ("x-set", "by-client"),
            ("x-remove-me", "1"),
            ("x-added", "client"),
        ],
    ];
    let mut out = Vec::new();
    for host in hosts {
        for path in paths {
            for headers in &header_sets {
                out.push(("GET", host.to_string(), path, headers.clone()));
            }
            out.push(("POST", host.to_string(), path, vec![]));
        }
    }
    out
}

async fn observe(proxy: &Envoy, reqs: &[Req]) -> Vec<Observation> {
    let mut out = Vec::with_capacity(reqs.len());
    for (method, host, path, headers) in reqs {
        let reply = request(OUTBOUND, method, host, path, headers)
            .await
            .unwrap_or_else(|e| panic!("{} {method} {host}{path}: {e}", proxy.proc.name));
        out.push(Observation::of(&reply));
    }
    out
}

/// Share of `/split` requests that reached reviews-v2 (of 1000).
async fn split_share() -> u32 {
    let mut v2 = 0;
    for _ in 0..1000 {
        let r = request(OUTBOUND, "GET", "reviews", "/split", &[])
            .await
            .expect("split request");
        if r.backend().as_deref() == Some("reviews-v2") {
            v2 += 1;
        }
    }
    v2
}

async fn run_through(
    proxy: Envoy,
    reqs: &[Req],
    logs: impl Fn() -> String,
) -> (Vec<Observation>, u32) {
    assert!(
        process::wait_live(proxy.admin).await,
        "{} never became LIVE\n{}\n--- {} ---\n{}",
        proxy.proc.name,
        logs(),
        proxy.proc.name,
        proxy.proc.logs()
    );
    let observed = observe(&proxy, reqs).await;
    let share = split_share().await;
    drop(proxy);
    // The next proxy binds the same outbound port.
    for _ in 0..100 {
        if std::net::TcpStream::connect(OUTBOUND).is_err() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (observed, share)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capstan_proxy_and_envoy_route_every_request_alike() {
    if process::envoy_binary().is_none() {
        eprintln!("NOT RUN: envoy is not on PATH (run scripts/test.sh to install it)");
        return;
    }
    let _port = process::OutboundPortLock::acquire();
    let work = process::temp_dir("differential");
    let config = work.join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    fixtures::routing_fixture(&config).await;
    let cp = process::start_control_plane(&config, &work);
    let xds: SocketAddr = cp.xds;
    let reqs = requests();
    let logs = || format!("--- control plane ---\n{}", cp.proc.logs());

    let envoy = process::start_envoy(
        "diff-0.default",
        "client",
        xds,
        AdsMode::StateOfTheWorld,
        &work,
    )
    .expect("envoy present");
    let (want, envoy_share) = run_through(envoy, &reqs, logs).await;
    let capstan = process::start_capstan_proxy(
        "diff-1.default",
        "client",
        xds,
        AdsMode::StateOfTheWorld,
        &work,
    );
    let (got, capstan_share) = run_through(capstan, &reqs, logs).await;

    // The requests really cover the router: every outcome below must occur.
    let statuses: std::collections::BTreeSet<u16> = want.iter().map(|o| o.status).collect();
    let backends: std::collections::BTreeSet<String> =
        want.iter().filter_map(|o| o.backend.clone()).collect();
    for s in [200, 301, 302, 404] {
        assert!(
            statuses.contains(&s),
            "no request answered {s}: {statuses:?}"
        );
    }
    for b in [
        "reviews",
        "reviews-v1",
        "reviews-v2",
        "reviews-v3",
        "details",
    ] {
        assert!(backends.contains(b), "no request reached {b}: {backends:?}");
    }
    let mut differences = Vec::new();
    for ((req, w), g) in reqs.iter().zip(&want).zip(&got) {
        if w != g {
            differences.push(format!(
                "{} {}{} {:?}\n  envoy:   {w:?}\n  capstan: {g:?}",
                req.0, req.1, req.2, req.3
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} requests differ:\n{}",
        differences.len(),
        reqs.len(),
        differences.join("\n")
    );
    // Weighted clusters are random in both: each must be within tolerance of 10 %.
    for (who, share) in [("envoy", envoy_share), ("capstan", capstan_share)] {
        assert!(
            (60..=140).contains(&share),
            "{who}: reviews-v2 got {share}/1000 of the 90/10 split"
        );
    }
    eprintln!(
        "{} requests identical through Envoy and capstan-proxy; split v2 share: envoy {envoy_share}, capstan {capstan_share} of 1000",
        reqs.len()
    );
}
