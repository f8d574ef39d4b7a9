//! Capstan's control plane: watches `ServiceRoute`/`ServicePolicy` CRDs, Services and
//! EndpointSlices (from Kubernetes or a directory of YAML), translates them into Envoy xDS v3
//! resources and serves them over gRPC.
//!
//! Data flows one way:
//!
//! ```text
//! provider ──► store ──► translate ──► xds (snapshot cache ──► ADS / CDS / EDS / LDS / RDS)
//! (file, k8s)  (watch)   (pure fn)
//! ```
//!
//! `translate` never sees kube or tonic; `xds` never sees CRD types; `provider` never sees xDS.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod api;
pub mod inject;
pub mod leader;
pub mod provider;
pub mod runtime;
pub mod status_writer;
pub mod store;
pub mod translate;
pub mod xds;
