//! The xDS server over a real TCP socket with real tonic clients: state of the world and delta
//! over ADS, the standalone CDS service, ACK/NACK/stale-nonce handling, push-on-change only,
//! named subscriptions, make-before-break order, stats and shutdown; SDS Secrets translated from
//! a store, served by name over both ADS flavours and pushed again when rotated.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_control_plane::xds::version::resource_version;
use capstan_control_plane::xds::{
    CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, NackLog, ROUTE_TYPE, ResourceSource, Resources,
    SECRET_TYPE, XdsServer, XdsStats,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use envoy_types::util::pack_any;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const RECV_TIMEOUT: Duration = Duration::from_secs(3);
/// How long "nothing arrives" is waited for.
const SILENCE: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// A test resource source: resources per node id, changed by hand.

struct TestSource {
    per_node: Mutex<BTreeMap<String, Arc<Resources>>>,
    changes: watch::Sender<u64>,
}

impl TestSource {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            per_node: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
        })
    }

    /// Sets a node's resources without telling the server.
    fn set(&self, node: &str, resources: Resources) {
        self.per_node
            .lock()
            .expect("lock")
            .insert(node.to_string(), Arc::new(resources));
    }

    /// Tells the server resources may have changed.
    fn tick(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    fn update(&self, node: &str, resources: Resources) {
        self.set(node, resources);
        self.tick();
    }
}

impl ResourceSource for TestSource {
    fn resources_for(&self, node: &Node) -> Arc<Resources> {
        self.per_node
            .lock()
            .expect("lock")
            .get(&node.id)
            .cloned()
            .unwrap_or_default()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

// ---------------------------------------------------------------------------------------------
// Resources.

fn cluster(name: &str, variant: &str) -> (&'static str, String, Any) {
    let c = Cluster {
        name: name.into(),
        alt_stat_name: variant.into(),
        ..Default::default()
    };
    (CLUSTER_TYPE, name.into(), pack_any(c))
}

fn cla(name: &str, priority: u32) -> (&'static str, String, Any) {
    let c = ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            priority,
            ..Default::default()
        }],
        ..Default::default()
    };
    (ENDPOINT_TYPE, name.into(), pack_any(c))
}

fn listener(name: &str, variant: &str) -> (&'static str, String, Any) {
    let l = Listener {
        name: name.into(),
        stat_prefix: variant.into(),
        ..Default::default()
    };
    (LISTENER_TYPE, name.into(), pack_any(l))
}

fn route(name: &str, variant: &str) -> (&'static str, String, Any) {
    let r = RouteConfiguration {
        name: name.into(),
        internal_only_headers: vec![variant.into()],
        ..Default::default()
    };
    (ROUTE_TYPE, name.into(), pack_any(r))
}

fn resources(items: Vec<(&'static str, String, Any)>) -> Resources {
    let mut r = Resources::default();
    for (type_url, name, any) in items {
        r.by_type
            .entry(type_url.to_string())
            .or_default()
            .insert(name, any);
    }
    r
}

fn any_of(r: &Resources, type_url: &str, name: &str) -> Any {
    r.by_type[type_url][name].clone()
}

/// Names of the resources in a SotW response (decoding each as its type).
fn names(resp: &DiscoveryResponse) -> Vec<String> {
    resp.resources.iter().map(resource_name).collect()
}

fn resource_name(a: &Any) -> String {
    match a.type_url.as_str() {
        CLUSTER_TYPE => Cluster::decode(a.value.as_slice()).expect("cluster").name,
        ENDPOINT_TYPE => {
            ClusterLoadAssignment::decode(a.value.as_slice())
                .expect("cla")
                .cluster_name
        }
        LISTENER_TYPE => Listener::decode(a.value.as_slice()).expect("listener").name,
        ROUTE_TYPE => {
            RouteConfiguration::decode(a.value.as_slice())
                .expect("route")
                .name
        }
        SECRET_TYPE => Secret::decode(a.value.as_slice()).expect("secret").name,
        other => panic!("unexpected type {other}"),
    }
}

fn delta_names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    resp.resources.iter().map(|r| r.name.clone()).collect()
}

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        cluster: "test".into(),
        ..Default::default()
    }
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Server and clients.

struct Harness {
    addr: SocketAddr,
    source: Arc<TestSource>,
    stats: Arc<XdsStats>,
    nacks: Arc<NackLog>,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<()>,
}

async fn start() -> Harness {
    let source = TestSource::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = XdsServer::new(source.clone());
    let stats = server.stats();
    let nacks = server.nacks();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        server
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    Harness {
        addr,
        source,
        stats,
        nacks,
        stop: Some(stop),
        served,
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// A state-of-the-world stream (ADS or standalone).
struct SotwClient {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl SotwClient {
    async fn ads(addr: SocketAddr) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let mut client = AggregatedDiscoveryServiceClient::new(channel(addr).await);
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("ads")
            .into_inner();
        Self { tx, rx }
    }

    async fn cds(addr: SocketAddr) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let mut client = ClusterDiscoveryServiceClient::new(channel(addr).await);
        let rx = client
            .stream_clusters(ReceiverStream::new(rx))
            .await
            .expect("cds")
            .into_inner();
        Self { tx, rx }
    }

    async fn send(&self, request: DiscoveryRequest) {
        self.tx.send(request).await.expect("send");
    }

    /// First request of a type (carrying the node).
    async fn subscribe(&self, node_id: &str, type_url: &str, names: &[&str]) {
        self.send(DiscoveryRequest {
            node: Some(node(node_id)),
            type_url: type_url.into(),
            resource_names: strings(names),
            ..Default::default()
        })
        .await;
    }

    /// ACK of `resp`, optionally with a new subscription.
    async fn ack(&self, resp: &DiscoveryResponse, names: &[&str]) {
        self.send(DiscoveryRequest {
            version_info: resp.version_info.clone(),
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            resource_names: strings(names),
            ..Default::default()
        })
        .await;
    }

    async fn nack(
        &self,
        resp: &DiscoveryResponse,
        previous_version: &str,
        names: &[&str],
        message: &str,
    ) {
        self.send(DiscoveryRequest {
            version_info: previous_version.into(),
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            resource_names: strings(names),
            error_detail: Some(RpcStatus {
                code: Code::InvalidArgument as i32,
                message: message.into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        match tokio::time::timeout(RECV_TIMEOUT, self.rx.message()).await {
            Ok(Ok(Some(resp))) => resp,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    async fn expect_silence(&mut self) {
        if let Ok(got) = tokio::time::timeout(SILENCE, self.rx.message()).await {
            panic!("expected no message, got {got:?}");
        }
    }
}

/// A delta stream over ADS.
struct DeltaClient {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl DeltaClient {
    async fn ads(addr: SocketAddr) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let mut client = AggregatedDiscoveryServiceClient::new(channel(addr).await);
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("delta")
            .into_inner();
        Self { tx, rx }
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.tx.send(request).await.expect("send");
    }

    async fn ack(&self, resp: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        match tokio::time::timeout(RECV_TIMEOUT, self.rx.message()).await {
            Ok(Ok(Some(resp))) => resp,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    async fn expect_silence(&mut self) {
        if let Ok(got) = tokio::time::timeout(SILENCE, self.rx.message()).await {
            panic!("expected no message, got {got:?}");
        }
    }
}

fn base() -> Resources {
    resources(vec![
        cluster("a", "1"),
        cluster("b", "1"),
        cla("a", 0),
        cla("b", 0),
        cla("c", 0),
        listener("l", "1"),
        route("r", "1"),
    ])
}

// ---------------------------------------------------------------------------------------------
// State of the world.

#[tokio::test]
async fn sotw_cds_initial_response_and_stable_versions() {
    let h = start().await;
    h.source.set("n1", base());
    let mut c = SotwClient::ads(h.addr).await;
    c.subscribe("n1", CLUSTER_TYPE, &[]).await;
    let resp = c.recv().await;
    assert_eq!(resp.type_url, CLUSTER_TYPE);
    assert_eq!(names(&resp), ["a", "b"]);
    assert!(!resp.version_info.is_empty());
    assert!(!resp.nonce.is_empty());

    // Another stream gets the same content hash; a fresh nonce.
    let mut c2 = SotwClient::ads(h.addr).await;
    c2.subscribe("n1", CLUSTER_TYPE, &["*"]).await;
    let resp2 = c2.recv().await;
    assert_eq!(resp2.version_info, resp.version_info);
    assert_ne!(resp2.nonce, resp.nonce);

    // A client resuming on a new stream with the version it holds is not sent it again.
    let mut c3 = SotwClient::ads(h.addr).await;
    c3.send(DiscoveryRequest {
        node: Some(node("n1")),
        type_url: CLUSTER_TYPE.into(),
        version_info: resp.version_info.clone(),
        ..Default::default()
    })
    .await;
    c3.expect_silence().await;
    assert_eq!(h.stats.responses_total(CLUSTER_TYPE), 2);
}

#[tokio::test]
async fn sotw_ack_is_not_answered_and_unchanged_tick_pushes_nothing() {
    let h = start().await;
    h.source.set("n1", base());
    let mut c = SotwClient::ads(h.addr).await;
    c.subscribe("n1", CLUSTER_TYPE, &[]).await;
    let resp = c.recv().await;
    c.ack(&resp, &[]).await;
    c.expect_silence().await;
    assert_eq!(h.stats.acks_total(), 1);

    // Same resources, new Arc, tick: nothing to push.
    h.source.update("n1", base());
    c.expect_silence().await;

    // A real change is pushed with a new version and nonce.
    let mut changed = base();
    let (_, name, any) = cluster("b", "2");
    changed
        .by_type
        .get_mut(CLUSTER_TYPE)
        .expect("cds")
        .insert(name, any);
    h.source.update("n1", changed);
    let pushed = c.recv().await;
    assert_eq!(names(&pushed), ["a", "b"]);
    assert_ne!(pushed.version_info, resp.version_info);
    assert_ne!(pushed.nonce, resp.nonce);
    c.ack(&pushed, &[]).await;
    c.expect_silence().await;
    assert_eq!(h.stats.acks_total(), 2);
}

#[tokio::test]
async fn sotw_nack_is_recorded_and_the_version_not_resent() {
    let h = start().await;
    h.source.set("n1", base());
    let mut c = SotwClient::ads(h.addr).await;
    c.subscribe("n1", LISTENER_TYPE, &[]).await;
    let first = c.recv().await;
    c.ack(&first, &[]).await;
    // Let the ACK arrive before the change (else it is, correctly, stale).
    c.expect_silence().await;

    let mut bad = base();
    let (_, name, any) = listener("l", "bad");
    bad.by_type
        .get_mut(LISTENER_TYPE)
        .expect("lds")
        .insert(name, any);
    h.source.update("n1", bad.clone());
    let rejected = c.recv().await;
    c.nack(
        &rejected,
        &first.version_info,
        &[],
        "listener l: unsupported filter",
    )
    .await;
    c.expect_silence().await;

    let nacks = h.nacks.for_node("n1");
    assert_eq!(nacks.len(), 1, "{nacks:?}");
    assert_eq!(nacks[0].type_url, LISTENER_TYPE);
    assert_eq!(nacks[0].rejected_version, rejected.version_info);
    assert_eq!(nacks[0].nonce, rejected.nonce);
    assert_eq!(nacks[0].message, "listener l: unsupported filter");
    assert_eq!(h.stats.nacks_total(), 1);
    assert_eq!(h.stats.acks_total(), 1);

    // The same (rejected) content again: not resent.
    h.source.update("n1", bad);
    c.expect_silence().await;

    // A fix is sent.
    let mut fixed = base();
    let (_, name, any) = listener("l", "fixed");
    fixed
        .by_type
        .get_mut(LISTENER_TYPE)
        .expect("lds")
        .insert(name, any);
    h.source.update("n1", fixed);
    let resp = c.recv().await;
    assert_ne!(resp.version_info, rejected.version_info);
    assert!(
        h.stats
            .render_prometheus()
            .contains("capstan_xds_nacks_total 1\n")
    );
}

#[tokio::test]
async fn sotw_stale_nonce_is_ignored() {
    let h = start().await;
    h.source.set("n1", base());
    let mut c = SotwClient::ads(h.addr).await;
    c.subscribe("n1", ENDPOINT_TYPE, &["a"]).await;
    let first = c.recv().await;
    assert_eq!(names(&first), ["a"]);

    // A change makes the first nonce stale.
    let mut changed = base();
    let (_, name, any) = cla("a", 1);
    changed
        .by_type
        .get_mut(ENDPOINT_TYPE)
        .expect("eds")
        .insert(name, any);
    h.source.update("n1", changed);
    let second = c.recv().await;
    assert_ne!(second.version_info, first.version_info);

    // Requests with the stale nonce: neither answered (new names) nor counted (NACK).
    c.ack(&first, &["a", "b"]).await;
    c.nack(&first, "", &["a", "b"], "late").await;
    c.expect_silence().await;
    assert!(h.nacks.is_empty());
    assert_eq!(h.stats.acks_total(), 0);

    // With the latest nonce, the new subscription is answered.
    c.ack(&second, &["a", "b"]).await;
    let third = c.recv().await;
    assert_eq!(names(&third), ["a", "b"]);
    assert_eq!(h.stats.acks_total(), 1);
}

#[tokio::test]
async fn sotw_eds_named_subscription_and_subscription_change() {
    let h = start().await;
    h.source.set("n1", base());
    let mut c = SotwClient::ads(h.addr).await;
    c.subscribe("n1", ENDPOINT_TYPE, &["a", "missing"]).await;
    let resp = c.recv().await;
    assert_eq!(names(&resp), ["a"]);

    // ACK + more names (Envoy after a CDS update): answered with exactly the requested set.
    c.ack(&resp, &["a", "b"]).await;
    let resp2 = c.recv().await;
    assert_eq!(names(&resp2), ["a", "b"]);

    // Only a name that does not exist added: nothing new to say.
    c.ack(&resp2, &["a", "b", "nope"]).await;
    c.expect_silence().await;

    // A change to an endpoint nobody asked for is not pushed.
    let mut changed = base();
    let (_, name, any) = cla("c", 7);
    changed
        .by_type
        .get_mut(ENDPOINT_TYPE)
        .expect("eds")
        .insert(name, any);
    h.source.update("n1", changed.clone());
    c.expect_silence().await;

    // The missing name appears: pushed.
    let (_, name, any) = cla("nope", 0);
    changed
        .by_type
        .get_mut(ENDPOINT_TYPE)
        .expect("eds")
        .insert(name, any);
    h.source.update("n1", changed);
    let resp3 = c.recv().await;
    assert_eq!(names(&resp3), ["a", "b", "nope"]);
}

#[tokio::test]
async fn sotw_push_order_is_make_before_break() {
    let h = start().await;
    h.source.set("n1", base());
    let mut c = SotwClient::ads(h.addr).await;
    // Subscribe in reverse order; acknowledge everything.
    c.subscribe("n1", ROUTE_TYPE, &["r"]).await;
    let r = c.recv().await;
    c.ack(&r, &["r"]).await;
    c.subscribe("n1", LISTENER_TYPE, &[]).await;
    let l = c.recv().await;
    c.ack(&l, &[]).await;
    c.subscribe("n1", ENDPOINT_TYPE, &["a", "b", "new"]).await;
    let e = c.recv().await;
    c.ack(&e, &["a", "b", "new"]).await;
    c.subscribe("n1", CLUSTER_TYPE, &[]).await;
    let cds = c.recv().await;
    c.ack(&cds, &[]).await;
    c.expect_silence().await;

    // Everything changes, cluster "b" goes away, cluster "new" appears.
    let next = resources(vec![
        cluster("a", "2"),
        cluster("new", "1"),
        cla("a", 2),
        cla("new", 2),
        listener("l", "2"),
        route("r", "2"),
    ]);
    h.source.update("n1", next);
    let mut got = Vec::new();
    for _ in 0..5 {
        let resp = c.recv().await;
        got.push((resp.type_url.clone(), names(&resp)));
    }
    let s = |v: &[&str]| strings(v);
    assert_eq!(
        got,
        vec![
            (CLUSTER_TYPE.to_string(), s(&["a", "b", "new"])), // new clusters first, "b" kept
            (ENDPOINT_TYPE.to_string(), s(&["a", "new"])),
            (LISTENER_TYPE.to_string(), s(&["l"])),
            (ROUTE_TYPE.to_string(), s(&["r"])),
            (CLUSTER_TYPE.to_string(), s(&["a", "new"])), // stale cluster removed last
        ]
    );
    c.expect_silence().await;
}

#[tokio::test]
async fn standalone_cds_service() {
    let h = start().await;
    h.source.set("n1", base());
    let mut c = SotwClient::cds(h.addr).await;
    // type_url may be left empty on a standalone service.
    c.subscribe("n1", "", &[]).await;
    let resp = c.recv().await;
    assert_eq!(resp.type_url, CLUSTER_TYPE);
    assert_eq!(names(&resp), ["a", "b"]);
    c.ack(&resp, &[]).await;
    c.expect_silence().await;
    h.source.update("n1", resources(vec![cluster("a", "1")]));
    let pushed = c.recv().await;
    assert_eq!(names(&pushed), ["a"]);

    // Another type on the CDS service ends the stream with INVALID_ARGUMENT.
    let mut wrong = SotwClient::cds(h.addr).await;
    wrong.subscribe("n1", LISTENER_TYPE, &[]).await;
    match tokio::time::timeout(RECV_TIMEOUT, wrong.rx.message()).await {
        Ok(Err(status)) => assert_eq!(status.code(), Code::InvalidArgument),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }

    // Unary fetch is not supported.
    let mut client = ClusterDiscoveryServiceClient::new(channel(h.addr).await);
    let err = client
        .fetch_clusters(DiscoveryRequest {
            node: Some(node("n1")),
            ..Default::default()
        })
        .await
        .expect_err("fetch is unimplemented");
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn only_the_changed_node_receives_a_push() {
    let h = start().await;
    h.source.set("n1", base());
    h.source.set("n2", base());
    let mut c1 = SotwClient::ads(h.addr).await;
    let mut c2 = SotwClient::ads(h.addr).await;
    c1.subscribe("n1", CLUSTER_TYPE, &[]).await;
    c2.subscribe("n2", CLUSTER_TYPE, &[]).await;
    let r1 = c1.recv().await;
    let r2 = c2.recv().await;
    c1.ack(&r1, &[]).await;
    c2.ack(&r2, &[]).await;

    h.source
        .update("n1", resources(vec![cluster("a", "1"), cluster("z", "1")]));
    let pushed = c1.recv().await;
    assert_eq!(names(&pushed), ["a", "z"]);
    c2.expect_silence().await;
    assert_eq!(h.stats.connected_streams(), 2);
}

// ---------------------------------------------------------------------------------------------
// Delta.

#[tokio::test]
async fn delta_initial_update_removal_and_initial_versions() {
    let h = start().await;
    let start_set = resources(vec![
        cluster("a", "1"),
        cluster("b", "1"),
        cluster("c", "1"),
    ]);
    h.source.set("n1", start_set.clone());
    let mut c = DeltaClient::ads(h.addr).await;
    // Reconnecting client: holds "a" at the current version, "b" at an old one, and "gone".
    let initial: HashMap<String, String> = [
        (
            "a".to_string(),
            resource_version(&any_of(&start_set, CLUSTER_TYPE, "a")),
        ),
        ("b".to_string(), "old".to_string()),
        ("gone".to_string(), "x".to_string()),
    ]
    .into_iter()
    .collect();
    c.send(DeltaDiscoveryRequest {
        node: Some(node("n1")),
        type_url: CLUSTER_TYPE.into(),
        initial_resource_versions: initial,
        ..Default::default()
    })
    .await;
    let first = c.recv().await;
    assert_eq!(first.type_url, CLUSTER_TYPE);
    assert_eq!(delta_names(&first), ["b", "c"]);
    assert_eq!(first.removed_resources, ["gone"]);
    for r in &first.resources {
        let any = r.resource.clone().expect("resource");
        assert_eq!(r.version, resource_version(&any));
    }
    assert!(!first.nonce.is_empty());
    c.ack(&first).await;
    c.expect_silence().await;
    assert_eq!(h.stats.acks_total(), 1);

    // Update "b", remove "c": only the difference is sent.
    h.source
        .update("n1", resources(vec![cluster("a", "1"), cluster("b", "2")]));
    let second = c.recv().await;
    assert_eq!(delta_names(&second), ["b"]);
    assert_eq!(second.removed_resources, ["c"]);
    assert_ne!(second.nonce, first.nonce);
    c.ack(&second).await;

    // Unchanged: nothing.
    h.source
        .update("n1", resources(vec![cluster("a", "1"), cluster("b", "2")]));
    c.expect_silence().await;

    // NACK: recorded, not resent.
    h.source.update(
        "n1",
        resources(vec![cluster("a", "bad"), cluster("b", "2")]),
    );
    let third = c.recv().await;
    assert_eq!(delta_names(&third), ["a"]);
    c.send(DeltaDiscoveryRequest {
        type_url: CLUSTER_TYPE.into(),
        response_nonce: third.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "cluster a: bad".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    c.expect_silence().await;
    let nacks = h.nacks.for_node("n1");
    assert_eq!(nacks.len(), 1);
    assert_eq!(nacks[0].rejected_version, third.system_version_info);
    assert_eq!(nacks[0].message, "cluster a: bad");
}

#[tokio::test]
async fn delta_named_subscriptions() {
    let h = start().await;
    h.source.set("n1", base());
    let mut c = DeltaClient::ads(h.addr).await;
    c.send(DeltaDiscoveryRequest {
        node: Some(node("n1")),
        type_url: ENDPOINT_TYPE.into(),
        resource_names_subscribe: strings(&["a"]),
        ..Default::default()
    })
    .await;
    let first = c.recv().await;
    assert_eq!(delta_names(&first), ["a"]);
    c.ack(&first).await;
    c.expect_silence().await;

    // Subscribe "b" (with an ACK-less request, as Envoy does): only "b" is sent.
    c.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT_TYPE.into(),
        resource_names_subscribe: strings(&["b"]),
        resource_names_unsubscribe: strings(&["a"]),
        ..Default::default()
    })
    .await;
    let second = c.recv().await;
    assert_eq!(delta_names(&second), ["b"]);
    assert!(second.removed_resources.is_empty());
    c.ack(&second).await;

    // "a" is no longer subscribed: its change is not pushed; "b"'s removal is.
    h.source
        .update("n1", resources(vec![cla("a", 9), cla("c", 0)]));
    let third = c.recv().await;
    assert!(third.resources.is_empty());
    assert_eq!(third.removed_resources, ["b"]);
    c.ack(&third).await;
    c.expect_silence().await;
}

// ---------------------------------------------------------------------------------------------
// Stats and shutdown.

#[tokio::test]
async fn stats_and_graceful_shutdown() {
    let mut h = start().await;
    h.source.set("n1", base());
    let mut c = SotwClient::ads(h.addr).await;
    c.subscribe("n1", CLUSTER_TYPE, &[]).await;
    let resp = c.recv().await;
    c.ack(&resp, &[]).await;
    c.expect_silence().await;
    let text = h.stats.render_prometheus();
    for expected in [
        "# TYPE capstan_xds_connected_streams gauge\n",
        "capstan_xds_connected_streams 1\n",
        "# HELP capstan_xds_responses_total ",
        &format!("capstan_xds_responses_total{{type_url=\"{CLUSTER_TYPE}\"}} 1\n"),
        &format!("capstan_xds_responses_total{{type_url=\"{ENDPOINT_TYPE}\"}} 0\n"),
        "capstan_xds_acks_total 1\n",
        "# TYPE capstan_xds_nacks_total counter\n",
        "capstan_xds_nacks_total 0\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }

    // Shutdown ends open streams with UNAVAILABLE and `serve` returns.
    if let Some(stop) = h.stop.take() {
        let _ = stop.send(());
    }
    match tokio::time::timeout(RECV_TIMEOUT, c.rx.message()).await {
        Ok(Err(status)) => assert_eq!(status.code(), Code::Unavailable),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    drop(c);
    tokio::time::timeout(RECV_TIMEOUT, &mut h.served)
        .await
        .expect("serve returns")
        .expect("serve task");
    assert_eq!(h.stats.connected_streams(), 0);
}

// ---------------------------------------------------------------------------------------------
// SDS: the real translator behind the server.

/// A store holding a Service, a ServicePolicy whose client certificate comes from Secret
/// `shop/client`, and that Secret with `crt` as its certificate.
fn tls_store_update(store: &capstan_control_plane::store::Store, crt: &str) {
    use capstan_control_plane::provider::parse::{Decoded, Object, decode};
    let docs = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{port: 443}]\n".to_string(),
        "apiVersion: capstan.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  targetRef: {name: web}\n  tls: {mode: Mutual, clientCertificateSecret: {name: client}}\n".to_string(),
        format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: client, namespace: shop}}\nstringData:\n  tls.crt: \"{crt}\"\n  tls.key: \"-----BEGIN PRIVATE KEY-----\\nMC4CAQAwBQYDK2VwBCIEIA==\\n-----END PRIVATE KEY-----\\n\"\n"),
    ];
    store.update(|s| {
        for doc in &docs {
            match decode(serde_saphyr::from_str(doc).expect("yaml"), "default") {
                Ok(Decoded::Object(key, Object::Service(o))) => {
                    s.services.insert(key, *o);
                }
                Ok(Decoded::Object(key, Object::Policy(o))) => {
                    s.policies.insert(key, *o);
                }
                Ok(Decoded::Object(key, Object::Secret(o))) => {
                    s.secrets.insert(key, *o);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        s.synced = true;
    });
}

fn pem_cert(tag: &str) -> String {
    // Any base64 body is a well-formed PEM block; Envoy is not involved here.
    format!("-----BEGIN CERTIFICATE-----\\n{tag}\\n-----END CERTIFICATE-----\\n")
}

fn certificate_chain(any: &Any) -> Vec<u8> {
    let s = Secret::decode(any.value.as_slice()).expect("secret");
    assert_eq!(s.name, "kubernetes://shop/client");
    let Some(secret::Type::TlsCertificate(c)) = s.r#type else {
        panic!("tls_certificate expected")
    };
    match c.certificate_chain.and_then(|d| d.specifier) {
        Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) => b,
        other => panic!("inline bytes expected, got {other:?}"),
    }
}

#[tokio::test]
async fn secrets_are_served_by_name_over_sotw_and_delta_ads_and_rotations_are_pushed() {
    use capstan_control_plane::runtime::TranslatedSource;
    const NAME: &str = "kubernetes://shop/client";
    let store = capstan_control_plane::store::Store::new();
    tls_store_update(&store, &pem_cert("AAAA"));
    let source = TranslatedSource::new(&store);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = XdsServer::new(source);
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        server
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });

    let mut sotw = SotwClient::ads(addr).await;
    sotw.subscribe("web-0.shop", SECRET_TYPE, &[NAME]).await;
    let first = sotw.recv().await;
    assert_eq!(first.type_url, SECRET_TYPE);
    assert_eq!(names(&first), [NAME]);
    assert!(String::from_utf8_lossy(&certificate_chain(&first.resources[0])).contains("AAAA"));
    sotw.ack(&first, &[NAME]).await;
    sotw.expect_silence().await;

    let mut delta = DeltaClient::ads(addr).await;
    delta
        .send(DeltaDiscoveryRequest {
            node: Some(node("web-1.shop")),
            type_url: SECRET_TYPE.into(),
            resource_names_subscribe: strings(&[NAME]),
            ..Default::default()
        })
        .await;
    let d1 = delta.recv().await;
    assert_eq!(d1.type_url, SECRET_TYPE);
    assert_eq!(delta_names(&d1), [NAME]);
    let held = d1.resources[0].resource.clone().expect("resource");
    assert_eq!(d1.resources[0].version, resource_version(&held));
    delta.ack(&d1).await;
    delta.expect_silence().await;

    // The standalone SDS service serves the same resource (its requests may omit type_url).
    let (sds_tx, sds_rx) = mpsc::channel(4);
    let mut sds_client = envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient::new(channel(addr).await);
    let mut sds = sds_client
        .stream_secrets(ReceiverStream::new(sds_rx))
        .await
        .expect("sds")
        .into_inner();
    sds_tx
        .send(DiscoveryRequest {
            node: Some(node("web-2.shop")),
            resource_names: strings(&[NAME]),
            ..Default::default()
        })
        .await
        .expect("send");
    let standalone = tokio::time::timeout(RECV_TIMEOUT, sds.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("a response");
    assert_eq!(standalone.type_url, SECRET_TYPE);
    assert_eq!(names(&standalone), [NAME]);
    assert_eq!(standalone.version_info, first.version_info);

    // Rotation: both streams get the new certificate, with a new version.
    tls_store_update(&store, &pem_cert("BBBB"));
    let second = sotw.recv().await;
    assert_eq!(second.type_url, SECRET_TYPE);
    assert_ne!(second.version_info, first.version_info);
    assert!(String::from_utf8_lossy(&certificate_chain(&second.resources[0])).contains("BBBB"));
    let d2 = delta.recv().await;
    assert_eq!(delta_names(&d2), [NAME]);
    assert!(
        String::from_utf8_lossy(&certificate_chain(
            d2.resources[0].resource.as_ref().expect("resource")
        ))
        .contains("BBBB")
    );
    assert_ne!(d2.resources[0].version, d1.resources[0].version);

    let _ = stop.send(());
    served.await.expect("server task");
}
