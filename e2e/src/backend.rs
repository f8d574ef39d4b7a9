//! A test backend: answers every request with JSON describing what it received and who it
//! is, so a test can tell which backend a request reached and what headers arrived.
//!
//! `GET /status/<code>` answers with that status.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Serves forever on `listener` as backend `name` (HTTP/1.1 and h2c).
pub async fn serve(name: String, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(name.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Starts a backend on an ephemeral loopback port; returns its address.
pub async fn start(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(serve(name.to_string(), listener));
    addr
}

async fn respond(
    name: String,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let path = parts.uri.path().to_string();
    let status = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| hyper::StatusCode::from_u16(c).ok())
        .unwrap_or(hyper::StatusCode::OK);
    let json = serde_json::json!({
        "backend": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "host": parts.headers.get("host").and_then(|h| h.to_str().ok()).or(parts.uri.authority().map(|a| a.as_str())),
        "headers": headers,
        "body_bytes": body.len(),
    });
    let mut text = serde_json::to_string_pretty(&json).unwrap_or_default();
    text.push('\n');
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-backend", name.as_str())
        .body(Full::new(Bytes::from(text)));
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}
