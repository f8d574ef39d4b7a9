//! Route hash policies (`RouteAction.hash_policy`): the request hash ring hash and Maglev
//! clusters pick a host by, computed as Envoy's `HashPolicyImpl::generateHash` does.
//!
//! Each policy hashes one request property with xxHash64; several combine as
//! `hash = rotl(hash, 1) ^ new`, and a `terminal` policy that produced a hash ends the list.
//! A cookie policy with a `ttl` whose cookie is absent generates the cookie (from the
//! connection's addresses) and hashes that; the router adds its `Set-Cookie` to the upstream
//! response. This module reads the request; it must not change it nor choose hosts.

use std::net::SocketAddr;

use http::request::Parts;
use http::{HeaderMap, HeaderValue};

use crate::cluster::hash::xx_hash64;
use crate::config::route::{HashPolicy, HashSource};

/// What the hash policies produced.
#[derive(Debug, Default)]
pub struct Hashed {
    /// `None` when no policy produced a hash (the balancer then picks at random, as Envoy
    /// does).
    pub hash: Option<u64>,
    /// `Set-Cookie` values of generated cookies.
    pub cookies: Vec<HeaderValue>,
}

impl Hashed {
    /// Adds the generated cookies to an upstream response.
    pub fn set_cookies(&self, headers: &mut HeaderMap) {
        for c in &self.cookies {
            headers.append(http::header::SET_COOKIE, c.clone());
        }
    }
}

/// Runs the policies over a request on a connection with these (remote, local) addresses.
pub fn compute(
    policies: &[HashPolicy],
    parts: &Parts,
    authority: &str,
    addresses: (SocketAddr, SocketAddr),
) -> Hashed {
    let mut out = Hashed::default();
    for p in policies {
        if let Some(new) = evaluate(&p.source, parts, authority, addresses, &mut out.cookies) {
            let old = out.hash.map(|h| h.rotate_left(1)).unwrap_or(0);
            out.hash = Some(old ^ new);
        }
        if p.terminal && out.hash.is_some() {
            break;
        }
    }
    out
}

fn evaluate(
    source: &HashSource,
    parts: &Parts,
    authority: &str,
    (remote, local): (SocketAddr, SocketAddr),
    cookies: &mut Vec<HeaderValue>,
) -> Option<u64> {
    match source {
        HashSource::Header(name) => header_hash(name, parts, authority),
        HashSource::Cookie {
            name,
            ttl,
            path,
            attributes,
        } => match (cookie_value(&parts.headers, name), ttl) {
            (Some(v), _) => Some(xx_hash64(v.as_bytes(), 0)),
            (None, Some(ttl)) => {
                // Envoy's value: the hex xxHash64 of the connection's addresses, so streams
                // of one connection get the same cookie.
                let value = format!(
                    "{:016x}",
                    xx_hash64(format!("{remote}{local}").as_bytes(), 0)
                );
                let header = set_cookie(name, &value, path, ttl.as_secs(), attributes);
                if let Ok(v) = HeaderValue::from_str(&header) {
                    cookies.push(v);
                }
                Some(xx_hash64(value.as_bytes(), 0))
            }
            (None, None) => None,
        },
        // Envoy hashes the address without the port.
        HashSource::SourceIp => Some(xx_hash64(remote.ip().to_string().as_bytes(), 0)),
        HashSource::QueryParameter(name) => {
            query_value(parts.uri.query()?, name).map(|v| xx_hash64(&v, 0))
        }
    }
}

/// Every value of the header, sorted (so their order does not matter) and hashed as one
/// concatenation, as Envoy does. Pseudo-headers read the request line.
fn header_hash(name: &str, parts: &Parts, authority: &str) -> Option<u64> {
    let mut values: Vec<&[u8]> = match name {
        // Envoy keeps `Host` as `:authority`; either name reads it.
        ":authority" | "host" => vec![authority.as_bytes()],
        ":method" => vec![parts.method.as_str().as_bytes()],
        ":path" => vec![
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .as_bytes(),
        ],
        ":scheme" => vec![parts.uri.scheme_str().unwrap_or("http").as_bytes()],
        _ => parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.as_bytes())
            .collect(),
    };
    if values.is_empty() {
        return None;
    }
    values.sort();
    Some(xx_hash64(&values.concat(), 0))
}

/// Envoy's `makeSetCookieValue`: `name="value"; Max-Age=…; Path=…; attributes; HttpOnly`.
fn set_cookie(
    name: &str,
    value: &str,
    path: &str,
    max_age: u64,
    attributes: &[(String, String)],
) -> String {
    let mut s = format!("{name}=\"{value}\"");
    if max_age != 0 {
        s.push_str(&format!("; Max-Age={max_age}"));
    }
    if !path.is_empty() {
        s.push_str(&format!("; Path={path}"));
    }
    for (n, v) in attributes {
        if v.is_empty() {
            s.push_str(&format!("; {n}"));
        } else {
            s.push_str(&format!("; {n}={v}"));
        }
    }
    s.push_str("; HttpOnly");
    s
}

/// The first value of cookie `name` in the `Cookie` headers, without surrounding quotes;
/// `None` when absent or empty (Envoy hashes nothing then).
pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    for h in headers.get_all(http::header::COOKIE) {
        let Ok(s) = h.to_str() else { continue };
        for pair in s.split(';') {
            let pair = pair.trim_start_matches(' ');
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            if k == name {
                let v = if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
                    &v[1..v.len() - 1]
                } else {
                    v
                };
                return (!v.is_empty()).then(|| v.to_string());
            }
        }
    }
    None
}

/// The first value of query parameter `name`, as written: Envoy's hash policy parses the
/// query string without percent-decoding keys or values.
fn query_value(query: &str, name: &str) -> Option<Vec<u8>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.as_bytes().to_vec())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn policy(source: HashSource, terminal: bool) -> HashPolicy {
        HashPolicy { source, terminal }
    }

    fn addrs() -> (SocketAddr, SocketAddr) {
        (
            "10.1.2.3:40000".parse().expect("addr"),
            "10.0.0.1:8080".parse().expect("addr"),
        )
    }

    fn cookie(name: &str, ttl: Option<u64>) -> HashSource {
        HashSource::Cookie {
            name: name.into(),
            ttl: ttl.map(std::time::Duration::from_secs),
            path: "/app".into(),
            attributes: vec![
                ("SameSite".into(), "Lax".into()),
                ("Secure".into(), String::new()),
            ],
        }
    }

    fn hash(policies: &[HashPolicy], p: &Parts, authority: &str) -> Option<u64> {
        compute(policies, p, authority, addrs()).hash
    }

    fn header(name: &str) -> HashSource {
        HashSource::Header(name.into())
    }

    #[test]
    fn header_values_hash_sorted_and_concatenated() {
        let p = parts("/", &[("x-user", "bob"), ("x-user", "alice")]);
        let h = hash(&[policy(header("x-user"), false)], &p, "a");
        assert_eq!(h, Some(xx_hash64(b"alicebob", 0)));
        let p = parts("/", &[("x-user", "bob")]);
        let h = hash(&[policy(header("x-user"), false)], &p, "a");
        assert_eq!(h, Some(xx_hash64(b"bob", 0)));
        let h = hash(&[policy(header("x-none"), false)], &p, "a");
        assert_eq!(h, None, "absent header: no hash");
        let h = hash(&[policy(header(":authority"), false)], &p, "web");
        assert_eq!(h, Some(xx_hash64(b"web", 0)));
        let p = parts("/", &[("host", "web:80")]);
        let h = hash(&[policy(header("host"), false)], &p, "web");
        assert_eq!(
            h,
            Some(xx_hash64(b"web", 0)),
            "host is :authority, as routed"
        );
    }

    #[test]
    fn policies_combine_by_rotate_and_xor_and_terminal_stops() {
        let p = parts("/?a=1", &[("x-a", "1"), ("cookie", "s=\"abc\"; t=2")]);
        let a = xx_hash64(b"1", 0);
        let s = xx_hash64(b"abc", 0);
        let both = [
            policy(header("x-a"), false),
            policy(cookie("s", None), false),
        ];
        assert_eq!(hash(&both, &p, "h"), Some(a.rotate_left(1) ^ s));
        let terminal = [
            policy(header("x-a"), true),
            policy(cookie("s", None), false),
        ];
        assert_eq!(hash(&terminal, &p, "h"), Some(a));
        let fallback = [
            policy(header("x-missing"), true),
            policy(cookie("s", None), false),
        ];
        assert_eq!(
            hash(&fallback, &p, "h"),
            Some(s),
            "a terminal policy without a hash falls through"
        );
    }

    #[test]
    fn source_ip_and_query_parameters() {
        let p = parts("/x?b=2&a=h%20i&a=second&c%20d=3", &[]);
        assert_eq!(
            hash(&[policy(HashSource::SourceIp, false)], &p, "h"),
            Some(xx_hash64(b"10.1.2.3", 0))
        );
        assert_eq!(
            hash(
                &[policy(HashSource::QueryParameter("a".into()), false)],
                &p,
                "h"
            ),
            Some(xx_hash64(b"h%20i", 0)),
            "the first value, not decoded"
        );
        assert_eq!(
            hash(
                &[policy(HashSource::QueryParameter("c d".into()), false)],
                &p,
                "h"
            ),
            None
        );
    }

    #[test]
    fn a_missing_cookie_with_a_ttl_is_generated() {
        let p = parts("/", &[]);
        assert_eq!(hash(&[policy(cookie("s", None), false)], &p, "h"), None);
        let out = compute(&[policy(cookie("s", Some(60)), false)], &p, "h", addrs());
        let value = format!("{:016x}", xx_hash64(b"10.1.2.3:4000010.0.0.1:8080", 0));
        assert_eq!(out.hash, Some(xx_hash64(value.as_bytes(), 0)));
        assert_eq!(
            out.cookies,
            vec![format!(
                "s=\"{value}\"; Max-Age=60; Path=/app; SameSite=Lax; Secure; HttpOnly"
            )]
        );
        // The client sends it back: the same hash, no new cookie.
        let back = parts("/", &[("cookie", &format!("s=\"{value}\""))]);
        let again = compute(&[policy(cookie("s", Some(60)), false)], &back, "h", addrs());
        assert_eq!(again.hash, out.hash);
        assert!(again.cookies.is_empty());
        let mut headers = HeaderMap::new();
        out.set_cookies(&mut headers);
        assert_eq!(headers.get_all(http::header::SET_COOKIE).iter().count(), 1);
    }

    #[test]
    fn cookies_are_found_among_several() {
        let p = parts("/", &[("cookie", "a=1"), ("cookie", "b=; sess=xyz")]);
        assert_eq!(cookie_value(&p.headers, "sess").as_deref(), Some("xyz"));
        assert_eq!(cookie_value(&p.headers, "b"), None, "empty value");
        assert_eq!(cookie_value(&p.headers, "c"), None);
    }
}
