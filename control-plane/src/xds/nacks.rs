//! The log of recent NACKs, per node, for the status writer and the admin interface.
//!
//! Owns a bounded, in-memory record of what each proxy rejected (type URL, rejected version,
//! the proxy's error message, when). Must not: grow without bound (per-node and node-count
//! caps), or know anything about CRDs — mapping a NACK back to the object that caused it is the
//! status writer's job.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

/// NACKs kept per node (oldest dropped first).
pub const NACKS_PER_NODE: usize = 16;
/// Nodes kept (the node whose latest NACK is oldest is dropped first).
pub const MAX_NODES: usize = 10_000;

/// One rejected response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NackRecord {
    /// `Node.id` of the proxy that rejected the response.
    pub node_id: String,
    pub type_url: String,
    /// The version the proxy rejected (SotW `version_info` / delta `system_version_info` of the
    /// response the NACK refers to).
    pub rejected_version: String,
    /// The nonce of the rejected response.
    pub nonce: String,
    /// `error_detail.message` as sent by the proxy.
    pub message: String,
    pub at: SystemTime,
}

/// Recent NACKs per node. Cheap to share (`Arc<NackLog>` from [`XdsServer::nacks`]).
///
/// [`XdsServer::nacks`]: super::XdsServer::nacks
#[derive(Debug, Default)]
pub struct NackLog {
    by_node: Mutex<BTreeMap<String, VecDeque<NackRecord>>>,
}

impl NackLog {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn record(&self, record: NackRecord) {
        let Ok(mut by_node) = self.by_node.lock() else {
            return;
        };
        if !by_node.contains_key(&record.node_id) && by_node.len() >= MAX_NODES {
            let oldest = by_node
                .iter()
                .min_by_key(|(_, records)| records.back().map(|r| r.at))
                .map(|(node, _)| node.clone());
            if let Some(oldest) = oldest {
                by_node.remove(&oldest);
            }
        }
        let records = by_node.entry(record.node_id.clone()).or_default();
        if records.len() >= NACKS_PER_NODE {
            records.pop_front();
        }
        records.push_back(record);
    }

    /// The recent NACKs of one node, oldest first.
    pub fn for_node(&self, node_id: &str) -> Vec<NackRecord> {
        self.by_node
            .lock()
            .map(|m| {
                m.get(node_id)
                    .map(|r| r.iter().cloned().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// The most recent NACK of one node, if any.
    pub fn latest_for_node(&self, node_id: &str) -> Option<NackRecord> {
        self.by_node
            .lock()
            .ok()
            .and_then(|m| m.get(node_id).and_then(|r| r.back().cloned()))
    }

    /// Every node's recent NACKs, oldest first, by node id.
    pub fn all(&self) -> BTreeMap<String, Vec<NackRecord>> {
        self.by_node
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(node, r)| (node.clone(), r.iter().cloned().collect()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets a node's NACKs (e.g. once its pod is gone or its status was written).
    pub fn clear_node(&self, node_id: &str) {
        if let Ok(mut m) = self.by_node.lock() {
            m.remove(node_id);
        }
    }

    /// Total NACK records currently kept.
    pub fn len(&self) -> usize {
        self.by_node
            .lock()
            .map(|m| m.values().map(VecDeque::len).sum())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str, n: usize) -> NackRecord {
        NackRecord {
            node_id: node.into(),
            type_url: "t".into(),
            rejected_version: n.to_string(),
            nonce: n.to_string(),
            message: "bad".into(),
            at: SystemTime::now(),
        }
    }

    #[test]
    fn bounded_per_node() {
        let log = NackLog::new();
        for i in 0..(NACKS_PER_NODE + 3) {
            log.record(rec("a", i));
        }
        log.record(rec("b", 0));
        let a = log.for_node("a");
        assert_eq!(a.len(), NACKS_PER_NODE);
        assert_eq!(a[0].rejected_version, "3");
        assert_eq!(
            log.latest_for_node("a").map(|r| r.rejected_version),
            Some((NACKS_PER_NODE + 2).to_string())
        );
        assert_eq!(log.all().len(), 2);
        log.clear_node("a");
        assert_eq!(log.len(), 1);
    }
}
