//! Field paths and the error list that translation fills.
//!
//! Translation never stops at the first problem: every unsupported or invalid field is
//! collected with its path in Envoy's JSON spelling (`static_resources.clusters[1].type`), so
//! one run of the proxy — or one xDS NACK — names all of them.

use std::fmt;

/// A path to a field, spelled as in Envoy's proto3 JSON (snake_case, `[i]` for list items,
/// `["key"]` for map entries).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Path(String);

impl Path {
    /// The root of a document (prints as the empty string).
    pub fn root() -> Self {
        Self(String::new())
    }

    /// A path starting at the named field, e.g. the resource kind in an xDS response.
    pub fn new(first: &str) -> Self {
        Self(first.to_string())
    }

    /// The path of a field inside this message.
    pub fn field(&self, name: &str) -> Self {
        if self.0.is_empty() {
            Self(name.to_string())
        } else {
            Self(format!("{}.{name}", self.0))
        }
    }

    /// The path of an item of this list.
    pub fn index(&self, i: usize) -> Self {
        Self(format!("{}[{i}]", self.0))
    }

    /// The path of an entry of this map.
    pub fn key(&self, key: &str) -> Self {
        Self(format!("{}[\"{key}\"]", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One unsupported or invalid field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: Path,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.as_str().is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found while translating one document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Errors {
    errors: Vec<FieldError>,
}

impl Errors {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, path: &Path, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.clone(),
            message: message.into(),
        });
    }

    /// Records a value outside the supported set, listing what is supported.
    pub fn unsupported_value(&mut self, path: &Path, value: impl fmt::Display, supported: &[&str]) {
        self.push(
            path,
            format!(
                "unsupported value {value} (supported: {})",
                supported.join(", ")
            ),
        );
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &FieldError> {
        self.errors.iter()
    }

    pub fn extend(&mut self, other: Errors) {
        self.errors.extend(other.errors);
    }

    /// `Ok(value)` when nothing was recorded, the whole list otherwise.
    pub fn into_result<T>(self, value: T) -> Result<T, ConfigError> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError {
                errors: self.errors,
            })
        }
    }
}

/// A configuration that cannot be applied, with every reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub errors: Vec<FieldError>,
}

impl ConfigError {
    /// A single error not tied to a field (e.g. a parse error from the proto3 JSON mapping).
    pub fn single(message: impl Into<String>) -> Self {
        Self {
            errors: vec![FieldError {
                path: Path::root(),
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_print_in_envoy_json_spelling() {
        let p = Path::root()
            .field("static_resources")
            .field("clusters")
            .index(1)
            .field("typed_extension_protocol_options")
            .key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions");
        assert_eq!(
            p.to_string(),
            "static_resources.clusters[1].typed_extension_protocol_options[\"envoy.extensions.upstreams.http.v3.HttpProtocolOptions\"]"
        );
    }

    #[test]
    fn errors_list_every_problem() {
        let mut e = Errors::new();
        e.push(&Path::new("a"), "bad");
        e.unsupported_value(&Path::new("b"), "X", &["Y", "Z"]);
        let err = e.into_result(()).expect_err("two errors");
        assert_eq!(
            err.to_string(),
            "a: bad\nb: unsupported value X (supported: Y, Z)"
        );
    }
}
