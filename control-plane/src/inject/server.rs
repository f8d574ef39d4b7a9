//! The injector's HTTPS endpoint and its certificate, without cert-manager.
//!
//! ```text
//!  Secret <webhook-secret> (ca.crt, ca.key, tls.crt, tls.key; not-after and SANs as annotations)
//!     ▲ create / rotate (resourceVersion-guarded: replicas racing get 409 and re-read)
//!  maintain() every minute ──► serving key swapped in place (open connections keep theirs)
//!     └──► MutatingWebhookConfiguration <webhook-config>: every webhook's caBundle = ca.crt
//!  :8443  POST /inject ─► review::review   GET /healthz ─► 200
//! ```
//!
//! The CA lives ten years and stays the same across rotations, so the `caBundle` never has to
//! change in step with a serving certificate; the serving certificate lives a year and is
//! re-issued 30 days before it expires (or when the Service name changes), by whichever
//! replica notices first. Every replica serves with the certificate in the Secret. A `helm
//! upgrade` that resets `caBundle` is repaired on the next pass.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{Timestamp, ToSpan};
use kube::api::{Api, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::config::InjectorConfig;
use super::review;

/// Where the webhook listens and which Kubernetes objects carry its certificate.
#[derive(Clone, Debug)]
pub struct Settings {
    pub addr: SocketAddr,
    /// The namespace of the control plane (the Secret and the Service live there).
    pub namespace: String,
    /// The webhook's Service name (the certificate's DNS names derive from it).
    pub service: String,
    /// The Secret holding the CA and the serving certificate.
    pub secret: String,
    /// The MutatingWebhookConfiguration whose `caBundle`s are kept current.
    pub webhook_config: String,
    /// The injector configuration file (for the log line; already loaded).
    pub config_path: PathBuf,
}

const CA_NAME: &str = "capstan-webhook-ca";
const ANNOTATION_NOT_AFTER: &str = "capstan.dev/not-after";
const ANNOTATION_DNS_NAMES: &str = "capstan.dev/dns-names";
const SERVING_DAYS: i64 = 365;
const RENEW_BEFORE_DAYS: i64 = 30;
const CA_YEARS: i64 = 10;
/// The API server sends pods of up to ~1.5 MB; anything much larger is not a review.
const MAX_REVIEW_BYTES: usize = 4 << 20;

/// What the Secret holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: Timestamp,
    pub dns_names: Vec<String>,
}

/// The names the API server may use for the webhook Service.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, "capstan.dev");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn date(t: Timestamp) -> time::OffsetDateTime {
    let d = t.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC).date();
    rcgen::date_time_ymd(
        i32::from(d.year()),
        u8::try_from(d.month()).unwrap_or(1),
        u8::try_from(d.day()).unwrap_or(1),
    )
}

/// A new CA (PEM certificate, PEM key).
pub fn generate_ca(now: Timestamp) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = ca_params()?;
    params.not_before = date(now - 24.hours());
    params.not_after = date(now + (24 * 365 * CA_YEARS).hours());
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for `dns_names`, signed by the CA whose key is `ca_key_pem`.
pub fn issue(
    ca_key_pem: &str,
    dns_names: &[String],
    now: Timestamp,
) -> Result<(String, String, Timestamp), rcgen::Error> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        dns_names.get(2).cloned().unwrap_or_default(),
    );
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = date(now - 24.hours());
    // Whole days: the certificate's notAfter is midnight UTC of this date.
    let not_after = now + (24 * SERVING_DAYS).hours();
    params.not_after = date(not_after);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem(), not_after))
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// Reads the material from a Secret; `None` when anything is missing or unreadable.
pub fn from_secret(secret: &Secret) -> Option<Material> {
    let annotations = secret.metadata.annotations.as_ref()?;
    let not_after: Timestamp = annotations.get(ANNOTATION_NOT_AFTER)?.parse().ok()?;
    let dns_names = annotations
        .get(ANNOTATION_DNS_NAMES)?
        .split(',')
        .map(str::to_string)
        .collect();
    let m = Material {
        ca_pem: text(secret, "ca.crt")?,
        ca_key_pem: text(secret, "ca.key")?,
        cert_pem: text(secret, "tls.crt")?,
        key_pem: text(secret, "tls.key")?,
        not_after,
        dns_names,
    };
    // Unparseable PEM counts as missing: it will be re-issued.
    certified_key(&m).ok()?;
    KeyPair::from_pem(&m.ca_key_pem).ok()?;
    Some(m)
}

fn to_secret(m: &Material, name: &str, namespace: &str, base: Option<&Secret>) -> Secret {
    let mut secret = base.cloned().unwrap_or_else(|| Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        ..Default::default()
    });
    let annotations = secret
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(ANNOTATION_NOT_AFTER.into(), m.not_after.to_string());
    annotations.insert(ANNOTATION_DNS_NAMES.into(), m.dns_names.join(","));
    let data = secret.data.get_or_insert_with(Default::default);
    for (k, v) in [
        ("ca.crt", &m.ca_pem),
        ("ca.key", &m.ca_key_pem),
        ("tls.crt", &m.cert_pem),
        ("tls.key", &m.key_pem),
    ] {
        data.insert(k.into(), ByteString(v.as_bytes().to_vec()));
    }
    secret
}

/// What `maintain` decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Kept,
    Created,
    Renewed,
}

/// Makes sure the Secret holds a valid CA and a serving certificate for `names` that is not
/// about to expire; returns the material every replica should serve with.
pub async fn ensure_material(
    secrets: &Api<Secret>,
    name: &str,
    namespace: &str,
    names: &[String],
    now: Timestamp,
) -> anyhow::Result<(Material, Outcome)> {
    for _ in 0..5 {
        let existing = secrets.get_opt(name).await?;
        let current = existing.as_ref().and_then(from_secret);
        if let Some(m) = &current
            && m.dns_names == names
            && m.not_after > now + (24 * RENEW_BEFORE_DAYS).hours()
        {
            return Ok((m.clone(), Outcome::Kept));
        }
        // Keep a readable CA (the caBundle stays valid); otherwise start over.
        let (ca_pem, ca_key_pem) = match &current {
            Some(m) => (m.ca_pem.clone(), m.ca_key_pem.clone()),
            None => generate_ca(now)?,
        };
        let (cert_pem, key_pem, not_after) = issue(&ca_key_pem, names, now)?;
        let material = Material {
            ca_pem,
            ca_key_pem,
            cert_pem,
            key_pem,
            not_after,
            dns_names: names.to_vec(),
        };
        let secret = to_secret(&material, name, namespace, existing.as_ref());
        let result = match &existing {
            None => secrets
                .create(&PostParams::default(), &secret)
                .await
                .map(|_| Outcome::Created),
            Some(_) => secrets
                .replace(name, &PostParams::default(), &secret)
                .await
                .map(|_| Outcome::Renewed),
        };
        match result {
            Ok(outcome) => return Ok((material, outcome)),
            // Another replica wrote first: use theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("secret {namespace}/{name} kept changing under us")
}

/// Sets `caBundle` on every webhook of the configuration; returns whether it wrote.
pub async fn sync_ca_bundle(
    configs: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca_pem: &str,
) -> anyhow::Result<bool> {
    for _ in 0..5 {
        let Some(mut config) = configs.get_opt(name).await? else {
            anyhow::bail!(
                "MutatingWebhookConfiguration {name} does not exist (is the Helm chart installed?)"
            );
        };
        let bundle = ByteString(ca_pem.as_bytes().to_vec());
        let mut changed = false;
        for webhook in config.webhooks.iter_mut().flatten() {
            if webhook.client_config.ca_bundle.as_ref() != Some(&bundle) {
                webhook.client_config.ca_bundle = Some(bundle.clone());
                changed = true;
            }
        }
        if !changed {
            return Ok(false);
        }
        match configs.replace(name, &PostParams::default(), &config).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("MutatingWebhookConfiguration {name} kept changing under us")
}

fn certified_key(m: &Material) -> anyhow::Result<CertifiedKey> {
    let cert = CertificateDer::from_pem_slice(m.cert_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("tls.crt: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("tls.key: {e}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| anyhow::anyhow!("tls.key: {e}"))?;
    Ok(CertifiedKey::new(vec![cert], signing))
}

/// The serving certificate, swappable while connections are open.
#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// Serves the webhook until `shutdown`, keeping the certificate and the `caBundle` current.
pub async fn run(
    client: kube::Client,
    settings: Settings,
    config: InjectorConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    let names = dns_names(&settings.service, &settings.namespace);
    tokio::pin!(shutdown);

    // No certificate, nothing to serve: wait for the API server.
    let mut delay = Duration::from_millis(500);
    let material = loop {
        match ensure_material(
            &secrets,
            &settings.secret,
            &settings.namespace,
            &names,
            Timestamp::now(),
        )
        .await
        {
            Ok((m, outcome)) => {
                tracing::info!(secret = %settings.secret, ?outcome, not_after = %m.not_after, "webhook certificate ready");
                break m;
            }
            Err(e) => tracing::warn!(secret = %settings.secret, "webhook certificate: {e:#}"),
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    };
    let resolver = Arc::new(Resolver(ArcSwap::from_pointee(certified_key(&material)?)));
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(resolver.clone());
    let mut tls = tls;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the webhook address {}: {e}", settings.addr))?;
    tracing::info!(addr = %settings.addr, config = %settings.config_path.display(), "injector webhook serving");
    let config = Arc::new(config);
    let mut current = material;
    let mut bundle_synced = false;
    let mut maintenance = tokio::time::interval(Duration::from_secs(60));
    let mut retry_bundle = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let acceptor = acceptor.clone();
                let config = config.clone();
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await;
                    let Ok(Ok(tls)) = handshake else { return };
                    let service = hyper::service::service_fn(move |req| {
                        let config = config.clone();
                        async move { Ok::<_, Infallible>(handle(req, &config).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
            _ = retry_bundle.tick(), if !bundle_synced => {
                match sync_ca_bundle(&configs, &settings.webhook_config, &current.ca_pem).await {
                    Ok(wrote) => {
                        bundle_synced = true;
                        if wrote {
                            tracing::info!(webhook = %settings.webhook_config, "caBundle updated");
                        }
                    }
                    Err(e) => tracing::warn!(webhook = %settings.webhook_config, "caBundle: {e:#}"),
                }
            }
            _ = maintenance.tick() => {
                match ensure_material(&secrets, &settings.secret, &settings.namespace, &names, Timestamp::now()).await {
                    Ok((m, outcome)) => {
                        if m != current {
                            match certified_key(&m) {
                                Ok(key) => {
                                    resolver.0.store(Arc::new(key));
                                    tracing::info!(?outcome, not_after = %m.not_after, "webhook certificate rotated");
                                    current = m;
                                }
                                Err(e) => tracing::warn!("rotated webhook certificate unusable: {e:#}"),
                            }
                        }
                    }
                    Err(e) => tracing::warn!(secret = %settings.secret, "webhook certificate: {e:#}"),
                }
                // Someone (a helm upgrade) may have reset it.
                bundle_synced = false;
            }
        }
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    config: &InjectorConfig,
) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, ct: &'static str, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(ct),
        );
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        (&Method::POST, "/inject") => {
            let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return reply(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "text/plain",
                        format!("cannot read the AdmissionReview: {e}\n").into_bytes(),
                    );
                }
            };
            reply(
                StatusCode::OK,
                "application/json",
                review::review(&body, config),
            )
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    }
}
