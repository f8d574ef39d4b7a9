//! The Kubernetes provider: kube-rs watchers for ServiceRoute, ServicePolicy, Service and
//! EndpointSlice, feeding the same [`Store`] as the file provider.
//!
//! ```text
//!  watcher(kind, scope) ─┐  Init / InitApply… / InitDone (a full re-list) · Apply · Delete
//!  watcher(kind, scope) ─┼─► Sources (one cache per kind × namespace) ──► Store (whole snapshot)
//!  …                     ┘        decode + validate (provider::parse), last valid version kept
//! ```
//!
//! * Objects are watched as `DynamicObject`s and decoded by [`parse::decode`], exactly like a
//!   file's documents: one malformed object is a [`Diagnostic`] naming its field, never a
//!   watch that stops for every object of its kind (what a typed watcher would do).
//! * An invalid update keeps the object's last valid version.
//! * A re-list (watch restart, `410 Gone`, API-server outage) is buffered until it completes
//!   (`InitDone`) and then swapped in whole: proxies keep the last complete configuration
//!   while the cache re-syncs, and an object deleted during the outage disappears then.
//! * Nothing is published before every source has finished its first list (`synced`), so the
//!   xDS server never serves a partial world.
//! * `--watch-namespaces a,b` runs one watcher per kind and namespace; empty means cluster-wide.
//! * Secrets are watched only with `--watch-secrets` (it needs RBAC to list and watch them);
//!   only the TLS keys of Secrets a ServicePolicy references are published, and problems with
//!   other Secrets are logged at debug level only, never with their contents.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;

use super::parse::{self, Decoded, Kind, Object};
use crate::store::{Diagnostic, ObjectKey, Rejected, Store, StoreSnapshot};

/// Where the provider looks.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Namespaces to watch; empty: all.
    pub namespaces: Vec<String>,
    /// Also watch Secrets (for `ServicePolicy` `spec.tls.*Secret`).
    pub secrets: bool,
}

fn api_resource(kind: Kind) -> ApiResource {
    let (group, version, kind_name, plural) = match kind {
        Kind::ServiceRoute => ("capstan.dev", "v1alpha1", "ServiceRoute", "serviceroutes"),
        Kind::ServicePolicy => (
            "capstan.dev",
            "v1alpha1",
            "ServicePolicy",
            "servicepolicies",
        ),
        Kind::Service => ("", "v1", "Service", "services"),
        Kind::EndpointSlice => ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
        Kind::Secret => ("", "v1", "Secret", "secrets"),
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind_name), plural)
}

const KINDS: [Kind; 4] = [
    Kind::ServiceRoute,
    Kind::ServicePolicy,
    Kind::Service,
    Kind::EndpointSlice,
];

/// One watcher's view: a kind in a namespace (or cluster-wide).
#[derive(Default)]
struct Source {
    /// Finished at least one full list.
    synced: bool,
    objects: BTreeMap<ObjectKey, Object>,
    /// Objects whose latest version is invalid, with why (and that version's generation).
    invalid: BTreeMap<ObjectKey, Invalid>,
    /// A re-list in progress: what it has seen so far.
    relist: Option<(BTreeMap<ObjectKey, Object>, BTreeMap<ObjectKey, Invalid>)>,
}

/// A rejected object version.
#[derive(Clone, Debug)]
struct Invalid {
    diagnostic: Diagnostic,
    generation: Option<i64>,
    message: String,
}

/// What decoding one watched object gave.
enum Seen {
    Valid(ObjectKey, Object),
    Invalid(ObjectKey, Invalid),
    Unusable(String),
}

fn decode(kind: Kind, object: DynamicObject) -> Seen {
    let ar = api_resource(kind);
    let mut value = match serde_json::to_value(&object) {
        Ok(v) => v,
        Err(e) => return Seen::Unusable(format!("{}: cannot re-encode: {e}", kind.as_str())),
    };
    // List items come without apiVersion/kind.
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("apiVersion".into(), ar.api_version.clone().into());
        map.insert("kind".into(), ar.kind.clone().into());
    }
    let key = ObjectKey::new(
        object.metadata.namespace.clone().unwrap_or_default(),
        object.metadata.name.clone().unwrap_or_default(),
    );
    let generation = object.metadata.generation;
    match parse::decode(value, "") {
        Ok(Decoded::Object(key, obj)) => Seen::Valid(key, obj),
        Ok(Decoded::Skipped(s)) => Seen::Unusable(format!(
            "unexpected {} {} from the watch",
            s.api_version, s.kind
        )),
        Err(e) => {
            let object = format!("{} {key}", kind.as_str());
            let message = e.messages.join("; ");
            Seen::Invalid(
                key,
                Invalid {
                    diagnostic: Diagnostic {
                        source: "kubernetes".into(),
                        object: Some(object),
                        message: format!("{message}; keeping its last valid version"),
                    },
                    generation,
                    message,
                },
            )
        }
    }
}

impl Source {
    fn seen(&mut self, kind: Kind, object: DynamicObject) {
        match decode(kind, object) {
            Seen::Valid(key, obj) => {
                let (objects, invalid) = match &mut self.relist {
                    Some((o, i)) => (o, i),
                    None => (&mut self.objects, &mut self.invalid),
                };
                invalid.remove(&key);
                objects.insert(key, obj);
            }
            Seen::Invalid(key, diagnostic) => {
                let object = diagnostic.diagnostic.object.as_deref().unwrap_or("");
                if kind == Kind::Secret {
                    // Most Secrets are none of our business; referenced ones get a status.
                    tracing::debug!(object, "{}", diagnostic.diagnostic.message);
                } else {
                    tracing::warn!(object, "{}", diagnostic.diagnostic.message);
                }
                match &mut self.relist {
                    // During a re-list the last valid version is the one from before it.
                    Some((objects, invalid)) => {
                        if !objects.contains_key(&key)
                            && let Some(previous) = self.objects.get(&key)
                        {
                            objects.insert(key.clone(), previous.clone());
                        }
                        invalid.insert(key, diagnostic);
                    }
                    None => {
                        self.invalid.insert(key, diagnostic);
                    }
                }
            }
            Seen::Unusable(why) => tracing::warn!("{why}"),
        }
    }

    fn deleted(&mut self, object: &DynamicObject) {
        let key = ObjectKey::new(
            object.metadata.namespace.clone().unwrap_or_default(),
            object.metadata.name.clone().unwrap_or_default(),
        );
        self.objects.remove(&key);
        self.invalid.remove(&key);
    }
}

struct Shared {
    sources: Mutex<Vec<Source>>,
    changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Replaces the store's objects with every source's.
fn apply(sources: &[Source], secrets_watched: bool, snapshot: &mut StoreSnapshot) {
    super::clear_objects(snapshot);
    snapshot.secrets_unwatched = !secrets_watched;
    snapshot.diagnostics.clear();
    snapshot.rejected.clear();
    for source in sources {
        for (key, object) in &source.objects {
            super::insert(snapshot, key, object);
        }
        for (key, invalid) in &source.invalid {
            snapshot.diagnostics.push(invalid.diagnostic.clone());
            if let Some(kind) = invalid
                .diagnostic
                .object
                .as_deref()
                .and_then(|o| o.split(' ').next())
            {
                snapshot.rejected.insert(
                    (kind.to_string(), key.clone()),
                    Rejected {
                        generation: invalid.generation,
                        message: invalid.message.clone(),
                    },
                );
            }
        }
    }
    super::retain_referenced_secrets(snapshot);
    snapshot.synced = true;
}

/// Watches until `shutdown` resolves. Never returns early: API-server errors are retried with
/// backoff by each watcher, and the store keeps its last snapshot meanwhile.
pub async fn run(
    client: Client,
    options: Options,
    store: Store,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let scopes: Vec<Option<String>> = if options.namespaces.is_empty() {
        vec![None]
    } else {
        options.namespaces.iter().cloned().map(Some).collect()
    };
    let mut plan = Vec::new();
    let kinds = KINDS
        .into_iter()
        .chain(options.secrets.then_some(Kind::Secret));
    for kind in kinds {
        for scope in &scopes {
            plan.push((kind, scope.clone()));
        }
    }
    let shared = Arc::new(Shared {
        sources: Mutex::new(plan.iter().map(|_| Source::default()).collect()),
        changed: Notify::new(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (index, (kind, scope)) in plan.into_iter().enumerate() {
        tasks.spawn(watch_source(
            client.clone(),
            kind,
            scope,
            index,
            shared.clone(),
        ));
    }
    tracing::info!(namespaces = ?options.namespaces, "watching Kubernetes");

    tokio::pin!(shutdown);
    let mut announced = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = shared.changed.notified() => {}
        }
        // Coalesce a burst (a re-list, a rollout's EndpointSlice churn) into one snapshot.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let sources = lock(&shared.sources);
        if !sources.iter().all(|s| s.synced) {
            continue;
        }
        if !announced {
            announced = true;
            let objects: usize = sources.iter().map(|s| s.objects.len()).sum();
            tracing::info!(objects, "Kubernetes caches synced");
        }
        store.update(|s| apply(&sources, options.secrets, s));
    }
    tasks.abort_all();
    Ok(())
}

async fn watch_source(
    client: Client,
    kind: Kind,
    scope: Option<String>,
    index: usize,
    shared: Arc<Shared>,
) {
    let ar = api_resource(kind);
    let api: Api<DynamicObject> = match &scope {
        Some(ns) => Api::namespaced_with(client, ns, &ar),
        None => Api::all_with(client, &ar),
    };
    let where_ = scope.as_deref().unwrap_or("all namespaces");
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                // The watcher re-lists by itself (410 Gone included) after a backoff; what was
                // served stays served.
                tracing::warn!(
                    kind = kind.as_str(),
                    namespaces = where_,
                    "watch failed, retrying: {e}{}",
                    hint(kind, &e)
                );
                continue;
            }
        };
        let mut sources = lock(&shared.sources);
        let Some(source) = sources.get_mut(index) else {
            return;
        };
        let notify = match event {
            watcher::Event::Init => {
                source.relist = Some(Default::default());
                false
            }
            watcher::Event::InitApply(o) => {
                source.seen(kind, o);
                false
            }
            watcher::Event::InitDone => {
                if let Some((objects, invalid)) = source.relist.take() {
                    source.objects = objects;
                    source.invalid = invalid;
                }
                if !source.synced {
                    tracing::info!(
                        kind = kind.as_str(),
                        namespaces = where_,
                        objects = source.objects.len(),
                        "listed"
                    );
                }
                source.synced = true;
                true
            }
            watcher::Event::Apply(o) => {
                source.seen(kind, o);
                true
            }
            watcher::Event::Delete(o) => {
                source.deleted(&o);
                true
            }
        };
        drop(sources);
        if notify {
            shared.changed.notify_one();
        }
    }
}

/// What an operator should do about a list/watch error, when we can tell.
fn hint(kind: Kind, e: &watcher::Error) -> String {
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        _ => None,
    };
    let ar = api_resource(kind);
    match code {
        Some(404) if matches!(kind, Kind::ServiceRoute | Kind::ServicePolicy) => format!(
            " (the {} CRD is not installed: kubectl apply --server-side -f crds/, or install the Helm chart)",
            ar.plural
        ),
        Some(401 | 403) if kind == Kind::Secret => " (--watch-secrets needs RBAC to get, list \
             and watch secrets: set the Helm value controlPlane.watchSecrets=true, or turn \
             --watch-secrets off)"
            .to_string(),
        Some(401 | 403) => format!(
            " (the control plane's service account may not list/watch {}.{}: check its RBAC)",
            ar.plural,
            if ar.group.is_empty() {
                "core"
            } else {
                &ar.group
            }
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> watcher::Error {
        let status: kube::core::Status =
            serde_json::from_value(serde_json::json!({ "code": code, "message": "x" }))
                .expect("status");
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn errors_come_with_what_to_do() {
        let missing_crd = hint(Kind::ServiceRoute, &api_error(404));
        assert!(
            missing_crd.contains("serviceroutes CRD is not installed"),
            "{missing_crd}"
        );
        let rbac = hint(Kind::EndpointSlice, &api_error(403));
        assert!(rbac.contains("endpointslices.discovery.k8s.io"), "{rbac}");
        assert!(hint(Kind::Service, &api_error(403)).contains("services.core"));
        assert_eq!(hint(Kind::Service, &api_error(500)), "");
        assert!(hint(Kind::Secret, &api_error(403)).contains("controlPlane.watchSecrets=true"));
    }
}
