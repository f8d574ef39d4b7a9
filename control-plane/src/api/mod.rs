//! Capstan's CRDs, `capstan.dev/v1alpha1`: [`ServiceRoute`] and [`ServicePolicy`].
//!
//! Gateway-API-shaped (GAMMA: routes attach to a `Service`), with kinds of their own. The
//! schema carries what the API server can check (enums, bounds, required fields, CEL rules for
//! cross-field constraints); [`validate`] repeats every rule in Rust so the file provider, which
//! has no API server, rejects the same objects with errors that name the field.
//!
//! Must not know about xDS or about where objects come from.

pub mod crd;
mod duration;
mod policy;
mod route;
pub mod validate;

pub use duration::{Duration, parse_duration};
pub use policy::*;
pub use route::*;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Capstan CRD.
pub const GROUP: &str = "capstan.dev";
/// The served (and stored) version.
pub const VERSION: &str = "v1alpha1";

/// A status condition, shaped as `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted` or `ResolvedRefs`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase reason such as `BackendNotFound`.
    pub reason: String,
    /// What is wrong, in words, naming the field.
    #[serde(default)]
    pub message: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// The `status` of a Capstan object.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    /// The generation the controller last processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` and `ResolvedRefs`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Which connected proxies run a configuration that contains this version of the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxies: Option<ProxiesStatus>,
}

/// How the connected proxies took this version of the object (beyond Gateway API: the
/// conditions say what the control plane made of it, this says whether the data plane has it).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxiesStatus {
    /// Proxies connected to the control plane that wrote this status.
    pub connected: u32,
    /// Of those, how many have ACKed a configuration that contains this version.
    pub acked: u32,
    /// Proxies that rejected (NACKed) a configuration containing this version, and why (at
    /// most ten listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nacked: Vec<ProxyNack>,
}

/// One proxy's rejection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyNack {
    /// The proxy's xDS node id (`<pod>.<namespace>`).
    pub node: String,
    /// The xDS type it rejected (`type.googleapis.com/envoy.config.route.v3.RouteConfiguration`).
    pub type_url: String,
    /// The proxy's error, naming the field.
    pub message: String,
}
