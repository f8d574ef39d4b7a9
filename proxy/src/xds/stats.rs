//! The xDS client's counters, with Envoy's names: `control_plane.connected_state` and, per
//! subscribed type, `<prefix>.update_attempt`, `update_success`, `update_rejected`,
//! `update_failure`, `update_empty` and `init_fetch_timeout` (prefix from
//! [`stat_prefix`](super::stat_prefix), e.g. `cluster_manager.cds`).
//!
//! Meanings as in Envoy: an attempt is the subscription's start, every response and every
//! connection or stream failure; success / rejected count accepted / NACKed responses; failure
//! counts connection and stream failures; empty counts accepted SotW responses without
//! resources. Owns the atomics only; must not render or register them (the admin does).

use std::sync::atomic::{AtomicU64, Ordering};

/// The gauge that is 1 while an ADS stream is established and 0 otherwise.
pub const CONNECTED_STATE: &str = "control_plane.connected_state";

#[derive(Debug)]
pub(crate) struct TypeStats {
    prefix: String,
    pub(crate) update_attempt: AtomicU64,
    pub(crate) update_success: AtomicU64,
    pub(crate) update_rejected: AtomicU64,
    pub(crate) update_failure: AtomicU64,
    pub(crate) update_empty: AtomicU64,
    pub(crate) init_fetch_timeout: AtomicU64,
}

pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl TypeStats {
    pub(crate) fn new(prefix: String) -> Self {
        Self {
            prefix,
            update_attempt: AtomicU64::new(0),
            update_success: AtomicU64::new(0),
            update_rejected: AtomicU64::new(0),
            update_failure: AtomicU64::new(0),
            update_empty: AtomicU64::new(0),
            init_fetch_timeout: AtomicU64::new(0),
        }
    }

    pub(crate) fn collect(&self, out: &mut Vec<(String, u64)>) {
        let counters = [
            ("init_fetch_timeout", &self.init_fetch_timeout),
            ("update_attempt", &self.update_attempt),
            ("update_empty", &self.update_empty),
            ("update_failure", &self.update_failure),
            ("update_rejected", &self.update_rejected),
            ("update_success", &self.update_success),
        ];
        for (name, counter) in counters {
            out.push((
                format!("{}.{name}", self.prefix),
                counter.load(Ordering::Relaxed),
            ));
        }
    }
}
