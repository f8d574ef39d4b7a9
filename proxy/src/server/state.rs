//! `server.state` and the shutdown request, shared by the server, the admin interface and
//! the readiness listener.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Instant;

use tokio::sync::watch;

/// Envoy's `server.state` (the gauge values are Envoy's `ServerInfo.State` numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    Live,
    Draining,
    PreInitializing,
    Initializing,
}

impl ServerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Live => "LIVE",
            ServerState::Draining => "DRAINING",
            ServerState::PreInitializing => "PRE_INITIALIZING",
            ServerState::Initializing => "INITIALIZING",
        }
    }

    /// The value of the `server.state` gauge.
    pub fn gauge_value(self) -> i64 {
        match self {
            ServerState::Live => 0,
            ServerState::Draining => 1,
            ServerState::PreInitializing => 2,
            ServerState::Initializing => 3,
        }
    }
}

/// How far initialization has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum InitProgress {
    /// The cluster manager is initializing (Envoy: the server's init manager has not started).
    PreInitializing = 0,
    /// Listeners are warming.
    Initializing = 1,
    /// Listeners accept connections.
    Live = 2,
}

/// Why the server is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// SIGTERM / SIGINT: drain for `--drain-time-s`, then close.
    Signal,
    /// `/quitquitquit`: close at once (in-flight requests still finish).
    QuitQuitQuit,
}

/// The server's observable status.
#[derive(Debug)]
pub struct Status {
    progress: AtomicU8,
    draining: AtomicBool,
    health_check_failed: AtomicBool,
    started: Instant,
    shutdown: watch::Sender<Option<ShutdownReason>>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            progress: AtomicU8::new(InitProgress::PreInitializing as u8),
            draining: AtomicBool::new(false),
            health_check_failed: AtomicBool::new(false),
            started: Instant::now(),
            shutdown: watch::channel(None).0,
        }
    }
}

impl Status {
    /// `DRAINING` wins (shutdown or `/healthcheck/fail`), then initialization progress.
    pub fn state(&self) -> ServerState {
        if self.draining.load(Ordering::Acquire) || self.health_check_failed.load(Ordering::Acquire)
        {
            return ServerState::Draining;
        }
        match self.progress.load(Ordering::Acquire) {
            0 => ServerState::PreInitializing,
            1 => ServerState::Initializing,
            _ => ServerState::Live,
        }
    }

    pub fn set_progress(&self, p: InitProgress) {
        self.progress.store(p as u8, Ordering::Release);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// `/healthcheck/fail` (true) and `/healthcheck/ok` (false).
    pub fn set_health_check_failed(&self, failed: bool) {
        self.health_check_failed.store(failed, Ordering::Release);
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Asks the server to stop; the first reason wins.
    pub fn request_shutdown(&self, reason: ShutdownReason) {
        self.shutdown.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// Waits for a shutdown request.
    pub async fn shutdown_requested(&self) -> ShutdownReason {
        let mut rx = self.shutdown.subscribe();
        loop {
            if let Some(r) = *rx.borrow_and_update() {
                return r;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn state_follows_progress_and_draining_wins() {
        let s = Status::default();
        assert_eq!(s.state(), ServerState::PreInitializing);
        s.set_progress(InitProgress::Initializing);
        assert_eq!(s.state(), ServerState::Initializing);
        s.set_progress(InitProgress::Live);
        assert_eq!(s.state(), ServerState::Live);
        s.set_health_check_failed(true);
        assert_eq!(s.state(), ServerState::Draining);
        s.set_health_check_failed(false);
        assert_eq!(s.state(), ServerState::Live);
        s.set_draining();
        s.set_health_check_failed(false);
        assert_eq!(s.state(), ServerState::Draining);
    }

    #[tokio::test]
    async fn the_first_shutdown_reason_wins() {
        let s = std::sync::Arc::new(Status::default());
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.shutdown_requested().await }
        });
        tokio::task::yield_now().await;
        s.request_shutdown(ShutdownReason::Signal);
        s.request_shutdown(ShutdownReason::QuitQuitQuit);
        assert_eq!(waiter.await.expect("joined"), ShutdownReason::Signal);
        assert_eq!(s.shutdown_requested().await, ShutdownReason::Signal);
    }
}
