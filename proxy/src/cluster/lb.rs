//! Load balancers, as Envoy runs them: priority levels with their load split and panic mode,
//! then within the chosen level round robin (EDF when weights differ), least request (power
//! of N choices, or EDF over `weight / (active + 1)^bias` when weights differ), random, ring
//! hash and Maglev.
//!
//! Everything here is derived from one immutable host snapshot ([`super::host::HostSet`]
//! builds a [`Balancer`] next to its host lists), so a membership or health change rebuilds
//! the schedulers and tables, as Envoy's `refresh()` does. This module must not know how hosts
//! are discovered, checked or connected to, nor how a request's hash is computed.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::hash::{Maglev, Ring, host_key, normalize};
use super::host::Host;
use crate::config::cluster::LbPolicy;

/// What a request contributes to host selection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LbContext {
    /// The route's hash policy result; ring hash and Maglev pick by it (a random value when
    /// absent, as Envoy does).
    pub hash: Option<u64>,
}

/// The settings a cluster's host snapshots are balanced with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LbParams {
    pub policy: LbPolicy,
    /// Percent; 0 disables panic mode.
    pub healthy_panic_threshold: u32,
    /// `ClusterLoadAssignment.policy.overprovisioning_factor` (percent, 140 by default).
    pub overprovisioning_factor: u32,
    /// `common_lb_config.locality_weighted_lb_config`: pick a locality by weight first.
    pub locality_weighted: bool,
}

/// Envoy's default `healthy_panic_threshold` (percent).
pub const DEFAULT_HEALTHY_PANIC_THRESHOLD: u32 = 50;
/// Envoy's default `overprovisioning_factor` (percent).
pub const DEFAULT_OVERPROVISIONING_FACTOR: u32 = 140;

impl Default for LbParams {
    fn default() -> Self {
        Self {
            policy: LbPolicy::RoundRobin,
            healthy_panic_threshold: DEFAULT_HEALTHY_PANIC_THRESHOLD,
            overprovisioning_factor: DEFAULT_OVERPROVISIONING_FACTOR,
            locality_weighted: false,
        }
    }
}

/// How load is split over priority levels (Envoy's `per_priority_load_`, `per_priority_panic_`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriorityLoad {
    /// Per level: health in percent (healthy share × overprovisioning factor, at most 100).
    pub health: Vec<u32>,
    /// Per level: the percentage of requests it gets; sums to 100 when there is any level.
    pub load: Vec<u32>,
    /// Per level: whether it balances over all its hosts because too few are healthy.
    pub panic: Vec<bool>,
}

/// Computes the priority load from each level's `(healthy, total)` host counts, as Envoy's
/// `recalculatePerPriorityState` and `recalculatePerPriorityPanic` do.
pub fn priority_load(levels: &[(usize, usize)], overprovisioning: u32, panic: u32) -> PriorityLoad {
    let n = levels.len();
    let mut out = PriorityLoad {
        health: vec![0; n],
        load: vec![0; n],
        panic: vec![false; n],
    };
    if n == 0 {
        return out;
    }
    for (i, &(healthy, total)) in levels.iter().enumerate() {
        if total > 0 {
            let h = u64::from(overprovisioning) * healthy as u64 / total as u64;
            out.health[i] = h.min(100) as u32;
        }
    }
    let normalized = out.health.iter().sum::<u32>().min(100);
    // Nothing healthy anywhere (`normalized` 0): no split here; panic decides below.
    let mut remaining = 100u32;
    let mut first = None;
    for i in 0..n {
        if first.is_none() && out.health[i] > 0 {
            first = Some(i);
        }
        let share = (out.health[i] * 100).checked_div(normalized).unwrap_or(0);
        out.load[i] = remaining.min(share);
        remaining -= out.load[i];
    }
    if let (Some(f), true) = (first, remaining > 0) {
        out.load[f] += remaining;
    }
    let threshold = panic.min(100);
    if threshold == 0 && normalized == 0 {
        // Nothing is healthy and panic is off: all load on P0, which has nothing to pick.
        out.load[0] = 100;
        return out;
    }
    for (i, &(healthy, total)) in levels.iter().enumerate() {
        out.panic[i] = normalized != 100 && {
            let percent = if total == 0 {
                0.0
            } else {
                100.0 * healthy as f64 / total as f64
            };
            percent < f64::from(threshold)
        };
    }
    if out.panic.iter().all(|&p| p) {
        // Total panic: split by host counts regardless of health.
        let all: usize = levels.iter().map(|l| l.1).sum();
        out.load.iter_mut().for_each(|l| *l = 0);
        if all == 0 {
            out.load[0] = 100;
            return out;
        }
        let mut remaining = 100u32;
        let mut first = None;
        for (i, &(_, total)) in levels.iter().enumerate() {
            if first.is_none() && total > 0 {
                first = Some(i);
            }
            out.load[i] = (100 * total / all) as u32;
            remaining -= out.load[i];
        }
        if let Some(f) = first {
            out.load[f] += remaining;
        }
    }
    out
}

/// Envoy's `choosePriority`: `hash % 100 + 1` against the cumulative load.
pub fn choose_priority(hash: u64, load: &[u32]) -> usize {
    let h = (hash % 100 + 1) as u32;
    let mut acc = 0;
    for (i, l) in load.iter().enumerate() {
        acc += l;
        if h <= acc {
            return i;
        }
    }
    0
}

/// Envoy's earliest-deadline-first scheduler: an entry of weight `w` is due `1/w` after its
/// last pick; ties go to the entry added first.
#[derive(Debug, Default)]
pub struct Edf {
    heap: BinaryHeap<EdfEntry>,
    now: f64,
    order: u64,
}

#[derive(Debug)]
struct EdfEntry {
    deadline: f64,
    order: u64,
    index: usize,
}

impl PartialEq for EdfEntry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for EdfEntry {}
impl PartialOrd for EdfEntry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for EdfEntry {
    // Reversed: the heap's top is the earliest deadline, then the lowest order.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other
            .deadline
            .total_cmp(&self.deadline)
            .then(other.order.cmp(&self.order))
    }
}

impl Edf {
    pub fn add(&mut self, index: usize, weight: f64) {
        self.heap.push(EdfEntry {
            deadline: self.now + 1.0 / weight,
            order: self.order,
            index,
        });
        self.order += 1;
    }

    /// Picks the entry due first and re-adds it with its weight as of now.
    pub fn pick_and_add(&mut self, weight: impl Fn(usize) -> f64) -> Option<usize> {
        let e = self.heap.pop()?;
        self.now = e.deadline;
        self.add(e.index, weight(e.index));
        Some(e.index)
    }
}

/// The hosts one pick chooses among (a level's healthy hosts, or all of them in panic).
#[derive(Debug, Default)]
pub struct Source {
    pub hosts: Vec<Arc<Host>>,
    next: AtomicUsize,
    /// Present iff the hosts' weights differ (round robin, least request).
    edf: Option<Mutex<Edf>>,
}

impl Source {
    fn new(hosts: Vec<Arc<Host>>, params: &LbParams) -> Self {
        let weighted = hosts.windows(2).any(|w| w[0].weight() != w[1].weight());
        let edf = match params.policy {
            LbPolicy::RoundRobin | LbPolicy::LeastRequest { .. } if weighted => {
                let mut edf = Edf::default();
                for (i, _) in hosts.iter().enumerate() {
                    edf.add(i, host_weight(&hosts, i, &params.policy));
                }
                // Envoy starts each scheduler a random number of picks in, so that proxies
                // started together do not send their first requests to the same host.
                let total: u64 = hosts.iter().map(|h| u64::from(h.weight())).sum();
                for _ in 0..fastrand::u64(..total.clamp(1, 4096)) {
                    edf.pick_and_add(|i| host_weight(&hosts, i, &params.policy));
                }
                Some(Mutex::new(edf))
            }
            _ => None,
        };
        Self {
            // Envoy's round robin starts at a random offset for the same reason.
            next: AtomicUsize::new(fastrand::usize(..1024)),
            hosts,
            edf,
        }
    }

    fn choose(&self, params: &LbParams, random: u64) -> Option<&Arc<Host>> {
        if self.hosts.is_empty() {
            return None;
        }
        if let Some(edf) = &self.edf {
            let mut edf = edf.lock().unwrap_or_else(|p| p.into_inner());
            let i = edf.pick_and_add(|i| host_weight(&self.hosts, i, &params.policy))?;
            return self.hosts.get(i);
        }
        let i = match params.policy {
            LbPolicy::RoundRobin => {
                round_robin(self.hosts.len(), self.next.fetch_add(1, Ordering::Relaxed))
            }
            LbPolicy::LeastRequest { choice_count, .. } => least_request(
                self.hosts.len(),
                choice_count,
                |i| self.hosts[i].active_requests(),
                fastrand::usize,
            ),
            // Envoy's random balancer ignores weights and reuses the priority's random value.
            LbPolicy::Random | LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. } => {
                (random % self.hosts.len() as u64) as usize
            }
        };
        self.hosts.get(i)
    }
}

/// The EDF weight of `hosts[i]`: its weight, divided for least request by
/// `(active requests + 1)^active_request_bias`.
fn host_weight(hosts: &[Arc<Host>], i: usize, policy: &LbPolicy) -> f64 {
    let Some(h) = hosts.get(i) else { return 1.0 };
    let weight = f64::from(h.weight());
    match policy {
        LbPolicy::LeastRequest {
            active_request_bias,
            ..
        } => {
            let active = (h.active_requests().max(0) as f64) + 1.0;
            if *active_request_bias == 1.0 {
                weight / active
            } else if *active_request_bias == 0.0 {
                weight
            } else {
                weight / active.powf(*active_request_bias)
            }
        }
        _ => weight,
    }
}

/// One priority level's hosts: all of them, and the routable ones.
pub type LevelHosts = (Vec<Arc<Host>>, Vec<Arc<Host>>);

/// A host's locality, for grouping (sorted as Envoy sorts localities).
type LocalityKey = (String, String, String);

fn locality_key(h: &Host) -> LocalityKey {
    (
        h.locality.region.clone(),
        h.locality.zone.clone(),
        h.locality.sub_zone.clone(),
    )
}

/// Hosts grouped by locality, in locality order.
fn by_locality(hosts: &[Arc<Host>]) -> std::collections::BTreeMap<LocalityKey, Vec<Arc<Host>>> {
    let mut m: std::collections::BTreeMap<LocalityKey, Vec<Arc<Host>>> = Default::default();
    for h in hosts {
        m.entry(locality_key(h)).or_default().push(h.clone());
    }
    m
}

/// Locality-weighted balancing within one level: an EDF schedule over the localities by
/// effective weight (`weight × min(1, overprovisioning × healthy share)`), then the policy
/// over the chosen locality's healthy hosts.
#[derive(Debug)]
struct Localities {
    edf: Mutex<Edf>,
    weights: Vec<f64>,
    sources: Vec<Source>,
}

impl Localities {
    fn new(all: &[Arc<Host>], params: &LbParams) -> Option<Box<Self>> {
        let mut weights = Vec::new();
        let mut sources = Vec::new();
        for hosts in by_locality(all).into_values() {
            let healthy: Vec<Arc<Host>> =
                hosts.iter().filter(|h| h.is_routable()).cloned().collect();
            let weight = hosts.first().map(|h| h.locality_weight()).unwrap_or(0);
            let availability = 1.0 * healthy.len() as f64 / hosts.len() as f64;
            let effective = f64::from(weight)
                * (f64::from(params.overprovisioning_factor) / 100.0 * availability).min(1.0);
            weights.push(effective);
            sources.push(Source::new(healthy, params));
        }
        let mut edf = Edf::default();
        for (i, w) in weights.iter().enumerate() {
            if *w > 0.0 {
                edf.add(i, *w);
            }
        }
        Some(Box::new(Self {
            edf: Mutex::new(edf),
            weights,
            sources,
        }))
    }

    /// The next locality's source; `None` when no locality has weight.
    fn pick(&self) -> Option<&Source> {
        let mut edf = self.edf.lock().unwrap_or_else(|p| p.into_inner());
        let i = edf.pick_and_add(|i| self.weights.get(i).copied().unwrap_or(1.0))?;
        self.sources.get(i)
    }
}

/// The hosts a hashing balancer places and their normalized weights; with locality weighting,
/// each locality's hosts share its part of the total locality weight (localities of weight 0
/// get none).
fn hash_weights(
    over: &[Arc<Host>],
    all: &[Arc<Host>],
    params: &LbParams,
) -> (Vec<Arc<Host>>, Vec<f64>) {
    if !params.locality_weighted {
        let weights: Vec<u32> = over.iter().map(|h| h.weight()).collect();
        return (over.to_vec(), normalize(&weights, 1.0));
    }
    let total: u64 = by_locality(all)
        .values()
        .map(|hs| u64::from(hs.first().map(|h| h.locality_weight()).unwrap_or(0)))
        .sum();
    let mut hosts = Vec::new();
    let mut normalized = Vec::new();
    for group in by_locality(over).into_values() {
        let w = group.first().map(|h| h.locality_weight()).unwrap_or(0);
        if w == 0 {
            continue;
        }
        let share = f64::from(w) / total as f64;
        let weights: Vec<u32> = group.iter().map(|h| h.weight()).collect();
        normalized.extend(normalize(&weights, share));
        hosts.extend(group);
    }
    (hosts, normalized)
}

/// One priority level's pickers.
#[derive(Debug)]
enum Level {
    /// Round robin, least request, random: healthy hosts, all hosts for panic mode, and the
    /// localities under locality-weighted balancing.
    Sources {
        healthy: Source,
        all: Source,
        localities: Option<Box<Localities>>,
    },
    Ring {
        hosts: Vec<Arc<Host>>,
        ring: Ring,
    },
    Maglev {
        hosts: Vec<Arc<Host>>,
        table: Maglev,
    },
}

/// A host snapshot's load balancer.
#[derive(Debug, Default)]
pub struct Balancer {
    params: Option<LbParams>,
    pub load: PriorityLoad,
    levels: Vec<Level>,
}

/// What [`Balancer::choose`] found.
#[derive(Debug)]
pub struct Pick {
    pub host: Option<Arc<Host>>,
    /// The chosen level was in panic mode (`lb_healthy_panic`).
    pub panic: bool,
}

impl Balancer {
    /// Builds the balancer over `levels` (per priority: all hosts, healthy hosts).
    pub fn new(levels: &[LevelHosts], params: LbParams) -> Self {
        let counts: Vec<(usize, usize)> = levels.iter().map(|(a, h)| (h.len(), a.len())).collect();
        let load = priority_load(
            &counts,
            params.overprovisioning_factor,
            params.healthy_panic_threshold,
        );
        let built = levels
            .iter()
            .enumerate()
            .map(|(p, (all, healthy))| {
                let in_panic = load.panic.get(p).copied().unwrap_or(false);
                let over = if in_panic { all } else { healthy };
                let placed = || {
                    let (hosts, weights) = hash_weights(over, all, &params);
                    let keys: Vec<String> = hosts.iter().map(|h| host_key(&h.address)).collect();
                    (hosts, keys, weights)
                };
                match params.policy {
                    LbPolicy::RingHash {
                        minimum_ring_size,
                        maximum_ring_size,
                    } => {
                        let (hosts, keys, weights) = placed();
                        Level::Ring {
                            ring: Ring::new(&keys, &weights, minimum_ring_size, maximum_ring_size),
                            hosts,
                        }
                    }
                    LbPolicy::Maglev { table_size } => {
                        let (hosts, keys, weights) = placed();
                        Level::Maglev {
                            table: Maglev::new(&keys, &weights, table_size),
                            hosts,
                        }
                    }
                    _ => Level::Sources {
                        healthy: Source::new(healthy.clone(), &params),
                        all: Source::new(all.clone(), &params),
                        localities: if params.locality_weighted {
                            Localities::new(all, &params)
                        } else {
                            None
                        },
                    },
                }
            })
            .collect();
        Self {
            params: Some(params),
            load,
            levels: built,
        }
    }

    /// Picks a host for one request.
    pub fn choose(&self, ctx: &LbContext) -> Pick {
        let none = Pick {
            host: None,
            panic: false,
        };
        let Some(params) = &self.params else {
            return none;
        };
        if self.levels.is_empty() {
            return none;
        }
        let hashing = matches!(
            params.policy,
            LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. }
        );
        let value = match ctx.hash {
            Some(h) if hashing => h,
            _ => fastrand::u64(..),
        };
        let p = choose_priority(value, &self.load.load);
        let panic = self.load.panic.get(p).copied().unwrap_or(false);
        let host = match self.levels.get(p) {
            Some(Level::Sources {
                healthy,
                all,
                localities,
            }) => {
                let source = if panic {
                    all
                } else {
                    localities
                        .as_deref()
                        .and_then(Localities::pick)
                        .unwrap_or(healthy)
                };
                source.choose(params, value).cloned()
            }
            Some(Level::Ring { hosts, ring }) => {
                ring.choose(value).and_then(|i| hosts.get(i)).cloned()
            }
            Some(Level::Maglev { hosts, table }) => {
                table.choose(value).and_then(|i| hosts.get(i)).cloned()
            }
            None => None,
        };
        Pick { host, panic }
    }
}

/// The `counter`-th pick of a round robin over `len` hosts.
pub fn round_robin(len: usize, counter: usize) -> usize {
    counter % len
}

/// Envoy's least request with equal weights: sample `choice_count` hosts at random (with
/// replacement) and keep the one with the fewest active requests; ties keep the earlier pick.
pub fn least_request(
    len: usize,
    choice_count: u32,
    active: impl Fn(usize) -> i64,
    mut random: impl FnMut(std::ops::Range<usize>) -> usize,
) -> usize {
    let mut best = random(0..len);
    for _ in 1..choice_count.max(1) {
        let sampled = random(0..len);
        if active(sampled) < active(best) {
            best = sampled;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterStats;
    use crate::cluster::pool::PoolSettings;
    use crate::config::cluster::{HealthStatus, Locality, UpstreamProtocol};
    use std::time::Duration;

    fn host(port: u16, weight: u32, health: HealthStatus) -> Arc<Host> {
        let h = Arc::new(Host::new(
            ([127, 0, 0, 1], port).into(),
            String::new(),
            Locality::default(),
            health,
            PoolSettings {
                protocol: UpstreamProtocol::Http1,
                connect_timeout: Duration::from_secs(1),
                tls: None,
            },
            Arc::new(ClusterStats::default()),
        ));
        h.set_weight(weight);
        h
    }

    fn level(hosts: Vec<Arc<Host>>) -> LevelHosts {
        let healthy = hosts.iter().filter(|h| h.is_routable()).cloned().collect();
        (hosts, healthy)
    }

    fn params(policy: LbPolicy) -> LbParams {
        LbParams {
            policy,
            ..LbParams::default()
        }
    }

    fn shares(b: &Balancer, n: usize) -> std::collections::BTreeMap<u16, usize> {
        let mut m = std::collections::BTreeMap::new();
        for _ in 0..n {
            let h = b.choose(&LbContext::default()).host.expect("a host");
            *m.entry(h.address.port()).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn round_robin_cycles() {
        let picks: Vec<usize> = (5..11).map(|c| round_robin(3, c)).collect();
        assert_eq!(picks, vec![2, 0, 1, 2, 0, 1]);
    }

    #[test]
    fn least_request_keeps_the_less_loaded_sample() {
        let active = [5, 0, 9];
        let mut samples = vec![0, 1].into_iter();
        let pick = least_request(3, 2, |i| active[i], |_| samples.next().unwrap_or(0));
        assert_eq!(pick, 1);
        let mut samples = vec![1, 2].into_iter();
        let pick = least_request(3, 2, |i| active[i], |_| samples.next().unwrap_or(0));
        assert_eq!(pick, 1, "the first sample wins when it is less loaded");
        let mut samples = vec![2, 0, 1].into_iter();
        let pick = least_request(3, 3, |i| active[i], |_| samples.next().unwrap_or(0));
        assert_eq!(pick, 1, "choice_count 3 samples three hosts");
    }

    #[test]
    fn edf_follows_weights_exactly() {
        let mut edf = Edf::default();
        let w = [1.0, 2.0, 5.0];
        for (i, w) in w.iter().enumerate() {
            edf.add(i, *w);
        }
        let mut counts = [0; 3];
        for _ in 0..800 {
            counts[edf.pick_and_add(|i| w[i]).expect("entry")] += 1;
        }
        assert_eq!(counts, [100, 200, 500]);
    }

    #[test]
    fn weighted_round_robin_and_least_request_use_weights() {
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: 1.0,
            },
        ] {
            let b = Balancer::new(
                &[level(vec![
                    host(1, 1, HealthStatus::Healthy),
                    host(2, 3, HealthStatus::Healthy),
                ])],
                params(policy),
            );
            let s = shares(&b, 4000);
            assert!((990..=1010).contains(&s[&1]), "{policy:?}: {s:?}");
            assert!((2990..=3010).contains(&s[&2]), "{policy:?}: {s:?}");
        }
    }

    #[test]
    fn weighted_least_request_avoids_busy_hosts() {
        let busy = host(1, 2, HealthStatus::Healthy);
        let idle = host(2, 1, HealthStatus::Healthy);
        let stats = busy.stats.clone();
        for _ in 0..9 {
            stats.rq_active.inc();
        }
        let b = Balancer::new(
            &[level(vec![busy, idle])],
            params(LbPolicy::LeastRequest {
                choice_count: 2,
                active_request_bias: 1.0,
            }),
        );
        // Weights 2/10 vs 1/1: the idle host gets 5 of every 6 picks.
        let s = shares(&b, 6000);
        assert!((4950..=5050).contains(&s[&2]), "{s:?}");
    }

    #[test]
    fn random_ignores_weights_like_envoy() {
        let b = Balancer::new(
            &[level(vec![
                host(1, 1, HealthStatus::Healthy),
                host(2, 9, HealthStatus::Healthy),
            ])],
            params(LbPolicy::Random),
        );
        let s = shares(&b, 4000);
        // 2000 expected each; ±200 is > 6 standard deviations.
        assert!((1800..=2200).contains(&s[&1]), "{s:?}");
    }

    #[test]
    fn priority_load_matches_envoys_examples() {
        // All healthy at P0: everything there.
        let l = priority_load(&[(4, 4), (2, 2)], 140, 50);
        assert_eq!(l.load, vec![100, 0]);
        // P0 half healthy: 70 % health, the rest spills to P1.
        let l = priority_load(&[(1, 2), (2, 2)], 140, 50);
        assert_eq!(l.health, vec![70, 100]);
        assert_eq!(l.load, vec![70, 30]);
        assert_eq!(l.panic, vec![false, false], "total health 100: no panic");
        // Scaled when total health is below 100: 10/20/10 → 25/50/25 ...
        let l = priority_load(&[(1, 14), (2, 14), (1, 14)], 140, 0);
        assert_eq!(l.health, vec![10, 20, 10]);
        assert_eq!(l.load, vec![25, 50, 25]);
        assert_eq!(l.panic, vec![false, false, false]);
        // ... but with every level below the panic threshold, split by host counts.
        let l = priority_load(&[(1, 14), (2, 14), (1, 14)], 140, 50);
        assert_eq!(l.load, vec![34, 33, 33]);
        assert_eq!(l.panic, vec![true, true, true]);
        // Only some levels in panic: the load split stands, the level uses all its hosts.
        let l = priority_load(&[(1, 4), (2, 4)], 100, 50);
        assert_eq!(l.load, vec![34, 66]);
        assert_eq!(l.panic, vec![true, false]);
        // Rounding leftovers go to the first healthy level.
        let l = priority_load(&[(1, 4), (1, 4), (1, 4)], 100, 0);
        assert_eq!(l.health, vec![25, 25, 25]);
        assert_eq!(l.load, vec![34, 33, 33]);
        // Nothing healthy anywhere: total panic splits by host count.
        let l = priority_load(&[(0, 1), (0, 3)], 140, 50);
        assert_eq!(l.load, vec![25, 75]);
        assert_eq!(l.panic, vec![true, true]);
        // ... unless panic is disabled: all on P0, nothing to pick.
        let l = priority_load(&[(0, 1), (0, 3)], 140, 0);
        assert_eq!(l.load, vec![100, 0]);
        assert_eq!(l.panic, vec![false, false]);
        // An overprovisioning factor of 100 spills as soon as a host is down.
        let l = priority_load(&[(3, 4), (1, 1)], 100, 50);
        assert_eq!(l.load, vec![75, 25]);
    }

    #[test]
    fn choose_priority_uses_hash_mod_100() {
        assert_eq!(choose_priority(0, &[70, 30]), 0);
        assert_eq!(choose_priority(69, &[70, 30]), 0);
        assert_eq!(choose_priority(70, &[70, 30]), 1);
        assert_eq!(choose_priority(199, &[70, 30]), 1);
    }

    #[test]
    fn panic_balances_over_all_hosts_of_the_level() {
        let b = Balancer::new(
            &[level(vec![
                host(1, 1, HealthStatus::Healthy),
                host(2, 1, HealthStatus::Unhealthy),
                host(3, 1, HealthStatus::Unhealthy),
            ])],
            params(LbPolicy::RoundRobin),
        );
        let pick = b.choose(&LbContext::default());
        assert!(pick.panic);
        assert_eq!(shares(&b, 300).len(), 3);
        let no_panic = Balancer::new(
            &[level(vec![
                host(1, 1, HealthStatus::Healthy),
                host(2, 1, HealthStatus::Unhealthy),
            ])],
            LbParams {
                healthy_panic_threshold: 0,
                ..params(LbPolicy::RoundRobin)
            },
        );
        assert!(!no_panic.choose(&LbContext::default()).panic);
        assert_eq!(shares(&no_panic, 100).len(), 1);
    }

    #[test]
    fn hashing_balancers_are_stable_per_hash() {
        for policy in [
            LbPolicy::RingHash {
                minimum_ring_size: 1024,
                maximum_ring_size: 8 << 20,
            },
            LbPolicy::Maglev { table_size: 65537 },
        ] {
            let hosts = vec![
                host(1, 1, HealthStatus::Healthy),
                host(2, 1, HealthStatus::Healthy),
                host(3, 1, HealthStatus::Healthy),
            ];
            let b = Balancer::new(&[level(hosts)], params(policy));
            let mut seen = std::collections::BTreeSet::new();
            for k in 0..200u64 {
                let ctx = LbContext {
                    hash: Some(super::super::hash::xx_hash64(&k.to_le_bytes(), 0)),
                };
                let a = b.choose(&ctx).host.expect("host").address;
                let again = b.choose(&ctx).host.expect("host").address;
                assert_eq!(a, again, "{policy:?}");
                seen.insert(a);
            }
            assert_eq!(seen.len(), 3, "{policy:?}");
        }
    }

    fn in_zone(port: u16, zone: &str, zone_weight: u32, health: HealthStatus) -> Arc<Host> {
        Arc::new(Host::new(
            ([127, 0, 0, 1], port).into(),
            String::new(),
            Locality {
                zone: zone.into(),
                weight: zone_weight,
                ..Locality::default()
            },
            health,
            PoolSettings {
                protocol: UpstreamProtocol::Http1,
                connect_timeout: Duration::from_secs(1),
                tls: None,
            },
            Arc::new(ClusterStats::default()),
        ))
    }

    #[test]
    fn locality_weights_split_first_scaled_by_availability() {
        let weighted = LbParams {
            locality_weighted: true,
            ..params(LbPolicy::RoundRobin)
        };
        let hosts = vec![
            in_zone(1, "z1", 1, HealthStatus::Healthy),
            in_zone(2, "z1", 1, HealthStatus::Healthy),
            in_zone(3, "z2", 3, HealthStatus::Healthy),
        ];
        let b = Balancer::new(&[level(hosts.clone())], weighted);
        let s = shares(&b, 4000);
        assert_eq!((s[&1], s[&2], s[&3]), (500, 500, 3000), "{s:?}");
        // Without locality_weighted_lb_config the locality weights are ignored.
        let s = shares(
            &Balancer::new(&[level(hosts)], params(LbPolicy::RoundRobin)),
            3000,
        );
        assert_eq!((s[&1], s[&2], s[&3]), (1000, 1000, 1000), "{s:?}");
        // z2 half healthy: 3 × min(1, 1.4 × 0.5) = 2.1 against z1's 1.
        let hosts = vec![
            in_zone(1, "z1", 1, HealthStatus::Healthy),
            in_zone(3, "z2", 3, HealthStatus::Healthy),
            in_zone(4, "z2", 3, HealthStatus::Unhealthy),
        ];
        let s = shares(&Balancer::new(&[level(hosts)], weighted), 3100);
        assert!((995..=1005).contains(&s[&1]), "{s:?}");
        assert!(!s.contains_key(&4), "{s:?}");
        // A locality without a weight gets nothing.
        let hosts = vec![
            in_zone(1, "z1", 0, HealthStatus::Healthy),
            in_zone(3, "z2", 2, HealthStatus::Healthy),
        ];
        let s = shares(&Balancer::new(&[level(hosts)], weighted), 100);
        assert_eq!(s.keys().copied().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn hashing_with_locality_weights_leaves_out_unweighted_localities() {
        let hosts = vec![
            in_zone(1, "z1", 0, HealthStatus::Healthy),
            in_zone(2, "z2", 1, HealthStatus::Healthy),
            in_zone(3, "z3", 3, HealthStatus::Healthy),
        ];
        let (placed, weights) = hash_weights(
            &hosts,
            &hosts,
            &LbParams {
                locality_weighted: true,
                ..params(LbPolicy::Maglev { table_size: 65537 })
            },
        );
        let ports: Vec<u16> = placed.iter().map(|h| h.address.port()).collect();
        assert_eq!(ports, vec![2, 3]);
        assert_eq!(weights, vec![0.25, 0.75]);
    }

    #[test]
    fn an_empty_balancer_picks_nothing() {
        let b = Balancer::new(&[], params(LbPolicy::RoundRobin));
        assert!(b.choose(&LbContext::default()).host.is_none());
        assert!(
            Balancer::default()
                .choose(&LbContext::default())
                .host
                .is_none()
        );
    }
}
