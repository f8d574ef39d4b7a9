//! The control plane's operations endpoint (`--admin-addr`, default `127.0.0.1:18001`):
//! `/healthz` (the process runs), `/readyz` (the first full snapshot is built) and Prometheus
//! `/metrics`. Plain HTTP/1.1; it must never block on the xDS path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the admin endpoint reports on.
pub trait AdminState: Send + Sync + 'static {
    /// Whether the control plane has built its first full snapshot.
    fn ready(&self) -> bool;
    /// Prometheus text exposition of every metric.
    fn metrics(&self) -> String;
}

/// Serves the admin endpoint until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<dyn AdminState>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("admin accept: {e}");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&*state, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond<B>(state: &dyn AdminState, req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if state.ready() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: the first configuration snapshot is not built yet\n".to_string(),
        ),
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", state.metrics()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found (try /healthz, /readyz, /metrics)\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

/// Binds the admin address with an error that names it.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind --admin-addr {addr}: {e}"))
}
