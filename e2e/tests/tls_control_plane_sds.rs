//! ServicePolicy TLS from Kubernetes Secrets, end to end with capstan-proxy: the same scenario
//! as `control_plane_tls.rs` (which runs stock Envoy), so both proxies are held to the same
//! behaviour. The control plane (file provider) turns `caCertificateSecret` /
//! `clientCertificateSecret` into SDS Secrets named `kubernetes://<namespace>/<name>[/ca.crt]`
//! served over ADS (state of the world and delta); capstan-proxy originates mTLS with them to a
//! real rustls backend that requires a client certificate, a rotated Secret reaches new
//! connections without a restart, a malformed rotation keeps the last valid certificate, a
//! deleted Secret keeps the certificate the proxy has, and a CA Secret that does not exist yet
//! fails closed. No Envoy needed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use capstan_e2e::client::get;
use capstan_e2e::eventually;
use capstan_e2e::fixtures::{self, write};
use capstan_e2e::process::{self, AdsMode, OUTBOUND, PATIENCE};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The Service's name as the proxy sends it in SNI and the backend's certificate carries it.
const FQDN: &str = "secure.default.svc.cluster.local";

struct Pki {
    ca_pem: String,
    server: (String, String),
    /// Two client certificates (PEM chain, PEM key) and their DER, to tell them apart.
    clients: Vec<(String, String, Vec<u8>)>,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "capstan e2e CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &issuer).expect("sign");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    };
    let (server_pem, server_key, _) = leaf(vec![FQDN.to_string()], FQDN);
    Pki {
        ca_pem: ca.pem(),
        server: (server_pem, server_key),
        clients: vec![
            leaf(vec!["client-v1".into()], "client-v1"),
            leaf(vec!["client-v2".into()], "client-v2"),
        ],
    }
}

/// A TLS backend that requires a client certificate issued by the CA and answers every
/// request with which of the known client certificates was presented (`client-v1`, …), then
/// closes the connection (so every request is a new TLS handshake).
async fn start_mtls_backend(pki: &Pki) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("add root");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.server.0.as_bytes())
            .collect::<Result<_, _>>()
            .expect("server chain");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pki.server.1.as_bytes())
        .expect("server key");
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let known: Vec<(Vec<u8>, String)> = pki
        .clients
        .iter()
        .enumerate()
        .map(|(i, (_, _, der))| (der.clone(), format!("client-v{}", i + 1)))
        .collect();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let known = known.clone();
            tokio::spawn(async move {
                // A handshake without an acceptable client certificate fails here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let presented = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.as_ref().to_vec());
                let who = known
                    .iter()
                    .find(|(der, _)| Some(der) == presented.as_ref())
                    .map_or("unknown".to_string(), |(_, name)| name.clone());
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{who}",
                    who.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}\n")).collect()
}

fn ca_secret(pki: &Pki) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: mesh-ca, namespace: default }}\nstringData:\n  ca.crt: |\n{}",
        indent(&pki.ca_pem)
    )
}

/// The `kubernetes.io/tls` Secret with client certificate `which` (0 or 1), as `data` (base64).
fn client_secret(pki: &Pki, which: usize) -> String {
    let (crt, key, _) = &pki.clients[which];
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: client-cert, namespace: default }}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(crt),
        indent(key)
    )
}

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
async fn capstan_proxy_originates_mtls_with_secrets_served_over_sds_and_follows_rotation() {
    let _port = process::OutboundPortLock::acquire();
    let pki = pki();
    let backend = start_mtls_backend(&pki).await;
    for mode in [AdsMode::StateOfTheWorld, AdsMode::Delta] {
        scenario(mode, &pki, backend).await;
    }
}

async fn scenario(mode: AdsMode, pki: &Pki, backend: SocketAddr) {
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
    let proxy = process::start_capstan_proxy("sidecar-0.default", "client", cp.xds, mode, &work);
    let logs = |config: &Path| {
        let _ = config;
        format!(
            "--- control plane ---\n{}\n--- capstan-proxy ---\n{}",
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
            "{mode:?}: no request may succeed without the CA\n{}",
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
            "{mode:?}: no request succeeded over mTLS\n{}",
            logs(&config)
        )
    });
    assert_eq!(who, "client-v1", "{mode:?}\n{}", logs(&config));

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
            "{mode:?}: rotated client certificate not in use (backend saw {:?})\n--- secrets ---\n{secrets}\n--- stats ---\n{stats}\n{}",
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
        &format!("{mode:?}: the bad Secret is reported"),
        PATIENCE,
        || async { (metric(cp.admin, "capstan_config_diagnostics").await? > before).then_some(()) },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            through_proxy().await.as_deref(),
            Some("client-v2"),
            "{mode:?}: last valid certificate kept\n{}",
            logs(&config)
        );
    }
    assert!(
        !cp.proc.logs().contains("BEGIN PRIVATE KEY"),
        "the control plane never logs key material"
    );

    // capstan-proxy ACKed everything: no NACKs counted.
    let nacks = metric(cp.admin, "capstan_xds_nacks_total").await;
    assert_eq!(nacks, Some(0.0), "{mode:?}\n{}", logs(&config));

    // The Secret is deleted: the control plane stops serving it (a response without it goes
    // out), and capstan-proxy keeps the certificate it has, without a NACK.
    let secret_responses = "capstan_xds_responses_total{type_url=\"type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\"}";
    let sent = metric(cp.admin, secret_responses).await.unwrap_or_default();
    std::fs::remove_file(config.join("client.yaml")).expect("delete the Secret's file");
    eventually(
        &format!("{mode:?}: the deletion is pushed"),
        PATIENCE,
        || async { (metric(cp.admin, secret_responses).await? > sent).then_some(()) },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            through_proxy().await.as_deref(),
            Some("client-v2"),
            "{mode:?}: capstan-proxy keeps its last certificate\n{}",
            logs(&config)
        );
    }
    let nacks = metric(cp.admin, "capstan_xds_nacks_total").await;
    assert_eq!(nacks, Some(0.0), "{mode:?}\n{}", logs(&config));
    drop(proxy);
}
