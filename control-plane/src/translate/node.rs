//! Who is asking: the parts of an xDS `Node` that decide what a proxy receives.
//!
//! A Capstan sidecar identifies itself as `Node{id: "<pod>.<namespace>", cluster: <workload>,
//! metadata: {NAMESPACE, APP_PORTS, LABELS, …}}`. Stock Envoys configured by hand may send less;
//! every field is optional and malformed values are ignored rather than rejected, because a
//! proxy that sent odd metadata should still get the outbound configuration.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use serde::{Deserialize, Serialize};

/// The proxy a translation is for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeInfo {
    /// `Node.id`, `<pod>.<namespace>` for Capstan sidecars.
    pub id: String,
    /// `Node.cluster`: the workload (Deployment, …) the pod belongs to.
    pub workload: String,
    /// The pod's namespace: decides which Services the short names (`web`, `web:8080`) mean.
    pub namespace: Option<String>,
    /// The application's ports; the inbound listener exists only when there are some. The
    /// first one also receives connections whose original port matches none.
    pub app_ports: Vec<u16>,
}

impl NodeInfo {
    /// Reads a node's identity and metadata (`NAMESPACE`: string; `APP_PORTS`: comma-separated
    /// string or list of numbers; `LABELS`: struct, not needed by translation). The namespace
    /// falls back to the part of the id after its first `.`.
    pub fn from_node(node: &Node) -> NodeInfo {
        let fields = node.metadata.as_ref().map(|m: &Struct| &m.fields);
        let field = |name: &str| {
            fields
                .and_then(|f| f.get(name))
                .and_then(|v: &Value| v.kind.as_ref())
        };
        let namespace = match field("NAMESPACE") {
            Some(Kind::StringValue(ns)) if !ns.trim().is_empty() => Some(ns.trim().to_string()),
            _ => node
                .id
                .split_once('.')
                .map(|(_, ns)| ns.to_string())
                .filter(|ns| !ns.is_empty()),
        };
        let mut app_ports = Vec::new();
        match field("APP_PORTS") {
            Some(Kind::StringValue(text)) => {
                app_ports.extend(text.split(',').filter_map(port_from_text))
            }
            Some(Kind::NumberValue(n)) => app_ports.extend(port_from_number(*n)),
            Some(Kind::ListValue(list)) => {
                for v in &list.values {
                    match &v.kind {
                        Some(Kind::NumberValue(n)) => app_ports.extend(port_from_number(*n)),
                        Some(Kind::StringValue(s)) => app_ports.extend(port_from_text(s)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        let mut seen = std::collections::BTreeSet::new();
        app_ports.retain(|p| seen.insert(*p));
        NodeInfo {
            id: node.id.clone(),
            workload: node.cluster.clone(),
            namespace,
            app_ports,
        }
    }
}

fn port_from_text(text: &str) -> Option<u16> {
    text.trim().parse::<u16>().ok().filter(|p| *p != 0)
}

fn port_from_number(n: f64) -> Option<u16> {
    if n.fract() == 0.0 && (1.0..=65535.0).contains(&n) {
        // Checked above: integral and in range.
        Some(n as u16)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::ListValue;

    fn node(id: &str, fields: Vec<(&str, Kind)>) -> Node {
        Node {
            id: id.into(),
            cluster: "reviews".into(),
            metadata: Some(Struct {
                fields: fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), Value { kind: Some(v) }))
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn reads_namespace_and_comma_separated_ports() {
        let n = NodeInfo::from_node(&node(
            "reviews-7d9.other",
            vec![
                ("NAMESPACE", Kind::StringValue("shop".into())),
                (
                    "APP_PORTS",
                    Kind::StringValue("9080, 9090,bogus,0,9080".into()),
                ),
            ],
        ));
        assert_eq!(n.namespace.as_deref(), Some("shop"));
        assert_eq!(n.app_ports, vec![9080, 9090]);
        assert_eq!(n.workload, "reviews");
    }

    #[test]
    fn reads_port_lists_and_falls_back_to_namespace_from_id() {
        let list = Kind::ListValue(ListValue {
            values: vec![
                Value {
                    kind: Some(Kind::NumberValue(8080.0)),
                },
                Value {
                    kind: Some(Kind::StringValue("8443".into())),
                },
                Value {
                    kind: Some(Kind::NumberValue(70000.0)),
                },
            ],
        });
        let n = NodeInfo::from_node(&node("web-1.shop.extra", vec![("APP_PORTS", list)]));
        assert_eq!(n.namespace.as_deref(), Some("shop.extra"));
        assert_eq!(n.app_ports, vec![8080, 8443]);
    }

    #[test]
    fn bare_node_has_no_namespace_and_no_ports() {
        let n = NodeInfo::from_node(&Node {
            id: "envoy".into(),
            ..Default::default()
        });
        assert_eq!(n.namespace, None);
        assert!(n.app_ports.is_empty());
    }
}
