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
//! Listeners from LDS ([`lds`]) follow the same path: a new or changed listener warms (its
//! RDS route configuration, or `initial_fetch_timeout`), then replaces the active listener of
//! that name — taking over its bound socket when the address is the same, so no connection
//! attempt is refused in between — and the old one drains for the drain time (HTTP/1
//! `Connection: close`, HTTP/2 GOAWAY), then closes once its in-flight requests finish.
//! Each listener has its own [`Drain`]; a server-wide drain advances all of them.
//!
//! Each accepted connection gets the filter chain [`filter_chain::select`] picks (Envoy's
//! `filter_chain_match` order), else the `default_filter_chain`, else it is closed
//! (`listener.<prefix>.no_filter_chain_match`). The listener manager must not route requests;
//! it hands each connection to its chain's network filter: the HTTP connection manager
//! ([`crate::http`]) or the TCP proxy ([`crate::tcp`]). A listener's RDS names (for warming)
//! are the union over its chains; a listener with only TCP proxies warms at once.

pub mod drain;
pub mod filter_chain;
pub mod lds;
pub mod tls_inspector;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::cluster::ClusterManager;
use crate::config::listener::{FilterChain, Listener as Config, NetworkFilter};
use crate::config::route::RouteConfig;
use crate::http::{HttpConnectionManager, HttpStats, HttpStatsSource};
use crate::init;
use crate::stats::{Counter, Gauge, Sample, Scope, Source, Store};
use crate::tcp::{TcpProxy, TcpStats, TcpStatsSource};
use drain::{Drain, Phase};

/// Envoy's `listener.<address or stat_prefix>.*` stats.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub no_filter_chain_match: Counter,
    /// `downstream_pre_cx_timeout`: the TLS inspector timed out.
    pub downstream_pre_cx_timeout: Counter,
    /// `ssl.*` of the chains that terminate TLS.
    pub ssl: crate::tls::SslStats,
}

/// What serves the connections of one filter chain.
#[derive(Debug, Clone)]
pub enum ChainHandler {
    Http(Arc<HttpConnectionManager>),
    Tcp(Arc<TcpProxy>),
}

impl ChainHandler {
    async fn serve_connection(
        self,
        stream: crate::tls::DownstreamStream,
        remote: SocketAddr,
        local: SocketAddr,
    ) {
        match self {
            ChainHandler::Http(h) => h.serve_connection(stream, remote, local).await,
            ChainHandler::Tcp(t) => t.serve_connection(stream, remote, local).await,
        }
    }
}

/// A running accept loop: stopping it hands its socket back (for a listener update on the
/// same address).
struct Accepting {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Option<TcpListener>>,
}

/// One listener: its configuration, network filter and, once bound, its address.
pub struct ActiveListener {
    config: Arc<Config>,
    /// One per `config.filter_chains` entry, in order.
    chains: Vec<ChainHandler>,
    default_chain: Option<ChainHandler>,
    stats: Arc<ListenerStats>,
    init: init::Manager,
    local_address: Mutex<Option<SocketAddr>>,
    /// This listener's own drain (a replaced or removed listener drains alone).
    drain: Drain,
    accepting: Mutex<Option<Accepting>>,
    added_via_api: bool,
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

    pub fn added_via_api(&self) -> bool {
        self.added_via_api
    }

    /// The first HTTP connection manager of its filter chains (`None`: TCP proxies only).
    pub fn http_connection_manager(&self) -> Option<&Arc<HttpConnectionManager>> {
        self.http_connection_managers().next()
    }

    /// Every HTTP connection manager of its filter chains (the default chain last).
    pub fn http_connection_managers(&self) -> impl Iterator<Item = &Arc<HttpConnectionManager>> {
        self.handlers().filter_map(|h| match h {
            ChainHandler::Http(h) => Some(h),
            ChainHandler::Tcp(_) => None,
        })
    }

    /// Every chain's handler, the default chain last.
    pub fn handlers(&self) -> impl Iterator<Item = &ChainHandler> {
        self.chains.iter().chain(self.default_chain.iter())
    }

    /// The handler of the chain a connection from `remote` accepted on `local` gets.
    pub fn handler_for(&self, local: SocketAddr, remote: SocketAddr) -> Option<&ChainHandler> {
        self.chain_for(&filter_chain::ConnectionInfo::raw(local, remote))
            .map(|(h, _)| h)
    }

    /// The handler and configuration of the chain a connection gets.
    pub fn chain_for(
        &self,
        conn: &filter_chain::ConnectionInfo<'_>,
    ) -> Option<(&ChainHandler, &crate::config::listener::FilterChain)> {
        match filter_chain::select(&self.config.filter_chains, conn) {
            Some(i) => Some((self.chains.get(i)?, self.config.filter_chains.get(i)?)),
            None => Some((
                self.default_chain.as_ref()?,
                self.config.default_filter_chain.as_ref()?,
            )),
        }
    }

    /// The bound address (the configured one until bound; the real port when it was 0).
    pub fn local_address(&self) -> SocketAddr {
        lock(&self.local_address).unwrap_or(self.config.address)
    }

    /// Starts accepting on `socket`.
    fn accept_on(self: &Arc<Self>, socket: TcpListener, connections: mpsc::Sender<()>) {
        if let Ok(local) = socket.local_addr() {
            *lock(&self.local_address) = Some(local);
        }
        let (stop, stopped) = oneshot::channel();
        tracing::info!(listener = %self.name(), address = %self.local_address(), "listener accepting");
        let task = tokio::spawn(accept_loop(self.clone(), socket, connections, stopped));
        *lock(&self.accepting) = Some(Accepting { stop, task });
    }

    /// Stops accepting and returns the socket (`None` if it was not accepting).
    async fn stop_accepting(&self) -> Option<TcpListener> {
        let accepting = lock(&self.accepting).take()?;
        let _ = accepting.stop.send(());
        accepting.task.await.ok().flatten()
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
        scope.counter(
            "no_filter_chain_match",
            self.stats.no_filter_chain_match.get(),
            out,
        );
        scope.counter(
            "downstream_pre_cx_timeout",
            self.stats.downstream_pre_cx_timeout.get(),
            out,
        );
        if self.config.all_filter_chains().any(|fc| fc.tls.is_some()) {
            self.stats.ssl.collect(&scope, out);
        }
    }
}

/// Where RDS connection managers get their route configurations (the xDS client, through the
/// proxy's handler).
pub trait RdsSource: Send + Sync + 'static {
    /// Completes on the first route configuration `name`, on failure, or after `timeout`.
    fn first_route_config(
        &self,
        name: &str,
        timeout: Option<Duration>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = init::FetchOutcome> + Send>>;

    /// The route configuration names the listeners need now.
    fn subscribe(&self, names: std::collections::BTreeSet<String>);
}

/// Every listener of the proxy.
pub struct ListenerManager {
    clusters: Arc<ClusterManager>,
    store: Arc<Store>,
    drain: Drain,
    warming: Mutex<Vec<Arc<ActiveListener>>>,
    active: Mutex<Vec<Arc<ActiveListener>>>,
    draining: Mutex<Vec<Arc<ActiveListener>>>,
    /// Listeners removed by LDS whose address a warming listener of the same update takes
    /// over: they keep accepting until it is warm and takes their socket (make-before-break
    /// for a rename on the same address), then drain.
    pub(crate) handover: Mutex<Vec<Arc<ActiveListener>>>,
    http_stats: Mutex<HashMap<String, Arc<HttpStatsSource>>>,
    tcp_stats: Mutex<HashMap<String, Arc<TcpStatsSource>>>,
    workers_started: AtomicBool,
    /// Held while listeners are bound or swapped, so a listener that warms while workers
    /// start is bound exactly once.
    activation: tokio::sync::Mutex<()>,
    listener_added: Counter,
    listener_modified: Counter,
    listener_removed: Counter,
    /// How long a replaced or removed listener drains (`--drain-time-s`).
    listener_drain_time: Mutex<Duration>,
    rds: std::sync::OnceLock<Arc<dyn RdsSource>>,
    /// RDS starts with LDS, once the cluster manager has initialized (`DESIGN.md` step 5);
    /// until then the names are collected but not subscribed.
    rds_started: AtomicBool,
    /// The last accepted route configuration of each RDS name.
    routes: Mutex<HashMap<String, Arc<RouteConfig>>>,
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
            draining: Mutex::new(Vec::new()),
            handover: Mutex::new(Vec::new()),
            http_stats: Mutex::new(HashMap::new()),
            tcp_stats: Mutex::new(HashMap::new()),
            workers_started: AtomicBool::new(false),
            activation: tokio::sync::Mutex::new(()),
            listener_added: Counter::default(),
            listener_modified: Counter::default(),
            listener_removed: Counter::default(),
            listener_drain_time: Mutex::new(Duration::from_secs(45)),
            rds: std::sync::OnceLock::new(),
            rds_started: AtomicBool::new(false),
            routes: Mutex::new(HashMap::new()),
            connections: Mutex::new(Some(tx)),
            connections_done: tokio::sync::Mutex::new(rx),
        });
        let weak: Weak<dyn Source> = Arc::downgrade(&lm) as Weak<dyn Source>;
        store.register_weak(weak);
        // Local rate limit stats are shared by stat_prefix across every configuration.
        store.register(Arc::new(crate::http::local_ratelimit::StatsSource));
        lm
    }

    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// How long a listener replaced or removed by LDS drains.
    pub fn set_drain_time(&self, d: Duration) {
        *lock(&self.listener_drain_time) = d;
    }

    /// Sets where RDS connection managers get their routes; before any listener is added.
    pub fn set_rds_source(&self, source: Arc<dyn RdsSource>) {
        if self.rds.set(source).is_err() {
            tracing::warn!("RDS source set twice; keeping the first");
        }
    }

    /// Adds a bootstrap listener, warming; `server_init` gets a target that is ready once it
    /// is warm.
    pub fn add_listener(
        self: &Arc<Self>,
        config: &Config,
        server_init: &init::Manager,
    ) -> Result<(), init::Error> {
        let listener = self.build(config, false);
        lock(&self.warming).push(listener.clone());
        self.update_rds_subscription();
        self.warm(listener, server_init)
    }

    /// Builds a listener with a handler per filter chain (connection managers holding the
    /// last route configuration received for their RDS name, if any) and its own init
    /// manager, with one target per RDS name its chains use.
    fn build(self: &Arc<Self>, config: &Config, added_via_api: bool) -> Arc<ActiveListener> {
        let drain = Drain::new();
        if self.drain.is_draining() {
            drain.advance(self.drain.phase());
        }
        let chains: Vec<ChainHandler> = config
            .filter_chains
            .iter()
            .map(|fc| self.chain_handler(fc, &drain))
            .collect();
        let default_chain = config
            .default_filter_chain
            .as_ref()
            .map(|fc| self.chain_handler(fc, &drain));
        let init = init::Manager::new(format!("listener {}", config.name));
        let mut registered_names = std::collections::BTreeSet::new();
        for fc in config.all_filter_chains() {
            let NetworkFilter::HttpConnectionManager(hcm_config) = &fc.filter else {
                continue;
            };
            let crate::config::listener::RouteSpecifier::Rds {
                route_config_name: name,
                initial_fetch_timeout,
            } = &hcm_config.route
            else {
                continue;
            };
            if !registered_names.insert(name.clone()) {
                continue;
            }
            let timeout = *initial_fetch_timeout;
            let rds = self.rds.get().cloned();
            let rds_name = name.clone();
            let registered = init.add_target(format!("RDS {name}"), move |ready| {
                tokio::spawn(async move {
                    let outcome = match rds {
                        Some(rds) => rds.first_route_config(&rds_name, timeout).await,
                        None => {
                            init::initial_fetch(
                                std::future::pending::<Result<(), String>>(),
                                timeout,
                            )
                            .await
                        }
                    };
                    tracing::info!(route_config = %rds_name, ?outcome, "RDS initial fetch ended");
                    ready.ready();
                });
            });
            if let Err(e) = registered {
                tracing::warn!(error = %e, "cannot register the RDS init target");
            }
        }
        // Chains whose TLS context waits for SDS secrets keep the listener warming.
        for (i, fc) in config.all_filter_chains().enumerate() {
            let Some(tls) = fc.tls.clone() else { continue };
            if tls.common.sds_refs().next().is_none() {
                continue;
            }
            let registered =
                init.add_target(format!("SDS secrets of filter chain {i}"), move |ready| {
                    tokio::spawn(async move {
                        let ok = crate::tls::sds::wait_ready(tls).await;
                        tracing::info!(ready = ok, "listener TLS secrets initial fetch ended");
                        ready.ready();
                    });
                });
            if let Err(e) = registered {
                tracing::warn!(error = %e, "cannot register the SDS init target");
            }
        }
        let listener = Arc::new(ActiveListener {
            init,
            config: Arc::new(config.clone()),
            chains,
            default_chain,
            stats: Arc::new(ListenerStats::default()),
            local_address: Mutex::new(None),
            drain,
            accepting: Mutex::new(None),
            added_via_api,
        });
        let weak: Weak<dyn Source> = Arc::downgrade(&listener) as Weak<dyn Source>;
        self.store.register_weak(weak);
        listener
    }

    /// The handler of one filter chain, sharing the listener's drain.
    fn chain_handler(&self, fc: &FilterChain, drain: &Drain) -> ChainHandler {
        match &fc.filter {
            NetworkFilter::HttpConnectionManager(hcm_config) => {
                let hcm = Arc::new(HttpConnectionManager::new(
                    hcm_config.clone(),
                    self.clusters.clone(),
                    self.http_stats(&hcm_config.stat_prefix),
                    drain.clone(),
                ));
                if let Some(rc) = hcm_config
                    .rds_name()
                    .and_then(|name| lock(&self.routes).get(name).cloned())
                {
                    hcm.set_route_config(rc);
                }
                ChainHandler::Http(hcm)
            }
            NetworkFilter::TcpProxy(tcp_config) => ChainHandler::Tcp(Arc::new(TcpProxy::new(
                tcp_config.clone(),
                self.clusters.clone(),
                self.tcp_stats(&tcp_config.stat_prefix),
                drain.clone(),
            ))),
        }
    }

    /// Warms `listener` through `parent` (the server's init manager during initialization);
    /// once warm it becomes active.
    fn warm(
        self: &Arc<Self>,
        listener: Arc<ActiveListener>,
        parent: &init::Manager,
    ) -> Result<(), init::Error> {
        let manager = Arc::downgrade(self);
        let name = format!("listener {}", listener.name());
        parent.add_target(name, move |ready| {
            let watcher = listener.init.initialize();
            tokio::spawn(async move {
                watcher.wait().await;
                if let Some(m) = manager.upgrade() {
                    m.warmed(&listener).await;
                }
                ready.ready();
            });
        })
    }

    /// A listener is warm: it replaces the active listener of its name (if any). Once workers
    /// run, it binds at once — taking over the old listener's socket when the address is the
    /// same — and the old listener drains.
    async fn warmed(self: &Arc<Self>, listener: &Arc<ActiveListener>) {
        let _activation = self.activation.lock().await;
        {
            let mut warming = lock(&self.warming);
            let Some(i) = warming.iter().position(|l| Arc::ptr_eq(l, listener)) else {
                // Superseded or removed while warming.
                return;
            };
            warming.remove(i);
        }
        let old = {
            let mut active = lock(&self.active);
            match active.iter().position(|l| l.name() == listener.name()) {
                Some(i) => Some(std::mem::replace(&mut active[i], listener.clone())),
                None => {
                    active.push(listener.clone());
                    None
                }
            }
        };
        // The replaced listener's route configuration may no longer be needed.
        self.update_rds_subscription();
        match &old {
            Some(_) => {
                self.listener_modified.inc();
                tracing::info!(listener = %listener.name(), "listener warmed; replacing the active one");
            }
            None => {
                self.listener_added.inc();
                tracing::info!(listener = %listener.name(), "listener warmed");
            }
        }
        if !self.workers_started() {
            return;
        }
        let Some(tx) = lock(&self.connections).clone() else {
            return;
        };
        // Take over the socket of the listener this one replaces, or of a removed one that
        // is still draining, when the address is the same.
        let address = listener.config.address;
        let same_address = |l: &Arc<ActiveListener>| {
            address.port() != 0 && (l.config.address == address || l.local_address() == address)
        };
        let handed_over = {
            let mut handover = lock(&self.handover);
            handover
                .iter()
                .position(&same_address)
                .map(|i| handover.remove(i))
        };
        let donor = old
            .clone()
            .filter(same_address)
            .or_else(|| handed_over.clone())
            .or_else(|| {
                lock(&self.draining)
                    .iter()
                    .find(|l| same_address(l))
                    .cloned()
            });
        let mut socket = None;
        if let Some(donor) = donor {
            socket = donor.stop_accepting().await;
        }
        if let Some(removed) = handed_over {
            tracing::info!(listener = %removed.name(), successor = %listener.name(), "removed listener handed over its socket; draining");
            self.drain_one(removed);
        }
        let socket = match socket {
            Some(s) => Ok(s),
            None => bind_retrying(address).await,
        };
        match socket {
            Ok(s) => listener.accept_on(s, tx),
            Err(e) => {
                tracing::error!(listener = %listener.name(), address = %listener.config.address,
                error = %e, "cannot bind listener")
            }
        }
        if let Some(old) = old {
            self.drain_one(old);
        }
    }

    /// Stops `old` accepting (if it still does) and drains its connections in the background.
    fn drain_one(self: &Arc<Self>, old: Arc<ActiveListener>) {
        let drain_time = *lock(&self.listener_drain_time);
        lock(&self.draining).push(old.clone());
        let manager = Arc::downgrade(self);
        tokio::spawn(async move {
            drop(old.stop_accepting().await);
            old.drain.advance(Phase::Draining);
            tracing::info!(listener = %old.name(), ?drain_time, "listener draining");
            tokio::time::sleep(drain_time).await;
            old.drain.advance(Phase::Closing);
            if let Some(m) = manager.upgrade() {
                lock(&m.draining).retain(|l| !Arc::ptr_eq(l, &old));
            }
            tracing::info!(listener = %old.name(), "listener drained");
        });
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

    /// TCP proxies with the same `stat_prefix` share their stats, as in Envoy.
    fn tcp_stats(&self, prefix: &str) -> Arc<TcpStats> {
        let mut map = lock(&self.tcp_stats);
        if let Some(s) = map.get(prefix) {
            return s.stats.clone();
        }
        let source = Arc::new(TcpStatsSource {
            stat_prefix: prefix.to_string(),
            stats: Arc::new(TcpStats::default()),
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

    /// Listeners still warming.
    pub fn warming_listeners(&self) -> Vec<Arc<ActiveListener>> {
        lock(&self.warming).clone()
    }

    pub fn workers_started(&self) -> bool {
        self.workers_started.load(Ordering::Acquire)
    }

    /// Binds every active listener and starts accepting (the server is LIVE). Fails if any
    /// address cannot be bound; nothing accepts then.
    pub async fn start_workers(&self) -> io::Result<()> {
        let _activation = self.activation.lock().await;
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
            bound.push((l.clone(), socket));
        }
        let Some(tx) = lock(&self.connections).clone() else {
            return Ok(());
        };
        for (l, socket) in bound {
            l.accept_on(socket, tx.clone());
        }
        self.workers_started.store(true, Ordering::Release);
        Ok(())
    }

    fn all_listeners(&self) -> Vec<Arc<ActiveListener>> {
        let mut all = lock(&self.active).clone();
        all.extend(lock(&self.warming).iter().cloned());
        all.extend(lock(&self.draining).iter().cloned());
        all.extend(lock(&self.handover).iter().cloned());
        all
    }

    /// Drains: keep accepting for `drain_time` while connections are told to go away, then
    /// stop accepting and wait up to `grace` for connections to finish.
    pub async fn drain_listeners(&self, drain_time: Duration, grace: Duration) {
        self.drain.advance(Phase::Draining);
        for l in self.all_listeners() {
            l.drain.advance(Phase::Draining);
        }
        tracing::info!(?drain_time, "draining listeners");
        tokio::time::sleep(drain_time).await;
        self.close(grace).await;
    }

    /// Stops accepting and waits up to `grace` for open connections to finish.
    pub async fn close(&self, grace: Duration) {
        self.drain.advance(Phase::Closing);
        for l in self.all_listeners() {
            l.drain.advance(Phase::Closing);
        }
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

/// Binds `address`, retrying for a second while it is still in use: a removed listener on the
/// same address may be releasing its socket right now.
async fn bind_retrying(address: SocketAddr) -> io::Result<TcpListener> {
    let mut attempts = 0;
    loop {
        match TcpListener::bind(address).await {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

async fn accept_loop(
    listener: Arc<ActiveListener>,
    socket: TcpListener,
    connections: mpsc::Sender<()>,
    mut stop: oneshot::Receiver<()>,
) -> Option<TcpListener> {
    let mut phase = listener.drain.subscribe();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => {
                tracing::info!(listener = %listener.name(), "listener handing over its socket");
                return Some(socket);
            }
            () = closing(&mut phase) => break,
            accepted = socket.accept() => match accepted {
                Ok((stream, remote)) => {
                    let local = stream.local_addr().unwrap_or_else(|_| listener.local_address());
                    let token = connections.clone();
                    if listener.config.tls_inspector {
                        // Inspecting waits for the ClientHello: off the accept loop.
                        let listener = listener.clone();
                        tokio::spawn(async move {
                            let _token = token;
                            let inspected = tokio::time::timeout(
                                tls_inspector::TIMEOUT,
                                tls_inspector::inspect(&stream),
                            )
                            .await;
                            let inspected = match inspected {
                                Ok(Ok(i)) => i,
                                Ok(Err(e)) => {
                                    tracing::debug!(%remote, error = %e, "TLS inspector: connection closed");
                                    return;
                                }
                                Err(_) => {
                                    listener.stats.downstream_pre_cx_timeout.inc();
                                    tracing::debug!(%remote, "TLS inspector timed out; closing the connection");
                                    return;
                                }
                            };
                            let conn = filter_chain::ConnectionInfo {
                                local,
                                remote,
                                server_name: inspected.server_name.as_deref(),
                                transport_protocol: inspected.transport_protocol,
                                application_protocols: &inspected.application_protocols,
                            };
                            let chain = listener.chain_for(&conn).map(Chosen::new);
                            serve(&listener, chain, stream, remote, local).await;
                        });
                        continue;
                    }
                    let chain = listener
                        .chain_for(&filter_chain::ConnectionInfo::raw(local, remote))
                        .map(Chosen::new);
                    if chain.is_none() {
                        listener.stats.no_filter_chain_match.inc();
                        tracing::debug!(listener = %listener.name(), %remote, %local,
                            "no filter chain matches; closing the connection");
                        drop(stream);
                        continue;
                    }
                    let listener = listener.clone();
                    tokio::spawn(async move {
                        let _token = token;
                        serve(&listener, chain, stream, remote, local).await;
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
    None
}

/// What a connection's filter chain needs once chosen (owned: the connection's task outlives
/// the accept loop's borrow of the listener).
struct Chosen {
    handler: ChainHandler,
    tls: Option<Arc<crate::config::tls::DownstreamTls>>,
    rate_limit: Option<Arc<crate::config::local_ratelimit::ConnectionRateLimit>>,
}

impl Chosen {
    fn new((handler, chain): (&ChainHandler, &crate::config::listener::FilterChain)) -> Self {
        Self {
            handler: handler.clone(),
            tls: chain.tls.clone(),
            rate_limit: chain.connection_rate_limit.clone(),
        }
    }
}

/// Serves one accepted connection on its chain: the connection rate limit first (Envoy's
/// network filter acts when the connection is created, before any TLS byte), then TLS when
/// the chain has a `DownstreamTlsContext`, then the chain's network filter.
async fn serve(
    listener: &ActiveListener,
    chain: Option<Chosen>,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
) {
    let stats = &listener.stats;
    let Some(Chosen {
        handler,
        tls,
        rate_limit,
    }) = chain
    else {
        stats.no_filter_chain_match.inc();
        tracing::debug!(listener = %listener.name(), %remote, %local,
            "no filter chain matches; closing the connection");
        return;
    };
    stats.downstream_cx_total.inc();
    if let Some(rl) = &rate_limit
        && rl.enabled
        && !rl.bucket.try_take()
    {
        rl.stats.rate_limited.inc();
        tracing::debug!(listener = %listener.name(), %remote,
            "connection rate limited (local_ratelimit); closing it");
        return;
    }
    stats.downstream_cx_active.inc();
    let stream = match tls {
        None => Some(crate::tls::DownstreamStream::Plain(stream)),
        Some(tls) => match tls.server_config.load_full() {
            // Its SDS secrets never arrived (the listener warmed on initial_fetch_timeout).
            None => {
                stats.ssl.connection_error.inc();
                tracing::debug!(listener = %listener.name(), %remote,
                    "no TLS certificate yet (SDS); closing the connection");
                None
            }
            Some(config) => match crate::tls::accept(config, stream, &stats.ssl).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::debug!(listener = %listener.name(), %remote, error = %e,
                        "downstream TLS handshake failed");
                    None
                }
            },
        },
    };
    if let Some(stream) = stream {
        handler.serve_connection(stream, remote, local).await;
    }
    stats.downstream_cx_active.dec();
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
        let mut draining = lock(&self.draining).len() as i64;
        if self.drain.is_draining() {
            draining += lock(&self.active).len() as i64;
        }
        scope.gauge("total_listeners_draining", draining, out);
        scope.counter("listener_added", self.listener_added.get(), out);
        scope.counter("listener_modified", self.listener_modified.get(), out);
        scope.counter("listener_removed", self.listener_removed.get(), out);
        scope.gauge("workers_started", i64::from(self.workers_started()), out);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
