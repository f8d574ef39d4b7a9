//! Filter chain selection, in Envoy's order.
//!
//! Criteria are applied one after the other — destination port, destination IP
//! (`prefix_ranges`), server names, transport protocol, application protocols, direct source
//! IP, source type, source IP, source port — and at each step only the chains with the most
//! specific match stay: an exact port beats "any port", the longest CIDR prefix beats shorter
//! ones and an empty list (which matches everything), `raw_buffer` beats an empty transport
//! protocol, `SAME_IP_OR_LOOPBACK`/`EXTERNAL` beat `ANY`. There is no backtracking: when the
//! most specific chains of one step all fail a later step, no chain matches (and the default
//! chain, if any, takes the connection) — exactly like Envoy's match tree.
//!
//! Server names: the exact name beats `*.` wildcards (the longest suffix first), which beat
//! chains without server names. Application protocols: a chain listing one the client offered
//! beats chains without any. The server name, transport protocol and application protocols come
//! from the TLS inspector ([`super::tls_inspector`]); without it every connection is
//! `raw_buffer` with no server name. This module must not know what a chain does with the
//! connection.

use std::net::{IpAddr, SocketAddr};

use crate::config::listener::{Cidr, FilterChain, RAW_BUFFER, SourceType};

/// The connection facts chains are matched on.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo<'a> {
    /// The address the connection was accepted on.
    pub local: SocketAddr,
    /// The peer (no PROXY protocol: the direct source is the source).
    pub remote: SocketAddr,
    /// The SNI (lower-case) the TLS inspector found.
    pub server_name: Option<&'a str>,
    /// `raw_buffer` or `tls`.
    pub transport_protocol: &'a str,
    /// The ALPN values the client offered.
    pub application_protocols: &'a [String],
}

impl<'a> ConnectionInfo<'a> {
    /// A connection no listener filter inspected.
    pub fn raw(local: SocketAddr, remote: SocketAddr) -> Self {
        Self {
            local,
            remote,
            server_name: None,
            transport_protocol: RAW_BUFFER,
            application_protocols: &[],
        }
    }
}

/// The index of the chain of `chains` that takes a connection, or `None` (the default chain,
/// if any, then takes it).
pub fn select(chains: &[FilterChain], conn: &ConnectionInfo<'_>) -> Option<usize> {
    let mut candidates: Vec<usize> = (0..chains.len()).collect();
    let m = |i: &usize| &chains[*i].matcher;

    // Destination port: the exact port, else chains without one.
    narrow(&mut candidates, |i| match m(i).destination_port {
        Some(p) if p == conn.local.port() => Some(1),
        Some(_) => None,
        None => Some(0),
    });
    narrow(&mut candidates, |i| {
        cidr_score(&m(i).prefix_ranges, conn.local.ip())
    });
    narrow(&mut candidates, |i| {
        server_name_score(&m(i).server_names, conn.server_name)
    });
    narrow(&mut candidates, |i| {
        match m(i).transport_protocol.as_str() {
            "" => Some(0),
            p if p == conn.transport_protocol => Some(1),
            _ => None,
        }
    });
    narrow(&mut candidates, |i| {
        let protocols = &m(i).application_protocols;
        if protocols.is_empty() {
            Some(0)
        } else if conn
            .application_protocols
            .iter()
            .any(|p| protocols.contains(p))
        {
            Some(1)
        } else {
            None
        }
    });
    narrow(&mut candidates, |i| {
        cidr_score(&m(i).direct_source_prefix_ranges, conn.remote.ip())
    });
    // Source type: the specific type when some chain has it, else ANY.
    let local_peer = is_same_ip_or_loopback(conn);
    narrow(&mut candidates, |i| match m(i).source_type {
        SourceType::Any => Some(0),
        SourceType::SameIpOrLoopback if local_peer => Some(1),
        SourceType::External if !local_peer => Some(1),
        _ => None,
    });
    narrow(&mut candidates, |i| {
        cidr_score(&m(i).source_prefix_ranges, conn.remote.ip())
    });
    narrow(&mut candidates, |i| {
        let ports = &m(i).source_ports;
        if ports.is_empty() {
            Some(0)
        } else if ports.contains(&conn.remote.port()) {
            Some(1)
        } else {
            None
        }
    });
    // Distinct matching rules (checked when the listener is configured) leave at most one.
    candidates.first().copied()
}

/// Envoy's server name lookup: the exact name (scored highest), else the `*.` wildcard with
/// the longest matching suffix, else a chain without server names.
fn server_name_score(names: &[String], server_name: Option<&str>) -> Option<u32> {
    if names.is_empty() {
        return Some(0);
    }
    let sni = server_name?;
    names
        .iter()
        .filter_map(|n| match n.strip_prefix('*') {
            // `*.example.com` matches `a.example.com` and `a.b.example.com`.
            Some(suffix) => (sni.len() > suffix.len() && sni.ends_with(suffix))
                .then(|| u32::try_from(suffix.len()).unwrap_or(u32::MAX - 1)),
            None => (n == sni).then_some(u32::MAX),
        })
        .max()
}

/// Keeps the candidates with the highest score; `None` means "does not match".
fn narrow(candidates: &mut Vec<usize>, score: impl Fn(&usize) -> Option<u32>) {
    let best = candidates.iter().filter_map(&score).max();
    match best {
        Some(best) => candidates.retain(|i| score(i) == Some(best)),
        None => candidates.clear(),
    }
}

/// How specifically `ranges` match `ip`: an empty list matches everything, least specifically
/// (like `0.0.0.0/0` and `::/0`); otherwise the longest matching prefix, `None` if none does.
fn cidr_score(ranges: &[Cidr], ip: IpAddr) -> Option<u32> {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges
        .iter()
        .filter(|c| c.contains(ip))
        .map(|c| u32::from(c.len) + 1)
        .max()
}

/// Envoy's `isSameIpOrLoopback`: the peer is a loopback address or the local address.
fn is_same_ip_or_loopback(conn: &ConnectionInfo<'_>) -> bool {
    let remote = conn.remote.ip();
    remote.is_loopback() || remote == conn.local.ip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::listener::{FilterChainMatch, NetworkFilter, TcpProxy, TcpRoute};
    use std::sync::Arc;

    fn chain(name: &str, matcher: FilterChainMatch) -> FilterChain {
        FilterChain {
            name: name.into(),
            matcher,
            filter: NetworkFilter::TcpProxy(Arc::new(TcpProxy {
                stat_prefix: name.into(),
                route: TcpRoute::Cluster(name.into()),
                idle_timeout: None,
                max_connect_attempts: 1,
            })),
            connection_rate_limit: None,
            tls: None,
        }
    }

    fn cidr(s: &str) -> Cidr {
        let (a, l) = s.split_once('/').expect("cidr");
        Cidr::new(a.parse().expect("ip"), l.parse().expect("len")).expect("valid")
    }

    fn pick(chains: &[FilterChain], local: &str, remote: &str) -> Option<String> {
        let conn = ConnectionInfo::raw(
            local.parse().expect("local"),
            remote.parse().expect("remote"),
        );
        select(chains, &conn).map(|i| chains[i].name.clone())
    }

    #[test]
    fn the_most_specific_match_wins_at_each_step() {
        let chains = [
            chain("any", FilterChainMatch::default()),
            chain(
                "port",
                FilterChainMatch {
                    destination_port: Some(80),
                    ..Default::default()
                },
            ),
            chain(
                "wide",
                FilterChainMatch {
                    source_prefix_ranges: vec![cidr("10.0.0.0/8")],
                    ..Default::default()
                },
            ),
            chain(
                "narrow",
                FilterChainMatch {
                    source_prefix_ranges: vec![cidr("10.1.0.0/16"), cidr("192.168.0.0/16")],
                    ..Default::default()
                },
            ),
        ];
        assert_eq!(
            pick(&chains, "10.0.0.1:80", "10.1.2.3:5").as_deref(),
            Some("port")
        );
        assert_eq!(
            pick(&chains, "10.0.0.1:81", "10.1.2.3:5").as_deref(),
            Some("narrow")
        );
        assert_eq!(
            pick(&chains, "10.0.0.1:81", "10.2.2.3:5").as_deref(),
            Some("wide")
        );
        assert_eq!(
            pick(&chains, "10.0.0.1:81", "11.0.0.1:5").as_deref(),
            Some("any")
        );
        assert_eq!(pick(&chains, "[::1]:81", "[::1]:5").as_deref(), Some("any"));
    }

    #[test]
    fn no_backtracking_to_less_specific_chains() {
        // The destination port chain wins step one; its source port then fails, and Envoy
        // does not fall back to the port-less chain.
        let chains = [
            chain("any", FilterChainMatch::default()),
            chain(
                "port",
                FilterChainMatch {
                    destination_port: Some(80),
                    source_ports: vec![1000],
                    ..Default::default()
                },
            ),
        ];
        assert_eq!(
            pick(&chains, "10.0.0.1:80", "10.0.0.2:1000").as_deref(),
            Some("port")
        );
        assert_eq!(pick(&chains, "10.0.0.1:80", "10.0.0.2:1001"), None);
        assert_eq!(
            pick(&chains, "10.0.0.1:81", "10.0.0.2:1001").as_deref(),
            Some("any")
        );
    }

    #[test]
    fn destination_ip_source_type_transport_and_source_port() {
        let chains = [
            chain(
                "dst",
                FilterChainMatch {
                    prefix_ranges: vec![cidr("127.0.0.2/32")],
                    ..Default::default()
                },
            ),
            chain(
                "local",
                FilterChainMatch {
                    source_type: SourceType::SameIpOrLoopback,
                    ..Default::default()
                },
            ),
            chain(
                "external",
                FilterChainMatch {
                    source_type: SourceType::External,
                    source_ports: vec![7],
                    ..Default::default()
                },
            ),
        ];
        assert_eq!(
            pick(&chains, "127.0.0.2:1", "127.0.0.1:7").as_deref(),
            Some("dst")
        );
        assert_eq!(
            pick(&chains, "127.0.0.1:1", "127.0.0.1:7").as_deref(),
            Some("local")
        );
        assert_eq!(
            pick(&chains, "10.0.0.1:1", "10.0.0.1:7").as_deref(),
            Some("local")
        );
        assert_eq!(
            pick(&chains, "10.0.0.1:1", "10.0.0.9:7").as_deref(),
            Some("external")
        );
        assert_eq!(pick(&chains, "10.0.0.1:1", "10.0.0.9:8"), None);
        // No SAME_IP_OR_LOOPBACK chain: local peers get the ANY chains, here none.
        assert_eq!(pick(&chains[2..], "127.0.0.1:1", "127.0.0.1:7"), None);
    }

    #[test]
    fn raw_buffer_is_more_specific_than_an_empty_transport_protocol() {
        let chains = [
            chain("empty", FilterChainMatch::default()),
            chain(
                "raw-external",
                FilterChainMatch {
                    transport_protocol: RAW_BUFFER.into(),
                    source_type: SourceType::External,
                    ..Default::default()
                },
            ),
        ];
        assert_eq!(
            pick(&chains, "10.0.0.1:1", "10.0.0.9:7").as_deref(),
            Some("raw-external")
        );
        // The transport protocol step came first: no fall back to "empty".
        assert_eq!(pick(&chains, "10.0.0.1:1", "127.0.0.1:7"), None);
    }

    fn pick_tls(chains: &[FilterChain], sni: Option<&str>, alpn: &[&str]) -> Option<String> {
        let alpn: Vec<String> = alpn.iter().map(|s| s.to_string()).collect();
        let conn = ConnectionInfo {
            server_name: sni,
            transport_protocol: crate::config::listener::TLS,
            application_protocols: &alpn,
            ..ConnectionInfo::raw(
                "10.0.0.1:443".parse().expect("local"),
                "10.0.0.2:5".parse().expect("remote"),
            )
        };
        select(chains, &conn).map(|i| chains[i].name.clone())
    }

    #[test]
    fn server_names_exact_then_longest_wildcard_then_none() {
        let names = |n: &[&str]| FilterChainMatch {
            server_names: n.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let chains = [
            chain("exact", names(&["a.example.com"])),
            chain("wide", names(&["*.example.com"])),
            chain("narrow", names(&["*.b.example.com"])),
            chain("none", FilterChainMatch::default()),
        ];
        assert_eq!(
            pick_tls(&chains, Some("a.example.com"), &[]).as_deref(),
            Some("exact")
        );
        assert_eq!(
            pick_tls(&chains, Some("c.example.com"), &[]).as_deref(),
            Some("wide")
        );
        assert_eq!(
            pick_tls(&chains, Some("x.y.example.com"), &[]).as_deref(),
            Some("wide")
        );
        assert_eq!(
            pick_tls(&chains, Some("x.b.example.com"), &[]).as_deref(),
            Some("narrow")
        );
        // `*.example.com` does not match the bare domain.
        assert_eq!(
            pick_tls(&chains, Some("example.com"), &[]).as_deref(),
            Some("none")
        );
        assert_eq!(pick_tls(&chains, None, &[]).as_deref(), Some("none"));
        // Server names come before the transport protocol: no backtracking.
        let chains = [
            chain(
                "sni-raw",
                FilterChainMatch {
                    transport_protocol: RAW_BUFFER.into(),
                    ..names(&["a.example.com"])
                },
            ),
            chain(
                "tls",
                FilterChainMatch {
                    transport_protocol: "tls".into(),
                    ..Default::default()
                },
            ),
        ];
        assert_eq!(pick_tls(&chains, Some("a.example.com"), &[]), None);
        assert_eq!(
            pick_tls(&chains, Some("b.example.com"), &[]).as_deref(),
            Some("tls")
        );
    }

    #[test]
    fn application_protocols_match_any_offered_protocol() {
        let alpn = |p: &[&str]| FilterChainMatch {
            application_protocols: p.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let chains = [
            chain("h2", alpn(&["h2"])),
            chain("istio", alpn(&["istio-peer-exchange", "istio"])),
            chain("any", FilterChainMatch::default()),
        ];
        assert_eq!(
            pick_tls(&chains, None, &["h2", "http/1.1"]).as_deref(),
            Some("h2")
        );
        assert_eq!(
            pick_tls(&chains, None, &["istio"]).as_deref(),
            Some("istio")
        );
        assert_eq!(
            pick_tls(&chains, None, &["http/1.1"]).as_deref(),
            Some("any")
        );
        assert_eq!(pick_tls(&chains, None, &[]).as_deref(), Some("any"));
    }

    #[test]
    fn cidr_ranges_are_normalized_and_family_specific() {
        let c = cidr("10.1.2.3/16");
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains("10.1.255.1".parse().expect("ip")));
        assert!(!c.contains("10.2.0.1".parse().expect("ip")));
        assert!(!c.contains("::1".parse().expect("ip")));
        assert!(cidr("0.0.0.0/0").contains("1.2.3.4".parse().expect("ip")));
        assert!(cidr("::/0").contains("::1".parse().expect("ip")));
        assert!(Cidr::new("1.2.3.4".parse().expect("ip"), 33).is_none());
    }
}
