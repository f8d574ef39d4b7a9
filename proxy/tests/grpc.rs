//! gRPC passes through the proxy: a bidirectional stream over h2c downstream and an HTTP/2
//! cluster upstream, messages both ways, and the trailers that carry the gRPC status when the
//! server ends the stream. The gRPC server is the control plane's real xDS server (tonic), the
//! client tonic's generated ADS client.

mod support;

use std::sync::Arc;
use std::time::Duration;

use capstan_control_plane::xds::{CLUSTER_TYPE, ResourceSource, Resources, XdsServer};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::util::pack_any;
use support::*;
use tokio::sync::{mpsc, oneshot, watch};

struct OneCluster(watch::Sender<u64>);

impl ResourceSource for OneCluster {
    fn resources_for(&self, _: &Node) -> Arc<Resources> {
        let mut r = Resources::default();
        let c = Cluster {
            name: "through-the-proxy".into(),
            ..Default::default()
        };
        r.by_type
            .entry(CLUSTER_TYPE.to_string())
            .or_default()
            .insert(c.name.clone(), pack_any(c));
        Arc::new(r)
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

#[tokio::test]
async fn grpc_streams_and_status_trailers_pass_through() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let grpc_port = listener.local_addr().expect("addr").port();
    let server = XdsServer::new(Arc::new(OneCluster(watch::channel(0).0)));
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        let _ = server
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await;
    });

    let port = free_port();
    let h2 = "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: { http2_protocol_options: {} }\n";
    let routes = r#"
name: grpc
virtual_hosts:
- name: all
  domains: ["*"]
  routes:
  - match: { prefix: /envoy.service.discovery.v3.AggregatedDiscoveryService/, grpc: {} }
    route: { cluster: grpc, timeout: 0s }
"#;
    let proxy = Proxy::start(
        &bootstrap(&[static_cluster("grpc", &[grpc_port], h2)], port, routes),
        &[],
    );
    proxy.wait_live().await;

    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect through the proxy");
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "grpc-client".into(),
            ..Default::default()
        }),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await
    .expect("queue request");
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opened through the proxy")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("a response in time")
        .expect("a message, not an error")
        .expect("the stream is open");
    assert_eq!(first.type_url, CLUSTER_TYPE);
    assert_eq!(first.resources.len(), 1);
    let cluster = <Cluster as prost::Message>::decode(first.resources[0].value.as_slice())
        .expect("a Cluster");
    assert_eq!(cluster.name, "through-the-proxy");

    // The client keeps talking on the same stream (an ACK) ...
    tx.send(DiscoveryRequest {
        type_url: CLUSTER_TYPE.into(),
        version_info: first.version_info.clone(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .expect("queue ACK");
    // ... and when the server ends the stream, its gRPC status (sent as trailers) arrives.
    let _ = stop.send(());
    let end = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("the stream ends in time");
    match end {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(
                status.message().contains("shutting down"),
                "the server's grpc-message trailer: {status:?}"
            );
        }
        Ok(other) => panic!("expected the server's UNAVAILABLE status, got {other:?}"),
    }
    let _ = served.await;
    let stats = proxy
        .admin_get("/stats?filter=^cluster\\.grpc\\.upstream_cx_http2_total$")
        .await
        .text();
    assert_eq!(stats, "cluster.grpc.upstream_cx_http2_total: 1\n");
}
