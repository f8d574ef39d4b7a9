//! Envoy's init manager: init targets registered by components, and a watcher that fires once
//! every target is ready.
//!
//! A component (a DNS cluster, an EDS subscription, a warming listener) registers a *target*
//! with a start function. Nothing runs until [`Manager::initialize`]; then every target is
//! started with a [`TargetHandle`] and the manager is `Initializing`. A target added while the
//! manager is initializing is started at once (Envoy's rule). When the last handle reports
//! [`TargetHandle::ready`] the manager is `Initialized` and its [`Watcher`] completes.
//!
//! The server runs one manager per step of `DESIGN.md`'s sequence (cluster manager primary
//! phase, secondary phase, health-check round, listeners), in order — see `server`.
//!
//! Waits that end "on the first response, on failure, or on `initial_fetch_timeout`" are
//! expressed with [`initial_fetch`]; the manager itself has no timers. It must not know what
//! its targets are.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::watch;

/// Envoy's `Init::Manager::State`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Targets may be added; none has been started.
    Uninitialized,
    /// Targets have been started; some are not ready.
    Initializing,
    /// Every target is ready.
    Initialized,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Uninitialized => "Uninitialized",
            State::Initializing => "Initializing",
            State::Initialized => "Initialized",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("init manager {manager}: cannot add target {target} after initialization completed")]
    AlreadyInitialized { manager: String, target: String },
}

type StartFn = Box<dyn FnOnce(TargetHandle) + Send>;

/// An init manager. Cloning shares it.
#[derive(Clone)]
pub struct Manager {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    inner: Mutex<Inner>,
    state_tx: watch::Sender<State>,
}

struct Inner {
    state: State,
    /// Targets not yet started (only while `Uninitialized`).
    waiting: Vec<(u64, String, StartFn)>,
    /// Targets started (or waiting to be) and not yet ready, by id.
    unready: BTreeMap<u64, String>,
    next_id: u64,
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .field("unready_targets", &self.unready_targets())
            .finish()
    }
}

impl Manager {
    pub fn new(name: impl Into<String>) -> Self {
        let (state_tx, _) = watch::channel(State::Uninitialized);
        Self {
            shared: Arc::new(Shared {
                name: name.into(),
                inner: Mutex::new(Inner {
                    state: State::Uninitialized,
                    waiting: Vec::new(),
                    unready: BTreeMap::new(),
                    next_id: 0,
                }),
                state_tx,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn state(&self) -> State {
        self.shared.lock().state
    }

    /// Names of the targets that are not ready yet (Envoy's `/init_dump`).
    pub fn unready_targets(&self) -> Vec<String> {
        self.shared.lock().unready.values().cloned().collect()
    }

    /// Registers a target. `start` is called with the target's handle when the manager
    /// initializes (at once if it is already initializing); it must not block — spawn the
    /// work and call [`TargetHandle::ready`] when done.
    pub fn add_target(
        &self,
        name: impl Into<String>,
        start: impl FnOnce(TargetHandle) + Send + 'static,
    ) -> Result<(), Error> {
        let name = name.into();
        let mut inner = self.shared.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        match inner.state {
            State::Uninitialized => {
                inner.unready.insert(id, name.clone());
                inner.waiting.push((id, name, Box::new(start)));
                Ok(())
            }
            State::Initializing => {
                inner.unready.insert(id, name.clone());
                drop(inner);
                start(self.handle(id, name));
                Ok(())
            }
            State::Initialized => Err(Error::AlreadyInitialized {
                manager: self.shared.name.clone(),
                target: name,
            }),
        }
    }

    /// Starts every registered target and returns the watcher. With no targets the manager is
    /// initialized at once. Calling it again only returns another watcher.
    pub fn initialize(&self) -> Watcher {
        let rx = self.shared.state_tx.subscribe();
        let mut inner = self.shared.lock();
        if inner.state == State::Uninitialized {
            let waiting = std::mem::take(&mut inner.waiting);
            if inner.unready.is_empty() {
                inner.state = State::Initialized;
                drop(inner);
                tracing::debug!(manager = %self.shared.name, "init manager initialized (no targets)");
                self.shared.state_tx.send_replace(State::Initialized);
            } else {
                inner.state = State::Initializing;
                drop(inner);
                tracing::debug!(manager = %self.shared.name, targets = waiting.len(), "init manager initializing");
                self.shared.state_tx.send_replace(State::Initializing);
                for (id, name, start) in waiting {
                    start(self.handle(id, name));
                }
            }
        }
        Watcher { rx }
    }

    fn handle(&self, id: u64, name: String) -> TargetHandle {
        TargetHandle {
            id,
            name,
            manager: Arc::downgrade(&self.shared),
            done: false,
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The lock is never held across an await or a callback; a panic while holding it
        // leaves the maps consistent, so poisoning carries no information.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn target_ready(&self, id: u64) {
        let mut inner = self.lock();
        let Some(name) = inner.unready.remove(&id) else {
            return;
        };
        tracing::debug!(manager = %self.name, target = %name, "init target ready");
        if inner.state == State::Initializing && inner.unready.is_empty() {
            inner.state = State::Initialized;
            drop(inner);
            tracing::debug!(manager = %self.name, "init manager initialized");
            self.state_tx.send_replace(State::Initialized);
        }
    }
}

/// Given to a target when it starts; the target reports readiness through it exactly once.
pub struct TargetHandle {
    id: u64,
    name: String,
    manager: Weak<Shared>,
    done: bool,
}

impl TargetHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The target is ready. A manager that no longer exists is ignored.
    pub fn ready(mut self) {
        self.done = true;
        if let Some(m) = self.manager.upgrade() {
            m.target_ready(self.id);
        }
    }
}

impl Drop for TargetHandle {
    fn drop(&mut self) {
        // Initialization must not complete by accident, so a lost handle keeps its target
        // unready (visible in `/init_dump`) rather than counting as ready.
        if !self.done && self.manager.strong_count() > 0 {
            tracing::warn!(target = %self.name, "init target dropped before it was ready");
        }
    }
}

impl fmt::Debug for TargetHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetHandle")
            .field("name", &self.name)
            .finish()
    }
}

/// Completes when its manager is initialized.
#[derive(Debug)]
pub struct Watcher {
    rx: watch::Receiver<State>,
}

impl Watcher {
    pub async fn wait(mut self) {
        // The sender lives as long as the manager; if it is gone nothing can complete.
        if self
            .rx
            .wait_for(|s| *s == State::Initialized)
            .await
            .is_err()
        {
            std::future::pending::<()>().await;
        }
    }
}

/// How a wait for a subscription's first response ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    Response,
    /// Stream error or a response that had to be rejected.
    Failure(String),
    /// `initial_fetch_timeout` elapsed first.
    Timeout,
}

/// Waits for a subscription's first response, its failure, or `initial_fetch_timeout`
/// (`None` waits forever), whichever comes first. Each of these ends the init wait.
pub async fn initial_fetch<F>(first: F, timeout: Option<Duration>) -> FetchOutcome
where
    F: Future<Output = Result<(), String>>,
{
    let outcome = |r: Result<(), String>| match r {
        Ok(()) => FetchOutcome::Response,
        Err(e) => FetchOutcome::Failure(e),
    };
    match timeout {
        None => outcome(first.await),
        Some(t) => match tokio::time::timeout(t, first).await {
            Ok(r) => outcome(r),
            Err(_) => FetchOutcome::Timeout,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use tokio::sync::oneshot;

    /// A target whose handle the test keeps, to make it ready when it chooses.
    fn held(m: &Manager, name: &str, slot: &Arc<StdMutex<Vec<TargetHandle>>>) {
        let slot = slot.clone();
        m.add_target(name, move |h| slot.lock().expect("lock").push(h))
            .expect("added");
    }

    fn take(slot: &Arc<StdMutex<Vec<TargetHandle>>>, name: &str) -> TargetHandle {
        let mut v = slot.lock().expect("lock");
        let i = v.iter().position(|h| h.name() == name).expect("started");
        v.remove(i)
    }

    #[tokio::test]
    async fn no_targets_initializes_at_once() {
        let m = Manager::new("empty");
        assert_eq!(m.state(), State::Uninitialized);
        m.initialize().wait().await;
        assert_eq!(m.state(), State::Initialized);
    }

    #[tokio::test]
    async fn targets_start_only_on_initialize() {
        let m = Manager::new("m");
        let started = Arc::new(StdMutex::new(Vec::new()));
        held(&m, "a", &started);
        assert!(started.lock().expect("lock").is_empty());
        let _w = m.initialize();
        assert_eq!(started.lock().expect("lock").len(), 1);
        assert_eq!(m.state(), State::Initializing);
    }

    #[tokio::test]
    async fn targets_completing_in_any_order_initialize_once_all_are_ready() {
        for order in [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]] {
            let m = Manager::new("m");
            let slot = Arc::new(StdMutex::new(Vec::new()));
            for n in ["a", "b", "c"] {
                held(&m, n, &slot);
            }
            let (tx, mut rx) = oneshot::channel();
            let w = m.initialize();
            tokio::spawn(async move {
                w.wait().await;
                let _ = tx.send(());
            });
            for (i, n) in order.iter().enumerate() {
                tokio::task::yield_now().await;
                assert!(rx.try_recv().is_err(), "initialized before {n} was ready");
                assert_eq!(m.unready_targets().len(), 3 - i);
                take(&slot, n).ready();
            }
            rx.await.expect("watcher fired");
            assert_eq!(m.state(), State::Initialized);
            assert!(m.unready_targets().is_empty());
        }
    }

    #[tokio::test]
    async fn a_target_ready_during_start_counts() {
        let m = Manager::new("m");
        m.add_target("sync", |h| h.ready()).expect("added");
        m.initialize().wait().await;
        assert_eq!(m.state(), State::Initialized);
    }

    #[tokio::test]
    async fn a_target_added_while_initializing_starts_at_once_and_is_waited_for() {
        let m = Manager::new("m");
        let slot = Arc::new(StdMutex::new(Vec::new()));
        held(&m, "first", &slot);
        let w = m.initialize();
        held(&m, "late", &slot);
        assert_eq!(slot.lock().expect("lock").len(), 2, "late target started");
        take(&slot, "first").ready();
        assert_eq!(m.state(), State::Initializing);
        assert_eq!(m.unready_targets(), vec!["late".to_string()]);
        take(&slot, "late").ready();
        w.wait().await;
    }

    #[tokio::test]
    async fn adding_after_initialized_is_an_error() {
        let m = Manager::new("m");
        m.initialize().wait().await;
        assert_eq!(
            m.add_target("x", |h| h.ready()),
            Err(Error::AlreadyInitialized {
                manager: "m".into(),
                target: "x".into()
            })
        );
    }

    #[tokio::test]
    async fn a_dropped_handle_does_not_count_as_ready() {
        let m = Manager::new("m");
        m.add_target("lost", drop).expect("added");
        let w = m.initialize();
        assert_eq!(m.state(), State::Initializing);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), w.wait())
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_with_initial_fetch_timeout_becomes_ready_when_it_elapses() {
        let m = Manager::new("secondary");
        m.add_target("eds", |h| {
            tokio::spawn(async move {
                let outcome = initial_fetch(
                    std::future::pending::<Result<(), String>>(),
                    Some(Duration::from_secs(15)),
                )
                .await;
                assert_eq!(outcome, FetchOutcome::Timeout);
                h.ready();
            });
        })
        .expect("added");
        let start = tokio::time::Instant::now();
        m.initialize().wait().await;
        assert_eq!(start.elapsed(), Duration::from_secs(15));
    }

    #[tokio::test(start_paused = true)]
    async fn initial_fetch_ends_on_response_failure_or_never() {
        let ok = initial_fetch(async { Ok(()) }, Some(Duration::from_secs(1))).await;
        assert_eq!(ok, FetchOutcome::Response);
        let failed = initial_fetch(async { Err("stream reset".to_string()) }, None).await;
        assert_eq!(failed, FetchOutcome::Failure("stream reset".into()));
        let forever = tokio::time::timeout(
            Duration::from_secs(3600),
            initial_fetch(std::future::pending(), None),
        )
        .await;
        assert!(forever.is_err(), "timeout 0 waits forever");
    }
}
