//! Incremental ("delta") xDS (`DeltaAggregatedResources`, `DeltaClusters`, …): per-type
//! subscriptions and what the client holds, following Envoy's `xds_protocol`.
//!
//! Rules kept here:
//! * The server tracks, per type, which resource versions the client holds (seeded from
//!   `initial_resource_versions` on the first request of a type) and sends only resources
//!   whose version (content hash of the resource) differs, plus `removed_resources` for
//!   resources the client holds that are gone. Every response has a fresh nonce.
//! * CDS and LDS are wildcard when the first request subscribes to nothing (or to `*`); other
//!   types are named. `resource_names_subscribe`/`_unsubscribe` are applied on every request;
//!   names subscribed after the first request are sent even if the client should have them.
//! * A request echoing the latest nonce is that response's ACK (no `error_detail`) or NACK
//!   (logged, counted, recorded; the rejected resources are not resent until they change). A
//!   request echoing an older nonce is stale: it is neither an ACK nor a NACK. Its
//!   subscription changes still apply (delta subscriptions are diffs, dropping them would lose
//!   them) and are answered only if they select something the client lacks.
//! * On a source change every subscribed type is re-evaluated in push order CDS → EDS → LDS →
//!   RDS; removed clusters are announced last.
//!
//! Must not: resend unchanged resources, send anything when nothing changed, or send
//! resources of names the client has not subscribed to (except under wildcard).

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tonic::Status;

use super::CLUSTER_TYPE;
use super::stream::{Protocol, StreamCtx, WILDCARD, is_wildcard_type, push_order, select};
use super::version::{next_nonce, resource_version, set_version};

/// One type URL's state on one delta stream.
#[derive(Default)]
struct TypeState {
    wildcard: bool,
    /// Explicitly subscribed names (without `*`).
    names: BTreeSet<String>,
    /// Resource name → version the client holds, as far as the server knows.
    client: BTreeMap<String, String>,
    /// Names to send in the next response even if the client holds them (re-subscribed).
    forced: BTreeSet<String>,
    nonce: Option<String>,
    nonce_answered: bool,
    /// `system_version_info` of the latest response.
    version: String,
    responded: bool,
}

impl TypeState {
    /// Sends what the client lacks (and, with `include_removals`, what it holds that is gone).
    fn respond(
        &mut self,
        ctx: &StreamCtx,
        type_url: &str,
        include_removals: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let desired = select(ctx.of_type(type_url), self.wildcard, &self.names);
        let mut resources = Vec::new();
        for (name, any) in &desired {
            let version = resource_version(any);
            if self.forced.contains(*name) || self.client.get(*name) != Some(&version) {
                resources.push(Resource {
                    name: (*name).clone(),
                    version,
                    resource: Some((*any).clone()),
                    ..Default::default()
                });
            }
        }
        let removed: Vec<String> = if include_removals {
            let present: BTreeSet<&String> = desired.iter().map(|(n, _)| *n).collect();
            self.client
                .keys()
                .filter(|n| !present.contains(n))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        self.forced.clear();
        // Wildcard subscribers wait for a first response to finish initializing, even an empty one.
        let first_wildcard = self.wildcard && !self.responded;
        if resources.is_empty() && removed.is_empty() && !first_wildcard {
            if self.responded {
                ctx.on_unchanged(type_url, &set_version(type_url, desired.iter().copied()));
            }
            return None;
        }
        for resource in &resources {
            self.client
                .insert(resource.name.clone(), resource.version.clone());
        }
        for name in &removed {
            self.client.remove(name);
        }
        let version = set_version(type_url, desired.iter().copied());
        let nonce = next_nonce();
        ctx.on_response(type_url, &version, &nonce, resources.len(), removed.len());
        self.nonce = Some(nonce.clone());
        self.nonce_answered = false;
        self.version = version.clone();
        self.responded = true;
        Some(DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        })
    }
}

/// The delta protocol state of one stream.
#[derive(Default)]
pub(crate) struct Delta {
    types: BTreeMap<String, TypeState>,
}

impl Delta {
    pub(crate) fn new() -> Self {
        Self::default()
    }
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    fn take_node(request: &mut DeltaDiscoveryRequest) -> Option<Node> {
        request.node.take()
    }

    fn on_request(
        &mut self,
        ctx: &StreamCtx,
        request: DeltaDiscoveryRequest,
        out: &mut Vec<DeltaDiscoveryResponse>,
    ) -> Result<(), Status> {
        let type_url = ctx.resolve_type(&request.type_url)?;
        let first = !self.types.contains_key(&type_url);
        let st = self.types.entry(type_url.clone()).or_default();

        if first {
            st.client = request
                .initial_resource_versions
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            st.wildcard =
                is_wildcard_type(&type_url) && request.resource_names_subscribe.is_empty();
        } else if !request.initial_resource_versions.is_empty() {
            tracing::debug!(
                node = ctx.node_id(),
                type_url,
                "initial_resource_versions after the first request of a type are ignored"
            );
        }
        for name in &request.resource_names_subscribe {
            if name == WILDCARD {
                st.wildcard = true;
                continue;
            }
            st.names.insert(name.clone());
            // The client may have dropped it and asked again: send it even if we think it has
            // it — unless it told us so on this very first request.
            if !(first && request.initial_resource_versions.contains_key(name)) {
                st.forced.insert(name.clone());
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == WILDCARD {
                st.wildcard = false;
                let names = &st.names;
                st.client.retain(|n, _| names.contains(n));
                continue;
            }
            st.names.remove(name);
            st.forced.remove(name);
            if !st.wildcard {
                st.client.remove(name);
            }
        }

        if !request.response_nonce.is_empty() {
            match &st.nonce {
                Some(latest) if *latest == request.response_nonce => {
                    if !st.nonce_answered {
                        st.nonce_answered = true;
                        match &request.error_detail {
                            Some(error) => ctx.on_nack(&type_url, &st.version, latest, error),
                            None => ctx.on_ack(&type_url, &st.version, latest),
                        }
                    }
                }
                Some(latest) => ctx.on_stale(&type_url, &request.response_nonce, latest),
                None => ctx.on_stale(&type_url, &request.response_nonce, ""),
            }
        }
        out.extend(st.respond(ctx, &type_url, true));
        Ok(())
    }

    fn on_change(&mut self, ctx: &StreamCtx, out: &mut Vec<DeltaDiscoveryResponse>) {
        // With other types on the stream, removed clusters go out after them (make-before-break).
        let defer_cluster_removals = self.types.len() > 1;
        for type_url in push_order(self.types.keys()) {
            if let Some(st) = self.types.get_mut(&type_url) {
                let include_removals = !(defer_cluster_removals && type_url == CLUSTER_TYPE);
                out.extend(st.respond(ctx, &type_url, include_removals));
            }
        }
        if defer_cluster_removals && let Some(st) = self.types.get_mut(CLUSTER_TYPE) {
            out.extend(st.respond(ctx, CLUSTER_TYPE, true));
        }
    }
}
