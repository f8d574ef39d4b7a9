//! The xDS server: serves Envoy xDS v3 resources over gRPC — ADS (state of the world and
//! delta) and the standalone CDS/EDS/LDS/RDS/SDS services — from per-node resource sets.
//!
//! Knows nothing of CRDs: it asks a [`ResourceSource`] for the resources of a node and is told
//! when they may have changed.
//!
//! Layout:
//! * `server` — [`XdsServer`]: the tonic services and `serve`.
//! * `stream` — the one stream engine all services share (node, snapshot, type scoping, push
//!   order, ACK/NACK accounting); `sotw` and `delta` hold the two protocol variants and
//!   document the `xds_protocol` rules they keep.
//! * [`version`] — content-hash versions (stable across restarts) and nonces.
//! * `stats` — [`XdsStats`] and its Prometheus rendering; `nacks` — [`NackLog`].
//!
//! This module must not: look at resource contents beyond hashing them, decide what a node
//! receives (the [`ResourceSource`] does), or check snapshot consistency (every EDS name in
//! CDS, every RDS name in LDS) — the source hands out consistent snapshots; the server sends
//! each change in make-before-break order (CDS → EDS → LDS → RDS, removed clusters last).
//! SDS Secrets come after those: a cluster referring to a Secret it does not have yet warms
//! until the Secret arrives, so their order needs nothing more.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::watch;

pub mod acks;
mod delta;
mod nacks;
mod server;
mod sotw;
mod stats;
mod stream;
pub mod version;

pub use acks::{AckRegistry, ProxyState};
pub use nacks::{MAX_NODES as NACK_LOG_MAX_NODES, NACKS_PER_NODE, NackLog, NackRecord};
pub use server::{ServeError, XdsServer};
pub use stats::XdsStats;

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// SDS: TLS certificates and validation contexts, requested by name by the clusters that
/// reference them (never wildcard).
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The order in which a change is pushed (make-before-break).
pub const PUSH_ORDER: [&str; 4] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE];

/// Every resource one node receives: type URL → resource name → packed resource.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub by_type: BTreeMap<String, BTreeMap<String, Any>>,
    /// The store generation these resources were translated from (for [`acks`]).
    pub generation: u64,
}

/// Where the server gets resources from. Implemented by the wiring over store + translator.
pub trait ResourceSource: Send + Sync + 'static {
    /// The resources `node` should receive now. Nodes that receive identical resources may
    /// share one `Arc`.
    fn resources_for(&self, node: &Node) -> Arc<Resources>;
    /// Changes whenever `resources_for` may return something new.
    fn changes(&self) -> watch::Receiver<u64>;
}
