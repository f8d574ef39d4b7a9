//! The listener manager: listeners, their warming, binding, accepting and draining.
//!
//! A listener is added *warming*: it has its own init manager (its HTTP connection manager's
//! RDS subscription will register there; an inline route configuration has nothing to wait
//! for), and the server's init manager gets one target per listener that is ready once the
//! listener is warm. Nothing binds until the server is LIVE and calls
//! [`ListenerManager::start_workers`] — before that, connections to a listener port are
//! refused. Draining follows [`drain::Drain`]: keep accepting while telling clients to go away,
//! then stop accepting and wait for connections to finish.
//!
//! The listener manager must not route requests; it hands each connection to the listener's
//! network filter (today, the HTTP connection manager).

pub mod drain;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::cluster::ClusterManager;
use crate::config::listener::{Listener as Config, NetworkFilter};
use crate::http::{HttpConnectionManager, HttpStats, HttpStatsSource};
use crate::init;
use crate::stats::{Counter, Gauge, Sample, Scope, Source, Store};
use drain::{Drain, Phase};

/// Envoy's `listener.<address or stat_prefix>.*` stats.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
}

/// One listener: its configuration, network filter and, once bound, its address.
pub struct ActiveListener {
    config: Arc<Config>,
    hcm: Arc<HttpConnectionManager>,
    stats: Arc<ListenerStats>,
    init: init::Manager,
    local_address: Mutex<Option<SocketAddr>>,
}

impl std::fmt::Debug for ActiveListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveListener")
            .field("name", &self.config.name)
            .field("address", &self.config.address)
            .finish_non_exhaustive()
    }
}

impl ActiveListener {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The bound address (the configured one until bound; the real port when it was 0).
    pub fn local_address(&self) -> SocketAddr {
        lock(&self.local_address).unwrap_or(self.config.address)
    }
}

impl Source for ActiveListener {
    fn collect(&self, out: &mut Vec<Sample>) {
        let scope = Scope::tagged(
            "listener",
            "envoy_listener_address",
            &self.config.stat_prefix,
        );
        scope.counter(
            "downstream_cx_total",
            self.stats.downstream_cx_total.get(),
            out,
        );
        scope.gauge(
            "downstream_cx_active",
            self.stats.downstream_cx_active.get(),
            out,
        );
    }
}

/// Every listener of the proxy.
pub struct ListenerManager {
    clusters: Arc<ClusterManager>,
    store: Arc<Store>,
    drain: Drain,
    warming: Mutex<Vec<Arc<ActiveListener>>>,
    active: Mutex<Vec<Arc<ActiveListener>>>,
    http_stats: Mutex<HashMap<String, Arc<HttpStatsSource>>>,
    workers_started: AtomicBool,
    listener_added: Counter,
    /// Every connection task holds a clone; when all are gone, connections have finished.
    connections: Mutex<Option<mpsc::Sender<()>>>,
    connections_done: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

impl std::fmt::Debug for ListenerManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerManager")
            .field("active", &lock(&self.active).len())
            .field("warming", &lock(&self.warming).len())
            .finish_non_exhaustive()
    }
}

impl ListenerManager {
    pub fn new(clusters: Arc<ClusterManager>, store: Arc<Store>, drain: Drain) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(1);
        let lm = Arc::new(Self {
            clusters,
            store: store.clone(),
            drain,
            warming: Mutex::new(Vec::new()),
            active: Mutex::new(Vec::new()),
            http_stats: Mutex::new(HashMap::new()),
            workers_started: AtomicBool::new(false),
            listener_added: Counter::default(),
            connections: Mutex::new(Some(tx)),
            connections_done: tokio::sync::Mutex::new(rx),
        });
        let weak: Weak<dyn Source> = Arc::downgrade(&lm) as Weak<dyn Source>;
        store.register_weak(weak);
        lm
    }

    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// Adds a listener, warming; `server_init` gets a target that is ready once it is warm.
    pub fn add_listener(
        self: &Arc<Self>,
        config: &Config,
        server_init: &init::Manager,
    ) -> Result<(), init::Error> {
        let NetworkFilter::HttpConnectionManager(hcm_config) = &config.filter_chain.filter;
        let http_stats = self.http_stats(&hcm_config.stat_prefix);
        let hcm = Arc::new(HttpConnectionManager::new(
            hcm_config.clone(),
            self.clusters.clone(),
            http_stats,
            self.drain.clone(),
        ));
        let listener = Arc::new(ActiveListener {
            init: init::Manager::new(format!("listener {}", config.name)),
            config: Arc::new(config.clone()),
            hcm,
            stats: Arc::new(ListenerStats::default()),
            local_address: Mutex::new(None),
        });
        let weak: Weak<dyn Source> = Arc::downgrade(&listener) as Weak<dyn Source>;
        self.store.register_weak(weak);
        lock(&self.warming).push(listener.clone());
        self.listener_added.inc();

        let manager = Arc::downgrade(self);
        server_init.add_target(format!("listener {}", config.name), move |ready| {
            // An inline route configuration registers nothing here, so the listener is warm
            // as soon as its own init manager runs; RDS will hold it until the routes arrive.
            let watcher = listener.init.initialize();
            tokio::spawn(async move {
                watcher.wait().await;
                if let Some(m) = manager.upgrade() {
                    m.warmed(&listener);
                }
                ready.ready();
            });
        })
    }

    fn warmed(&self, listener: &Arc<ActiveListener>) {
        lock(&self.warming).retain(|l| !Arc::ptr_eq(l, listener));
        lock(&self.active).push(listener.clone());
        tracing::info!(listener = %listener.name(), "listener warmed");
    }

    /// Connection managers with the same `stat_prefix` share their stats, as in Envoy.
    fn http_stats(&self, prefix: &str) -> Arc<HttpStats> {
        let mut map = lock(&self.http_stats);
        if let Some(s) = map.get(prefix) {
            return s.stats.clone();
        }
        let source = Arc::new(HttpStatsSource {
            stat_prefix: prefix.to_string(),
            stats: Arc::new(HttpStats::default()),
        });
        let weak: Weak<dyn Source> = Arc::downgrade(&source) as Weak<dyn Source>;
        self.store.register_weak(weak);
        let stats = source.stats.clone();
        map.insert(prefix.to_string(), source);
        stats
    }

    /// Active (warm) listeners, in the order they warmed.
    pub fn listeners(&self) -> Vec<Arc<ActiveListener>> {
        lock(&self.active).clone()
    }

    pub fn workers_started(&self) -> bool {
        self.workers_started.load(Ordering::Acquire)
    }

    /// Binds every active listener and starts accepting (the server is LIVE). Fails if any
    /// address cannot be bound; nothing accepts then.
    pub async fn start_workers(&self) -> io::Result<()> {
        let listeners = self.listeners();
        let mut bound = Vec::with_capacity(listeners.len());
        for l in &listeners {
            let socket = TcpListener::bind(l.config.address).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "listener {}: cannot bind {}: {e}",
                        l.name(),
                        l.config.address
                    ),
                )
            })?;
            let local = socket.local_addr()?;
            *lock(&l.local_address) = Some(local);
            bound.push((l.clone(), socket));
        }
        let Some(tx) = lock(&self.connections).clone() else {
            return Ok(());
        };
        for (l, socket) in bound {
            tracing::info!(listener = %l.name(), address = %l.local_address(), "listener accepting");
            tokio::spawn(accept_loop(l, socket, self.drain.clone(), tx.clone()));
        }
        self.workers_started.store(true, Ordering::Release);
        Ok(())
    }

    /// Drains: keep accepting for `drain_time` while connections are told to go away, then
    /// stop accepting and wait up to `grace` for connections to finish.
    pub async fn drain_listeners(&self, drain_time: Duration, grace: Duration) {
        self.drain.advance(Phase::Draining);
        tracing::info!(?drain_time, "draining listeners");
        tokio::time::sleep(drain_time).await;
        self.close(grace).await;
    }

    /// Stops accepting and waits up to `grace` for open connections to finish.
    pub async fn close(&self, grace: Duration) {
        self.drain.advance(Phase::Closing);
        drop(lock(&self.connections).take());
        let mut done = self.connections_done.lock().await;
        if tokio::time::timeout(grace, done.recv()).await.is_err() {
            tracing::warn!(
                ?grace,
                "connections still open after the shutdown grace period"
            );
        }
    }
}

async fn accept_loop(
    listener: Arc<ActiveListener>,
    socket: TcpListener,
    drain: Drain,
    connections: mpsc::Sender<()>,
) {
    let mut phase = drain.subscribe();
    loop {
        tokio::select! {
            biased;
            () = closing(&mut phase) => break,
            accepted = socket.accept() => match accepted {
                Ok((stream, remote)) => {
                    listener.stats.downstream_cx_total.inc();
                    let local = stream.local_addr().unwrap_or_else(|_| listener.local_address());
                    let hcm = listener.hcm.clone();
                    let stats = listener.stats.clone();
                    let token = connections.clone();
                    tokio::spawn(async move {
                        let _token = token;
                        stats.downstream_cx_active.inc();
                        hcm.serve_connection(stream, remote, local).await;
                        stats.downstream_cx_active.dec();
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %listener.name(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    tracing::info!(listener = %listener.name(), "listener stopped accepting");
}

/// Completes when the drain reaches `Closing` (or its sender is gone).
async fn closing(phase: &mut tokio::sync::watch::Receiver<Phase>) {
    let _ = phase.wait_for(|p| *p == Phase::Closing).await;
}

impl Source for ListenerManager {
    fn collect(&self, out: &mut Vec<Sample>) {
        let scope = Scope::fixed("listener_manager");
        scope.gauge(
            "total_listeners_active",
            lock(&self.active).len() as i64,
            out,
        );
        scope.gauge(
            "total_listeners_warming",
            lock(&self.warming).len() as i64,
            out,
        );
        let draining = if self.drain.is_draining() {
            lock(&self.active).len() as i64
        } else {
            0
        };
        scope.gauge("total_listeners_draining", draining, out);
        scope.counter("listener_added", self.listener_added.get(), out);
        scope.gauge("workers_started", i64::from(self.workers_started()), out);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
