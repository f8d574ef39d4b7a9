//! Header manipulation for proxied requests and responses: configured mutations in Envoy's
//! order, hop-by-hop header removal, `x-request-id` generation, and the `server` header.
//!
//! Pure functions over `HeaderMap`s; what to apply is decided by the connection manager.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::listener::ServerHeaderTransformation;
use crate::config::route::{AppendAction, HeaderMutations};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
pub static X_ENVOY_EXPECTED_RQ_TIMEOUT_MS: HeaderName =
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
pub static X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");

/// Applies one level's mutations: removals first, then additions by their append action.
pub fn apply(m: &HeaderMutations, headers: &mut HeaderMap) {
    for name in &m.remove {
        headers.remove(name);
    }
    for a in &m.add {
        match a.action {
            AppendAction::AppendIfExistsOrAdd => {
                headers.append(a.name.clone(), a.value.clone());
            }
            AppendAction::AddIfAbsent => {
                if !headers.contains_key(&a.name) {
                    headers.insert(a.name.clone(), a.value.clone());
                }
            }
            AppendAction::OverwriteIfExistsOrAdd => {
                headers.insert(a.name.clone(), a.value.clone());
            }
            AppendAction::OverwriteIfExists => {
                if headers.contains_key(&a.name) {
                    headers.insert(a.name.clone(), a.value.clone());
                }
            }
        }
    }
}

/// Applies mutations from the most specific level to the least (weighted cluster, route,
/// virtual host, route configuration), so the outer levels have the last word — Envoy's
/// default (`most_specific_header_mutations_wins: false`).
pub fn apply_levels<'a>(
    levels: impl IntoIterator<Item = &'a HeaderMutations>,
    headers: &mut HeaderMap,
) {
    for m in levels {
        if !m.is_empty() {
            apply(m, headers);
        }
    }
}

/// Removes connection-specific headers (and those named by `Connection`) before forwarding.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(connection) = headers.remove(header::CONNECTION) {
        if let Ok(list) = connection.to_str() {
            for name in list.split(',') {
                let name = name.trim();
                if !name.is_empty()
                    && let Ok(n) = HeaderName::from_bytes(name.as_bytes())
                {
                    headers.remove(n);
                }
            }
        }
        // More `Connection` values may follow the first.
        while headers.remove(header::CONNECTION).is_some() {}
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::UPGRADE);
    headers.remove("http2-settings");
    if headers
        .get(header::TE)
        .is_some_and(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// Whether an HTTP/1.1 request asks to upgrade the connection (WebSocket and the like).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    // h2c upgrades are ignored, like Envoy does: the request is served over HTTP/1.1.
    wants
        && headers
            .get(header::UPGRADE)
            .is_some_and(|u| !u.as_bytes().eq_ignore_ascii_case(b"h2c"))
}

/// A random (version 4) UUID, Envoy's `x-request-id` format.
pub fn request_id() -> HeaderValue {
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 36];
    let mut j = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[j] = b'-';
            j += 1;
        }
        out[j] = HEX[usize::from(byte >> 4)];
        out[j + 1] = HEX[usize::from(byte & 0x0f)];
        j += 2;
    }
    HeaderValue::from_bytes(&out)
        .unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-4000-8000-000000000000"))
}

/// The `server` response header per `server_header_transformation`.
pub fn set_server(headers: &mut HeaderMap, name: &HeaderValue, t: ServerHeaderTransformation) {
    match t {
        ServerHeaderTransformation::Overwrite => {
            headers.insert(header::SERVER, name.clone());
        }
        ServerHeaderTransformation::AppendIfAbsent => {
            if !headers.contains_key(header::SERVER) {
                headers.insert(header::SERVER, name.clone());
            }
        }
        ServerHeaderTransformation::PassThrough => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::route::HeaderAddition;

    fn add(name: &'static str, value: &'static str, action: AppendAction) -> HeaderAddition {
        HeaderAddition {
            name: HeaderName::from_static(name),
            value: HeaderValue::from_static(value),
            action,
        }
    }

    #[test]
    fn append_actions_and_level_order_follow_envoy() {
        let route = HeaderMutations {
            remove: vec![HeaderName::from_static("x-secret")],
            add: vec![
                add("x-a", "route", AppendAction::AppendIfExistsOrAdd),
                add("x-b", "route", AppendAction::AddIfAbsent),
                add("x-c", "route", AppendAction::OverwriteIfExists),
            ],
        };
        let global = HeaderMutations {
            remove: vec![],
            add: vec![add("x-a", "global", AppendAction::OverwriteIfExistsOrAdd)],
        };
        let mut h = HeaderMap::new();
        h.insert("x-secret", HeaderValue::from_static("s"));
        h.insert("x-b", HeaderValue::from_static("client"));
        apply_levels([&route, &global], &mut h);
        assert!(h.get("x-secret").is_none());
        assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), vec!["global"]);
        assert_eq!(h["x-b"], "client");
        assert!(h.get("x-c").is_none(), "OVERWRITE_IF_EXISTS does not add");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn upgrades_other_than_h2c_are_detected() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        assert!(!is_upgrade(&h));
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = request_id();
        let s = id.to_str().expect("ascii");
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        assert_ne!(request_id(), id);
    }
}
