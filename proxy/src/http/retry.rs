//! Retry decisions, as Envoy's `RetryStateImpl` makes them: pure functions of the policy and
//! what happened to one try. The I/O that acts on them is in `proxy`.

use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::cluster::pool::UpstreamError;
use crate::config::route::RetryPolicy;

/// How one upstream try ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryOutcome {
    /// Response headers arrived with this status.
    Response(StatusCode),
    /// The connection could not be established (refused, unreachable, connect timeout).
    ConnectFailure,
    /// The connection or stream was reset before response headers.
    Reset,
    /// `per_try_timeout` elapsed before response headers (Envoy: a local reset).
    PerTryTimeout,
}

impl TryOutcome {
    pub fn from_error(e: &UpstreamError) -> Self {
        match e {
            UpstreamError::ConnectTimeout | UpstreamError::ConnectFailure(_) => {
                TryOutcome::ConnectFailure
            }
            UpstreamError::Handshake(_) | UpstreamError::Reset(_) => TryOutcome::Reset,
            // Never retried: the router answers a circuit-breaker overflow at once.
            UpstreamError::Overflow => TryOutcome::Reset,
        }
    }
}

/// Whether `policy` retries a try that ended with `outcome` (`headers` are the response's).
pub fn should_retry(
    policy: &RetryPolicy,
    outcome: TryOutcome,
    headers: Option<&HeaderMap>,
) -> bool {
    let on = &policy.retry_on;
    match outcome {
        TryOutcome::Response(status) => {
            // A response from an upstream Envoy that rate limited us is retried only under
            // `envoy-ratelimited`, which is not supported.
            if headers.is_some_and(|h| h.contains_key("x-envoy-ratelimited")) {
                return false;
            }
            let code = status.as_u16();
            (on.five_xx && status.is_server_error())
                || (on.gateway_error && matches!(code, 502..=504))
                || (on.retriable_status_codes && policy.retriable_status_codes.contains(&code))
        }
        TryOutcome::ConnectFailure => {
            on.five_xx || on.gateway_error || on.reset || on.connect_failure
        }
        TryOutcome::Reset | TryOutcome::PerTryTimeout => on.five_xx || on.gateway_error || on.reset,
    }
}

/// Envoy's `JitteredExponentialBackOffStrategy`: the `n`th retry (from 1) waits a uniformly
/// random time in `[0, min(base * 2^(n-1), max))`, never more than `max`. `random` is any
/// uniformly distributed `u64`.
pub fn backoff(base: Duration, max: Duration, retry: u32, random: u64) -> Duration {
    let base_ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX).max(1);
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut interval = base_ms;
    for _ in 1..retry {
        interval = if interval < max_ms / 2 {
            interval * 2
        } else {
            max_ms
        };
    }
    Duration::from_millis((random % interval).min(max_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::route::{DEFAULT_RETRY_BASE_INTERVAL, RetryOn};

    fn policy(on: RetryOn, codes: &[u16]) -> RetryPolicy {
        RetryPolicy {
            retry_on: on,
            num_retries: 1,
            per_try_timeout: None,
            retriable_status_codes: codes.to_vec(),
            base_interval: DEFAULT_RETRY_BASE_INTERVAL,
            max_interval: DEFAULT_RETRY_BASE_INTERVAL * 10,
        }
    }

    fn status(code: u16) -> TryOutcome {
        TryOutcome::Response(StatusCode::from_u16(code).expect("code"))
    }

    #[test]
    fn five_xx_retries_every_server_error_and_every_failure() {
        let p = policy(
            RetryOn {
                five_xx: true,
                ..RetryOn::default()
            },
            &[],
        );
        for code in [500, 501, 503, 599] {
            assert!(should_retry(&p, status(code), None), "{code}");
        }
        for code in [200, 404, 429] {
            assert!(!should_retry(&p, status(code), None), "{code}");
        }
        assert!(should_retry(&p, TryOutcome::ConnectFailure, None));
        assert!(should_retry(&p, TryOutcome::Reset, None));
        assert!(should_retry(&p, TryOutcome::PerTryTimeout, None));
        let mut h = HeaderMap::new();
        h.insert("x-envoy-ratelimited", "true".parse().expect("value"));
        assert!(!should_retry(&p, status(503), Some(&h)));
    }

    #[test]
    fn gateway_error_only_retries_502_to_504() {
        let p = policy(
            RetryOn {
                gateway_error: true,
                ..RetryOn::default()
            },
            &[],
        );
        assert!(!should_retry(&p, status(500), None));
        assert!(should_retry(&p, status(502), None));
        assert!(should_retry(&p, status(504), None));
        assert!(should_retry(&p, TryOutcome::Reset, None));
    }

    #[test]
    fn connect_failure_and_reset_are_distinct() {
        let p = policy(
            RetryOn {
                connect_failure: true,
                ..RetryOn::default()
            },
            &[],
        );
        assert!(should_retry(&p, TryOutcome::ConnectFailure, None));
        assert!(!should_retry(&p, TryOutcome::Reset, None));
        assert!(!should_retry(&p, TryOutcome::PerTryTimeout, None));
        assert!(!should_retry(&p, status(503), None));
        let p = policy(
            RetryOn {
                reset: true,
                ..RetryOn::default()
            },
            &[],
        );
        assert!(should_retry(&p, TryOutcome::ConnectFailure, None));
        assert!(should_retry(&p, TryOutcome::Reset, None));
        assert!(should_retry(&p, TryOutcome::PerTryTimeout, None));
        assert!(!should_retry(&p, status(503), None));
    }

    #[test]
    fn retriable_status_codes_need_the_condition() {
        let on = RetryOn {
            retriable_status_codes: true,
            ..RetryOn::default()
        };
        let p = policy(on, &[409]);
        assert!(should_retry(&p, status(409), None));
        assert!(!should_retry(&p, status(503), None));
        let p = policy(RetryOn::default(), &[409]);
        assert!(!should_retry(&p, status(409), None));
    }

    #[test]
    fn backoff_is_fully_jittered_exponential_and_capped() {
        let base = Duration::from_millis(25);
        let max = Duration::from_millis(250);
        for r in [0, 1, 7, 24, 25, 1000, u64::MAX] {
            assert!(backoff(base, max, 1, r) < Duration::from_millis(25));
            assert!(backoff(base, max, 2, r) < Duration::from_millis(50));
            assert!(backoff(base, max, 3, r) < Duration::from_millis(100));
            assert!(backoff(base, max, 4, r) < Duration::from_millis(200));
            assert!(backoff(base, max, 5, r) < max);
            assert!(backoff(base, max, 40, r) < max);
        }
        assert_eq!(backoff(base, max, 1, 24), Duration::from_millis(24));
        assert_eq!(backoff(base, max, 2, 49), Duration::from_millis(49));
        assert_eq!(backoff(base, max, 9, 249), Duration::from_millis(249));
        assert_eq!(backoff(base, max, 9, 250), Duration::ZERO);
    }
}
