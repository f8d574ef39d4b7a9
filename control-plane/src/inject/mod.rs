//! The sidecar injector: a mutating admission webhook that adds `capstan-proxy` to selected pods
//! as a native sidecar.
//!
//! * [`config`] — what the injector adds, from `/etc/capstan/injector.yaml` (the Helm chart's
//!   ConfigMap), with per-pod annotation overrides.
//! * [`review`] — `AdmissionReview` in, `AdmissionReview` out: decides whether a pod is
//!   injected and builds the JSON patch (pure; no I/O).
//! * [`server`] — the HTTPS endpoint (`/inject` on `:8443`) and the serving certificate the
//!   control plane creates, stores in a Secret, rotates, and publishes as the webhook's
//!   `caBundle`.

pub mod config;
pub mod review;
pub mod server;
