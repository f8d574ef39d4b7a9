//! Incremental ADS (`DeltaAggregatedResources`): what one stream sends, following Envoy's
//! `xds_protocol`.
//!
//! Rules kept here:
//! * The node goes on the first request of the stream only.
//! * A subscription's first request on a stream carries `resource_names_subscribe` (CDS/LDS
//!   wildcard: empty — the legacy wildcard; other types `*`) and `initial_resource_versions`:
//!   every resource the proxy holds with its version, so the server sends only what changed
//!   (and removals of what went away while disconnected).
//! * Later subscription changes send only the difference (`resource_names_subscribe` /
//!   `resource_names_unsubscribe`), without a nonce (they are not ACKs).
//! * ACK: the response's nonce. NACK: the nonce and `error_detail` (`INVALID_ARGUMENT`, the
//!   handler's message). Per-resource versions are taken from accepted responses only.
//! * A response that adds and removes nothing (e.g. the server's first answer to a wildcard
//!   subscription whose resources the proxy already holds) is ACKed without calling the
//!   handler. Resources without a body (TTL heartbeats) change nothing.
//!
//! Must not: send `initial_resource_versions` for anything the proxy does not hold, or change
//! held versions on a NACK.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;
use tracing::warn;

use super::client::{Accepted, AdsClient, Inner, Protocol};
use super::{SubscriptionNames, is_legacy_wildcard_type, resource};

const WILDCARD: &str = "*";

pub(crate) struct Delta {
    node: Option<Node>,
    /// The subscription of each type as the server knows it on this stream.
    sent: BTreeMap<String, SubscriptionNames>,
}

/// `(subscribe, unsubscribe)` turning `from` into `to`.
fn diff(from: &SubscriptionNames, to: &SubscriptionNames) -> (Vec<String>, Vec<String>) {
    use SubscriptionNames::{Names, Wildcard};
    match (from, to) {
        (Wildcard, Wildcard) => (Vec::new(), Vec::new()),
        (Wildcard, Names(to)) => (to.iter().cloned().collect(), vec![WILDCARD.to_string()]),
        (Names(from), Wildcard) => (vec![WILDCARD.to_string()], from.iter().cloned().collect()),
        (Names(from), Names(to)) => (
            to.difference(from).cloned().collect(),
            from.difference(to).cloned().collect(),
        ),
    }
}

/// `resource_names_subscribe` of a subscription's first request on a stream.
fn initial_names(type_url: &str, names: &SubscriptionNames) -> Vec<String> {
    match names {
        SubscriptionNames::Wildcard if is_legacy_wildcard_type(type_url) => Vec::new(),
        SubscriptionNames::Wildcard => vec![WILDCARD.to_string()],
        SubscriptionNames::Names(names) => names.iter().cloned().collect(),
    }
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn new(node: Node) -> Self {
        Self {
            node: Some(node),
            sent: BTreeMap::new(),
        }
    }

    async fn open(
        mut client: AdsClient,
        requests: UnboundedReceiverStream<DeltaDiscoveryRequest>,
    ) -> Result<Streaming<DeltaDiscoveryResponse>, tonic::Status> {
        Ok(client
            .delta_aggregated_resources(requests)
            .await?
            .into_inner())
    }

    fn subscription_requests(&mut self, inner: &Inner) -> Vec<DeltaDiscoveryRequest> {
        let mut out = Vec::new();
        inner.for_each_subscription(|sub| {
            let request = match self.sent.get(sub.type_url) {
                None if sub.names.is_nothing() => return,
                None => DeltaDiscoveryRequest {
                    resource_names_subscribe: initial_names(sub.type_url, sub.names),
                    initial_resource_versions: sub
                        .held
                        .iter()
                        .map(|(n, v)| (n.clone(), v.clone()))
                        .collect(),
                    ..Default::default()
                },
                Some(sent) => {
                    let (subscribe, unsubscribe) = diff(sent, sub.names);
                    if subscribe.is_empty() && unsubscribe.is_empty() {
                        return;
                    }
                    DeltaDiscoveryRequest {
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
                        ..Default::default()
                    }
                }
            };
            self.sent
                .insert(sub.type_url.to_string(), sub.names.clone());
            out.push(DeltaDiscoveryRequest {
                node: self.node.take(),
                type_url: sub.type_url.to_string(),
                ..request
            });
        });
        out
    }

    fn on_response(
        &mut self,
        inner: &Inner,
        response: DeltaDiscoveryResponse,
    ) -> Vec<DeltaDiscoveryRequest> {
        let DeltaDiscoveryResponse {
            system_version_info,
            resources,
            type_url,
            removed_resources,
            removed_resource_names,
            nonce,
            ..
        } = response;
        if inner.with_subscription(&type_url, |_, _| ()).is_none() {
            warn!(
                type_url,
                "ignoring a response for a type that is not subscribed"
            );
            return Vec::new();
        }
        inner.response_received(&type_url);
        let checked = resource::delta_update(
            &type_url,
            resources,
            removed_resources,
            removed_resource_names,
        );
        let outcome = checked
            .map_err(|e| (e.message, e.names))
            .and_then(|update| {
                let mut versions = Vec::with_capacity(update.updated.len());
                let mut updated: Vec<(String, Any)> = Vec::with_capacity(update.updated.len());
                for (name, version, any) in update.updated {
                    versions.push((name.clone(), version));
                    updated.push((name, any));
                }
                if updated.is_empty() && update.removed.is_empty() {
                    return Ok((versions, update.removed));
                }
                let names: Vec<String> = versions
                    .iter()
                    .map(|(n, _)| n.clone())
                    .chain(update.removed.iter().cloned())
                    .collect();
                match inner
                    .handler
                    .on_delta(&type_url, updated, update.removed.clone())
                {
                    Ok(()) => Ok((versions, update.removed)),
                    Err(message) => Err((message, names.into_iter().collect())),
                }
            });
        let error_detail = match outcome {
            Ok((updated, removed)) => {
                inner.accepted(
                    &type_url,
                    &system_version_info,
                    Accepted::Delta { updated, removed },
                );
                None
            }
            Err((message, names)) => {
                inner.rejected(&type_url, &system_version_info, names, &message);
                Some(RpcStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message,
                    details: Vec::new(),
                })
            }
        };
        vec![DeltaDiscoveryRequest {
            node: self.node.take(),
            type_url,
            response_nonce: nonce,
            error_detail,
            ..Default::default()
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::{CLUSTER_TYPE, ROUTE_TYPE};
    use SubscriptionNames::Wildcard;

    fn names(n: &[&str]) -> SubscriptionNames {
        SubscriptionNames::names(n.iter().copied())
    }

    #[test]
    fn subscription_changes_are_sent_as_differences() {
        assert_eq!(
            diff(&names(&["a", "b"]), &names(&["b", "c"])),
            (vec!["c".to_string()], vec!["a".to_string()])
        );
        assert_eq!(
            diff(&Wildcard, &names(&["a"])),
            (vec!["a".to_string()], vec!["*".to_string()])
        );
        assert_eq!(
            diff(&names(&["a"]), &Wildcard),
            (vec!["*".to_string()], vec!["a".to_string()])
        );
        assert_eq!(diff(&Wildcard, &Wildcard), (vec![], vec![]));
    }

    #[test]
    fn first_request_uses_legacy_wildcard_for_cds_only() {
        assert!(initial_names(CLUSTER_TYPE, &Wildcard).is_empty());
        assert_eq!(initial_names(ROUTE_TYPE, &Wildcard), ["*"]);
        assert_eq!(initial_names(ROUTE_TYPE, &names(&["r"])), ["r"]);
    }
}
