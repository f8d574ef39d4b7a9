//! Envoy `envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit` → [`LocalRateLimit`],
//! for the filter in a connection manager's `http_filters` and for `typed_per_filter_config`
//! on route configurations, virtual hosts and routes.
//!
//! Translation builds the filter configuration's token bucket (a few atomics; see
//! `http::local_ratelimit`), so each configuration — as in Envoy — has its own bucket from the
//! moment it is accepted. Which configuration applies to a request is the connection
//! manager's decision; this module only reads and checks the fields.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
pub use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit as Pb;
use envoy_types::pb::google::protobuf::Any;
use http::StatusCode;
use prost::{Message, Name};

use super::duration;
use super::errors::{Errors, Path};
use super::route::{HeaderMutations, header_addition, header_mutations};
use crate::http::local_ratelimit::{RateLimitStats, TokenBucket};

/// The filter's extension name (the usual `http_filters[].name` and per-filter config key).
pub const FILTER: &str = "envoy.filters.http.local_ratelimit";
/// Envoy's smallest `fill_interval`.
pub const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);

/// One local rate limit configuration.
#[derive(Debug)]
pub struct LocalRateLimit {
    pub stat_prefix: String,
    /// `None` at the connection-manager level: the filter only acts through per-route
    /// configurations (Envoy requires a bucket in those).
    pub bucket: Option<TokenBucket>,
    /// `filter_enabled` as (numerator, denominator); Envoy's default is 0 % (off).
    pub enabled: (u64, u64),
    /// `filter_enforced`; default 0 % (count only).
    pub enforced: (u64, u64),
    /// The local reply's status: `status.code`, default 429 (and 429 for codes below 400).
    pub status: StatusCode,
    /// Added to the rate-limited local reply.
    pub response_headers: HeaderMutations,
    /// Added to a request that was rate limited but not enforced.
    pub request_headers_when_not_enforced: HeaderMutations,
    pub stats: Arc<RateLimitStats>,
}

/// Where a configuration sits: per-filter configurations must carry a token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    ConnectionManager,
    PerRoute,
}

/// Decodes and translates a `LocalRateLimit` carried in an `Any`.
pub fn from_any(
    any: &Any,
    level: Level,
    path: &Path,
    errors: &mut Errors,
) -> Option<LocalRateLimit> {
    if any.type_url != Pb::type_url() {
        errors.push(
            path,
            format!(
                "unsupported configuration type {} (expected {})",
                any.type_url,
                Pb::type_url()
            ),
        );
        return None;
    }
    match Pb::decode(any.value.as_slice()) {
        Ok(pb) => translate(&pb, level, path, errors),
        Err(e) => {
            errors.push(path, format!("cannot decode: {e}"));
            None
        }
    }
}

pub fn translate(c: &Pb, level: Level, path: &Path, errors: &mut Errors) -> Option<LocalRateLimit> {
    let before = errors.len();
    if c.stat_prefix.is_empty() {
        errors.push(&path.field("stat_prefix"), "required");
    }
    let bpath = path.field("token_bucket");
    let bucket = match &c.token_bucket {
        None => {
            if level == Level::PerRoute {
                errors.push(
                    &bpath,
                    "required in per-route configurations (local rate limit token bucket must be set for per filter configs)",
                );
            }
            None
        }
        Some(b) => token_bucket(b, &bpath, errors),
    };
    let enabled = fraction(
        c.filter_enabled.as_ref(),
        &path.field("filter_enabled"),
        errors,
    );
    let enforced = fraction(
        c.filter_enforced.as_ref(),
        &path.field("filter_enforced"),
        errors,
    );
    let status = match &c.status {
        None => StatusCode::TOO_MANY_REQUESTS,
        Some(s) => match u16::try_from(s.code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            // Envoy answers 429 for codes below 400.
            Some(code) if code.as_u16() >= 400 => code,
            Some(_) => StatusCode::TOO_MANY_REQUESTS,
            None => {
                errors.push(
                    &path.field("status").field("code"),
                    format!("{} is not an HTTP status code", s.code),
                );
                StatusCode::TOO_MANY_REQUESTS
            }
        },
    };
    if c.local_rate_limit_per_downstream_connection {
        errors.unsupported_value(
            &path.field("local_rate_limit_per_downstream_connection"),
            "true",
            &["false (one bucket shared by all connections)"],
        );
    }
    let response_headers =
        header_mutations(&c.response_headers_to_add, &[], path, "response", errors);
    let mut request_headers_when_not_enforced = HeaderMutations::default();
    for (i, option) in c
        .request_headers_to_add_when_not_enforced
        .iter()
        .enumerate()
    {
        let opath = path
            .field("request_headers_to_add_when_not_enforced")
            .index(i);
        if let Some(a) = header_addition(option, &opath, errors) {
            request_headers_when_not_enforced.add.push(a);
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(LocalRateLimit {
        stats: crate::http::local_ratelimit::stats(&c.stat_prefix),
        stat_prefix: c.stat_prefix.clone(),
        bucket,
        enabled,
        enforced,
        status,
        response_headers,
        request_headers_when_not_enforced,
    })
}

/// The network filter `envoy.filters.network.local_ratelimit`: one token per connection,
/// checked when the filter chain is chosen; no token closes the connection at once.
#[derive(Debug)]
pub struct ConnectionRateLimit {
    pub stat_prefix: String,
    pub bucket: TokenBucket,
    /// `runtime_enabled.default_value` (default true); there is no runtime to override it.
    pub enabled: bool,
    pub stats: Arc<crate::http::local_ratelimit::ConnectionRateLimitStats>,
}

pub use envoy_types::pb::envoy::extensions::filters::network::local_ratelimit::v3::LocalRateLimit as NetworkPb;

/// The network filter's extension name.
pub const NETWORK_FILTER: &str = "envoy.filters.network.local_ratelimit";

pub fn connection_rate_limit(
    c: &NetworkPb,
    path: &Path,
    errors: &mut Errors,
) -> Option<ConnectionRateLimit> {
    let before = errors.len();
    if c.stat_prefix.is_empty() {
        errors.push(&path.field("stat_prefix"), "required");
    }
    let bpath = path.field("token_bucket");
    let bucket = match &c.token_bucket {
        None => {
            errors.push(&bpath, "required");
            None
        }
        Some(b) => token_bucket(b, &bpath, errors),
    };
    let enabled = c
        .runtime_enabled
        .as_ref()
        .and_then(|f| f.default_value)
        .map(|v| v.value)
        .unwrap_or(true);
    if errors.len() > before {
        return None;
    }
    Some(ConnectionRateLimit {
        stats: crate::http::local_ratelimit::connection_stats(&c.stat_prefix),
        stat_prefix: c.stat_prefix.clone(),
        bucket: bucket?,
        enabled,
    })
}

/// A `TokenBucket`: `fill_interval` ≥ 50 ms, positive `max_tokens` and `tokens_per_fill`.
fn token_bucket(
    b: &envoy_types::pb::envoy::r#type::v3::TokenBucket,
    path: &Path,
    errors: &mut Errors,
) -> Option<TokenBucket> {
    let fill_interval = match b.fill_interval.as_ref().and_then(duration) {
        Some(d) if d >= MIN_FILL_INTERVAL => Some(d),
        Some(_) => {
            errors.push(&path.field("fill_interval"), "must be at least 50ms");
            None
        }
        None => {
            errors.push(&path.field("fill_interval"), "required");
            None
        }
    };
    let tokens_per_fill = b.tokens_per_fill.map(|v| v.value).unwrap_or(1);
    if tokens_per_fill == 0 {
        errors.push(&path.field("tokens_per_fill"), "must be greater than 0");
    }
    if b.max_tokens == 0 {
        errors.push(&path.field("max_tokens"), "must be greater than 0");
    }
    if tokens_per_fill == 0 || b.max_tokens == 0 {
        return None;
    }
    fill_interval.map(|i| TokenBucket::new(b.max_tokens, tokens_per_fill, i))
}

/// A `RuntimeFeatureFlag`-less `RuntimeFractionalPercent`: its `default_value`; unset is 0 %.
fn fraction(
    f: Option<&core::RuntimeFractionalPercent>,
    path: &Path,
    errors: &mut Errors,
) -> (u64, u64) {
    use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
    let Some(v) = f.and_then(|f| f.default_value.as_ref()) else {
        return (0, 100);
    };
    let denominator = match DenominatorType::try_from(v.denominator) {
        Ok(DenominatorType::Hundred) => 100,
        Ok(DenominatorType::TenThousand) => 10_000,
        Ok(DenominatorType::Million) => 1_000_000,
        Err(_) => {
            errors.push(
                &path.field("default_value").field("denominator"),
                format!("unknown value {}", v.denominator),
            );
            100
        }
    };
    (u64::from(v.numerator).min(denominator), denominator)
}

/// The per-filter configurations of one route configuration, virtual host or route:
/// (filter name, configuration). Keys whose configuration is not a `LocalRateLimit` are
/// rejected: no other HTTP filter is implemented.
pub type PerFilter = Vec<(String, Arc<LocalRateLimit>)>;

pub fn per_filter(
    map: &std::collections::HashMap<String, Any>,
    path: &Path,
    errors: &mut Errors,
) -> PerFilter {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let mut out = Vec::new();
    for key in keys {
        let kpath = path.field("typed_per_filter_config").key(key);
        if let Some(c) = from_any(&map[key], Level::PerRoute, &kpath, errors) {
            out.push((key.clone(), Arc::new(c)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str, level: Level) -> Result<LocalRateLimit, Vec<String>> {
        let pb: Pb = capstan_proto::from_yaml(yaml).map_err(|e| vec![e.to_string()])?;
        let mut errors = Errors::new();
        // The supported-subset walk runs on whole resources; here on the message alone.
        crate::config::supported::check(&pb, &Path::new("rl"), &mut errors);
        let c = translate(&pb, level, &Path::new("rl"), &mut errors);
        if errors.is_empty() {
            Ok(c.expect("no errors means a config"))
        } else {
            Err(errors.iter().map(|e| e.to_string()).collect())
        }
    }

    #[test]
    fn defaults_are_envoys() {
        let c = parse(
            "stat_prefix: p\ntoken_bucket: { max_tokens: 2, fill_interval: 1s }",
            Level::PerRoute,
        )
        .expect("valid");
        assert_eq!(c.enabled, (0, 100), "filter_enabled defaults to 0 %");
        assert_eq!(c.enforced, (0, 100));
        assert_eq!(c.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(c.bucket.as_ref().map(TokenBucket::available), Some(2));
    }

    #[test]
    fn status_below_400_becomes_429_and_fractions_read() {
        let c = parse(
            r#"
stat_prefix: p
status: { code: 302 }
token_bucket: { max_tokens: 1, fill_interval: 1s }
filter_enabled: { default_value: { numerator: 50, denominator: TEN_THOUSAND } }
filter_enforced: { default_value: { numerator: 100 } }
"#,
            Level::ConnectionManager,
        )
        .expect("valid");
        assert_eq!(c.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(c.enabled, (50, 10_000));
        assert_eq!(c.enforced, (100, 100));
    }

    #[test]
    fn every_problem_is_named() {
        let errs = parse(
            r#"
token_bucket: { max_tokens: 0, tokens_per_fill: 0, fill_interval: 0.01s }
local_rate_limit_per_downstream_connection: true
descriptors: [ { entries: [ { key: k, value: v } ], token_bucket: { max_tokens: 1, fill_interval: 1s } } ]
"#,
            Level::PerRoute,
        )
        .expect_err("invalid");
        for e in [
            "rl.descriptors: unsupported field",
            "rl.stat_prefix: required",
            "rl.token_bucket.fill_interval: must be at least 50ms",
            "rl.token_bucket.tokens_per_fill: must be greater than 0",
            "rl.token_bucket.max_tokens: must be greater than 0",
            "rl.local_rate_limit_per_downstream_connection: unsupported value true (supported: false (one bucket shared by all connections))",
        ] {
            assert!(errs.iter().any(|x| x == e), "missing {e:?} in {errs:#?}");
        }
        let errs = parse("stat_prefix: p", Level::PerRoute).expect_err("no bucket");
        assert_eq!(
            errs,
            vec![
                "rl.token_bucket: required in per-route configurations (local rate limit token bucket must be set for per filter configs)"
            ]
        );
        assert!(parse("stat_prefix: p", Level::ConnectionManager).is_ok());
    }

    #[test]
    fn connection_rate_limits_need_a_bucket_and_default_to_enabled() {
        let parse = |yaml: &str| {
            let pb: NetworkPb = capstan_proto::from_yaml(yaml).expect("yaml");
            let mut errors = Errors::new();
            let c = connection_rate_limit(&pb, &Path::new("rl"), &mut errors);
            (c, errors.iter().map(|e| e.to_string()).collect::<Vec<_>>())
        };
        let (c, errs) = parse("stat_prefix: p\ntoken_bucket: { max_tokens: 2, fill_interval: 1s }");
        assert!(errs.is_empty(), "{errs:?}");
        let c = c.expect("config");
        assert!(c.enabled);
        assert_eq!(c.bucket.available(), 2);
        let (c, _) = parse(
            "stat_prefix: p\ntoken_bucket: { max_tokens: 2, fill_interval: 1s }\nruntime_enabled: { default_value: false, runtime_key: k }",
        );
        assert!(!c.expect("config").enabled);
        let (c, errs) = parse("token_bucket: { max_tokens: 1 }");
        assert!(c.is_none());
        assert_eq!(
            errs,
            vec![
                "rl.stat_prefix: required",
                "rl.token_bucket.fill_interval: required"
            ]
        );
    }
}
