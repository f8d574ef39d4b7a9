//! DNS for STRICT_DNS and LOGICAL_DNS clusters: resolve with the system resolver and keep the
//! address family Envoy's `dns_lookup_family` asks for.
//!
//! Only resolution lives here; when to resolve (once for initialization, then every
//! `dns_refresh_rate`) is the cluster's business.

use std::io;
use std::net::SocketAddr;

use crate::config::cluster::DnsLookupFamily;

/// Resolves `host:port` and filters the answer by `family`.
pub async fn resolve(
    host: &str,
    port: u16,
    family: DnsLookupFamily,
) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let selected = select_family(addrs, family);
    if selected.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host}: no address of the requested family"),
        ));
    }
    Ok(selected)
}

/// Envoy's rules: `AUTO` prefers IPv6 and falls back to IPv4, `V4_PREFERRED` the reverse,
/// `ALL` keeps both. Duplicates are removed, order kept.
pub fn select_family(addrs: Vec<SocketAddr>, family: DnsLookupFamily) -> Vec<SocketAddr> {
    let v4: Vec<SocketAddr> = addrs.iter().copied().filter(SocketAddr::is_ipv4).collect();
    let v6: Vec<SocketAddr> = addrs.iter().copied().filter(SocketAddr::is_ipv6).collect();
    let mut out = match family {
        DnsLookupFamily::V4Only => v4,
        DnsLookupFamily::V6Only => v6,
        DnsLookupFamily::Auto => {
            if v6.is_empty() {
                v4
            } else {
                v6
            }
        }
        DnsLookupFamily::V4Preferred => {
            if v4.is_empty() {
                v6
            } else {
                v4
            }
        }
        DnsLookupFamily::All => addrs,
    };
    let mut seen = std::collections::HashSet::new();
    out.retain(|a| seen.insert(*a));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Vec<SocketAddr> {
        ["[::1]:80", "127.0.0.1:80", "10.0.0.1:80", "127.0.0.1:80"]
            .iter()
            .map(|a| a.parse().expect("address"))
            .collect()
    }

    #[test]
    fn lookup_family_follows_envoy() {
        let s = |f| -> Vec<String> {
            select_family(addrs(), f)
                .iter()
                .map(|a| a.to_string())
                .collect()
        };
        assert_eq!(s(DnsLookupFamily::Auto), vec!["[::1]:80"]);
        assert_eq!(
            s(DnsLookupFamily::V4Only),
            vec!["127.0.0.1:80", "10.0.0.1:80"]
        );
        assert_eq!(
            s(DnsLookupFamily::V4Preferred),
            vec!["127.0.0.1:80", "10.0.0.1:80"]
        );
        assert_eq!(s(DnsLookupFamily::V6Only), vec!["[::1]:80"]);
        assert_eq!(
            s(DnsLookupFamily::All),
            vec!["[::1]:80", "127.0.0.1:80", "10.0.0.1:80"]
        );
        let v4: Vec<SocketAddr> = vec!["10.0.0.1:80".parse().expect("address")];
        assert_eq!(select_family(v4.clone(), DnsLookupFamily::Auto), v4);
    }

    #[tokio::test]
    async fn resolves_localhost() {
        let a = resolve("localhost", 8080, DnsLookupFamily::V4Only)
            .await
            .expect("localhost resolves");
        assert!(a.iter().all(|a| a.is_ipv4() && a.port() == 8080), "{a:?}");
    }
}
