//! The drain sequence shared by every listener and connection.
//!
//! `Serving` → `Draining` (SIGTERM or `/drain_listeners`: keep accepting, but answer HTTP/1
//! with `Connection: close` and send HTTP/2 GOAWAY) → `Closing` (stop accepting; connections
//! finish their in-flight requests and close). The phase is an atomic for the request path and
//! a `watch` for tasks that wait on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    Draining,
    Closing,
}

#[derive(Debug, Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    phase: AtomicU8,
    tx: watch::Sender<Phase>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Phase::Serving);
        Self {
            inner: Arc::new(Inner {
                phase: AtomicU8::new(0),
                tx,
            }),
        }
    }

    pub fn phase(&self) -> Phase {
        match self.inner.phase.load(Ordering::Acquire) {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Closing,
        }
    }

    /// Whether connections should be told to go away.
    pub fn is_draining(&self) -> bool {
        self.phase() != Phase::Serving
    }

    /// Moves forward to `phase` (never back).
    pub fn advance(&self, phase: Phase) {
        let v = match phase {
            Phase::Serving => 0,
            Phase::Draining => 1,
            Phase::Closing => 2,
        };
        let before = self.inner.phase.fetch_max(v, Ordering::AcqRel);
        if before < v {
            self.inner.tx.send_replace(phase);
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.inner.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_only_move_forward_and_wake_waiters() {
        let d = Drain::new();
        let mut rx = d.subscribe();
        assert_eq!(d.phase(), Phase::Serving);
        d.advance(Phase::Draining);
        rx.changed().await.expect("changed");
        assert_eq!(*rx.borrow_and_update(), Phase::Draining);
        assert!(d.is_draining());
        d.advance(Phase::Serving);
        assert_eq!(d.phase(), Phase::Draining);
        d.advance(Phase::Closing);
        assert_eq!(d.phase(), Phase::Closing);
    }
}
