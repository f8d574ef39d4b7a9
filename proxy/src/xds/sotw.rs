//! State-of-the-world ADS (`StreamAggregatedResources`): what one stream sends, following
//! Envoy's `xds_protocol`.
//!
//! Rules kept here:
//! * The node goes on the first request of the stream only.
//! * A subscription's first request carries its names (CDS/LDS wildcard: an empty list — the
//!   legacy wildcard — or `*` once explicit names were sent on the stream; other types `*`)
//!   and `version_info` = the last accepted version, so a control plane that still has that
//!   version need not send it again after a reconnect.
//! * Every request carries the nonce of the latest response of its type (a server ignores a
//!   request with a stale nonce), so a subscription change that crosses a response is
//!   repeated by that response's ACK, which always carries the current names.
//! * ACK: the response's `version_info` and nonce. NACK: the previous accepted
//!   `version_info`, the response's nonce and `error_detail` (`INVALID_ARGUMENT`, the
//!   handler's message). A response for a type that is not subscribed is ignored.
//!
//! Must not: call the handler for a response that failed the protocol checks, or send a
//! request whose names differ from the subscription it claims to carry.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;
use tracing::warn;

use super::client::{Accepted, AdsClient, Inner, Protocol};
use super::{SubscriptionNames, is_legacy_wildcard_type, resource};

/// One type's state on one stream.
#[derive(Default)]
struct StreamType {
    /// The latest response's nonce.
    nonce: String,
    /// The subscription as last sent on this stream.
    sent: Option<SubscriptionNames>,
    /// Explicit names went out on this stream: an empty list would now mean "none".
    named_before: bool,
}

pub(crate) struct Sotw {
    node: Option<Node>,
    types: BTreeMap<String, StreamType>,
}

/// `resource_names` for a subscription.
fn wire_names(type_url: &str, names: &SubscriptionNames, named_before: bool) -> Vec<String> {
    match names {
        SubscriptionNames::Wildcard if is_legacy_wildcard_type(type_url) && !named_before => {
            Vec::new()
        }
        SubscriptionNames::Wildcard => vec!["*".to_string()],
        SubscriptionNames::Names(names) => names.iter().cloned().collect(),
    }
}

impl Sotw {
    fn request(
        &mut self,
        type_url: &str,
        names: &SubscriptionNames,
        version_info: String,
        error_detail: Option<RpcStatus>,
    ) -> DiscoveryRequest {
        let node = self.node.take();
        let st = self.types.entry(type_url.to_string()).or_default();
        let resource_names = wire_names(type_url, names, st.named_before);
        st.named_before |= !resource_names.is_empty();
        st.sent = Some(names.clone());
        DiscoveryRequest {
            version_info,
            node,
            resource_names,
            type_url: type_url.to_string(),
            response_nonce: st.nonce.clone(),
            error_detail,
            ..Default::default()
        }
    }
}

impl Protocol for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn new(node: Node) -> Self {
        Self {
            node: Some(node),
            types: BTreeMap::new(),
        }
    }

    async fn open(
        mut client: AdsClient,
        requests: UnboundedReceiverStream<DiscoveryRequest>,
    ) -> Result<Streaming<DiscoveryResponse>, tonic::Status> {
        Ok(client
            .stream_aggregated_resources(requests)
            .await?
            .into_inner())
    }

    fn subscription_requests(&mut self, inner: &Inner) -> Vec<DiscoveryRequest> {
        let mut out = Vec::new();
        inner.for_each_subscription(|sub| {
            let sent = self.types.get(sub.type_url).and_then(|s| s.sent.as_ref());
            let unchanged = match sent {
                Some(sent) => sent == sub.names,
                None => sub.names.is_nothing(),
            };
            if !unchanged {
                out.push(self.request(sub.type_url, sub.names, sub.version.to_string(), None));
            }
        });
        out
    }

    fn on_response(&mut self, inner: &Inner, response: DiscoveryResponse) -> Vec<DiscoveryRequest> {
        let DiscoveryResponse {
            version_info,
            resources,
            type_url,
            nonce,
            ..
        } = response;
        let Some(checked) = inner.with_subscription(&type_url, |names, _| {
            resource::sotw_resources(&type_url, resources, names)
        }) else {
            warn!(
                type_url,
                "ignoring a response for a type that is not subscribed"
            );
            return Vec::new();
        };
        self.types.entry(type_url.clone()).or_default().nonce = nonce;
        inner.response_received(&type_url);
        let outcome = checked
            .map_err(|e| (e.message, e.names))
            .and_then(|resources| {
                let names: Vec<String> = resources.iter().map(|(n, _)| n.clone()).collect();
                match inner.handler.on_sotw(&type_url, &version_info, resources) {
                    Ok(()) => Ok(names),
                    Err(message) => Err((message, names.into_iter().collect())),
                }
            });
        let error_detail = match outcome {
            Ok(names) => {
                inner.accepted(&type_url, &version_info, Accepted::Sotw { names });
                None
            }
            Err((message, names)) => {
                inner.rejected(&type_url, &version_info, names, &message);
                Some(RpcStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message,
                    details: Vec::new(),
                })
            }
        };
        // After `accepted`, the stored version is the new one (ACK); after `rejected` it is
        // still the previous one (NACK). Both carry the current names.
        let Some((names, version)) = inner.with_subscription(&type_url, |names, version| {
            (names.clone(), version.to_string())
        }) else {
            return Vec::new();
        };
        vec![self.request(&type_url, &names, version, error_detail)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::{CLUSTER_TYPE, ENDPOINT_TYPE};

    #[test]
    fn wildcard_is_legacy_empty_only_for_cds_and_lds_before_explicit_names() {
        assert!(wire_names(CLUSTER_TYPE, &SubscriptionNames::Wildcard, false).is_empty());
        assert_eq!(
            wire_names(CLUSTER_TYPE, &SubscriptionNames::Wildcard, true),
            ["*"]
        );
        assert_eq!(
            wire_names(ENDPOINT_TYPE, &SubscriptionNames::Wildcard, false),
            ["*"]
        );
        assert_eq!(
            wire_names(ENDPOINT_TYPE, &SubscriptionNames::names(["b", "a"]), false),
            ["a", "b"]
        );
    }
}
