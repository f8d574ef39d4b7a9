//! Shared test harness: the proxy binary as a child process, tiny in-test HTTP backends, a
//! client, and bootstrap builders. Everything runs on 127.0.0.1 with ephemeral ports.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("ephemeral port")
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP backend that answers with what it saw. Paths: `/slow/<ms>...` waits, `/status/<n>`
/// answers with that status, `/stall/<ms>` sends headers at once and the body after `ms`; every response has `x-backend: <name>` and
/// `x-upstream-secret: 1`, and a JSON body `{backend, method, path, host, version, headers}`.
pub struct Backend {
    pub name: String,
    pub address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let address = listener.local_addr().expect("backend address");
        let backend_name = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = backend_name.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let name = name.clone();
                        async move { Ok::<_, Infallible>(answer(&name, req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            name: name.to_string(),
            address,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }
}

/// A body that yields its bytes only after a delay (response headers go out first).
struct DelayedBody {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    data: Option<Bytes>,
}

impl hyper::body::Body for DelayedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        use std::future::Future;
        match self.sleep.as_mut().poll(cx) {
            std::task::Poll::Pending => std::task::Poll::Pending,
            std::task::Poll::Ready(()) => {
                std::task::Poll::Ready(self.data.take().map(|d| Ok(hyper::body::Frame::data(d))))
            }
        }
    }
}

type BackendBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(name: &str, req: Request<Incoming>) -> Response<BackendBody> {
    let stall = req
        .uri()
        .path()
        .strip_prefix("/stall/")
        .and_then(|ms| ms.parse::<u64>().ok());
    if let Some(ms) = stall {
        let body = DelayedBody {
            sleep: Box::pin(tokio::time::sleep(Duration::from_millis(ms))),
            data: Some(Bytes::from_static(b"late")),
        };
        return Response::builder()
            .header("x-backend", name)
            .body(BodyExt::boxed(body))
            .expect("response");
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if let Some(rest) = path.strip_prefix("/slow/") {
        let ms: u64 = rest
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let (parts, incoming) = req.into_parts();
    let req = Request::from_parts(parts, ());
    let received = incoming
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut headers = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_string())
            .or_insert_with(Vec::new)
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let body = serde_json::json!({
        "backend": name,
        "method": req.method().as_str(),
        "path": path,
        "host": host,
        "version": format!("{:?}", req.version()),
        "headers": headers,
        "body": String::from_utf8_lossy(&received),
    });
    Response::builder()
        .status(status)
        .header("x-backend", name)
        .header("x-upstream-secret", "1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

/// What a test client got back.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// The backend that answered (from the echo body).
    pub fn backend(&self) -> Option<String> {
        self.json()["backend"].as_str().map(str::to_string)
    }

    /// A request header as the backend saw it (first value).
    pub fn seen_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name][0].as_str().map(str::to_string)
    }
}

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn http1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and reads the whole response.
pub async fn send(client: &HttpClient, req: Request<Empty<Bytes>>) -> Reply {
    let resp = client.request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// POST `body` to 127.0.0.1:`port` with the given Host.
pub async fn post(port: u16, host: &str, path: &str, body: &'static str) -> Reply {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// GET over h2c (prior knowledge) to 127.0.0.1:`port` with `:authority` = `authority`;
/// `count` requests multiplexed on one connection.
pub async fn h2_get(port: u16, authority: &str, path: &str, count: usize) -> Vec<Reply> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let mut replies = Vec::new();
    for _ in 0..count {
        let mut sender = sender.clone();
        let req = Request::get(format!("http://{authority}{path}"))
            .body(Empty::new())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        replies.push(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        });
    }
    replies
}

/// GET `http://127.0.0.1:<port><path>` with the given Host.
pub async fn get(port: u16, host: &str, path: &str) -> Reply {
    get_with(&http1_client(), port, host, path, &[]).await
}

pub async fn get_with(
    client: &HttpClient,
    port: u16,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut b = Request::get(format!("http://127.0.0.1:{port}{path}")).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(client, b.body(Empty::new()).expect("request")).await
}

/// The proxy binary running with a bootstrap written to a temporary file.
pub struct Proxy {
    pub child: Child,
    pub admin: u16,
    pub readiness: u16,
    pub stderr_path: PathBuf,
    dir: PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "capstan-proxy-test-{tag}-{}-{}",
        std::process::id(),
        fastrand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn fastrand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

impl Proxy {
    /// Starts the proxy; `bootstrap` may contain `ADMIN_PORT`, replaced by the admin port.
    pub fn start(bootstrap: &str, extra_args: &[&str]) -> Self {
        let admin = free_port();
        let readiness = free_port();
        let dir = temp_dir("proxy");
        let path = dir.join("bootstrap.yaml");
        std::fs::write(&path, bootstrap.replace("ADMIN_PORT", &admin.to_string()))
            .expect("write bootstrap");
        let stderr_path = dir.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let readiness_address = format!("127.0.0.1:{readiness}");
        let mut args = vec![
            "-c",
            path.to_str().expect("utf-8 path"),
            "--readiness-address",
            &readiness_address,
            "--concurrency",
            "2",
            "--log-level",
            "debug",
        ];
        args.extend_from_slice(extra_args);
        let child = Command::new(env!("CARGO_BIN_EXE_capstan-proxy"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start capstan-proxy");
        Self {
            child,
            admin,
            readiness,
            stderr_path,
            dir,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// GET on the admin port.
    pub async fn admin_get(&self, path: &str) -> Reply {
        get(self.admin, "admin", path).await
    }

    pub async fn admin_post(&self, path: &str) -> Reply {
        let req = Request::post(format!("http://127.0.0.1:{}{path}", self.admin))
            .body(Empty::new())
            .expect("request");
        send(&http1_client(), req).await
    }

    /// `/ready` on the admin port, `None` while admin is not up yet.
    pub async fn ready(&self) -> Option<(StatusCode, String)> {
        let req = Request::get(format!("http://127.0.0.1:{}/ready", self.admin))
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = http1_client().request(req).await.ok()?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).trim().to_string()))
    }

    /// Waits for `/ready` to answer 200 LIVE.
    pub async fn wait_live(&self) {
        let live = eventually(
            Duration::from_secs(10),
            async || matches!(self.ready().await, Some((s, _)) if s == StatusCode::OK),
        )
        .await;
        assert!(
            live,
            "proxy did not become LIVE; stderr:\n{}",
            self.stderr()
        );
    }

    /// Sends a signal with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub async fn accepts(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// A STATIC cluster with the given backends.
pub fn static_cluster(name: &str, ports: &[u16], extra: &str) -> String {
    let endpoints: Vec<String> = ports
        .iter()
        .map(|p| format!("        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }}"))
        .collect();
    let lb = if endpoints.is_empty() {
        "    load_assignment: { cluster_name: NAME }".replace("NAME", name)
    } else {
        format!(
            "    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n{}",
            endpoints.join("\n")
        )
    };
    format!("  - name: {name}\n    connect_timeout: 1s\n{extra}{lb}\n")
}

/// A bootstrap with admin on `ADMIN_PORT`, the given clusters, and one HTTP listener on
/// `listener_port` whose route configuration is `route_config` (YAML at indentation 0).
pub fn bootstrap(clusters: &[String], listener_port: u16, route_config: &str) -> String {
    let rc: String = route_config
        .lines()
        .map(|l| format!("            {l}\n"))
        .collect();
    format!(
        r#"node: {{ id: test-0.default, cluster: test }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: ADMIN_PORT }} }} }}
static_resources:
  clusters:
{clusters}  listeners:
  - name: ingress
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener_port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: ingress
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
{rc}"#,
        clusters = clusters.concat(),
    )
}
