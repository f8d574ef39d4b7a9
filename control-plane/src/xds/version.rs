//! Version strings and nonces for xDS responses.
//!
//! Owns the one definition of "version" the server uses: a short hex SHA-256 content hash, so
//! the same resources always get the same version — across streams, nodes and control-plane
//! restarts — and a client that reconnects with the version it already holds is not sent the
//! same resources again. Also owns nonce generation (unique per process).
//!
//! Must not: depend on time, counters or anything but the resource bytes for versions (a
//! version that changes without the content changing would make every proxy re-apply config).

use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::google::protobuf::Any;
use sha2::{Digest, Sha256};

/// Hex characters kept from the SHA-256 digest (64 bits: plenty to tell versions apart).
const VERSION_HEX_LEN: usize = 16;

fn hash_field(hasher: &mut Sha256, bytes: &[u8]) {
    // Length-prefixed so that ("ab", "c") and ("a", "bc") hash differently.
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

fn finish(hasher: Sha256) -> String {
    let digest = hasher.finalize();
    let mut out = String::with_capacity(VERSION_HEX_LEN);
    for byte in digest.iter().take(VERSION_HEX_LEN / 2) {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The version of one resource (delta xDS `Resource.version`): a hash of its packed bytes.
pub fn resource_version(resource: &Any) -> String {
    let mut hasher = Sha256::new();
    hash_field(&mut hasher, resource.type_url.as_bytes());
    hash_field(&mut hasher, &resource.value);
    finish(hasher)
}

/// The version of a set of resources of one type (SotW `version_info`, delta
/// `system_version_info`): a hash over the type URL and every `(name, resource)` pair.
///
/// `resources` must be sorted by name (iterating a `BTreeMap` is); the same set then always
/// yields the same version.
pub fn set_version<'a, I>(type_url: &str, resources: I) -> String
where
    I: IntoIterator<Item = (&'a String, &'a Any)>,
{
    let mut hasher = Sha256::new();
    hash_field(&mut hasher, type_url.as_bytes());
    for (name, resource) in resources {
        hash_field(&mut hasher, name.as_bytes());
        hash_field(&mut hasher, resource.type_url.as_bytes());
        hash_field(&mut hasher, &resource.value);
    }
    finish(hasher)
}

static NONCE_COUNTER: AtomicU64 = AtomicU64::new(1);

/// A nonce no other response of this process carries.
pub(crate) fn next_nonce() -> String {
    format!("{:x}", NONCE_COUNTER.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn any(value: &[u8]) -> Any {
        Any {
            type_url: "t".into(),
            value: value.to_vec(),
        }
    }

    #[test]
    fn set_version_depends_only_on_content() {
        let mut a = BTreeMap::new();
        a.insert("x".to_string(), any(b"1"));
        a.insert("y".to_string(), any(b"2"));
        let b = a.clone();
        assert_eq!(set_version("t", &a), set_version("t", &b));
        assert_eq!(set_version("t", &a).len(), VERSION_HEX_LEN);
        let mut c = a.clone();
        c.insert("y".to_string(), any(b"3"));
        assert_ne!(set_version("t", &a), set_version("t", &c));
        // Name/value boundaries matter.
        let mut d = BTreeMap::new();
        d.insert("xy".to_string(), any(b""));
        let mut e = BTreeMap::new();
        e.insert("x".to_string(), any(b"y"));
        assert_ne!(set_version("t", &d), set_version("t", &e));
        assert_ne!(set_version("t", &a), set_version("u", &a));
    }

    #[test]
    fn nonces_are_unique() {
        assert_ne!(next_nonce(), next_nonce());
    }
}
