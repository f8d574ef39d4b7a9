//! The Service model translation works on: each Service's usable ports, their cluster names,
//! whether they speak HTTP/2, and the host names (`domains`) clients use to reach them.
//!
//! Naming follows Istio so operators recognise it: cluster `outbound|<port>||<fqdn>`, virtual
//! host `<fqdn>:<port>`. Pure functions over the store snapshot; no Envoy types here.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::util::port_u16;
use crate::store::{ObjectKey, StoreSnapshot};

/// The cluster domain every Service name is qualified with.
pub(crate) const CLUSTER_DOMAIN: &str = "cluster.local";

/// One TCP port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PortInfo {
    /// The Service this port belongs to.
    pub service: ObjectKey,
    pub port: u16,
    /// `spec.ports[].name`; empty when unnamed (single-port Services).
    pub name: String,
    pub target_port: Option<IntOrString>,
    /// `appProtocol` or the port name says HTTP/2 (`http2`, `grpc`, `h2c`).
    pub http2: bool,
    /// `outbound|<port>||<fqdn>`.
    pub cluster: String,
}

/// A Service with the ports translation uses.
#[derive(Clone, Debug)]
pub(crate) struct ServiceInfo {
    pub key: ObjectKey,
    /// Sorted by port, unique.
    pub ports: Vec<PortInfo>,
    /// Cluster IPs, when the Service has any (`None` for headless Services).
    pub cluster_ips: Vec<String>,
}

impl ServiceInfo {
    pub(crate) fn port(&self, port: u16) -> Option<&PortInfo> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// The port whose virtual host also carries the names without a port (`web`, not only
    /// `web:8080`): 80 when the Service has it, otherwise its lowest port.
    pub(crate) fn default_port(&self) -> Option<u16> {
        if self.port(80).is_some() {
            Some(80)
        } else {
            self.ports.iter().map(|p| p.port).min()
        }
    }

    pub(crate) fn fqdn(&self) -> String {
        fqdn(&self.key)
    }
}

/// `<name>.<namespace>.svc.cluster.local`.
pub(crate) fn fqdn(key: &ObjectKey) -> String {
    format!("{}.{}.svc.{CLUSTER_DOMAIN}", key.name, key.namespace)
}

/// `outbound|<port>||<name>.<namespace>.svc.cluster.local`.
pub(crate) fn cluster_name(key: &ObjectKey, port: u16) -> String {
    format!("outbound|{port}||{}", fqdn(key))
}

/// The virtual host of one Service port: `<fqdn>:<port>`.
pub(crate) fn vhost_name(key: &ObjectKey, port: u16) -> String {
    format!("{}:{port}", fqdn(key))
}

/// Whether a port speaks HTTP/2 to its backends. `appProtocol` decides when set; otherwise the
/// port name, Istio-style (`grpc`, `grpc-web-api`, `http2`, `h2c`).
pub(crate) fn is_http2(app_protocol: Option<&str>, port_name: &str) -> bool {
    const H2: [&str; 3] = ["http2", "grpc", "h2c"];
    match app_protocol {
        Some(app) => {
            let app = app.to_ascii_lowercase();
            H2.contains(&app.as_str()) || app == "kubernetes.io/h2c"
        }
        None => {
            let name = port_name.to_ascii_lowercase();
            H2.iter()
                .any(|p| name == *p || name.starts_with(&format!("{p}-")))
        }
    }
}

/// Every Service of the snapshot, with its TCP ports.
#[derive(Clone, Debug, Default)]
pub(crate) struct Services {
    pub by_key: BTreeMap<ObjectKey, ServiceInfo>,
}

impl Services {
    pub(crate) fn index(snapshot: &StoreSnapshot) -> Services {
        let by_key = snapshot
            .services
            .iter()
            .map(|(key, svc)| (key.clone(), service_info(key, svc)))
            .collect();
        Services { by_key }
    }

    pub(crate) fn get(&self, key: &ObjectKey) -> Option<&ServiceInfo> {
        self.by_key.get(key)
    }
}

fn service_info(key: &ObjectKey, svc: &Service) -> ServiceInfo {
    let spec = svc.spec.as_ref();
    let mut seen = BTreeSet::new();
    let mut ports: Vec<PortInfo> = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        // Only TCP ports carry HTTP; UDP and SCTP ports get nothing.
        .filter(|p| {
            p.protocol
                .as_deref()
                .is_none_or(|proto| proto.eq_ignore_ascii_case("TCP"))
        })
        .filter_map(|p| {
            let port = port_u16(p.port)?;
            let name = p.name.clone().unwrap_or_default();
            Some(PortInfo {
                service: key.clone(),
                port,
                http2: is_http2(p.app_protocol.as_deref(), &name),
                name,
                target_port: p.target_port.clone(),
                cluster: cluster_name(key, port),
            })
        })
        .filter(|p| seen.insert(p.port))
        .collect();
    ports.sort_by_key(|p| p.port);
    let mut cluster_ips = Vec::new();
    let candidates = spec
        .and_then(|s| s.cluster_ips.clone())
        .unwrap_or_default()
        .into_iter()
        .chain(spec.and_then(|s| s.cluster_ip.clone()));
    for ip in candidates {
        if !ip.is_empty() && ip != "None" && !cluster_ips.contains(&ip) {
            cluster_ips.push(ip);
        }
    }
    ServiceInfo {
        key: key.clone(),
        ports,
        cluster_ips,
    }
}

/// The names a client may use for a Service port, in the order they are listed: the short name
/// (only when `short` — it means this Service only in the client's namespace), `<svc>.<ns>`,
/// `<svc>.<ns>.svc`, the FQDN and each cluster IP, each followed by its `:<port>` form; the
/// bare forms only when `bare` (one port per Service carries them).
pub(crate) fn service_domains(
    svc: &ServiceInfo,
    port: u16,
    short: bool,
    bare: bool,
) -> Vec<String> {
    let key = &svc.key;
    let mut names = Vec::new();
    if short {
        names.push(key.name.clone());
    }
    names.push(format!("{}.{}", key.name, key.namespace));
    names.push(format!("{}.{}.svc", key.name, key.namespace));
    names.push(fqdn(key));
    for ip in &svc.cluster_ips {
        // An IPv6 literal is bracketed in a Host header.
        names.push(if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.clone()
        });
    }
    let mut domains = Vec::new();
    for name in names {
        if bare {
            domains.push(name.clone());
        }
        domains.push(format!("{name}:{port}"));
    }
    domains
}

/// Whether a client in `node_namespace` reaches `svc` by its short name: always in its own
/// namespace; elsewhere only when no Service of that name exists in the client's namespace and
/// exactly one exists in the whole snapshot (so a proxy whose namespace is unknown still gets
/// unambiguous short names).
pub(crate) fn owns_short_name(
    services: &Services,
    svc: &ObjectKey,
    node_namespace: Option<&str>,
) -> bool {
    if node_namespace == Some(svc.namespace.as_str()) {
        return true;
    }
    if let Some(ns) = node_namespace
        && services
            .by_key
            .contains_key(&ObjectKey::new(ns, svc.name.clone()))
    {
        return false;
    }
    services
        .by_key
        .keys()
        .filter(|k| k.name == svc.name)
        .count()
        == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ns: &str, name: &str, ports: &[u16], ips: &[&str]) -> ServiceInfo {
        let key = ObjectKey::new(ns, name);
        ServiceInfo {
            ports: ports
                .iter()
                .map(|p| PortInfo {
                    service: key.clone(),
                    port: *p,
                    name: String::new(),
                    target_port: None,
                    http2: false,
                    cluster: cluster_name(&key, *p),
                })
                .collect(),
            key,
            cluster_ips: ips.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn domains_cover_every_dns_form_with_and_without_port() {
        let svc = info("shop", "web", &[80, 8080], &["10.0.0.7"]);
        assert_eq!(
            service_domains(&svc, 80, true, true),
            vec![
                "web",
                "web:80",
                "web.shop",
                "web.shop:80",
                "web.shop.svc",
                "web.shop.svc:80",
                "web.shop.svc.cluster.local",
                "web.shop.svc.cluster.local:80",
                "10.0.0.7",
                "10.0.0.7:80",
            ]
        );
        assert_eq!(
            service_domains(&svc, 8080, false, false),
            vec![
                "web.shop:8080",
                "web.shop.svc:8080",
                "web.shop.svc.cluster.local:8080",
                "10.0.0.7:8080"
            ]
        );
    }

    #[test]
    fn ipv6_cluster_ips_are_bracketed() {
        let svc = info("shop", "web", &[80], &["fd00::7"]);
        let d = service_domains(&svc, 80, false, true);
        assert!(
            d.contains(&"[fd00::7]".to_string()) && d.contains(&"[fd00::7]:80".to_string()),
            "{d:?}"
        );
    }

    #[test]
    fn default_port_is_80_else_lowest() {
        assert_eq!(info("a", "b", &[443, 80], &[]).default_port(), Some(80));
        assert_eq!(
            info("a", "b", &[9090, 8080], &[]).default_port(),
            Some(8080)
        );
        assert_eq!(info("a", "b", &[], &[]).default_port(), None);
    }

    #[test]
    fn short_names_belong_to_the_clients_namespace_or_an_unambiguous_service() {
        let mut services = Services::default();
        for (ns, name) in [("shop", "web"), ("blog", "web"), ("blog", "db")] {
            let s = info(ns, name, &[80], &[]);
            services.by_key.insert(s.key.clone(), s);
        }
        let web_shop = ObjectKey::new("shop", "web");
        let web_blog = ObjectKey::new("blog", "web");
        let db = ObjectKey::new("blog", "db");
        assert!(owns_short_name(&services, &web_shop, Some("shop")));
        assert!(!owns_short_name(&services, &web_blog, Some("shop")));
        assert!(
            !owns_short_name(&services, &web_shop, None),
            "ambiguous without a namespace"
        );
        assert!(owns_short_name(&services, &db, Some("shop")), "unique name");
        assert!(owns_short_name(&services, &db, None));
    }

    #[test]
    fn http2_from_app_protocol_or_port_name() {
        assert!(is_http2(Some("kubernetes.io/h2c"), "web"));
        assert!(is_http2(Some("gRPC"), ""));
        assert!(
            !is_http2(Some("http"), "grpc"),
            "appProtocol wins over the name"
        );
        assert!(is_http2(None, "grpc-api"));
        assert!(is_http2(None, "http2"));
        assert!(!is_http2(None, "grpcx"));
        assert!(!is_http2(None, "http"));
    }
}
