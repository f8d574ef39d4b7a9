//! Decoding Kubernetes manifests (one YAML/JSON document at a time) into the typed objects
//! the store holds, with errors that name the field.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;

use crate::api::{self, ServicePolicy, ServiceRoute};
use crate::store::{ObjectKey, TlsSecret};

/// One decoded object.
#[derive(Clone, Debug)]
pub enum Object {
    Route(Box<ServiceRoute>),
    Policy(Box<ServicePolicy>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    /// A v1 Secret, reduced to its TLS keys.
    Secret(Box<TlsSecret>),
}

/// The kinds a document can be, as `apiVersion` + `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ServiceRoute,
    ServicePolicy,
    Service,
    EndpointSlice,
    Secret,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ServiceRoute => "ServiceRoute",
            Kind::ServicePolicy => "ServicePolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Secret => "Secret",
        }
    }
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Route(_) => Kind::ServiceRoute,
            Object::Policy(_) => Kind::ServicePolicy,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Secret(_) => Kind::Secret,
        }
    }
}

/// Why a document was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocError {
    /// `Kind namespace/name` when the document got that far.
    pub object: Option<(Kind, ObjectKey)>,
    /// Every problem found, each naming its field.
    pub messages: Vec<String>,
}

/// A document of a kind this provider does not read (a ConfigMap, a Deployment, …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub api_version: String,
    pub kind: String,
}

/// The outcome of decoding one document.
#[derive(Debug)]
pub enum Decoded {
    Object(ObjectKey, Object),
    Skipped(Skipped),
}

/// Decodes one manifest. `default_namespace` applies when `metadata.namespace` is absent.
pub fn decode(doc: serde_json::Value, default_namespace: &str) -> Result<Decoded, DocError> {
    let err = |object, m: String| DocError {
        object,
        messages: vec![m],
    };
    let serde_json::Value::Object(map) = &doc else {
        return Err(err(
            None,
            "document is not a mapping (expected a Kubernetes object)".into(),
        ));
    };
    let text = |f: &str| {
        map.get(f)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let (api_version, kind_name) = (text("apiVersion"), text("kind"));
    if api_version.is_empty() || kind_name.is_empty() {
        return Err(err(None, "apiVersion and kind are required".into()));
    }
    let kind = match (api_version.as_str(), kind_name.as_str()) {
        ("capstan.dev/v1alpha1", "ServiceRoute") => Kind::ServiceRoute,
        ("capstan.dev/v1alpha1", "ServicePolicy") => Kind::ServicePolicy,
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("v1", "Secret") => Kind::Secret,
        (v, k @ ("ServiceRoute" | "ServicePolicy")) => {
            return Err(err(
                None,
                format!(
                    "{k}: unsupported apiVersion {v:?} (expected {}/{})",
                    api::GROUP,
                    api::VERSION
                ),
            ));
        }
        _ => {
            return Ok(Decoded::Skipped(Skipped {
                api_version,
                kind: kind_name,
            }));
        }
    };
    let meta = map.get("metadata").and_then(|m| m.as_object());
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(default_namespace)
        .to_string();
    if name.is_empty() {
        return Err(err(
            None,
            format!("{}: metadata.name is required", kind.as_str()),
        ));
    }
    let key = ObjectKey::new(namespace.clone(), name);
    let object = Some((kind, key.clone()));
    if kind == Kind::Secret {
        // Decoded by hand: a serde error could quote the Secret's contents.
        return match tls_secret(map) {
            Ok(secret) => Ok(Decoded::Object(key, Object::Secret(Box::new(secret)))),
            Err(messages) => Err(DocError { object, messages }),
        };
    }
    // Our own CRDs are strict: an unknown field is almost always a typo that would silently
    // change routing. Kubernetes' built-in kinds may carry fields newer than our client knows.
    let strict = matches!(kind, Kind::ServiceRoute | Kind::ServicePolicy);
    let mut decoded = match kind {
        Kind::ServiceRoute => {
            typed::<ServiceRoute>(doc, strict).map(|o| Object::Route(Box::new(o)))
        }
        Kind::ServicePolicy => {
            typed::<ServicePolicy>(doc, strict).map(|o| Object::Policy(Box::new(o)))
        }
        Kind::Service => typed::<Service>(doc, strict).map(|o| Object::Service(Box::new(o))),
        Kind::EndpointSlice => {
            typed::<EndpointSlice>(doc, strict).map(|o| Object::EndpointSlice(Box::new(o)))
        }
        // Decoded above, before anything could quote it.
        Kind::Secret => Err(vec!["Secret: internal decoding error".to_string()]),
    }
    .map_err(|messages| DocError {
        object: object.clone(),
        messages,
    })?;
    let field_errors = match &mut decoded {
        Object::Route(r) => {
            r.metadata.namespace = Some(namespace);
            api::validate::service_route(&r.spec)
        }
        Object::Policy(p) => {
            p.metadata.namespace = Some(namespace);
            api::validate::service_policy(&p.spec)
        }
        Object::Service(s) => {
            s.metadata.namespace = Some(namespace);
            Vec::new()
        }
        Object::EndpointSlice(s) => {
            s.metadata.namespace = Some(namespace);
            Vec::new()
        }
        Object::Secret(_) => Vec::new(),
    };
    if !field_errors.is_empty() {
        return Err(DocError {
            object,
            messages: field_errors.iter().map(ToString::to_string).collect(),
        });
    }
    Ok(Decoded::Object(key, decoded))
}

/// The Secret keys the control plane reads; every other key is dropped unread.
pub const CA_CRT: &str = "ca.crt";
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";

/// Reads `ca.crt`, `tls.crt` and `tls.key` from a Secret's `data` (base64) and `stringData`
/// (which wins, as the API server merges it), checking each is PEM of the right kind.
/// Messages name the key, never the value.
fn tls_secret(map: &serde_json::Map<String, serde_json::Value>) -> Result<TlsSecret, Vec<String>> {
    use base64::Engine;
    let mut errors = Vec::new();
    let mut value = |key: &str| -> Option<Vec<u8>> {
        if let Some(v) = map.get("stringData").and_then(|d| d.get(key)) {
            return match v.as_str() {
                Some(text) => Some(text.as_bytes().to_vec()),
                None => {
                    errors.push(format!("stringData[{key}]: not a string"));
                    None
                }
            };
        }
        let v = map.get("data").and_then(|d| d.get(key))?;
        let decoded = v.as_str().and_then(|text| {
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .ok()
        });
        if decoded.is_none() {
            errors.push(format!("data[{key}]: not valid base64"));
        }
        decoded
    };
    let secret = TlsSecret {
        ca_crt: value(CA_CRT),
        tls_crt: value(TLS_CRT),
        tls_key: value(TLS_KEY),
    };
    for (key, pem) in [(CA_CRT, &secret.ca_crt), (TLS_CRT, &secret.tls_crt)] {
        if let Some(pem) = pem
            && let Err(e) = certificates_pem(pem)
        {
            errors.push(format!("{key}: {e}"));
        }
    }
    if let Some(pem) = &secret.tls_key
        && let Err(e) = private_key_pem(pem)
    {
        errors.push(format!("{TLS_KEY}: {e}"));
    }
    match (&secret.tls_crt, &secret.tls_key) {
        (Some(_), None) => errors.push(format!("{TLS_CRT} is set but {TLS_KEY} is missing")),
        (None, Some(_)) => errors.push(format!("{TLS_KEY} is set but {TLS_CRT} is missing")),
        _ => {}
    }
    if errors.is_empty() {
        Ok(secret)
    } else {
        Err(errors)
    }
}

/// Checks that `pem` holds at least one certificate and nothing that fails to parse.
pub fn certificates_pem(pem: &[u8]) -> Result<usize, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        if cert.is_err() {
            return Err("malformed PEM".into());
        }
        n += 1;
    }
    if n == 0 {
        return Err("no PEM CERTIFICATE block".into());
    }
    Ok(n)
}

/// Checks that `pem` holds a private key (PKCS#8, PKCS#1 or SEC1).
pub fn private_key_pem(pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem)
        .map(drop)
        .map_err(|_| "no PEM private key (PKCS#8, RSA or EC)".into())
}

fn typed<T: DeserializeOwned>(doc: serde_json::Value, strict: bool) -> Result<T, Vec<String>> {
    let mut unknown = Vec::new();
    let mut on_unknown = |path: serde_ignored::Path<'_>| {
        // `status` is written by the controller; a manifest copied from a cluster carries it.
        let p = bracket_indices(&path.to_string());
        if !matches!(p.as_str(), "apiVersion" | "kind")
            && !p.starts_with("status")
            && !p.starts_with("metadata")
        {
            unknown.push(p);
        }
    };
    let ignored = serde_ignored::Deserializer::new(doc, &mut on_unknown);
    let result: Result<T, _> = serde_path_to_error::deserialize(ignored);
    match result {
        Ok(v) if !strict || unknown.is_empty() => Ok(v),
        Ok(_) => Err(unknown
            .into_iter()
            .map(|p| format!("{p}: unknown field"))
            .collect()),
        Err(e) => {
            let path = e.path().to_string();
            Err(vec![format!("{path}: {}", e.into_inner())])
        }
    }
}

/// `spec.rules.0.x` → `spec.rules[0].x`, the form every other error uses.
fn bracket_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('.').enumerate() {
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(seg);
            out.push(']');
        } else {
            if i > 0 {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> serde_json::Value {
        serde_saphyr::from_str(yaml).expect("yaml")
    }

    #[test]
    fn decodes_route_with_default_namespace() {
        let d = decode(
            doc("apiVersion: capstan.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: s}]\n"),
            "default",
        )
        .expect("valid");
        let Decoded::Object(key, Object::Route(r)) = d else {
            panic!("route expected")
        };
        assert_eq!(key, ObjectKey::new("default", "r"));
        assert_eq!(r.spec.rules.len(), 1, "rules default to one catch-all rule");
    }

    #[test]
    fn bad_enum_names_the_field_path() {
        let e = decode(
            doc("apiVersion: capstan.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: s}]\n  rules:\n  - matches: [{path: {type: Bogus, value: /}}]\n"),
            "default",
        )
        .expect_err("invalid");
        assert_eq!(
            e.object,
            Some((Kind::ServiceRoute, ObjectKey::new("shop", "r")))
        );
        assert!(
            e.messages[0]
                .starts_with("spec.rules[0].matches[0].path.type: unknown variant `Bogus`"),
            "{:?}",
            e.messages
        );
    }

    #[test]
    fn unknown_field_in_crd_is_an_error() {
        let e = decode(
            doc("apiVersion: capstan.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: s}]\n  rules: [{backendRef: [{name: x}]}]\n"),
            "default",
        )
        .expect_err("invalid");
        assert_eq!(
            e.messages,
            vec!["spec.rules[0].backendRef: unknown field".to_string()]
        );
    }

    #[test]
    fn other_kinds_are_skipped() {
        let d = decode(
            doc("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n"),
            "default",
        )
        .expect("ok");
        assert!(matches!(d, Decoded::Skipped(_)));
    }

    #[test]
    fn secrets_keep_only_their_tls_keys_and_errors_never_quote_them() {
        use base64::Engine;
        let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
        let cert =
            "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUS3Ju\n-----END CERTIFICATE-----\n";
        let yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: ca, namespace: shop}}\ndata:\n  ca.crt: {}\n  password: {}\n",
            b64(cert),
            b64("hunter2")
        );
        let d = decode(doc(&yaml), "default").expect("valid");
        let Decoded::Object(key, Object::Secret(s)) = d else {
            panic!("secret expected")
        };
        assert_eq!(key, ObjectKey::new("shop", "ca"));
        assert_eq!(s.ca_crt.as_deref(), Some(cert.as_bytes()));
        assert!(s.tls_crt.is_none() && s.tls_key.is_none());
        assert!(!format!("{s:?}").contains("BEGIN"), "Debug hides contents");

        let bad = "apiVersion: v1\nkind: Secret\nmetadata: {name: c}\nstringData:\n  tls.crt: hunter2\n  tls.key: hunter2\ndata:\n  ca.crt: '%%%'\n";
        let e = decode(doc(bad), "default").expect_err("invalid");
        assert_eq!(
            e.messages,
            vec![
                "data[ca.crt]: not valid base64".to_string(),
                "tls.crt: no PEM CERTIFICATE block".to_string(),
                "tls.key: no PEM private key (PKCS#8, RSA or EC)".to_string(),
            ]
        );
        assert!(!e.messages.join(" ").contains("hunter2"));
        let half = "apiVersion: v1\nkind: Secret\nmetadata: {name: c}\nstringData: {tls.key: x}\n";
        let e = decode(doc(half), "default").expect_err("invalid");
        assert!(
            e.messages
                .contains(&"tls.key is set but tls.crt is missing".to_string()),
            "{:?}",
            e.messages
        );
    }
}
