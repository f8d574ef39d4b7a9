//! A fake Kubernetes API server that speaks real HTTP: the one fake in the suite.
//!
//! There is no API server on these machines, so tests of the Kubernetes provider, the status
//! writer, leader election and the injector drive kube-rs's real client against this one. It
//! keeps objects as JSON per resource (`apis/<group>/<version>/<plural>` or `api/v1/<plural>`)
//! and implements what those clients use:
//!
//! * list (`GET`, cluster-wide or in a namespace) answering `metadata.resourceVersion`;
//! * watch (`?watch=true&resourceVersion=N`): replays the events after `N`, then streams new
//!   ones as JSON lines; `BOOKMARK` events when `allowWatchBookmarks=true`; the stream ends
//!   after `timeoutSeconds`; a `resourceVersion` older than the last [`FakeApiServer::compact`]
//!   gets the `ERROR` event with a `410 Expired` status, like etcd compaction;
//! * get, create (`POST`), replace (`PUT`, with optimistic concurrency on
//!   `metadata.resourceVersion` → `409 Conflict`), patch (`PATCH`: merge, strategic-merge and
//!   apply patches are all applied as a JSON merge patch, which is what the tests need), and
//!   the `/status` subresource (only `status` changes; `metadata.generation` does not);
//! * delete.
//!
//! Tests change the world with [`FakeApiServer::apply`] / [`FakeApiServer::delete`], cut every
//! open watch ([`FakeApiServer::break_watches`]), make the server answer `503` to everything
//! ([`FakeApiServer::set_down`]), and read what clients did ([`FakeApiServer::requests`],
//! [`FakeApiServer::get`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

type Body = BoxBody<Bytes, Infallible>;

/// One stored change, for watch replays.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Objects per resource path, keyed by `namespace/name`.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    changes: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    down: bool,
    requests: Vec<String>,
    next_uid: u64,
}

/// A running fake API server on 127.0.0.1.
#[derive(Clone)]
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Change>,
    /// Each send closes every open watch stream.
    breaks: broadcast::Sender<()>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The resource path of an object: `api/v1/services`, `apis/capstan.dev/v1alpha1/serviceroutes`.
pub fn resource_of(object: &Value) -> String {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let plural = plural(kind);
    if api_version.contains('/') {
        format!("apis/{api_version}/{plural}")
    } else {
        format!("api/{api_version}/{plural}")
    }
}

fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower.ends_with("policy") {
        format!("{}ies", &lower[..lower.len() - 1])
    } else if lower.ends_with('s') {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("local addr");
        let (events, _) = broadcast::channel(4096);
        let (breaks, _) = broadcast::channel(16);
        let server = FakeApiServer {
            addr,
            state: Arc::new(Mutex::new(State {
                rv: 100,
                ..State::default()
            })),
            events,
            breaks,
        };
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(s.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        server
    }

    /// `http://127.0.0.1:PORT`, the cluster URL for a kube client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or updates an object (as `kubectl apply` would after admission): sets
    /// `resourceVersion`, `uid`, `creationTimestamp`, and bumps `generation` when anything but
    /// `status` and `metadata` changed. Returns the stored object.
    pub fn apply(&self, mut object: Value) -> Value {
        let resource = resource_of(&object);
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut st = lock(&self.state);
        st.rv += 1;
        let rv = st.rv;
        st.next_uid += 1;
        let uid = format!("00000000-0000-0000-0000-{:012}", st.next_uid);
        let existing = st
            .objects
            .get(&resource)
            .and_then(|m| m.get(&key(&namespace, &name)))
            .cloned();
        let kind = match &existing {
            Some(old) => {
                let spec_changed = strip_meta(old) != strip_meta(&object);
                let generation =
                    old["metadata"]["generation"].as_i64().unwrap_or(1) + i64::from(spec_changed);
                object["metadata"]["generation"] = json!(generation);
                object["metadata"]["uid"] = old["metadata"]["uid"].clone();
                object["metadata"]["creationTimestamp"] =
                    old["metadata"]["creationTimestamp"].clone();
                if object.get("status").is_none()
                    && let Some(status) = old.get("status")
                {
                    object["status"] = status.clone();
                }
                "MODIFIED"
            }
            None => {
                object["metadata"]["generation"] = json!(1);
                object["metadata"]["uid"] = json!(uid);
                object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                "ADDED"
            }
        };
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.objects
            .entry(resource.clone())
            .or_default()
            .insert(key(&namespace, &name), object.clone());
        let change = Change {
            rv,
            resource,
            kind,
            object: object.clone(),
        };
        st.changes.push(change.clone());
        drop(st);
        let _ = self.events.send(change);
        object
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let mut st = lock(&self.state);
        let Some(mut object) = st
            .objects
            .get_mut(resource)
            .and_then(|m| m.remove(&key(namespace, name)))
        else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            rv,
            resource: resource.to_string(),
            kind: "DELETED",
            object,
        };
        st.changes.push(change.clone());
        drop(st);
        let _ = self.events.send(change);
        true
    }

    /// The stored object, if any.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.state)
            .objects
            .get(resource)
            .and_then(|m| m.get(&key(namespace, name)))
            .cloned()
    }

    /// Forgets the change history: watches from any older resourceVersion now get 410 Gone,
    /// and open watches are cut (clients must re-list).
    pub fn compact(&self) {
        {
            let mut st = lock(&self.state);
            st.compacted = st.rv + 1;
            st.changes.clear();
        }
        self.break_watches();
    }

    /// Ends every open watch stream (as an API server restart or a load balancer would).
    pub fn break_watches(&self) {
        let _ = self.breaks.send(());
    }

    /// While down, every request gets `503` and open watches end.
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
        if down {
            self.break_watches();
        }
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.state).requests.clone()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().trim_start_matches('/').to_string();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        {
            let mut st = lock(&self.state);
            st.requests.push(format!(
                "{method} /{path}{}",
                req.uri()
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default()
            ));
            if st.down {
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the fake API server is down",
                );
            }
        }
        let Some(target) = Target::parse(&path) else {
            return status(StatusCode::NOT_FOUND, &format!("no route for /{path}"));
        };
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return status(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        match (&method, &target.name) {
            (&Method::GET, None) if watch => self.watch(&target, &query),
            (&Method::GET, None) => self.list(&target),
            (&Method::GET, Some(name)) => match self.get(&target.resource, &target.ns(), name) {
                Some(o) => json_response(StatusCode::OK, &o),
                None => not_found(&target, name),
            },
            (&Method::POST, None) => self.create(&target, &body),
            (&Method::PUT, Some(name)) => self.replace(&target, name, &body),
            (&Method::PATCH, Some(name)) => self.patch(&target, name, &body),
            (&Method::DELETE, Some(name)) => {
                if self.delete(&target.resource, &target.ns(), name) {
                    json_response(
                        StatusCode::OK,
                        &json!({"kind": "Status", "status": "Success"}),
                    )
                } else {
                    not_found(&target, name)
                }
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        }
    }

    fn list(&self, target: &Target) -> Response<Body> {
        let st = lock(&self.state);
        let items: Vec<Value> = st
            .objects
            .get(&target.resource)
            .map(|m| {
                m.values()
                    .filter(|o| target.matches_namespace(o))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        json_response(
            StatusCode::OK,
            &json!({
                "apiVersion": target.api_version(),
                "kind": "List",
                "metadata": { "resourceVersion": st.rv.to_string() },
                "items": items,
            }),
        )
    }

    fn create(&self, target: &Target, body: &[u8]) -> Response<Body> {
        let Ok(object) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "body is not JSON");
        };
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        if self.get(&target.resource, &target.ns(), name).is_some() {
            return status(StatusCode::CONFLICT, &format!("{name} already exists"));
        }
        let mut object = object.clone();
        if let Some(ns) = &target.namespace {
            object["metadata"]["namespace"] = json!(ns);
        }
        json_response(StatusCode::CREATED, &self.apply(object))
    }

    fn replace(&self, target: &Target, name: &str, body: &[u8]) -> Response<Body> {
        let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "body is not JSON");
        };
        let Some(current) = self.get(&target.resource, &target.ns(), name) else {
            return not_found(target, name);
        };
        let sent_rv = object["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if !sent_rv.is_empty() && current["metadata"]["resourceVersion"] != json!(sent_rv) {
            return status(
                StatusCode::CONFLICT,
                "the object has been modified; please apply your changes to the latest version and try again",
            );
        }
        if target.status {
            let mut next = current.clone();
            next["status"] = object["status"].clone();
            object = next;
        }
        json_response(StatusCode::OK, &self.apply(object))
    }

    fn patch(&self, target: &Target, name: &str, body: &[u8]) -> Response<Body> {
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "patch is not JSON");
        };
        let Some(current) = self.get(&target.resource, &target.ns(), name) else {
            return not_found(target, name);
        };
        let mut next = current.clone();
        if target.status {
            if let Some(s) = patch.get("status") {
                merge(&mut next["status"], s);
            }
        } else {
            merge(&mut next, &patch);
        }
        json_response(StatusCode::OK, &self.apply(next))
    }

    fn watch(&self, target: &Target, query: &BTreeMap<String, String>) -> Response<Body> {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(290));
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
        let mut events = self.events.subscribe();
        let mut breaks = self.breaks.subscribe();
        let (backlog, expired, rv) = {
            let st = lock(&self.state);
            let expired = from != 0 && from < st.compacted;
            let backlog: Vec<Change> = st
                .changes
                .iter()
                .filter(|c| c.rv > from && c.resource == target.resource)
                .cloned()
                .collect();
            (backlog, expired, st.rv)
        };
        let target = target.clone();
        let state = self.state.clone();
        tokio::spawn(async move {
            let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
            if expired {
                let _ = tx
                    .send(line(json!({
                        "type": "ERROR",
                        "object": {
                            "kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "reason": "Expired", "code": 410,
                            "message": format!("too old resource version: {from}"),
                        }
                    })))
                    .await;
                return;
            }
            let mut sent = from;
            for c in backlog {
                if target.matches_namespace(&c.object) {
                    sent = c.rv;
                    if tx
                        .send(line(json!({"type": c.kind, "object": c.object})))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return,
                    _ = breaks.recv() => return,
                    event = events.recv() => match event {
                        Ok(c) if c.rv > sent && c.resource == target.resource
                            && target.matches_namespace(&c.object) => {
                            sent = c.rv;
                            if tx.send(line(json!({"type": c.kind, "object": c.object}))).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // Lagged or closed: end the watch; the client re-lists.
                        Err(_) => return,
                    },
                    _ = tick.tick(), if bookmarks => {
                        let now = lock(&state).rv.max(rv);
                        let bookmark = json!({
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": target.api_version(),
                                "kind": target.kind_hint(),
                                "metadata": { "resourceVersion": now.to_string() },
                            }
                        });
                        if tx.send(line(bookmark)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR, "response"))
    }
}

/// Drops what the server owns before comparing two versions of an object.
fn strip_meta(o: &Value) -> Value {
    let mut o = o.clone();
    if let Value::Object(m) = &mut o {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// A request path, parsed.
#[derive(Clone, Debug)]
struct Target {
    /// `api/v1/services`, `apis/capstan.dev/v1alpha1/serviceroutes`.
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let (prefix, rest) = match parts.as_slice() {
            ["api", v, rest @ ..] => (format!("api/{v}"), rest),
            ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let (plural, name, status) = match rest {
            [plural] => (*plural, None, false),
            [plural, name] => (*plural, Some(name.to_string()), false),
            [plural, name, "status"] => (*plural, Some(name.to_string()), true),
            _ => return None,
        };
        Some(Target {
            resource: format!("{prefix}/{plural}"),
            namespace,
            name,
            status,
        })
    }

    fn ns(&self) -> String {
        self.namespace.clone().unwrap_or_default()
    }

    fn matches_namespace(&self, object: &Value) -> bool {
        match &self.namespace {
            None => true,
            Some(ns) => object["metadata"]["namespace"].as_str() == Some(ns.as_str()),
        }
    }

    fn api_version(&self) -> String {
        let mut parts = self.resource.split('/').skip(1).collect::<Vec<_>>();
        parts.pop();
        parts.join("/")
    }

    fn kind_hint(&self) -> &'static str {
        match self.resource.rsplit('/').next() {
            Some("services") => "Service",
            Some("endpointslices") => "EndpointSlice",
            Some("secrets") => "Secret",
            Some("serviceroutes") => "ServiceRoute",
            Some("servicepolicies") => "ServicePolicy",
            Some("leases") => "Lease",
            _ => "Unknown",
        }
    }
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn status(code: StatusCode, message: &str) -> Response<Body> {
    let reason = match code {
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::CONFLICT => "Conflict",
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        _ => "BadRequest",
    };
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

fn not_found(target: &Target, name: &str) -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        &format!("{} \"{name}\" not found", target.resource),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse() {
        let t = Target::parse("apis/capstan.dev/v1alpha1/namespaces/shop/serviceroutes/r/status")
            .expect("parses");
        assert_eq!(t.resource, "apis/capstan.dev/v1alpha1/serviceroutes");
        assert_eq!(t.namespace.as_deref(), Some("shop"));
        assert_eq!(t.name.as_deref(), Some("r"));
        assert!(t.status);
        assert_eq!(t.api_version(), "capstan.dev/v1alpha1");
        let t = Target::parse("api/v1/services").expect("parses");
        assert_eq!(
            (t.resource.as_str(), t.namespace),
            ("api/v1/services", None)
        );
        assert_eq!(plural("ServicePolicy"), "servicepolicies");
        assert_eq!(plural("EndpointSlice"), "endpointslices");
        assert_eq!(plural("Lease"), "leases");
    }

    #[test]
    fn merge_patch() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge(&mut v, &json!({"a": {"b": null, "e": 4}, "d": [1]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 4}, "d": [1]}));
    }
}
