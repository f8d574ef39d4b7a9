//! Harness for Capstan's end-to-end tests: real processes on real sockets.
//!
//! Starts the control plane binary, stock Envoy (the interop peer) and in-process HTTP test
//! backends, and gives tests a tiny HTTP/1.1 client. Nothing here is mocked but the one thing
//! that cannot run on these machines: the Kubernetes API server ([`fake_kube`], real HTTP
//! list/watch for kube-rs's real client).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod backend;
pub mod client;
pub mod fake_kube;
pub mod fixtures;
pub mod pki;
pub mod process;

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
