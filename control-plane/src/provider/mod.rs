//! Providers read objects from the outside world and write them into the [`Store`].
//!
//! [`file`] reads a directory of YAML; [`kube`] watches a Kubernetes API server. Both decode
//! through [`parse`], so an object is accepted or rejected the same way. Providers never see
//! xDS.
//!
//! Secrets: a provider reads every Secret it can see but publishes only the TLS keys of those
//! some ServicePolicy references ([`retain_referenced_secrets`]); problems with other Secrets
//! are not reported, and no Secret content is ever logged.
//!
//! [`Store`]: crate::store::Store

pub mod file;
pub mod kube;
pub mod parse;

use std::collections::BTreeSet;

use crate::store::{ObjectKey, StoreSnapshot};
use parse::Object;

/// Empties the snapshot's objects (both providers replace them whole).
pub(crate) fn clear_objects(snapshot: &mut StoreSnapshot) {
    snapshot.routes.clear();
    snapshot.policies.clear();
    snapshot.services.clear();
    snapshot.endpoint_slices.clear();
    snapshot.secrets.clear();
}

/// Puts one decoded object into its map of the snapshot.
pub(crate) fn insert(snapshot: &mut StoreSnapshot, key: &ObjectKey, object: &Object) {
    match object {
        Object::Route(r) => {
            snapshot.routes.insert(key.clone(), (**r).clone());
        }
        Object::Policy(p) => {
            snapshot.policies.insert(key.clone(), (**p).clone());
        }
        Object::Service(s) => {
            snapshot.services.insert(key.clone(), (**s).clone());
        }
        Object::EndpointSlice(s) => {
            snapshot.endpoint_slices.insert(key.clone(), (**s).clone());
        }
        Object::Secret(s) => {
            snapshot.secrets.insert(key.clone(), (**s).clone());
        }
    }
}

/// The Secrets the snapshot's ServicePolicies reference (`spec.tls.*Secret`, in the policy's
/// namespace).
pub fn referenced_secrets(snapshot: &StoreSnapshot) -> BTreeSet<ObjectKey> {
    let mut out = BTreeSet::new();
    for (key, policy) in &snapshot.policies {
        if let Some(tls) = &policy.spec.tls {
            for r in [&tls.ca_certificate_secret, &tls.client_certificate_secret]
                .into_iter()
                .flatten()
            {
                out.insert(ObjectKey::new(key.namespace.clone(), r.name.clone()));
            }
        }
    }
    out
}

/// Drops the Secrets no ServicePolicy references, and the diagnostics and rejections about
/// them, so nothing unreferenced is served or reported.
pub(crate) fn retain_referenced_secrets(snapshot: &mut StoreSnapshot) {
    let referenced = referenced_secrets(snapshot);
    snapshot.secrets.retain(|k, _| referenced.contains(k));
    let kind = parse::Kind::Secret.as_str();
    snapshot.diagnostics.retain(|d| {
        match d
            .object
            .as_deref()
            .and_then(|o| o.strip_prefix(kind))
            .and_then(|o| o.strip_prefix(' '))
        {
            Some(name) => referenced.iter().any(|k| k.to_string() == name),
            None => true,
        }
    });
    snapshot
        .rejected
        .retain(|(k, key), _| k != kind || referenced.contains(key));
}
