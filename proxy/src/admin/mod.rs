//! The admin interface (`admin.address`, `127.0.0.1:15000` by default) and the readiness-only
//! listener (`--readiness-address`, `0.0.0.0:15021`), with Envoy's endpoints and formats.
//!
//! | endpoint | |
//! | --- | --- |
//! | `GET /ready` | `200 LIVE`, or 503 with the state name |
//! | `GET /server_info` | `envoy.admin.v3.ServerInfo` as JSON |
//! | `GET /stats`, `/stats?format=json\|prometheus&filter=RE`, `/stats/prometheus` | stats |
//! | `GET /clusters[?format=json]`, `/listeners[?format=json]` | runtime state |
//! | `GET /config_dump`, `/init_dump` | configuration and unready init targets |
//! | `POST /healthcheck/fail`, `/healthcheck/ok` | fail / restore `/ready` (DRAINING) |
//! | `POST /drain_listeners[?graceful]`, `/quitquitquit` | drain listeners; shut down |
//!
//! The readiness listener answers `/ready` and nothing else. Admin reads the server's state and
//! asks for shutdown through [`crate::server::state::Status`]; it changes no configuration.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use envoy_types::pb::envoy::admin::v3 as admin_pb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, Timestamp};
use envoy_types::util::pack_any;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::TcpListener;

use crate::cluster::Cluster;
use crate::server::Server;
use crate::server::state::{ServerState, ShutdownReason};
use crate::stats;

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Full,
    ReadinessOnly,
}

/// The admin handlers over a running server.
#[derive(Debug)]
pub struct Admin {
    server: Arc<Server>,
}

/// Accepts admin connections until the process exits.
pub async fn serve(socket: TcpListener, admin: Arc<Admin>, scope: Scope) {
    loop {
        let (stream, _) = match socket.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move {
                    let response = admin.handle(req, scope);
                    // JSON renderings (`/config_dump`, `/server_info`, …) decode the descriptor
                    // pool on demand; it is not kept between requests (≈ a few MB at rest).
                    if capstan_proto::release_pool() {
                        crate::memory::release_free_heap();
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

type AdminResponse = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    respond(status, "text/plain; charset=UTF-8", body.into())
}

fn json(value: &serde_json::Value) -> AdminResponse {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    respond(StatusCode::OK, "application/json", Bytes::from(body))
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> AdminResponse {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache, max-age=0"),
    );
    r
}

const MUTATING: &[&str] = &[
    "/healthcheck/fail",
    "/healthcheck/ok",
    "/drain_listeners",
    "/quitquitquit",
];

const HELP: &str = "admin commands are:
  /: this list
  /clusters: upstream cluster status
  /config_dump: dump current Envoy configs
  /drain_listeners (POST): drain listeners
  /healthcheck/fail (POST): cause the server to fail health checks
  /healthcheck/ok (POST): cause the server to pass health checks
  /init_dump: dump unready init targets
  /listeners: print listener info
  /quitquitquit (POST): exit the server
  /ready: print server state, return 200 if LIVE, otherwise return 503
  /server_info: print server version/status information
  /stats: print server stats
  /stats/prometheus: print server stats in prometheus format
";

impl Admin {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }

    fn handle(&self, req: Request<Incoming>, scope: Scope) -> AdminResponse {
        let path = req.uri().path();
        let query = parse_query(req.uri().query().unwrap_or(""));
        if scope == Scope::ReadinessOnly && path != "/ready" {
            return text(StatusCode::NOT_FOUND, "");
        }
        if MUTATING.contains(&path) && req.method() != Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("Method {} not allowed, POST required.", req.method()),
            );
        }
        match path {
            "/" => text(StatusCode::OK, HELP),
            "/ready" => self.ready(),
            "/server_info" => self.server_info(),
            "/stats" => self.stats(&query),
            "/stats/prometheus" => text(
                StatusCode::OK,
                stats::render_prometheus(&self.filtered_stats(&query)),
            ),
            "/clusters" => self.clusters(&query),
            "/listeners" => self.listeners(&query),
            "/config_dump" => self.config_dump(),
            "/init_dump" => self.init_dump(),
            "/healthcheck/fail" => {
                self.server.status.set_health_check_failed(true);
                text(StatusCode::OK, "OK\n")
            }
            "/healthcheck/ok" => {
                self.server.status.set_health_check_failed(false);
                text(StatusCode::OK, "OK\n")
            }
            "/drain_listeners" => self.drain_listeners(&query),
            "/quitquitquit" => {
                self.server
                    .status
                    .request_shutdown(ShutdownReason::QuitQuitQuit);
                text(StatusCode::OK, "OK\n")
            }
            _ => text(StatusCode::NOT_FOUND, format!("invalid path. {HELP}")),
        }
    }

    fn ready(&self) -> AdminResponse {
        let state = self.server.status.state();
        let status = if state == ServerState::Live {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        text(status, format!("{}\n", state.as_str()))
    }

    fn server_info(&self) -> AdminResponse {
        let s = &self.server;
        let uptime = pb_duration(s.status.uptime());
        let info = admin_pb::ServerInfo {
            version: format!("capstan-proxy/{}", crate::VERSION),
            state: 0,
            uptime_current_epoch: Some(uptime),
            uptime_all_epochs: Some(uptime),
            hot_restart_version: "disabled".into(),
            command_line_options: Some(admin_pb::CommandLineOptions {
                concurrency: u32::try_from(s.options.concurrency).unwrap_or(u32::MAX),
                config_path: s.options.config_path.clone(),
                log_level: s.options.log_level.clone(),
                service_node: s.bootstrap.node.id.clone(),
                service_cluster: s.bootstrap.node.cluster.clone(),
                drain_time: Some(pb_duration(s.options.drain_time)),
                disable_hot_restart: true,
                ..Default::default()
            }),
            node: s.bootstrap.source.node.clone(),
            ..Default::default()
        };
        let mut value = capstan_proto::to_json(&info).unwrap_or_default();
        if let serde_json::Value::Object(map) = &mut value {
            // proto3 JSON omits the zero enum value; Envoy's admin always prints the state.
            map.insert(
                "state".into(),
                serde_json::Value::String(s.status.state().as_str().into()),
            );
        }
        json(&value)
    }

    fn filtered_stats(&self, query: &HashMap<String, String>) -> Vec<stats::Sample> {
        let mut samples = self.server.stats.samples();
        if let Some(filter) = query.get("filter")
            && let Ok(re) = regex::Regex::new(filter)
        {
            samples.retain(|s| re.is_match(&s.name));
        }
        if query.contains_key("usedonly") {
            samples.retain(|s| s.value != 0);
        }
        samples
    }

    fn stats(&self, query: &HashMap<String, String>) -> AdminResponse {
        if let Some(filter) = query.get("filter")
            && let Err(e) = regex::Regex::new(filter)
        {
            return text(StatusCode::BAD_REQUEST, format!("Invalid regex: {e}\n"));
        }
        let samples = self.filtered_stats(query);
        match query.get("format").map(String::as_str) {
            Some("json") => json(&stats::render_json(&samples)),
            Some("prometheus") => text(StatusCode::OK, stats::render_prometheus(&samples)),
            _ => text(StatusCode::OK, stats::render_text(&samples)),
        }
    }

    fn clusters(&self, query: &HashMap<String, String>) -> AdminResponse {
        let clusters = self.server.clusters.clusters();
        if query.get("format").map(String::as_str) == Some("json") {
            let statuses = admin_pb::Clusters {
                cluster_statuses: clusters.iter().map(|c| cluster_status(c)).collect(),
            };
            return json(&capstan_proto::to_json(&statuses).unwrap_or_default());
        }
        let mut out = String::new();
        for c in &clusters {
            let name = c.name();
            out.push_str(&format!("{name}::observability_name::{name}\n"));
            out.push_str(&format!("{name}::added_via_api::{}\n", c.added_via_api()));
            for h in c.host_set().hosts.iter() {
                let p = format!("{name}::{}", h.address);
                let s = &h.stats;
                for (k, v) in [
                    ("cx_active", s.cx_active.get().to_string()),
                    ("cx_connect_fail", s.cx_connect_fail.get().to_string()),
                    ("cx_total", s.cx_total.get().to_string()),
                    ("rq_active", s.rq_active.get().to_string()),
                    ("rq_error", s.rq_error.get().to_string()),
                    ("rq_success", s.rq_success.get().to_string()),
                    ("rq_timeout", s.rq_timeout.get().to_string()),
                    ("rq_total", s.rq_total.get().to_string()),
                    ("hostname", h.hostname.clone()),
                    ("health_flags", health_flags(h).to_string()),
                    ("weight", h.weight().to_string()),
                    ("region", h.locality.region.clone()),
                    ("zone", h.locality.zone.clone()),
                    ("sub_zone", h.locality.sub_zone.clone()),
                    ("canary", "false".to_string()),
                    ("priority", h.priority().to_string()),
                    ("success_rate", "-1".to_string()),
                    ("local_origin_success_rate", "-1".to_string()),
                ] {
                    out.push_str(&format!("{p}::{k}::{v}\n"));
                }
            }
        }
        text(StatusCode::OK, out)
    }

    fn listeners(&self, query: &HashMap<String, String>) -> AdminResponse {
        let listeners = self.server.listeners.listeners();
        if query.get("format").map(String::as_str) == Some("json") {
            let statuses = admin_pb::Listeners {
                listener_statuses: listeners
                    .iter()
                    .map(|l| admin_pb::ListenerStatus {
                        name: l.name().to_string(),
                        local_address: Some(address(l.local_address())),
                        ..Default::default()
                    })
                    .collect(),
            };
            return json(&capstan_proto::to_json(&statuses).unwrap_or_default());
        }
        let mut out = String::new();
        for l in &listeners {
            out.push_str(&format!("{}::{}\n", l.name(), l.local_address()));
        }
        text(StatusCode::OK, out)
    }

    fn config_dump(&self) -> AdminResponse {
        let s = &self.server;
        let updated = Some(timestamp(s.loaded_at));
        let now = Some(timestamp(SystemTime::now()));
        let version = |type_url: &str| {
            let versions = s
                .xds()
                .map(|c| c.resource_versions(type_url))
                .unwrap_or_default();
            move |name: &str| versions.get(name).cloned().unwrap_or_default()
        };
        let cluster_version = version(crate::xds::CLUSTER_TYPE);
        let listener_version = version(crate::xds::LISTENER_TYPE);
        let route_version = version(crate::xds::ROUTE_TYPE);
        let bootstrap = admin_pb::BootstrapConfigDump {
            bootstrap: Some((*s.bootstrap.source).clone()),
            last_updated: updated,
        };
        let clusters = admin_pb::ClustersConfigDump {
            static_clusters: s
                .clusters
                .clusters()
                .iter()
                .filter(|c| !c.added_via_api())
                .map(|c| admin_pb::clusters_config_dump::StaticCluster {
                    cluster: Some(pack_any((*c.config().source).clone())),
                    last_updated: updated,
                })
                .collect(),
            dynamic_active_clusters: s
                .clusters
                .clusters()
                .iter()
                .filter(|c| c.added_via_api())
                .map(|c| admin_pb::clusters_config_dump::DynamicCluster {
                    version_info: cluster_version(c.name()),
                    cluster: Some(pack_any((*c.config().source).clone())),
                    last_updated: now,
                    ..Default::default()
                })
                .collect(),
            dynamic_warming_clusters: s
                .clusters
                .warming_clusters()
                .iter()
                .map(|c| admin_pb::clusters_config_dump::DynamicCluster {
                    version_info: cluster_version(c.name()),
                    cluster: Some(pack_any((*c.config().source).clone())),
                    last_updated: now,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let mut dynamic_listeners: Vec<admin_pb::listeners_config_dump::DynamicListener> =
            Vec::new();
        let state = |l: &crate::listener::ActiveListener| {
            Some(admin_pb::listeners_config_dump::DynamicListenerState {
                version_info: listener_version(l.name()),
                listener: Some(pack_any((*l.config().source).clone())),
                last_updated: now,
            })
        };
        for l in s.listeners.listeners().iter().filter(|l| l.added_via_api()) {
            dynamic_listeners.push(admin_pb::listeners_config_dump::DynamicListener {
                name: l.name().to_string(),
                active_state: state(l),
                ..Default::default()
            });
        }
        for l in s
            .listeners
            .warming_listeners()
            .iter()
            .filter(|l| l.added_via_api())
        {
            match dynamic_listeners.iter_mut().find(|d| d.name == l.name()) {
                Some(d) => d.warming_state = state(l),
                None => dynamic_listeners.push(admin_pb::listeners_config_dump::DynamicListener {
                    name: l.name().to_string(),
                    warming_state: state(l),
                    ..Default::default()
                }),
            }
        }
        let dynamic_route_configs = s
            .dynamic
            .as_ref()
            .map(|d| d.route_configs())
            .unwrap_or_default()
            .into_iter()
            .map(
                |(name, any)| admin_pb::routes_config_dump::DynamicRouteConfig {
                    version_info: route_version(&name),
                    route_config: Some(any),
                    last_updated: now,
                    ..Default::default()
                },
            )
            .collect();
        let mut static_listeners = Vec::new();
        let mut static_route_configs = Vec::new();
        for l in &s.bootstrap.listeners {
            static_listeners.push(admin_pb::listeners_config_dump::StaticListener {
                listener: Some(pack_any((*l.source).clone())),
                last_updated: updated,
            });
            for fc in &l.source.filter_chains {
                for f in &fc.filters {
                    if let Some(ConfigType::TypedConfig(any)) = &f.config_type
                        && let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice())
                        && let Some(RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier
                    {
                        static_route_configs.push(
                            admin_pb::routes_config_dump::StaticRouteConfig {
                                route_config: Some(pack_any(rc)),
                                last_updated: updated,
                            },
                        );
                    }
                }
            }
        }
        let listeners = admin_pb::ListenersConfigDump {
            version_info: s
                .xds()
                .and_then(|c| c.accepted_version(crate::xds::LISTENER_TYPE))
                .unwrap_or_default(),
            static_listeners,
            dynamic_listeners,
        };
        let routes = admin_pb::RoutesConfigDump {
            static_route_configs,
            dynamic_route_configs,
        };
        let mut configs = vec![
            pack_any(bootstrap),
            pack_any(clusters),
            pack_any(listeners),
            pack_any(routes),
        ];
        // SDS secrets (private keys redacted), when there are any.
        let secret_version = version(crate::xds::SECRET_TYPE);
        let dynamic_active_secrets: Vec<_> = crate::tls::sds::store()
            .dump()
            .into_iter()
            .map(
                |(name, secret, at)| admin_pb::secrets_config_dump::DynamicSecret {
                    version_info: secret_version(&name),
                    name,
                    last_updated: Some(timestamp(at)),
                    secret: Some(secret),
                    ..Default::default()
                },
            )
            .collect();
        if !dynamic_active_secrets.is_empty() {
            configs.push(pack_any(admin_pb::SecretsConfigDump {
                dynamic_active_secrets,
                ..Default::default()
            }));
        }
        let dump = admin_pb::ConfigDump { configs };
        match capstan_proto::to_json(&dump) {
            Ok(v) => json(&v),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("config dump: {e}\n"),
            ),
        }
    }

    fn init_dump(&self) -> AdminResponse {
        let dumps: Vec<serde_json::Value> = self
            .server
            .init_managers()
            .iter()
            .filter_map(|m| {
                let targets = m.unready_targets();
                (!targets.is_empty())
                    .then(|| serde_json::json!({ "name": m.name(), "target_names": targets }))
            })
            .collect();
        json(&serde_json::json!({ "unready_targets_dumps": dumps }))
    }

    fn drain_listeners(&self, query: &HashMap<String, String>) -> AdminResponse {
        let listeners = self.server.listeners.clone();
        let graceful = query.contains_key("graceful");
        let drain_time = if graceful {
            self.server.options.drain_time
        } else {
            Duration::ZERO
        };
        let grace = self.server.options.shutdown_grace;
        tokio::spawn(async move { listeners.drain_listeners(drain_time, grace).await });
        text(StatusCode::OK, "OK\n")
    }
}

fn cluster_status(c: &Cluster) -> admin_pb::ClusterStatus {
    let hosts = c.host_set();
    admin_pb::ClusterStatus {
        name: c.name().to_string(),
        observability_name: c.name().to_string(),
        added_via_api: c.added_via_api(),
        host_statuses: hosts
            .hosts
            .iter()
            .map(|h| {
                let s = &h.stats;
                let metric = |name: &str, kind: admin_pb::simple_metric::Type, v: i64| {
                    admin_pb::SimpleMetric {
                        r#type: kind as i32,
                        value: u64::try_from(v).unwrap_or(0),
                        name: name.to_string(),
                    }
                };
                use admin_pb::simple_metric::Type::{Counter, Gauge};
                let counter = |name: &str, v: u64| {
                    metric(name, Counter, i64::try_from(v).unwrap_or(i64::MAX))
                };
                admin_pb::HostStatus {
                    address: Some(address(h.address)),
                    stats: vec![
                        counter("cx_connect_fail", s.cx_connect_fail.get()),
                        counter("cx_total", s.cx_total.get()),
                        counter("rq_error", s.rq_error.get()),
                        counter("rq_success", s.rq_success.get()),
                        counter("rq_timeout", s.rq_timeout.get()),
                        counter("rq_total", s.rq_total.get()),
                        metric("cx_active", Gauge, s.cx_active.get()),
                        metric("rq_active", Gauge, s.rq_active.get()),
                    ],
                    health_status: Some(admin_pb::HostHealthStatus {
                        eds_health_status: h.health().as_proto() as i32,
                        ..Default::default()
                    }),
                    weight: h.weight(),
                    priority: h.priority(),
                    hostname: h.hostname.clone(),
                    locality: Some(core::Locality {
                        region: h.locality.region.clone(),
                        zone: h.locality.zone.clone(),
                        sub_zone: h.locality.sub_zone.clone(),
                    }),
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}

/// Envoy's `/clusters` `health_flags`: `healthy`, or each failure flag with a leading `/`.
fn health_flags(h: &crate::cluster::host::Host) -> String {
    use crate::cluster::host::flags;
    let f = h.flags();
    let mut out = String::new();
    for (bit, name) in [
        (flags::FAILED_ACTIVE_HC, "/failed_active_hc"),
        (flags::FAILED_OUTLIER_CHECK, "/failed_outlier_check"),
    ] {
        if f & bit != 0 {
            out.push_str(name);
        }
    }
    if !h.health().is_routable() {
        out.push_str("/failed_eds_health");
    }
    if f & flags::PENDING_ACTIVE_HC != 0 {
        out.push_str("/pending_active_hc");
    }
    if out.is_empty() {
        out.push_str("healthy");
    }
    out
}

fn address(a: std::net::SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                a.port(),
            ))),
            ..Default::default()
        })),
    }
}

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let decode = |s: &str| crate::http::router::percent_decode(s).into_owned();
            (decode(k), decode(v))
        })
        .collect()
}
