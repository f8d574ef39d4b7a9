//! Throwaway TLS material for end-to-end tests (rcgen): a CA, a server certificate, client
//! certificates, an mTLS backend that reports which client certificate it saw, and the
//! Kubernetes Secrets (file-provider YAML) the control plane turns into SDS secrets.

use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub struct Pki {
    pub ca_pem: String,
    /// The server certificate (PEM chain, PEM key) for `server_name`.
    pub server: (String, String),
    /// Two client certificates (PEM chain, PEM key) and their DER, to tell them apart.
    pub clients: Vec<(String, String, Vec<u8>)>,
}

/// A throwaway CA, a server certificate for `server_name` and two client certificates
/// (`client-v1`, `client-v2`).
pub fn pki(server_name: &str) -> Pki {
    pki_for(&[server_name.to_string()])
}

/// [`pki`] with a server certificate for every name of `server_names` (the first is its CN).
pub fn pki_for(server_names: &[String]) -> Pki {
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
    let cn = server_names.first().map_or("server", String::as_str);
    let (server_pem, server_key, _) = leaf(server_names.to_vec(), cn);
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
pub async fn start_mtls_backend(pki: &Pki) -> SocketAddr {
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

/// A Secret `mesh-ca` in `default` with the CA as `ca.crt` (file-provider YAML).
pub fn ca_secret(pki: &Pki) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: mesh-ca, namespace: default }}\nstringData:\n  ca.crt: |\n{}",
        indent(&pki.ca_pem)
    )
}

/// The `kubernetes.io/tls` Secret `client-cert` in `default` with client certificate `which`
/// (0 or 1), as `stringData` (file-provider YAML).
pub fn client_secret(pki: &Pki, which: usize) -> String {
    let (crt, key, _) = &pki.clients[which];
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: client-cert, namespace: default }}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(crt),
        indent(key)
    )
}
