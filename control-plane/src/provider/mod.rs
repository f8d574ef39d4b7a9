//! Providers read objects from the outside world and write them into the [`Store`].
//!
//! [`file`] reads a directory of YAML; [`kube`] watches a Kubernetes API server. Both decode
//! through [`parse`], so an object is accepted or rejected the same way. Providers never see
//! xDS.
//!
//! [`Store`]: crate::store::Store

pub mod file;
pub mod kube;
pub mod parse;
