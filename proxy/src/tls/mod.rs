//! TLS with rustls (ring provider): the server configuration of a filter chain's
//! `DownstreamTlsContext`, the client configuration of a cluster's `UpstreamTlsContext`, the
//! certificate verifiers with Envoy's semantics, the downstream stream type (plain or TLS) and
//! the `ssl.*` stats.
//!
//! Envoy semantics kept here:
//! - An upstream context without `validation_context` verifies nothing about the server's
//!   certificate (only the handshake signatures); with one, the chain must lead to
//!   `trusted_ca` and — when `match_typed_subject_alt_names` is set — one matcher must match one
//!   SAN of its type. The SNI is never checked against the certificate (Envoy does not either).
//! - Downstream: `validation_context` without `require_client_certificate` asks for a client
//!   certificate and verifies one that is presented, but accepts a client without one.
//! - Handshake failures carry BoringSSL's reason string (what Envoy puts in
//!   `transport failure reason`) followed by the cause in words: unknown CA, expired, SAN
//!   mismatch, no certificate.
//!
//! This module must not choose filter chains or hosts; it only builds TLS configurations and
//! runs handshakes.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme, SupportedProtocolVersion,
};
use tokio::net::TcpStream;

use crate::config::tls::{CommonTls, SanMatcher, SanType, TlsCertificate, TlsVersion, UpstreamTls};
use crate::stats::{Counter, Sample, Scope};

pub mod sds;
pub mod stream;

/// Checks that a certificate chain and its key belong together (an SDS secret is NACKed
/// otherwise).
pub fn check_certificate(cert: &TlsCertificate) -> Result<(), String> {
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map(drop)
        .map_err(|e| format!("certificate and private key: {e}"))
}

/// The one crypto provider (ring), shared by every configuration.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

fn versions(common: &CommonTls) -> Vec<&'static SupportedProtocolVersion> {
    let mut v = Vec::new();
    if common.min_version <= TlsVersion::V1_3 && common.max_version >= TlsVersion::V1_3 {
        v.push(&rustls::version::TLS13);
    }
    if common.min_version <= TlsVersion::V1_2 && common.max_version >= TlsVersion::V1_2 {
        v.push(&rustls::version::TLS12);
    }
    v
}

fn roots(certs: &[CertificateDer<'static>]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        roots
            .add(c.clone())
            .map_err(|e| format!("validation_context.trusted_ca: certificate {i}: {e}"))?;
    }
    Ok(roots)
}

/// The rustls server configuration of a `DownstreamTlsContext` (the certificate is required
/// by the translation).
pub fn server_config(common: &CommonTls, require_client: bool) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions(common))
        .map_err(|e| format!("tls_params: {e}"))?;
    let builder = match &common.validation {
        Some(v) => {
            let mut inner = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(&v.trusted_ca)?),
                provider(),
            );
            if !require_client {
                inner = inner.allow_unauthenticated();
            }
            let inner = inner
                .build()
                .map_err(|e| format!("validation_context: {e}"))?;
            builder.with_client_cert_verifier(Arc::new(SanClientVerifier {
                inner,
                matchers: v.san_matchers.clone(),
            }))
        }
        None => builder.with_no_client_auth(),
    };
    let Some(cert) = common.certificates.first() else {
        return Err("tls_certificates: a server needs a certificate".into());
    };
    let mut config = builder
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(|e| format!("tls_certificates[0]: {e}"))?;
    config.alpn_protocols = common.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(config)
}

/// The rustls client configuration of an `UpstreamTlsContext`.
pub fn client_config(common: &CommonTls) -> Result<ClientConfig, String> {
    let roots = match &common.validation {
        Some(v) => Some(Arc::new(roots(&v.trusted_ca)?)),
        None => None,
    };
    let verifier = UpstreamVerifier {
        roots,
        matchers: common
            .validation
            .as_ref()
            .map(|v| v.san_matchers.clone())
            .unwrap_or_default(),
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions(common))
        .map_err(|e| format!("tls_params: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match common.certificates.first() {
        Some(cert) => builder
            .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
            .map_err(|e| format!("tls_certificates[0]: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = common.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // Envoy's `max_session_keys` default: one session per context, not rustls' 256.
    config.resumption = rustls::client::Resumption::in_memory_sessions(1);
    Ok(config)
}

/// Whether one of `matchers` matches one SAN of the certificate (no matchers: any certificate).
fn sans_match(cert: &CertificateDer<'_>, matchers: &[SanMatcher]) -> bool {
    if matchers.is_empty() {
        return true;
    }
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    matchers.iter().any(|m| match m.san_type {
        SanType::Dns => {
            // An exact name also matches a wildcard SAN (`*.example.com`), as Envoy's
            // `dnsNameMatch` does.
            let exact = match &m.matcher.pattern {
                crate::config::route::StringPattern::Exact(name) => {
                    ServerName::try_from(name.as_str())
                        .is_ok_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
                }
                _ => false,
            };
            exact
                || ee
                    .valid_dns_names()
                    .any(|n| crate::http::router::string_matches(&m.matcher, n))
        }
        SanType::Uri => ee
            .valid_uri_names()
            .any(|n| crate::http::router::string_matches(&m.matcher, n)),
        SanType::IpAddress => match &m.matcher.pattern {
            crate::config::route::StringPattern::Exact(ip) => {
                ip.parse::<std::net::IpAddr>().is_ok_and(|ip| {
                    ee.verify_is_valid_for_subject_name(&ServerName::IpAddress(ip.into()))
                        .is_ok()
                })
            }
            _ => false,
        },
    })
}

/// Verifies upstream certificates as Envoy does (see the module documentation).
#[derive(Debug)]
struct UpstreamVerifier {
    /// `None`: no `validation_context`; any certificate is accepted.
    roots: Option<Arc<RootCertStore>>,
    matchers: Vec<SanMatcher>,
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                algorithms().all,
            )?;
            if !sans_match(end_entity, &self.matchers) {
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName,
                ));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// rustls' client verifier plus `match_typed_subject_alt_names`.
#[derive(Debug)]
struct SanClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    matchers: Vec<SanMatcher>,
}

impl ClientCertVerifier for SanClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if !sans_match(end_entity, &self.matchers) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Envoy's `ssl.*` stats of a listener or a cluster.
#[derive(Debug, Default)]
pub struct SslStats {
    pub handshake: Counter,
    pub connection_error: Counter,
    pub no_certificate: Counter,
    pub fail_verify_error: Counter,
    pub fail_verify_no_cert: Counter,
    pub fail_verify_san: Counter,
}

impl SslStats {
    pub fn collect(&self, scope: &Scope, out: &mut Vec<Sample>) {
        scope.counter("ssl.handshake", self.handshake.get(), out);
        scope.counter("ssl.connection_error", self.connection_error.get(), out);
        scope.counter("ssl.no_certificate", self.no_certificate.get(), out);
        scope.counter("ssl.fail_verify_error", self.fail_verify_error.get(), out);
        scope.counter(
            "ssl.fail_verify_no_cert",
            self.fail_verify_no_cert.get(),
            out,
        );
        scope.counter("ssl.fail_verify_san", self.fail_verify_san.get(), out);
    }

    /// Counts a failed handshake by its cause. As in Envoy, a certificate that fails
    /// verification counts only as `fail_verify_*`; `connection_error` is every other failure.
    fn failed(&self, cause: Option<&rustls::Error>) {
        match cause {
            Some(rustls::Error::NoCertificatesPresented) => self.fail_verify_no_cert.inc(),
            Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName)) => {
                self.fail_verify_san.inc()
            }
            Some(rustls::Error::InvalidCertificate(_)) => self.fail_verify_error.inc(),
            _ => self.connection_error.inc(),
        }
    }
}

/// The rustls error inside a handshake's I/O error, if any.
fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// A handshake failure in Envoy's words (BoringSSL's reason, as in Envoy's `transport failure
/// reason`) followed by the cause.
pub fn describe_failure(e: &io::Error) -> String {
    use rustls::AlertDescription as A;
    let Some(err) = rustls_error(e) else {
        return format!("TLS_error: {e}");
    };
    let (reason, cause) = match err {
        rustls::Error::InvalidCertificate(c) => {
            let cause = match c {
                CertificateError::UnknownIssuer => "unknown CA".to_string(),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "certificate has expired".to_string()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "certificate is not yet valid".to_string()
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "SAN mismatch: no subject alternative name matches match_typed_subject_alt_names"
                        .to_string()
                }
                CertificateError::BadSignature => "bad certificate signature".to_string(),
                other => format!("{other:?}"),
            };
            (
                "268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
                cause,
            )
        }
        rustls::Error::NoCertificatesPresented => (
            "268435654:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE",
            "no client certificate".to_string(),
        ),
        rustls::Error::AlertReceived(a) => {
            let reason = match a {
                A::UnknownCA => "268436502:SSL routines:OPENSSL_internal:TLSV1_ALERT_UNKNOWN_CA",
                A::CertificateExpired => {
                    "268436501:SSL routines:OPENSSL_internal:SSLV3_ALERT_CERTIFICATE_EXPIRED"
                }
                A::BadCertificate => {
                    "268436498:SSL routines:OPENSSL_internal:SSLV3_ALERT_BAD_CERTIFICATE"
                }
                A::CertificateRequired => {
                    "268436566:SSL routines:OPENSSL_internal:TLSV13_ALERT_CERTIFICATE_REQUIRED"
                }
                A::HandshakeFailure => {
                    "268436496:SSL routines:OPENSSL_internal:SSLV3_ALERT_HANDSHAKE_FAILURE"
                }
                A::ProtocolVersion => {
                    "268436526:SSL routines:OPENSSL_internal:TLSV1_ALERT_PROTOCOL_VERSION"
                }
                _ => "SSL routines:OPENSSL_internal:TLSV1_ALERT",
            };
            (reason, format!("the peer sent the alert {a:?}"))
        }
        other => ("SSL routines:OPENSSL_internal", other.to_string()),
    };
    format!("TLS_error:|{reason}:TLS_error_end ({cause})")
}

/// Opens TLS on an upstream connection: SNI from `sni` (none when empty), the cluster's
/// verification, stats counted in `tls.stats`. The error names the cause.
pub async fn connect(
    tls: &UpstreamTls,
    tcp: TcpStream,
    address: SocketAddr,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = if tls.sni.is_empty() {
        ServerName::IpAddress(address.ip().into())
    } else {
        ServerName::try_from(tls.sni.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
    };
    let Some(config) = tls.client_config.load_full() else {
        tls.stats.connection_error.inc();
        let secrets: Vec<&str> = tls.common.sds_refs().map(|r| r.name.as_str()).collect();
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            format!("TLS_error: no TLS context yet: SDS secrets {secrets:?} have not arrived"),
        ));
    };
    let connector = tokio_rustls::TlsConnector::from(config);
    match connector.connect(name, tcp).await {
        Ok(s) => {
            tls.stats.handshake.inc();
            Ok(s)
        }
        Err(e) => {
            tls.stats.failed(rustls_error(&e));
            let reason = describe_failure(&e);
            tracing::debug!(%address, %reason, "upstream TLS handshake failed");
            Err(io::Error::new(io::ErrorKind::ConnectionAborted, reason))
        }
    }
}

/// Terminates TLS on a downstream connection, counting `ssl.*` in `stats`.
pub async fn accept(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    stats: &SslStats,
) -> io::Result<DownstreamStream> {
    match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
        Ok(s) => {
            stats.handshake.inc();
            if s.get_ref()
                .1
                .peer_certificates()
                .is_none_or(|c| c.is_empty())
            {
                stats.no_certificate.inc();
            }
            Ok(DownstreamStream::Tls(Box::new(s)))
        }
        Err(e) => {
            stats.failed(rustls_error(&e));
            Err(io::Error::other(describe_failure(&e)))
        }
    }
}

/// A downstream connection: plaintext or TLS-terminated.
pub type DownstreamStream = stream::MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

impl DownstreamStream {
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.tcp().set_nodelay(nodelay)
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            DownstreamStream::Plain(s) => s,
            DownstreamStream::Tls(s) => s.get_ref().0,
        }
    }

    /// The ALPN protocol the handshake negotiated.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            DownstreamStream::Plain(_) => None,
            DownstreamStream::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::route::{StringMatcher, StringPattern};

    fn leaf(sans: &[rcgen::SanType]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = sans.to_vec();
        params.self_signed(&key).expect("cert").der().clone()
    }

    fn m(san_type: SanType, pattern: StringPattern) -> SanMatcher {
        SanMatcher {
            san_type,
            matcher: StringMatcher {
                pattern,
                ignore_case: false,
            },
        }
    }

    #[test]
    fn san_matchers_follow_envoy() {
        use rcgen::SanType as R;
        let cert = leaf(&[
            R::DnsName("*.example.com".try_into().expect("dns")),
            R::URI("spiffe://cluster.local/ns/a/sa/b".try_into().expect("uri")),
            R::IpAddress("10.1.2.3".parse().expect("ip")),
        ]);
        let yes = |matcher: SanMatcher| assert!(sans_match(&cert, &[matcher]));
        let no = |matcher: SanMatcher| assert!(!sans_match(&cert, &[matcher]));
        // An exact DNS matcher matches a wildcard SAN; other patterns see the SAN as written.
        yes(m(
            SanType::Dns,
            StringPattern::Exact("a.example.com".into()),
        ));
        no(m(
            SanType::Dns,
            StringPattern::Exact("a.b.example.com".into()),
        ));
        yes(m(
            SanType::Dns,
            StringPattern::Exact("*.example.com".into()),
        ));
        yes(m(
            SanType::Dns,
            StringPattern::Suffix(".example.com".into()),
        ));
        no(m(
            SanType::Dns,
            StringPattern::Exact("spiffe://cluster.local/ns/a/sa/b".into()),
        ));
        yes(m(
            SanType::Uri,
            StringPattern::Prefix("spiffe://cluster.local/".into()),
        ));
        no(m(
            SanType::Uri,
            StringPattern::Exact("spiffe://cluster.local".into()),
        ));
        yes(m(
            SanType::IpAddress,
            StringPattern::Exact("10.1.2.3".into()),
        ));
        no(m(
            SanType::IpAddress,
            StringPattern::Exact("10.1.2.4".into()),
        ));
        // No matchers: any certificate; several: any one of them.
        assert!(sans_match(&cert, &[]));
        assert!(sans_match(
            &cert,
            &[
                m(SanType::Dns, StringPattern::Exact("x.test".into())),
                m(SanType::IpAddress, StringPattern::Exact("10.1.2.3".into())),
            ]
        ));
    }

    #[test]
    fn failures_are_described_with_boringssl_reasons_and_causes() {
        let e = |err: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, err);
        let unknown = describe_failure(&e(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )));
        assert_eq!(
            unknown,
            "TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end (unknown CA)"
        );
        let alert = describe_failure(&e(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        )));
        assert!(
            alert.contains("TLSV13_ALERT_CERTIFICATE_REQUIRED"),
            "{alert}"
        );
    }
}
