//! Envoy's proto3 JSON/YAML mapping for envoy-types messages.
//!
//! Owns the descriptor pool compiled at build time from the `.proto` files that `envoy-types`
//! ships, and the conversions between envoy-types messages and the JSON/YAML that Envoy users
//! read and write (`--config-dump`, bootstrap files, golden files). `Any` fields are resolved
//! through the same pool, so a `typed_config` round-trips.
//!
//! Must not know about Capstan's CRDs or about either binary's configuration model.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::sync::Mutex;

pub mod schema;

use prost::{Message, Name};
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, ReflectMessage, SerializeOptions,
};

pub use envoy_types;

static DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptor_set.bin"));

/// Errors converting between envoy-types messages and their JSON/YAML form.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown message type {0} (not in the compiled Envoy descriptor set)")]
    UnknownType(String),
    #[error("invalid {type_name}: {reason}")]
    Invalid { type_name: String, reason: String },
    #[error("YAML: {0}")]
    Yaml(String),
}

/// The descriptor pool of every Envoy message Capstan renders or parses.
///
/// Decoded on first use and then kept, until [`release_pool`]: a long-running process that
/// needs it only now and then (the proxy: its bootstrap at start-up, `/config_dump` on demand)
/// gives its ≈10 MB back that way. The returned handle is a cheap clone that keeps the pool
/// alive while it is held.
pub fn pool() -> DescriptorPool {
    let mut cached = POOL.lock().unwrap_or_else(|e| e.into_inner());
    cached
        .get_or_insert_with(|| {
            DescriptorPool::decode(DESCRIPTOR_SET)
                .expect("descriptor set compiled by build.rs is valid")
        })
        .clone()
}

/// Drops the cached pool; it is freed once no handle, descriptor or dynamic message from it is
/// left, and decoded again by the next [`pool`] call. Returns whether a pool was cached.
pub fn release_pool() -> bool {
    POOL.lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .is_some()
}

static POOL: Mutex<Option<DescriptorPool>> = Mutex::new(None);

fn descriptor(full_name: &str) -> Result<prost_reflect::MessageDescriptor, Error> {
    pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| Error::UnknownType(full_name.to_string()))
}

/// Re-reads `msg` as a dynamic message of the same type.
pub fn to_dynamic<M: Message + Name>(msg: &M) -> Result<DynamicMessage, Error> {
    let desc = descriptor(&M::full_name())?;
    DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()).map_err(|e| Error::Invalid {
        type_name: M::full_name(),
        reason: e.to_string(),
    })
}

/// Decodes a serialized message of the named type (`type.googleapis.com/...` or bare name).
pub fn decode_dynamic(type_name: &str, bytes: &[u8]) -> Result<DynamicMessage, Error> {
    let name = type_name.rsplit('/').next().unwrap_or(type_name);
    let desc = descriptor(name)?;
    DynamicMessage::decode(desc, bytes).map_err(|e| Error::Invalid {
        type_name: name.to_string(),
        reason: e.to_string(),
    })
}

fn serialize_options() -> SerializeOptions {
    // Envoy's config dump uses the proto field names (snake_case) and omits defaults.
    SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true)
}

/// Renders a dynamic message as a `serde_json::Value` in Envoy's proto3 JSON mapping.
pub fn dynamic_to_json(msg: &DynamicMessage) -> Result<serde_json::Value, Error> {
    msg.serialize_with_options(serde_json::value::Serializer, &serialize_options())
        .map_err(|e| Error::Invalid {
            type_name: msg.descriptor().full_name().to_string(),
            reason: e.to_string(),
        })
}

/// Renders an envoy-types message as proto3 JSON (snake_case field names, defaults omitted).
pub fn to_json<M: Message + Name>(msg: &M) -> Result<serde_json::Value, Error> {
    dynamic_to_json(&to_dynamic(msg)?)
}

/// Renders a serialized `Any` payload as JSON with its `@type`.
pub fn any_to_json(type_url: &str, value: &[u8]) -> Result<serde_json::Value, Error> {
    let msg = decode_dynamic(type_url, value)?;
    let mut json = dynamic_to_json(&msg)?;
    if let serde_json::Value::Object(map) = &mut json {
        let mut with_type = serde_json::Map::new();
        with_type.insert(
            "@type".into(),
            serde_json::Value::String(type_url.to_string()),
        );
        with_type.extend(std::mem::take(map));
        *map = with_type;
    }
    Ok(json)
}

/// Parses proto3 JSON (as a `serde_json::Value`) into an envoy-types message. Unknown fields
/// are errors: a field we do not know could change behaviour.
pub fn from_json_value<M: Message + Name + Default>(value: &serde_json::Value) -> Result<M, Error> {
    let desc = descriptor(&M::full_name())?;
    let dynamic = DynamicMessage::deserialize_with_options(
        desc,
        value,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| Error::Invalid {
        type_name: M::full_name(),
        reason: e.to_string(),
    })?;
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| Error::Invalid {
        type_name: M::full_name(),
        reason: e.to_string(),
    })
}

/// Parses YAML or JSON text (JSON is YAML) into an envoy-types message.
pub fn from_yaml<M: Message + Name + Default>(text: &str) -> Result<M, Error> {
    let value: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| Error::Yaml(e.to_string()))?;
    from_json_value(&value)
}

/// Renders a JSON value as YAML text.
pub fn json_to_yaml(value: &serde_json::Value) -> Result<String, Error> {
    serde_saphyr::to_string(value).map_err(|e| Error::Yaml(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;

    #[test]
    fn bootstrap_with_typed_config_parses_and_round_trips() {
        let yaml = r#"
node: { id: a.b, cluster: c }
static_resources:
  listeners:
  - name: l
    address: { socket_address: { address: 127.0.0.1, port_value: 15001 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: out
          rds: { route_config_name: r, config_source: { ads: {}, resource_api_version: V3 } }
  clusters:
  - name: c1
    connect_timeout: 0.25s
    type: STRICT_DNS
"#;
        let b: Bootstrap = from_yaml(yaml).expect("parses");
        let l: &Listener = &b.static_resources.as_ref().expect("static").listeners[0];
        let any = l.filter_chains[0].filters[0]
            .config_type
            .as_ref()
            .map(|c| match c {
                envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
                    a,
                ) => a.clone(),
                _ => panic!("typed config expected"),
            })
            .expect("config");
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("hcm");
        assert_eq!(hcm.stat_prefix, "out");
        let c: &Cluster = &b.static_resources.as_ref().expect("static").clusters[0];
        assert_eq!(
            c.connect_timeout.as_ref().map(|d| d.nanos),
            Some(250_000_000)
        );
        let json = to_json(&b).expect("renders");
        assert_eq!(
            json["static_resources"]["clusters"][0]["connect_timeout"],
            "0.250s"
        );
        assert_eq!(
            json["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
                ["stat_prefix"],
            "out"
        );
    }

    #[test]
    fn unknown_field_is_an_error_naming_it() {
        let err = from_yaml::<Cluster>("name: x\nbogus_field: 1\n").expect_err("must fail");
        assert!(err.to_string().contains("bogus_field"), "{err}");
    }
}
