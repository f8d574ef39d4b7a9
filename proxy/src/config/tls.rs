//! Envoy's `envoy.transport_sockets.tls` → [`DownstreamTls`] (a filter chain's
//! `DownstreamTlsContext`) and [`UpstreamTls`] (a cluster's `UpstreamTlsContext`).
//!
//! Certificates, keys and CAs are read here (`filename`, `inline_string`, `inline_bytes`), once,
//! when the configuration is accepted, and the rustls configuration is built here too
//! ([`crate::tls`]), so a bad PEM, a key that does not match its certificate or an unknown
//! protocol version is an error naming its field, and the resource is rejected (NACKed) like
//! Envoy does. Fields outside the subset are rejected by the supported-subset table.
//!
//! Secrets may come by SDS over ADS (`tls_certificate_sds_secret_configs`,
//! `validation_context_sds_secret_config`, `combined_validation_context`): such a context
//! registers with [`crate::tls::sds`], which builds its rustls configuration once its
//! secrets arrive and again whenever they change (new handshakes use the new one). This
//! module must not do I/O other than reading the files the configuration names.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as pb;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::errors::{Errors, Path};
use super::route::{StringMatcher, string_matcher};

/// The transport socket name of TLS.
pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";

/// A TLS protocol version rustls implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// One `tls_certificates` entry: the chain (leaf first) and its private key.
#[derive(Debug, Clone)]
pub struct TlsCertificate {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
}

/// `SubjectAltNameMatcher.san_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanType {
    Dns,
    Uri,
    /// Exact matches only (the certificate's IP SANs are compared as addresses).
    IpAddress,
}

#[derive(Debug, Clone)]
pub struct SanMatcher {
    pub san_type: SanType,
    pub matcher: StringMatcher,
}

/// `CertificateValidationContext`: the peer's chain must lead to `trusted_ca`, and when
/// matchers are given one of them must match one of the peer's SANs.
#[derive(Debug, Clone)]
pub struct Validation {
    pub trusted_ca: Vec<CertificateDer<'static>>,
    pub san_matchers: Vec<SanMatcher>,
}

/// A secret by SDS over ADS (`SdsSecretConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsRef {
    /// Any name: `kubernetes://<namespace>/<name>` from Capstan's control plane, anything else.
    pub name: String,
    /// `sds_config.initial_fetch_timeout`; `None` waits forever.
    pub initial_fetch_timeout: Option<std::time::Duration>,
}

/// `CommonTlsContext`, both sides.
#[derive(Debug, Clone)]
pub struct CommonTls {
    pub certificates: Vec<TlsCertificate>,
    /// `validation_context`, or `combined_validation_context.default_validation_context`
    /// (whose `trusted_ca` the SDS secret provides).
    pub validation: Option<Validation>,
    /// `tls_certificate_sds_secret_configs[0]`.
    pub certificate_sds: Option<SdsRef>,
    /// `validation_context_sds_secret_config` (possibly in `combined_validation_context`).
    pub validation_sds: Option<SdsRef>,
    /// `alpn_protocols`, in preference order.
    pub alpn: Vec<String>,
    pub min_version: TlsVersion,
    pub max_version: TlsVersion,
}

impl CommonTls {
    /// The SDS secrets this context needs.
    pub fn sds_refs(&self) -> impl Iterator<Item = &SdsRef> {
        self.certificate_sds
            .iter()
            .chain(self.validation_sds.iter())
    }
}

/// A filter chain's `DownstreamTlsContext`, with the rustls server configuration built from it
/// (`None` until its SDS secrets arrived; swapped when they change).
#[derive(Debug)]
pub struct DownstreamTls {
    pub common: CommonTls,
    pub require_client_certificate: bool,
    pub server_config: arc_swap::ArcSwapOption<rustls::ServerConfig>,
}

/// A cluster's `UpstreamTlsContext`, with the rustls client configuration built from it
/// (`None` until its SDS secrets arrived; swapped when they change).
#[derive(Debug)]
pub struct UpstreamTls {
    pub common: CommonTls,
    /// `sni`: empty sends no SNI, as in Envoy.
    pub sni: String,
    pub client_config: arc_swap::ArcSwapOption<rustls::ClientConfig>,
    /// `cluster.<name>.ssl.*`.
    pub stats: Arc<crate::tls::SslStats>,
}

/// A filter chain's `transport_socket`: `None` for plaintext (`raw_buffer` or unset).
pub fn downstream_transport_socket(
    ts: &core::TransportSocket,
    path: &Path,
    errors: &mut Errors,
) -> Option<Arc<DownstreamTls>> {
    let any = transport_socket_any(ts, path, errors)?;
    let tpath = path.field("typed_config");
    if any.type_url != pb::DownstreamTlsContext::type_url() {
        errors.push(
            &tpath,
            format!(
                "unsupported type {} for a filter chain (expected {})",
                any.type_url,
                pb::DownstreamTlsContext::type_url()
            ),
        );
        return None;
    }
    let ctx = decode::<pb::DownstreamTlsContext>(any, &tpath, errors)?;
    downstream(&ctx, &tpath, errors)
}

/// A cluster's `transport_socket`: `None` for plaintext (`raw_buffer` or unset).
/// `default_alpn` is offered when the context sets no `alpn_protocols` (`auto_config`'s
/// `h2,http/1.1`).
pub fn upstream_transport_socket(
    ts: &core::TransportSocket,
    default_alpn: &[&str],
    path: &Path,
    errors: &mut Errors,
) -> Option<Arc<UpstreamTls>> {
    let any = transport_socket_any(ts, path, errors)?;
    let tpath = path.field("typed_config");
    if any.type_url != pb::UpstreamTlsContext::type_url() {
        errors.push(
            &tpath,
            format!(
                "unsupported type {} for a cluster (expected {})",
                any.type_url,
                pb::UpstreamTlsContext::type_url()
            ),
        );
        return None;
    }
    let mut ctx = decode::<pb::UpstreamTlsContext>(any, &tpath, errors)?;
    if !default_alpn.is_empty() {
        let common = ctx.common_tls_context.get_or_insert_default();
        if common.alpn_protocols.is_empty() {
            common.alpn_protocols = default_alpn.iter().map(|p| p.to_string()).collect();
        }
    }
    upstream(&ctx, &tpath, errors)
}

/// The TLS context of a transport socket; `None` (no error) for `raw_buffer`.
fn transport_socket_any<'a>(
    ts: &'a core::TransportSocket,
    path: &Path,
    errors: &mut Errors,
) -> Option<&'a Any> {
    use core::transport_socket::ConfigType;
    let any = ts
        .config_type
        .as_ref()
        .map(|ConfigType::TypedConfig(any)| any);
    let raw = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
    match any {
        Some(a) if a.type_url == raw => None,
        None if ts.name == "envoy.transport_sockets.raw_buffer" => None,
        Some(a) => Some(a),
        None => {
            errors.push(
                &path.field("typed_config"),
                format!("required (name {:?})", ts.name),
            );
            None
        }
    }
}

fn decode<M: Message + Default>(any: &Any, path: &Path, errors: &mut Errors) -> Option<M> {
    match M::decode(any.value.as_slice()) {
        Ok(m) => Some(m),
        Err(e) => {
            errors.push(path, format!("cannot decode {}: {e}", any.type_url));
            None
        }
    }
}

pub fn downstream(
    ctx: &pb::DownstreamTlsContext,
    path: &Path,
    errors: &mut Errors,
) -> Option<Arc<DownstreamTls>> {
    let before = errors.len();
    let cpath = path.field("common_tls_context");
    let default = pb::CommonTlsContext::default();
    let common = common(
        ctx.common_tls_context.as_ref().unwrap_or(&default),
        TlsVersion::V1_3,
        &cpath,
        errors,
    );
    let require_client_certificate = ctx.require_client_certificate.is_some_and(|b| b.value);
    if let Some(common) = &common {
        if common.certificates.is_empty() && common.certificate_sds.is_none() {
            errors.push(
                &cpath.field("tls_certificates"),
                "a server needs a certificate: one tls_certificates entry (or tls_certificate_sds_secret_configs) is required",
            );
        }
        if require_client_certificate
            && common.validation.is_none()
            && common.validation_sds.is_none()
        {
            errors.push(
                &path.field("require_client_certificate"),
                "needs common_tls_context.validation_context (trusted_ca) to verify client certificates",
            );
        }
    }
    if errors.len() > before {
        return None;
    }
    let common = common?;
    let tls = Arc::new(DownstreamTls {
        common,
        require_client_certificate,
        server_config: arc_swap::ArcSwapOption::empty(),
    });
    if tls.common.sds_refs().next().is_some() {
        crate::tls::sds::store().register(Arc::downgrade(&tls) as _);
        return Some(tls);
    }
    match crate::tls::server_config(&tls.common, require_client_certificate) {
        Ok(server_config) => {
            tls.server_config.store(Some(Arc::new(server_config)));
            Some(tls)
        }
        Err(e) => {
            errors.push(&cpath, e);
            None
        }
    }
}

pub fn upstream(
    ctx: &pb::UpstreamTlsContext,
    path: &Path,
    errors: &mut Errors,
) -> Option<Arc<UpstreamTls>> {
    let before = errors.len();
    let cpath = path.field("common_tls_context");
    let default = pb::CommonTlsContext::default();
    let common = common(
        ctx.common_tls_context.as_ref().unwrap_or(&default),
        TlsVersion::V1_2,
        &cpath,
        errors,
    );
    if !ctx.sni.is_empty() && rustls::pki_types::ServerName::try_from(ctx.sni.as_str()).is_err() {
        errors.push(
            &path.field("sni"),
            format!("{:?} is not a valid server name", ctx.sni),
        );
    }
    if let Some(common) = &common
        && common.certificates.len() > 1
    {
        errors.push(
            &cpath.field("tls_certificates"),
            "multiple TLS certificates are not supported for client contexts",
        );
    }
    if errors.len() > before {
        return None;
    }
    let common = common?;
    let tls = Arc::new(UpstreamTls {
        common,
        sni: ctx.sni.clone(),
        client_config: arc_swap::ArcSwapOption::empty(),
        stats: Arc::default(),
    });
    if tls.common.sds_refs().next().is_some() {
        crate::tls::sds::store().register(Arc::downgrade(&tls) as _);
        return Some(tls);
    }
    match crate::tls::client_config(&tls.common) {
        Ok(client_config) => {
            tls.client_config.store(Some(Arc::new(client_config)));
            Some(tls)
        }
        Err(e) => {
            errors.push(&cpath, e);
            None
        }
    }
}

fn common(
    c: &pb::CommonTlsContext,
    default_max: TlsVersion,
    path: &Path,
    errors: &mut Errors,
) -> Option<CommonTls> {
    use pb::common_tls_context::ValidationContextType as V;
    let before = errors.len();
    let (min_version, max_version) = match &c.tls_params {
        Some(p) => {
            let ppath = path.field("tls_params");
            let min = version(
                p.tls_minimum_protocol_version,
                TlsVersion::V1_2,
                &ppath.field("tls_minimum_protocol_version"),
                errors,
            );
            let max = version(
                p.tls_maximum_protocol_version,
                default_max,
                &ppath.field("tls_maximum_protocol_version"),
                errors,
            );
            if let (Some(min), Some(max)) = (min, max)
                && min > max
            {
                errors.push(
                    &ppath,
                    "tls_minimum_protocol_version is above tls_maximum_protocol_version",
                );
            }
            (min.unwrap_or(TlsVersion::V1_2), max.unwrap_or(default_max))
        }
        None => (TlsVersion::V1_2, default_max),
    };
    let tpath = path.field("tls_certificates");
    if c.tls_certificates.len() > 1 {
        errors.push(
            &tpath,
            "only one certificate is supported (one key type per context)",
        );
    }
    let certificates: Vec<TlsCertificate> = c
        .tls_certificates
        .iter()
        .enumerate()
        .filter_map(|(i, t)| tls_certificate(t, &tpath.index(i), errors))
        .collect();
    let (validation, validation_sds) = match &c.validation_context_type {
        Some(V::ValidationContext(v)) => (
            validation(v, true, &path.field("validation_context"), errors),
            None,
        ),
        Some(V::ValidationContextSdsSecretConfig(s)) => (
            None,
            sds_ref(
                s,
                &path.field("validation_context_sds_secret_config"),
                errors,
            ),
        ),
        Some(V::CombinedValidationContext(cv)) => {
            let cpath = path.field("combined_validation_context");
            let default = cv.default_validation_context.as_ref().and_then(|v| {
                validation(v, false, &cpath.field("default_validation_context"), errors)
            });
            let sds = match &cv.validation_context_sds_secret_config {
                Some(s) => sds_ref(
                    s,
                    &cpath.field("validation_context_sds_secret_config"),
                    errors,
                ),
                None => {
                    errors.push(
                        &cpath.field("validation_context_sds_secret_config"),
                        "required",
                    );
                    None
                }
            };
            (default, sds)
        }
        // Other kinds are rejected by the supported-subset check.
        Some(_) | None => (None, None),
    };
    let spath = path.field("tls_certificate_sds_secret_configs");
    if c.tls_certificate_sds_secret_configs.len() > 1
        || (!c.tls_certificate_sds_secret_configs.is_empty() && !c.tls_certificates.is_empty())
    {
        errors.push(
            &spath,
            "only one certificate is supported (one tls_certificates entry or one SDS secret)",
        );
    }
    let certificate_sds = c
        .tls_certificate_sds_secret_configs
        .first()
        .and_then(|s| sds_ref(s, &spath.index(0), errors));
    for (i, p) in c.alpn_protocols.iter().enumerate() {
        if p.is_empty() || p.len() > 255 {
            errors.push(
                &path.field("alpn_protocols").index(i),
                "must be 1 to 255 bytes long",
            );
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(CommonTls {
        certificates,
        validation,
        certificate_sds,
        validation_sds,
        alpn: c.alpn_protocols.clone(),
        min_version,
        max_version,
    })
}

fn version(v: i32, default: TlsVersion, path: &Path, errors: &mut Errors) -> Option<TlsVersion> {
    use pb::tls_parameters::TlsProtocol as P;
    match P::try_from(v) {
        Ok(P::TlsAuto) => Some(default),
        Ok(P::TlSv12) => Some(TlsVersion::V1_2),
        Ok(P::TlSv13) => Some(TlsVersion::V1_3),
        Ok(other) => {
            errors.unsupported_value(
                path,
                other.as_str_name(),
                &["TLS_AUTO", "TLSv1_2", "TLSv1_3"],
            );
            None
        }
        Err(_) => {
            errors.push(path, format!("unknown value {v}"));
            None
        }
    }
}

fn tls_certificate(
    t: &pb::TlsCertificate,
    path: &Path,
    errors: &mut Errors,
) -> Option<TlsCertificate> {
    let cpath = path.field("certificate_chain");
    let kpath = path.field("private_key");
    let chain_pem = match &t.certificate_chain {
        Some(d) => data_source(d, &cpath, errors),
        None => {
            errors.push(&cpath, "required");
            None
        }
    };
    let key_pem = match &t.private_key {
        Some(d) => data_source(d, &kpath, errors),
        None => {
            errors.push(&kpath, "required");
            None
        }
    };
    let chain = certificates(&chain_pem?, &cpath, errors)?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem?) {
        Ok(k) => k,
        Err(e) => {
            errors.push(&kpath, format!("no valid PEM private key: {e}"));
            return None;
        }
    };
    Some(TlsCertificate {
        chain,
        key: Arc::new(key),
    })
}

/// Every PEM certificate of `pem`; at least one.
fn certificates(
    pem: &[u8],
    path: &Path,
    errors: &mut Errors,
) -> Option<Vec<CertificateDer<'static>>> {
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(pem) {
        match c {
            Ok(c) => out.push(c),
            Err(e) => {
                errors.push(path, format!("invalid PEM certificate: {e}"));
                return None;
            }
        }
    }
    if out.is_empty() {
        errors.push(path, "no PEM certificate found");
        return None;
    }
    Some(out)
}

fn sds_ref(s: &pb::SdsSecretConfig, path: &Path, errors: &mut Errors) -> Option<SdsRef> {
    if s.name.is_empty() {
        errors.push(&path.field("name"), "required");
        return None;
    }
    let initial_fetch_timeout = match &s.sds_config {
        Some(cs) => {
            super::config_source(cs, &path.field("sds_config"), errors).initial_fetch_timeout
        }
        None => {
            errors.push(
                &path.field("sds_config"),
                "required (secrets from static_resources.secrets are not supported; use sds_config: { ads: {} })",
            );
            return None;
        }
    };
    Some(SdsRef {
        name: s.name.clone(),
        initial_fetch_timeout,
    })
}

/// An SDS `Secret` → [`Secret`](crate::tls::sds::Secret); a certificate is checked against its
/// key so a bad one is NACKed naming the field.
pub fn secret(s: &pb::Secret, path: &Path, errors: &mut Errors) -> Option<crate::tls::sds::Secret> {
    use pb::secret::Type;
    match &s.r#type {
        Some(Type::TlsCertificate(t)) => {
            let tpath = path.field("tls_certificate");
            let cert = tls_certificate(t, &tpath, errors)?;
            if let Err(e) = crate::tls::check_certificate(&cert) {
                errors.push(&tpath, e);
                return None;
            }
            Some(crate::tls::sds::Secret::Certificate(cert))
        }
        Some(Type::ValidationContext(v)) => {
            validation(v, true, &path.field("validation_context"), errors)
                .map(crate::tls::sds::Secret::Validation)
        }
        Some(_) => {
            errors.push(
                path,
                "unsupported secret type (supported: tls_certificate, validation_context)",
            );
            None
        }
        None => {
            errors.push(
                path,
                "one of tls_certificate, validation_context is required",
            );
            None
        }
    }
}

/// Envoy's redaction of a secret for `/config_dump`: the private key becomes
/// `inline_string: "[redacted]"`.
pub fn redact(s: &mut pb::Secret) {
    if let Some(pb::secret::Type::TlsCertificate(t)) = &mut s.r#type
        && t.private_key.is_some()
    {
        t.private_key = Some(core::DataSource {
            specifier: Some(core::data_source::Specifier::InlineString(
                "[redacted]".to_string(),
            )),
            ..Default::default()
        });
    }
}

fn validation(
    v: &pb::CertificateValidationContext,
    require_ca: bool,
    path: &Path,
    errors: &mut Errors,
) -> Option<Validation> {
    use pb::subject_alt_name_matcher::SanType as S;
    let before = errors.len();
    let capath = path.field("trusted_ca");
    let trusted_ca = match &v.trusted_ca {
        Some(d) => data_source(d, &capath, errors)
            .and_then(|pem| certificates(&pem, &capath, errors))
            .unwrap_or_default(),
        None if require_ca => {
            errors.push(
                &capath,
                "required (verification without a trusted CA is not supported)",
            );
            Vec::new()
        }
        None => Vec::new(),
    };
    let mut san_matchers = Vec::new();
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        let mpath = path.field("match_typed_subject_alt_names").index(i);
        let san_type = match S::try_from(m.san_type) {
            Ok(S::Dns) => SanType::Dns,
            Ok(S::Uri) => SanType::Uri,
            Ok(S::IpAddress) => SanType::IpAddress,
            Ok(other) => {
                errors.unsupported_value(
                    &mpath.field("san_type"),
                    other.as_str_name(),
                    &["DNS", "URI", "IP_ADDRESS"],
                );
                continue;
            }
            Err(_) => {
                errors.push(
                    &mpath.field("san_type"),
                    format!("unknown value {}", m.san_type),
                );
                continue;
            }
        };
        let spath = mpath.field("matcher");
        let Some(sm) = &m.matcher else {
            errors.push(&spath, "required");
            continue;
        };
        let Some(matcher) = string_matcher(sm, &spath, errors) else {
            continue;
        };
        if san_type == SanType::IpAddress
            && !matches!(&matcher.pattern, super::route::StringPattern::Exact(ip) if ip.parse::<std::net::IpAddr>().is_ok())
        {
            errors.push(&spath, "IP_ADDRESS SANs support only an exact IP address");
            continue;
        }
        san_matchers.push(SanMatcher { san_type, matcher });
    }
    if errors.len() > before {
        return None;
    }
    Some(Validation {
        trusted_ca,
        san_matchers,
    })
}

/// The bytes of an Envoy `DataSource` (files are read now).
fn data_source(d: &core::DataSource, path: &Path, errors: &mut Errors) -> Option<Vec<u8>> {
    use core::data_source::Specifier as S;
    match &d.specifier {
        Some(S::Filename(f)) => match std::fs::read(f) {
            Ok(b) => Some(b),
            Err(e) => {
                errors.push(&path.field("filename"), format!("cannot read {f}: {e}"));
                None
            }
        },
        Some(S::InlineBytes(b)) => Some(b.clone()),
        Some(S::InlineString(s)) => Some(s.clone().into_bytes()),
        Some(S::EnvironmentVariable(_)) => {
            errors.push(
                &path.field("environment_variable"),
                "unsupported (use filename, inline_string or inline_bytes)",
            );
            None
        }
        None => {
            errors.push(
                path,
                "one of filename, inline_bytes, inline_string is required",
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_and_leaf(sans: &[&str]) -> (String, String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        (ca_pem, leaf.pem(), key.serialize_pem())
    }

    fn upstream_yaml(yaml: &str) -> Result<Arc<UpstreamTls>, Vec<String>> {
        let ctx: pb::UpstreamTlsContext = capstan_proto::from_yaml(yaml).expect("yaml");
        let mut errors = Errors::new();
        let path = Path::new("tls");
        super::super::supported::check(&ctx, &path, &mut errors);
        let tls = upstream(&ctx, &path, &mut errors);
        if errors.is_empty() {
            Ok(tls.expect("context"))
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    fn downstream_yaml(yaml: &str) -> Result<Arc<DownstreamTls>, Vec<String>> {
        let ctx: pb::DownstreamTlsContext = capstan_proto::from_yaml(yaml).expect("yaml");
        let mut errors = Errors::new();
        let path = Path::new("tls");
        super::super::supported::check(&ctx, &path, &mut errors);
        let tls = downstream(&ctx, &path, &mut errors);
        if errors.is_empty() {
            Ok(tls.expect("context"))
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    #[test]
    fn inline_material_builds_both_sides() {
        let (ca, cert, key) = ca_and_leaf(&["a.example.com"]);
        let up = upstream_yaml(&format!(
            "sni: a.example.com\ncommon_tls_context:\n  alpn_protocols: [h2]\n  validation_context:\n    trusted_ca: {{ inline_string: {ca:?} }}\n    match_typed_subject_alt_names: [{{ san_type: DNS, matcher: {{ exact: a.example.com }} }}]\n"
        ))
        .expect("valid");
        assert_eq!(up.sni, "a.example.com");
        assert_eq!(
            up.common.max_version,
            TlsVersion::V1_2,
            "Envoy's client default"
        );
        let config = up.client_config.load_full().expect("built");
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        let down = downstream_yaml(&format!(
            "common_tls_context:\n  tls_params: {{ tls_minimum_protocol_version: TLSv1_3 }}\n  tls_certificates:\n  - certificate_chain: {{ inline_bytes: {:?} }}\n    private_key: {{ inline_string: {key:?} }}\n",
            // inline_bytes is base64 in YAML/JSON.
            base64(cert.as_bytes())
        ))
        .expect("valid");
        assert_eq!(down.common.min_version, TlsVersion::V1_3);
        assert_eq!(
            down.common.max_version,
            TlsVersion::V1_3,
            "Envoy's server default"
        );
        assert!(down.server_config.load().is_some());
    }

    fn base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn unsupported_values_are_rejected_by_name() {
        let errs = upstream_yaml(
            "common_tls_context:\n  tls_params: { tls_minimum_protocol_version: TLSv1_0, cipher_suites: [x] }\n  validation_context:\n    trusted_ca: { environment_variable: CA }\n    match_typed_subject_alt_names:\n    - { san_type: EMAIL, matcher: { exact: a@b } }\n    - { san_type: IP_ADDRESS, matcher: { prefix: '10.' } }\n    match_subject_alt_names: [{ exact: x }]\n",
        )
        .expect_err("invalid");
        for expected in [
            "tls.common_tls_context.tls_params.cipher_suites: unsupported field",
            "tls.common_tls_context.validation_context.match_subject_alt_names: unsupported field (use match_typed_subject_alt_names)",
            "tls.common_tls_context.tls_params.tls_minimum_protocol_version: unsupported value TLSv1_0 (supported: TLS_AUTO, TLSv1_2, TLSv1_3)",
            "tls.common_tls_context.validation_context.trusted_ca.environment_variable: unsupported (use filename, inline_string or inline_bytes)",
            "tls.common_tls_context.validation_context.match_typed_subject_alt_names[0].san_type: unsupported value EMAIL (supported: DNS, URI, IP_ADDRESS)",
            "tls.common_tls_context.validation_context.match_typed_subject_alt_names[1].matcher: IP_ADDRESS SANs support only an exact IP address",
        ] {
            assert!(
                errs.iter().any(|e| e == expected),
                "missing {expected:?} in {errs:#?}"
            );
        }
        let errs = downstream_yaml("require_client_certificate: true\n").expect_err("invalid");
        assert_eq!(
            errs,
            vec![
                "tls.common_tls_context.tls_certificates: a server needs a certificate: one tls_certificates entry (or tls_certificate_sds_secret_configs) is required",
                "tls.require_client_certificate: needs common_tls_context.validation_context (trusted_ca) to verify client certificates",
            ]
        );
    }

    #[test]
    fn sds_references_and_combined_validation_are_translated() {
        let up = upstream_yaml(
            "common_tls_context:\n  tls_certificate_sds_secret_configs: [{ name: 'kubernetes://ns/client', sds_config: { ads: {}, initial_fetch_timeout: 2s } }]\n  combined_validation_context:\n    default_validation_context:\n      match_typed_subject_alt_names: [{ san_type: URI, matcher: { exact: 'spiffe://a' } }]\n    validation_context_sds_secret_config: { name: 'kubernetes://ns/client/ca.crt', sds_config: { ads: {} } }\n",
        )
        .expect("valid");
        let names: Vec<&str> = up.common.sds_refs().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["kubernetes://ns/client", "kubernetes://ns/client/ca.crt"]
        );
        assert_eq!(
            up.common
                .certificate_sds
                .as_ref()
                .map(|r| r.initial_fetch_timeout),
            Some(Some(std::time::Duration::from_secs(2)))
        );
        assert_eq!(
            up.common.validation.as_ref().map(|v| v.san_matchers.len()),
            Some(1)
        );
        // Not built until the secrets arrive.
        assert!(up.client_config.load().is_none());
    }

    #[test]
    fn secrets_are_checked_before_they_are_used() {
        let (ca, cert, key) = ca_and_leaf(&["a.example.com"]);
        let (_, _, other_key) = ca_and_leaf(&["a.example.com"]);
        let secret_yaml = |yaml: &str| {
            let s: pb::Secret = capstan_proto::from_yaml(yaml).expect("yaml");
            let mut errors = Errors::new();
            let out = secret(&s, &Path::new("secret"), &mut errors);
            (
                out,
                errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            )
        };
        let (ok, errs) = secret_yaml(&format!(
            "name: x\nvalidation_context: {{ trusted_ca: {{ inline_string: {ca:?} }} }}\n"
        ));
        assert!(
            matches!(ok, Some(crate::tls::sds::Secret::Validation(_))),
            "{errs:?}"
        );
        let (ok, errs) = secret_yaml(&format!(
            "name: x\ntls_certificate: {{ certificate_chain: {{ inline_string: {cert:?} }}, private_key: {{ inline_string: {key:?} }} }}\n"
        ));
        assert!(
            matches!(ok, Some(crate::tls::sds::Secret::Certificate(_))),
            "{errs:?}"
        );
        let (bad, errs) = secret_yaml(&format!(
            "name: x\ntls_certificate: {{ certificate_chain: {{ inline_string: {cert:?} }}, private_key: {{ inline_string: {other_key:?} }} }}\n"
        ));
        assert!(bad.is_none());
        assert!(
            errs.len() == 1
                && errs[0].starts_with("secret.tls_certificate: certificate and private key:"),
            "{errs:?}"
        );
        let (bad, errs) = secret_yaml(
            "name: x\ntls_certificate: { certificate_chain: { inline_string: nope }, private_key: { inline_string: nope } }\n",
        );
        assert!(bad.is_none());
        assert!(
            errs.iter()
                .any(|e| e == "secret.tls_certificate.certificate_chain: no PEM certificate found"),
            "{errs:?}"
        );
    }
}
