//! Small conversions shared by the translators: Gateway API durations to protobuf durations,
//! protobuf wrapper values, socket addresses, and the age order that decides conflicts.
//!
//! Owns no policy of its own; every decision lives in the module that calls these.

use std::time::Duration as StdDuration;

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::google::protobuf::{
    BoolValue, Duration as PbDuration, UInt32Value, UInt64Value,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::api::parse_duration;
use crate::store::ObjectKey;

/// A protobuf `Duration` from a std one (saturating; Gateway durations are far below the limit).
pub(crate) fn pb_duration(d: StdDuration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Sub-second nanos are below 10^9 and fit.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Parses a Gateway API duration (`"250ms"`, `"1h30m"`) into a protobuf `Duration`. Objects are
/// validated before they reach the store, so an error here means a provider skipped
/// validation; callers report it on the object's status and leave the field unset.
pub(crate) fn duration(text: &str) -> Result<PbDuration, String> {
    parse_duration(text).map(pb_duration)
}

/// Like [`duration`], but zero is rejected (Envoy requires `gt: 0s` for most intervals).
pub(crate) fn positive_duration(text: &str) -> Result<PbDuration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(pb_duration(d))
}

pub(crate) fn u32v(value: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value })
}

pub(crate) fn u64v(value: u64) -> Option<UInt64Value> {
    Some(UInt64Value { value })
}

pub(crate) fn boolv(value: bool) -> Option<BoolValue> {
    Some(BoolValue { value })
}

/// A TCP socket address.
pub(crate) fn socket_address(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// The order in which conflicting objects are ranked: older first (`creationTimestamp`), then
/// by namespace and name. Objects without a timestamp (the file provider sets none) rank after
/// every timestamped one, among themselves by name, so the order is total and deterministic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Age {
    untimed: bool,
    created: Option<Time>,
    key: ObjectKey,
}

impl Age {
    pub(crate) fn of(meta: &ObjectMeta, key: &ObjectKey) -> Age {
        Age {
            untimed: meta.creation_timestamp.is_none(),
            created: meta.creation_timestamp.clone(),
            key: key.clone(),
        }
    }
}

/// Whether Envoy accepts `value` where it wants a header value (its `HTTP_HEADER_VALUE` rule,
/// which also guards paths and host names): no CR, LF or NUL.
pub(crate) fn header_value_ok(value: &str) -> bool {
    !value.contains(['\r', '\n', '\0'])
}

/// Whether Envoy accepts `name` as a header name (an RFC 9110 token).
pub(crate) fn header_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A Service port as a `u16`, or `None` when out of range.
pub(crate) fn port_u16(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_convert_to_seconds_and_nanos() {
        assert_eq!(
            duration("1500ms"),
            Ok(PbDuration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
        assert_eq!(
            duration("0s"),
            Ok(PbDuration {
                seconds: 0,
                nanos: 0
            })
        );
        assert!(positive_duration("0s").is_err());
        assert!(duration("soon").is_err());
    }

    #[test]
    fn header_checks_follow_envoys_rules() {
        assert!(header_value_ok("a b/c"));
        assert!(!header_value_ok("a\r\nx-injected: 1"));
        assert!(header_name_ok("x-user_id"));
        assert!(!header_name_ok("x user"));
        assert!(!header_name_ok(""));
    }

    #[test]
    fn untimed_objects_rank_after_timestamped_ones_then_by_name() {
        let key = |n: &str| ObjectKey::new("ns", n);
        let untimed = ObjectMeta::default();
        let timed = ObjectMeta {
            creation_timestamp: Some(Time("2024-01-01T00:00:00Z".parse().expect("timestamp"))),
            ..Default::default()
        };
        let later = ObjectMeta {
            creation_timestamp: Some(Time("2025-01-01T00:00:00Z".parse().expect("timestamp"))),
            ..Default::default()
        };
        assert!(Age::of(&timed, &key("z")) < Age::of(&later, &key("a")));
        assert!(Age::of(&later, &key("z")) < Age::of(&untimed, &key("a")));
        assert!(Age::of(&untimed, &key("a")) < Age::of(&untimed, &key("b")));
    }
}
