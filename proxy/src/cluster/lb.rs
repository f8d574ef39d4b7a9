//! Load balancers: round robin, random and least request (power of N choices), as pure picks
//! over a host slice.
//!
//! The picks take their randomness and request counts as arguments so they are deterministic
//! under test. This module must not know how hosts are discovered or connected to.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::host::Host;
use crate::config::cluster::LbPolicy;

/// A cluster's load balancer state.
#[derive(Debug)]
pub enum LoadBalancer {
    RoundRobin { next: AtomicUsize },
    Random,
    LeastRequest { choice_count: u32 },
}

impl LoadBalancer {
    pub fn new(policy: LbPolicy) -> Self {
        match policy {
            // Envoy starts each round robin at a random offset so that proxies started
            // together do not all hit the first host first.
            LbPolicy::RoundRobin => LoadBalancer::RoundRobin {
                next: AtomicUsize::new(fastrand::usize(..1024)),
            },
            LbPolicy::Random => LoadBalancer::Random,
            LbPolicy::LeastRequest { choice_count } => LoadBalancer::LeastRequest { choice_count },
        }
    }

    /// Picks a host; `None` only for an empty slice.
    pub fn choose<'a>(&self, hosts: &'a [Arc<Host>]) -> Option<&'a Arc<Host>> {
        if hosts.is_empty() {
            return None;
        }
        let i = match self {
            LoadBalancer::RoundRobin { next } => {
                round_robin(hosts.len(), next.fetch_add(1, Ordering::Relaxed))
            }
            LoadBalancer::Random => fastrand::usize(..hosts.len()),
            LoadBalancer::LeastRequest { choice_count } => least_request(
                hosts.len(),
                *choice_count,
                |i| hosts[i].active_requests(),
                fastrand::usize,
            ),
        };
        hosts.get(i)
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
    fn least_request_spreads_over_idle_hosts() {
        let mut seen = [0u32; 4];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..400 {
            seen[least_request(4, 2, |_| 0, |r| rng.usize(r))] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn random_spreads_over_every_host() {
        let lb = LoadBalancer::new(LbPolicy::Random);
        let hosts: Vec<Arc<Host>> = (0..4)
            .map(|i| {
                Arc::new(Host::new(
                    ([127, 0, 0, 1], 8000 + i).into(),
                    String::new(),
                    Default::default(),
                    crate::config::cluster::HealthStatus::Healthy,
                    crate::cluster::pool::PoolSettings {
                        protocol: crate::config::cluster::UpstreamProtocol::Http1,
                        connect_timeout: std::time::Duration::from_secs(1),
                    },
                    Default::default(),
                ))
            })
            .collect();
        let mut seen = [0u32; 4];
        for _ in 0..4000 {
            let h = lb.choose(&hosts).expect("a host");
            seen[usize::from(h.address.port() - 8000)] += 1;
        }
        // 1000 expected each; ±20 % is > 6 standard deviations.
        assert!(seen.iter().all(|&n| (800..=1200).contains(&n)), "{seen:?}");
        assert!(lb.choose(&[]).is_none());
    }
}
