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
//!
//! Beyond Gateway API, `status.proxies` says how many connected proxies run a configuration
//! containing the object's current version (`acked` of `connected`) and which rejected one
//! (`nacked`, with the proxy's message). The writer notes the store generation in which each
//! object version first appeared; the xDS server's [`AckRegistry`] knows the generation each
//! proxy last ACKed (or NACKed) per type. Proxy changes are coalesced (`ACK_COALESCE`) so a
//! fleet-wide push costs one write per object, not one per proxy.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use tokio::sync::watch;

use crate::api::{Condition, ObjectStatus, ProxiesStatus, ProxyNack};
use crate::store::{ObjectKey, Rejected, Store, StoreSnapshot};
use crate::translate::{self, NodeInfo, ObjectKind};
use crate::xds::{AckRegistry, ProxyState};

/// How long ACK/NACK changes are gathered before the proxies' counts are written.
const ACK_COALESCE: std::time::Duration = std::time::Duration::from_secs(2);

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
    a.observed_generation == b.observed_generation && a.proxies == b.proxies && strip(a) == strip(b)
}

/// For each object, the store generation in which its current version (its
/// `metadata.generation`) first appeared: a proxy whose ACKed configuration is at least that
/// new has it.
pub type FirstSeen = BTreeMap<(ObjectKind, ObjectKey), (Option<i64>, u64)>;

fn object_generation(snapshot: &StoreSnapshot, kind: ObjectKind, key: &ObjectKey) -> Option<i64> {
    match kind {
        ObjectKind::ServiceRoute => snapshot.routes.get(key).and_then(|r| r.metadata.generation),
        ObjectKind::ServicePolicy => snapshot
            .policies
            .get(key)
            .and_then(|p| p.metadata.generation),
    }
}

/// The status of an object whose latest version was rejected before translation.
pub fn rejected_status(rejected: &Rejected) -> ObjectStatus {
    let condition = |type_: &str, status: &str, message: String| Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: "Invalid".to_string(),
        message,
        observed_generation: rejected.generation,
        last_transition_time: None,
    };
    ObjectStatus {
        observed_generation: rejected.generation,
        conditions: vec![
            condition(
                "Accepted",
                "False",
                format!(
                    "{}; the last valid version is still in effect",
                    rejected.message
                ),
            ),
            condition(
                "ResolvedRefs",
                "Unknown",
                "not evaluated: this version was rejected".to_string(),
            ),
        ],
        proxies: None,
    }
}

/// Most NACKs listed per object.
const NACKS_LISTED: usize = 10;

/// How the connected proxies took the version of an object that appeared in `since`.
pub fn proxies_status(proxies: &[ProxyState], since: u64) -> ProxiesStatus {
    let mut status = ProxiesStatus {
        connected: u32::try_from(proxies.len()).unwrap_or(u32::MAX),
        ..Default::default()
    };
    for p in proxies {
        if p.has_acked(since) {
            status.acked += 1;
        }
        for (type_url, (generation, message)) in &p.nacked {
            if *generation >= since && status.nacked.len() < NACKS_LISTED {
                status.nacked.push(ProxyNack {
                    node: p.node_id.clone(),
                    type_url: type_url.clone(),
                    message: message.clone(),
                });
            }
        }
    }
    status
}

/// The writes one snapshot needs: (kind, key, status to write).
pub fn pending(
    snapshot: &StoreSnapshot,
    proxies: &[ProxyState],
    first_seen: &mut FirstSeen,
    written: &BTreeMap<(ObjectKind, ObjectKey), ObjectStatus>,
    now: &str,
) -> Vec<(ObjectKind, ObjectKey, ObjectStatus)> {
    let translation = translate::translate(snapshot, &NodeInfo::default());
    first_seen.retain(|id, _| translation.statuses.contains_key(id));
    let mut statuses = translation.statuses;
    // A rejected newer version: say so, for that generation (the last valid version is still
    // served, and `proxies` keeps describing it).
    for ((kind_name, key), rejected) in &snapshot.rejected {
        let kind = match kind_name.as_str() {
            "ServiceRoute" => ObjectKind::ServiceRoute,
            "ServicePolicy" => ObjectKind::ServicePolicy,
            _ => continue,
        };
        statuses.insert((kind, key.clone()), rejected_status(rejected));
    }
    let mut out = Vec::new();
    for ((kind, key), mut desired) in statuses {
        let generation = object_generation(snapshot, kind, &key);
        let seen = first_seen
            .entry((kind, key.clone()))
            .or_insert((generation, snapshot.generation));
        if seen.0 != generation {
            *seen = (generation, snapshot.generation);
        }
        // An object never valid is in no proxy's configuration.
        desired.proxies = generation
            .is_some()
            .then(|| proxies_status(proxies, seen.1));
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
    acks: Arc<AckRegistry>,
    mut leading: watch::Receiver<bool>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut snapshots = store.subscribe();
    let mut ack_changes = acks.subscribe();
    let mut written: BTreeMap<(ObjectKind, ObjectKey), ObjectStatus> = BTreeMap::new();
    let mut first_seen = FirstSeen::new();
    tokio::pin!(shutdown);
    loop {
        let snapshot: Arc<StoreSnapshot> = snapshots.borrow_and_update().clone();
        let mut failed = false;
        if *leading.borrow_and_update() && snapshot.synced {
            let now = Timestamp::now().to_string();
            ack_changes.borrow_and_update();
            let proxies = acks.proxies();
            for (kind, key, status) in pending(&snapshot, &proxies, &mut first_seen, &written, &now)
            {
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
            changed = ack_changes.changed() => {
                if changed.is_err() { return }
                // Proxies ACK in bursts (a rollout, a push to every proxy): one pass per
                // interval, not one write per ACK.
                tokio::time::sleep(ACK_COALESCE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(node: &str, acked: &[(&str, u64)], nacked: &[(&str, u64, &str)]) -> ProxyState {
        ProxyState {
            node_id: node.into(),
            acked: acked.iter().map(|(t, g)| (t.to_string(), *g)).collect(),
            nacked: nacked
                .iter()
                .map(|(t, g, m)| (t.to_string(), (*g, m.to_string())))
                .collect(),
        }
    }

    #[test]
    fn counts_proxies_that_run_the_version_and_lists_rejections() {
        let proxies = [
            proxy("a.shop", &[("cds", 7), ("rds", 7)], &[]),
            proxy(
                "b.shop",
                &[("cds", 7), ("rds", 5)],
                &[("rds", 7, "routes[0]: bad regex")],
            ),
            proxy("c.shop", &[], &[]),
        ];
        let s = proxies_status(&proxies, 6);
        assert_eq!((s.connected, s.acked), (3, 1));
        assert_eq!(
            s.nacked,
            vec![ProxyNack {
                node: "b.shop".into(),
                type_url: "rds".into(),
                message: "routes[0]: bad regex".into(),
            }]
        );
        // An older version: both ACKed proxies have it; the NACK was of something newer... and
        // still counts as a rejection of a configuration containing it.
        let s = proxies_status(&proxies, 5);
        assert_eq!(s.acked, 2);
        // A version newer than anything sent: nobody has it, nobody rejected it.
        let s = proxies_status(&proxies, 8);
        assert_eq!((s.acked, s.nacked.len()), (0, 0));
    }

    #[test]
    fn transition_times_survive_unchanged_conditions() {
        let cond = |status: &str, at: Option<&str>| Condition {
            type_: "Accepted".into(),
            status: status.into(),
            reason: "Accepted".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: at.map(str::to_string),
        };
        let current = ObjectStatus {
            observed_generation: Some(1),
            conditions: vec![cond("True", Some("2026-01-01T00:00:00Z"))],
            proxies: None,
        };
        let kept = with_transition_times(
            ObjectStatus {
                conditions: vec![cond("True", None)],
                ..current.clone()
            },
            Some(&current),
            "now",
        );
        assert_eq!(
            kept.conditions[0].last_transition_time.as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        let flipped = with_transition_times(
            ObjectStatus {
                conditions: vec![cond("False", None)],
                ..current.clone()
            },
            Some(&current),
            "now",
        );
        assert_eq!(
            flipped.conditions[0].last_transition_time.as_deref(),
            Some("now")
        );
        assert!(same(&kept, &current));
        assert!(!same(&flipped, &current));
    }
}
