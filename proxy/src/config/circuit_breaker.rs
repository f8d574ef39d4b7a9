//! Envoy `Cluster.circuit_breakers` → [`CircuitBreakers`]: the limits of each routing priority.
//!
//! Pure translation with Envoy's defaults (1024 connections, 1024 pending requests, 1024
//! requests, 3 retries; a `retry_budget` of 20 % with a minimum concurrency of 3 replaces
//! `max_retries`). As in Envoy, the first `thresholds` entry of a priority wins. It must not
//! count anything: the running breakers are `cluster::circuit_breaker`.

use envoy_types::pb::envoy::config::cluster::v3 as pb;
use envoy_types::pb::envoy::config::core::v3::RoutingPriority;

use super::errors::{Errors, Path};

pub const DEFAULT_MAX_CONNECTIONS: u64 = 1024;
pub const DEFAULT_MAX_PENDING_REQUESTS: u64 = 1024;
pub const DEFAULT_MAX_REQUESTS: u64 = 1024;
pub const DEFAULT_MAX_RETRIES: u64 = 3;
pub const DEFAULT_BUDGET_PERCENT: f64 = 20.0;
pub const DEFAULT_MIN_RETRY_CONCURRENCY: u64 = 3;

/// The limits of one routing priority.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub max_connections: u64,
    pub max_pending_requests: u64,
    pub max_requests: u64,
    pub max_retries: u64,
    pub retry_budget: Option<RetryBudget>,
    /// Publish the `remaining_*` gauges.
    pub track_remaining: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending_requests: DEFAULT_MAX_PENDING_REQUESTS,
            max_requests: DEFAULT_MAX_REQUESTS,
            max_retries: DEFAULT_MAX_RETRIES,
            retry_budget: None,
            track_remaining: false,
        }
    }
}

/// Retries limited to a share of the active and pending requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    pub budget_percent: f64,
    pub min_retry_concurrency: u64,
}

/// Envoy's two routing priorities.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CircuitBreakers {
    pub default: Thresholds,
    pub high: Thresholds,
}

pub fn translate(
    cb: Option<&pb::CircuitBreakers>,
    path: &Path,
    errors: &mut Errors,
) -> CircuitBreakers {
    let mut out = CircuitBreakers::default();
    let Some(cb) = cb else { return out };
    let mut seen = [false, false];
    for (i, t) in cb.thresholds.iter().enumerate() {
        let tpath = path.field("thresholds").index(i);
        let slot = match RoutingPriority::try_from(t.priority) {
            Ok(RoutingPriority::Default) => 0,
            Ok(RoutingPriority::High) => 1,
            Err(_) => {
                errors.push(
                    &tpath.field("priority"),
                    format!("unknown value {}", t.priority),
                );
                continue;
            }
        };
        let thresholds = thresholds(t, &tpath, errors);
        if !seen[slot] {
            seen[slot] = true;
            if slot == 0 {
                out.default = thresholds;
            } else {
                out.high = thresholds;
            }
        }
    }
    out
}

fn thresholds(
    t: &pb::circuit_breakers::Thresholds,
    path: &Path,
    errors: &mut Errors,
) -> Thresholds {
    let value = |v: Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u64| {
        v.map_or(d, |v| u64::from(v.value))
    };
    let retry_budget = t.retry_budget.as_ref().map(|b| {
        let budget_percent = b.budget_percent.map_or(DEFAULT_BUDGET_PERCENT, |p| p.value);
        if !(0.0..=100.0).contains(&budget_percent) {
            errors.push(
                &path.field("retry_budget").field("budget_percent"),
                "must be between 0 and 100",
            );
        }
        RetryBudget {
            budget_percent,
            min_retry_concurrency: value(b.min_retry_concurrency, DEFAULT_MIN_RETRY_CONCURRENCY),
        }
    });
    Thresholds {
        max_connections: value(t.max_connections, DEFAULT_MAX_CONNECTIONS),
        max_pending_requests: value(t.max_pending_requests, DEFAULT_MAX_PENDING_REQUESTS),
        max_requests: value(t.max_requests, DEFAULT_MAX_REQUESTS),
        max_retries: value(t.max_retries, DEFAULT_MAX_RETRIES),
        retry_budget,
        track_remaining: t.track_remaining,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate_yaml(yaml: &str) -> Result<CircuitBreakers, Vec<String>> {
        let pb: pb::CircuitBreakers =
            capstan_proto::from_yaml(yaml).map_err(|e| vec![e.to_string()])?;
        let mut errors = Errors::new();
        let out = translate(Some(&pb), &Path::new("circuit_breakers"), &mut errors);
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    #[test]
    fn envoy_defaults_and_first_entry_per_priority() {
        let cb = translate_yaml(
            r#"
thresholds:
- { max_requests: 1, max_pending_requests: 0 }
- { priority: HIGH, max_connections: 7, track_remaining: true, retry_budget: {} }
- { max_requests: 99 }
"#,
        )
        .expect("valid");
        assert_eq!(cb.default.max_requests, 1);
        assert_eq!(cb.default.max_pending_requests, 0);
        assert_eq!(cb.default.max_connections, 1024);
        assert_eq!(cb.default.max_retries, 3);
        assert_eq!(cb.high.max_connections, 7);
        assert!(cb.high.track_remaining);
        assert_eq!(
            cb.high.retry_budget,
            Some(RetryBudget {
                budget_percent: 20.0,
                min_retry_concurrency: 3
            })
        );
        let none = translate(None, &Path::new("c"), &mut Errors::new());
        assert_eq!(none, CircuitBreakers::default());
    }

    #[test]
    fn a_budget_over_100_percent_is_rejected() {
        let errs =
            translate_yaml("thresholds: [{ retry_budget: { budget_percent: { value: 150 } } }]")
                .expect_err("invalid");
        assert_eq!(
            errs,
            vec![
                "circuit_breakers.thresholds[0].retry_budget.budget_percent: must be between 0 and 100"
            ]
        );
    }
}
