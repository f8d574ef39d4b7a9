//! The server: wires the managers together and runs `DESIGN.md`'s initialization sequence,
//! then serves until a shutdown request and drains.
//!
//! Sequence ([`Server::initialize`]), each step waiting for the previous one:
//! 1. cluster manager, primary phase — STATIC, STRICT_DNS, LOGICAL_DNS clusters (DNS once);
//! 2. secondary phase — EDS clusters (first assignment, failure, or `initial_fetch_timeout`)
//!    and bootstrap clusters' SDS secrets (or their `initial_fetch_timeout`);
//! 3. CDS (when `cds_config` is set): wait for the first CDS response (or failure, or its
//!    `initial_fetch_timeout`), then the CDS clusters' primary phase, then their secondary
//!    phase (each EDS cluster's first assignment, or its timeout);
//! 4. the health-check round: every cluster with active health checks until one check of
//!    each of its initial hosts completed (`cluster::health_check`; at once without them);
//! 5. the server's init manager starts (`server.state` INITIALIZING); with `lds_config`, LDS
//!    is subscribed only now and its first response (or failure, or timeout) awaited;
//! 6. every listener — static or from LDS — warms through the server's init manager (its RDS
//!    route configuration, or that subscription's timeout);
//! 7. listeners bind and accept; `server.state` LIVE, `/ready` 200.
//!
//! The xDS client ([`crate::xds`]) starts with the server when the bootstrap has
//! `dynamic_resources` (or `--xds-address`); [`crate::dynamic`] applies what it receives.
//!
//! Admin and the readiness listener bind first, so `/ready` reports PRE_INITIALIZING and
//! INITIALIZING while the steps run. A shutdown request during initialization stops it.
//! This module decides order and lifetimes only; the steps live in their managers.

pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::admin::{self, Admin};
use crate::cluster::{ClusterManager, InitPhases};
use crate::config::Bootstrap;
use crate::config::dynamic::{AdsApi, fetch_timeout};
use crate::dynamic::{ClientStats, DynamicConfig};
use crate::init;
use crate::listener::ListenerManager;
use crate::listener::drain::Drain;
use crate::stats::{Sample, Scope, Store};
use crate::xds::{
    CLUSTER_TYPE, LISTENER_TYPE, SubscriptionNames, XdsClient, XdsClientConfig, XdsMode,
};
use state::{InitProgress, ShutdownReason, Status};

/// Runtime options from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub concurrency: usize,
    /// How long listeners keep accepting (telling clients to go away) after SIGTERM.
    pub drain_time: Duration,
    /// How long in-flight requests may take to finish once listeners stop accepting.
    pub shutdown_grace: Duration,
    /// The readiness-only listener (`/ready`).
    pub readiness_address: SocketAddr,
    /// For `/server_info`.
    pub config_path: String,
    pub log_level: String,
}

/// Everything the server owns; shared with the admin interface.
#[derive(Debug)]
pub struct Server {
    pub bootstrap: Bootstrap,
    pub options: Options,
    pub status: Arc<Status>,
    pub stats: Arc<Store>,
    pub clusters: Arc<ClusterManager>,
    pub listeners: Arc<ListenerManager>,
    pub cluster_init: InitPhases,
    /// The server's init manager: listeners (and, later, LDS) register here.
    pub server_init: init::Manager,
    /// When the configuration was loaded (`last_updated` in `/config_dump`).
    pub loaded_at: SystemTime,
    /// CDS/EDS/LDS/RDS over ADS, when the bootstrap has `dynamic_resources`.
    pub dynamic: Option<Arc<DynamicConfig>>,
}

impl Server {
    /// Builds the managers and registers every init target; starts nothing.
    pub fn new(bootstrap: Bootstrap, options: Options) -> anyhow::Result<Arc<Self>> {
        let stats = Store::new();
        let status = Arc::new(Status::default());
        let clusters = ClusterManager::new(stats.clone());
        let listeners = ListenerManager::new(clusters.clone(), stats.clone(), Drain::new());
        let cluster_init = InitPhases::default();
        let server_init = init::Manager::new("server");
        listeners.set_drain_time(options.drain_time);

        let dynamic = match &bootstrap.dynamic {
            None => None,
            Some(d) => {
                let handler =
                    DynamicConfig::new(clusters.clone(), listeners.clone(), server_init.clone());
                let node = bootstrap.source.node.clone().unwrap_or_default();
                let mut config = XdsClientConfig::new(d.ads.endpoint.clone(), node);
                config.mode = match d.ads.api {
                    AdsApi::Sotw => XdsMode::Sotw,
                    AdsApi::Delta => XdsMode::Delta,
                };
                let client = XdsClient::new(config, handler.clone())
                    .context("dynamic_resources.ads_config")?;
                handler.set_client(client);
                clusters.set_eds_source(handler.clone());
                listeners.set_rds_source(handler.clone());
                stats.register(Arc::new(ClientStats(Arc::downgrade(&handler))));
                Some(handler)
            }
        };

        clusters
            .add_static_clusters(&bootstrap.clusters, &cluster_init)
            .context("registering static clusters")?;
        for l in &bootstrap.listeners {
            listeners
                .add_listener(l, &server_init)
                .context("registering static listeners")?;
        }

        let gauges_status = status.clone();
        let concurrency = options.concurrency;
        stats.register(Arc::new(move |out: &mut Vec<Sample>| {
            let scope = Scope::fixed("server");
            let state = gauges_status.state();
            scope.gauge("state", state.gauge_value(), out);
            scope.gauge("live", i64::from(state == state::ServerState::Live), out);
            scope.gauge(
                "uptime",
                i64::try_from(gauges_status.uptime().as_secs()).unwrap_or(i64::MAX),
                out,
            );
            scope.gauge(
                "concurrency",
                i64::try_from(concurrency).unwrap_or(i64::MAX),
                out,
            );
        }));

        Ok(Arc::new(Self {
            bootstrap,
            options,
            status,
            stats,
            clusters,
            listeners,
            cluster_init,
            server_init,
            loaded_at: SystemTime::now(),
            dynamic,
        }))
    }

    /// Every init manager in sequence order, for `/init_dump`.
    pub fn init_managers(&self) -> [&init::Manager; 6] {
        [
            &self.cluster_init.primary,
            &self.cluster_init.secondary,
            &self.clusters.cds_init.primary,
            &self.clusters.cds_init.secondary,
            &self.cluster_init.health_check,
            &self.server_init,
        ]
    }

    /// The xDS client, when there is one.
    pub fn xds(&self) -> Option<&XdsClient> {
        self.dynamic.as_ref().and_then(|d| d.client())
    }

    /// Runs until shut down: admin up, initialization, LIVE, then drain on request.
    pub async fn run(self: Arc<Self>) -> anyhow::Result<()> {
        // Handlers first, so a SIGTERM during startup drains instead of killing the process.
        let signals = Signals::install().context("installing signal handlers")?;
        tokio::spawn(signals.forward(self.status.clone()));
        let admin_socket = TcpListener::bind(self.bootstrap.admin_address)
            .await
            .with_context(|| format!("admin: cannot bind {}", self.bootstrap.admin_address))?;
        let readiness_socket = TcpListener::bind(self.options.readiness_address)
            .await
            .with_context(|| {
                format!(
                    "readiness listener: cannot bind {}",
                    self.options.readiness_address
                )
            })?;
        let admin = Arc::new(Admin::new(self.clone()));
        tracing::info!(address = %self.bootstrap.admin_address, "admin listening");
        tokio::spawn(admin::serve(
            admin_socket,
            admin.clone(),
            admin::Scope::Full,
        ));
        tokio::spawn(admin::serve(
            readiness_socket,
            admin,
            admin::Scope::ReadinessOnly,
        ));

        if let (Some(client), Some(d)) = (self.xds(), &self.bootstrap.dynamic) {
            if d.cds.is_some() {
                client.subscribe(CLUSTER_TYPE, SubscriptionNames::Wildcard);
            }
            let status = self.status.clone();
            tokio::spawn(client.clone().run(async move {
                status.shutdown_requested().await;
            }));
        }

        tokio::select! {
            initialized = self.initialize() => initialized?,
            reason = self.status.shutdown_requested() => {
                tracing::info!(?reason, "shutdown requested during initialization");
                self.status.set_draining();
                self.listeners.close(Duration::ZERO).await;
                return Ok(());
            }
        }

        let reason = self.status.shutdown_requested().await;
        self.status.set_draining();
        match reason {
            ShutdownReason::Signal => {
                self.listeners
                    .drain_listeners(self.options.drain_time, self.options.shutdown_grace)
                    .await;
            }
            ShutdownReason::QuitQuitQuit => self.listeners.close(self.options.shutdown_grace).await,
        }
        tracing::info!("shutdown complete");
        Ok(())
    }

    /// `DESIGN.md`'s initialization sequence; returns once listeners accept.
    pub async fn initialize(&self) -> anyhow::Result<()> {
        self.status.set_progress(InitProgress::PreInitializing);
        tracing::info!("cluster manager: primary clusters initializing");
        self.cluster_init.primary.initialize().wait().await;
        tracing::info!("cluster manager: secondary (EDS) clusters initializing");
        self.cluster_init.secondary.initialize().wait().await;
        let dynamic = self.bootstrap.dynamic.as_ref().zip(self.xds());
        if let Some((d, client)) = dynamic
            && d.cds.is_some()
        {
            tracing::info!("CDS: waiting for the first response");
            let outcome = client
                .initial_fetch_with_timeout(CLUSTER_TYPE, fetch_timeout(d.cds))
                .await;
            tracing::info!(
                ?outcome,
                "CDS: initial fetch ended; CDS clusters initializing"
            );
            self.clusters.cds_init.primary.initialize().wait().await;
            self.clusters.cds_init.secondary.initialize().wait().await;
        }
        tracing::info!("cluster manager: health check round");
        self.cluster_init.health_check.initialize().wait().await;
        tracing::info!("cluster manager initialized; listeners warming");
        self.status.set_progress(InitProgress::Initializing);
        // RDS for static listeners starts now, with LDS.
        self.listeners.start_rds();
        if let Some((d, client)) = dynamic
            && d.lds.is_some()
        {
            client.subscribe(LISTENER_TYPE, SubscriptionNames::Wildcard);
            tracing::info!("LDS: waiting for the first response");
            let outcome = client
                .initial_fetch_with_timeout(LISTENER_TYPE, fetch_timeout(d.lds))
                .await;
            tracing::info!(?outcome, "LDS: initial fetch ended");
        }
        self.server_init.initialize().wait().await;
        self.listeners
            .start_workers()
            .await
            .context("starting listeners")?;
        self.status.set_progress(InitProgress::Live);
        tracing::info!("server LIVE");
        Ok(())
    }
}

/// SIGTERM and SIGINT request a draining shutdown.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    async fn forward(mut self, status: Arc<Status>) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: draining"),
            _ = self.int.recv() => tracing::info!("SIGINT: draining"),
        }
        #[cfg(not(unix))]
        {
            let _ = &mut self;
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
        }
        status.request_shutdown(ShutdownReason::Signal);
    }
}
