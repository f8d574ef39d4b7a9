//! Leader election with a `coordination.k8s.io/v1` Lease: every replica serves xDS, only the
//! leader writes status.
//!
//! The algorithm is client-go's `leaderelection`: a candidate acquires the Lease when it is
//! unheld, released, or not renewed for `lease_duration`; the leader renews every
//! `renew_every`; every write carries the Lease's `resourceVersion`, so two candidates racing
//! for it get one success and one `409 Conflict`. Expiry is judged on the local clock from
//! when this replica last *saw the record change*, never by comparing another node's
//! `renewTime` with ours (clock skew). A leader that cannot renew for `lease_duration` steps
//! down before anyone else may take over (it stops at `lease_duration`, they start after it).
//! On shutdown the leader releases the Lease so a successor takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// Lease settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

/// What this replica last saw of the Lease.
struct Observed {
    holder: Option<String>,
    renew: Option<String>,
    at: Instant,
}

/// Runs the election until `shutdown`; publishes whether this replica leads on `leading`.
pub async fn run(
    client: kube::Client,
    config: Config,
    leading: watch::Sender<bool>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<Observed> = None;
    let mut last_renewed: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let lead = try_acquire_or_renew(&api, &config, &mut observed).await;
        match lead {
            Ok(true) => last_renewed = Some(Instant::now()),
            Ok(false) => last_renewed = None,
            Err(e) => tracing::warn!(lease = %config.name, "leader election: {e}"),
        }
        // A leader that has not renewed within the lease duration must assume someone else
        // may have taken over.
        let is_leader = last_renewed.is_some_and(|t| t.elapsed() < config.lease_duration);
        if *leading.borrow() != is_leader {
            tracing::info!(identity = %config.identity, lease = %config.name, leading = is_leader, "leadership changed");
            let _ = leading.send(is_leader);
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(config.renew_every) => {}
        }
    }
    if *leading.borrow() {
        let _ = leading.send(false);
        if let Err(e) = release(&api, &config).await {
            tracing::warn!(lease = %config.name, "could not release the lease: {e}");
        }
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn renew_text(spec: &LeaseSpec) -> Option<String> {
    spec.renew_time.as_ref().map(|t| t.0.to_string())
}

/// Returns whether this replica holds the Lease after the attempt.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &Config,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let seconds = i32::try_from(config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let current = match api.get_opt(&config.name).await? {
        Some(l) => l,
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        }
    };
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let renew = renew_text(&spec);
    let changed = observed
        .as_ref()
        .is_none_or(|o| o.holder != holder || o.renew != renew);
    if changed {
        *observed = Some(Observed {
            holder: holder.clone(),
            renew,
            at: Instant::now(),
        });
    }
    let held_by_me = holder.as_deref() == Some(config.identity.as_str());
    let their_duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(config.lease_duration);
    let expired = observed
        .as_ref()
        .is_some_and(|o| o.at.elapsed() >= their_duration);
    if !(held_by_me || holder.is_none() || expired) {
        return Ok(false);
    }
    let mut next = current.clone();
    let mut next_spec = spec.clone();
    if !held_by_me {
        next_spec.acquire_time = Some(now());
        next_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    next_spec.holder_identity = Some(config.identity.clone());
    next_spec.lease_duration_seconds = Some(seconds);
    next_spec.renew_time = Some(now());
    next.spec = Some(next_spec);
    // `replace` sends metadata.resourceVersion: a concurrent writer makes this a 409.
    match api
        .replace(&config.name, &PostParams::default(), &next)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up: no holder, so the next candidate takes it on its next attempt.
async fn release(api: &Api<Lease>, config: &Config) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = Some(now());
    api.replace(&config.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}
