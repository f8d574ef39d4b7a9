//! SDS: the secrets received over ADS (`type.googleapis.com/envoy.extensions.transport_sockets.
//! tls.v3.Secret`) and the TLS contexts that use them.
//!
//! A context naming SDS secrets registers here when it is translated (weakly: a context that
//! is dropped — a NACKed or replaced resource — simply disappears). The store keeps the xDS
//! subscription equal to the secret names live contexts need (any name, e.g. Capstan's
//! `kubernetes://<namespace>/<name>`), and whenever a secret arrives or changes it rebuilds
//! the rustls configuration of every context using it and swaps it in: new handshakes use the
//! new certificate, open connections keep theirs (Envoy's rotation semantics). Listeners and
//! clusters warm until their contexts are ready, bounded by the secret's
//! `initial_fetch_timeout` ([`wait_ready`]).
//!
//! Secrets are validated (PEM, key matching the certificate) by the xDS handler before they
//! get here, so a bad secret is NACKed and the previous one keeps serving. A secret the
//! control plane stops sending is kept, as Envoy keeps serving with the last one. This module
//! must not parse configuration.

use std::collections::BTreeMap;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use envoy_types::pb::google::protobuf::Any;

use crate::config::tls::{CommonTls, DownstreamTls, TlsCertificate, UpstreamTls, Validation};

/// One SDS secret, translated.
#[derive(Debug, Clone)]
pub enum Secret {
    Certificate(TlsCertificate),
    Validation(Validation),
}

/// A TLS context whose configuration depends on SDS secrets.
pub trait Dependent: Send + Sync {
    fn common(&self) -> &CommonTls;
    /// Builds and swaps in the configuration from the resolved context.
    fn rebuild(&self, resolved: &CommonTls) -> Result<(), String>;
    /// Whether a configuration is in place (all secrets arrived once).
    fn is_ready(&self) -> bool;
}

impl Dependent for DownstreamTls {
    fn common(&self) -> &CommonTls {
        &self.common
    }

    fn rebuild(&self, resolved: &CommonTls) -> Result<(), String> {
        let config = super::server_config(resolved, self.require_client_certificate)?;
        self.server_config.store(Some(Arc::new(config)));
        Ok(())
    }

    fn is_ready(&self) -> bool {
        self.server_config.load().is_some()
    }
}

impl Dependent for UpstreamTls {
    fn common(&self) -> &CommonTls {
        &self.common
    }

    fn rebuild(&self, resolved: &CommonTls) -> Result<(), String> {
        let config = super::client_config(resolved)?;
        self.client_config.store(Some(Arc::new(config)));
        Ok(())
    }

    fn is_ready(&self) -> bool {
        self.client_config.load().is_some()
    }
}

type Subscriber = Arc<dyn Fn(BTreeSet<String>) + Send + Sync>;

#[derive(Default)]
struct Inner {
    secrets: HashMap<String, Arc<Secret>>,
    dependents: Vec<Weak<dyn Dependent>>,
    subscriber: Option<Subscriber>,
    subscribed: Option<BTreeSet<String>>,
    /// The secrets as received (private keys redacted) and when, for `/config_dump`.
    dumps: BTreeMap<String, (Any, SystemTime)>,
}

/// The proxy's SDS secrets and the contexts that use them.
pub struct SecretStore {
    inner: Mutex<Inner>,
    /// Bumped whenever contexts were rebuilt (warming waits on it).
    version: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretStore").finish_non_exhaustive()
    }
}

/// The process's secret store (one proxy per process).
pub fn store() -> &'static SecretStore {
    static STORE: OnceLock<SecretStore> = OnceLock::new();
    STORE.get_or_init(|| SecretStore {
        inner: Mutex::new(Inner::default()),
        version: tokio::sync::watch::Sender::new(0),
    })
}

/// The context with its SDS secrets filled in; `Ok(None)` while one has not arrived.
fn resolve(
    common: &CommonTls,
    secrets: &HashMap<String, Arc<Secret>>,
) -> Result<Option<CommonTls>, String> {
    let mut resolved = common.clone();
    if let Some(r) = &common.certificate_sds {
        match secrets.get(&r.name).map(|s| &**s) {
            Some(Secret::Certificate(c)) => resolved.certificates = vec![c.clone()],
            Some(Secret::Validation(_)) => {
                return Err(format!(
                    "SDS secret {:?} is a validation_context, not a tls_certificate",
                    r.name
                ));
            }
            None => return Ok(None),
        }
    }
    if let Some(r) = &common.validation_sds {
        match secrets.get(&r.name).map(|s| &**s) {
            Some(Secret::Validation(v)) => {
                // Envoy merges the default validation context (SAN matchers) with the secret.
                let mut merged = v.clone();
                if let Some(default) = &common.validation {
                    merged
                        .san_matchers
                        .splice(0..0, default.san_matchers.iter().cloned());
                }
                resolved.validation = Some(merged);
            }
            Some(Secret::Certificate(_)) => {
                return Err(format!(
                    "SDS secret {:?} is a tls_certificate, not a validation_context",
                    r.name
                ));
            }
            None => return Ok(None),
        }
    }
    Ok(Some(resolved))
}

fn rebuild(d: &dyn Dependent, secrets: &HashMap<String, Arc<Secret>>) {
    let names: Vec<&str> = d.common().sds_refs().map(|r| r.name.as_str()).collect();
    match resolve(d.common(), secrets) {
        Ok(Some(resolved)) => match d.rebuild(&resolved) {
            Ok(()) => tracing::info!(secrets = ?names, "TLS context updated from SDS"),
            Err(e) => {
                tracing::warn!(secrets = ?names, error = %e, "SDS secrets do not make a TLS context; keeping the previous one")
            }
        },
        Ok(None) => tracing::debug!(secrets = ?names, "TLS context waits for SDS secrets"),
        Err(e) => {
            tracing::warn!(secrets = ?names, error = %e, "SDS secret of the wrong type; keeping the previous TLS context")
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SecretStore {
    /// Registers a context naming SDS secrets; it is built now if its secrets are known.
    pub fn register(&self, dependent: Weak<dyn Dependent>) {
        let Some(strong) = dependent.upgrade() else {
            return;
        };
        let secrets = {
            let mut inner = lock(&self.inner);
            inner.dependents.retain(|d| d.strong_count() > 0);
            inner.dependents.push(dependent);
            inner.secrets.clone()
        };
        rebuild(&*strong, &secrets);
        self.update_subscription();
    }

    /// Where subscription changes go (the xDS client); called with the current names now.
    pub fn set_subscriber(&self, subscriber: Subscriber) {
        {
            let mut inner = lock(&self.inner);
            inner.subscriber = Some(subscriber);
            inner.subscribed = None;
        }
        self.update_subscription();
    }

    /// Re-subscribes when the names live contexts need changed.
    pub fn update_subscription(&self) {
        let (subscriber, names) = {
            let mut inner = lock(&self.inner);
            inner.dependents.retain(|d| d.strong_count() > 0);
            let names: BTreeSet<String> = inner
                .dependents
                .iter()
                .filter_map(Weak::upgrade)
                .flat_map(|d| {
                    d.common()
                        .sds_refs()
                        .map(|r| r.name.clone())
                        .collect::<Vec<_>>()
                })
                .collect();
            let Some(subscriber) = inner.subscriber.clone() else {
                return;
            };
            if inner.subscribed.as_ref() == Some(&names) {
                return;
            }
            inner.subscribed = Some(names.clone());
            (subscriber, names)
        };
        subscriber(names);
    }

    /// Applies validated secrets (each with its redacted resource for `/config_dump`): every
    /// context using one of them is rebuilt.
    pub fn apply(&self, updated: Vec<(String, Secret, Any)>) {
        let now = SystemTime::now();
        let updated: Vec<(String, Secret)> = {
            let mut inner = lock(&self.inner);
            updated
                .into_iter()
                .map(|(name, secret, dump)| {
                    inner.dumps.insert(name.clone(), (dump, now));
                    (name, secret)
                })
                .collect()
        };
        let (secrets, dependents) = {
            let mut inner = lock(&self.inner);
            for (name, secret) in &updated {
                inner.secrets.insert(name.clone(), Arc::new(secret.clone()));
            }
            inner.dependents.retain(|d| d.strong_count() > 0);
            let dependents: Vec<Arc<dyn Dependent>> =
                inner.dependents.iter().filter_map(Weak::upgrade).collect();
            (inner.secrets.clone(), dependents)
        };
        for d in dependents {
            if d.common()
                .sds_refs()
                .any(|r| updated.iter().any(|(n, _)| *n == r.name))
            {
                rebuild(&*d, &secrets);
            }
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// The received secrets (private keys redacted) by name, with when they arrived.
    pub fn dump(&self) -> Vec<(String, Any, SystemTime)> {
        lock(&self.inner)
            .dumps
            .iter()
            .map(|(n, (a, t))| (n.clone(), a.clone(), *t))
            .collect()
    }
}

/// Completes once `dependent` is ready, or after the shortest `initial_fetch_timeout` of its
/// secrets (`None`: wait forever). Returns whether it is ready.
pub async fn wait_ready(dependent: Arc<dyn Dependent>) -> bool {
    let timeout: Option<Duration> = dependent
        .common()
        .sds_refs()
        .map(|r| r.initial_fetch_timeout)
        .reduce(|a, b| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, None) | (None, a) => a,
        })
        .flatten();
    let mut version = store().version.subscribe();
    let ready = async {
        loop {
            if dependent.is_ready() {
                return;
            }
            if version.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    match timeout {
        Some(t) => tokio::time::timeout(t, ready).await.is_ok(),
        None => {
            ready.await;
            true
        }
    }
}
