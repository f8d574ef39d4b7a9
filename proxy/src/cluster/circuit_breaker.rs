//! A cluster's circuit breakers: Envoy's resource manager, one per routing priority, counting
//! connections, pending requests, requests and retries against the configured limits.
//!
//! Counts are atomics acquired through RAII [`Permit`]s, so the request path takes no lock and
//! a permit is given back however its owner ends. Acquiring checks and increments in one step
//! (Envoy checks `canCreate()` then increments; with several workers that can overshoot, here
//! it cannot). Some of Envoy's resources may be taken past their limit
//! ([`Resource::force`]): a host with no connection at all always gets one. The `*_open`
//! gauges and (with `track_remaining`) the `remaining_*` gauges are computed from the counts
//! when stats are collected. This module decides nothing about what overflow means for a
//! request: the pool and the router do.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::circuit_breaker::{CircuitBreakers, Thresholds};
use crate::stats::{Sample, Scope};

/// One counted resource and its limit.
#[derive(Debug)]
pub struct Resource {
    count: AtomicU64,
    max: u64,
}

impl Resource {
    fn new(max: u64) -> Self {
        Self {
            count: AtomicU64::new(0),
            max,
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn try_inc(&self, max: u64) -> bool {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c < max).then_some(c + 1)
            })
            .is_ok()
    }

    fn inc(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    fn dec(&self) {
        let _ = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connections,
    PendingRequests,
    Requests,
    Retries,
}

/// Envoy's `ResourceManager` of one priority.
#[derive(Debug)]
pub struct ResourceManager {
    connections: Resource,
    pending: Resource,
    requests: Resource,
    retries: Resource,
    thresholds: Thresholds,
}

impl ResourceManager {
    fn new(t: Thresholds) -> Self {
        Self {
            connections: Resource::new(t.max_connections),
            pending: Resource::new(t.max_pending_requests),
            requests: Resource::new(t.max_requests),
            retries: Resource::new(t.max_retries),
            thresholds: t,
        }
    }

    fn resource(&self, kind: Kind) -> &Resource {
        match kind {
            Kind::Connections => &self.connections,
            Kind::PendingRequests => &self.pending,
            Kind::Requests => &self.requests,
            Kind::Retries => &self.retries,
        }
    }

    /// The current limit: fixed, except retries under a retry budget, which allow
    /// `budget_percent` of the active plus pending requests, at least `min_retry_concurrency`.
    pub fn max(&self, kind: Kind) -> u64 {
        match (kind, self.thresholds.retry_budget) {
            (Kind::Retries, Some(b)) => {
                let active = self.requests.count() + self.pending.count();
                let budget = (b.budget_percent / 100.0 * active as f64) as u64;
                budget.max(b.min_retry_concurrency)
            }
            _ => self.resource(kind).max,
        }
    }

    pub fn count(&self, kind: Kind) -> u64 {
        self.resource(kind).count()
    }

    fn is_open(&self, kind: Kind) -> bool {
        self.count(kind) >= self.max(kind)
    }

    fn collect(&self, scope: &Scope, priority: &str, out: &mut Vec<Sample>) {
        let name = |s: &str| format!("circuit_breakers.{priority}.{s}");
        let open = |k| i64::from(self.is_open(k));
        scope.gauge(&name("cx_open"), open(Kind::Connections), out);
        scope.gauge(&name("cx_pool_open"), 0, out);
        scope.gauge(&name("rq_pending_open"), open(Kind::PendingRequests), out);
        scope.gauge(&name("rq_open"), open(Kind::Requests), out);
        scope.gauge(&name("rq_retry_open"), open(Kind::Retries), out);
        if self.thresholds.track_remaining {
            let remaining =
                |k| i64::try_from(self.max(k).saturating_sub(self.count(k))).unwrap_or(i64::MAX);
            scope.gauge(&name("remaining_cx"), remaining(Kind::Connections), out);
            scope.gauge(
                &name("remaining_pending"),
                remaining(Kind::PendingRequests),
                out,
            );
            scope.gauge(&name("remaining_rq"), remaining(Kind::Requests), out);
            scope.gauge(&name("remaining_retries"), remaining(Kind::Retries), out);
            scope.gauge(&name("remaining_cx_pools"), i64::from(u32::MAX), out);
        }
    }
}

/// A route's `priority`: which thresholds its requests, retries and the connections they
/// open count against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    #[default]
    Default,
    High,
}

tokio::task_local! {
    /// The priority of the request the current task serves (set by the router around
    /// forwarding: [`with_priority`]); DEFAULT outside one.
    static PRIORITY: Priority;
}

/// Runs `f` (a request's forwarding) with its route's priority, which every breaker it
/// touches — requests, pending requests, retries, the connections it opens — applies.
/// Not an `async fn`: that would keep `f` in its own state next to the scope holding it,
/// doubling the size of every in-flight request's future (each h2 stream's task).
pub fn with_priority<F: std::future::Future>(
    priority: Priority,
    f: F,
) -> impl std::future::Future<Output = F::Output> {
    PRIORITY.scope(priority, f)
}

/// The breakers of a cluster, one set per priority, as Envoy's per-priority resource
/// managers. One pool per host serves both priorities (Envoy keeps one per priority); a
/// connection counts against the priority of the request that opened it.
#[derive(Debug)]
pub struct Breakers {
    default: Arc<ResourceManager>,
    high: Arc<ResourceManager>,
}

impl Breakers {
    pub fn new(config: &CircuitBreakers) -> Self {
        Self {
            default: Arc::new(ResourceManager::new(config.default)),
            high: Arc::new(ResourceManager::new(config.high)),
        }
    }

    /// The DEFAULT priority's resource manager.
    pub fn default_priority(&self) -> &Arc<ResourceManager> {
        &self.default
    }

    /// The resource manager of the current request's priority.
    fn current(&self) -> &Arc<ResourceManager> {
        match PRIORITY.try_with(|p| *p) {
            Ok(Priority::High) => &self.high,
            _ => &self.default,
        }
    }

    /// A permit for one unit of `kind` at the current request's priority, or `None` when the
    /// breaker is open.
    pub fn try_acquire(&self, kind: Kind) -> Option<Permit> {
        let rm = self.current();
        let max = rm.max(kind);
        rm.resource(kind).try_inc(max).then(|| Permit {
            rm: rm.clone(),
            kind,
        })
    }

    /// A permit taken past the limit (Envoy does so for a host's first connection).
    pub fn force(&self, kind: Kind) -> Permit {
        let rm = self.current();
        rm.resource(kind).inc();
        Permit {
            rm: rm.clone(),
            kind,
        }
    }

    pub fn collect(&self, scope: &Scope, out: &mut Vec<Sample>) {
        self.default.collect(scope, "default", out);
        self.high.collect(scope, "high", out);
    }
}

impl Default for Breakers {
    fn default() -> Self {
        Self::new(&CircuitBreakers::default())
    }
}

/// One unit of a resource, given back when dropped.
#[derive(Debug)]
pub struct Permit {
    rm: Arc<ResourceManager>,
    kind: Kind,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.rm.resource(self.kind).dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::circuit_breaker::RetryBudget;

    #[test]
    fn permits_count_up_to_the_limit_and_give_back_on_drop() {
        let b = Breakers::new(&CircuitBreakers {
            default: Thresholds {
                max_requests: 2,
                max_pending_requests: 0,
                ..Thresholds::default()
            },
            ..CircuitBreakers::default()
        });
        assert!(b.try_acquire(Kind::PendingRequests).is_none());
        let one = b.try_acquire(Kind::Requests).expect("first");
        let two = b.try_acquire(Kind::Requests).expect("second");
        assert!(b.try_acquire(Kind::Requests).is_none());
        assert!(b.default.is_open(Kind::Requests));
        drop(one);
        assert!(!b.default.is_open(Kind::Requests));
        let forced = b.force(Kind::Requests);
        let _three = b.force(Kind::Requests);
        assert_eq!(b.default.count(Kind::Requests), 3);
        drop((two, forced));
        assert_eq!(b.default.count(Kind::Requests), 1);
    }

    #[test]
    fn a_retry_budget_follows_active_and_pending_requests() {
        let b = Breakers::new(&CircuitBreakers {
            default: Thresholds {
                max_retries: 0,
                retry_budget: Some(RetryBudget {
                    budget_percent: 50.0,
                    min_retry_concurrency: 1,
                }),
                ..Thresholds::default()
            },
            ..CircuitBreakers::default()
        });
        assert_eq!(b.default.max(Kind::Retries), 1, "min_retry_concurrency");
        let _held: Vec<Permit> = (0..6)
            .map(|_| b.try_acquire(Kind::Requests).expect("request"))
            .collect();
        assert_eq!(b.default.max(Kind::Retries), 3, "50% of 6");
        let _r: Vec<Permit> = (0..3)
            .map(|_| b.try_acquire(Kind::Retries).expect("retry"))
            .collect();
        assert!(b.try_acquire(Kind::Retries).is_none());
    }

    #[test]
    fn gauges_use_envoy_names() {
        let b = Breakers::new(&CircuitBreakers {
            default: Thresholds {
                max_connections: 1,
                track_remaining: true,
                ..Thresholds::default()
            },
            ..CircuitBreakers::default()
        });
        let _cx = b.try_acquire(Kind::Connections).expect("cx");
        let mut out = Vec::new();
        b.collect(&Scope::fixed("cluster.c"), &mut out);
        let text = crate::stats::render_text(&out);
        assert!(
            text.contains("cluster.c.circuit_breakers.default.cx_open: 1"),
            "{text}"
        );
        assert!(
            text.contains("cluster.c.circuit_breakers.default.rq_open: 0"),
            "{text}"
        );
        assert!(
            text.contains("cluster.c.circuit_breakers.default.remaining_cx: 0"),
            "{text}"
        );
        assert!(
            text.contains("cluster.c.circuit_breakers.high.rq_retry_open: 0"),
            "{text}"
        );
        assert!(!text.contains("high.remaining"), "{text}");
    }
}
