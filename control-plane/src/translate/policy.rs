//! Which `ServicePolicy` configures which Service port.
//!
//! A policy targets a Service in its own namespace, optionally one port of it. Two policies
//! with the same target conflict: the older one (creationTimestamp, then name) wins and the
//! other is `Accepted=False, Conflicted`. A port-specific policy takes precedence over a
//! Service-wide one for its port (no field-by-field merge: the more specific policy replaces
//! the other). What each accepted policy turns into is [`super::cluster`]'s business.

use std::collections::BTreeMap;

use super::service::Services;
use super::status::{ObjectKind, Statuses, reason};
use super::util::{Age, port_u16};
use crate::api::ServicePolicySpec;
use crate::store::{ObjectKey, StoreSnapshot};

/// The accepted policies, by target.
#[derive(Debug, Default)]
pub(crate) struct Policies<'a> {
    by_target: BTreeMap<(ObjectKey, Option<u16>), (ObjectKey, &'a ServicePolicySpec)>,
}

impl<'a> Policies<'a> {
    /// The policy in effect for one Service port, and its key.
    pub(crate) fn for_port(
        &self,
        svc: &ObjectKey,
        port: u16,
    ) -> Option<(&ObjectKey, &'a ServicePolicySpec)> {
        self.by_target
            .get(&(svc.clone(), Some(port)))
            .or_else(|| self.by_target.get(&(svc.clone(), None)))
            .map(|(k, p)| (k, *p))
    }

    /// Decides which policies apply, recording a status for every policy.
    pub(crate) fn resolve(
        snapshot: &'a StoreSnapshot,
        services: &Services,
        statuses: &mut Statuses,
    ) -> Policies<'a> {
        let kind = ObjectKind::ServicePolicy;
        let mut ordered: Vec<_> = snapshot
            .policies
            .iter()
            .map(|(key, p)| (Age::of(&p.metadata, key), key, p))
            .collect();
        ordered.sort_by(|a, b| a.0.cmp(&b.0));
        let mut by_target = BTreeMap::new();
        for (_, key, policy) in ordered {
            statuses.register(kind, key, policy.metadata.generation);
            let target = &policy.spec.target_ref;
            let group_ok = target
                .group
                .as_deref()
                .is_none_or(|g| g.is_empty() || g == "core");
            if !group_ok || target.kind.as_deref().is_some_and(|k| k != "Service") {
                let msg = format!(
                    "spec.targetRef: {}/{} is not a Service (only core Services can be targeted)",
                    target.group.as_deref().unwrap_or(""),
                    target.kind.as_deref().unwrap_or("Service")
                );
                statuses.not_accepted(kind, key, reason::INVALID_KIND, msg.clone());
                statuses.unresolved(kind, key, reason::INVALID_KIND, msg);
                continue;
            }
            let svc_key = ObjectKey::new(key.namespace.clone(), target.name.clone());
            let Some(svc) = services.get(&svc_key) else {
                let msg = format!("spec.targetRef: Service {svc_key} not found");
                statuses.not_accepted(kind, key, reason::TARGET_NOT_FOUND, msg.clone());
                statuses.unresolved(kind, key, reason::TARGET_NOT_FOUND, msg);
                continue;
            };
            let port = match target.port {
                None => None,
                Some(p) => match port_u16(p).filter(|p| svc.port(*p).is_some()) {
                    Some(p) => Some(p),
                    None => {
                        let msg =
                            format!("spec.targetRef.port: Service {svc_key} has no TCP port {p}");
                        statuses.not_accepted(kind, key, reason::TARGET_NOT_FOUND, msg.clone());
                        statuses.unresolved(kind, key, reason::TARGET_NOT_FOUND, msg);
                        continue;
                    }
                },
            };
            match by_target.get(&(svc_key.clone(), port)) {
                Some((winner, _)) => {
                    let what = match port {
                        Some(p) => format!("port {p} of Service {svc_key}"),
                        None => format!("Service {svc_key}"),
                    };
                    statuses.not_accepted(
                        kind,
                        key,
                        reason::CONFLICTED,
                        format!("spec.targetRef: {what} is already configured by the older ServicePolicy {winner}"),
                    );
                }
                None => {
                    by_target.insert((svc_key, port), (key.clone(), &policy.spec));
                }
            }
        }
        Policies { by_target }
    }
}
