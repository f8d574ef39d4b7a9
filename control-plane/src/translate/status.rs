//! Statuses as an output of translation: every problem the translator finds with a
//! `ServiceRoute` or `ServicePolicy` becomes a condition on that object, never an error that
//! stops translation.
//!
//! Each object gets exactly two conditions, `Accepted` and `ResolvedRefs`. A condition is
//! `False` when at least one problem of its kind was found; its reason is the first problem's
//! and its message lists every problem (each naming the field). `False` does not mean nothing
//! was applied: the parts of the object that are fine are still served.
//!
//! Owns no translation logic and must not look at Envoy types.

use std::collections::BTreeMap;
use std::fmt;

use crate::api::{Condition, ObjectStatus};
use crate::store::ObjectKey;

/// The kinds of object the translator reports status for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    ServiceRoute,
    ServicePolicy,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::ServiceRoute => "ServiceRoute",
            ObjectKind::ServicePolicy => "ServicePolicy",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(crate) const ACCEPTED: &str = "Accepted";
pub(crate) const RESOLVED_REFS: &str = "ResolvedRefs";

/// Condition reasons, as Gateway API spells them.
pub(crate) mod reason {
    pub const ACCEPTED: &str = "Accepted";
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    pub const NO_MATCHING_PARENT: &str = "NoMatchingParent";
    pub const INVALID_KIND: &str = "InvalidKind";
    pub const HOSTNAME_CONFLICT: &str = "HostnameConflict";
    pub const UNSUPPORTED_VALUE: &str = "UnsupportedValue";
    pub const BACKEND_NOT_FOUND: &str = "BackendNotFound";
    pub const CONFLICTED: &str = "Conflicted";
    pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
    pub const INVALID: &str = "Invalid";
    /// A `caCertificateSecret` is missing, malformed or has no `ca.crt` (BackendTLSPolicy's).
    pub const INVALID_CA_CERTIFICATE_REF: &str = "InvalidCACertificateRef";
    /// A `clientCertificateSecret` is missing, malformed or has no `tls.crt`/`tls.key`.
    pub const INVALID_CERTIFICATE_REF: &str = "InvalidCertificateRef";
}

#[derive(Debug, Default)]
struct Entry {
    generation: Option<i64>,
    accepted: Vec<(&'static str, String)>,
    resolved: Vec<(&'static str, String)>,
}

/// Collects problems per object while translating.
#[derive(Debug, Default)]
pub(crate) struct Statuses {
    objects: BTreeMap<(ObjectKind, ObjectKey), Entry>,
}

impl Statuses {
    /// Every object seen gets a status, problems or not.
    pub(crate) fn register(&mut self, kind: ObjectKind, key: &ObjectKey, generation: Option<i64>) {
        self.objects
            .entry((kind, key.clone()))
            .or_default()
            .generation = generation;
    }

    /// Records an `Accepted=False` problem (deduplicated: a route attached to several ports
    /// finds the same problem once per port).
    pub(crate) fn not_accepted(
        &mut self,
        kind: ObjectKind,
        key: &ObjectKey,
        reason: &'static str,
        message: String,
    ) {
        push_unique(
            &mut self
                .objects
                .entry((kind, key.clone()))
                .or_default()
                .accepted,
            reason,
            message,
        );
    }

    /// Records a `ResolvedRefs=False` problem.
    pub(crate) fn unresolved(
        &mut self,
        kind: ObjectKind,
        key: &ObjectKey,
        reason: &'static str,
        message: String,
    ) {
        push_unique(
            &mut self
                .objects
                .entry((kind, key.clone()))
                .or_default()
                .resolved,
            reason,
            message,
        );
    }

    /// The final statuses.
    pub(crate) fn finish(self) -> BTreeMap<(ObjectKind, ObjectKey), ObjectStatus> {
        self.objects
            .into_iter()
            .map(|(id, entry)| {
                let status = ObjectStatus {
                    observed_generation: entry.generation,
                    conditions: vec![
                        condition(
                            ACCEPTED,
                            reason::ACCEPTED,
                            "accepted",
                            &entry.accepted,
                            entry.generation,
                        ),
                        condition(
                            RESOLVED_REFS,
                            reason::RESOLVED_REFS,
                            "all references resolved",
                            &entry.resolved,
                            entry.generation,
                        ),
                    ],
                    // Filled in by the status writer, which sees the proxies.
                    proxies: None,
                };
                (id, status)
            })
            .collect()
    }
}

fn push_unique(list: &mut Vec<(&'static str, String)>, reason: &'static str, message: String) {
    if !list.iter().any(|(_, m)| *m == message) {
        list.push((reason, message));
    }
}

fn condition(
    type_: &str,
    ok_reason: &str,
    ok_message: &str,
    problems: &[(&'static str, String)],
    generation: Option<i64>,
) -> Condition {
    let (status, reason, message) = match problems.first() {
        None => ("True", ok_reason.to_string(), ok_message.to_string()),
        Some((reason, _)) => (
            "False",
            (*reason).to_string(),
            problems
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason,
        message,
        observed_generation: generation,
        last_transition_time: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_problem_gives_the_reason_and_all_messages_are_listed_once() {
        let key = ObjectKey::new("shop", "r");
        let mut s = Statuses::default();
        s.register(ObjectKind::ServiceRoute, &key, Some(3));
        s.not_accepted(
            ObjectKind::ServiceRoute,
            &key,
            reason::NO_MATCHING_PARENT,
            "a".into(),
        );
        s.not_accepted(
            ObjectKind::ServiceRoute,
            &key,
            reason::HOSTNAME_CONFLICT,
            "b".into(),
        );
        s.not_accepted(
            ObjectKind::ServiceRoute,
            &key,
            reason::HOSTNAME_CONFLICT,
            "a".into(),
        );
        let out = s.finish();
        let status = &out[&(ObjectKind::ServiceRoute, key)];
        assert_eq!(status.observed_generation, Some(3));
        let accepted = &status.conditions[0];
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", "NoMatchingParent")
        );
        assert_eq!(accepted.message, "a; b");
        let resolved = &status.conditions[1];
        assert_eq!(
            (resolved.type_.as_str(), resolved.status.as_str()),
            ("ResolvedRefs", "True")
        );
    }
}
