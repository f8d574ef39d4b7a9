//! Counters of the xDS server and their Prometheus text rendering.
//!
//! Owns the numbers (connected streams, responses per type URL, ACKs, NACKs) and the metric
//! names `capstan_xds_*`. Must not: serve HTTP (the admin module exposes [`XdsStats::render_prometheus`])
//! or block a stream — everything on the hot path is a relaxed atomic.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, PUSH_ORDER, ROUTE_TYPE};

/// Counters of one [`XdsServer`](super::XdsServer); shared with its streams.
#[derive(Debug, Default)]
pub struct XdsStats {
    connected_streams: AtomicU64,
    /// Responses per known type URL, indexed like [`PUSH_ORDER`].
    responses_known: [AtomicU64; 4],
    /// Responses for type URLs outside [`PUSH_ORDER`] (rare: e.g. secrets over ADS).
    responses_other: Mutex<BTreeMap<String, u64>>,
    acks: AtomicU64,
    nacks: AtomicU64,
}

fn known_index(type_url: &str) -> Option<usize> {
    match type_url {
        CLUSTER_TYPE => Some(0),
        ENDPOINT_TYPE => Some(1),
        LISTENER_TYPE => Some(2),
        ROUTE_TYPE => Some(3),
        _ => None,
    }
}

/// Escapes a Prometheus label value (`\`, `"` and newlines).
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl XdsStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// xDS streams (SotW and delta, ADS and standalone) open right now.
    pub fn connected_streams(&self) -> u64 {
        self.connected_streams.load(Ordering::Relaxed)
    }

    /// Responses sent for `type_url` since start.
    pub fn responses_total(&self, type_url: &str) -> u64 {
        match known_index(type_url) {
            Some(i) => self.responses_known[i].load(Ordering::Relaxed),
            None => self
                .responses_other
                .lock()
                .map(|m| m.get(type_url).copied().unwrap_or(0))
                .unwrap_or(0),
        }
    }

    /// ACKs received (requests echoing the latest nonce without `error_detail`).
    pub fn acks_total(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }

    /// NACKs received (requests echoing the latest nonce with `error_detail`).
    pub fn nacks_total(&self) -> u64 {
        self.nacks.load(Ordering::Relaxed)
    }

    pub(crate) fn stream_opened(self: &std::sync::Arc<Self>) -> StreamGuard {
        self.connected_streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            stats: self.clone(),
        }
    }

    pub(crate) fn response_sent(&self, type_url: &str) {
        match known_index(type_url) {
            Some(i) => {
                self.responses_known[i].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                if let Ok(mut m) = self.responses_other.lock() {
                    *m.entry(type_url.to_string()).or_insert(0) += 1;
                }
            }
        }
    }

    pub(crate) fn ack(&self) {
        self.acks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn nack(&self) {
        self.nacks.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters in the Prometheus text exposition format (with `# HELP`/`# TYPE`).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        // `write!` into a String cannot fail; the results are ignored on purpose.
        let _ = writeln!(
            out,
            "# HELP capstan_xds_connected_streams xDS streams currently open."
        );
        let _ = writeln!(out, "# TYPE capstan_xds_connected_streams gauge");
        let _ = writeln!(
            out,
            "capstan_xds_connected_streams {}",
            self.connected_streams()
        );
        let _ = writeln!(
            out,
            "# HELP capstan_xds_responses_total xDS responses sent, by type URL."
        );
        let _ = writeln!(out, "# TYPE capstan_xds_responses_total counter");
        for (i, type_url) in PUSH_ORDER.iter().enumerate() {
            let n = self.responses_known[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "capstan_xds_responses_total{{type_url=\"{type_url}\"}} {n}"
            );
        }
        if let Ok(m) = self.responses_other.lock() {
            for (type_url, n) in m.iter() {
                let type_url = escape_label(type_url);
                let _ = writeln!(
                    out,
                    "capstan_xds_responses_total{{type_url=\"{type_url}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "# HELP capstan_xds_acks_total xDS ACKs received.");
        let _ = writeln!(out, "# TYPE capstan_xds_acks_total counter");
        let _ = writeln!(out, "capstan_xds_acks_total {}", self.acks_total());
        let _ = writeln!(out, "# HELP capstan_xds_nacks_total xDS NACKs received.");
        let _ = writeln!(out, "# TYPE capstan_xds_nacks_total counter");
        let _ = writeln!(out, "capstan_xds_nacks_total {}", self.nacks_total());
        out
    }
}

/// Decrements the connected-streams gauge when a stream ends, however it ends.
pub(crate) struct StreamGuard {
    stats: std::sync::Arc<XdsStats>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.stats.connected_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn renders_all_metrics() {
        let stats = Arc::new(XdsStats::new());
        let guard = stats.stream_opened();
        stats.response_sent(CLUSTER_TYPE);
        stats.response_sent("type.googleapis.com/x.Y");
        stats.ack();
        stats.nack();
        let text = stats.render_prometheus();
        assert!(text.contains("capstan_xds_connected_streams 1\n"));
        assert!(text.contains(&format!(
            "capstan_xds_responses_total{{type_url=\"{CLUSTER_TYPE}\"}} 1\n"
        )));
        assert!(
            text.contains("capstan_xds_responses_total{type_url=\"type.googleapis.com/x.Y\"} 1\n")
        );
        assert!(text.contains("capstan_xds_acks_total 1\n"));
        assert!(text.contains("capstan_xds_nacks_total 1\n"));
        assert!(text.contains("# TYPE capstan_xds_responses_total counter\n"));
        drop(guard);
        assert_eq!(stats.connected_streams(), 0);
    }
}
