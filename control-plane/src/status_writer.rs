//! Writes the statuses translation computes back to the ServiceRoute and ServicePolicy objects.
//!
//! Statuses are an output of translation ([`crate::translate::Translation::statuses`]); this
//! module only compares and writes. It runs on every replica but writes only while this
//! replica leads ([`crate::leader`]), and only what changed: the desired status is compared
//! with the one the object already carries (from the watch), ignoring `lastTransitionTime`,
//! which is kept from the current condition while that condition's status stays the same.
//! Writes are server-side apply patches of the `status` subresource with field manager
//! `capstan-control-plane`, so they never touch `spec` and never conflict with `kubectl`.
//!
//! Objects are translated node-independently (no namespace, no app ports): conditions
//! describe the object, not one proxy's view of it.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use tokio::sync::watch;

use crate::api::{Condition, ObjectStatus};
use crate::store::{ObjectKey, Store, StoreSnapshot};
use crate::translate::{self, NodeInfo, ObjectKind};

/// How soon a failed status write is tried again.
const RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "capstan-control-plane";

fn api_resource(kind: ObjectKind) -> ApiResource {
    let plural = match kind {
        ObjectKind::ServiceRoute => "serviceroutes",
        ObjectKind::ServicePolicy => "servicepolicies",
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(crate::api::GROUP, crate::api::VERSION, kind.as_str()),
        plural,
    )
}

fn current_status(
    snapshot: &StoreSnapshot,
    kind: ObjectKind,
    key: &ObjectKey,
) -> Option<ObjectStatus> {
    match kind {
        ObjectKind::ServiceRoute => snapshot.routes.get(key).and_then(|r| r.status.clone()),
        ObjectKind::ServicePolicy => snapshot.policies.get(key).and_then(|p| p.status.clone()),
    }
}

/// `desired` with each condition's `lastTransitionTime` carried over from `current` when its
/// status did not change, and set to `now` otherwise.
pub fn with_transition_times(
    mut desired: ObjectStatus,
    current: Option<&ObjectStatus>,
    now: &str,
) -> ObjectStatus {
    for c in &mut desired.conditions {
        let previous = current.and_then(|s| s.conditions.iter().find(|p| p.type_ == c.type_));
        c.last_transition_time = match previous {
            Some(p) if p.status == c.status && p.last_transition_time.is_some() => {
                p.last_transition_time.clone()
            }
            _ => Some(now.to_string()),
        };
    }
    desired
}

/// Whether two statuses say the same (transition times aside).
pub fn same(a: &ObjectStatus, b: &ObjectStatus) -> bool {
    let strip = |s: &ObjectStatus| -> Vec<Condition> {
        s.conditions
            .iter()
            .cloned()
            .map(|mut c| {
                c.last_transition_time = None;
                c
            })
            .collect()
    };
    a.observed_generation == b.observed_generation && strip(a) == strip(b)
}

/// The writes one snapshot needs: (kind, key, status to write).
pub fn pending(
    snapshot: &StoreSnapshot,
    written: &BTreeMap<(ObjectKind, ObjectKey), ObjectStatus>,
    now: &str,
) -> Vec<(ObjectKind, ObjectKey, ObjectStatus)> {
    let translation = translate::translate(snapshot, &NodeInfo::default());
    let mut out = Vec::new();
    for ((kind, key), desired) in translation.statuses {
        let current = current_status(snapshot, kind, &key);
        if current.as_ref().is_some_and(|c| same(c, &desired)) {
            continue;
        }
        // Written already, the watch has not shown it yet.
        if written
            .get(&(kind, key.clone()))
            .is_some_and(|w| same(w, &desired))
        {
            continue;
        }
        let status = with_transition_times(desired, current.as_ref(), now);
        out.push((kind, key, status));
    }
    out
}

/// Writes statuses while `leading` is true, until `shutdown`.
pub async fn run(
    client: kube::Client,
    store: Store,
    mut leading: watch::Receiver<bool>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut snapshots = store.subscribe();
    let mut written: BTreeMap<(ObjectKind, ObjectKey), ObjectStatus> = BTreeMap::new();
    tokio::pin!(shutdown);
    loop {
        let snapshot: Arc<StoreSnapshot> = snapshots.borrow_and_update().clone();
        let mut failed = false;
        if *leading.borrow_and_update() && snapshot.synced {
            let now = Timestamp::now().to_string();
            for (kind, key, status) in pending(&snapshot, &written, &now) {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), &key.namespace, &api_resource(kind));
                let patch = serde_json::json!({
                    "apiVersion": format!("{}/{}", crate::api::GROUP, crate::api::VERSION),
                    "kind": kind.as_str(),
                    "metadata": { "name": key.name },
                    "status": status,
                });
                let params = PatchParams::apply(FIELD_MANAGER).force();
                match api
                    .patch_status(&key.name, &params, &Patch::Apply(&patch))
                    .await
                {
                    Ok(_) => {
                        tracing::debug!(object = %format!("{kind} {key}"), "status written");
                        written.insert((kind, key), status);
                    }
                    // Deleted meanwhile: nothing to write.
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => {
                        failed = true;
                        tracing::warn!(object = %format!("{kind} {key}"), "cannot write status: {e}")
                    }
                }
            }
        } else if !*leading.borrow() {
            // A new leader may have written since; start from what the objects say.
            written.clear();
        }
        tokio::select! {
            _ = &mut shutdown => return,
            changed = snapshots.changed() => if changed.is_err() { return },
            changed = leading.changed() => if changed.is_err() { return },
            // A failed write is retried even when nothing changes.
            _ = tokio::time::sleep(RETRY), if failed => {}
        }
    }
}
