//! The store: the latest valid version of every object the control plane reads, published as
//! immutable [`StoreSnapshot`]s on a `watch` channel.
//!
//! Providers (file, Kubernetes) write here; the translator reads snapshots. The store knows no
//! xDS and no provider details. A snapshot is replaced whole, so readers always see a
//! consistent set of objects.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::watch;

use crate::api::{ServicePolicy, ServiceRoute};

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A problem a provider found with its input (a file that does not parse, an object that fails
/// validation). Kept in the snapshot so operators can see it (`translate`, logs, status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where: `path/to/file.yaml#2` (document index) or `ServiceRoute shop/reviews`.
    pub source: String,
    /// The object, when known: `ServiceRoute shop/reviews`.
    pub object: Option<String>,
    /// What is wrong, naming the field.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.object {
            Some(o) => write!(f, "{}: {o}: {}", self.source, self.message),
            None => write!(f, "{}: {}", self.source, self.message),
        }
    }
}

/// Every object in effect, consistent at one instant.
#[derive(Clone, Debug, Default)]
pub struct StoreSnapshot {
    /// Increases with every published change.
    pub generation: u64,
    /// Whether the provider has finished its initial load (the control plane is ready).
    pub synced: bool,
    pub routes: BTreeMap<ObjectKey, ServiceRoute>,
    pub policies: BTreeMap<ObjectKey, ServicePolicy>,
    pub services: BTreeMap<ObjectKey, Service>,
    /// Keyed by the slice's own name; `kubernetes.io/service-name` links it to its Service.
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// The TLS material of the Secrets some ServicePolicy references (and only those: the
    /// providers drop every other Secret before publishing).
    pub secrets: BTreeMap<ObjectKey, TlsSecret>,
    /// The provider does not read Secrets (Kubernetes without `--watch-secrets`), so a
    /// missing one says nothing about the cluster.
    pub secrets_unwatched: bool,
    pub diagnostics: Vec<Diagnostic>,
    /// Objects whose latest version was rejected (the last valid version, if any, is what is
    /// served), by kind name (`ServiceRoute`) and key. Only providers that know generations
    /// (Kubernetes) fill it; the status writer reports them.
    pub rejected: BTreeMap<(String, ObjectKey), Rejected>,
}

/// The TLS keys of a Kubernetes Secret (`ca.crt`, `tls.crt`, `tls.key`), each checked to be
/// PEM of the right kind when it was read. Other keys of the Secret are never kept.
///
/// `Debug` shows which keys are present with their size and a SHA-256 prefix, never their
/// contents (secrets must not reach logs); the file provider compares `Debug` renderings to
/// see a change, so a rotation to a same-sized certificate must still differ.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct TlsSecret {
    /// CA certificates (PEM), for validating a peer.
    pub ca_crt: Option<Vec<u8>>,
    /// Certificate chain (PEM); always together with `tls_key`.
    pub tls_crt: Option<Vec<u8>>,
    /// Private key (PEM).
    pub tls_key: Option<Vec<u8>>,
}

impl fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use sha2::{Digest, Sha256};
        let shown = |v: &Option<Vec<u8>>| {
            v.as_ref().map(|b| {
                let digest = Sha256::digest(b);
                let prefix: String = digest.iter().take(8).map(|x| format!("{x:02x}")).collect();
                format!("<{} bytes, sha256 {prefix}…>", b.len())
            })
        };
        f.debug_struct("TlsSecret")
            .field("ca_crt", &shown(&self.ca_crt))
            .field("tls_crt", &shown(&self.tls_crt))
            .field("tls_key", &shown(&self.tls_key))
            .finish()
    }
}

/// A rejected version of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Its `metadata.generation`.
    pub generation: Option<i64>,
    /// What is wrong, naming the fields.
    pub message: String,
}

/// The label on an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl StoreSnapshot {
    /// The EndpointSlices of one Service, in name order.
    pub fn slices_for<'a>(
        &'a self,
        service: &'a ObjectKey,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.endpoint_slices
            .range(ObjectKey::new(service.namespace.clone(), String::new())..)
            .take_while(move |(k, _)| k.namespace == service.namespace)
            .filter(move |(_, s)| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .is_some_and(|n| *n == service.name)
            })
            .map(|(_, s)| s)
    }
}

/// The writable store. Cloning shares it.
#[derive(Clone)]
pub struct Store {
    tx: Arc<watch::Sender<Arc<StoreSnapshot>>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(StoreSnapshot::default()));
        Self { tx: Arc::new(tx) }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<StoreSnapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<StoreSnapshot>> {
        self.tx.subscribe()
    }

    /// Applies `edit` to a copy of the current snapshot and publishes it with the next
    /// generation.
    pub fn update(&self, edit: impl FnOnce(&mut StoreSnapshot)) {
        self.tx.send_modify(|current| {
            let mut next = StoreSnapshot::clone(current);
            edit(&mut next);
            next.generation = current.generation + 1;
            *current = Arc::new(next);
        });
    }
}
