//! Dynamic configuration end to end: the proxy binary against the control plane's real
//! `XdsServer` (embedded, with a resource source the test edits, on an ephemeral port), with
//! in-test backends. Covers `DESIGN.md`'s init sequence over ADS (CDS → EDS → LDS → RDS, each
//! wait ending on response, failure or `initial_fetch_timeout`), cluster and listener warming,
//! make-before-break listener updates with drain, and NACKs that change nothing.
//!
//! The listeners here use ephemeral ports, never the control plane's fixed 15001, so these
//! tests run concurrently with each other and with `e2e`.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_control_plane::xds::{NackLog, ResourceSource, Resources, XdsServer};
use capstan_proxy::xds::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use http::StatusCode;
use support::{Backend, HCM, Proxy, accepts, eventually, free_port, get};
use tokio::net::TcpListener;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(10);

/// A resource source the test edits: type URL → name → resource.
struct Source {
    items: Mutex<BTreeMap<(&'static str, String), Any>>,
    changes: watch::Sender<u64>,
}

impl Source {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            items: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
        })
    }

    fn put(&self, type_url: &'static str, name: &str, any: Any) {
        self.items
            .lock()
            .expect("lock")
            .insert((type_url, name.to_string()), any);
        self.changes.send_modify(|v| *v += 1);
    }

    fn remove(&self, type_url: &'static str, name: &str) {
        self.items
            .lock()
            .expect("lock")
            .remove(&(type_url, name.to_string()));
        self.changes.send_modify(|v| *v += 1);
    }
}

impl ResourceSource for Source {
    fn resources_for(&self, _node: &Node) -> Arc<Resources> {
        let mut r = Resources::default();
        for ((t, n), any) in self.items.lock().expect("lock").iter() {
            r.by_type
                .entry((*t).to_string())
                .or_default()
                .insert(n.clone(), any.clone());
        }
        Arc::new(r)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// The real xDS server on an ephemeral port.
async fn xds_server(source: Arc<Source>) -> (u16, Arc<NackLog>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = XdsServer::new(source);
    let nacks = server.nacks();
    tokio::spawn(async move {
        let _ = server.serve(listener, std::future::pending::<()>()).await;
    });
    (port, nacks)
}

fn yaml<M: prost::Message + prost::Name + Default>(text: &str) -> Any {
    pack_any(capstan_proto::from_yaml::<M>(text).expect("test resource parses"))
}

fn eds_cluster(name: &str, extra: &str) -> Any {
    yaml::<Cluster>(&format!(
        "name: {name}\ntype: EDS\nconnect_timeout: 1s\neds_cluster_config: {{ eds_config: {{ ads: {{}}, initial_fetch_timeout: 5s }} }}\n{extra}"
    ))
}

fn assignment(name: &str, ports: &[u16]) -> Any {
    let eps: Vec<String> = ports
        .iter()
        .map(|p| format!("{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }} }}"))
        .collect();
    yaml::<ClusterLoadAssignment>(&format!(
        "cluster_name: {name}\nendpoints: [{{ lb_endpoints: [{}] }}]\n",
        eps.join(", ")
    ))
}

fn rds_listener(name: &str, port: u16, route: &str) -> Any {
    yaml::<Listener>(&format!(
        r#"name: {name}
address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": {HCM}
      stat_prefix: {name}
      rds: {{ route_config_name: {route}, config_source: {{ ads: {{}}, initial_fetch_timeout: 30s }} }}
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    ))
}

fn route(name: &str, cluster: &str) -> Any {
    yaml::<RouteConfiguration>(&format!(
        "name: {name}\nvirtual_hosts:\n- name: all\n  domains: [\"*\"]\n  routes: [{{ match: {{ prefix: / }}, route: {{ cluster: {cluster} }} }}]\n"
    ))
}

/// An ADS bootstrap: admin on `ADMIN_PORT`, the control plane at `xds_port`, CDS and LDS
/// over ADS with the given `initial_fetch_timeout`, plus `extra_static` listeners.
fn ads_bootstrap(xds_port: u16, fetch_timeout: &str, extra_static: &str) -> String {
    ads_bootstrap_with(xds_port, "GRPC", fetch_timeout, extra_static)
}

fn ads_bootstrap_with(
    xds_port: u16,
    api_type: &str,
    fetch_timeout: &str,
    extra_static: &str,
) -> String {
    format!(
        r#"node: {{ id: proxy-0.default, cluster: proxy }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: ADMIN_PORT }} }} }}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}]
  cds_config: {{ ads: {{}}, initial_fetch_timeout: {fetch_timeout} }}
  lds_config: {{ ads: {{}}, initial_fetch_timeout: {fetch_timeout} }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {xds_port} }} }} }}
{extra_static}"#
    )
}

async fn backend_of(port: u16, path: &str) -> Option<String> {
    let reply = get(port, "svc", path).await;
    (reply.status == StatusCode::OK)
        .then(|| reply.backend())
        .flatten()
}

async fn stat(proxy: &Proxy, name: &str) -> Option<i64> {
    let text = proxy.admin_get("/stats").await.text();
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

async fn ready_state(proxy: &Proxy) -> Option<(StatusCode, String)> {
    proxy.ready().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ads_configures_clusters_endpoints_listeners_and_routes_and_follows_updates() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let source = Source::new();
    let (xds_port, nacks) = xds_server(source.clone()).await;
    let port = free_port();
    source.put(CLUSTER_TYPE, "web", eds_cluster("web", ""));
    source.put(CLUSTER_TYPE, "api", eds_cluster("api", ""));
    source.put(ENDPOINT_TYPE, "web", assignment("web", &[a.port()]));
    source.put(ENDPOINT_TYPE, "api", assignment("api", &[b.port()]));
    source.put(
        LISTENER_TYPE,
        "outbound",
        rds_listener("outbound", port, "routes"),
    );
    source.put(ROUTE_TYPE, "routes", route("routes", "web"));

    let proxy = Proxy::start(&ads_bootstrap(xds_port, "5s", ""), &["--drain-time-s", "1"]);
    proxy.wait_live().await;
    assert_eq!(backend_of(port, "/").await.as_deref(), Some("a"));

    // EDS: the assignment moves to b.
    source.put(ENDPOINT_TYPE, "web", assignment("web", &[b.port()]));
    assert!(
        eventually(WAIT, async || backend_of(port, "/").await.as_deref()
            == Some("b"))
        .await,
        "EDS update applied"
    );
    // RDS: the route moves to api (b); then back to web with a, through a route swap.
    source.put(ENDPOINT_TYPE, "web", assignment("web", &[a.port()]));
    source.put(ROUTE_TYPE, "routes", route("routes", "api"));
    assert!(
        eventually(WAIT, async || backend_of(port, "/").await.as_deref()
            == Some("b"))
        .await,
        "RDS update applied"
    );

    let dump = proxy.admin_get("/config_dump").await.json();
    let text = dump.to_string();
    for expected in [
        "dynamic_active_clusters",
        "dynamic_listeners",
        "active_state",
        "dynamic_route_configs",
        "\"outbound\"",
    ] {
        assert!(text.contains(expected), "{expected} missing in {text}");
    }
    let listeners = dump["configs"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["dynamic_listeners"].is_array()))
        .map(|c| c["dynamic_listeners"].clone())
        .expect("a listeners dump");
    assert_eq!(listeners[0]["name"], "outbound");
    assert!(
        listeners[0]["active_state"]["version_info"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "version_info from the xDS client: {listeners}"
    );
    assert_eq!(
        stat(&proxy, "cluster_manager.active_clusters").await,
        Some(3)
    );
    assert_eq!(
        stat(&proxy, "cluster_manager.warming_clusters").await,
        Some(0)
    );
    assert_eq!(
        stat(&proxy, "listener_manager.total_listeners_active").await,
        Some(1)
    );
    assert_eq!(
        stat(&proxy, "listener_manager.total_listeners_warming").await,
        Some(0)
    );
    assert_eq!(stat(&proxy, "control_plane.connected_state").await, Some(1));
    assert!(stat(&proxy, "cluster_manager.cds.update_success").await >= Some(1));

    // CDS removal of a cluster the route no longer uses.
    source.remove(CLUSTER_TYPE, "web");
    source.remove(ENDPOINT_TYPE, "web");
    assert!(
        eventually(WAIT, async || stat(
            &proxy,
            "cluster_manager.active_clusters"
        )
        .await
            == Some(2))
        .await
    );
    assert!(nacks.is_empty(), "{:?}", nacks.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_plane_down_keeps_initializing_until_initial_fetch_timeout() {
    let a = Backend::start("a").await;
    let xds_port = free_port(); // nobody listens
    let port = free_port();
    let statics = format!(
        r#"{cluster}  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: ingress
          route_config:
            virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: / }}, route: {{ cluster: local }} }}] }}]
"#,
        cluster = support::static_cluster("local", &[a.port()], "")
    );
    let bootstrap = ads_bootstrap(xds_port, "1s", &statics);
    let proxy = Proxy::start(&bootstrap, &["--drain-time-s", "1"]);
    assert!(
        eventually(WAIT, async || ready_state(&proxy).await.is_some()).await,
        "admin up; stderr:\n{}",
        proxy.stderr()
    );
    let (status, state) = ready_state(&proxy).await.expect("admin");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        state == "PRE_INITIALIZING" || state == "INITIALIZING",
        "{state}"
    );
    assert!(!accepts(port).await, "listener refuses while initializing");
    // CDS (1 s) and LDS (1 s) time out; then the static listener serves.
    proxy.wait_live().await;
    assert_eq!(backend_of(port, "/").await.as_deref(), Some("a"));
    assert!(stat(&proxy, "cluster_manager.cds.init_fetch_timeout").await >= Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_back_eds_and_rds_keep_503_until_they_arrive() {
    let a = Backend::start("a").await;
    let source = Source::new();
    let (xds_port, _nacks) = xds_server(source.clone()).await;
    let port = free_port();
    source.put(CLUSTER_TYPE, "web", eds_cluster("web", ""));
    source.put(
        LISTENER_TYPE,
        "outbound",
        rds_listener("outbound", port, "routes"),
    );
    let proxy = Proxy::start(
        &ads_bootstrap(xds_port, "30s", ""),
        &["--drain-time-s", "1"],
    );
    assert!(eventually(WAIT, async || ready_state(&proxy).await.is_some()).await);

    // EDS held back: the CDS cluster is warming; nothing accepts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = ready_state(&proxy).await.expect("admin");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        stat(&proxy, "cluster_manager.warming_clusters").await,
        Some(1)
    );
    assert!(!accepts(port).await);

    // EDS arrives; RDS is still held back: the listener warms, still 503.
    source.put(ENDPOINT_TYPE, "web", assignment("web", &[a.port()]));
    assert!(
        eventually(WAIT, async || stat(
            &proxy,
            "listener_manager.total_listeners_warming"
        )
        .await
            == Some(1))
        .await,
        "listener warming on RDS; stderr:\n{}",
        proxy.stderr()
    );
    let (status, state) = ready_state(&proxy).await.expect("admin");
    assert_eq!(
        (status, state.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "INITIALIZING")
    );
    assert!(!accepts(port).await);
    let dump = proxy.admin_get("/config_dump").await.json().to_string();
    assert!(dump.contains("warming_state"), "{dump}");

    // RDS arrives: LIVE, and traffic flows.
    source.put(ROUTE_TYPE, "routes", route("routes", "web"));
    proxy.wait_live().await;
    assert_eq!(backend_of(port, "/").await.as_deref(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nacked_first_cds_response_ends_the_wait_and_names_the_field() {
    let source = Source::new();
    let (xds_port, nacks) = xds_server(source.clone()).await;
    source.put(
        CLUSTER_TYPE,
        "outbound|80||x",
        eds_cluster(
            "outbound|80||x",
            "health_checks: [{ timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, custom_health_check: { name: x } }]\n",
        ),
    );
    let proxy = Proxy::start(&ads_bootstrap(xds_port, "30s", ""), &[]);
    // CDS ends on the NACK and LDS on its (empty) first response: LIVE well before 30 s.
    proxy.wait_live().await;
    let nack = nacks.latest_for_node("proxy-0.default").expect("a NACK");
    assert_eq!(nack.type_url, CLUSTER_TYPE);
    assert!(
        nack.message.contains(
            "Cluster outbound|80||x: health_checks[0].custom_health_check: unsupported field"
        ),
        "{}",
        nack.message
    );
    assert_eq!(
        stat(&proxy, "cluster_manager.active_clusters").await,
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsupported_updates_are_nacked_and_traffic_keeps_the_previous_config() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let source = Source::new();
    let (xds_port, nacks) = xds_server(source.clone()).await;
    let port = free_port();
    source.put(CLUSTER_TYPE, "web", eds_cluster("web", ""));
    source.put(ENDPOINT_TYPE, "web", assignment("web", &[a.port()]));
    source.put(
        LISTENER_TYPE,
        "outbound",
        rds_listener("outbound", port, "routes"),
    );
    source.put(ROUTE_TYPE, "routes", route("routes", "web"));
    let proxy = Proxy::start(&ads_bootstrap(xds_port, "5s", ""), &[]);
    proxy.wait_live().await;

    // An RDS update with an unsupported field is rejected; routing is unchanged.
    source.put(
        ROUTE_TYPE,
        "routes",
        yaml::<RouteConfiguration>(
            "name: routes\nvirtual_hosts:\n- name: all\n  domains: [\"*\"]\n  routes: [{ match: { prefix: / }, route: { cluster: web, hash_policy: [{ filter_state: { key: x-user } }] } }]\n",
        ),
    );
    assert!(
        eventually(WAIT, async || nacks
            .for_node("proxy-0.default")
            .iter()
            .any(|n| n.type_url == ROUTE_TYPE))
        .await,
        "RDS NACK; nacks {:?}; stderr:\n{}",
        nacks.all(),
        proxy.stderr()
    );
    let rds_nack = nacks
        .for_node("proxy-0.default")
        .into_iter()
        .find(|n| n.type_url == ROUTE_TYPE)
        .expect("RDS nack");
    assert!(
        rds_nack.message.contains("RouteConfiguration routes: virtual_hosts[0].routes[0].route.hash_policy[0].filter_state: unsupported field"),
        "{}",
        rds_nack.message
    );
    assert_eq!(backend_of(port, "/").await.as_deref(), Some("a"));
    // A cluster update with an unsupported field, and a second (valid) cluster in the same
    // response: the whole response is rejected.
    source.put(
        CLUSTER_TYPE,
        "web",
        eds_cluster(
            "web",
            "outlier_detection: { max_ejection_time_jitter: 1s }\n",
        ),
    );
    source.put(CLUSTER_TYPE, "other", eds_cluster("other", ""));
    assert!(
        eventually(WAIT, async || nacks
            .for_node("proxy-0.default")
            .iter()
            .any(|n| n.type_url == CLUSTER_TYPE))
        .await,
        "NACKed"
    );
    let nack = nacks
        .for_node("proxy-0.default")
        .into_iter()
        .find(|n| n.type_url == CLUSTER_TYPE)
        .expect("CDS nack");
    assert!(
        nack.message
            .contains("Cluster web: outlier_detection.max_ejection_time_jitter: unsupported field"),
        "{}",
        nack.message
    );
    assert_eq!(
        stat(&proxy, "cluster_manager.active_clusters").await,
        Some(2)
    );
    assert_eq!(backend_of(port, "/").await.as_deref(), Some("a"));

    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_update_warms_on_rds_then_takes_over_while_the_old_one_drains() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let source = Source::new();
    let (xds_port, nacks) = xds_server(source.clone()).await;
    let port = free_port();
    source.put(CLUSTER_TYPE, "web", eds_cluster("web", ""));
    source.put(CLUSTER_TYPE, "api", eds_cluster("api", ""));
    source.put(ENDPOINT_TYPE, "web", assignment("web", &[a.port()]));
    source.put(ENDPOINT_TYPE, "api", assignment("api", &[b.port()]));
    source.put(
        LISTENER_TYPE,
        "outbound",
        rds_listener("outbound", port, "r1"),
    );
    source.put(ROUTE_TYPE, "r1", route("r1", "web"));
    let proxy = Proxy::start(&ads_bootstrap(xds_port, "5s", ""), &["--drain-time-s", "1"]);
    proxy.wait_live().await;
    assert_eq!(backend_of(port, "/").await.as_deref(), Some("a"));

    // A long request on the old listener.
    let long = tokio::spawn(async move { get(port, "svc", "/slow/1500").await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The listener changes to route configuration r2, held back: it warms, the old serves.
    source.put(
        LISTENER_TYPE,
        "outbound",
        rds_listener("outbound", port, "r2"),
    );
    assert!(
        eventually(WAIT, async || stat(
            &proxy,
            "listener_manager.total_listeners_warming"
        )
        .await
            == Some(1))
        .await
    );
    for _ in 0..5 {
        assert_eq!(backend_of(port, "/").await.as_deref(), Some("a"));
    }

    // r2 arrives: the new listener takes over the socket. Four clients keep sending
    // requests on fresh connections throughout; none may fail.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match backend_of(port, "/").await {
                        Some(_) => ok += 1,
                        None => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    source.put(ROUTE_TYPE, "r2", route("r2", "api"));
    let seen_b = eventually(WAIT, async || {
        backend_of(port, "/").await.as_deref() == Some("b")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for l in load {
        let (o, f) = l.await.expect("load task");
        ok += o;
        failed += f;
    }
    assert!(seen_b, "the new listener serves");
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during the handover",
        ok + failed
    );
    assert!(ok > 20, "load ran ({ok} requests)");
    assert_eq!(
        stat(&proxy, "listener_manager.listener_modified").await,
        Some(1)
    );

    let reply = long.await.expect("long request");
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "the in-flight request completed during drain"
    );
    assert_eq!(reply.backend().as_deref(), Some("a"));

    // The listener is removed: it drains and closes.
    source.remove(LISTENER_TYPE, "outbound");
    assert!(eventually(WAIT, async || !accepts(port).await).await);
    assert_eq!(
        stat(&proxy, "listener_manager.listener_removed").await,
        Some(1)
    );
    assert!(nacks.is_empty(), "{:?}", nacks.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_eds_cluster_warms_while_the_old_one_serves() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let source = Source::new();
    let (xds_port, nacks) = xds_server(source.clone()).await;
    let port = free_port();
    source.put(CLUSTER_TYPE, "web", eds_cluster("web", ""));
    source.put(ENDPOINT_TYPE, "web", assignment("web", &[a.port()]));
    source.put(
        LISTENER_TYPE,
        "outbound",
        rds_listener("outbound", port, "routes"),
    );
    source.put(ROUTE_TYPE, "routes", route("routes", "web"));
    let proxy = Proxy::start(&ads_bootstrap(xds_port, "5s", ""), &[]);
    proxy.wait_live().await;

    // web now reads EDS service web-v2, whose assignment is held back: web warms and the
    // active web keeps serving a.
    source.put(
        CLUSTER_TYPE,
        "web",
        yaml::<Cluster>(
            "name: web\ntype: EDS\nconnect_timeout: 2s\neds_cluster_config: { service_name: web-v2, eds_config: { ads: {}, initial_fetch_timeout: 30s } }\n",
        ),
    );
    assert!(
        eventually(WAIT, async || stat(
            &proxy,
            "cluster_manager.warming_clusters"
        )
        .await
            == Some(1))
        .await,
        "web warming; stderr:\n{}",
        proxy.stderr()
    );
    let dump = proxy.admin_get("/config_dump").await.json().to_string();
    assert!(dump.contains("dynamic_warming_clusters"), "{dump}");
    for _ in 0..5 {
        assert_eq!(backend_of(port, "/").await.as_deref(), Some("a"));
    }

    // The assignment arrives: the new web replaces the old one.
    source.put(ENDPOINT_TYPE, "web-v2", assignment("web-v2", &[b.port()]));
    assert!(
        eventually(WAIT, async || backend_of(port, "/").await.as_deref()
            == Some("b"))
        .await
    );
    assert_eq!(
        stat(&proxy, "cluster_manager.warming_clusters").await,
        Some(0)
    );
    assert_eq!(
        stat(&proxy, "cluster_manager.cluster_modified").await,
        Some(1)
    );
    assert!(nacks.is_empty(), "{:?}", nacks.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_ads_adds_updates_and_removes_resources() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let source = Source::new();
    let (xds_port, nacks) = xds_server(source.clone()).await;
    let port = free_port();
    let second = free_port();
    source.put(CLUSTER_TYPE, "web", eds_cluster("web", ""));
    source.put(ENDPOINT_TYPE, "web", assignment("web", &[a.port()]));
    source.put(
        LISTENER_TYPE,
        "outbound",
        rds_listener("outbound", port, "routes"),
    );
    source.put(
        LISTENER_TYPE,
        "second",
        rds_listener("second", second, "routes"),
    );
    source.put(ROUTE_TYPE, "routes", route("routes", "web"));
    let proxy = Proxy::start(
        &ads_bootstrap_with(xds_port, "DELTA_GRPC", "5s", ""),
        &["--drain-time-s", "1"],
    );
    proxy.wait_live().await;
    assert_eq!(backend_of(port, "/").await.as_deref(), Some("a"));
    assert_eq!(backend_of(second, "/").await.as_deref(), Some("a"));

    source.put(ENDPOINT_TYPE, "web", assignment("web", &[b.port()]));
    assert!(
        eventually(WAIT, async || backend_of(port, "/").await.as_deref()
            == Some("b"))
        .await
    );
    // A delta removal of one listener leaves the other alone.
    source.remove(LISTENER_TYPE, "second");
    assert!(eventually(WAIT, async || !accepts(second).await).await);
    assert_eq!(backend_of(port, "/").await.as_deref(), Some("b"));
    assert!(nacks.is_empty(), "{:?}", nacks.all());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_renamed_on_the_same_address_keeps_serving() {
    let a = Backend::start("a").await;
    let source = Source::new();
    let (xds_port, nacks) = xds_server(source.clone()).await;
    let port = free_port();
    source.put(CLUSTER_TYPE, "web", eds_cluster("web", ""));
    source.put(ENDPOINT_TYPE, "web", assignment("web", &[a.port()]));
    source.put(
        LISTENER_TYPE,
        "outbound",
        rds_listener("outbound", port, "routes"),
    );
    source.put(ROUTE_TYPE, "routes", route("routes", "web"));
    let proxy = Proxy::start(&ads_bootstrap(xds_port, "5s", ""), &["--drain-time-s", "1"]);
    proxy.wait_live().await;

    // One snapshot: "outbound" removed, "renamed" added on the same port.
    {
        let mut items = source.items.lock().expect("lock");
        items.remove(&(LISTENER_TYPE, "outbound".to_string()));
        items.insert(
            (LISTENER_TYPE, "renamed".to_string()),
            rds_listener("renamed", port, "routes"),
        );
    }
    source.changes.send_modify(|v| *v += 1);
    assert!(
        eventually(WAIT, async || stat(
            &proxy,
            "listener_manager.listener_removed"
        )
        .await
            == Some(1))
        .await
    );
    // A rename on the same address is a removal plus an add; the removed listener keeps
    // accepting until the new one is warm and takes its socket, so no connection is refused
    // at any point (`backend_of` fails the test on a refused connection).
    assert!(
        eventually(WAIT, async || backend_of(port, "/").await.as_deref()
            == Some("a"))
        .await,
        "the renamed listener serves; stderr:\n{}",
        proxy.stderr()
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        backend_of(port, "/").await.as_deref(),
        Some("a"),
        "still serving after the drain"
    );
    assert!(nacks.is_empty(), "{:?}", nacks.all());
}
