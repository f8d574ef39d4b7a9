//! The local rate limit HTTP filter (`envoy.filters.http.local_ratelimit`): a token bucket per
//! filter configuration — the connection manager's, or a virtual host's / route's
//! `typed_per_filter_config` — shared by every connection and worker, as in Envoy.
//!
//! The bucket refills continuously at `tokens_per_fill / fill_interval` up to `max_tokens`
//! (Envoy 1.40's atomic token bucket, not the older timer that added `tokens_per_fill` at once
//! per tick) and starts full. It is one atomic: the time at which the bucket would be empty,
//! so taking a token is a compare-and-swap with no lock and no timer task.
//!
//! Stats `<stat_prefix>.http_local_rate_limit.{enabled,ok,rate_limited,enforced}` are shared by
//! every filter configuration with the same `stat_prefix` (as Envoy's stats store does by name)
//! and live for the process; [`StatsSource`] reports them. This module decides nothing about
//! which configuration applies to a request (that is the connection manager's job).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::stats::{Counter, Sample, Scope, Source};

/// A token bucket refilled continuously.
#[derive(Debug)]
pub struct TokenBucket {
    max_tokens: u32,
    /// Nanoseconds per token.
    token_ns: u64,
    /// Nanoseconds since `origin` at which the bucket is (was) empty; the tokens available at
    /// `now` are `(now - empty_at) / token_ns`, capped at `max_tokens`.
    empty_at: AtomicU64,
    origin: Instant,
}

impl TokenBucket {
    /// A full bucket. `tokens_per_fill` and `fill_interval` must be positive (the translation
    /// checks); zero is treated as one token per fill / one millisecond.
    pub fn new(max_tokens: u32, tokens_per_fill: u32, fill_interval: Duration) -> Self {
        let interval_ns = u64::try_from(fill_interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1_000_000);
        let token_ns = (interval_ns / u64::from(tokens_per_fill.max(1))).max(1);
        Self {
            max_tokens,
            token_ns,
            // Start full: empty `max_tokens` token times before the origin. The origin is
            // placed far enough in the past that this does not underflow.
            empty_at: AtomicU64::new(0),
            origin: Instant::now()
                .checked_sub(Duration::from_nanos(
                    token_ns.saturating_mul(u64::from(max_tokens)),
                ))
                .unwrap_or_else(Instant::now),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&self, now: Instant) -> bool {
        let now_ns = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX);
        let full_at_or_before =
            now_ns.saturating_sub(self.token_ns.saturating_mul(u64::from(self.max_tokens)));
        let mut current = self.empty_at.load(Ordering::Relaxed);
        loop {
            // A bucket idle for long is full, not fuller.
            let empty_at = current.max(full_at_or_before);
            let next = empty_at.saturating_add(self.token_ns);
            if next > now_ns {
                return false;
            }
            match self.empty_at.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Whole tokens available now (for tests and the admin view).
    pub fn available(&self) -> u32 {
        let now_ns = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let tokens = now_ns.saturating_sub(self.empty_at.load(Ordering::Relaxed)) / self.token_ns;
        u32::try_from(tokens.min(u64::from(self.max_tokens))).unwrap_or(self.max_tokens)
    }
}

/// Envoy's `http_local_rate_limit` stats of one `stat_prefix`.
#[derive(Debug, Default)]
pub struct RateLimitStats {
    /// Requests the filter was enabled for (`filter_enabled` sampled in).
    pub enabled: Counter,
    /// Requests that got a token.
    pub ok: Counter,
    /// Requests that found the bucket empty (enforced or not).
    pub rate_limited: Counter,
    /// Rate-limited requests answered with the local reply (`filter_enforced` sampled in).
    pub enforced: Counter,
}

fn registry() -> &'static Mutex<BTreeMap<String, Arc<RateLimitStats>>> {
    static REGISTRY: OnceLock<Mutex<BTreeMap<String, Arc<RateLimitStats>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// The stats of `stat_prefix`, shared with every other configuration using that prefix.
pub fn stats(stat_prefix: &str) -> Arc<RateLimitStats> {
    let mut map = registry().lock().unwrap_or_else(|p| p.into_inner());
    map.entry(stat_prefix.to_string()).or_default().clone()
}

/// Envoy's `local_rate_limit.<stat_prefix>.*` stats of the network filter (Envoy 1.40 names
/// them so, though its docs say `local_ratelimit.`).
#[derive(Debug, Default)]
pub struct ConnectionRateLimitStats {
    /// Connections closed because the bucket was empty.
    pub rate_limited: Counter,
}

fn connection_registry() -> &'static Mutex<BTreeMap<String, Arc<ConnectionRateLimitStats>>> {
    static REGISTRY: OnceLock<Mutex<BTreeMap<String, Arc<ConnectionRateLimitStats>>>> =
        OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// The network filter's stats of `stat_prefix`, shared by prefix.
pub fn connection_stats(stat_prefix: &str) -> Arc<ConnectionRateLimitStats> {
    let mut map = connection_registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.entry(stat_prefix.to_string()).or_default().clone()
}

/// Reports every local rate limit's stats; registered once with the server's stats store.
#[derive(Debug, Default)]
pub struct StatsSource;

impl Source for StatsSource {
    fn collect(&self, out: &mut Vec<Sample>) {
        let map = registry().lock().unwrap_or_else(|p| p.into_inner());
        for (prefix, s) in map.iter() {
            let scope = Scope::fixed(&format!("{prefix}.http_local_rate_limit"));
            scope.counter("enabled", s.enabled.get(), out);
            scope.counter("enforced", s.enforced.get(), out);
            scope.counter("ok", s.ok.get(), out);
            scope.counter("rate_limited", s.rate_limited.get(), out);
        }
        drop(map);
        let map = connection_registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (prefix, s) in map.iter() {
            let scope = Scope::fixed(&format!("local_rate_limit.{prefix}"));
            scope.counter("rate_limited", s.rate_limited.get(), out);
        }
    }
}

/// What the filter decided for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not enabled for this request, or a token was taken.
    Pass,
    /// Rate limited but not enforced: add the configuration's
    /// `request_headers_to_add_when_not_enforced` and go on.
    PassUnenforced,
    /// Answer with the configuration's local reply.
    Limit,
}

/// Runs one request through a configuration: `filter_enabled` sampled with `random_enabled`,
/// then the bucket, then `filter_enforced` sampled with `random_enforced` (Envoy samples each
/// fraction independently per request).
pub fn decide(
    c: &crate::config::local_ratelimit::LocalRateLimit,
    random_enabled: u64,
    random_enforced: u64,
) -> Decision {
    let Some(bucket) = &c.bucket else {
        return Decision::Pass;
    };
    if !sampled(c.enabled, random_enabled) {
        return Decision::Pass;
    }
    c.stats.enabled.inc();
    if bucket.try_take() {
        c.stats.ok.inc();
        return Decision::Pass;
    }
    c.stats.rate_limited.inc();
    if !sampled(c.enforced, random_enforced) {
        return Decision::PassUnenforced;
    }
    c.stats.enforced.inc();
    Decision::Limit
}

fn sampled((numerator, denominator): (u64, u64), random: u64) -> bool {
    denominator > 0 && random % denominator < numerator
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_full_and_refuses_when_empty() {
        let b = TokenBucket::new(3, 3, Duration::from_secs(60));
        let now = Instant::now();
        assert!(b.try_take_at(now));
        assert!(b.try_take_at(now));
        assert!(b.try_take_at(now));
        assert!(!b.try_take_at(now), "three tokens only");
    }

    #[test]
    fn refills_continuously_and_caps_at_max_tokens() {
        // 2 tokens per second: one every 500 ms.
        let b = TokenBucket::new(2, 2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(b.try_take_at(t0) && b.try_take_at(t0));
        assert!(!b.try_take_at(t0 + Duration::from_millis(400)));
        assert!(
            b.try_take_at(t0 + Duration::from_millis(510)),
            "one token after 500 ms"
        );
        assert!(!b.try_take_at(t0 + Duration::from_millis(520)));
        // Idle for a minute: full (2), not 120.
        let later = t0 + Duration::from_secs(60);
        assert!(b.try_take_at(later) && b.try_take_at(later));
        assert!(!b.try_take_at(later));
    }

    #[test]
    fn concurrent_takers_never_exceed_the_bucket() {
        let b = Arc::new(TokenBucket::new(1000, 1, Duration::from_secs(3600)));
        let taken = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (b, taken) = (b.clone(), taken.clone());
                std::thread::spawn(move || {
                    for _ in 0..600 {
                        if b.try_take() {
                            taken.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(taken.load(Ordering::Relaxed), 1000);
        assert_eq!(b.available(), 0);
    }

    fn config(yaml: &str) -> crate::config::local_ratelimit::LocalRateLimit {
        use crate::config::errors::{Errors, Path};
        use crate::config::local_ratelimit::{Level, Pb, translate};
        let pb: Pb = capstan_proto::from_yaml(yaml).expect("yaml");
        let mut errors = Errors::new();
        let c = translate(&pb, Level::PerRoute, &Path::new("rl"), &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        c.expect("config")
    }

    #[test]
    fn decisions_follow_enabled_then_bucket_then_enforced() {
        let c = config(
            r#"
stat_prefix: decide_test
token_bucket: { max_tokens: 1, fill_interval: 3600s }
filter_enabled: { default_value: { numerator: 50 } }
filter_enforced: { default_value: { numerator: 50 } }
"#,
        );
        // random 60 % 100 = 60 ≥ 50: not enabled, nothing counted, no token taken.
        assert_eq!(decide(&c, 60, 0), Decision::Pass);
        assert_eq!(c.stats.enabled.get(), 0);
        assert_eq!(decide(&c, 10, 0), Decision::Pass, "the one token");
        assert_eq!(decide(&c, 10, 70), Decision::PassUnenforced);
        assert_eq!(decide(&c, 10, 20), Decision::Limit);
        assert_eq!(
            (
                c.stats.enabled.get(),
                c.stats.ok.get(),
                c.stats.rate_limited.get(),
                c.stats.enforced.get()
            ),
            (3, 1, 2, 1)
        );
        let off =
            config("stat_prefix: off_test\ntoken_bucket: { max_tokens: 1, fill_interval: 1s }");
        for _ in 0..3 {
            assert_eq!(
                decide(&off, 0, 0),
                Decision::Pass,
                "filter_enabled unset is 0 %"
            );
        }
    }

    #[test]
    fn stats_are_shared_by_prefix() {
        let a = stats("test_shared_prefix");
        let b = stats("test_shared_prefix");
        a.ok.inc();
        assert_eq!(b.ok.get(), 1);
        let mut out = Vec::new();
        StatsSource.collect(&mut out);
        assert!(
            out.iter()
                .any(|s| s.name == "test_shared_prefix.http_local_rate_limit.ok"),
            "{out:?}"
        );
    }
}
