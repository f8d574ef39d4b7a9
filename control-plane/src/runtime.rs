//! Wiring: provider → store → translator → xDS server, plus the admin endpoint and shutdown.
//!
//! [`TranslatedSource`] is the snapshot cache between the translator and the xDS server: it
//! translates once per distinct node shape per store generation and shares the result (an
//! `Arc`) between every node that receives identical resources.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::util::pack_any;
use tokio::sync::watch;

use crate::store::{Store, StoreSnapshot};
use crate::translate::{self, NodeInfo, Translation};
use crate::xds::{self, ResourceSource, Resources};

/// What translation depends on besides the store: everything in the node but its id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct NodeShape {
    workload: String,
    namespace: Option<String>,
    app_ports: Vec<u16>,
}

#[derive(Default)]
struct Cache {
    generation: u64,
    by_shape: HashMap<NodeShape, Arc<Resources>>,
}

/// The [`ResourceSource`] the xDS server reads: translations of the store's latest snapshot.
pub struct TranslatedSource {
    store: watch::Receiver<Arc<StoreSnapshot>>,
    changes: watch::Receiver<u64>,
    cache: Mutex<Cache>,
    translations: std::sync::atomic::AtomicU64,
}

impl TranslatedSource {
    /// Follows `store`; the returned task forwards store changes to xDS streams.
    pub fn new(store: &Store) -> Arc<Self> {
        let mut rx = store.subscribe();
        let (tx, changes) = watch::channel(rx.borrow().generation);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let generation = rx.borrow_and_update().generation;
                if tx.send(generation).is_err() {
                    return;
                }
            }
        });
        Arc::new(Self {
            store: store.subscribe(),
            changes,
            cache: Mutex::new(Cache::default()),
            translations: Default::default(),
        })
    }

    /// How many translations ran (cache misses).
    pub fn translations(&self) -> u64 {
        self.translations.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Packs a translation into the xDS server's type-URL-keyed form.
pub fn to_resources(t: &Translation) -> Resources {
    let mut r = Resources::default();
    let mut put = |type_url: &str, name: &str, any| {
        r.by_type
            .entry(type_url.to_string())
            .or_default()
            .insert(name.to_string(), any);
    };
    for c in &t.clusters {
        put(xds::CLUSTER_TYPE, &c.name, pack_any(c.clone()));
    }
    for e in &t.endpoints {
        put(xds::ENDPOINT_TYPE, &e.cluster_name, pack_any(e.clone()));
    }
    for l in &t.listeners {
        put(xds::LISTENER_TYPE, &l.name, pack_any(l.clone()));
    }
    for rc in &t.routes {
        put(xds::ROUTE_TYPE, &rc.name, pack_any(rc.clone()));
    }
    for s in &t.secrets {
        put(xds::SECRET_TYPE, &s.name, pack_any(s.clone()));
    }
    r
}

impl ResourceSource for TranslatedSource {
    fn resources_for(&self, node: &Node) -> Arc<Resources> {
        let info = NodeInfo::from_node(node);
        let shape = NodeShape {
            workload: info.workload.clone(),
            namespace: info.namespace.clone(),
            app_ports: info.app_ports.clone(),
        };
        let snapshot = self.store.borrow().clone();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.generation != snapshot.generation {
            cache.generation = snapshot.generation;
            cache.by_shape.clear();
        }
        if let Some(r) = cache.by_shape.get(&shape) {
            return r.clone();
        }
        self.translations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut resources = to_resources(&translate::translate(&snapshot, &info));
        resources.generation = snapshot.generation;
        // Nodes of different shapes often receive identical resources (no inbound listener
        // differences): share one copy.
        let shared = cache
            .by_shape
            .values()
            .find(|r| ***r == resources)
            .cloned()
            .unwrap_or_else(|| Arc::new(resources));
        cache.by_shape.insert(shape, shared.clone());
        shared
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

/// Settings of a running control plane.
pub struct Config {
    pub provider: Provider,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

/// Where the objects come from.
pub enum Provider {
    /// A directory of YAML, re-read `debounce` after the last change.
    File { dir: PathBuf, debounce: Duration },
    /// A Kubernetes API server (in-cluster configuration or `KUBECONFIG`).
    Kubernetes {
        client: kube::Client,
        options: crate::provider::kube::Options,
        /// The Lease that decides which replica writes status.
        election: crate::leader::Config,
        /// The sidecar injector webhook, when configured.
        injector: Option<
            Box<(
                crate::inject::server::Settings,
                crate::inject::config::InjectorConfig,
            )>,
        >,
    },
}

struct Admin {
    store: Store,
    source: Arc<TranslatedSource>,
    xds: Arc<xds::XdsStats>,
}

impl crate::admin::AdminState for Admin {
    fn ready(&self) -> bool {
        self.store.snapshot().synced
    }
    fn metrics(&self) -> String {
        let snapshot = self.store.snapshot();
        let mut out = self.xds.render_prometheus();
        out.push_str(&format!(
            "# HELP capstan_store_generation Generation of the configuration store.\n# TYPE capstan_store_generation gauge\ncapstan_store_generation {}\n\
             # HELP capstan_config_diagnostics Problems found in the configuration input.\n# TYPE capstan_config_diagnostics gauge\ncapstan_config_diagnostics {}\n\
             # HELP capstan_translations_total Translations run (snapshot cache misses).\n# TYPE capstan_translations_total counter\ncapstan_translations_total {}\n",
            snapshot.generation,
            snapshot.diagnostics.len(),
            self.source.translations(),
        ));
        out
    }
}

/// Runs the control plane until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Provider::File { dir, .. } = &config.provider
        && !dir.is_dir()
    {
        anyhow::bail!("--config-dir {}: not a directory", dir.display());
    }
    let xds_listener = tokio::net::TcpListener::bind(config.xds_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind --xds-addr {}: {e}", config.xds_addr))?;
    let admin_listener = crate::admin::bind(config.admin_addr).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let store = Store::new();
    let source = TranslatedSource::new(&store);
    let server = xds::XdsServer::new(source.clone());
    let admin = Arc::new(Admin {
        store: store.clone(),
        source: source.clone(),
        xds: server.stats(),
    });
    let provider = match config.provider {
        Provider::File { dir, debounce } => {
            tracing::info!(xds = %config.xds_addr, admin = %config.admin_addr, dir = %dir.display(), "control plane starting");
            tokio::spawn(crate::provider::file::run(
                dir,
                store.clone(),
                debounce,
                stopped(),
            ))
        }
        Provider::Kubernetes {
            client,
            options,
            election,
            injector,
        } => {
            if let Some(injector) = injector {
                let (settings, injector_config) = *injector;
                let client = client.clone();
                let stop = stopped();
                tokio::spawn(async move {
                    if let Err(e) =
                        crate::inject::server::run(client, settings, injector_config, stop).await
                    {
                        tracing::error!("injector webhook: {e:#}");
                    }
                });
            }
            tracing::info!(xds = %config.xds_addr, admin = %config.admin_addr, identity = %election.identity, "control plane starting (Kubernetes)");
            let (leading_tx, leading_rx) = watch::channel(false);
            tokio::spawn(crate::leader::run(
                client.clone(),
                election,
                leading_tx,
                stopped(),
            ));
            tokio::spawn(crate::status_writer::run(
                client.clone(),
                store.clone(),
                server.acks(),
                leading_rx,
                stopped(),
            ));
            tokio::spawn(crate::provider::kube::run(
                client,
                options,
                store.clone(),
                stopped(),
            ))
        }
    };
    let admin_task = tokio::spawn(crate::admin::serve(admin_listener, admin, stopped()));
    // xDS is served only once the provider has loaded everything: a proxy that connects (or
    // reconnects after a restart) before that would be sent an incomplete snapshot and drop
    // clusters and routes it is using. Until then its connection waits in the listen backlog.
    let mut synced = store.subscribe();
    let xds_task = tokio::spawn(async move {
        if synced.wait_for(|s| s.synced).await.is_err() {
            return Ok(());
        }
        server.serve(xds_listener, stopped()).await
    });

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    match xds_task.await {
        Ok(Err(e)) => tracing::error!("xDS server: {e}"),
        Err(e) => tracing::error!("xDS server task failed: {e}"),
        Ok(Ok(())) => {}
    }
    match provider.await {
        Ok(result) => result,
        Err(e) => Err(anyhow::anyhow!("provider task failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::parse::{Decoded, Object, decode};

    fn node(id: &str, workload: &str, app_ports: &str) -> Node {
        use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
        let mut fields = std::collections::HashMap::new();
        if !app_ports.is_empty() {
            fields.insert(
                "APP_PORTS".to_string(),
                Value {
                    kind: Some(Kind::StringValue(app_ports.to_string())),
                },
            );
        }
        Node {
            id: id.to_string(),
            cluster: workload.to_string(),
            metadata: Some(Struct { fields }),
            ..Default::default()
        }
    }

    fn add_service(store: &Store, name: &str) {
        let doc = serde_saphyr::from_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{port: 80}}]\n"
        ))
        .expect("yaml");
        let Ok(Decoded::Object(key, Object::Service(svc))) = decode(doc, "default") else {
            panic!("service decodes");
        };
        store.update(|s| {
            s.services.insert(key, *svc);
            s.synced = true;
        });
    }

    #[tokio::test]
    async fn nodes_receiving_identical_resources_share_one_translation() {
        let store = Store::new();
        add_service(&store, "web");
        let source = TranslatedSource::new(&store);
        let a = source.resources_for(&node("a-0.default", "a", ""));
        let b = source.resources_for(&node("b-0.default", "b", ""));
        assert!(
            Arc::ptr_eq(&a, &b),
            "same resources must be one shared copy"
        );
        let again = source.resources_for(&node("a-1.default", "a", ""));
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(
            source.translations(),
            2,
            "one translation per node shape, none for a repeat"
        );

        let inbound = source.resources_for(&node("c-0.default", "c", "8080"));
        assert!(
            !Arc::ptr_eq(&a, &inbound),
            "a node with app ports gets its inbound listener"
        );
        assert!(inbound.by_type[xds::LISTENER_TYPE].contains_key("inbound"));
        assert!(!a.by_type[xds::LISTENER_TYPE].contains_key("inbound"));
    }

    #[tokio::test]
    async fn a_store_change_is_signalled_and_retranslated() {
        let store = Store::new();
        add_service(&store, "web");
        let source = TranslatedSource::new(&store);
        let mut changes = source.changes();
        let before = source.resources_for(&node("a-0.default", "a", ""));
        add_service(&store, "api");
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("change signalled in time")
            .expect("sender alive");
        let after = source.resources_for(&node("a-0.default", "a", ""));
        assert_ne!(before, after);
        assert!(
            after.by_type[xds::CLUSTER_TYPE]
                .contains_key("outbound|80||api.default.svc.cluster.local")
        );
    }
}
