//! Interop: the control plane drives a stock Envoy over ADS (state of the world and delta),
//! and real requests through Envoy's outbound listener land where the ServiceRoutes say.
//!
//! Needs `envoy` on PATH (scripts/test.sh installs it). Under `CI=true` a missing Envoy fails
//! the test; elsewhere the test reports that it did not run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use capstan_e2e::client::{get, request};
use capstan_e2e::process::{self, AdsMode, PATIENCE};
use capstan_e2e::{backend, eventually};

const OUTBOUND: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15001);

/// A Service on port 80 whose one endpoint is a test backend at `addr`.
fn service(name: &str, addr: SocketAddr) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{ name: {name}, namespace: default }}
spec:
  ports: [{{ name: http, port: 80, targetPort: {port} }}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abc
  namespace: default
  labels: {{ kubernetes.io/service-name: {name} }}
addressType: IPv4
ports: [{{ name: http, port: {port} }}]
endpoints:
- addresses: ["{ip}"]
  conditions: {{ ready: true }}
  zone: zone-a
"#,
        port = addr.port(),
        ip = addr.ip(),
    )
}

const ROUTES: &str = r#"apiVersion: capstan.dev/v1alpha1
kind: ServiceRoute
metadata: { name: reviews, namespace: default }
spec:
  parentRefs: [{ name: reviews }]
  rules:
  - matches: [{ path: { type: Exact, value: /exact } }]
    backendRefs: [{ name: reviews-v1, port: 80 }]
  - matches: [{ path: { type: PathPrefix, value: /v2 } }]
    backendRefs: [{ name: reviews-v2, port: 80 }]
  - matches: [{ path: { type: RegularExpression, value: "^/re/[0-9]+$" } }]
    backendRefs: [{ name: reviews-v3, port: 80 }]
  - matches: [{ headers: [{ name: x-version, value: v3 }] }]
    backendRefs: [{ name: reviews-v3, port: 80 }]
  - matches: [{ queryParams: [{ name: version, value: v2 }] }]
    backendRefs: [{ name: reviews-v2, port: 80 }]
  - matches: [{ path: { value: /split } }]
    backendRefs:
    - { name: reviews-v1, port: 80, weight: 90 }
    - { name: reviews-v2, port: 80, weight: 10 }
  - matches: [{ path: { value: /headers } }]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{ name: x-set, value: by-route }]
        add: [{ name: x-added, value: "yes" }]
        remove: [x-remove-me]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{ name: x-response, value: added }]
    backendRefs: [{ name: reviews-v1, port: 80 }]
  - matches: [{ path: { value: /old } }]
    filters:
    - type: RequestRedirect
      requestRedirect:
        path: { type: ReplacePrefixMatch, replacePrefixMatch: /new }
        statusCode: 302
  - matches: [{ path: { value: /rewrite } }]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: rewritten.example
        path: { type: ReplacePrefixMatch, replacePrefixMatch: /rewritten }
    backendRefs: [{ name: reviews-v1, port: 80 }]
  - backendRefs: [{ name: reviews, port: 80 }]
"#;

fn details_route(backend: &str) -> String {
    format!(
        "apiVersion: capstan.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {{ name: details, namespace: default }}\nspec:\n  parentRefs: [{{ name: details }}]\n  rules:\n  - backendRefs: [{{ name: {backend}, port: 80 }}]\n"
    )
}

/// A route with a broken regular expression: reported, and it must not disturb the rest.
const BROKEN: &str = r#"apiVersion: capstan.dev/v1alpha1
kind: ServiceRoute
metadata: { name: broken, namespace: default }
spec:
  parentRefs: [{ name: details }]
  rules:
  - matches: [{ path: { type: RegularExpression, value: "([" } }]
"#;

fn write(dir: &Path, name: &str, text: &str) {
    // Write-then-rename so the watcher never sees half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

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
    for mode in [AdsMode::StateOfTheWorld, AdsMode::Delta] {
        scenario(mode).await;
    }
}

async fn scenario(mode: AdsMode) {
    let work = process::temp_dir("interop");
    let config = work.join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    let mut backends = BTreeMap::new();
    for name in [
        "reviews",
        "reviews-v1",
        "reviews-v2",
        "reviews-v3",
        "details",
        "details-v2",
    ] {
        let addr = backend::start(name).await;
        backends.insert(name, addr);
        write(&config, &format!("svc-{name}.yaml"), &service(name, addr));
    }
    write(&config, "routes.yaml", ROUTES);
    write(&config, "details-route.yaml", &details_route("details"));
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
