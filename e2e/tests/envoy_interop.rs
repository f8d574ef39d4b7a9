//! Interop: the control plane drives a stock Envoy over ADS (state of the world and delta),
//! and real requests through Envoy's outbound listener land where the ServiceRoutes say.
//!
//! Needs `envoy` on PATH (scripts/test.sh installs it). Under `CI=true` a missing Envoy fails
//! the test; elsewhere the test reports that it did not run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use capstan_e2e::client::{get, request};
use capstan_e2e::eventually;
use capstan_e2e::fixtures::{self, details_route, write};
use capstan_e2e::process::{self, AdsMode, OUTBOUND, PATIENCE};

/// A route with a broken regular expression: reported, and it must not disturb the rest.
const BROKEN: &str = r#"apiVersion: capstan.dev/v1alpha1
kind: ServiceRoute
metadata: { name: broken, namespace: default }
spec:
  parentRefs: [{ name: details }]
  rules:
  - matches: [{ path: { type: RegularExpression, value: "([" } }]
"#;

async fn envoy_state(admin: SocketAddr) -> Option<String> {
    let r = get(admin, "admin", "/ready").await.ok()?;
    Some(r.body.trim().to_string())
}

async fn backend_for(host: &str, path: &str, headers: &[(&str, &str)]) -> Option<String> {
    request(OUTBOUND, "GET", host, path, headers)
        .await
        .ok()?
        .backend()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_routes_by_service_routes_over_sotw_and_delta_ads() {
    if process::envoy_binary().is_none() {
        eprintln!("NOT RUN: envoy is not on PATH (run scripts/test.sh to install it)");
        return;
    }
    let _port = process::OutboundPortLock::acquire();
    for mode in [AdsMode::StateOfTheWorld, AdsMode::Delta] {
        scenario(mode).await;
    }
}

async fn scenario(mode: AdsMode) {
    let work = process::temp_dir("interop");
    let config = work.join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    fixtures::routing_fixture(&config).await;
    write(&config, "broken.yaml", BROKEN);

    let cp = process::start_control_plane(&config, &work);
    let envoy = process::start_envoy("sidecar-0.default", "client", cp.xds, mode, &work)
        .expect("envoy present");
    let logs = || {
        format!(
            "--- control plane ---\n{}\n--- envoy ---\n{}",
            cp.proc.logs(),
            envoy.proc.logs()
        )
    };

    // Envoy reaches LIVE only once it holds clusters, endpoints, listener and routes.
    let t0 = Instant::now();
    let ok = tokio::time::timeout(PATIENCE, async {
        loop {
            if envoy_state(envoy.admin).await.as_deref() == Some("LIVE") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "{mode:?}: Envoy never became LIVE\n{}", logs());
    eprintln!("{mode:?}: Envoy LIVE after {:?}", t0.elapsed());

    // Matches.
    /// Path, request headers, the backend that must answer.
    type Case = (
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
    );
    let cases: &[Case] = &[
        ("/exact", &[], "reviews-v1"),
        ("/exact/more", &[], "reviews"),
        ("/v2", &[], "reviews-v2"),
        ("/v2/deeper", &[], "reviews-v2"),
        ("/v2x", &[], "reviews"),
        ("/re/42", &[], "reviews-v3"),
        ("/re/4x", &[], "reviews"),
        ("/any", &[("x-version", "v3")], "reviews-v3"),
        ("/any?version=v2", &[], "reviews-v2"),
        ("/any?version=v1", &[], "reviews"),
        ("/", &[], "reviews"),
    ];
    for (path, headers, want) in cases {
        for host in ["reviews", "reviews.default.svc.cluster.local", "reviews:80"] {
            let got = backend_for(host, path, headers).await;
            assert_eq!(
                got.as_deref(),
                Some(*want),
                "{mode:?}: Host {host} {path} {headers:?}\n{}",
                logs()
            );
        }
    }

    // A 90/10 split over 1000 requests: v2 gets 10 % ± 4 points (binomial σ ≈ 0.95 points).
    let mut v2 = 0;
    for _ in 0..1000 {
        match backend_for("reviews", "/split", &[]).await.as_deref() {
            Some("reviews-v2") => v2 += 1,
            Some("reviews-v1") => {}
            other => panic!("{mode:?}: split request went to {other:?}"),
        }
    }
    assert!(
        (60..=140).contains(&v2),
        "{mode:?}: reviews-v2 got {v2}/1000, expected about 100"
    );

    // Header modifiers.
    let r = request(
        OUTBOUND,
        "GET",
        "reviews",
        "/headers",
        &[("x-set", "by-client"), ("x-remove-me", "1")],
    )
    .await
    .expect("request");
    assert_eq!(r.backend().as_deref(), Some("reviews-v1"));
    assert_eq!(
        r.seen_header("x-set").as_deref(),
        Some("by-route"),
        "{}",
        r.body
    );
    assert_eq!(
        r.seen_header("x-added").as_deref(),
        Some("yes"),
        "{}",
        r.body
    );
    assert_eq!(r.seen_header("x-remove-me"), None, "{}", r.body);
    assert_eq!(r.header("x-response"), Some("added"));

    // Redirect.
    let r = get(OUTBOUND, "reviews", "/old/page")
        .await
        .expect("request");
    assert_eq!(r.status, 302, "{mode:?}: {r:?}");
    let location = r.header("location").unwrap_or_default();
    assert!(
        location.ends_with("/new/page"),
        "{mode:?}: location {location}"
    );

    // Rewrite.
    let r = get(OUTBOUND, "reviews", "/rewrite/x")
        .await
        .expect("request");
    assert_eq!(r.backend().as_deref(), Some("reviews-v1"));
    assert_eq!(r.seen_path().as_deref(), Some("/rewritten/x"), "{}", r.body);
    assert_eq!(
        r.json()
            .and_then(|j| j["host"].as_str().map(str::to_string))
            .as_deref(),
        Some("rewritten.example")
    );

    // The broken route is reported, naming the field, and did not disturb the rest.
    let cp_logs = cp.proc.logs();
    assert!(
        cp_logs.contains("ServiceRoute default/broken")
            && cp_logs.contains("spec.rules[0].matches[0].path.value"),
        "{mode:?}: broken route not reported:\n{cp_logs}"
    );
    assert_eq!(
        backend_for("details", "/", &[]).await.as_deref(),
        Some("details")
    );
    let metrics = get(cp.admin, "admin", "/metrics").await.expect("metrics");
    assert!(
        metrics.body.contains("capstan_config_diagnostics 1"),
        "{}",
        metrics.body
    );

    // Editing a file changes Envoy's routing without a restart.
    let t0 = Instant::now();
    write(&config, "details-route.yaml", &details_route("details-v2"));
    let elapsed = eventually("details to move to details-v2", PATIENCE, || async {
        (backend_for("details", "/", &[]).await.as_deref() == Some("details-v2"))
            .then(|| t0.elapsed())
    })
    .await;
    eprintln!("{mode:?}: file edit visible in Envoy's routing after {elapsed:?}");

    // Envoy ACKed everything: no NACKs counted.
    let metrics = get(cp.admin, "admin", "/metrics").await.expect("metrics");
    assert!(
        metrics.body.contains("capstan_xds_nacks_total 0"),
        "{mode:?}: {}",
        metrics.body
    );
    drop(envoy);
    drop(cp);
}
