//! Control plane restart under load: with a proxy (SotW ADS) serving traffic, the control plane
//! is killed (SIGKILL) and started again on the same xDS port and configuration. No request
//! may fail: while the control plane is down the proxy keeps serving its last accepted
//! configuration, and resuming the stream with the restarted one must not disturb traffic (a
//! SotW client resuming with the `version_info` it holds is not resent that version, so the
//! update counters normally do not move; none may be rejected).
//!
//! Run for capstan-proxy and for stock Envoy (the reference). Envoy needs `envoy` on PATH
//! (scripts/test.sh installs it); under `CI=true` its absence fails, otherwise the Envoy half
//! is reported NOT RUN.
//!
//! Load: four client loops through the outbound listener, two opening a fresh connection per
//! request (each request is routed afresh) and two reusing one keep-alive connection.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use capstan_e2e::client::{Reply, get, request};
use capstan_e2e::process::{self, AdsMode, ControlPlane, Envoy, OUTBOUND, PATIENCE};
use capstan_e2e::{eventually, fixtures};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// One client loop: the request it sends and the backend that must answer it.
#[derive(Clone, Copy)]
struct Flow {
    host: &'static str,
    path: &'static str,
    backend: &'static str,
    keep_alive: bool,
}

const FLOWS: [Flow; 4] = [
    Flow {
        host: "reviews",
        path: "/",
        backend: "reviews",
        keep_alive: false,
    },
    Flow {
        host: "details",
        path: "/info",
        backend: "details",
        keep_alive: false,
    },
    Flow {
        host: "reviews",
        path: "/exact",
        backend: "reviews-v1",
        keep_alive: true,
    },
    Flow {
        host: "reviews",
        path: "/v2/page",
        backend: "reviews-v2",
        keep_alive: true,
    },
];

/// Shared counters of the load.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    /// Keep-alive connections found closed by the proxy while idle (not failed requests:
    /// nothing had been sent on them).
    reconnects: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

impl Load {
    fn record(&self, flow: Flow, started: Instant, result: anyhow::Result<Reply>) {
        let problem = match result {
            Ok(r) if r.status == 200 && r.backend().as_deref() == Some(flow.backend) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(r) => format!(
                "status {} backend {:?} body {:?}",
                r.status,
                r.backend(),
                r.body.chars().take(200).collect::<String>()
            ),
            Err(e) => format!("error: {e:#}"),
        };
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().expect("lock");
        if failures.len() < 20 {
            failures.push(format!(
                "t={:?} {} {}{} (want {}): {problem}",
                started.elapsed(),
                if flow.keep_alive {
                    "keep-alive"
                } else {
                    "fresh"
                },
                flow.host,
                flow.path,
                flow.backend
            ));
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

/// Fresh connection per request.
async fn fresh_loop(load: Arc<Load>, flow: Flow, t0: Instant) {
    while !load.stop.load(Ordering::Relaxed) {
        load.sent.fetch_add(1, Ordering::Relaxed);
        let result = request(OUTBOUND, "GET", flow.host, flow.path, &[]).await;
        load.record(flow, t0, result);
    }
}

/// One keep-alive connection, reopened only when the proxy closes it.
async fn keep_alive_loop(load: Arc<Load>, flow: Flow, t0: Instant) {
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> = None;
    while !load.stop.load(Ordering::Relaxed) {
        let mut s = match sender.take() {
            Some(s) => s,
            None => {
                let connected = async {
                    let stream = tokio::net::TcpStream::connect(OUTBOUND).await?;
                    let (s, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                    tokio::spawn(conn);
                    anyhow::Ok(s)
                }
                .await;
                match connected {
                    Ok(s) => s,
                    Err(e) => {
                        load.sent.fetch_add(1, Ordering::Relaxed);
                        load.record(flow, t0, Err(e.context("connect")));
                        continue;
                    }
                }
            }
        };
        if s.ready().await.is_err() {
            // Closed by the proxy between requests: reconnect, nothing was lost.
            load.reconnects.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        load.sent.fetch_add(1, Ordering::Relaxed);
        let req = hyper::Request::builder()
            .uri(flow.path)
            .header("host", flow.host)
            .body(Empty::<Bytes>::new())
            .expect("request");
        let result = async {
            let response = s.send_request(req).await?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(Reply {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        }
        .await;
        let keep = result.as_ref().is_ok_and(|r| {
            !r.header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        });
        load.record(flow, t0, result);
        if keep {
            sender = Some(s);
        }
    }
}

async fn connected_streams(cp: &ControlPlane) -> Option<u64> {
    let metrics = get(cp.admin, "admin", "/metrics").await.ok()?;
    metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix("capstan_xds_connected_streams "))
        .and_then(|v| v.trim().parse().ok())
}

async fn ready_body(proxy: &Envoy) -> String {
    match get(proxy.admin, "admin", "/ready").await {
        Ok(r) => format!("{} {}", r.status, r.body.trim()),
        Err(e) => format!("error: {e:#}"),
    }
}

/// The proxy's `/stats` lines about xDS, listeners, clusters and downstream/upstream errors.
async fn interesting_stats(proxy: &Envoy) -> String {
    let Ok(stats) = get(proxy.admin, "admin", "/stats").await else {
        return "(no /stats)".into();
    };
    stats
        .body
        .lines()
        .filter(|l| {
            [
                "control_plane",
                "update_",
                "listener_manager",
                "cluster_manager",
                "downstream_rq_",
                "downstream_cx_destroy",
                "upstream_cx_connect_fail",
                "upstream_rq_",
                "no_route",
                "no_cluster",
                "no_healthy",
            ]
            .iter()
            .any(|k| l.contains(k))
                && !l.ends_with(": 0")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A counter or gauge from the proxy's `/stats` (Envoy's plain-text format).
async fn stat(proxy: &Envoy, name: &str) -> Option<u64> {
    let stats = get(proxy.admin, "admin", "/stats").await.ok()?;
    stats.body.lines().find_map(|l| {
        let (k, v) = l.split_once(": ")?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// LDS, CDS and EDS `update_success` and `update_rejected` counters.
async fn update_counters(proxy: &Envoy) -> Vec<(&'static str, Option<u64>)> {
    let mut out = Vec::new();
    for name in [
        "listener_manager.lds.update_success",
        "listener_manager.lds.update_rejected",
        "cluster_manager.cds.update_success",
        "cluster_manager.cds.update_rejected",
        "cluster_manager.eds.update_success",
        "cluster_manager.eds.update_rejected",
    ] {
        if let Some(n) = stat(proxy, name).await {
            out.push((name, Some(n)));
        } else if !name.contains(".eds.") {
            out.push((name, None));
        }
    }
    out
}

/// Starts a proxy of the given kind against `xds`.
type Starter = fn(SocketAddr, &Path) -> Option<Envoy>;

fn start_capstan(xds: SocketAddr, work: &Path) -> Option<Envoy> {
    Some(process::start_capstan_proxy(
        "restart-0.default",
        "client",
        xds,
        AdsMode::StateOfTheWorld,
        work,
    ))
}

fn start_envoy(xds: SocketAddr, work: &Path) -> Option<Envoy> {
    process::start_envoy(
        "restart-0.default",
        "client",
        xds,
        AdsMode::StateOfTheWorld,
        work,
    )
}

async fn restart_under_load(label: &str, start: Starter) {
    let _port = process::OutboundPortLock::acquire();
    // Something not taking the lock (a benchmark, a quickstart) may still be on the port.
    eventually(
        "127.0.0.1:15001 to be free (something not holding the lock listens on it)",
        PATIENCE,
        || async {
            tokio::net::TcpStream::connect(OUTBOUND)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    let begun = Instant::now();
    let work = process::temp_dir(&format!("restart-{label}"));
    let config = work.join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    fixtures::routing_fixture(&config).await;
    let first_work = work.join("cp-1");
    let second_work = work.join("cp-2");
    std::fs::create_dir_all(&first_work).expect("mkdir");
    std::fs::create_dir_all(&second_work).expect("mkdir");
    let cp = process::start_control_plane(&config, &first_work);
    let (xds, admin) = (cp.xds, cp.admin);
    let Some(mut proxy) = start(xds, &work) else {
        eprintln!("NOT RUN ({label}): envoy is not on PATH (run scripts/test.sh to install it)");
        return;
    };
    assert!(
        process::wait_live(proxy.admin).await,
        "{label} never became LIVE\n--- control plane ---\n{}\n--- {} ---\n{}",
        cp.proc.logs(),
        proxy.proc.name,
        proxy.proc.logs()
    );
    eventually("the proxy's xDS stream", PATIENCE, || async {
        (connected_streams(&cp).await == Some(1)).then_some(())
    })
    .await;

    // Load.
    let load = Arc::new(Load::default());
    let t0 = Instant::now();
    let tasks: Vec<_> = FLOWS
        .iter()
        .map(|&flow| {
            let load = load.clone();
            if flow.keep_alive {
                tokio::spawn(keep_alive_loop(load, flow, t0))
            } else {
                tokio::spawn(fresh_loop(load, flow, t0))
            }
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kill = load.sent();

    // SIGKILL (the harness kills its children with SIGKILL on drop).
    let updates_before = update_counters(&proxy).await;
    let first_logs = cp.proc.logs();
    drop(cp);
    let killed_at = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The control plane is down; the proxy keeps its last accepted configuration.
    assert!(
        std::net::TcpStream::connect(xds).is_err(),
        "the control plane still accepts on {xds}"
    );
    let during = request(OUTBOUND, "GET", "reviews", "/exact", &[]).await;
    let during_ready = ready_body(&proxy).await;
    let during_connected = stat(&proxy, "control_plane.connected_state").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let while_down = load.sent() - before_kill;

    let cp = process::start_control_plane_on(&config, &second_work, xds, admin);
    let restarted_at = t0.elapsed();
    let reconnected = eventually(
        "the proxy to reconnect to the restarted control plane",
        PATIENCE,
        || async { (connected_streams(&cp).await == Some(1)).then_some(t0.elapsed()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("client loop");
    }
    let elapsed = t0.elapsed();

    let sent = load.sent();
    let ok = load.ok.load(Ordering::Relaxed);
    let failed = load.failed.load(Ordering::Relaxed);
    let reconnects = load.reconnects.load(Ordering::Relaxed);
    let final_ready = ready_body(&proxy).await;
    let exited = proxy.proc.exit_status();
    let updates_after = update_counters(&proxy).await;
    eprintln!(
        "{label}: {sent} requests in {elapsed:?} (4 loops: 2 fresh-connection, 2 keep-alive): {ok} ok, {failed} failed, {while_down} sent while the control plane was down; {reconnects} keep-alive reconnects; killed at {killed_at:?}, restarted at {restarted_at:?}, reconnected by {reconnected:?}; while down: /ready {during_ready}, control_plane.connected_state {during_connected:?}, at the end: {final_ready}; update counters before the kill {updates_before:?}, at the end {updates_after:?}; whole test {:?}",
        begun.elapsed()
    );

    let diagnostics = || async {
        format!(
            "--- control plane (first) ---\n{first_logs}\n--- control plane (restarted) ---\n{}\n--- {} ---\n{}\n--- {} /stats (non-zero, selected) ---\n{}",
            cp.proc.logs(),
            proxy.proc.name,
            proxy.proc.logs(),
            proxy.proc.name,
            interesting_stats(&proxy).await
        )
    };
    let failures = load.failures.lock().expect("lock").clone();
    let during_ok = during
        .as_ref()
        .is_ok_and(|r| r.status == 200 && r.backend().as_deref() == Some("reviews-v1"));
    if failed > 0 || !during_ok || !during_ready.ends_with("LIVE") || exited.is_some() {
        let d = diagnostics().await;
        assert!(exited.is_none(), "{label} exited: {exited:?}\n{d}");
        assert!(
            during_ok,
            "{label}: a request while the control plane was down: {during:?}\n{d}"
        );
        assert!(
            during_ready.ends_with("LIVE"),
            "{label}: /ready while the control plane was down: {during_ready}\n{d}"
        );
        panic!(
            "{label}: {failed} of {sent} requests failed; first ones:\n{}\n{d}",
            failures.join("\n")
        );
    }
    assert!(
        while_down > 0,
        "{label}: no request completed while the control plane was down"
    );
    assert_eq!(
        during_connected,
        Some(0),
        "{label}: control_plane.connected_state while the control plane was down"
    );
    assert_eq!(
        stat(&proxy, "control_plane.connected_state").await,
        Some(1),
        "{label}: control_plane.connected_state at the end"
    );
    for (name, n) in &updates_after {
        // Envoy keeps EDS counters per cluster only.
        let absent_ok = name.contains(".eds.");
        if name.ends_with("rejected") && *n != Some(0) && !(absent_ok && n.is_none()) {
            panic!("{label}: {name} {n:?}\n{}", diagnostics().await);
        }
    }
    assert!(sent >= 300, "{label}: only {sent} requests were sent");
    assert_eq!(
        final_ready,
        "200 LIVE",
        "{label} is not LIVE at the end\n{}",
        diagnostics().await
    );
    drop(proxy);
    // The next proxy binds the same outbound port.
    for _ in 0..100 {
        if std::net::TcpStream::connect(OUTBOUND).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn capstan_proxy_serves_through_control_plane_restart_under_load() {
    restart_under_load("capstan-proxy", start_capstan).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_serves_through_control_plane_restart_under_load() {
    if process::envoy_binary().is_none() {
        eprintln!("NOT RUN (envoy): envoy is not on PATH (run scripts/test.sh to install it)");
        return;
    }
    restart_under_load("envoy", start_envoy).await;
}
