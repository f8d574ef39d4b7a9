//! TLS through the proxy binary, with a throwaway CA from rcgen and real rustls peers:
//! downstream termination (HTTP/1.1 and HTTP/2 chosen by ALPN), SNI choosing the filter chain
//! and its certificate (TLS inspector), mutual TLS, and upstream origination whose failures
//! (unknown CA, expired certificate, SAN mismatch) become 503s naming the cause.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::*;

/// A throwaway CA that writes PEM files into a temporary directory.
struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A leaf certificate's files.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let ca = ca_params(name).self_signed(&key).expect("CA");
        let dir = temp_dir(&format!("tls-{name}"));
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write CA");
        Self {
            dir,
            issuer: Issuer::new(ca_params(name), key),
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `names` (DNS names, IPs, or `spiffe://` URIs); `expired` puts its
    /// validity in the past.
    fn leaf(&self, file: &str, names: &[&str], expired: bool) -> Leaf {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        for n in names {
            let san = if n.starts_with("spiffe://") {
                SanType::URI((*n).try_into().expect("uri"))
            } else if let Ok(ip) = n.parse() {
                SanType::IpAddress(ip)
            } else {
                SanType::DnsName((*n).try_into().expect("dns name"))
            };
            params.subject_alt_names.push(san);
        }
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let leaf = Leaf {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem()).expect("write cert");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write key");
        leaf
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn certs(file: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(file)
        .expect("read certs")
        .collect::<Result<_, _>>()
        .expect("certs")
}

fn key(file: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(file).expect("key")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration trusting `ca`, offering `alpn`, optionally with a client certificate.
fn client_config(ca: &Path, alpn: &[&str], identity: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca) {
        roots.add(c).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(certs(&leaf.cert), key(&leaf.key))
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(
    port: u16,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// One GET over an established TLS connection, HTTP/2 when ALPN chose it.
async fn get_over(stream: Tls, host: &str, path: &str) -> Result<(StatusCode, String), String> {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let req = Request::get(format!("https://{host}{path}"))
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = req;
        req.headers_mut().remove("host");
        sender.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(req).await.map_err(|e| e.to_string())?
    };
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A `DownstreamTlsContext` transport socket (YAML at the indentation of a filter chain's
/// keys); `top` adds context fields, `common` adds `common_tls_context` fields.
fn downstream_tls(leaf: &Leaf, top: &str, common: &str) -> String {
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
        path(&leaf.cert),
        path(&leaf.key)
    )
}

/// An HTTP connection manager chain answering `body` to everything (a direct response), or
/// routing to `cluster` when `body` is empty.
fn http_chain(matcher: &str, body: &str, transport: &str) -> String {
    let action = if body.is_empty() {
        "route: { cluster: backend }".to_string()
    } else {
        format!("direct_response: {{ status: 200, body: {{ inline_string: {body} }} }}")
    };
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
              routes:
              - match: {{ prefix: "/" }}
                {action}"#
    )
}

fn listener_bootstrap(clusters: &str, port: u16, listener_filters: &str, chains: &str) -> String {
    format!(
        r#"node: {{ id: test-0.default, cluster: test }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: ADMIN_PORT }} }} }}
static_resources:
  clusters:
{clusters}
  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}{listener_filters}
    filter_chains:{chains}
"#
    )
}

async fn stat(proxy: &Proxy, name: &str) -> u64 {
    let stats = proxy.admin_get("/stats").await.text();
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stat {name} in:\n{stats}"))
}

#[tokio::test]
async fn downstream_tls_serves_http1_and_http2_by_alpn() {
    let pki = Pki::new("downstream");
    let leaf = pki.leaf("server", &["proxy.example.com"], false);
    let backend = Backend::start("b1").await;
    let port = free_port();
    let bootstrap = listener_bootstrap(
        &static_cluster("backend", &[backend.port()], ""),
        port,
        "",
        &http_chain("{}", "", &downstream_tls(&leaf, "", "")),
    );
    let proxy = Proxy::start(&bootstrap, &[]);
    proxy.wait_live().await;

    for alpn in ["h2", "http/1.1"] {
        let stream = tls_connect(
            port,
            "proxy.example.com",
            client_config(&pki.ca_file(), &[alpn], None),
        )
        .await
        .expect("handshake");
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn.as_bytes()));
        let (status, body) = get_over(stream, "proxy.example.com", "/hello")
            .await
            .expect("request");
        assert_eq!(status, StatusCode::OK, "{alpn}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("backend json");
        assert_eq!(json["path"], "/hello", "{alpn}");
        assert_eq!(
            json["headers"]["x-forwarded-proto"][0], "https",
            "{alpn}: {json}"
        );
    }
    // Plaintext to a TLS chain fails: no HTTP response, only a TLS alert.
    let mut plain = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    plain
        .write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        stat(
            &proxy,
            "listener.127.0.0.1_PORT.ssl.handshake"
                .replace("PORT", &port.to_string())
                .as_str()
        )
        .await
            >= 2
    );
    assert!(
        stat(
            &proxy,
            "listener.127.0.0.1_PORT.ssl.connection_error"
                .replace("PORT", &port.to_string())
                .as_str()
        )
        .await
            >= 1
    );
}

#[tokio::test]
async fn sni_picks_the_filter_chain_and_its_certificate() {
    let pki = Pki::new("sni");
    let exact = pki.leaf("exact", &["a.example.com"], false);
    let wild = pki.leaf("wild", &["*.example.com"], false);
    let other = pki.leaf("other", &["other.test"], false);
    let port = free_port();
    let chains = [
        http_chain(
            "{ server_names: [a.example.com] }",
            "exact",
            &downstream_tls(&exact, "", ""),
        ),
        http_chain(
            "{ server_names: [\"*.example.com\"] }",
            "wildcard",
            &downstream_tls(&wild, "", ""),
        ),
        http_chain(
            "{ transport_protocol: tls }",
            "any-tls",
            &downstream_tls(&other, "", ""),
        ),
        http_chain("{ transport_protocol: raw_buffer }", "plaintext", ""),
    ]
    .concat();
    let bootstrap = listener_bootstrap(
        &static_cluster("backend", &[free_port()], ""),
        port,
        r#"
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }"#,
        &chains,
    );
    let proxy = Proxy::start(&bootstrap, &[]);
    proxy.wait_live().await;

    // The client verifies the certificate against the SNI: each chain served its own.
    for (sni, expected) in [
        ("a.example.com", "exact"),
        ("b.example.com", "wildcard"),
        ("other.test", "any-tls"),
    ] {
        let stream = tls_connect(
            port,
            sni,
            client_config(&pki.ca_file(), &["http/1.1"], None),
        )
        .await
        .unwrap_or_else(|e| panic!("{sni}: handshake: {e}"));
        let (status, body) = get_over(stream, sni, "/").await.expect("request");
        assert_eq!((status, body.as_str()), (StatusCode::OK, expected), "{sni}");
    }
    let plain = get(port, "anything", "/").await;
    assert_eq!(
        (plain.status, plain.text().as_str()),
        (StatusCode::OK, "plaintext")
    );
}

#[tokio::test]
async fn mutual_tls_accepts_a_good_client_certificate_and_refuses_others() {
    let pki = Pki::new("mtls");
    let stranger = Pki::new("stranger");
    let server = pki.leaf("server", &["proxy.example.com"], false);
    let good = pki.leaf(
        "client",
        &["spiffe://cluster.local/ns/default/sa/client"],
        false,
    );
    let wrong_san = pki.leaf(
        "wrong",
        &["spiffe://cluster.local/ns/default/sa/other"],
        false,
    );
    let bad = stranger.leaf(
        "client",
        &["spiffe://cluster.local/ns/default/sa/client"],
        false,
    );
    let port = free_port();
    let validation = format!(
        r#"validation_context:
              trusted_ca: {{ filename: "{}" }}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{ prefix: "spiffe://cluster.local/ns/default/sa/client" }}"#,
        path(&pki.ca_file())
    );
    let transport = downstream_tls(&server, "require_client_certificate: true", &validation);
    let bootstrap = listener_bootstrap(
        &static_cluster("backend", &[free_port()], ""),
        port,
        "",
        &http_chain("{}", "hello", &transport),
    );
    let proxy = Proxy::start(&bootstrap, &[]);
    proxy.wait_live().await;

    let ok = tls_connect(
        port,
        "proxy.example.com",
        client_config(&pki.ca_file(), &[], Some(&good)),
    )
    .await
    .expect("handshake with a good certificate");
    let (status, body) = get_over(ok, "proxy.example.com", "/")
        .await
        .expect("request");
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello"));

    // TLS 1.3 clients learn of the refusal on their first read.
    for (what, identity) in [
        ("no certificate", None),
        ("unknown CA", Some(&bad)),
        ("SAN mismatch", Some(&wrong_san)),
    ] {
        let refused = match tls_connect(
            port,
            "proxy.example.com",
            client_config(&pki.ca_file(), &[], identity),
        )
        .await
        {
            Err(_) => true,
            Ok(s) => get_over(s, "proxy.example.com", "/").await.is_err(),
        };
        assert!(refused, "{what}: the connection was served");
    }
    let prefix = format!("listener.127.0.0.1_{port}.ssl");
    assert!(
        eventually(Duration::from_secs(5), async || {
            stat(&proxy, &format!("{prefix}.fail_verify_no_cert")).await == 1
                && stat(&proxy, &format!("{prefix}.fail_verify_error")).await == 1
                && stat(&proxy, &format!("{prefix}.fail_verify_san")).await == 1
                && stat(&proxy, &format!("{prefix}.connection_error")).await == 0
                && stat(&proxy, &format!("{prefix}.no_certificate")).await == 0
        })
        .await,
        "{}",
        proxy.admin_get("/stats").await.text()
    );
    assert_eq!(stat(&proxy, &format!("{prefix}.handshake")).await, 1);
}

/// An HTTPS backend (rustls, HTTP/1.1 or h2 by ALPN) answering `tls <name> sni=<sni>
/// alpn=<alpn> client-cert=<bool>`.
async fn tls_backend(
    name: &'static str,
    leaf: &Leaf,
    client_ca: Option<&Path>,
) -> (u16, tokio::task::JoinHandle<()>) {
    tls_backend_offering(name, leaf, client_ca, &["h2", "http/1.1"]).await
}

/// [`tls_backend`] accepting only the ALPN protocols `alpn`.
async fn tls_backend_offering(
    name: &'static str,
    leaf: &Leaf,
    client_ca: Option<&Path>,
    alpn: &[&str],
) -> (u16, tokio::task::JoinHandle<()>) {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca) {
                roots.add(c).expect("root");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs(&leaf.cert), key(&leaf.key))
        .expect("server config");
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, conn) = stream.get_ref();
                let info = format!(
                    "tls {name} sni={} alpn={} client-cert={}",
                    conn.server_name().unwrap_or("-"),
                    conn.alpn_protocol()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .unwrap_or_else(|| "-".into()),
                    conn.peer_certificates().is_some_and(|c| !c.is_empty()),
                );
                let service = hyper::service::service_fn(move |_req| {
                    let info = info.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(Bytes::from(info)),
                        ))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, task)
}

/// A cluster with an `UpstreamTlsContext` (`tls` is the YAML of the context's fields).
fn tls_cluster(name: &str, port: u16, tls: &str, extra: &str) -> String {
    let ts = format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
{tls}
{extra}"#
    );
    static_cluster(name, &[port], &ts)
}

#[tokio::test]
async fn upstream_tls_verifies_the_server_and_names_the_cause_of_failures() {
    let pki = Pki::new("upstream");
    let stranger = Pki::new("upstream-stranger");
    let good = pki.leaf(
        "good",
        &[
            "backend.example.com",
            "spiffe://cluster.local/ns/default/sa/backend",
        ],
        false,
    );
    let expired = pki.leaf("expired", &["backend.example.com"], true);
    let foreign = stranger.leaf("foreign", &["backend.example.com"], false);
    let client = pki.leaf(
        "client",
        &["spiffe://cluster.local/ns/default/sa/proxy"],
        false,
    );
    let (good_port, _g) = tls_backend("good", &good, None).await;
    let (mtls_port, _m) = tls_backend("mtls", &good, Some(&pki.ca_file())).await;
    let (expired_port, _e) = tls_backend("expired", &expired, None).await;
    let (foreign_port, _f) = tls_backend("foreign", &foreign, None).await;
    let ca = path(&pki.ca_file()).to_string();
    let validation = |sans: &str| {
        format!(
            "        common_tls_context:\n          validation_context:\n            trusted_ca: {{ filename: \"{ca}\" }}\n{sans}"
        )
    };
    let dns_san = "            match_typed_subject_alt_names:\n            - { san_type: DNS, matcher: { exact: backend.example.com } }\n";
    let clusters = [
        tls_cluster("good", good_port, &format!("        sni: backend.example.com\n{}", validation(dns_san)), ""),
        tls_cluster(
            "uri",
            good_port,
            &validation("            match_typed_subject_alt_names:\n            - { san_type: URI, matcher: { suffix: /sa/backend } }\n"),
            "",
        ),
        tls_cluster(
            "mtls",
            mtls_port,
            &format!(
                "{}          tls_certificates:\n          - certificate_chain: {{ filename: \"{}\" }}\n            private_key: {{ filename: \"{}\" }}\n",
                validation(""),
                path(&client.cert),
                path(&client.key)
            ),
            "",
        ),
        tls_cluster(
            "h2",
            good_port,
            &format!("{}          alpn_protocols: [h2]\n", validation("")),
            "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }\n",
        ),
        tls_cluster("noverify", foreign_port, "        sni: anything.test", ""),
        tls_cluster("unknown-ca", foreign_port, &validation(dns_san), ""),
        tls_cluster("expired", expired_port, &validation(dns_san), ""),
        tls_cluster(
            "san",
            good_port,
            &validation("            match_typed_subject_alt_names:\n            - { san_type: DNS, matcher: { exact: other.example.com } }\n"),
            "",
        ),
    ]
    .concat();
    let routes: String = [
        "good",
        "uri",
        "mtls",
        "h2",
        "noverify",
        "unknown-ca",
        "expired",
        "san",
    ]
    .iter()
    .map(|c| format!("  - match: {{ prefix: \"/{c}\" }}\n    route: {{ cluster: {c} }}\n"))
    .collect();
    let port = free_port();
    let rc = format!("virtual_hosts:\n- name: all\n  domains: [\"*\"]\n  routes:\n{routes}");
    let bootstrap = bootstrap(&[clusters], port, &rc);
    let proxy = Proxy::start(&bootstrap, &[]);
    proxy.wait_live().await;

    let ok = |r: &Reply, expect: &str| {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(r.text().starts_with(expect), "{}", r.text());
    };
    ok(
        &get(port, "x", "/good").await,
        "tls good sni=backend.example.com alpn=- client-cert=false",
    );
    ok(&get(port, "x", "/uri").await, "tls good sni=- ");
    ok(
        &get(port, "x", "/mtls").await,
        "tls mtls sni=- alpn=- client-cert=true",
    );
    ok(&get(port, "x", "/h2").await, "tls good sni=- alpn=h2");
    // No validation context: Envoy accepts any server certificate.
    ok(
        &get(port, "x", "/noverify").await,
        "tls foreign sni=anything.test",
    );
    // A pooled TLS connection is reused.
    ok(&get(port, "x", "/good").await, "tls good");
    assert_eq!(stat(&proxy, "cluster.good.ssl.handshake").await, 1);

    for (cluster, cause) in [
        ("unknown-ca", "unknown CA"),
        ("expired", "certificate has expired"),
        ("san", "SAN mismatch"),
    ] {
        let r = get(port, "x", &format!("/{cluster}")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{cluster}");
        let body = r.text();
        assert!(
            body.starts_with("upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end"),
            "{cluster}: {body}"
        );
        assert!(body.contains(cause), "{cluster}: {body}");
        // As in Envoy, a verification failure is not a `connection_error`.
        assert_eq!(
            stat(&proxy, &format!("cluster.{cluster}.ssl.connection_error")).await,
            0,
            "{cluster}"
        );
        assert_eq!(
            stat(
                &proxy,
                &format!("cluster.{cluster}.upstream_cx_connect_fail")
            )
            .await,
            1,
            "{cluster}"
        );
    }
    assert_eq!(stat(&proxy, "cluster.san.ssl.fail_verify_san").await, 1);
    assert_eq!(
        stat(&proxy, "cluster.unknown-ca.ssl.fail_verify_error").await,
        1
    );
    assert_eq!(
        stat(&proxy, "cluster.expired.ssl.fail_verify_error").await,
        1
    );
}

/// `auto_config`: the upstream protocol is whatever the TLS handshake's ALPN picks (the proxy
/// offers `h2,http/1.1` when the context sets no ALPN), HTTP/1.1 when the upstream picks
/// none; each connection and request is counted under the protocol it used.
#[tokio::test]
async fn auto_config_follows_the_upstream_alpn() {
    let pki = Pki::new("auto");
    let leaf = pki.leaf("backend", &["backend.example.com"], false);
    let (h2_port, _a) = tls_backend_offering("both", &leaf, None, &["h2", "http/1.1"]).await;
    let (h1_port, _b) = tls_backend_offering("h1only", &leaf, None, &["http/1.1"]).await;
    let (none_port, _c) = tls_backend_offering("noalpn", &leaf, None, &[]).await;
    let ca = path(&pki.ca_file()).to_string();
    let auto = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        auto_config: { http_protocol_options: {}, http2_protocol_options: {} }\n";
    let validation = format!(
        "        common_tls_context:\n          validation_context:\n            trusted_ca: {{ filename: \"{ca}\" }}\n"
    );
    let clusters = [
        tls_cluster("both", h2_port, &validation, auto),
        tls_cluster("h1only", h1_port, &validation, auto),
        tls_cluster("noalpn", none_port, &validation, auto),
    ]
    .concat();
    let routes: String = ["both", "h1only", "noalpn"]
        .iter()
        .map(|c| format!("  - match: {{ prefix: \"/{c}\" }}\n    route: {{ cluster: {c} }}\n"))
        .collect();
    let port = free_port();
    let rc = format!("virtual_hosts:\n- name: all\n  domains: [\"*\"]\n  routes:\n{routes}");
    let proxy = Proxy::start(&bootstrap(&[clusters], port, &rc), &[]);
    proxy.wait_live().await;
    for _ in 0..3 {
        let r = get(port, "x", "/both").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(
            r.text().starts_with("tls both sni=- alpn=h2"),
            "{}",
            r.text()
        );
        let r = get(port, "x", "/h1only").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(
            r.text().starts_with("tls h1only sni=- alpn=http/1.1"),
            "{}",
            r.text()
        );
        let r = get(port, "x", "/noalpn").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(
            r.text().starts_with("tls noalpn sni=- alpn=-"),
            "{}",
            r.text()
        );
    }
    // One connection each, reused, under the negotiated protocol.
    assert_eq!(
        stat(&proxy, "cluster.both.upstream_cx_http2_total").await,
        1
    );
    assert_eq!(
        stat(&proxy, "cluster.both.upstream_cx_http1_total").await,
        0
    );
    assert_eq!(
        stat(&proxy, "cluster.h1only.upstream_cx_http1_total").await,
        1
    );
    assert_eq!(
        stat(&proxy, "cluster.noalpn.upstream_cx_http1_total").await,
        1
    );
    assert_eq!(stat(&proxy, "cluster.both.upstream_rq_total").await, 3);
}

/// A TLS echo server (rustls): answers each read with `echo:` and the bytes.
async fn tls_echo(leaf: &Leaf) -> (u16, tokio::task::JoinHandle<()>) {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs(&leaf.cert), key(&leaf.key))
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut out = b"echo:".to_vec();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn the_tcp_proxy_terminates_and_originates_tls() {
    let pki = Pki::new("tcp");
    let front = pki.leaf("front", &["proxy.example.com"], false);
    let back = pki.leaf("back", &["backend.example.com"], false);
    let (echo_port, _task) = tls_echo(&back).await;
    let port = free_port();
    let cluster = tls_cluster(
        "backend",
        echo_port,
        &format!(
            "        sni: backend.example.com\n        common_tls_context:\n          validation_context: {{ trusted_ca: {{ filename: \"{}\" }} }}",
            path(&pki.ca_file())
        ),
        "",
    );
    let chain = format!(
        r#"
    - filter_chain_match: {{}}{}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tls-tcp
          cluster: backend"#,
        downstream_tls(&front, "", "")
    );
    let proxy = Proxy::start(&listener_bootstrap(&cluster, port, "", &chain), &[]);
    proxy.wait_live().await;
    let mut s = tls_connect(
        port,
        "proxy.example.com",
        client_config(&pki.ca_file(), &[], None),
    )
    .await
    .expect("handshake");
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&buf[..n], b"echo:ping");
    // A half-close through both TLS legs ends the exchange.
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(stat(&proxy, "cluster.backend.ssl.handshake").await, 1);
}

#[tokio::test]
async fn bad_tls_configuration_is_rejected_naming_the_field() {
    let pki = Pki::new("bad");
    let leaf = pki.leaf("server", &["proxy.example.com"], false);
    let other = pki.leaf("other", &["proxy.example.com"], false);
    let port = free_port();
    // The key of another certificate, a missing CA file, and TLS 1.1.
    let transport = downstream_tls(
        &Leaf {
            cert: leaf.cert.clone(),
            key: other.key.clone(),
        },
        "",
        "",
    );
    let bootstrap = listener_bootstrap(
        &tls_cluster(
            "backend",
            free_port(),
            "        common_tls_context:\n          tls_params: { tls_minimum_protocol_version: TLSv1_1 }\n          validation_context: { trusted_ca: { filename: /nonexistent/ca.pem } }",
            "",
        ),
        port,
        "",
        &http_chain("{}", "x", &transport),
    );
    let mut proxy = Proxy::start(&bootstrap, &[]);
    let code = proxy.wait_exit(Duration::from_secs(10)).await;
    let stderr = proxy.stderr();
    assert_eq!(code, Some(64), "{stderr}");
    for expected in [
        "clusters[0].transport_socket.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version: unsupported value TLSv1_1",
        "clusters[0].transport_socket.typed_config.common_tls_context.validation_context.trusted_ca.filename: cannot read /nonexistent/ca.pem",
        "listeners[0].filter_chains[0].transport_socket.typed_config.common_tls_context: tls_certificates[0]:",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

mod sds {
    //! SDS over ADS against the control plane's real xDS server: warming until the secret
    //! arrives, rotation for new handshakes while an open connection keeps working, and a bad
    //! secret NACKed naming the field.

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use capstan_control_plane::xds::{ResourceSource, Resources, XdsServer};
    use capstan_proxy::xds::{CLUSTER_TYPE, LISTENER_TYPE, SECRET_TYPE};
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
    use envoy_types::pb::google::protobuf::Any;
    use envoy_types::util::pack_any;
    use tokio::sync::watch;

    use super::*;

    struct Source {
        items: Mutex<BTreeMap<(&'static str, String), Any>>,
        changes: watch::Sender<u64>,
    }

    impl Source {
        fn put(&self, type_url: &'static str, name: &str, any: Any) {
            self.items
                .lock()
                .expect("lock")
                .insert((type_url, name.to_string()), any);
            self.changes.send_modify(|v| *v += 1);
        }
    }

    impl ResourceSource for Source {
        fn resources_for(&self, _node: &Node) -> Arc<Resources> {
            let mut r = Resources::default();
            for ((t, n), any) in self.items.lock().expect("lock").iter() {
                r.by_type
                    .entry((*t).to_string())
                    .or_default()
                    .insert(n.clone(), any.clone());
            }
            Arc::new(r)
        }

        fn changes(&self) -> watch::Receiver<u64> {
            self.changes.subscribe()
        }
    }

    fn yaml<M: prost::Message + prost::Name + Default>(text: &str) -> Any {
        pack_any(capstan_proto::from_yaml::<M>(text).expect("test resource parses"))
    }

    const SECRET: &str = "kubernetes://default/proxy-cert";

    fn secret(cert: &Path, key: &Path) -> Any {
        let read = |p: &Path| std::fs::read_to_string(p).expect("read pem");
        let mut s = Secret {
            name: SECRET.to_string(),
            ..Default::default()
        };
        let t = capstan_proto::from_yaml::<
            envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::TlsCertificate,
        >(&format!(
            "certificate_chain: {{ inline_string: {:?} }}\nprivate_key: {{ inline_string: {:?} }}\n",
            read(cert),
            read(key)
        ))
        .expect("tls certificate");
        s.r#type = Some(
            envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type::TlsCertificate(t),
        );
        pack_any(s)
    }

    fn listener(port: u16) -> Any {
        yaml::<Listener>(&format!(
            r#"name: tls
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
filter_chains:
- transport_socket:
    name: envoy.transport_sockets.tls
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
      common_tls_context:
        tls_certificate_sds_secret_configs:
        - name: "{SECRET}"
          sds_config: {{ ads: {{}}, resource_api_version: V3, initial_fetch_timeout: 30s }}
  filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": {HCM}
      stat_prefix: tls
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
      route_config:
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
          - match: {{ prefix: "/" }}
            direct_response: {{ status: 200, body: {{ inline_string: hello }} }}
"#
        ))
    }

    fn ads_bootstrap(xds_port: u16) -> String {
        format!(
            r#"node: {{ id: proxy-0.default, cluster: proxy }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: ADMIN_PORT }} }} }}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}]
  cds_config: {{ ads: {{}}, initial_fetch_timeout: 5s }}
  lds_config: {{ ads: {{}}, initial_fetch_timeout: 5s }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {xds_port} }} }} }}
"#
        )
    }

    fn peer_leaf(stream: &Tls) -> Vec<u8> {
        stream
            .get_ref()
            .1
            .peer_certificates()
            .expect("server certificate")[0]
            .to_vec()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sds_rotation_reaches_new_handshakes_and_keeps_open_connections() {
        let pki = Pki::new("sds");
        let one = pki.leaf("one", &["proxy.example.com"], false);
        let two = pki.leaf("two", &["proxy.example.com"], false);
        let source = Arc::new(Source {
            items: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
        });
        let listener_socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let xds_port = listener_socket.local_addr().expect("addr").port();
        let server = XdsServer::new(source.clone());
        let nacks = server.nacks();
        tokio::spawn(async move {
            let _ = server
                .serve(listener_socket, std::future::pending::<()>())
                .await;
        });
        let port = free_port();
        // The listener arrives before its secret: it warms (and, being part of the initial
        // LDS response, holds the server's initialization, as in Envoy) and does not accept.
        source.put(LISTENER_TYPE, "tls", listener(port));
        let proxy = Proxy::start(&ads_bootstrap(xds_port), &[]);
        assert!(
            eventually(Duration::from_secs(10), async || proxy
                .ready()
                .await
                .is_some())
            .await
        );
        assert!(
            eventually(Duration::from_secs(10), async || {
                proxy
                    .admin_get("/stats")
                    .await
                    .text()
                    .contains("listener_manager.total_listeners_warming: 1")
            })
            .await,
            "{}",
            proxy.stderr()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!accepts(port).await, "a warming listener accepted");
        assert_ne!(proxy.ready().await.map(|(s, _)| s), Some(StatusCode::OK));

        source.put(SECRET_TYPE, SECRET, secret(&one.cert, &one.key));
        proxy.wait_live().await;
        assert!(
            eventually(Duration::from_secs(10), async || accepts(port).await).await,
            "the listener did not warm once its secret arrived:\n{}",
            proxy.stderr()
        );
        let config = || client_config(&pki.ca_file(), &["http/1.1"], None);
        let first = tls_connect(port, "proxy.example.com", config())
            .await
            .expect("handshake");
        assert_eq!(peer_leaf(&first), certs(&one.cert)[0].to_vec());
        // Keep the first connection open across the rotation.
        let io = TokioIo::new(first);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.expect("h1");
        tokio::spawn(conn);
        let get_on = |sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>| {
            sender.send_request(
                Request::get("/")
                    .header("host", "proxy.example.com")
                    .body(Empty::new())
                    .expect("request"),
            )
        };
        assert_eq!(
            get_on(&mut sender).await.expect("first request").status(),
            StatusCode::OK
        );

        // A bad secret (another certificate's key) is NACKed naming the field; nothing changes.
        source.put(SECRET_TYPE, SECRET, secret(&two.cert, &one.key));
        assert!(
            eventually(Duration::from_secs(10), async || {
                nacks.latest_for_node("proxy-0.default").is_some_and(|n| {
                    n.type_url == SECRET_TYPE
                        && n.message.contains(&format!(
                            "Secret {SECRET}: tls_certificate: certificate and private key:"
                        ))
                })
            })
            .await,
            "{:?}",
            nacks.all()
        );
        let still = tls_connect(port, "proxy.example.com", config())
            .await
            .expect("handshake");
        assert_eq!(peer_leaf(&still), certs(&one.cert)[0].to_vec());

        // Rotation: new handshakes get the new certificate ...
        source.put(SECRET_TYPE, SECRET, secret(&two.cert, &two.key));
        assert!(
            eventually(Duration::from_secs(10), async || {
                match tls_connect(port, "proxy.example.com", config()).await {
                    Ok(s) => peer_leaf(&s) == certs(&two.cert)[0].to_vec(),
                    Err(_) => false,
                }
            })
            .await,
            "new handshakes did not get the rotated certificate"
        );
        // ... and the connection opened before still works.
        let reply = get_on(&mut sender).await.expect("request after rotation");
        assert_eq!(reply.status(), StatusCode::OK);
        let body = reply.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"hello");

        // /config_dump shows the secret with its private key redacted, as Envoy does.
        let dump = proxy.admin_get("/config_dump").await.text();
        assert!(
            dump.contains("type.googleapis.com/envoy.admin.v3.SecretsConfigDump"),
            "{dump}"
        );
        assert!(
            dump.contains(SECRET) && dump.contains("[redacted]"),
            "{dump}"
        );
        assert!(!dump.contains("PRIVATE KEY"), "{dump}");
    }

    fn ca_secret(name: &str, ca: &Path) -> Any {
        let pem = std::fs::read_to_string(ca).expect("read ca");
        yaml::<Secret>(&format!(
            "name: {name:?}\nvalidation_context: {{ trusted_ca: {{ inline_string: {pem:?} }} }}\n"
        ))
    }

    fn named_secret(name: &str, cert: &Path, key: &Path) -> Any {
        let mut any = secret(cert, key);
        let mut s: Secret = prost::Message::decode(any.value.as_slice()).expect("secret");
        s.name = name.to_string();
        any = pack_any(s);
        any
    }

    /// A CDS cluster whose client certificate and CA come by SDS (what Capstan's control plane
    /// sends for a ServicePolicy with `caCertificateSecret` and `clientCertificateSecret`).
    fn sds_cluster(name: &str, port: u16, san: &str) -> Any {
        yaml::<envoy_types::pb::envoy::config::cluster::v3::Cluster>(&format!(
            r#"name: {name}
type: STATIC
connect_timeout: 2s
transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
    sni: backend.example.com
    common_tls_context:
      tls_certificate_sds_secret_configs:
      - name: kubernetes://default/client
        sds_config: {{ ads: {{}}, resource_api_version: V3 }}
      combined_validation_context:
        default_validation_context:
          match_typed_subject_alt_names: [{{ san_type: DNS, matcher: {{ exact: {san} }} }}]
        validation_context_sds_secret_config:
          name: kubernetes://default/client/ca.crt
          sds_config: {{ ads: {{}}, resource_api_version: V3 }}
load_assignment:
  cluster_name: {name}
  endpoints:
  - lb_endpoints:
    - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
"#
        ))
    }

    fn routing_listener(port: u16) -> Any {
        yaml::<Listener>(&format!(
            r#"name: out
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": {HCM}
      stat_prefix: out
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
      route_config:
        virtual_hosts:
        - name: all
          domains: ["*"]
          routes:
          - {{ match: {{ prefix: "/wrong" }}, route: {{ cluster: wrong-san }} }}
          - {{ match: {{ prefix: "/" }}, route: {{ cluster: backend }} }}
"#
        ))
    }

    /// A bootstrap (static) cluster with SDS secrets holds the server's initialization until
    /// they arrive, as Envoy's secret providers hold its init manager.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn static_clusters_hold_initialization_until_their_sds_secrets_arrive() {
        let pki = Pki::new("sds-static");
        let server = pki.leaf("server", &["backend.example.com"], false);
        let client = pki.leaf(
            "client",
            &["spiffe://cluster.local/ns/default/sa/proxy"],
            false,
        );
        let (backend_port, _task) = tls_backend("mtls", &server, Some(&pki.ca_file())).await;
        let source = Arc::new(Source {
            items: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
        });
        let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let xds_port = socket.local_addr().expect("addr").port();
        let xds = XdsServer::new(source.clone());
        tokio::spawn(async move {
            let _ = xds.serve(socket, std::future::pending::<()>()).await;
        });
        let port = free_port();
        source.put(LISTENER_TYPE, "out", routing_listener(port));
        // The two SDS clusters of `sds_cluster`, as static resources of the bootstrap.
        let statics: String = [
            ("backend", "backend.example.com"),
            ("wrong-san", "other.example.com"),
        ]
        .iter()
        .map(|(name, san)| {
            let any = sds_cluster(name, backend_port, san);
            let c: envoy_types::pb::envoy::config::cluster::v3::Cluster =
                prost::Message::decode(any.value.as_slice()).expect("cluster");
            let json = serde_json::to_string(&capstan_proto::to_json(&c).expect("json"))
                .expect("json text");
            format!("  - {json}\n")
        })
        .collect();
        let bootstrap = ads_bootstrap(xds_port).replace(
            "static_resources:\n  clusters:\n",
            &format!("static_resources:\n  clusters:\n{statics}"),
        );
        let proxy = Proxy::start(&bootstrap, &[]);
        assert!(
            eventually(Duration::from_secs(10), async || proxy
                .ready()
                .await
                .is_some())
            .await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, state) = proxy.ready().await.expect("ready answers");
        assert_ne!(
            status,
            StatusCode::OK,
            "LIVE before the cluster's secrets: {state}"
        );
        let dump = proxy.admin_get("/init_dump").await.text();
        assert!(dump.contains("cluster backend SDS secrets"), "{dump}");

        source.put(
            SECRET_TYPE,
            "kubernetes://default/client",
            named_secret("kubernetes://default/client", &client.cert, &client.key),
        );
        source.put(
            SECRET_TYPE,
            "kubernetes://default/client/ca.crt",
            ca_secret("kubernetes://default/client/ca.crt", &pki.ca_file()),
        );
        proxy.wait_live().await;
        let ok = get(port, "x", "/").await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
        assert_eq!(
            ok.text(),
            "tls mtls sni=backend.example.com alpn=- client-cert=true"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn clusters_warm_until_their_sds_secrets_arrive_and_then_use_them() {
        let pki = Pki::new("sds-upstream");
        let server = pki.leaf("server", &["backend.example.com"], false);
        let client = pki.leaf(
            "client",
            &["spiffe://cluster.local/ns/default/sa/proxy"],
            false,
        );
        let (backend_port, _task) = tls_backend("mtls", &server, Some(&pki.ca_file())).await;
        let source = Arc::new(Source {
            items: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
        });
        let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let xds_port = socket.local_addr().expect("addr").port();
        let server_task = XdsServer::new(source.clone());
        tokio::spawn(async move {
            let _ = server_task
                .serve(socket, std::future::pending::<()>())
                .await;
        });
        let port = free_port();
        source.put(
            CLUSTER_TYPE,
            "backend",
            sds_cluster("backend", backend_port, "backend.example.com"),
        );
        source.put(
            CLUSTER_TYPE,
            "wrong-san",
            sds_cluster("wrong-san", backend_port, "other.example.com"),
        );
        source.put(LISTENER_TYPE, "out", routing_listener(port));
        let proxy = Proxy::start(&ads_bootstrap(xds_port), &[]);
        assert!(
            eventually(Duration::from_secs(10), async || proxy
                .ready()
                .await
                .is_some())
            .await
        );
        assert!(
            eventually(Duration::from_secs(10), async || {
                proxy
                    .admin_get("/stats")
                    .await
                    .text()
                    .contains("cluster_manager.warming_clusters: 2")
            })
            .await,
            "{}",
            proxy.stderr()
        );
        assert_ne!(proxy.ready().await.map(|(s, _)| s), Some(StatusCode::OK));

        source.put(
            SECRET_TYPE,
            "kubernetes://default/client",
            named_secret("kubernetes://default/client", &client.cert, &client.key),
        );
        source.put(
            SECRET_TYPE,
            "kubernetes://default/client/ca.crt",
            ca_secret("kubernetes://default/client/ca.crt", &pki.ca_file()),
        );
        proxy.wait_live().await;
        let ok = get(port, "x", "/").await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
        assert_eq!(
            ok.text(),
            "tls mtls sni=backend.example.com alpn=- client-cert=true"
        );
        // The SAN matchers of default_validation_context still apply to the SDS CA.
        let wrong = get(port, "x", "/wrong").await;
        assert_eq!(wrong.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(wrong.text().contains("SAN mismatch"), "{}", wrong.text());
    }
}
