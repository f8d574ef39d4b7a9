//! The injector webhook's certificate life cycle and HTTPS endpoint, against the fake API
//! server: the Secret is created once and shared by racing replicas, renewed (same CA) before
//! it expires, the caBundle is patched into every webhook, and a real TLS client that trusts
//! only that CA gets an AdmissionReview answered with a JSON patch.

use std::sync::Arc;
use std::time::Duration;

use capstan_control_plane::inject::config::{InjectorConfig, from_yaml};
use capstan_control_plane::inject::server::{
    self, Outcome, Settings, dns_names, ensure_material, sync_ca_bundle,
};
use capstan_e2e::eventually;
use capstan_e2e::fake_kube::FakeApiServer;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{Timestamp, ToSpan};
use kube::Api;
use serde_json::{Value, json};

const NS: &str = "capstan-system";
const SECRETS: &str = "api/v1/secrets";

fn client(api: &FakeApiServer) -> kube::Client {
    let url = api.url().parse().expect("url");
    kube::Client::try_from(kube::Config::new(url)).expect("kube client")
}

fn webhook_configuration() -> Value {
    let hook = |name: &str| {
        json!({
            "name": name,
            "clientConfig": { "service": { "name": "capstan-webhook", "namespace": NS, "path": "/inject" } },
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": "capstan-sidecar-injector" },
        "webhooks": [hook("namespace.inject.capstan.dev"), hook("pod.inject.capstan.dev")],
    })
}

#[tokio::test]
async fn certificate_is_created_once_shared_renewed_with_the_same_ca_and_published() {
    let api = FakeApiServer::start().await;
    let secrets: Api<Secret> = Api::namespaced(client(&api), NS);
    let names = dns_names("capstan-webhook", NS);
    let now = Timestamp::now();

    // Two replicas start at once: one creates, the other re-reads and uses the same material.
    let (a, b) = tokio::join!(
        ensure_material(&secrets, "capstan-webhook-tls", NS, &names, now),
        ensure_material(&secrets, "capstan-webhook-tls", NS, &names, now),
    );
    let (a, oa) = a.expect("replica a");
    let (b, ob) = b.expect("replica b");
    let mut outcomes = [format!("{oa:?}"), format!("{ob:?}")];
    outcomes.sort();
    assert!(
        outcomes == ["Created", "Kept"] || outcomes == ["Created", "Created"] && a == b,
        "{outcomes:?}"
    );
    let (stored, outcome) = ensure_material(&secrets, "capstan-webhook-tls", NS, &names, now)
        .await
        .expect("again");
    assert_eq!(outcome, Outcome::Kept);
    assert!(stored == a || stored == b);
    assert!(
        stored
            .dns_names
            .contains(&"capstan-webhook.capstan-system.svc".to_string())
    );

    // 340 days later (less than 30 left): renewed, with the same CA.
    let later = now + (24 * 340).hours();
    let (renewed, outcome) = ensure_material(&secrets, "capstan-webhook-tls", NS, &names, later)
        .await
        .expect("renew");
    assert_eq!(outcome, Outcome::Renewed);
    assert_eq!(
        renewed.ca_pem, stored.ca_pem,
        "the CA (and caBundle) survive a rotation"
    );
    assert_ne!(renewed.cert_pem, stored.cert_pem);
    assert!(renewed.not_after > stored.not_after);

    // A Secret with garbage in it is replaced by a working one.
    let mut broken = api.get(SECRETS, NS, "capstan-webhook-tls").expect("secret");
    broken["data"]["ca.key"] = json!("bm90IGEga2V5");
    api.apply(broken);
    let (fresh, outcome) = ensure_material(&secrets, "capstan-webhook-tls", NS, &names, now)
        .await
        .expect("repair");
    assert_eq!(outcome, Outcome::Renewed);
    assert_ne!(fresh.ca_pem, renewed.ca_pem);

    // The caBundle goes into every webhook, once.
    api.apply(webhook_configuration());
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client(&api));
    assert!(
        sync_ca_bundle(&configs, "capstan-sidecar-injector", &fresh.ca_pem)
            .await
            .expect("sync")
    );
    assert!(
        !sync_ca_bundle(&configs, "capstan-sidecar-injector", &fresh.ca_pem)
            .await
            .expect("sync")
    );
    let stored = api
        .get(
            "apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
            "",
            "capstan-sidecar-injector",
        )
        .expect("config");
    for hook in stored["webhooks"].as_array().expect("webhooks") {
        assert!(
            hook["clientConfig"]["caBundle"]
                .as_str()
                .is_some_and(|b| !b.is_empty()),
            "{hook}"
        );
    }
    let missing = sync_ca_bundle(&configs, "nope", &fresh.ca_pem)
        .await
        .expect_err("missing");
    assert!(missing.to_string().contains("nope"), "{missing}");
}

fn tls_client(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn post(
    connector: &tokio_rustls::TlsConnector,
    port: u16,
    server_name: &str,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())?;
    let tls = connector.connect(name, tcp).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::post(path)
        .header("host", server_name)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, body))
}

fn injector_config() -> InjectorConfig {
    from_yaml(
        "image: ghcr.io/capstan/capstan-proxy:0.1.0\nxdsAddress: capstan.capstan-system.svc:18000\n",
        "test",
    )
    .expect("config")
}

#[tokio::test]
async fn webhook_serves_reviews_over_tls_with_its_own_certificate() {
    let api = FakeApiServer::start().await;
    api.apply(webhook_configuration());
    let port = capstan_e2e::process::free_port();
    let settings = Settings {
        addr: ([127, 0, 0, 1], port).into(),
        namespace: NS.into(),
        service: "capstan-webhook".into(),
        secret: "capstan-webhook-tls".into(),
        webhook_config: "capstan-sidecar-injector".into(),
        config_path: "injector.yaml".into(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::run(
        client(&api),
        settings,
        injector_config(),
        async {
            let _ = stopped.await;
        },
    ));
    let secret = eventually("the webhook Secret", Duration::from_secs(10), || {
        let s = api.get(SECRETS, NS, "capstan-webhook-tls");
        async move { s }
    })
    .await;
    let ca_b64 = secret["data"]["ca.crt"]
        .as_str()
        .expect("ca.crt")
        .to_string();
    let ca_pem = String::from_utf8(base64_decode(&ca_b64)).expect("PEM");
    eventually("the caBundle", Duration::from_secs(10), || {
        let c = api.get(
            "apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
            "",
            "capstan-sidecar-injector",
        );
        let want = json!(ca_b64);
        async move { c.filter(|c| c["webhooks"][1]["clientConfig"]["caBundle"] == want) }
    })
    .await;

    let connector = tls_client(&ca_pem);
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7f0c-1",
            "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": { "generateName": "web-7d9f8b6c5-", "namespace": "shop", "labels": { "app": "web" } },
                "spec": { "containers": [{ "name": "app", "image": "nginx", "ports": [{ "containerPort": 8080 }] }] },
            },
        },
    });
    let (status, body) = eventually("the webhook to answer", Duration::from_secs(10), || {
        let connector = connector.clone();
        let body = serde_json::to_vec(&review).expect("json");
        async move {
            post(
                &connector,
                port,
                "capstan-webhook.capstan-system.svc",
                "/inject",
                body,
            )
            .await
            .ok()
        }
    })
    .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).expect("JSON answer");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], "7f0c-1");
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let patch = String::from_utf8(base64_decode(
        answer["response"]["patch"].as_str().expect("patch"),
    ))
    .expect("utf8");
    assert!(patch.contains("capstan-proxy"), "{patch}");

    // The certificate is for the Service's names only.
    let wrong = post(
        &connector,
        port,
        "evil.example.com",
        "/inject",
        b"{}".to_vec(),
    )
    .await;
    assert!(
        wrong.is_err(),
        "a name outside the certificate must fail verification"
    );
    // A client trusting another CA does not accept it either.
    let (other_ca, _) = server::generate_ca(Timestamp::now()).expect("ca");
    let stranger = tls_client(&other_ca);
    assert!(
        post(
            &stranger,
            port,
            "capstan-webhook.capstan-system.svc",
            "/inject",
            b"{}".to_vec()
        )
        .await
        .is_err()
    );
    let (status, _) = post(
        &connector,
        port,
        "capstan-webhook.capstan-system.svc",
        "/nope",
        vec![],
    )
    .await
    .expect("404");
    assert_eq!(status, 404);
    let _ = stop.send(());
    task.await.expect("task").expect("clean stop");
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}
