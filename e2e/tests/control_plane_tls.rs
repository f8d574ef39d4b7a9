//! ServicePolicy TLS from Kubernetes Secrets, end to end with stock Envoy and with
//! capstan-proxy (the same scenario, so both proxies are held to the same behaviour): the
//! control plane (file provider) turns `caCertificateSecret` / `clientCertificateSecret` into
//! SDS Secrets named `kubernetes://<namespace>/<name>[/ca.crt]` served over ADS (state of the
//! world and delta); the proxy originates mTLS with them to a real rustls backend that requires
//! a client certificate, and a rotated Secret reaches new connections without a restart. A CA
//! Secret that does not exist yet fails closed (nothing gets through) and is picked up once it
//! appears; a malformed rotation keeps the last valid certificate; a deleted Secret is no
//! longer served and the proxy keeps the certificate it has.
//!
//! The Envoy run needs `envoy` on PATH (scripts/test.sh installs it). Under `CI=true` a missing
//! Envoy fails the test; elsewhere that run reports that it did not run.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use capstan_e2e::client::get;
use capstan_e2e::eventually;
use capstan_e2e::fixtures::{self, write};
use capstan_e2e::pki::{Pki, ca_secret, client_secret, pki, start_mtls_backend};
use capstan_e2e::process::{self, AdsMode, OUTBOUND, PATIENCE, Peer};

/// The Service's name as the proxy sends it in SNI and the backend's certificate carries it.
const FQDN: &str = "secure.default.svc.cluster.local";

const POLICY: &str = r#"apiVersion: capstan.dev/v1alpha1
kind: ServicePolicy
metadata: { name: secure, namespace: default }
spec:
  targetRef: { name: secure }
  tls:
    mode: Mutual
    subjectAltNames: [secure.default.svc.cluster.local]
    caCertificateSecret: { name: mesh-ca }
    clientCertificateSecret: { name: client-cert }
"#;

/// Who the backend saw, through the proxy's outbound listener; `None` on any failure.
async fn through_proxy() -> Option<String> {
    let reply = get(OUTBOUND, "secure", "/").await.ok()?;
    (reply.status == 200).then(|| reply.body.trim().to_string())
}

async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let body = get(admin, "admin", "/metrics").await.ok()?.body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_originates_mtls_with_secrets_served_over_sds_and_follows_rotation() {
    if process::envoy_binary().is_none() {
        eprintln!("NOT RUN: envoy is not on PATH (run scripts/test.sh to install it)");
        return;
    }
    run(Peer::Envoy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capstan_proxy_originates_mtls_with_secrets_served_over_sds_and_follows_rotation() {
    run(Peer::Capstan).await;
}

async fn run(peer: Peer) {
    let _port = process::OutboundPortLock::acquire();
    let pki = pki(FQDN);
    let backend = start_mtls_backend(&pki).await;
    for mode in [AdsMode::StateOfTheWorld, AdsMode::Delta] {
        scenario(peer, mode, &pki, backend).await;
    }
}

async fn scenario(peer: Peer, mode: AdsMode, pki: &Pki, backend: SocketAddr) {
    let work = process::temp_dir("cp-tls");
    let config = work.join("config");
    std::fs::create_dir_all(&config).expect("mkdir");
    write(
        &config,
        "service.yaml",
        &fixtures::service("secure", backend),
    );
    write(&config, "policy.yaml", POLICY);
    write(&config, "client.yaml", &client_secret(pki, 0));

    let cp = process::start_control_plane(&config, &work);
    let proxy = match peer {
        Peer::Envoy => process::start_envoy("sidecar-0.default", "client", cp.xds, mode, &work)
            .expect("envoy present"),
        Peer::Capstan => {
            process::start_capstan_proxy("sidecar-0.default", "client", cp.xds, mode, &work)
        }
    };
    let name = peer.name();
    let logs = |config: &Path| {
        let _ = config;
        format!(
            "--- control plane ---\n{}\n--- {name} ---\n{}",
            cp.proc.logs(),
            proxy.proc.logs()
        )
    };

    // The CA Secret does not exist yet: the cluster waits for it and nothing gets through
    // unverified (fail closed).
    for _ in 0..10 {
        assert_eq!(
            through_proxy().await,
            None,
            "{name} {mode:?}: no request may succeed without the CA\n{}",
            logs(&config)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    write(&config, "ca.yaml", &ca_secret(pki));

    // mTLS through the cluster, with the first client certificate.
    let who = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(who) = through_proxy().await {
                return who;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{name} {mode:?}: no request succeeded over mTLS\n{}",
            logs(&config)
        )
    });
    assert_eq!(who, "client-v1", "{name} {mode:?}\n{}", logs(&config));

    // Rotation: new connections present the new certificate, no restart.
    write(&config, "client.yaml", &client_secret(pki, 1));
    let rotated = tokio::time::timeout(PATIENCE, async {
        while through_proxy().await.as_deref() != Some("client-v2") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if rotated.is_err() {
        let secrets = get(proxy.admin, "admin", "/config_dump")
            .await
            .map(|r| r.body)
            .unwrap_or_default();
        let stats = get(proxy.admin, "admin", "/stats")
            .await
            .map(|r| r.body)
            .unwrap_or_default();
        panic!(
            "{name} {mode:?}: rotated client certificate not in use (backend saw {:?})\n--- secrets ---\n{secrets}\n--- stats ---\n{stats}\n{}",
            through_proxy().await,
            logs(&config)
        );
    }

    // A malformed rotation is reported and the last valid certificate stays in use.
    let before = metric(cp.admin, "capstan_config_diagnostics")
        .await
        .unwrap_or_default();
    write(
        &config,
        "client.yaml",
        &client_secret(pki, 1).replace("BEGIN CERTIFICATE", "BEGIN GARBAGE"),
    );
    eventually(
        &format!("{name} {mode:?}: the bad Secret is reported"),
        PATIENCE,
        || async { (metric(cp.admin, "capstan_config_diagnostics").await? > before).then_some(()) },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            through_proxy().await.as_deref(),
            Some("client-v2"),
            "{name} {mode:?}: last valid certificate kept\n{}",
            logs(&config)
        );
    }
    assert!(
        !cp.proc.logs().contains("BEGIN PRIVATE KEY"),
        "the control plane never logs key material"
    );

    // The proxy ACKed everything: no NACKs counted.
    let nacks = metric(cp.admin, "capstan_xds_nacks_total").await;
    assert_eq!(nacks, Some(0.0), "{name} {mode:?}\n{}", logs(&config));

    // The Secret is deleted: the control plane stops serving it (a response without it goes
    // out), and the proxy keeps the certificate it has, without a NACK.
    let secret_responses = "capstan_xds_responses_total{type_url=\"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\"}";
    let sent = metric(cp.admin, secret_responses).await.unwrap_or_default();
    std::fs::remove_file(config.join("client.yaml")).expect("delete the Secret's file");
    eventually(
        &format!("{name} {mode:?}: the deletion is pushed"),
        PATIENCE,
        || async { (metric(cp.admin, secret_responses).await? > sent).then_some(()) },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            through_proxy().await.as_deref(),
            Some("client-v2"),
            "{name} {mode:?}: the proxy keeps its last certificate\n{}",
            logs(&config)
        );
    }
    let nacks = metric(cp.admin, "capstan_xds_nacks_total").await;
    assert_eq!(nacks, Some(0.0), "{name} {mode:?}\n{}", logs(&config));
    drop(proxy);
}
