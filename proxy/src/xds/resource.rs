//! Resource names and the checks every xDS response passes before a handler sees it.
//!
//! Owns: reading a resource's name without decoding the resource (every xDS resource type
//! keeps its name in field 1 — `Cluster.name`, `ClusterLoadAssignment.cluster_name`,
//! `Listener.name`, `RouteConfiguration.name`, `Secret.name`, …), unwrapping
//! `envoy.service.discovery.v3.Resource` wrappers in state-of-the-world responses, and the
//! protocol-level checks that make a response NACK-worthy whatever its contents (a resource
//! whose type URL is not the response's, a resource without a name, a name twice, a name both
//! updated and removed). Every problem is reported, each naming the resource.
//!
//! Must not: decode or judge resource contents (the handler does), or panic on malformed
//! bytes from the network.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::service::discovery::v3::{Resource, ResourceName};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::SubscriptionNames;

/// The type URL of the `Resource` wrapper a SotW response may carry instead of bare resources.
pub(crate) const RESOURCE_WRAPPER_TYPE: &str =
    "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// The name of a packed xDS resource: the last `string` in field 1 (protobuf: the last value
/// of a singular field wins). `None` if there is none or the bytes are not valid protobuf.
pub(crate) fn resource_name(any: &Any) -> Option<String> {
    let mut bytes = any.value.as_slice();
    let mut name = None;
    while !bytes.is_empty() {
        let key = read_varint(&mut bytes)?;
        let field = key >> 3;
        match key & 7 {
            0 => {
                read_varint(&mut bytes)?;
            }
            1 => bytes = bytes.get(8..)?,
            2 => {
                let len = usize::try_from(read_varint(&mut bytes)?).ok()?;
                let value = bytes.get(..len)?;
                if field == 1 {
                    name = Some(std::str::from_utf8(value).ok()?.to_string());
                }
                bytes = bytes.get(len..)?;
            }
            5 => bytes = bytes.get(4..)?,
            // Groups (3, 4) are not used by any xDS resource; anything else is malformed.
            _ => return None,
        }
    }
    name.filter(|n| !n.is_empty())
}

fn read_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Why a response is NACKed before any handler sees it.
#[derive(Debug)]
pub(crate) struct Invalid {
    /// Every problem, each naming the resource.
    pub(crate) message: String,
    /// The names that could be read (so waiters on them learn of the rejection).
    pub(crate) names: BTreeSet<String>,
}

/// Checks a SotW response's resources and names them. Resources of a named subscription that
/// were not asked for (a response crossing a subscription change) are dropped, as Envoy does.
///
pub(crate) fn sotw_resources(
    type_url: &str,
    resources: Vec<Any>,
    subscription: &SubscriptionNames,
) -> Result<Vec<(String, Any)>, Invalid> {
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(resources.len());
    for (i, any) in resources.into_iter().enumerate() {
        let (name, any) = if any.type_url == RESOURCE_WRAPPER_TYPE {
            match Resource::decode(any.value.as_slice()) {
                Ok(Resource {
                    name,
                    resource: Some(inner),
                    ..
                }) => {
                    let name = if name.is_empty() {
                        resource_name(&inner)
                    } else {
                        Some(name)
                    };
                    (name, inner)
                }
                Ok(Resource { name, .. }) => {
                    errors.push(format!(
                        "resources[{i}] ({name:?}): Resource wrapper without a resource"
                    ));
                    continue;
                }
                Err(e) => {
                    errors.push(format!("resources[{i}]: undecodable Resource wrapper: {e}"));
                    continue;
                }
            }
        } else {
            (resource_name(&any), any)
        };
        if any.type_url != type_url {
            errors.push(format!(
                "resources[{i}]: type_url {:?} does not match the response's type_url {type_url:?}",
                any.type_url
            ));
            continue;
        }
        let Some(name) = name else {
            errors.push(format!("resources[{i}]: resource has no name"));
            continue;
        };
        if !seen.insert(name.clone()) {
            errors.push(format!("resources[{i}]: duplicate resource name {name:?}"));
            continue;
        }
        if !subscription.contains(&name) {
            tracing::debug!(type_url, name, "ignoring a resource that is not subscribed");
            continue;
        }
        out.push((name, any));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(Invalid {
            message: errors.join("; "),
            names: seen,
        })
    }
}

/// A checked delta response.
#[derive(Debug, Default)]
pub(crate) struct DeltaUpdate {
    /// `(name, version, resource)` in response order.
    pub(crate) updated: Vec<(String, String, Any)>,
    pub(crate) removed: Vec<String>,
}

/// Checks a delta response's resources and removals. Resources without a body (TTL
/// heartbeats) change nothing and are skipped.
pub(crate) fn delta_update(
    type_url: &str,
    resources: Vec<Resource>,
    removed_resources: Vec<String>,
    removed_resource_names: Vec<ResourceName>,
) -> Result<DeltaUpdate, Invalid> {
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    let mut update = DeltaUpdate::default();
    for (i, resource) in resources.into_iter().enumerate() {
        let Some(any) = resource.resource else {
            tracing::debug!(type_url, name = resource.name, "resource heartbeat");
            continue;
        };
        let name = if resource.name.is_empty() {
            resource
                .resource_name
                .map(|n| n.name)
                .filter(|n| !n.is_empty())
                .or_else(|| resource_name(&any))
        } else {
            Some(resource.name)
        };
        let Some(name) = name else {
            errors.push(format!("resources[{i}]: resource has no name"));
            continue;
        };
        if any.type_url != type_url {
            errors.push(format!(
                "resources[{i}] ({name:?}): type_url {:?} does not match the response's \
                 type_url {type_url:?}",
                any.type_url
            ));
            seen.insert(name);
            continue;
        }
        if !seen.insert(name.clone()) {
            errors.push(format!("resources[{i}]: duplicate resource name {name:?}"));
            continue;
        }
        update.updated.push((name, resource.version, any));
    }
    let mut removed_seen = BTreeSet::new();
    let removed = removed_resources
        .into_iter()
        .chain(removed_resource_names.into_iter().map(|n| n.name));
    for name in removed {
        if seen.contains(&name) {
            errors.push(format!(
                "removed_resources: {name:?} is also in resources (updated and removed at once)"
            ));
        } else if removed_seen.insert(name.clone()) {
            update.removed.push(name);
        }
    }
    if errors.is_empty() {
        Ok(update)
    } else {
        seen.extend(removed_seen);
        Err(Invalid {
            message: errors.join("; "),
            names: seen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, LocalityLbEndpoints,
    };
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::util::pack_any;

    use crate::xds::{CLUSTER_TYPE, ENDPOINT_TYPE};

    #[test]
    fn names_come_from_field_one_of_every_resource_type() {
        let cluster = pack_any(Cluster {
            alt_stat_name: "not-the-name".into(),
            name: "web".into(),
            connect_timeout: Some(Default::default()),
            ..Default::default()
        });
        assert_eq!(resource_name(&cluster).as_deref(), Some("web"));
        let cla = pack_any(ClusterLoadAssignment {
            cluster_name: "web".into(),
            endpoints: vec![LocalityLbEndpoints {
                priority: 3,
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(resource_name(&cla).as_deref(), Some("web"));
        let listener = pack_any(Listener {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "0.0.0.0".into(),
                    ..Default::default()
                })),
            }),
            name: "inbound".into(),
            ..Default::default()
        });
        assert_eq!(resource_name(&listener).as_deref(), Some("inbound"));
        let route = pack_any(RouteConfiguration {
            name: "routes".into(),
            ..Default::default()
        });
        assert_eq!(resource_name(&route).as_deref(), Some("routes"));
    }

    #[test]
    fn malformed_bytes_have_no_name() {
        for bytes in [
            vec![0x0a, 0x05, b'a'],
            vec![0x0a],
            vec![0xff; 11],
            vec![0x0b],
        ] {
            let any = Any {
                type_url: CLUSTER_TYPE.into(),
                value: bytes,
            };
            assert_eq!(resource_name(&any), None);
        }
        let unnamed = pack_any(Cluster::default());
        assert_eq!(resource_name(&unnamed), None);
    }

    fn cluster(name: &str) -> Any {
        pack_any(Cluster {
            name: name.into(),
            ..Default::default()
        })
    }

    #[test]
    fn sotw_reports_every_problem() {
        let wrong_type = pack_any(ClusterLoadAssignment {
            cluster_name: "x".into(),
            ..Default::default()
        });
        let err = sotw_resources(
            CLUSTER_TYPE,
            vec![
                cluster("a"),
                cluster("a"),
                wrong_type,
                pack_any(Cluster::default()),
            ],
            &SubscriptionNames::Wildcard,
        )
        .expect_err("invalid");
        assert!(
            err.message
                .contains("resources[1]: duplicate resource name \"a\""),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("resources[2]: type_url"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("resources[3]: resource has no name"),
            "{}",
            err.message
        );
        assert!(err.names.contains("a"));
    }

    #[test]
    fn sotw_unwraps_resources_and_drops_unsubscribed_names() {
        let wrapped = pack_any(Resource {
            name: "b".into(),
            version: "1".into(),
            resource: Some(cluster("b")),
            ..Default::default()
        });
        let got = sotw_resources(
            CLUSTER_TYPE,
            vec![cluster("a"), wrapped, cluster("c")],
            &SubscriptionNames::names(["b", "c"]),
        )
        .expect("valid");
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(got[0].1.type_url, CLUSTER_TYPE);
    }

    #[test]
    fn delta_rejects_a_name_updated_and_removed_at_once() {
        let resources = vec![Resource {
            name: "a".into(),
            version: "1".into(),
            resource: Some(cluster("a")),
            ..Default::default()
        }];
        let err =
            delta_update(CLUSTER_TYPE, resources, vec!["a".into()], vec![]).expect_err("invalid");
        assert!(
            err.message.contains("\"a\" is also in resources"),
            "{}",
            err.message
        );
    }

    #[test]
    fn delta_skips_heartbeats_and_merges_removed_names() {
        let resources = vec![
            Resource {
                name: "a".into(),
                version: "1".into(),
                ..Default::default()
            },
            Resource {
                name: "b".into(),
                version: "2".into(),
                resource: Some(cluster("b")),
                ..Default::default()
            },
        ];
        let update = delta_update(
            CLUSTER_TYPE,
            resources,
            vec!["c".into()],
            vec![
                ResourceName {
                    name: "d".into(),
                    ..Default::default()
                },
                ResourceName {
                    name: "c".into(),
                    ..Default::default()
                },
            ],
        )
        .expect("valid");
        assert_eq!(update.updated.len(), 1);
        assert_eq!(update.updated[0].0, "b");
        assert_eq!(update.updated[0].1, "2");
        assert_eq!(update.removed, ["c", "d"]);
        let err = delta_update(
            ENDPOINT_TYPE,
            vec![Resource {
                name: "b".into(),
                resource: Some(cluster("b")),
                ..Default::default()
            }],
            vec![],
            vec![],
        )
        .expect_err("wrong type");
        assert!(err.message.contains("does not match"), "{}", err.message);
    }
}
