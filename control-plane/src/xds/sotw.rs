//! State-of-the-world xDS (`StreamAggregatedResources`, `StreamClusters`, …): per-type
//! subscription, version, nonce and ACK/NACK state of one stream, following Envoy's
//! `xds_protocol`.
//!
//! Rules kept here:
//! * Every response carries the full set of the type the client subscribes to (CDS/LDS:
//!   wildcard; EDS/RDS: only the requested names that exist) and a fresh nonce; its version is
//!   the content hash of exactly that set, so an unchanged set is never pushed again.
//! * A request whose `response_nonce` is not the latest one sent for its type is stale and is
//!   ignored entirely. Otherwise the first request echoing a nonce is its ACK (no
//!   `error_detail`) or NACK (`error_detail`: logged, counted, recorded; the rejected version is
//!   not resent — only a different set is sent).
//! * After any accepted request the subscription is the request's `resource_names`; if the
//!   selected set differs from what was last sent (e.g. EDS names added after CDS), it is sent.
//! * A client resuming with `version_info` on a new stream is not resent that version.
//! * On a source change every subscribed type is re-evaluated in push order CDS → EDS → LDS →
//!   RDS; clusters that disappear are removed last (first a CDS response that still carries
//!   them, then the other types, then the final CDS).
//!
//! Must not: answer stale requests, send a version a client has NACKed again, or send
//! anything when nothing a client subscribes to changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use tonic::Status;

use super::stream::{Protocol, StreamCtx, WILDCARD, is_wildcard_type, push_order, select};
use super::version::{next_nonce, set_version};
use super::{CLUSTER_TYPE, Resources};

/// One type URL's state on one SotW stream.
#[derive(Default)]
struct TypeState {
    /// Subscribed to every resource of the type.
    wildcard: bool,
    /// Explicitly subscribed names (without `*`).
    names: BTreeSet<String>,
    /// The client has sent explicit names before: an empty list now means "none", not the
    /// legacy wildcard.
    named_before: bool,
    /// The nonce of the latest response sent for this type.
    nonce: Option<String>,
    /// The latest nonce was already ACKed/NACKed (later requests with it only change the
    /// subscription).
    nonce_answered: bool,
    /// The version of the latest response sent, or the version the client said it holds when
    /// it resumed on this stream.
    version: Option<String>,
    /// Names in the latest response and the snapshot it came from (to keep removed clusters
    /// until the rest of a push is out).
    sent_names: BTreeSet<String>,
    sent_from: Arc<Resources>,
}

impl TypeState {
    fn subscribe(&mut self, type_url: &str, names: &[String]) {
        if names.is_empty() {
            self.wildcard = is_wildcard_type(type_url) && !self.named_before;
            self.names.clear();
        } else {
            self.named_before = true;
            self.wildcard = names.iter().any(|n| n == WILDCARD);
            self.names = names.iter().filter(|n| *n != WILDCARD).cloned().collect();
        }
    }

    /// Sends `resources` if they differ from what the client has.
    fn respond(
        &mut self,
        ctx: &StreamCtx,
        type_url: &str,
        resources: Vec<(&String, &Any)>,
    ) -> Option<DiscoveryResponse> {
        let version = set_version(type_url, resources.iter().copied());
        let send = match &self.version {
            Some(previous) => *previous != version,
            // Wildcard subscribers get a first (possibly empty) response; they wait for it to
            // finish initializing. Named subscribers are answered once a name exists.
            None => self.wildcard || !resources.is_empty(),
        };
        if !send {
            ctx.on_unchanged(type_url, &version);
            return None;
        }
        let nonce = next_nonce();
        ctx.on_response(type_url, &version, &nonce, resources.len(), 0);
        self.sent_names = resources.iter().map(|(n, _)| (*n).clone()).collect();
        self.sent_from = ctx.snapshot.clone();
        self.nonce = Some(nonce.clone());
        self.nonce_answered = false;
        self.version = Some(version.clone());
        Some(DiscoveryResponse {
            version_info: version,
            resources: resources.into_iter().map(|(_, any)| any.clone()).collect(),
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        })
    }
}

/// The SotW protocol state of one stream.
#[derive(Default)]
pub(crate) struct Sotw {
    types: BTreeMap<String, TypeState>,
}

impl Sotw {
    pub(crate) fn new() -> Self {
        Self::default()
    }
}

impl Protocol for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const NAME: &'static str = "sotw";

    fn take_node(request: &mut DiscoveryRequest) -> Option<Node> {
        request.node.take()
    }

    fn on_request(
        &mut self,
        ctx: &StreamCtx,
        request: DiscoveryRequest,
        out: &mut Vec<DiscoveryResponse>,
    ) -> Result<(), Status> {
        let type_url = ctx.resolve_type(&request.type_url)?;
        let st = self.types.entry(type_url.clone()).or_default();
        if let Some(latest) = &st.nonce {
            if request.response_nonce != *latest {
                ctx.on_stale(&type_url, &request.response_nonce, latest);
                return Ok(());
            }
            if !st.nonce_answered {
                st.nonce_answered = true;
                let sent = st.version.as_deref().unwrap_or("");
                match &request.error_detail {
                    Some(error) => ctx.on_nack(&type_url, sent, latest, error),
                    None => ctx.on_ack(&type_url, &request.version_info, latest),
                }
            }
        } else if st.version.is_none() && !request.version_info.is_empty() {
            // A client resuming on a new stream already holds this version.
            st.version = Some(request.version_info.clone());
        }
        st.subscribe(&type_url, &request.resource_names);
        let resources = select(ctx.of_type(&type_url), st.wildcard, &st.names);
        out.extend(st.respond(ctx, &type_url, resources));
        Ok(())
    }

    fn on_change(&mut self, ctx: &StreamCtx, out: &mut Vec<DiscoveryResponse>) {
        let multi_type = self.types.len() > 1;
        let mut final_cds = false;
        for type_url in push_order(self.types.keys()) {
            let Some(st) = self.types.get_mut(&type_url) else {
                continue;
            };
            let selected = select(ctx.of_type(&type_url), st.wildcard, &st.names);
            if type_url == CLUSTER_TYPE && multi_type {
                // Make-before-break: clusters that are going away stay until the listeners
                // and routes that may still use them have been replaced.
                let previous = st.sent_from.clone();
                let kept: BTreeSet<&String> = selected.iter().map(|(n, _)| *n).collect();
                let old = previous.by_type.get(CLUSTER_TYPE);
                let stale: Vec<(&String, &Any)> = st
                    .sent_names
                    .iter()
                    .filter(|n| !kept.contains(n))
                    .filter_map(|n| old.and_then(|m| m.get_key_value(n)))
                    .collect();
                if !stale.is_empty() {
                    let union: BTreeMap<&String, &Any> =
                        selected.into_iter().chain(stale).collect();
                    out.extend(st.respond(ctx, &type_url, union.into_iter().collect()));
                    final_cds = true;
                    continue;
                }
            }
            out.extend(st.respond(ctx, &type_url, selected));
        }
        if final_cds && let Some(st) = self.types.get_mut(CLUSTER_TYPE) {
            let selected = select(ctx.of_type(CLUSTER_TYPE), st.wildcard, &st.names);
            out.extend(st.respond(ctx, CLUSTER_TYPE, selected));
        }
    }
}
