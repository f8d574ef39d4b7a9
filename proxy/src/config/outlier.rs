//! Envoy `Cluster.outlier_detection` → [`OutlierDetection`], with Envoy's defaults.
//!
//! Pure translation; the detector that acts on it is `cluster::outlier`. Fields the proxy does
//! not implement (`monitors`, `max_ejection_time_jitter`, …) are rejected by the supported
//! subset table, never ignored.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as pb;
use envoy_types::pb::google::protobuf::UInt32Value;

use super::duration;
use super::errors::{Errors, Path};

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u64,
    /// Eject one host even when that exceeds `max_ejection_percent`.
    pub always_eject_one_host: bool,
    /// `successful_active_health_check_uneject_host` (default true): a passing active health
    /// check returns an ejected host at once.
    pub uneject_on_health_check_success: bool,
    pub consecutive_5xx: u64,
    pub enforcing_consecutive_5xx: u64,
    pub consecutive_gateway_failure: u64,
    pub enforcing_consecutive_gateway_failure: u64,
    pub split_external_local_origin_errors: bool,
    pub consecutive_local_origin_failure: u64,
    pub enforcing_consecutive_local_origin_failure: u64,
    pub success_rate_minimum_hosts: u64,
    pub success_rate_request_volume: u64,
    pub success_rate_stdev_factor: u64,
    pub enforcing_success_rate: u64,
    pub enforcing_local_origin_success_rate: u64,
    pub failure_percentage_threshold: u64,
    pub failure_percentage_minimum_hosts: u64,
    pub failure_percentage_request_volume: u64,
    pub enforcing_failure_percentage: u64,
    pub enforcing_failure_percentage_local_origin: u64,
}

impl Default for OutlierDetection {
    /// Envoy's defaults (`outlier_detection_impl.h`).
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            always_eject_one_host: false,
            uneject_on_health_check_success: true,
            consecutive_5xx: 5,
            enforcing_consecutive_5xx: 100,
            consecutive_gateway_failure: 5,
            enforcing_consecutive_gateway_failure: 0,
            split_external_local_origin_errors: false,
            consecutive_local_origin_failure: 5,
            enforcing_consecutive_local_origin_failure: 100,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            enforcing_success_rate: 100,
            enforcing_local_origin_success_rate: 100,
            failure_percentage_threshold: 85,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            enforcing_failure_percentage: 0,
            enforcing_failure_percentage_local_origin: 0,
        }
    }
}

pub fn translate(
    od: Option<&pb::OutlierDetection>,
    path: &Path,
    errors: &mut Errors,
) -> Option<OutlierDetection> {
    let od = od?;
    let d = OutlierDetection::default();
    let mut positive =
        |name: &str, v: &Option<envoy_types::pb::google::protobuf::Duration>, dflt| match v {
            None => dflt,
            Some(v) => match duration(v) {
                Some(x) if !x.is_zero() => x,
                _ => {
                    errors.push(&path.field(name), "must be a positive duration");
                    dflt
                }
            },
        };
    let interval = positive("interval", &od.interval, d.interval);
    let base_ejection_time = positive(
        "base_ejection_time",
        &od.base_ejection_time,
        d.base_ejection_time,
    );
    // Envoy: without max_ejection_time, the larger of 300 s and base_ejection_time.
    let max_ejection_time = positive(
        "max_ejection_time",
        &od.max_ejection_time,
        d.max_ejection_time.max(base_ejection_time),
    );
    if max_ejection_time < base_ejection_time {
        errors.push(
            &path.field("max_ejection_time"),
            "outlier detector's max_ejection_time cannot be smaller than base_ejection_time",
        );
    }
    let num = |v: Option<UInt32Value>, dflt: u64| v.map_or(dflt, |v| u64::from(v.value));
    let mut percent = |name: &str, v: Option<UInt32Value>, dflt: u64| {
        let p = num(v, dflt);
        if p > 100 {
            errors.push(&path.field(name), "must be at most 100");
        }
        p.min(100)
    };
    Some(OutlierDetection {
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_percent: percent(
            "max_ejection_percent",
            od.max_ejection_percent,
            d.max_ejection_percent,
        ),
        always_eject_one_host: od.always_eject_one_host.is_some_and(|b| b.value),
        uneject_on_health_check_success: od
            .successful_active_health_check_uneject_host
            .is_none_or(|b| b.value),
        consecutive_5xx: num(od.consecutive_5xx, d.consecutive_5xx),
        enforcing_consecutive_5xx: percent(
            "enforcing_consecutive_5xx",
            od.enforcing_consecutive_5xx,
            d.enforcing_consecutive_5xx,
        ),
        consecutive_gateway_failure: num(
            od.consecutive_gateway_failure,
            d.consecutive_gateway_failure,
        ),
        enforcing_consecutive_gateway_failure: percent(
            "enforcing_consecutive_gateway_failure",
            od.enforcing_consecutive_gateway_failure,
            d.enforcing_consecutive_gateway_failure,
        ),
        split_external_local_origin_errors: od.split_external_local_origin_errors,
        consecutive_local_origin_failure: num(
            od.consecutive_local_origin_failure,
            d.consecutive_local_origin_failure,
        ),
        enforcing_consecutive_local_origin_failure: percent(
            "enforcing_consecutive_local_origin_failure",
            od.enforcing_consecutive_local_origin_failure,
            d.enforcing_consecutive_local_origin_failure,
        ),
        success_rate_minimum_hosts: num(
            od.success_rate_minimum_hosts,
            d.success_rate_minimum_hosts,
        ),
        success_rate_request_volume: num(
            od.success_rate_request_volume,
            d.success_rate_request_volume,
        ),
        success_rate_stdev_factor: num(od.success_rate_stdev_factor, d.success_rate_stdev_factor),
        enforcing_success_rate: percent(
            "enforcing_success_rate",
            od.enforcing_success_rate,
            d.enforcing_success_rate,
        ),
        enforcing_local_origin_success_rate: percent(
            "enforcing_local_origin_success_rate",
            od.enforcing_local_origin_success_rate,
            d.enforcing_local_origin_success_rate,
        ),
        failure_percentage_threshold: percent(
            "failure_percentage_threshold",
            od.failure_percentage_threshold,
            d.failure_percentage_threshold,
        ),
        failure_percentage_minimum_hosts: num(
            od.failure_percentage_minimum_hosts,
            d.failure_percentage_minimum_hosts,
        ),
        failure_percentage_request_volume: num(
            od.failure_percentage_request_volume,
            d.failure_percentage_request_volume,
        ),
        enforcing_failure_percentage: percent(
            "enforcing_failure_percentage",
            od.enforcing_failure_percentage,
            d.enforcing_failure_percentage,
        ),
        enforcing_failure_percentage_local_origin: percent(
            "enforcing_failure_percentage_local_origin",
            od.enforcing_failure_percentage_local_origin,
            d.enforcing_failure_percentage_local_origin,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate_yaml(yaml: &str) -> Result<OutlierDetection, Vec<String>> {
        let pb: pb::OutlierDetection =
            capstan_proto::from_yaml(yaml).map_err(|e| vec![e.to_string()])?;
        let mut errors = Errors::new();
        let out = translate(Some(&pb), &Path::new("outlier_detection"), &mut errors);
        if errors.is_empty() {
            Ok(out.expect("configured"))
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    #[test]
    fn envoy_defaults() {
        let od = translate_yaml("{}").expect("valid");
        assert_eq!(od, OutlierDetection::default());
        assert_eq!(od.enforcing_consecutive_gateway_failure, 0);
        let od = translate_yaml("base_ejection_time: 400s").expect("valid");
        assert_eq!(od.max_ejection_time, Duration::from_secs(400));
        assert!(translate(None, &Path::new("o"), &mut Errors::new()).is_none());
    }

    #[test]
    fn bad_values_are_named() {
        let errs = translate_yaml(
            "interval: 0s\nbase_ejection_time: 10s\nmax_ejection_time: 5s\nmax_ejection_percent: 101\n",
        )
        .expect_err("invalid");
        assert_eq!(
            errs,
            vec![
                "outlier_detection.interval: must be a positive duration",
                "outlier_detection.max_ejection_time: outlier detector's max_ejection_time cannot be smaller than base_ejection_time",
                "outlier_detection.max_ejection_percent: must be at most 100",
            ]
        );
    }
}
