//! Differential test of TLS: the same static bootstrap (TLS inspector, filter chains chosen by
//! SNI with their own certificates, mutual TLS, upstream TLS to a rustls server that is
//! trusted, signed by an unknown CA, expired, or has the wrong SAN) run by stock Envoy and by
//! capstan-proxy, with a throwaway CA from rcgen. Both must serve the same certificate and
//! body for each SNI, refuse the same clients, and answer the same status (and Envoy's
//! `transport failure reason`) for each upstream.
//!
//! Needs `envoy` on PATH (scripts/test.sh installs it); under `CI=true` its absence fails.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use capstan_e2e::process::{Peer, free_port, start_static_peer, temp_dir};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A throwaway CA writing PEM files into `dir`.
struct Pki {
    dir: PathBuf,
    name: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let ca = ca_params(name).self_signed(&key).expect("CA");
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca.pem()).expect("write CA");
        Self {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            issuer: Issuer::new(ca_params(name), key),
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// (certificate file, key file) for `names`; `expired` dates it in the past.
    fn leaf(&self, file: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        for n in names {
            params
                .subject_alt_names
                .push(if n.starts_with("spiffe://") {
                    SanType::URI((*n).try_into().expect("uri"))
                } else {
                    SanType::DnsName((*n).try_into().expect("dns"))
                });
        }
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or(file));
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn certs(file: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(file)
        .expect("read")
        .collect::<Result<_, _>>()
        .expect("certs")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An HTTPS backend (HTTP/1.1) answering `tls <name>`.
async fn tls_backend(name: &'static str, (cert, key): &(PathBuf, PathBuf)) -> u16 {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs(cert), PrivateKeyDer::from_pem_file(key).expect("key"))
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        format!("tls {name}"),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

fn tls_socket(cert: &(PathBuf, PathBuf), top: &str, common: &str) -> String {
    format!(
        r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          {top}
          common_tls_context:
            {common}
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {{ filename: "{}" }}
              private_key: {{ filename: "{}" }}"#,
        p(&cert.0),
        p(&cert.1)
    )
}

fn chain(matcher: &str, transport: &str, routes: &str) -> String {
    format!(
        r#"
    - filter_chain_match: {matcher}{transport}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: ingress
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:{routes}"#
    )
}

fn direct(body: &str) -> String {
    format!(
        "\n              - match: {{ prefix: \"/\" }}\n                direct_response: {{ status: 200, body: {{ inline_string: {body} }} }}"
    )
}

struct Setup {
    exact: (PathBuf, PathBuf),
    wild: (PathBuf, PathBuf),
    ca: PathBuf,
    upstream_ca: PathBuf,
    clusters: Vec<(&'static str, u16)>,
}

fn upstream_cluster(name: &str, port: u16, ca: &Path, san: &str) -> String {
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 2s
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: backend.example.com
        common_tls_context:
          validation_context:
            trusted_ca: {{ filename: "{}" }}
            match_typed_subject_alt_names: [{{ san_type: DNS, matcher: {{ exact: {san} }} }}]
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
"#,
        p(ca)
    )
}

fn bootstrap(admin: u16, listener: u16, s: &Setup) -> String {
    let clusters: String = s
        .clusters
        .iter()
        .map(|(name, port)| {
            let san = if *name == "san" {
                "other.example.com"
            } else {
                "backend.example.com"
            };
            upstream_cluster(name, *port, &s.upstream_ca, san)
        })
        .collect();
    let routes: String = s
        .clusters
        .iter()
        .map(|(name, _)| {
            format!(
                "\n              - match: {{ prefix: \"/{name}\" }}\n                route: {{ cluster: {name} }}"
            )
        })
        .collect();
    let mtls = format!(
        "validation_context:\n              trusted_ca: {{ filename: \"{}\" }}",
        p(&s.ca)
    );
    let chains = [
        chain(
            "{ server_names: [a.example.com] }",
            &tls_socket(&s.exact, "", ""),
            &direct("exact"),
        ),
        chain(
            "{ server_names: [\"*.example.com\"] }",
            &tls_socket(&s.wild, "", ""),
            &direct("wildcard"),
        ),
        chain(
            "{ server_names: [mtls.test] }",
            &tls_socket(&s.exact, "require_client_certificate: true", &mtls),
            &direct("mtls"),
        ),
        chain("{ transport_protocol: raw_buffer }", "", &routes),
    ]
    .concat();
    format!(
        r#"node: {{ id: tls-diff.default, cluster: tls-diff }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  clusters:
{clusters}  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener} }} }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
    filter_chains:{chains}
"#
    )
}

/// What one TLS client saw: the handshake, the served leaf, ALPN and the response body.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    sni: &'static str,
    outcome: Result<(Vec<u8>, Option<String>, String), String>,
}

async fn observe(
    port: u16,
    sni: &'static str,
    ca: &Path,
    alpn: &str,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Seen {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca) {
        roots.add(c).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((c, k)) => builder
            .with_client_auth_cert(certs(c), PrivateKeyDer::from_pem_file(k).expect("key"))
            .expect("identity"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.as_bytes().to_vec()];
    let outcome = async {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(sni).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|_| "handshake failed".to_string())?;
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c[0].to_vec());
        let negotiated = stream
            .get_ref()
            .1
            .alpn_protocol()
            .map(|a| String::from_utf8_lossy(a).into_owned());
        let io = TokioIo::new(stream);
        let req = hyper::Request::get(format!("https://{sni}/"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = if negotiated.as_deref() == Some("h2") {
            let (mut s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|_| "refused".to_string())?;
            tokio::spawn(c);
            s.send_request(req).await
        } else {
            let (mut s, c) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|_| "refused".to_string())?;
            tokio::spawn(c);
            let mut req = req;
            req.headers_mut()
                .insert("host", hyper::header::HeaderValue::from_static("x"));
            s.send_request(req).await
        }
        .map_err(|_| "refused".to_string())?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| "refused".to_string())?
            .to_bytes();
        Ok((
            leaf.unwrap_or_default(),
            negotiated,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    };
    Seen {
        sni,
        outcome: tokio::time::timeout(Duration::from_secs(10), outcome)
            .await
            .unwrap_or_else(|_| Err("timeout".into())),
    }
}

async fn plain_get(port: u16, path: &str) -> (u16, String) {
    let r = capstan_e2e::client::get(([127, 0, 0, 1], port).into(), "x", path)
        .await
        .expect("response");
    (r.status, r.body)
}

async fn stats(admin: u16) -> String {
    capstan_e2e::client::get(([127, 0, 0, 1], admin).into(), "admin", "/stats")
        .await
        .map(|r| r.body)
        .unwrap_or_default()
}

fn stat(stats: &str, name: &str) -> Option<u64> {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_sni_mtls_and_upstream_verification_match_envoy() {
    let work = temp_dir("tls-differential");
    let pki = Pki::new(&work, "front");
    let stranger = Pki::new(&work, "stranger");
    let upstream = Pki::new(&work, "back");
    let exact = pki.leaf("exact", &["a.example.com", "mtls.test"], false);
    let wild = pki.leaf("wild", &["*.example.com"], false);
    let client = pki.leaf(
        "client",
        &["spiffe://cluster.local/ns/default/sa/client"],
        false,
    );
    let foreign_client = stranger.leaf("foreign-client", &["spiffe://x"], false);
    let good = upstream.leaf("good", &["backend.example.com"], false);
    let expired = upstream.leaf("expired", &["backend.example.com"], true);
    let foreign = stranger.leaf("foreign", &["backend.example.com"], false);
    let good_port = tls_backend("good", &good).await;
    let setup = Setup {
        exact: exact.clone(),
        wild,
        ca: pki.ca(),
        upstream_ca: upstream.ca(),
        clusters: vec![
            ("good", good_port),
            ("unknown-ca", tls_backend("foreign", &foreign).await),
            ("expired", tls_backend("expired", &expired).await),
            ("san", good_port),
        ],
    };

    let mut ports = Vec::new();
    let mut running = Vec::new();
    for peer in [Peer::Envoy, Peer::Capstan] {
        let listener = free_port();
        let Some(r) =
            start_static_peer(peer, &work, |admin| bootstrap(admin, listener, &setup)).await
        else {
            eprintln!("envoy is not on PATH; differential TLS test not run");
            return;
        };
        ports.push((r.admin.port(), listener));
        running.push(r);
    }

    let mut seen = Vec::new();
    for &(_, port) in &ports {
        let ca = pki.ca();
        seen.push(vec![
            observe(port, "a.example.com", &ca, "h2", None).await,
            observe(port, "b.example.com", &ca, "http/1.1", None).await,
            observe(port, "mtls.test", &ca, "http/1.1", Some(&client)).await,
            observe(port, "mtls.test", &ca, "http/1.1", None).await,
            observe(port, "mtls.test", &ca, "http/1.1", Some(&foreign_client)).await,
        ]);
    }
    assert_eq!(
        seen[1], seen[0],
        "capstan-proxy and Envoy disagree (left: capstan-proxy, right: Envoy)"
    );
    // The agreement is the intended one.
    let bodies: Vec<Result<(Option<String>, String), String>> = seen[1]
        .iter()
        .map(|s| s.outcome.clone().map(|(_, alpn, body)| (alpn, body)))
        .collect();
    assert_eq!(
        bodies,
        vec![
            Ok((Some("h2".into()), "exact".into())),
            Ok((Some("http/1.1".into()), "wildcard".into())),
            Ok((Some("http/1.1".into()), "mtls".into())),
            Err("refused".into()),
            Err("refused".into()),
        ]
    );

    // Upstream TLS: the same status and Envoy's transport failure reason.
    for name in ["good", "unknown-ca", "expired", "san"] {
        let (status_e, body_e) = plain_get(ports[0].1, &format!("/{name}")).await;
        let (status_c, body_c) = plain_get(ports[1].1, &format!("/{name}")).await;
        assert_eq!(status_c, status_e, "{name}: {body_c} vs Envoy's {body_e}");
        assert!(
            body_c.starts_with(&body_e),
            "{name}: capstan-proxy {body_c:?} does not extend Envoy's {body_e:?}"
        );
    }
    let (_, body) = plain_get(ports[1].1, "/expired").await;
    assert!(body.ends_with("(certificate has expired)"), "{body}");

    let (envoy_stats, proxy_stats) = (stats(ports[0].0).await, stats(ports[1].0).await);
    for name in [
        "cluster.good.ssl.handshake",
        "cluster.unknown-ca.ssl.connection_error",
        "cluster.expired.ssl.connection_error",
        "cluster.san.ssl.connection_error",
        "cluster.san.ssl.fail_verify_san",
    ] {
        assert_eq!(
            stat(&proxy_stats, name),
            stat(&envoy_stats, name),
            "{name}\nEnvoy:\n{envoy_stats}"
        );
    }
    let listener = |port: u16| format!("listener.127.0.0.1_{port}.ssl");
    for stat_name in [
        "handshake",
        "connection_error",
        "fail_verify_no_cert",
        "fail_verify_error",
    ] {
        assert_eq!(
            stat(
                &proxy_stats,
                &format!("{}.{stat_name}", listener(ports[1].1))
            ),
            stat(
                &envoy_stats,
                &format!("{}.{stat_name}", listener(ports[0].1))
            ),
            "listener ssl.{stat_name}"
        );
    }
    drop(running);
}
