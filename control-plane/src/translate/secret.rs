//! SDS: the Kubernetes Secrets a `ServicePolicy`'s `spec.tls` references, as Envoy
//! `envoy.extensions.transport_sockets.tls.v3.Secret` resources, and the references
//! (`SdsSecretConfig` over ADS) that clusters carry instead of file paths.
//!
//! Names follow Istio's `kubernetes://` scheme, with a distinct name per use so one Secret
//! (cert-manager writes `tls.crt`, `tls.key` and `ca.crt` into one) can be both:
//!
//! ```text
//! Secret shop/client  tls.crt + tls.key ─► kubernetes://shop/client         tls_certificate
//! Secret shop/ca      ca.crt            ─► kubernetes://shop/ca/ca.crt      validation_context
//! ```
//!
//! A reference is always emitted, even when the Secret is missing or lacks the key: the proxy
//! then waits for a resource that never comes, and the cluster's TLS fails closed (Envoy
//! warms the cluster until `initial_fetch_timeout`, then fails handshakes) — never open, as a
//! cluster without its CA would. The policy says why (`ResolvedRefs=False`). A Secret whose
//! latest version is malformed keeps its last valid version (the providers keep it), so a bad
//! rotation does not take a working cluster down; the status names the Secret and the key.
//!
//! Must not: log or render key material (rendering redacts private keys).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, SdsSecretConfig, Secret, TlsCertificate, secret,
};

use super::cluster::ads_config_source;
use super::status::reason;
use crate::store::{ObjectKey, StoreSnapshot, TlsSecret};

/// SDS name of a Secret's certificate and key (`tls.crt`, `tls.key`).
pub(crate) fn certificate_name(key: &ObjectKey) -> String {
    format!("kubernetes://{}/{}", key.namespace, key.name)
}

/// SDS name of a Secret's CA bundle (`ca.crt`).
pub(crate) fn ca_name(key: &ObjectKey) -> String {
    format!("kubernetes://{}/{}/ca.crt", key.namespace, key.name)
}

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

/// The Secrets clusters reference, collected while translating, with the problems found.
pub(crate) struct SecretRefs<'a> {
    snapshot: &'a StoreSnapshot,
    /// SDS resources to serve, by name.
    pub(crate) resources: BTreeMap<String, Secret>,
    /// `ResolvedRefs=False` problems of the cluster being translated (reason, message); the
    /// caller moves them onto the policy.
    pub(crate) unresolved: Vec<(&'static str, String)>,
}

impl<'a> SecretRefs<'a> {
    pub(crate) fn new(snapshot: &'a StoreSnapshot) -> Self {
        Self {
            snapshot,
            resources: BTreeMap::new(),
            unresolved: Vec::new(),
        }
    }

    /// Looks up `key`; records why it is unusable (missing, or its latest version rejected).
    fn lookup(
        &mut self,
        field: &str,
        reason: &'static str,
        key: &ObjectKey,
    ) -> Option<&'a TlsSecret> {
        let described = format!("Secret {key}");
        let mut invalid = false;
        for d in &self.snapshot.diagnostics {
            if d.object.as_deref() == Some(described.as_str()) {
                invalid = true;
                self.unresolved.push((
                    reason,
                    format!("spec.tls.{field}: {described} is invalid: {}", d.message),
                ));
            }
        }
        let found = self.snapshot.secrets.get(key);
        if found.is_none() && !invalid {
            let why = if self.snapshot.secrets_unwatched {
                "cannot be read: the control plane does not watch Secrets (--watch-secrets, \
                 Helm value controlPlane.watchSecrets)"
            } else {
                "not found"
            };
            self.unresolved
                .push((reason, format!("spec.tls.{field}: {described} {why}")));
        }
        found
    }

    /// The reference to `name`'s CA bundle (in `namespace`), serving it if usable.
    pub(crate) fn ca(&mut self, namespace: &str, name: &str) -> SdsSecretConfig {
        const FIELD: &str = "caCertificateSecret";
        let key = ObjectKey::new(namespace, name);
        let sds_name = ca_name(&key);
        match self
            .lookup(FIELD, reason::INVALID_CA_CERTIFICATE_REF, &key)
            .map(|s| s.ca_crt.as_deref())
        {
            Some(Some(ca)) => {
                self.resources.insert(
                    sds_name.clone(),
                    Secret {
                        name: sds_name.clone(),
                        r#type: Some(secret::Type::ValidationContext(
                            CertificateValidationContext {
                                trusted_ca: inline(ca),
                                ..Default::default()
                            },
                        )),
                    },
                );
            }
            Some(None) => self.unresolved.push((
                reason::INVALID_CA_CERTIFICATE_REF,
                format!("spec.tls.{FIELD}: Secret {key} has no ca.crt"),
            )),
            None => {}
        }
        reference(sds_name)
    }

    /// The reference to `name`'s certificate and key (in `namespace`), serving them if usable.
    pub(crate) fn certificate(&mut self, namespace: &str, name: &str) -> SdsSecretConfig {
        const FIELD: &str = "clientCertificateSecret";
        let key = ObjectKey::new(namespace, name);
        let sds_name = certificate_name(&key);
        match self
            .lookup(FIELD, reason::INVALID_CERTIFICATE_REF, &key)
            .map(|s| (s.tls_crt.as_deref(), s.tls_key.as_deref()))
        {
            Some((Some(crt), Some(key_pem))) => {
                self.resources.insert(
                    sds_name.clone(),
                    Secret {
                        name: sds_name.clone(),
                        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                            certificate_chain: inline(crt),
                            private_key: inline(key_pem),
                            ..Default::default()
                        })),
                    },
                );
            }
            Some(_) => self.unresolved.push((
                reason::INVALID_CERTIFICATE_REF,
                format!("spec.tls.{FIELD}: Secret {key} has no tls.crt and tls.key"),
            )),
            None => {}
        }
        reference(sds_name)
    }
}

/// `{name, sds_config: {ads: {}, resource_api_version: V3}}`.
fn reference(name: String) -> SdsSecretConfig {
    SdsSecretConfig {
        name,
        sds_config: Some(ads_config_source()),
    }
}

/// A copy of `s` safe to print: private keys replaced by their size.
pub(crate) fn redacted(s: &Secret) -> Secret {
    let mut s = s.clone();
    if let Some(secret::Type::TlsCertificate(c)) = &mut s.r#type
        && let Some(DataSource {
            specifier: Some(data_source::Specifier::InlineBytes(b)),
            ..
        }) = &c.private_key
    {
        c.private_key = Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString(format!(
                "[redacted: {} bytes]",
                b.len()
            ))),
            ..Default::default()
        });
    }
    s
}
