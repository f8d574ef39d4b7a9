//! Providers read objects from the outside world and write them into the [`Store`].
//!
//! [`file`] reads a directory of YAML; [`kube`] watches a Kubernetes API server. Both decode
//! through [`parse`], so an object is accepted or rejected the same way. Providers never see
//! xDS.
//!
//! [`Store`]: crate::store::Store

pub mod file;
pub mod kube;
pub mod parse;

use crate::store::{ObjectKey, StoreSnapshot};
use parse::Object;

/// Empties the snapshot's objects (both providers replace them whole).
pub(crate) fn clear_objects(snapshot: &mut StoreSnapshot) {
    snapshot.routes.clear();
    snapshot.policies.clear();
    snapshot.services.clear();
    snapshot.endpoint_slices.clear();
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
    }
}
