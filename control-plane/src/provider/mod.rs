//! Providers read objects from the outside world and write them into the [`Store`].
//!
//! [`file`] reads a directory of YAML. Providers never see xDS.
//!
//! [`Store`]: crate::store::Store

pub mod file;
pub mod parse;
