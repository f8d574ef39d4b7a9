//! Which configuration each connected proxy has accepted, for the status writer.
//!
//! Every response a stream sends is built from one store generation ([`Resources::generation`]);
//! when the proxy ACKs it, this registry records that generation for the stream's node and
//! type, and when it NACKs, the generation and the proxy's message. Entries live as long as the
//! stream: only connected proxies count. Mapping generations to objects is the status writer's
//! job; this module knows nothing of CRDs.
//!
//! [`Resources::generation`]: super::Resources::generation

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::watch;

/// What one proxy has accepted and rejected, per type URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyState {
    pub node_id: String,
    /// Type URL → the newest store generation the proxy ACKed.
    pub acked: BTreeMap<String, u64>,
    /// Type URL → (store generation, the proxy's error) of a NACK not yet superseded by an ACK
    /// of the same or a newer generation.
    pub nacked: BTreeMap<String, (u64, String)>,
}

impl ProxyState {
    /// Whether the proxy runs a configuration built from `generation` or later (every type it
    /// has ACKed at all is at least that new).
    pub fn has_acked(&self, generation: u64) -> bool {
        !self.acked.is_empty() && self.acked.values().all(|g| *g >= generation)
    }
}

/// Connected proxies' ACK/NACK state. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct AckRegistry {
    streams: Mutex<BTreeMap<u64, ProxyState>>,
    changes: watch::Sender<u64>,
}

impl Default for AckRegistry {
    fn default() -> Self {
        Self {
            streams: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
        }
    }
}

impl AckRegistry {
    fn edit(&self, stream: u64, node_id: &str, f: impl FnOnce(&mut ProxyState)) {
        {
            let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            let state = streams.entry(stream).or_insert_with(|| ProxyState {
                node_id: node_id.to_string(),
                ..Default::default()
            });
            f(state);
        }
        self.changes.send_modify(|n| *n += 1);
    }

    pub(crate) fn ack(&self, stream: u64, node_id: &str, type_url: &str, generation: u64) {
        self.edit(stream, node_id, |s| {
            let acked = s.acked.entry(type_url.to_string()).or_insert(generation);
            *acked = (*acked).max(generation);
            if s.nacked
                .get(type_url)
                .is_some_and(|(g, _)| *g <= generation)
            {
                s.nacked.remove(type_url);
            }
        });
    }

    pub(crate) fn nack(
        &self,
        stream: u64,
        node_id: &str,
        type_url: &str,
        generation: u64,
        message: &str,
    ) {
        self.edit(stream, node_id, |s| {
            s.nacked
                .insert(type_url.to_string(), (generation, message.to_string()));
        });
    }

    pub(crate) fn remove(&self, stream: u64) {
        let removed = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&stream)
            .is_some();
        if removed {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// One entry per connected node (a node with several streams — standalone CDS, LDS, … —
    /// merged), in node-id order.
    pub fn proxies(&self) -> Vec<ProxyState> {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let mut by_node: BTreeMap<String, ProxyState> = BTreeMap::new();
        for s in streams.values() {
            let merged = by_node
                .entry(s.node_id.clone())
                .or_insert_with(|| ProxyState {
                    node_id: s.node_id.clone(),
                    ..Default::default()
                });
            merged
                .acked
                .extend(s.acked.iter().map(|(k, v)| (k.clone(), *v)));
            merged
                .nacked
                .extend(s.nacked.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        by_node.into_values().collect()
    }

    /// Changes whenever a proxy ACKs, NACKs or disconnects.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_supersede_nacks_and_streams_merge_per_node() {
        let r = AckRegistry::default();
        r.ack(1, "a", "cds", 3);
        r.ack(1, "a", "rds", 4);
        r.nack(1, "a", "rds", 5, "bad route");
        r.ack(2, "a", "lds", 5);
        r.ack(3, "b", "cds", 5);
        let p = r.proxies();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].node_id, "a");
        assert!(p[0].has_acked(3) && !p[0].has_acked(4));
        assert_eq!(p[0].nacked["rds"], (5, "bad route".to_string()));
        r.ack(1, "a", "rds", 6);
        assert!(r.proxies()[0].nacked.is_empty());
        r.remove(3);
        assert_eq!(r.proxies().len(), 1);
        assert!(!ProxyState::default().has_acked(0), "nothing ACKed yet");
    }
}
