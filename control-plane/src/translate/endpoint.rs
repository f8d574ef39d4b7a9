//! EDS: one `ClusterLoadAssignment` per Service port, from the Service's EndpointSlices.
//!
//! Only ready endpoints are sent (`conditions.ready` unset counts as ready; `terminating`
//! ones never), grouped into one locality per zone. A Service without endpoints still gets an
//! empty assignment: an EDS cluster only finishes initializing once it has received one.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::Locality;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::service::{PortInfo, ServiceInfo};
use super::util::{port_u16, socket_address};
use crate::store::StoreSnapshot;

/// Ready addresses of one Service port, by zone (`None`: the slice named no zone).
pub(crate) type Selected = BTreeMap<Option<String>, BTreeSet<(String, u16)>>;

/// The assignment for one Service port's cluster.
pub(crate) fn assignment(
    snapshot: &StoreSnapshot,
    svc: &ServiceInfo,
    port: &PortInfo,
) -> ClusterLoadAssignment {
    let selected = select_endpoints(snapshot.slices_for(&svc.key), port);
    ClusterLoadAssignment {
        cluster_name: port.cluster.clone(),
        endpoints: selected
            .into_iter()
            .map(|(zone, addresses)| LocalityLbEndpoints {
                locality: zone.map(|zone| Locality {
                    zone,
                    ..Default::default()
                }),
                lb_endpoints: addresses
                    .iter()
                    .map(|(ip, port)| LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                            address: Some(socket_address(ip, *port)),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Picks the ready addresses of `port` from `slices` (given in name order). The slice port is
/// the one whose name equals the Service port's name; a slice that lists no ports uses the
/// Service's numeric `targetPort` (or the port itself when none is set). An address found in
/// two slices (as happens while slices are rebalanced) counts once, in the first slice's zone.
pub(crate) fn select_endpoints<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    port: &PortInfo,
) -> Selected {
    let mut selected = Selected::new();
    let mut seen = BTreeSet::new();
    for slice in slices {
        // Envoy's EDS needs IP addresses; FQDN slices (ExternalName-like) cannot be served.
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let Some(target) = slice_port(slice, port) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            for address in &endpoint.addresses {
                if address.parse::<std::net::IpAddr>().is_err()
                    || !seen.insert((address.clone(), target))
                {
                    continue;
                }
                selected
                    .entry(endpoint.zone.clone().filter(|z| !z.is_empty()))
                    .or_default()
                    .insert((address.clone(), target));
            }
        }
    }
    selected
}

fn slice_port(slice: &EndpointSlice, port: &PortInfo) -> Option<u16> {
    match slice.ports.as_deref() {
        Some(ports) if !ports.is_empty() => ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == port.name)
            .and_then(|p| p.port)
            .and_then(port_u16),
        _ => match &port.target_port {
            None => Some(port.port),
            Some(IntOrString::Int(p)) => port_u16(*p),
            Some(IntOrString::String(_)) => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{
        Endpoint as SliceEndpoint, EndpointConditions, EndpointPort,
    };

    fn port(name: &str, target: Option<IntOrString>) -> PortInfo {
        PortInfo {
            service: crate::store::ObjectKey::new("ns", "svc"),
            port: 80,
            name: name.into(),
            target_port: target,
            http2: false,
            cluster: "c".into(),
        }
    }

    fn ep(
        ip: &str,
        zone: Option<&str>,
        ready: Option<bool>,
        terminating: Option<bool>,
    ) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![ip.into()],
            zone: zone.map(Into::into),
            conditions: Some(EndpointConditions {
                ready,
                serving: None,
                terminating,
            }),
            ..Default::default()
        }
    }

    fn slice(ports: Option<Vec<(&str, i32)>>, endpoints: Vec<SliceEndpoint>) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints,
            ports: ports.map(|ps| {
                ps.into_iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.to_string()).filter(|n| !n.is_empty()),
                        port: Some(p),
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn keeps_ready_non_terminating_endpoints_by_zone() {
        let s = slice(
            Some(vec![("http", 8080), ("admin", 9000)]),
            vec![
                ep("10.0.0.1", Some("a"), Some(true), None),
                ep("10.0.0.2", Some("b"), None, None),
                ep("10.0.0.3", Some("a"), Some(false), None),
                ep("10.0.0.4", Some("a"), Some(true), Some(true)),
                ep("10.0.0.5", None, Some(true), Some(false)),
            ],
        );
        let got = select_endpoints([&s].into_iter(), &port("http", None));
        let want: Selected = [
            (None, [("10.0.0.5".to_string(), 8080)].into()),
            (
                Some("a".to_string()),
                [("10.0.0.1".to_string(), 8080)].into(),
            ),
            (
                Some("b".to_string()),
                [("10.0.0.2".to_string(), 8080)].into(),
            ),
        ]
        .into();
        assert_eq!(got, want);
    }

    #[test]
    fn slice_port_is_chosen_by_service_port_name() {
        let s = slice(
            Some(vec![("admin", 9000)]),
            vec![ep("10.0.0.1", None, None, None)],
        );
        assert!(select_endpoints([&s].into_iter(), &port("http", None)).is_empty());
        let unnamed = slice(
            Some(vec![("", 8080)]),
            vec![ep("10.0.0.1", None, None, None)],
        );
        let got = select_endpoints([&unnamed].into_iter(), &port("", None));
        assert_eq!(got[&None], [("10.0.0.1".to_string(), 8080)].into());
    }

    #[test]
    fn slices_without_ports_use_numeric_target_port() {
        let s = slice(None, vec![ep("10.0.0.1", None, None, None)]);
        let got = select_endpoints([&s].into_iter(), &port("", Some(IntOrString::Int(3000))));
        assert_eq!(got[&None], [("10.0.0.1".to_string(), 3000)].into());
        assert!(
            select_endpoints(
                [&s].into_iter(),
                &port("", Some(IntOrString::String("http".into())))
            )
            .is_empty()
        );
    }

    #[test]
    fn duplicate_addresses_across_slices_count_once() {
        let a = slice(
            Some(vec![("", 80)]),
            vec![ep("10.0.0.1", Some("a"), None, None)],
        );
        let b = slice(
            Some(vec![("", 80)]),
            vec![ep("10.0.0.1", Some("b"), None, None)],
        );
        let got = select_endpoints([&a, &b].into_iter(), &port("", None));
        assert_eq!(got.len(), 1);
        assert!(got.contains_key(&Some("a".to_string())));
    }
}
