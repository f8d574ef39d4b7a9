//! Which fields a serialized Envoy message sets, without a descriptor pool.
//!
//! `build.rs` turns the compiled descriptor set into a static table ([`MessageSchema`] per
//! message: field numbers, names, whether they repeat, what they hold). [`set_fields`] reads a
//! message's protobuf wire format against that table and lists the fields present, with the
//! raw payload of each occurrence, so a caller can recurse into sub-messages, map values and
//! `Any` payloads.
//!
//! Why not `prost-reflect`: a decoded [`prost_reflect::DescriptorPool`] of the Envoy API costs
//! about 10 MB of heap for the life of the process, which is more than the rest of the proxy at
//! rest. The table lives in the binary's read-only data and costs only the pages a check
//! touches. The pool is still what the proto3 JSON mapping needs (bootstrap files, config
//! dumps); see [`crate::release_pool`].
//!
//! Presence follows proto3 and prost: a field is set when it is on the wire, i.e. a non-default
//! scalar, a present message, a set `optional` or oneof member, or a non-empty list or map.

/// One message type: its full name and its fields, sorted by number.
#[derive(Debug)]
pub struct MessageSchema {
    pub name: &'static str,
    pub fields: &'static [FieldSchema],
}

#[derive(Debug)]
pub struct FieldSchema {
    pub number: u32,
    pub name: &'static str,
    pub repeated: bool,
    pub kind: FieldKind,
}

/// What a field holds, as far as walking sub-messages needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Numbers, strings, bytes, enums.
    Scalar,
    /// A message of the named type.
    Message(&'static str),
    /// A map; its entries' values are messages of the named type, or scalars (`None`).
    Map(Option<&'static str>),
}

include!(concat!(env!("OUT_DIR"), "/envoy_schema.rs"));

/// The schema of a message type by full name (`envoy.config.cluster.v3.Cluster`).
pub fn message(full_name: &str) -> Option<&'static MessageSchema> {
    MESSAGES
        .binary_search_by(|m| m.name.cmp(full_name))
        .ok()
        .map(|i| &MESSAGES[i])
}

impl MessageSchema {
    pub fn field(&self, number: u32) -> Option<&'static FieldSchema> {
        self.fields
            .binary_search_by_key(&number, |f| f.number)
            .ok()
            .map(|i| &self.fields[i])
    }
}

/// A field present in a serialized message.
#[derive(Debug)]
pub struct SetField<'a> {
    /// The field number as found on the wire.
    pub number: u32,
    /// Its schema; `None` for a number the schema does not know.
    pub schema: Option<&'static FieldSchema>,
    /// The payload of every occurrence, in wire order, for length-delimited values (messages,
    /// map entries, strings, packed lists); empty for varint and fixed-width values.
    pub payloads: Vec<&'a [u8]>,
}

/// The wire format could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed protobuf {0}")]
pub struct WireError(&'static str);

/// The fields `bytes` (a serialized `schema` message) sets, sorted by field number.
pub fn set_fields<'a>(
    schema: &MessageSchema,
    mut bytes: &'a [u8],
) -> Result<Vec<SetField<'a>>, WireError> {
    let mut fields: Vec<SetField<'a>> = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let number = u32::try_from(key >> 3).map_err(|_| WireError("field number"))?;
        if number == 0 {
            return Err(WireError("field number 0"));
        }
        let payload = match key & 7 {
            0 => {
                varint(&mut bytes)?;
                None
            }
            1 => {
                take(&mut bytes, 8)?;
                None
            }
            2 => {
                let len = varint(&mut bytes)?;
                let len = usize::try_from(len).map_err(|_| WireError("length"))?;
                Some(take(&mut bytes, len)?)
            }
            5 => {
                take(&mut bytes, 4)?;
                None
            }
            _ => {
                return Err(WireError(
                    "wire type (groups are not used by the Envoy API)",
                ));
            }
        };
        let i = match fields.iter().position(|f| f.number == number) {
            Some(i) => i,
            None => {
                fields.push(SetField {
                    number,
                    schema: schema.field(number),
                    payloads: Vec::new(),
                });
                fields.len() - 1
            }
        };
        fields[i].payloads.extend(payload);
    }
    fields.sort_by_key(|f| f.number);
    Ok(fields)
}

/// The key (as text) and the value payload of a serialized map entry. Keys are strings in
/// every Envoy map; other key types are rendered as their number.
pub fn map_entry(mut bytes: &[u8]) -> Result<(String, &[u8]), WireError> {
    let mut key = String::new();
    let mut value: &[u8] = &[];
    while !bytes.is_empty() {
        let tag = varint(&mut bytes)?;
        match (tag >> 3, tag & 7) {
            (1, 2) => key = utf8(length_delimited(&mut bytes)?)?,
            (1, 0) => key = varint(&mut bytes)?.to_string(),
            (2, 2) => value = length_delimited(&mut bytes)?,
            (_, 0) => {
                varint(&mut bytes)?;
            }
            (_, 1) => {
                take(&mut bytes, 8)?;
            }
            (_, 2) => {
                length_delimited(&mut bytes)?;
            }
            (_, 5) => {
                take(&mut bytes, 4)?;
            }
            _ => return Err(WireError("map entry")),
        }
    }
    Ok((key, value))
}

/// The `type_url` and `value` of a serialized `google.protobuf.Any`.
pub fn any(mut bytes: &[u8]) -> Result<(String, &[u8]), WireError> {
    // Same layout as a map entry with a string key: type_url = 1, value = 2.
    let mut type_url = String::new();
    let mut value: &[u8] = &[];
    while !bytes.is_empty() {
        let tag = varint(&mut bytes)?;
        match (tag >> 3, tag & 7) {
            (1, 2) => type_url = utf8(length_delimited(&mut bytes)?)?,
            (2, 2) => value = length_delimited(&mut bytes)?,
            _ => return Err(WireError("Any")),
        }
    }
    Ok((type_url, value))
}

fn utf8(bytes: &[u8]) -> Result<String, WireError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| WireError("string (not UTF-8)"))
}

fn length_delimited<'a>(bytes: &mut &'a [u8]) -> Result<&'a [u8], WireError> {
    let len = varint(bytes)?;
    take(
        bytes,
        usize::try_from(len).map_err(|_| WireError("length"))?,
    )
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], WireError> {
    if bytes.len() < n {
        return Err(WireError("message (truncated)"));
    }
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    Ok(head)
}

fn varint(bytes: &mut &[u8]) -> Result<u64, WireError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first().ok_or(WireError("varint (truncated)"))?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError("varint (too long)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::google::protobuf::{Any, Duration, Struct};
    use prost::{Message, Name};

    #[test]
    fn table_covers_the_compiled_messages_sorted() {
        assert!(MESSAGES.windows(2).all(|w| w[0].name < w[1].name));
        let cluster = message("envoy.config.cluster.v3.Cluster").expect("Cluster");
        assert!(cluster.fields.windows(2).all(|w| w[0].number < w[1].number));
        let name = cluster
            .fields
            .iter()
            .find(|f| f.name == "name")
            .expect("name");
        assert_eq!((name.number, name.kind), (1, FieldKind::Scalar));
        let hc = cluster.fields.iter().find(|f| f.name == "health_checks");
        assert!(matches!(
            hc,
            Some(FieldSchema {
                repeated: true,
                kind: FieldKind::Message("envoy.config.core.v3.HealthCheck"),
                ..
            })
        ));
        let md = message("envoy.config.core.v3.Metadata").expect("Metadata");
        assert_eq!(
            md.fields[0].kind,
            FieldKind::Map(Some("google.protobuf.Struct"))
        );
        assert!(message("no.such.Message").is_none());
    }

    #[test]
    fn lists_set_fields_with_payloads_like_reflection_would() {
        let mut metadata = Metadata::default();
        metadata
            .filter_metadata
            .insert("b".into(), Struct::default());
        metadata
            .filter_metadata
            .insert("a".into(), Struct::default());
        let cluster = Cluster {
            name: "c".into(),
            connect_timeout: Some(Duration {
                seconds: 1,
                nanos: 0,
            }),
            metadata: Some(metadata),
            // Defaults are not on the wire, hence not set.
            per_connection_buffer_limit_bytes: None,
            ..Default::default()
        };
        let bytes = cluster.encode_to_vec();
        let schema = message(&Cluster::full_name()).expect("schema");
        let fields = set_fields(schema, &bytes).expect("reads");
        let names: Vec<_> = fields.iter().map(|f| f.schema.map(|s| s.name)).collect();
        assert_eq!(
            names,
            vec![Some("name"), Some("connect_timeout"), Some("metadata")]
        );
        let metadata = &fields[2].payloads[0];
        let md_fields = set_fields(
            message("envoy.config.core.v3.Metadata").expect("Metadata"),
            metadata,
        )
        .expect("reads");
        assert_eq!(md_fields[0].payloads.len(), 2);
        let keys: Vec<String> = md_fields[0]
            .payloads
            .iter()
            .map(|e| map_entry(e).expect("entry").0)
            .collect();
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&"a".to_string()) && keys.contains(&"b".to_string()));
    }

    #[test]
    fn any_and_garbage() {
        let inner = Duration {
            seconds: 5,
            nanos: 0,
        };
        let a = Any {
            type_url: Duration::type_url(),
            value: inner.encode_to_vec(),
        };
        let bytes = a.encode_to_vec();
        let (url, value) = any(&bytes).expect("any");
        assert_eq!(url, "type.googleapis.com/google.protobuf.Duration");
        assert_eq!(Duration::decode(value).expect("decodes"), inner);
        let schema = message(&Cluster::full_name()).expect("schema");
        assert!(
            set_fields(schema, &[0x0a, 0x05, b'a']).is_err(),
            "truncated"
        );
        assert!(set_fields(schema, &[0x80]).is_err(), "truncated varint");
        assert!(set_fields(schema, &[0x00]).is_err(), "field 0");
        let unknown = set_fields(schema, &[0xf8, 0xff, 0x7f, 0x01]).expect("reads");
        assert_eq!(unknown[0].number, 262143);
        assert!(unknown[0].schema.is_none());
    }
}
