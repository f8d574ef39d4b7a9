//! The stream engine every xDS service shares: one task per gRPC stream that reads requests,
//! watches the [`ResourceSource`] for changes and writes responses.
//!
//! Owns what is common to state-of-the-world and delta streams — the node (sent on the first
//! request only), the stream's current resource snapshot, type-URL scoping (ADS carries any
//! type; a standalone CDS/EDS/LDS/RDS stream is the same engine restricted to one type URL),
//! ACK/NACK accounting, push order and shutdown. The protocol specifics live in
//! `sotw` and `delta` behind the [`Protocol`] trait.
//!
//! Must not: panic or `unwrap` on anything a client sent (bad input ends the stream with a
//! gRPC status), block on a slow client while holding shared state, or call the source for
//! nodes that have not said who they are.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{Instrument, debug, info_span, warn};

use super::acks::AckRegistry;
use super::nacks::{NackLog, NackRecord};
use super::stats::XdsStats;
use super::{CLUSTER_TYPE, LISTENER_TYPE, PUSH_ORDER, ResourceSource, Resources};

/// Responses buffered per stream before the engine waits for the client to read.
const RESPONSE_BUFFER: usize = 16;

/// The resource name that subscribes to every resource of a type.
pub(crate) const WILDCARD: &str = "*";

/// Everything the streams of one server share.
pub(crate) struct Shared {
    pub(crate) source: Arc<dyn ResourceSource>,
    pub(crate) stats: Arc<XdsStats>,
    pub(crate) nacks: Arc<NackLog>,
    pub(crate) acks: Arc<AckRegistry>,
    /// Numbers streams for the ACK registry.
    pub(crate) next_stream: std::sync::atomic::AtomicU64,
    /// Becomes `true` (or its sender is dropped) when the server shuts down.
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Which type URLs a stream may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// ADS: any type URL, which every request must name.
    Aggregated,
    /// A standalone service (CDS, EDS, …): only this type URL; requests may leave it empty.
    Only(&'static str),
}

/// Per-stream state common to both protocol variants.
pub(crate) struct StreamCtx {
    pub(crate) shared: Arc<Shared>,
    pub(crate) scope: Scope,
    /// Set from the first request (Envoy sends the node only once per stream).
    node: Option<Node>,
    /// The node's resources as of the last change this stream saw.
    pub(crate) snapshot: Arc<Resources>,
    /// This stream's number in the ACK registry.
    pub(crate) id: u64,
    /// (type URL, nonce, store generation) of the latest responses, to map ACKs and NACKs back
    /// to the generation they accept or reject.
    pub(crate) sent: std::sync::Mutex<std::collections::VecDeque<(String, String, u64)>>,
    /// Type URL → the version the proxy last ACKed.
    pub(crate) acked_versions: std::sync::Mutex<BTreeMap<String, String>>,
}

/// Responses remembered per stream for ACK attribution (a few per type suffice: proxies ACK
/// the latest nonce).
const SENT_REMEMBERED: usize = 32;

impl Drop for StreamCtx {
    fn drop(&mut self) {
        self.shared.acks.remove(self.id);
    }
}

impl StreamCtx {
    pub(crate) fn node_id(&self) -> &str {
        self.node.as_ref().map(|n| n.id.as_str()).unwrap_or("")
    }

    /// The type URL a request is about, or the status that ends the stream.
    pub(crate) fn resolve_type(&self, type_url: &str) -> Result<String, Status> {
        match self.scope {
            Scope::Aggregated if type_url.is_empty() => {
                Err(Status::invalid_argument("ADS requests must set type_url"))
            }
            Scope::Aggregated => Ok(type_url.to_string()),
            Scope::Only(only) if type_url.is_empty() || type_url == only => Ok(only.to_string()),
            Scope::Only(only) => Err(Status::invalid_argument(format!(
                "this service serves only {only}, not {type_url}; use ADS for several types"
            ))),
        }
    }

    fn refresh(&mut self) {
        if let Some(node) = &self.node {
            self.snapshot = self.shared.source.resources_for(node);
        }
    }

    /// The resources of one type in the current snapshot.
    pub(crate) fn of_type(&self, type_url: &str) -> Option<&BTreeMap<String, Any>> {
        self.snapshot.by_type.get(type_url)
    }

    fn generation_of(&self, type_url: &str, nonce: &str) -> Option<u64> {
        self.sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|(t, n, _)| t == type_url && n == nonce)
            .map(|(_, _, g)| *g)
    }

    /// A push found nothing new to send for `type_url` (its content is `version`): if the proxy
    /// ACKed that version, it runs the current generation's configuration for this type.
    pub(crate) fn on_unchanged(&self, type_url: &str, version: &str) {
        let acked = self
            .acked_versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(type_url)
            .is_some_and(|v| v == version);
        if acked {
            self.shared
                .acks
                .ack(self.id, self.node_id(), type_url, self.snapshot.generation);
        }
    }

    pub(crate) fn on_ack(&self, type_url: &str, version: &str, nonce: &str) {
        self.shared.stats.ack();
        self.acked_versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(type_url.to_string(), version.to_string());
        if let Some(generation) = self.generation_of(type_url, nonce) {
            self.shared
                .acks
                .ack(self.id, self.node_id(), type_url, generation);
        }
        debug!(node = self.node_id(), type_url, version, nonce, "ACK");
    }

    pub(crate) fn on_nack(
        &self,
        type_url: &str,
        rejected_version: &str,
        nonce: &str,
        error: &RpcStatus,
    ) {
        self.shared.stats.nack();
        if let Some(generation) = self.generation_of(type_url, nonce) {
            self.shared.acks.nack(
                self.id,
                self.node_id(),
                type_url,
                generation,
                &error.message,
            );
        }
        warn!(
            node = self.node_id(),
            type_url,
            rejected_version,
            nonce,
            code = error.code,
            error = %error.message,
            "NACK: proxy rejected configuration; not resending this version"
        );
        self.shared.nacks.record(NackRecord {
            node_id: self.node_id().to_string(),
            type_url: type_url.to_string(),
            rejected_version: rejected_version.to_string(),
            nonce: nonce.to_string(),
            message: error.message.clone(),
            at: SystemTime::now(),
        });
    }

    pub(crate) fn on_stale(&self, type_url: &str, nonce: &str, latest: &str) {
        debug!(
            node = self.node_id(),
            type_url, nonce, latest, "ignoring request with stale nonce"
        );
    }

    pub(crate) fn on_response(
        &self,
        type_url: &str,
        version: &str,
        nonce: &str,
        resources: usize,
        removed: usize,
    ) {
        self.shared.stats.response_sent(type_url);
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        if sent.len() >= SENT_REMEMBERED {
            sent.pop_front();
        }
        sent.push_back((
            type_url.to_string(),
            nonce.to_string(),
            self.snapshot.generation,
        ));
        drop(sent);
        debug!(
            node = self.node_id(),
            type_url, version, nonce, resources, removed, "response"
        );
    }
}

/// Whether an empty first request for `type_url` means "everything" (legacy wildcard).
/// CDS and LDS are wildcard services; EDS, RDS and everything else are named.
pub(crate) fn is_wildcard_type(type_url: &str) -> bool {
    type_url == CLUSTER_TYPE || type_url == LISTENER_TYPE
}

/// Orders subscribed type URLs for a push: [`PUSH_ORDER`] (CDS → EDS → LDS → RDS,
/// make-before-break) first, then any other type in name order.
pub(crate) fn push_order<'a>(subscribed: impl Iterator<Item = &'a String>) -> Vec<String> {
    let subscribed: BTreeSet<&String> = subscribed.collect();
    let mut order: Vec<String> = PUSH_ORDER
        .iter()
        .filter(|t| subscribed.iter().any(|s| s == *t))
        .map(|t| t.to_string())
        .collect();
    order.extend(
        subscribed
            .into_iter()
            .filter(|s| !PUSH_ORDER.contains(&s.as_str()))
            .cloned(),
    );
    order
}

/// The resources a subscription selects from `available`, in name order.
pub(crate) fn select<'a>(
    available: Option<&'a BTreeMap<String, Any>>,
    wildcard: bool,
    names: &BTreeSet<String>,
) -> Vec<(&'a String, &'a Any)> {
    let Some(available) = available else {
        return Vec::new();
    };
    if wildcard {
        available.iter().collect()
    } else if names.len() < available.len() {
        names
            .iter()
            .filter_map(|n| available.get_key_value(n))
            .collect()
    } else {
        available
            .iter()
            .filter(|(n, _)| names.contains(*n))
            .collect()
    }
}

/// One protocol variant (state of the world or delta) driven by [`spawn_stream`].
pub(crate) trait Protocol: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// "sotw" or "delta", for logs.
    const NAME: &'static str;

    /// The node a request carries, if any.
    fn take_node(request: &mut Self::Request) -> Option<Node>;
    /// Handles one request; responses to send go to `out`. An error ends the stream.
    fn on_request(
        &mut self,
        ctx: &StreamCtx,
        request: Self::Request,
        out: &mut Vec<Self::Response>,
    ) -> Result<(), Status>;
    /// The source changed and `ctx.snapshot` is fresh: push what changed, in push order.
    fn on_change(&mut self, ctx: &StreamCtx, out: &mut Vec<Self::Response>);
}

static STREAM_IDS: AtomicU64 = AtomicU64::new(1);

/// Starts the task serving one stream and returns the stream of responses for tonic.
pub(crate) fn spawn_stream<P, S>(
    shared: Arc<Shared>,
    scope: Scope,
    requests: S,
    protocol: P,
) -> ReceiverStream<Result<P::Response, Status>>
where
    P: Protocol,
    S: Stream<Item = Result<P::Request, Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
    let id = STREAM_IDS.fetch_add(1, Ordering::Relaxed);
    let scope_name = match scope {
        Scope::Aggregated => "ads",
        Scope::Only(t) => t,
    };
    let span = info_span!("xds_stream", id, protocol = P::NAME, scope = scope_name);
    let on_panic = tx.clone();
    let engine =
        tokio::spawn(run_stream(shared, scope, requests, protocol, tx).instrument(span.clone()));
    // Without this a panicking engine would end the stream with grpc-status OK.
    tokio::spawn(
        async move {
            if let Err(error) = engine.await
                && error.is_panic()
            {
                tracing::error!("xDS stream engine panicked; ending the stream with INTERNAL");
                let _ = on_panic
                    .send(Err(Status::internal("xDS stream engine failed")))
                    .await;
            }
        }
        .instrument(span),
    );
    ReceiverStream::new(rx)
}

async fn run_stream<P, S>(
    shared: Arc<Shared>,
    scope: Scope,
    requests: S,
    mut protocol: P,
    tx: mpsc::Sender<Result<P::Response, Status>>,
) where
    P: Protocol,
    S: Stream<Item = Result<P::Request, Status>> + Send + 'static,
{
    let _guard = shared.stats.stream_opened();
    // Subscribe before the first `resources_for`, so no change can slip in between.
    let mut changes = shared.source.changes();
    changes.borrow_and_update();
    let mut changes_open = true;
    let mut shutdown = shared.shutdown.clone();
    let mut requests = Box::pin(requests);
    let mut ctx = StreamCtx {
        shared: shared.clone(),
        scope,
        node: None,
        snapshot: Arc::new(Resources::default()),
        id: shared
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        sent: Default::default(),
        acked_versions: Default::default(),
    };
    let mut out: Vec<P::Response> = Vec::new();
    debug!("stream opened");

    let end: Option<Status> = loop {
        if *shutdown.borrow_and_update() {
            break Some(Status::unavailable("control plane shutting down"));
        }
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break Some(Status::unavailable("control plane shutting down"));
                }
                continue;
            }
            _ = tx.closed() => break None,
            request = requests.next() => match request {
                None => break None,
                Some(Err(status)) => {
                    debug!(node = ctx.node_id(), %status, "request stream failed");
                    break None;
                }
                Some(Ok(mut request)) => {
                    if ctx.node.is_none() {
                        let node = P::take_node(&mut request).unwrap_or_else(|| {
                            warn!("first request of the stream carries no node; serving it as an anonymous node");
                            Node::default()
                        });
                        debug!(node = %node.id, cluster = %node.cluster, "node identified");
                        ctx.node = Some(node);
                        ctx.refresh();
                    }
                    if let Err(status) = protocol.on_request(&ctx, request, &mut out) {
                        warn!(node = ctx.node_id(), %status, "ending stream after a bad request");
                        break Some(status);
                    }
                }
            },
            changed = changes.changed(), if changes_open => match changed {
                Ok(()) => {
                    changes.borrow_and_update();
                    if ctx.node.is_some() {
                        ctx.refresh();
                        protocol.on_change(&ctx, &mut out);
                    }
                }
                Err(_) => {
                    // The source is gone: keep serving what we have; nothing will change.
                    changes_open = false;
                }
            },
        }
        for response in out.drain(..) {
            if tx.send(Ok(response)).await.is_err() {
                debug!(node = ctx.node_id(), "client went away");
                return;
            }
        }
    };
    if let Some(status) = end {
        let _ = tx.send(Err(status)).await;
    }
    debug!(node = ctx.node_id(), "stream closed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::{ENDPOINT_TYPE, ROUTE_TYPE};

    #[test]
    fn push_order_is_make_before_break() {
        let subscribed = [
            ROUTE_TYPE.to_string(),
            "z".to_string(),
            CLUSTER_TYPE.to_string(),
            ENDPOINT_TYPE.to_string(),
        ];
        assert_eq!(
            push_order(subscribed.iter()),
            vec![
                CLUSTER_TYPE.to_string(),
                ENDPOINT_TYPE.to_string(),
                ROUTE_TYPE.to_string(),
                "z".to_string()
            ]
        );
    }

    #[test]
    fn scope_checks_type_url() {
        let (_tx, rx) = watch::channel(false);
        struct Empty;
        impl ResourceSource for Empty {
            fn resources_for(&self, _: &Node) -> Arc<Resources> {
                Arc::default()
            }
            fn changes(&self) -> watch::Receiver<u64> {
                watch::channel(0).1
            }
        }
        let shared = Arc::new(Shared {
            source: Arc::new(Empty),
            stats: Arc::default(),
            nacks: Arc::default(),
            acks: Arc::default(),
            next_stream: Default::default(),
            shutdown: rx,
        });
        let ctx = StreamCtx {
            shared,
            scope: Scope::Only(CLUSTER_TYPE),
            node: None,
            snapshot: Arc::default(),
            id: 0,
            sent: Default::default(),
            acked_versions: Default::default(),
        };
        assert_eq!(ctx.resolve_type("").ok().as_deref(), Some(CLUSTER_TYPE));
        assert!(ctx.resolve_type(ENDPOINT_TYPE).is_err());
        let mut ctx = ctx;
        ctx.scope = Scope::Aggregated;
        assert!(ctx.resolve_type("").is_err());
    }
}
