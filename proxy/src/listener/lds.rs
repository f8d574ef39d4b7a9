//! Listeners from LDS and route configurations from RDS.
//!
//! [`ListenerManager::apply_lds`] takes the complete, already validated set of LDS listeners:
//! an unchanged listener (same resource) is left alone; a new or changed one warms (its RDS
//! route configuration or `initial_fetch_timeout`) and then replaces the active one, which
//! drains (make-before-break, see the parent module); listeners absent from the set stop
//! accepting and drain. During the server's initialization the warming targets register in
//! the server's init manager, so the proxy turns LIVE only once they are warm; afterwards a
//! listener binds as soon as it is warm.
//!
//! [`ListenerManager::apply_rds`] swaps a route configuration into every connection manager
//! using that name (requests in flight keep the one they started with), and the RDS
//! subscription follows the names of the active and warming listeners. Validation happens in
//! the xDS handler before anything here runs.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{ListenerManager, lock};
use crate::config::listener::Listener as Config;
use crate::config::route::RouteConfig;
use crate::init;

impl ListenerManager {
    /// Applies the complete set of LDS listeners; `server_init` is the server's init manager
    /// (listeners warming during initialization hold it).
    pub fn apply_lds(self: &Arc<Self>, desired: Vec<Config>, server_init: &init::Manager) {
        let wanted: BTreeSet<String> = desired.iter().map(|l| l.name.clone()).collect();
        let mut to_warm = Vec::new();
        for config in desired {
            let same = |l: &Arc<super::ActiveListener>| *l.config.source == *config.source;
            let warming = lock(&self.warming)
                .iter()
                .find(|l| l.name() == config.name)
                .cloned();
            match warming {
                Some(w) if same(&w) => continue,
                Some(_) => {}
                None => {
                    let active = lock(&self.active)
                        .iter()
                        .find(|l| l.name() == config.name)
                        .cloned();
                    if active.is_some_and(|a| same(&a)) {
                        continue;
                    }
                }
            }
            let listener = self.build(&config, true);
            {
                let mut warming = lock(&self.warming);
                warming.retain(|l| l.name() != config.name);
                warming.push(listener.clone());
            }
            to_warm.push(listener);
        }
        // Removed: dynamic listeners not in the set.
        lock(&self.warming).retain(|l| !l.added_via_api() || wanted.contains(l.name()));
        let removed: Vec<_> = {
            let mut active = lock(&self.active);
            let (gone, keep): (Vec<_>, Vec<_>) = active
                .drain(..)
                .partition(|l| l.added_via_api() && !wanted.contains(l.name()));
            *active = keep;
            gone
        };
        for old in removed {
            self.listener_removed.inc();
            let address = old.config.address;
            let successor =
                address.port() != 0 && to_warm.iter().any(|l| l.config.address == address);
            if successor && self.workers_started() {
                // A listener of this update takes the address over once warm: keep accepting
                // until then, so no connection is refused in between.
                tracing::info!(listener = %old.name(), "listener removed (LDS); serving until its successor on the same address is warm");
                lock(&self.handover).push(old);
            } else {
                tracing::info!(listener = %old.name(), "listener removed (LDS); draining");
                self.drain_one(old);
            }
        }
        // A removed listener waiting for a successor that was itself removed or superseded
        // before it warmed has nobody to hand over to: drain it now.
        let orphaned: Vec<_> = {
            let warming = lock(&self.warming);
            let mut handover = lock(&self.handover);
            let (keep, gone): (Vec<_>, Vec<_>) = handover.drain(..).partition(|l| {
                warming.iter().any(|w| w.config.address == l.config.address)
                    || to_warm.iter().any(|w| w.config.address == l.config.address)
            });
            *handover = keep;
            gone
        };
        for old in orphaned {
            self.drain_one(old);
        }
        self.update_rds_subscription();
        for listener in to_warm {
            tracing::info!(listener = %listener.name(), "listener warming (LDS)");
            if server_init.state() != init::State::Initialized {
                match self.warm(listener.clone(), server_init) {
                    Ok(()) => continue,
                    Err(e) => tracing::debug!(error = %e, "server initialized meanwhile"),
                }
            }
            let standalone = init::Manager::new("listener warming");
            if let Err(e) = self.warm(listener, &standalone) {
                tracing::warn!(error = %e, "cannot warm listener");
            }
            standalone.initialize();
        }
    }

    /// Applies one accepted route configuration to every connection manager using it.
    pub fn apply_rds(&self, name: &str, rc: Arc<RouteConfig>) {
        lock(&self.routes).insert(name.to_string(), rc.clone());
        let mut all = lock(&self.active).clone();
        all.extend(lock(&self.warming).iter().cloned());
        for l in all {
            for hcm in l.http_connection_managers() {
                if hcm.config().rds_name() == Some(name) {
                    hcm.set_route_config(rc.clone());
                }
            }
        }
    }

    /// Route configuration names in use by active and warming listeners.
    pub fn rds_names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for l in lock(&self.active).iter().chain(lock(&self.warming).iter()) {
            names.extend(l.config.rds_names());
        }
        names
    }

    /// Route configurations received over RDS, by name.
    pub fn route_configs(&self) -> Vec<(String, Arc<RouteConfig>)> {
        let mut v: Vec<_> = lock(&self.routes)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Starts RDS (the cluster manager has initialized): subscribes the route configuration
    /// names of the listeners so far, and of every later one.
    pub fn start_rds(&self) {
        self.rds_started
            .store(true, std::sync::atomic::Ordering::Release);
        self.update_rds_subscription();
    }

    /// Tells the RDS source every route configuration name the listeners need (once RDS has
    /// started).
    pub fn update_rds_subscription(&self) {
        if !self.rds_started.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let names = self.rds_names();
        lock(&self.routes).retain(|n, _| names.contains(n));
        if let Some(rds) = self.rds.get() {
            rds.subscribe(names);
        }
    }
}
