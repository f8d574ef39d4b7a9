//! The proxy's xDS client: one ADS stream to the control plane, state of the world
//! (`StreamAggregatedResources`) or delta (`DeltaAggregatedResources`), following Envoy's
//! `xds_protocol` to the letter.
//!
//! ```text
//!  cluster manager ─┐ subscribe(type, names)         ┌─ on_sotw / on_delta ─► XdsHandler
//!  listener manager ┤ initial_fetch / resource_fetch │   Ok  → ACK  (new version, nonce)
//!  init manager ────┘            │                   │   Err → NACK (previous version, nonce,
//!                                ▼                   │          error_detail INVALID_ARGUMENT)
//!                   XdsClient ── run(): connect ─► ADS stream ─► responses ─┘
//!                                 ▲  backoff + jitter on failure; resubscribe everything
//!                                 └─ with the last accepted versions on reconnect
//! ```
//!
//! Owns the transport and the protocol: the subscriptions per type URL, what is sent on the
//! stream (node on the first request only, `resource_names` / subscribe-unsubscribe diffs,
//! `version_info`, nonces, ACK/NACK), the last accepted version per type and per resource,
//! reconnection, the initial-fetch waits the init manager ends its steps on, and the
//! `control_plane.*` / `update_*` stats.
//!
//! Must not: look inside resources beyond their type URL and name (the proxy's managers
//! validate and apply them through [`XdsHandler`]), ever tell a handler to drop configuration
//! because the control plane went away (the last accepted configuration keeps serving), call a
//! handler while holding a lock (handlers call [`XdsClient::subscribe`]), or `unwrap` anything
//! that came from the network.
//!
//! Layout: `client` — [`XdsClient`], shared state, the connection loop; `sotw` and `delta` —
//! the two protocol variants on one stream; `resource` — resource names and response
//! validation; `backoff` — jittered exponential backoff; `stats` — the counters.

use std::collections::BTreeSet;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;

mod backoff;
mod client;
mod delta;
mod resource;
mod sotw;
mod stats;

pub use client::{XdsClient, XdsClientError};
pub use stats::CONNECTED_STATE;

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The order in which subscriptions are (re)sent on a new stream: make-before-break, as Envoy
/// (CDS → EDS → LDS → RDS, then any other type by name).
pub const REQUEST_ORDER: [&str; 4] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE];

/// Implemented by the proxy's managers: validates and applies one type's update atomically.
///
/// Called from the client's connection task, one update at a time, never while the client
/// holds a lock — so a handler may call [`XdsClient::subscribe`] (the CDS handler subscribes
/// the EDS names of its clusters). Handlers must not block: they run between reading one
/// response and sending its ACK.
pub trait XdsHandler: Send + Sync + 'static {
    /// State of the world: the resources of `type_url` in one response, by name, in response
    /// order. For CDS and LDS (wildcard) this is the complete set: a resource that is absent
    /// was removed. For EDS and RDS it is the subscribed names the server has; a name that is
    /// absent was not removed (`xds_protocol`: those go away when no parent refers to them).
    ///
    /// Return `Err(message naming every unsupported or invalid field)` to NACK; the update must
    /// then change nothing.
    fn on_sotw(
        &self,
        type_url: &str,
        version: &str,
        resources: Vec<(String, Any)>,
    ) -> Result<(), String>;

    /// Delta: added or updated resources (by name) and removed names. Never called with both
    /// empty. `Err` NACKs and the update must change nothing.
    fn on_delta(
        &self,
        type_url: &str,
        updated: Vec<(String, Any)>,
        removed: Vec<String>,
    ) -> Result<(), String>;
}

/// What a subscription asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscriptionNames {
    /// Every resource of the type (CDS, LDS).
    Wildcard,
    /// Exactly these names (EDS, RDS). An empty set unsubscribes.
    Names(BTreeSet<String>),
}

impl SubscriptionNames {
    /// `Names` from anything that yields strings.
    pub fn names<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::Names(names.into_iter().map(Into::into).collect())
    }

    /// Whether `name` is selected.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Wildcard => true,
            Self::Names(names) => names.contains(name),
        }
    }

    fn is_nothing(&self) -> bool {
        matches!(self, Self::Names(names) if names.is_empty())
    }
}

/// Which ADS variant the client speaks (the bootstrap's `api_type`: `GRPC` / `DELTA_GRPC`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdsMode {
    /// State of the world: `StreamAggregatedResources`.
    #[default]
    Sotw,
    /// Incremental: `DeltaAggregatedResources`.
    Delta,
}

/// How a wait for a subscription's first response ended (the init manager's steps end on
/// any of these).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitialFetch {
    /// The first response was accepted by the handler.
    Applied,
    /// The first response was NACKed; the handler's message.
    Rejected(String),
    /// An established ADS stream failed (or the control plane ended it) before the first
    /// response. A control plane that cannot be reached at all is not a failure: the client
    /// keeps retrying and the wait ends on the timeout, as in Envoy.
    Failed(String),
    /// `initial_fetch_timeout` elapsed first.
    TimedOut,
}

impl InitialFetch {
    pub fn is_applied(&self) -> bool {
        matches!(self, Self::Applied)
    }
}

/// Envoy's default `initial_fetch_timeout`.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Reconnect backoff: first delay bound and cap (Envoy's defaults for xDS streams).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything [`XdsClient::new`] needs. Build with [`XdsClientConfig::new`] and adjust fields.
#[derive(Clone, Debug)]
pub struct XdsClientConfig {
    /// The control plane's gRPC address as a URI, e.g. `http://127.0.0.1:18000` (plaintext
    /// HTTP/2).
    pub endpoint: String,
    /// Sent on the first request of every stream.
    pub node: Node,
    pub mode: XdsMode,
    /// Default for [`XdsClient::initial_fetch`]; `None` or zero waits forever.
    pub initial_fetch_timeout: Option<Duration>,
    /// Reconnect delays are drawn uniformly from `[0, min(backoff_max, backoff_base · 2ⁿ)]`
    /// (full jitter) for the n-th consecutive failure; a stream that delivered a response
    /// resets n.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
}

impl XdsClientConfig {
    /// State of the world, Envoy's default timeouts and backoff.
    pub fn new(endpoint: impl Into<String>, node: Node) -> Self {
        Self {
            endpoint: endpoint.into(),
            node,
            mode: XdsMode::Sotw,
            initial_fetch_timeout: Some(DEFAULT_INITIAL_FETCH_TIMEOUT),
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// The stat prefix of a type's `update_*` counters: Envoy's names where Envoy has one
/// (`cluster_manager.cds.`, `listener_manager.lds.`). Envoy keeps EDS and RDS stats per
/// cluster / per route configuration; a type-level client reports them as
/// `cluster_manager.eds.` and `listener_manager.rds.`; other types as `xds.<message name>.`.
pub fn stat_prefix(type_url: &str) -> String {
    match type_url {
        CLUSTER_TYPE => "cluster_manager.cds".to_string(),
        ENDPOINT_TYPE => "cluster_manager.eds".to_string(),
        LISTENER_TYPE => "listener_manager.lds".to_string(),
        ROUTE_TYPE => "listener_manager.rds".to_string(),
        other => {
            let message = other.rsplit(['/', '.']).next().unwrap_or(other);
            format!("xds.{message}")
        }
    }
}

/// Types for which an empty first request means "everything" (`xds_protocol`'s legacy
/// wildcard); other types subscribe to everything with an explicit `*`.
fn is_legacy_wildcard_type(type_url: &str) -> bool {
    type_url == CLUSTER_TYPE || type_url == LISTENER_TYPE
}

/// Subscribed type URLs in [`REQUEST_ORDER`], then the rest by name.
fn request_order<'a>(types: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut known: Vec<String> = Vec::new();
    let mut other: Vec<String> = Vec::new();
    for t in types {
        if REQUEST_ORDER.contains(&t.as_str()) {
            known.push(t.clone());
        } else {
            other.push(t.clone());
        }
    }
    known.sort_by_key(|t| REQUEST_ORDER.iter().position(|k| k == t));
    other.sort();
    known.extend(other);
    known
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_out_make_before_break() {
        let types = [
            "z".to_string(),
            ROUTE_TYPE.to_string(),
            LISTENER_TYPE.to_string(),
            CLUSTER_TYPE.to_string(),
            ENDPOINT_TYPE.to_string(),
            "a".to_string(),
        ];
        assert_eq!(
            request_order(types.iter()),
            vec![
                CLUSTER_TYPE,
                ENDPOINT_TYPE,
                LISTENER_TYPE,
                ROUTE_TYPE,
                "a",
                "z"
            ]
        );
    }

    #[test]
    fn stat_prefixes_use_envoy_names() {
        assert_eq!(stat_prefix(CLUSTER_TYPE), "cluster_manager.cds");
        assert_eq!(stat_prefix(LISTENER_TYPE), "listener_manager.lds");
        assert_eq!(
            stat_prefix("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"),
            "xds.Secret"
        );
    }
}
