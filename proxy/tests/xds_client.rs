//! The proxy's xDS client over real sockets: against the control plane's real `XdsServer`
//! (initial fetch, ACK/NACK as the server records them, named EDS following CDS, pushes,
//! timeouts, stream failure, control-plane restart, delta updates/removals/resumption), and
//! against a recording ADS server that lets a test read every request field by field
//! (node once per stream, `version_info`, nonces, `error_detail`, subscription diffs,
//! `initial_resource_versions`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use capstan_control_plane::xds::version::resource_version;
use capstan_control_plane::xds::{NackLog, ResourceSource, Resources, XdsServer, XdsStats};
use capstan_proxy::xds::{
    CLUSTER_TYPE, CONNECTED_STATE, ENDPOINT_TYPE, InitialFetch, LISTENER_TYPE, ROUTE_TYPE,
    SubscriptionNames, XdsClient, XdsClientConfig, XdsHandler, XdsMode,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// How long anything that should happen may take.
const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing happens" is watched for.
const SILENCE: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// The control plane side: a resource source changed by hand, and the real xDS server.

struct TestSource {
    resources: Mutex<Arc<Resources>>,
    changes: watch::Sender<u64>,
}

impl TestSource {
    fn new(items: Vec<(&'static str, String, Any)>) -> Arc<Self> {
        Arc::new(Self {
            resources: Mutex::new(Arc::new(resources(items))),
            changes: watch::channel(0).0,
        })
    }

    /// Replaces every node's resources without telling the server.
    fn set(&self, items: Vec<(&'static str, String, Any)>) {
        *self.resources.lock().expect("lock") = Arc::new(resources(items));
    }

    fn update(&self, items: Vec<(&'static str, String, Any)>) {
        self.set(items);
        self.changes.send_modify(|v| *v += 1);
    }
}

impl ResourceSource for TestSource {
    fn resources_for(&self, _node: &Node) -> Arc<Resources> {
        self.resources.lock().expect("lock").clone()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
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

fn cluster_any(name: &str, variant: &str) -> Any {
    pack_any(Cluster {
        name: name.into(),
        alt_stat_name: variant.into(),
        ..Default::default()
    })
}

fn cluster(name: &str, variant: &str) -> (&'static str, String, Any) {
    (CLUSTER_TYPE, name.into(), cluster_any(name, variant))
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

fn listener(name: &str) -> (&'static str, String, Any) {
    let l = Listener {
        name: name.into(),
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

struct Server {
    addr: SocketAddr,
    stats: Arc<XdsStats>,
    nacks: Arc<NackLog>,
    stop: oneshot::Sender<()>,
    served: JoinHandle<()>,
}

impl Server {
    /// Serves `source` on `addr` (`127.0.0.1:0` for a fresh port).
    async fn start(source: Arc<TestSource>, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = XdsServer::new(source);
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
        Self {
            addr,
            stats,
            nacks,
            stop,
            served,
        }
    }

    async fn fresh(source: Arc<TestSource>) -> Self {
        Self::start(source, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// Stops the server and waits until its port is closed.
    async fn kill(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.served)
            .await
            .expect("server stops")
            .expect("server task");
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy side: a handler that records every call, and the client.

#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Sotw {
        type_url: String,
        version: String,
        names: Vec<String>,
        accepted: bool,
    },
    Delta {
        type_url: String,
        updated: Vec<String>,
        removed: Vec<String>,
        accepted: bool,
    },
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
    /// Resource name → the message the handler rejects it with.
    reject: Mutex<BTreeMap<String, String>>,
    /// When set, accepting CDS subscribes EDS to the clusters' names (as the cluster
    /// manager does).
    eds_follows_cds: OnceLock<XdsClient>,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn rejecting(name: &str, message: &str) -> Arc<Self> {
        let r = Self::new();
        r.reject
            .lock()
            .expect("lock")
            .insert(name.into(), message.into());
        r
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    fn calls_of(&self, type_url: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| match c {
                Call::Sotw { type_url: t, .. } | Call::Delta { type_url: t, .. } => t == type_url,
            })
            .collect()
    }

    fn check(&self, names: impl Iterator<Item = String>) -> Result<(), String> {
        let reject = self.reject.lock().expect("lock");
        let errors: Vec<String> = names.filter_map(|n| reject.get(&n).cloned()).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl XdsHandler for Recorder {
    fn on_sotw(
        &self,
        type_url: &str,
        version: &str,
        resources: Vec<(String, Any)>,
    ) -> Result<(), String> {
        let names: Vec<String> = resources.iter().map(|(n, _)| n.clone()).collect();
        let result = self.check(names.iter().cloned());
        self.calls.lock().expect("lock").push(Call::Sotw {
            type_url: type_url.into(),
            version: version.into(),
            names: names.clone(),
            accepted: result.is_ok(),
        });
        if result.is_ok()
            && type_url == CLUSTER_TYPE
            && let Some(client) = self.eds_follows_cds.get()
        {
            client.subscribe(ENDPOINT_TYPE, SubscriptionNames::names(names));
        }
        result
    }

    fn on_delta(
        &self,
        type_url: &str,
        updated: Vec<(String, Any)>,
        removed: Vec<String>,
    ) -> Result<(), String> {
        let names: Vec<String> = updated.iter().map(|(n, _)| n.clone()).collect();
        let result = self.check(names.iter().cloned());
        self.calls.lock().expect("lock").push(Call::Delta {
            type_url: type_url.into(),
            updated: names,
            removed,
            accepted: result.is_ok(),
        });
        result
    }
}

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        cluster: "xds-client-test".into(),
        ..Default::default()
    }
}

fn config(addr: SocketAddr, node_id: &str, mode: XdsMode) -> XdsClientConfig {
    XdsClientConfig {
        mode,
        initial_fetch_timeout: Some(WAIT),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..XdsClientConfig::new(format!("http://{addr}"), node(node_id))
    }
}

/// A running client; stops when dropped.
struct Running {
    client: XdsClient,
    _stop: oneshot::Sender<()>,
}

fn start_client(config: XdsClientConfig, handler: Arc<Recorder>) -> Running {
    let client = XdsClient::new(config, handler).expect("client");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(client.clone().run(async {
        let _ = stopped.await;
    }));
    Running {
        client,
        _stop: stop,
    }
}

/// Polls `check` until it holds or [`WAIT`] passes.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn fetch(f: impl Future<Output = InitialFetch>) -> InitialFetch {
    tokio::time::timeout(WAIT, f)
        .await
        .expect("the fetch resolves")
}

fn stat(client: &XdsClient, name: &str) -> u64 {
    client
        .stats()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no stat {name} in {:?}", client.stats()))
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn sotw(type_url: &str, version: &str, names: &[&str]) -> Call {
    Call::Sotw {
        type_url: type_url.into(),
        version: version.into(),
        names: strings(names),
        accepted: true,
    }
}

fn delta(type_url: &str, updated: &[&str], removed: &[&str]) -> Call {
    Call::Delta {
        type_url: type_url.into(),
        updated: strings(updated),
        removed: strings(removed),
        accepted: true,
    }
}

fn version_of(call: &Call) -> String {
    match call {
        Call::Sotw { version, .. } => version.clone(),
        Call::Delta { .. } => panic!("a delta call has no version"),
    }
}

// ---------------------------------------------------------------------------------------------
// State of the world against the real control plane.

#[tokio::test]
async fn sotw_initial_cds_is_applied_and_acked() {
    let source = TestSource::new(vec![cluster("a", "1"), cluster("b", "1")]);
    let server = Server::fresh(source.clone()).await;
    let handler = Recorder::new();
    let proxy = start_client(
        config(server.addr, "sotw-initial", XdsMode::Sotw),
        handler.clone(),
    );
    proxy
        .client
        .subscribe(CLUSTER_TYPE, SubscriptionNames::Wildcard);

    assert_eq!(
        fetch(proxy.client.initial_fetch(CLUSTER_TYPE)).await,
        InitialFetch::Applied
    );
    let calls = handler.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let version = version_of(&calls[0]);
    assert_eq!(calls[0], sotw(CLUSTER_TYPE, &version, &["a", "b"]));
    eventually("the server sees the ACK", || server.stats.acks_total() == 1).await;
    assert_eq!(server.stats.nacks_total(), 0);
    assert!(server.nacks.for_node("sotw-initial").is_empty());

    assert_eq!(
        proxy.client.accepted_version(CLUSTER_TYPE),
        Some(version.clone())
    );
    assert_eq!(
        proxy.client.resource_versions(CLUSTER_TYPE),
        BTreeMap::from([("a".into(), version.clone()), ("b".into(), version)])
    );
    assert!(proxy.client.is_connected());
    assert_eq!(stat(&proxy.client, CONNECTED_STATE), 1);
    assert_eq!(stat(&proxy.client, "cluster_manager.cds.update_success"), 1);
    assert_eq!(
        stat(&proxy.client, "cluster_manager.cds.update_rejected"),
        0
    );
    // The subscription's start and the response.
    assert_eq!(stat(&proxy.client, "cluster_manager.cds.update_attempt"), 2);
}

#[tokio::test]
async fn sotw_server_push_reaches_the_handler() {
    let source = TestSource::new(vec![cluster("a", "1")]);
    let server = Server::fresh(source.clone()).await;
    let handler = Recorder::new();
    let proxy = start_client(
        config(server.addr, "sotw-push", XdsMode::Sotw),
        handler.clone(),
    );
    proxy
        .client
        .subscribe(CLUSTER_TYPE, SubscriptionNames::Wildcard);
    assert!(
        fetch(proxy.client.initial_fetch(CLUSTER_TYPE))
            .await
            .is_applied()
    );
    let first = proxy.client.accepted_version(CLUSTER_TYPE);
    // (A push that overtook the first ACK would make that ACK's nonce stale, uncounted.)
    eventually("the first ACK", || server.stats.acks_total() == 1).await;

    source.update(vec![cluster("a", "2"), cluster("c", "1")]);
    eventually("the push reaches the handler", || {
        handler.calls().len() == 2
    })
    .await;
    let calls = handler.calls();
    let version = version_of(&calls[1]);
    assert_eq!(calls[1], sotw(CLUSTER_TYPE, &version, &["a", "c"]));
    assert_ne!(Some(version.clone()), first);
    eventually("the push is ACKed", || server.stats.acks_total() == 2).await;
    assert_eq!(proxy.client.accepted_version(CLUSTER_TYPE), Some(version));
    assert_eq!(stat(&proxy.client, "cluster_manager.cds.update_success"), 2);
}

#[tokio::test]
async fn sotw_rejected_update_is_nacked_with_the_handler_message_and_changes_nothing() {
    let message = "cluster bad: lb_policy: unsupported value MAGLEV";
    let source = TestSource::new(vec![cluster("good", "1"), cluster("bad", "1")]);
    let server = Server::fresh(source.clone()).await;
    let handler = Recorder::rejecting("bad", message);
    let proxy = start_client(
        config(server.addr, "sotw-nack", XdsMode::Sotw),
        handler.clone(),
    );
    proxy
        .client
        .subscribe(CLUSTER_TYPE, SubscriptionNames::Wildcard);

    assert_eq!(
        fetch(proxy.client.initial_fetch(CLUSTER_TYPE)).await,
        InitialFetch::Rejected(message.into())
    );
    eventually("the control plane records the NACK", || {
        server.nacks.for_node("sotw-nack").len() == 1
    })
    .await;
    let nack = &server.nacks.for_node("sotw-nack")[0];
    assert_eq!(nack.message, message);
    assert_eq!(nack.type_url, CLUSTER_TYPE);
    let rejected = version_of(&handler.calls()[0]);
    assert_eq!(nack.rejected_version, rejected);
    // Not offered again: the handler saw that version once.
    tokio::time::sleep(SILENCE).await;
    assert_eq!(handler.calls().len(), 1, "{:?}", handler.calls());
    assert_eq!(proxy.client.accepted_version(CLUSTER_TYPE), None);
    assert!(proxy.client.resource_versions(CLUSTER_TYPE).is_empty());
    assert_eq!(
        fetch(proxy.client.resource_fetch(CLUSTER_TYPE, "good", None)).await,
        InitialFetch::Rejected(message.into())
    );
    assert_eq!(
        stat(&proxy.client, "cluster_manager.cds.update_rejected"),
        1
    );
    assert_eq!(stat(&proxy.client, "cluster_manager.cds.update_success"), 0);

    // A fixed configuration is accepted; the NACK is not repeated.
    source.update(vec![cluster("good", "1")]);
    eventually("the fix is applied", || {
        proxy.client.accepted_version(CLUSTER_TYPE).is_some()
    })
    .await;
    assert_eq!(handler.calls().len(), 2);
    assert!(handler.calls()[1] == sotw(CLUSTER_TYPE, &version_of(&handler.calls()[1]), &["good"]));
    assert_eq!(server.nacks.for_node("sotw-nack").len(), 1);
    assert_eq!(
        fetch(proxy.client.resource_fetch(CLUSTER_TYPE, "good", None)).await,
        InitialFetch::Applied
    );
}

#[tokio::test]
async fn sotw_eds_follows_cds_and_delivers_only_the_named_assignments() {
    let source = TestSource::new(vec![
        cluster("a", "1"),
        cluster("c", "1"),
        cla("a", 0),
        cla("b", 0),
        cla("c", 0),
    ]);
    let server = Server::fresh(source.clone()).await;
    let handler = Recorder::new();
    let proxy = start_client(
        config(server.addr, "sotw-eds", XdsMode::Sotw),
        handler.clone(),
    );
    handler
        .eds_follows_cds
        .set(proxy.client.clone())
        .expect("set once");
    proxy
        .client
        .subscribe(CLUSTER_TYPE, SubscriptionNames::Wildcard);

    assert!(
        fetch(proxy.client.initial_fetch(CLUSTER_TYPE))
            .await
            .is_applied()
    );
    assert!(
        fetch(proxy.client.initial_fetch(ENDPOINT_TYPE))
            .await
            .is_applied()
    );
    for name in ["a", "c"] {
        assert!(
            fetch(proxy.client.resource_fetch(ENDPOINT_TYPE, name, Some(WAIT)))
                .await
                .is_applied()
        );
    }
    assert_eq!(
        proxy.client.subscription(ENDPOINT_TYPE),
        Some(SubscriptionNames::names(["a", "c"]))
    );
    let calls = handler.calls();
    assert!(matches!(&calls[0], Call::Sotw { type_url, .. } if type_url == CLUSTER_TYPE));
    let eds = handler.calls_of(ENDPOINT_TYPE);
    assert_eq!(eds.len(), 1, "{eds:?}");
    assert_eq!(
        eds[0],
        sotw(ENDPOINT_TYPE, &version_of(&eds[0]), &["a", "c"])
    );
    assert_eq!(
        proxy
            .client
            .resource_versions(ENDPOINT_TYPE)
            .keys()
            .collect::<Vec<_>>(),
        ["a", "c"]
    );

    // An assignment nobody asked for changes: nothing is sent.
    source.update(vec![
        cluster("a", "1"),
        cluster("c", "1"),
        cla("a", 0),
        cla("b", 7),
        cla("c", 0),
    ]);
    tokio::time::sleep(SILENCE).await;
    assert_eq!(handler.calls_of(ENDPOINT_TYPE).len(), 1);
    assert_eq!(stat(&proxy.client, "cluster_manager.eds.update_success"), 1);
}

#[tokio::test]
async fn initial_fetch_times_out_when_the_server_never_answers() {
    let source = TestSource::new(vec![route("exists", "1")]);
    let server = Server::fresh(source).await;
    let handler = Recorder::new();
    let proxy = start_client(
        config(server.addr, "sotw-timeout", XdsMode::Sotw),
        handler.clone(),
    );
    let started = Instant::now();
    proxy
        .client
        .subscribe(ROUTE_TYPE, SubscriptionNames::names(["missing"]));

    let timeout = Duration::from_millis(200);
    let outcome = fetch(
        proxy
            .client
            .initial_fetch_with_timeout(ROUTE_TYPE, Some(timeout)),
    )
    .await;
    assert_eq!(outcome, InitialFetch::TimedOut);
    assert!(started.elapsed() >= timeout);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        fetch(
            proxy
                .client
                .resource_fetch(ROUTE_TYPE, "missing", Some(timeout))
        )
        .await,
        InitialFetch::TimedOut
    );
    // The outcome is kept for later callers.
    assert_eq!(
        fetch(proxy.client.initial_fetch(ROUTE_TYPE)).await,
        InitialFetch::TimedOut
    );
    assert!(proxy.client.is_connected());
    assert!(handler.calls().is_empty());
    assert_eq!(
        stat(&proxy.client, "listener_manager.rds.init_fetch_timeout"),
        1
    );
}

#[tokio::test]
async fn initial_fetch_fails_when_an_established_stream_breaks() {
    let source = TestSource::new(vec![]);
    let server = Server::fresh(source).await;
    let proxy = start_client(
        config(server.addr, "sotw-broken", XdsMode::Sotw),
        Recorder::new(),
    );
    proxy
        .client
        .subscribe(ROUTE_TYPE, SubscriptionNames::names(["missing"]));
    let waiting = tokio::spawn(proxy.client.initial_fetch_with_timeout(ROUTE_TYPE, None));
    let named = tokio::spawn(proxy.client.resource_fetch(ROUTE_TYPE, "missing", None));
    eventually("the stream is up", || proxy.client.is_connected()).await;

    server.kill().await;
    let outcome = fetch(async { waiting.await.expect("task") }).await;
    assert!(
        matches!(&outcome, InitialFetch::Failed(e) if e.contains("Unavailable")),
        "{outcome:?}"
    );
    assert!(matches!(
        fetch(async { named.await.expect("task") }).await,
        InitialFetch::Failed(_)
    ));
    assert!(stat(&proxy.client, "listener_manager.rds.update_failure") >= 1);
}

#[tokio::test]
async fn an_unreachable_control_plane_ends_the_initial_fetch_only_on_its_timeout() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let proxy = start_client(
        config(closed, "unreachable", XdsMode::Sotw),
        Recorder::new(),
    );
    let started = Instant::now();
    proxy
        .client
        .subscribe(CLUSTER_TYPE, SubscriptionNames::Wildcard);
    let timeout = Duration::from_millis(300);
    assert_eq!(
        fetch(
            proxy
                .client
                .initial_fetch_with_timeout(CLUSTER_TYPE, Some(timeout))
        )
        .await,
        InitialFetch::TimedOut
    );
    assert!(started.elapsed() >= timeout);
    assert!(!proxy.client.is_connected());
    assert_eq!(stat(&proxy.client, CONNECTED_STATE), 0);
    // Several attempts with backoff, each counted.
    assert!(stat(&proxy.client, "cluster_manager.cds.update_failure") >= 2);
}

#[tokio::test]
async fn sotw_reconnects_after_a_control_plane_restart_and_keeps_its_configuration() {
    let items = || {
        vec![
            cluster("a", "1"),
            cluster("b", "1"),
            cla("a", 0),
            cla("b", 0),
            listener("inbound"),
            route("r", "1"),
        ]
    };
    let source = TestSource::new(items());
    let server = Server::fresh(source.clone()).await;
    let addr = server.addr;
    let handler = Recorder::new();
    let proxy = start_client(config(addr, "sotw-restart", XdsMode::Sotw), handler.clone());
    handler
        .eds_follows_cds
        .set(proxy.client.clone())
        .expect("set once");
    // The init sequence: CDS (EDS follows), then LDS, then RDS.
    proxy
        .client
        .subscribe(CLUSTER_TYPE, SubscriptionNames::Wildcard);
    assert!(
        fetch(proxy.client.initial_fetch(CLUSTER_TYPE))
            .await
            .is_applied()
    );
    assert!(
        fetch(proxy.client.initial_fetch(ENDPOINT_TYPE))
            .await
            .is_applied()
    );
    proxy
        .client
        .subscribe(LISTENER_TYPE, SubscriptionNames::Wildcard);
    assert!(
        fetch(proxy.client.initial_fetch(LISTENER_TYPE))
            .await
            .is_applied()
    );
    proxy
        .client
        .subscribe(ROUTE_TYPE, SubscriptionNames::names(["r"]));
    assert!(
        fetch(proxy.client.initial_fetch(ROUTE_TYPE))
            .await
            .is_applied()
    );
    let before = handler.calls();
    assert_eq!(before.len(), 4, "{before:?}");
    let versions = proxy.client.accepted_versions();

    server.kill().await;
    eventually("the client notices", || !proxy.client.is_connected()).await;
    // Connection attempts fail for a while.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(stat(&proxy.client, "cluster_manager.cds.update_failure") >= 2);

    let server = Server::start(source.clone(), addr).await;
    eventually("the client reconnects", || proxy.client.is_connected()).await;
    eventually("the new server sees one stream", || {
        server.stats.connected_streams() == 1
    })
    .await;
    // Resumed with the accepted versions: nothing is re-sent, nothing was dropped.
    tokio::time::sleep(SILENCE).await;
    assert_eq!(handler.calls(), before);
    assert_eq!(proxy.client.accepted_versions(), versions);

    // Every subscription (including the EDS names CDS asked for) is live on the new stream.
    let mut changed = items();
    changed[3] = cla("b", 1);
    changed[5] = route("r", "2");
    source.update(changed);
    eventually("EDS and RDS updates arrive", || {
        handler.calls_of(ENDPOINT_TYPE).len() == 2 && handler.calls_of(ROUTE_TYPE).len() == 2
    })
    .await;
    let eds = handler.calls_of(ENDPOINT_TYPE);
    assert_eq!(
        eds[1],
        sotw(ENDPOINT_TYPE, &version_of(&eds[1]), &["a", "b"])
    );
    assert!(server.nacks.for_node("sotw-restart").is_empty());
    server.kill().await;
}

// ---------------------------------------------------------------------------------------------
// Delta against the real control plane.

#[tokio::test]
async fn delta_applies_updates_and_removals_and_resumes_with_initial_resource_versions() {
    let source = TestSource::new(vec![cluster("a", "1"), cluster("b", "1")]);
    let server = Server::fresh(source.clone()).await;
    let addr = server.addr;
    let handler = Recorder::new();
    let proxy = start_client(config(addr, "delta", XdsMode::Delta), handler.clone());
    proxy
        .client
        .subscribe(CLUSTER_TYPE, SubscriptionNames::Wildcard);

    assert!(
        fetch(proxy.client.initial_fetch(CLUSTER_TYPE))
            .await
            .is_applied()
    );
    assert_eq!(handler.calls(), [delta(CLUSTER_TYPE, &["a", "b"], &[])]);
    assert_eq!(
        proxy.client.resource_versions(CLUSTER_TYPE),
        BTreeMap::from([
            ("a".into(), resource_version(&cluster_any("a", "1"))),
            ("b".into(), resource_version(&cluster_any("b", "1"))),
        ])
    );
    eventually("the server sees the ACK", || server.stats.acks_total() == 1).await;

    // Update: only what changed.
    source.update(vec![cluster("a", "1"), cluster("b", "2")]);
    eventually("the update arrives", || handler.calls().len() == 2).await;
    assert_eq!(handler.calls()[1], delta(CLUSTER_TYPE, &["b"], &[]));
    // Removal.
    source.update(vec![cluster("b", "2")]);
    eventually("the removal arrives", || handler.calls().len() == 3).await;
    assert_eq!(handler.calls()[2], delta(CLUSTER_TYPE, &[], &["a"]));
    let held = BTreeMap::from([("b".into(), resource_version(&cluster_any("b", "2")))]);
    assert_eq!(proxy.client.resource_versions(CLUSTER_TYPE), held);
    assert_eq!(stat(&proxy.client, "cluster_manager.cds.update_success"), 3);

    // Restart; while the control plane is away a cluster is added.
    server.kill().await;
    eventually("the client notices", || !proxy.client.is_connected()).await;
    source.set(vec![cluster("b", "2"), cluster("c", "1")]);
    let server = Server::start(source.clone(), addr).await;
    eventually("the client reconnects", || proxy.client.is_connected()).await;
    // initial_resource_versions told the server about b: only c is sent.
    eventually("the new cluster arrives", || handler.calls().len() == 4).await;
    assert_eq!(handler.calls()[3], delta(CLUSTER_TYPE, &["c"], &[]));
    tokio::time::sleep(SILENCE).await;
    assert_eq!(handler.calls().len(), 4, "{:?}", handler.calls());
    assert!(
        proxy
            .client
            .resource_versions(CLUSTER_TYPE)
            .contains_key("b")
    );
    assert!(server.nacks.for_node("delta").is_empty());
    server.kill().await;
}

#[tokio::test]
async fn delta_rejected_update_is_nacked_and_changes_nothing() {
    let message = "cluster bad: type: unsupported value ORIGINAL_DST";
    let source = TestSource::new(vec![cluster("good", "1")]);
    let server = Server::fresh(source.clone()).await;
    let handler = Recorder::rejecting("bad", message);
    let proxy = start_client(
        config(server.addr, "delta-nack", XdsMode::Delta),
        handler.clone(),
    );
    proxy
        .client
        .subscribe(CLUSTER_TYPE, SubscriptionNames::Wildcard);
    assert!(
        fetch(proxy.client.initial_fetch(CLUSTER_TYPE))
            .await
            .is_applied()
    );
    let held = proxy.client.resource_versions(CLUSTER_TYPE);

    source.update(vec![cluster("good", "1"), cluster("bad", "1")]);
    eventually("the control plane records the NACK", || {
        server.nacks.for_node("delta-nack").len() == 1
    })
    .await;
    assert_eq!(server.nacks.for_node("delta-nack")[0].message, message);
    assert_eq!(proxy.client.resource_versions(CLUSTER_TYPE), held);
    assert_eq!(
        fetch(proxy.client.resource_fetch(CLUSTER_TYPE, "bad", None)).await,
        InitialFetch::Rejected(message.into())
    );
    assert_eq!(
        stat(&proxy.client, "cluster_manager.cds.update_rejected"),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// The exact requests, read from a recording ADS server the test answers by hand.

struct SotwStream {
    requests: Streaming<DiscoveryRequest>,
    responses: mpsc::UnboundedSender<Result<DiscoveryResponse, Status>>,
}

struct DeltaStream {
    requests: Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>,
}

/// Hands every opened stream to the test.
struct RecordingAds {
    sotw: mpsc::UnboundedSender<SotwStream>,
    delta: mpsc::UnboundedSender<DeltaStream>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for RecordingAds {
    type StreamAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (responses, rx) = mpsc::unbounded_channel();
        let _ = self.sotw.send(SotwStream {
            requests: request.into_inner(),
            responses,
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (responses, rx) = mpsc::unbounded_channel();
        let _ = self.delta.send(DeltaStream {
            requests: request.into_inner(),
            responses,
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

struct Recording {
    addr: SocketAddr,
    sotw: mpsc::UnboundedReceiver<SotwStream>,
    delta: mpsc::UnboundedReceiver<DeltaStream>,
}

async fn recording_server() -> Recording {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (sotw_tx, sotw) = mpsc::unbounded_channel();
    let (delta_tx, delta) = mpsc::unbounded_channel();
    let service = AggregatedDiscoveryServiceServer::new(RecordingAds {
        sotw: sotw_tx,
        delta: delta_tx,
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Recording { addr, sotw, delta }
}

async fn next_stream<T>(streams: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, streams.recv())
        .await
        .expect("a stream opens")
        .expect("server running")
}

async fn next_request<T: std::fmt::Debug>(requests: &mut Streaming<T>) -> T {
    match tokio::time::timeout(WAIT, requests.message()).await {
        Ok(Ok(Some(request))) => request,
        other => panic!("expected a request, got {other:?}"),
    }
}

async fn expect_no_request<T: std::fmt::Debug>(requests: &mut Streaming<T>) {
    if let Ok(got) = tokio::time::timeout(SILENCE, requests.message()).await {
        panic!("expected no request, got {got:?}");
    }
}

fn cds_response(version: &str, nonce: &str, names: &[&str]) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.into(),
        resources: names.iter().map(|n| cluster_any(n, "1")).collect(),
        type_url: CLUSTER_TYPE.into(),
        nonce: nonce.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn sotw_requests_carry_node_once_versions_nonces_and_error_detail() {
    let mut server = recording_server().await;
    let handler = Recorder::rejecting("bad", "cluster bad: unsupported");
    let proxy = start_client(
        config(server.addr, "recorded", XdsMode::Sotw),
        handler.clone(),
    );
    proxy
        .client
        .subscribe(CLUSTER_TYPE, SubscriptionNames::Wildcard);

    let mut stream = next_stream(&mut server.sotw).await;
    let first = next_request(&mut stream.requests).await;
    assert_eq!(first.node.as_ref().map(|n| n.id.as_str()), Some("recorded"));
    assert_eq!(first.type_url, CLUSTER_TYPE);
    assert!(first.resource_names.is_empty(), "legacy wildcard");
    assert_eq!(
        (first.version_info.as_str(), first.response_nonce.as_str()),
        ("", "")
    );
    assert!(first.error_detail.is_none());

    // ACK: the new version and the nonce; no node.
    let _ = stream.responses.send(Ok(cds_response("v1", "n1", &["a"])));
    let ack = next_request(&mut stream.requests).await;
    assert!(ack.node.is_none());
    assert_eq!(ack.type_url, CLUSTER_TYPE);
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("v1", "n1")
    );
    assert!(ack.error_detail.is_none());
    assert!(ack.resource_names.is_empty());

    // NACK: the previous version, the rejected response's nonce, INVALID_ARGUMENT + message.
    let _ = stream
        .responses
        .send(Ok(cds_response("v2", "n2", &["a", "bad"])));
    let nack = next_request(&mut stream.requests).await;
    assert_eq!(
        (nack.version_info.as_str(), nack.response_nonce.as_str()),
        ("v1", "n2")
    );
    let error = nack.error_detail.expect("error_detail");
    assert_eq!(error.code, 3);
    assert_eq!(error.message, "cluster bad: unsupported");
    assert_eq!(
        proxy.client.accepted_version(CLUSTER_TYPE).as_deref(),
        Some("v1")
    );

    // A protocol-level problem is NACKed without calling the handler.
    let mut wrong = cds_response("v3", "n3", &["a"]);
    wrong.resources.push(cla("x", 0).2);
    let _ = stream.responses.send(Ok(wrong));
    let nack = next_request(&mut stream.requests).await;
    assert_eq!(
        (nack.version_info.as_str(), nack.response_nonce.as_str()),
        ("v1", "n3")
    );
    let error = nack.error_detail.expect("error_detail").message;
    assert!(error.contains("resources[1]: type_url"), "{error}");
    assert_eq!(handler.calls().len(), 2);

    // A named subscription: its own (empty) version and nonce.
    proxy
        .client
        .subscribe(ENDPOINT_TYPE, SubscriptionNames::names(["x"]));
    let eds = next_request(&mut stream.requests).await;
    assert!(eds.node.is_none());
    assert_eq!(eds.type_url, ENDPOINT_TYPE);
    assert_eq!(eds.resource_names, ["x"]);
    assert_eq!(
        (eds.version_info.as_str(), eds.response_nonce.as_str()),
        ("", "")
    );
    let _ = stream.responses.send(Ok(DiscoveryResponse {
        version_info: "e1".into(),
        resources: vec![cla("x", 0).2],
        type_url: ENDPOINT_TYPE.into(),
        nonce: "ne1".into(),
        ..Default::default()
    }));
    let ack = next_request(&mut stream.requests).await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("e1", "ne1")
    );
    assert_eq!(ack.resource_names, ["x"]);
    // Changing the names re-sends the request with the accepted version and latest nonce.
    proxy
        .client
        .subscribe(ENDPOINT_TYPE, SubscriptionNames::names(["x", "y"]));
    let more = next_request(&mut stream.requests).await;
    assert_eq!(more.resource_names, ["x", "y"]);
    assert_eq!(
        (more.version_info.as_str(), more.response_nonce.as_str()),
        ("e1", "ne1")
    );
    // Subscribing to the same names again sends nothing.
    proxy
        .client
        .subscribe(ENDPOINT_TYPE, SubscriptionNames::names(["y", "x"]));
    expect_no_request(&mut stream.requests).await;

    // The stream ends: a new one resubscribes everything, CDS first, with the accepted
    // versions and the node on its first request only.
    drop(stream);
    let mut stream = next_stream(&mut server.sotw).await;
    let cds = next_request(&mut stream.requests).await;
    assert_eq!(cds.node.as_ref().map(|n| n.id.as_str()), Some("recorded"));
    assert_eq!(cds.type_url, CLUSTER_TYPE);
    assert!(cds.resource_names.is_empty());
    assert_eq!(
        (cds.version_info.as_str(), cds.response_nonce.as_str()),
        ("v1", "")
    );
    let eds = next_request(&mut stream.requests).await;
    assert!(eds.node.is_none());
    assert_eq!(eds.type_url, ENDPOINT_TYPE);
    assert_eq!(eds.resource_names, ["x", "y"]);
    assert_eq!(
        (eds.version_info.as_str(), eds.response_nonce.as_str()),
        ("e1", "")
    );
    // Nothing was dropped while the stream was gone.
    assert_eq!(handler.calls().len(), 3);
}

fn delta_resource(name: &str, version: &str) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(cluster_any(name, version)),
        ..Default::default()
    }
}

#[tokio::test]
async fn delta_requests_carry_subscription_diffs_nonces_and_initial_resource_versions() {
    let mut server = recording_server().await;
    let handler = Recorder::rejecting("bad", "cluster bad: unsupported");
    let proxy = start_client(
        config(server.addr, "recorded-delta", XdsMode::Delta),
        handler.clone(),
    );
    proxy
        .client
        .subscribe(CLUSTER_TYPE, SubscriptionNames::Wildcard);

    let mut stream = next_stream(&mut server.delta).await;
    let first = next_request(&mut stream.requests).await;
    assert_eq!(
        first.node.as_ref().map(|n| n.id.as_str()),
        Some("recorded-delta")
    );
    assert_eq!(first.type_url, CLUSTER_TYPE);
    assert!(first.resource_names_subscribe.is_empty(), "legacy wildcard");
    assert!(first.initial_resource_versions.is_empty());
    assert!(first.response_nonce.is_empty());

    let _ = stream.responses.send(Ok(DeltaDiscoveryResponse {
        system_version_info: "s1".into(),
        resources: vec![delta_resource("a", "1"), delta_resource("b", "1")],
        type_url: CLUSTER_TYPE.into(),
        nonce: "d1".into(),
        ..Default::default()
    }));
    let ack = next_request(&mut stream.requests).await;
    assert!(ack.node.is_none());
    assert_eq!(ack.type_url, CLUSTER_TYPE);
    assert_eq!(ack.response_nonce, "d1");
    assert!(ack.error_detail.is_none());
    assert!(ack.resource_names_subscribe.is_empty() && ack.resource_names_unsubscribe.is_empty());

    let _ = stream.responses.send(Ok(DeltaDiscoveryResponse {
        system_version_info: "s2".into(),
        type_url: CLUSTER_TYPE.into(),
        removed_resources: vec!["a".into()],
        nonce: "d2".into(),
        ..Default::default()
    }));
    assert_eq!(
        next_request(&mut stream.requests).await.response_nonce,
        "d2"
    );
    let _ = stream.responses.send(Ok(DeltaDiscoveryResponse {
        system_version_info: "s3".into(),
        resources: vec![delta_resource("bad", "1")],
        type_url: CLUSTER_TYPE.into(),
        nonce: "d3".into(),
        ..Default::default()
    }));
    let nack = next_request(&mut stream.requests).await;
    assert_eq!(nack.response_nonce, "d3");
    let error = nack.error_detail.expect("error_detail");
    assert_eq!(
        (error.code, error.message.as_str()),
        (3, "cluster bad: unsupported")
    );
    assert_eq!(
        handler.calls(),
        [
            delta(CLUSTER_TYPE, &["a", "b"], &[]),
            delta(CLUSTER_TYPE, &[], &["a"]),
            Call::Delta {
                type_url: CLUSTER_TYPE.into(),
                updated: strings(&["bad"]),
                removed: vec![],
                accepted: false
            },
        ]
    );
    assert_eq!(
        proxy.client.accepted_version(CLUSTER_TYPE).as_deref(),
        Some("s2")
    );

    // Subscription changes are differences, without a nonce.
    proxy
        .client
        .subscribe(ENDPOINT_TYPE, SubscriptionNames::names(["x"]));
    let eds = next_request(&mut stream.requests).await;
    assert_eq!(eds.type_url, ENDPOINT_TYPE);
    assert_eq!(eds.resource_names_subscribe, ["x"]);
    assert!(eds.response_nonce.is_empty() && eds.node.is_none());
    proxy
        .client
        .subscribe(ENDPOINT_TYPE, SubscriptionNames::names(["y"]));
    let eds = next_request(&mut stream.requests).await;
    assert_eq!(eds.resource_names_subscribe, ["y"]);
    assert_eq!(eds.resource_names_unsubscribe, ["x"]);

    // A new stream: the node once, and what the proxy holds (b at version 1 — not the
    // rejected "bad").
    drop(stream);
    let mut stream = next_stream(&mut server.delta).await;
    let cds = next_request(&mut stream.requests).await;
    assert_eq!(
        cds.node.as_ref().map(|n| n.id.as_str()),
        Some("recorded-delta")
    );
    assert_eq!(cds.type_url, CLUSTER_TYPE);
    assert!(cds.resource_names_subscribe.is_empty());
    assert_eq!(
        cds.initial_resource_versions,
        HashMap::from([("b".to_string(), "1".to_string())])
    );
    let eds = next_request(&mut stream.requests).await;
    assert!(eds.node.is_none());
    assert_eq!(eds.resource_names_subscribe, ["y"]);
    assert!(eds.initial_resource_versions.is_empty());
    assert_eq!(
        proxy
            .client
            .resource_versions(CLUSTER_TYPE)
            .keys()
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([&"b".to_string()])
    );
}
