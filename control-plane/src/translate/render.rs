//! Renders a [`Translation`] as one YAML document in Envoy's proto3 JSON mapping (field names
//! as in Envoy's docs and `config_dump`), for golden files and `capstan translate`-style
//! debugging.
//!
//! Sections, in order: `clusters`, `endpoints`, `listeners`, `routes`, `secrets` (only when
//! there are any; private keys redacted), `statuses`. Map keys are
//! ordered explicitly (`@type` and `name` first, then alphabetical) rather than by whatever
//! order `serde_json` was built with, so the text is the same in every build.

use std::cmp::Ordering;

use prost::{Message, Name};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Value, json};

use super::Translation;

/// Renders `t` as deterministic YAML.
pub fn render_yaml(t: &Translation) -> String {
    let statuses: Vec<Value> = t
        .statuses
        .iter()
        .map(|((kind, key), status)| {
            let status =
                serde_json::to_value(status).unwrap_or_else(|e| json!({ "error": e.to_string() }));
            json!({
                "kind": kind.as_str(),
                "namespace": key.namespace,
                "name": key.name,
                "status": status,
            })
        })
        .collect();
    let mut doc = Map::new();
    doc.insert("clusters".into(), resources(&t.clusters));
    doc.insert("endpoints".into(), resources(&t.endpoints));
    doc.insert("listeners".into(), resources(&t.listeners));
    doc.insert("routes".into(), resources(&t.routes));
    if !t.secrets.is_empty() {
        // Private keys never leave the process in text form.
        let shown: Vec<_> = t.secrets.iter().map(super::secret::redacted).collect();
        doc.insert("secrets".into(), resources(&shown));
    }
    doc.insert("statuses".into(), Value::Array(statuses));
    let doc = Value::Object(doc);
    serde_saphyr::to_string(&Ordered(&doc)).unwrap_or_else(|e| format!("# rendering failed: {e}\n"))
}

fn resources<M: Message + Name>(list: &[M]) -> Value {
    Value::Array(
        list.iter()
            .map(|m| {
                capstan_proto::to_json(m).unwrap_or_else(|e| json!({ "error": e.to_string() }))
            })
            .collect(),
    )
}

/// Field order: these first (in this order), then alphabetical. The sections (`clusters`,
/// `endpoints`, `listeners`, `routes`, `statuses`) happen to be in alphabetical order.
const FIRST: [&str; 7] = [
    "@type",
    "kind",
    "namespace",
    "name",
    "type",
    "status",
    "reason",
];

fn key_order(a: &str, b: &str) -> Ordering {
    let rank = |k: &str| FIRST.iter().position(|f| *f == k).unwrap_or(FIRST.len());
    rank(a).cmp(&rank(b)).then_with(|| a.cmp(b))
}

/// A JSON value serialized with maps in [`key_order`].
struct Ordered<'a>(&'a Value);

impl Serialize for Ordered<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort_by(|a, b| key_order(a, b));
                let mut out = serializer.serialize_map(Some(keys.len()))?;
                for k in keys {
                    out.serialize_entry(k, &Ordered(&map[k.as_str()]))?;
                }
                out.end()
            }
            Value::Array(items) => {
                let mut out = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    out.serialize_element(&Ordered(item))?;
                }
                out.end()
            }
            other => other.serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_ordered_name_first_then_alphabetically() {
        let v = json!({"type": "EDS", "connect_timeout": "5s", "name": "c", "a": {"z": 1, "b": 2}});
        let yaml = serde_saphyr::to_string(&Ordered(&v)).expect("renders");
        let keys: Vec<&str> = yaml
            .lines()
            .filter_map(|l| l.trim().split(':').next())
            .collect();
        assert_eq!(
            keys,
            vec!["name", "type", "a", "b", "z", "connect_timeout"],
            "{yaml}"
        );
    }
}
