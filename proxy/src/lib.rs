//! Capstan's sidecar proxy: an Envoy-compatible data plane.
//!
//! The proxy reads an Envoy bootstrap and xDS v3 (ADS: CDS, EDS, LDS, RDS), translates the
//! subset it implements into its own configuration model, and never accepts a connection
//! before its configuration is complete — the initialization sequence of `DESIGN.md` is the
//! heart of it.
//!
//! ```text
//!  bootstrap ─► config (translate + reject what we do not implement) ◄─ dynamic ◄─ xds (ADS)
//!                 │                                     (CDS/EDS/LDS/RDS; NACK what config rejects)
//!                 ▼
//!  server ──► init: cluster manager primary ─► secondary (EDS) ─► CDS ─► its primary,
//!                   secondary ─► health-check round ─► LDS ─► listeners warm (RDS)
//!                   ─► LIVE: listeners bind and accept
//!                 │
//!  listener ─► http (connection manager, router) ─► cluster (host, load balancer, pool)
//!           └► tcp (TCP proxy) ──────────────────────┘
//!  admin, stats: observe all of the above
//! ```
//!
//! Configuration snapshots are immutable and swapped atomically (`arc-swap`), so the request
//! path never waits on a lock held across an await, and dynamic (xDS) updates can replace them
//! without stopping traffic.
// `unsafe` is denied everywhere but `memory` (two allocator calls, each with its SAFETY note).
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod bootstrap;
pub mod cluster;
pub mod config;
pub mod dynamic;
pub mod http;
pub mod init;
pub mod listener;
pub mod memory;
pub mod server;
pub mod stats;
pub mod tcp;
pub mod tls;
pub mod xds;

/// The version reported by `/server_info` and the `x-envoy`-style identification.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
