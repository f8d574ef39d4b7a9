//! `DESIGN.md`'s initialization sequence over ADS, step by step, against a scripted ADS
//! server the test answers by hand: nothing about LDS is asked before the first CDS response
//! and the CDS clusters' initialization; held-back CDS and LDS keep `/ready` at 503 with the
//! listener port closed until they arrive; held-back EDS and RDS end on their
//! `initial_fetch_timeout`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use http::StatusCode;
use support::{Backend, HCM, Proxy, accepts, eventually, free_port, get};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const WAIT: Duration = Duration::from_secs(10);

type Responses = mpsc::UnboundedSender<Result<DiscoveryResponse, Status>>;

struct Stream {
    requests: Streaming<DiscoveryRequest>,
    responses: Responses,
}

struct Scripted(mpsc::UnboundedSender<Stream>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for Scripted {
    type StreamAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (responses, rx) = mpsc::unbounded_channel();
        let _ = self.0.send(Stream {
            requests: request.into_inner(),
            responses,
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("state of the world only"))
    }
}

async fn scripted_server() -> (SocketAddr, mpsc::UnboundedReceiver<Stream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(Scripted(tx)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr, rx)
}

impl Stream {
    /// The next request whose type is `type_url` (others, such as ACKs, are skipped).
    async fn next_of(&mut self, type_url: &str) -> DiscoveryRequest {
        loop {
            match tokio::time::timeout(WAIT, self.requests.message()).await {
                Ok(Ok(Some(r))) if r.type_url == type_url => return r,
                Ok(Ok(Some(_))) => continue,
                other => panic!("expected a {type_url} request, got {other:?}"),
            }
        }
    }

    /// Types requested within `window`.
    async fn requested_within(&mut self, window: Duration) -> Vec<String> {
        let mut types = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Ok(Some(r))) = tokio::time::timeout_at(deadline, self.requests.message()).await
        {
            types.push(r.type_url);
        }
        types
    }

    fn respond(&self, type_url: &str, version: &str, resources: Vec<Any>) {
        let _ = self.responses.send(Ok(DiscoveryResponse {
            version_info: version.into(),
            resources,
            type_url: type_url.into(),
            nonce: format!("{type_url}-{version}"),
            ..Default::default()
        }));
    }
}

fn yaml<M: prost::Message + prost::Name + Default>(text: &str) -> Any {
    pack_any(capstan_proto::from_yaml::<M>(text).expect("test resource parses"))
}

fn bootstrap(xds: SocketAddr) -> String {
    bootstrap_with(
        xds,
        "  lds_config: { ads: {}, initial_fetch_timeout: 30s }\n",
        "",
    )
}

/// `lds` is the `lds_config` line (or nothing); `statics` more static resources.
fn bootstrap_with(xds: SocketAddr, lds: &str, statics: &str) -> String {
    format!(
        r#"node: {{ id: proxy-0.default, cluster: proxy }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: ADMIN_PORT }} }} }}
dynamic_resources:
  ads_config: {{ api_type: GRPC, grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}] }}
  cds_config: {{ ads: {{}}, initial_fetch_timeout: 30s }}
{lds}static_resources:
  clusters:
  - name: xds
    type: STATIC
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
{statics}"#,
        port = xds.port()
    )
}

fn listener(port: u16, routes: &str) -> Any {
    yaml::<Listener>(&format!(
        r#"name: outbound
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": {HCM}
      stat_prefix: outbound
{routes}"#
    ))
}

async fn state(proxy: &Proxy) -> Option<(StatusCode, String)> {
    proxy.ready().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_back_cds_then_lds_keep_the_proxy_initializing_in_order() {
    let backend = Backend::start("a").await;
    let (xds, mut streams) = scripted_server().await;
    let port = free_port();
    let proxy = Proxy::start(&bootstrap(xds), &["--drain-time-s", "1"]);
    let mut stream = tokio::time::timeout(WAIT, streams.recv())
        .await
        .expect("stream")
        .expect("server");

    // CDS is asked for; LDS is not, while CDS is held back.
    stream.next_of(CDS).await;
    let early = stream.requested_within(Duration::from_millis(500)).await;
    assert!(!early.iter().any(|t| t == LDS), "LDS before CDS: {early:?}");
    let (status, s) = state(&proxy).await.expect("admin");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(s, "PRE_INITIALIZING");
    assert!(!accepts(port).await);

    // The first CDS response: a STATIC cluster. Only now does LDS get subscribed.
    let cluster = yaml::<Cluster>(&format!(
        "name: local\ntype: STATIC\nload_assignment: {{ cluster_name: local, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }}] }}] }}\n",
        backend.port()
    ));
    stream.respond(CDS, "1", vec![cluster]);
    stream.next_of(LDS).await;
    let (status, s) = state(&proxy).await.expect("admin");
    assert_eq!(
        (status, s.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "INITIALIZING")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!accepts(port).await, "LDS held back: nothing listens");

    // The first LDS response: LIVE, and the listener serves.
    stream.respond(
        LDS,
        "1",
        vec![listener(
            port,
            "      route_config: { virtual_hosts: [{ name: all, domains: [\"*\"], routes: [{ match: { prefix: / }, route: { cluster: local } }] }] }\n",
        )],
    );
    proxy.wait_live().await;
    assert_eq!(get(port, "svc", "/").await.backend().as_deref(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_back_eds_and_rds_end_on_their_initial_fetch_timeout() {
    let (xds, mut streams) = scripted_server().await;
    let port = free_port();
    let proxy = Proxy::start(&bootstrap(xds), &["--drain-time-s", "1"]);
    let mut stream = tokio::time::timeout(WAIT, streams.recv())
        .await
        .expect("stream")
        .expect("server");
    stream.next_of(CDS).await;
    stream.respond(
        CDS,
        "1",
        vec![yaml::<Cluster>(
            "name: web\ntype: EDS\neds_cluster_config: { eds_config: { ads: {}, initial_fetch_timeout: 1s } }\n",
        )],
    );
    let eds = stream.next_of(EDS).await;
    assert_eq!(eds.resource_names, vec!["web".to_string()]);
    // EDS never answers: the cluster initializes on its 1 s timeout, then LDS is asked for.
    let started = tokio::time::Instant::now();
    stream.next_of(LDS).await;
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    stream.respond(
        LDS,
        "1",
        vec![listener(
            port,
            "      rds: { route_config_name: routes, config_source: { ads: {}, initial_fetch_timeout: 1s } }\n",
        )],
    );
    let rds = stream.next_of(RDS).await;
    assert_eq!(rds.resource_names, vec!["routes".to_string()]);
    let (status, _) = state(&proxy).await.expect("admin");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // RDS never answers: the listener is warm after 1 s, with no routes (404, as Envoy).
    assert!(
        eventually(
            WAIT,
            async || matches!(state(&proxy).await, Some((s, _)) if s == StatusCode::OK)
        )
        .await
    );
    assert_eq!(get(port, "svc", "/").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_static_listener_asks_for_its_routes_only_after_the_clusters_and_warms_on_them() {
    let backend = Backend::start("a").await;
    let (xds, mut streams) = scripted_server().await;
    let port = free_port();
    let statics = format!(
        r#"  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: ingress
          rds: {{ route_config_name: routes, config_source: {{ ads: {{}} }} }}
"#
    );
    let proxy = Proxy::start(&bootstrap_with(xds, "", &statics), &["--drain-time-s", "1"]);
    let mut stream = tokio::time::timeout(WAIT, streams.recv())
        .await
        .expect("stream")
        .expect("server");
    stream.next_of(CDS).await;
    let early = stream.requested_within(Duration::from_millis(400)).await;
    assert!(!early.iter().any(|t| t == RDS), "RDS before CDS: {early:?}");

    let cluster = yaml::<Cluster>(&format!(
        "name: local\ntype: STATIC\nload_assignment: {{ cluster_name: local, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }}] }}] }}\n",
        backend.port()
    ));
    stream.respond(CDS, "1", vec![cluster]);
    let rds = stream.next_of(RDS).await;
    assert_eq!(rds.resource_names, vec!["routes".to_string()]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, s) = state(&proxy).await.expect("admin");
    assert_eq!(
        (status, s.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "INITIALIZING")
    );
    assert!(!accepts(port).await);

    stream.respond(
        RDS,
        "1",
        vec![yaml::<envoy_types::pb::envoy::config::route::v3::RouteConfiguration>(
            "name: routes\nvirtual_hosts: [{ name: all, domains: [\"*\"], routes: [{ match: { prefix: / }, route: { cluster: local } }] }]\n",
        )],
    );
    proxy.wait_live().await;
    assert_eq!(get(port, "svc", "/").await.backend().as_deref(), Some("a"));
}
