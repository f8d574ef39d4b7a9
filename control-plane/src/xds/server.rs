//! The gRPC face of the xDS server: [`XdsServer`] and the tonic service implementations of
//! ADS (`StreamAggregatedResources`, `DeltaAggregatedResources`) and the standalone
//! CDS/EDS/LDS/RDS/SDS services (`Stream*`, `Delta*`).
//!
//! Owns wiring only: every streaming method hands its request stream to the one shared stream
//! engine (`stream`) — a standalone service is an ADS stream restricted to its
//! type URL — and `serve` runs tonic with a graceful shutdown that also ends open xDS streams
//! (with `UNAVAILABLE`, so proxies reconnect elsewhere). Unary `Fetch*` methods (REST-xDS) are
//! not supported and answer `UNIMPLEMENTED`.
//!
//! Must not: hold protocol state (that is the engine's) or know where resources come from.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_server::{
    ClusterDiscoveryService, ClusterDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_server::{
    EndpointDiscoveryService, EndpointDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::listener::v3::listener_discovery_service_server::{
    ListenerDiscoveryService, ListenerDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::route::v3::route_discovery_service_server::{
    RouteDiscoveryService, RouteDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use super::acks::AckRegistry;
use super::delta::Delta;
use super::nacks::NackLog;
use super::sotw::Sotw;
use super::stats::XdsStats;
use super::stream::{Scope, Shared, spawn_stream};
use super::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, ResourceSource, SECRET_TYPE};

/// HTTP/2 keepalive: notice dead proxies (and let them notice a dead control plane) quickly.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Why [`XdsServer::serve`] / [`XdsServer::bind_and_serve`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding the xDS listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("xDS gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The xDS server. Build with [`XdsServer::new`], take the [`stats`](Self::stats) and
/// [`nacks`](Self::nacks) handles you need, then [`serve`](Self::serve).
pub struct XdsServer {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for XdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsServer").finish_non_exhaustive()
    }
}

impl XdsServer {
    pub fn new(source: Arc<dyn ResourceSource>) -> Self {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            source,
            stats: Arc::new(XdsStats::new()),
            nacks: Arc::new(NackLog::new()),
            acks: Arc::default(),
            next_stream: Default::default(),
            shutdown: shutdown_rx,
        });
        Self { shared, shutdown }
    }

    /// The server's counters (live; keeps working after `serve` took the server).
    pub fn stats(&self) -> Arc<XdsStats> {
        self.shared.stats.clone()
    }

    /// What each connected proxy has ACKed and NACKed (live).
    pub fn acks(&self) -> Arc<AckRegistry> {
        self.shared.acks.clone()
    }

    /// Recent NACKs per node (live; keeps working after `serve` took the server).
    pub fn nacks(&self) -> Arc<NackLog> {
        self.shared.nacks.clone()
    }

    /// Serves ADS and the standalone CDS/EDS/LDS/RDS services on `listener` until `shutdown`
    /// completes; then stops accepting, ends every open xDS stream with `UNAVAILABLE` and
    /// returns once all connections are closed.
    pub async fn serve<F>(self, listener: TcpListener, shutdown: F) -> Result<(), ServeError>
    where
        F: Future<Output = ()> + Send,
    {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "xDS server listening");
        }
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(TCP_KEEPALIVE));
        let services = Arc::new(Services {
            shared: self.shared.clone(),
        });
        let stop_streams = self.shutdown;
        let signal = async move {
            shutdown.await;
            tracing::info!("xDS server shutting down");
            // Open streams would otherwise keep their connections (and this future) alive.
            let _ = stop_streams.send(true);
        };
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .add_service(AggregatedDiscoveryServiceServer::from_arc(services.clone()))
            .add_service(ClusterDiscoveryServiceServer::from_arc(services.clone()))
            .add_service(EndpointDiscoveryServiceServer::from_arc(services.clone()))
            .add_service(ListenerDiscoveryServiceServer::from_arc(services.clone()))
            .add_service(RouteDiscoveryServiceServer::from_arc(services.clone()))
            .add_service(SecretDiscoveryServiceServer::from_arc(services))
            .serve_with_incoming_shutdown(incoming, signal)
            .await?;
        Ok(())
    }

    /// Binds `addr` and [`serve`](Self::serve)s on it.
    pub async fn bind_and_serve<F>(self, addr: SocketAddr, shutdown: F) -> Result<(), ServeError>
    where
        F: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        self.serve(listener, shutdown).await
    }
}

type SotwStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
type DeltaStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

/// Implements every xDS service over the shared engine.
struct Services {
    shared: Arc<Shared>,
}

impl Services {
    fn sotw(
        &self,
        scope: Scope,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Response<SotwStream> {
        Response::new(spawn_stream(
            self.shared.clone(),
            scope,
            request.into_inner(),
            Sotw::new(),
        ))
    }

    fn delta(
        &self,
        scope: Scope,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Response<DeltaStream> {
        Response::new(spawn_stream(
            self.shared.clone(),
            scope,
            request.into_inner(),
            Delta::new(),
        ))
    }
}

fn fetch_unimplemented(service: &str) -> Status {
    Status::unimplemented(format!(
        "{service}: unary Fetch (REST-xDS) is not supported by Capstan; use the streaming \
         Stream*/Delta* methods, preferably ADS"
    ))
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Services {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Ok(self.sotw(Scope::Aggregated, request))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Ok(self.delta(Scope::Aggregated, request))
    }
}

/// Implements a standalone discovery service as the engine restricted to one type URL.
macro_rules! standalone_service {
    ($trait:ident, $type_url:expr, $stream_ty:ident, $stream_fn:ident, $delta_ty:ident, $delta_fn:ident, $fetch_fn:ident) => {
        #[tonic::async_trait]
        impl $trait for Services {
            type $stream_ty = SotwStream;
            type $delta_ty = DeltaStream;

            async fn $stream_fn(
                &self,
                request: Request<Streaming<DiscoveryRequest>>,
            ) -> Result<Response<SotwStream>, Status> {
                Ok(self.sotw(Scope::Only($type_url), request))
            }

            async fn $delta_fn(
                &self,
                request: Request<Streaming<DeltaDiscoveryRequest>>,
            ) -> Result<Response<DeltaStream>, Status> {
                Ok(self.delta(Scope::Only($type_url), request))
            }

            async fn $fetch_fn(
                &self,
                _request: Request<DiscoveryRequest>,
            ) -> Result<Response<DiscoveryResponse>, Status> {
                Err(fetch_unimplemented(stringify!($trait)))
            }
        }
    };
}

standalone_service!(
    ClusterDiscoveryService,
    CLUSTER_TYPE,
    StreamClustersStream,
    stream_clusters,
    DeltaClustersStream,
    delta_clusters,
    fetch_clusters
);
standalone_service!(
    EndpointDiscoveryService,
    ENDPOINT_TYPE,
    StreamEndpointsStream,
    stream_endpoints,
    DeltaEndpointsStream,
    delta_endpoints,
    fetch_endpoints
);
standalone_service!(
    ListenerDiscoveryService,
    LISTENER_TYPE,
    StreamListenersStream,
    stream_listeners,
    DeltaListenersStream,
    delta_listeners,
    fetch_listeners
);
standalone_service!(
    RouteDiscoveryService,
    ROUTE_TYPE,
    StreamRoutesStream,
    stream_routes,
    DeltaRoutesStream,
    delta_routes,
    fetch_routes
);
standalone_service!(
    SecretDiscoveryService,
    SECRET_TYPE,
    StreamSecretsStream,
    stream_secrets,
    DeltaSecretsStream,
    delta_secrets,
    fetch_secrets
);
