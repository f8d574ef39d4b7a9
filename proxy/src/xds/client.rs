//! [`XdsClient`]: the subscriptions and accepted state shared with the proxy, and the
//! connection loop that keeps one ADS stream open.
//!
//! Owns: the per-type state that outlives streams (subscription, last accepted version, the
//! resources held and their versions, initial-fetch outcomes, stats), the waits the init
//! manager uses, and the loop connect → stream → on failure back off with jitter → reconnect
//! and resubscribe everything with what is held. The protocol variants (`sotw`, `delta`) own
//! the per-stream state (nonces, what the server was told) and build requests.
//!
//! Must not: hold the state lock while calling a handler or across an `.await`, tell a
//! handler anything when a stream ends (the last accepted configuration keeps serving), or
//! treat an unreachable control plane as a failed initial fetch (only an established stream
//! that breaks is one; an unreachable one ends the wait on `initial_fetch_timeout`, as Envoy).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::delta::Delta;
use super::sotw::Sotw;
use super::stats::{self, CONNECTED_STATE, TypeStats};
use super::{
    InitialFetch, SubscriptionNames, XdsClientConfig, XdsHandler, XdsMode, request_order,
    stat_prefix,
};

/// Largest response accepted (tonic's default, 4 MiB, is too small for a big mesh's CDS).
const MAX_MESSAGE_SIZE: usize = 128 << 20;
/// TCP keepalive notices a control plane that vanished without closing the connection.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);
/// HTTP/2 pings, spaced no tighter than gRPC servers' default enforcement (5 min), which
/// answers more frequent pings with GOAWAY `too_many_pings`.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(300);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) type AdsClient = AggregatedDiscoveryServiceClient<Channel>;

/// Why [`XdsClient::new`] refused a configuration.
#[derive(Debug, thiserror::Error)]
pub enum XdsClientError {
    #[error("xDS endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
}

/// The proxy's xDS client. Cheap to clone (all clones share one state); one clone runs
/// [`run`](Self::run), the others subscribe, wait and read stats.
#[derive(Clone)]
pub struct XdsClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for XdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsClient")
            .field("endpoint", &self.inner.config.endpoint)
            .field("mode", &self.inner.config.mode)
            .finish_non_exhaustive()
    }
}

/// State shared by the client's handles and its connection task.
pub(crate) struct Inner {
    pub(crate) config: XdsClientConfig,
    endpoint: Endpoint,
    pub(crate) handler: Arc<dyn XdsHandler>,
    state: Mutex<State>,
    /// Bumped on every change an initial-fetch waiter may care about.
    events: watch::Sender<u64>,
    /// Wakes the connection task when a subscription changed.
    wake: Notify,
    connected: AtomicU64,
    running: AtomicBool,
}

#[derive(Default)]
struct State {
    types: BTreeMap<String, TypeState>,
    /// Established streams that failed so far, and why the latest one did.
    stream_failures: u64,
    last_stream_error: String,
}

/// One type URL's state; survives reconnects.
struct TypeState {
    names: SubscriptionNames,
    subscribed_at: Instant,
    /// The last accepted `version_info` / `system_version_info` ("" before any).
    version: String,
    /// Resources held: name → version (delta: the resource's version; SotW: the
    /// `version_info` of the response that last carried it).
    held: BTreeMap<String, String>,
    /// Names whose latest offer was NACKed → the handler's message.
    rejected: BTreeMap<String, String>,
    initial: Option<InitialFetch>,
    stats: TypeStats,
}

/// A read-only view of one subscription, for building requests.
pub(crate) struct SubscriptionRef<'a> {
    pub(crate) type_url: &'a str,
    pub(crate) names: &'a SubscriptionNames,
    pub(crate) version: &'a str,
    pub(crate) held: &'a BTreeMap<String, String>,
}

/// What an accepted response changed.
pub(crate) enum Accepted {
    /// SotW: the names now held (all at the response's version).
    Sotw { names: Vec<String> },
    /// Delta: `(name, version)` added or updated, and names removed.
    Delta {
        updated: Vec<(String, String)>,
        removed: Vec<String>,
    },
}

/// One protocol variant on one stream.
pub(crate) trait Protocol: Send + Sized {
    type Request: Send + 'static;
    type Response: Send + 'static;

    /// Fresh per-stream state; `node` goes on the stream's first request.
    fn new(node: Node) -> Self;
    /// Opens the ADS call.
    fn open(
        client: AdsClient,
        requests: UnboundedReceiverStream<Self::Request>,
    ) -> impl Future<Output = Result<Streaming<Self::Response>, tonic::Status>> + Send;
    /// Requests for subscriptions the server has not been told about on this stream.
    fn subscription_requests(&mut self, inner: &Inner) -> Vec<Self::Request>;
    /// Hands one response to the handler; returns its ACK or NACK.
    fn on_response(&mut self, inner: &Inner, response: Self::Response) -> Vec<Self::Request>;
}

/// `None` and zero both mean "wait forever" (Envoy: `initial_fetch_timeout: 0s`).
fn effective_timeout(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|t| !t.is_zero())
}

impl XdsClient {
    /// Checks the endpoint; nothing connects until [`run`](Self::run).
    pub fn new(
        config: XdsClientConfig,
        handler: Arc<dyn XdsHandler>,
    ) -> Result<Self, XdsClientError> {
        let invalid = |reason: String| XdsClientError::InvalidEndpoint {
            endpoint: config.endpoint.clone(),
            reason,
        };
        let endpoint =
            Endpoint::from_shared(config.endpoint.clone()).map_err(|e| invalid(e.to_string()))?;
        match endpoint.uri().scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(invalid(format!(
                    "scheme {other:?} is not supported (plaintext http:// only; TLS to the \
                     control plane is not implemented)"
                )));
            }
            None => return Err(invalid("expected http://host:port".to_string())),
        }
        let endpoint = endpoint
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .tcp_keepalive(Some(TCP_KEEPALIVE))
            .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                endpoint,
                handler,
                state: Mutex::new(State::default()),
                events: watch::channel(0).0,
                wake: Notify::new(),
                connected: AtomicU64::new(0),
                running: AtomicBool::new(false),
            }),
        })
    }

    /// Subscribes to `type_url` (wildcard for CDS/LDS, names for EDS/RDS), or changes the
    /// names of an existing subscription; the request goes out on the stream at once (or on
    /// the next stream). `Names` of an empty set unsubscribes. Resources held under names no
    /// longer subscribed are forgotten (not reported again on reconnect); the handler is not
    /// told — it asked for the change.
    pub fn subscribe(&self, type_url: &str, names: SubscriptionNames) {
        {
            let mut state = self.inner.lock();
            match state.types.get_mut(type_url) {
                Some(t) if t.names == names => return,
                Some(t) => {
                    if let SubscriptionNames::Names(keep) = &names {
                        t.held.retain(|n, _| keep.contains(n));
                    }
                    t.names = names;
                }
                None => {
                    let stats = TypeStats::new(stat_prefix(type_url));
                    // Envoy counts a subscription's start as an attempt.
                    stats::inc(&stats.update_attempt);
                    state.types.insert(
                        type_url.to_string(),
                        TypeState {
                            names,
                            subscribed_at: Instant::now(),
                            version: String::new(),
                            held: BTreeMap::new(),
                            rejected: BTreeMap::new(),
                            initial: None,
                            stats,
                        },
                    );
                }
            }
        }
        debug!(type_url, "subscription changed");
        self.inner.wake.notify_one();
        self.inner.bump();
    }

    /// The current subscription of `type_url`.
    pub fn subscription(&self, type_url: &str) -> Option<SubscriptionNames> {
        self.inner
            .lock()
            .types
            .get(type_url)
            .map(|t| t.names.clone())
    }

    /// Resolves when the first response for `type_url` was applied or rejected, when an
    /// established stream failed before it, or when the configured `initial_fetch_timeout`
    /// (counted from the first [`subscribe`](Self::subscribe)) elapsed. Waits for the
    /// subscription if there is none yet. Every call returns the same outcome.
    pub fn initial_fetch(
        &self,
        type_url: &str,
    ) -> impl Future<Output = InitialFetch> + Send + use<> {
        self.initial_fetch_with_timeout(type_url, self.inner.config.initial_fetch_timeout)
    }

    /// [`initial_fetch`](Self::initial_fetch) with this subscription's own timeout (the
    /// bootstrap's `cds_config` / `lds_config` `initial_fetch_timeout`); `None` or zero waits
    /// forever. The first outcome is kept: a later call with a longer timeout still sees
    /// `TimedOut`.
    pub fn initial_fetch_with_timeout(
        &self,
        type_url: &str,
        timeout: Option<Duration>,
    ) -> impl Future<Output = InitialFetch> + Send + use<> {
        let inner = self.inner.clone();
        let type_url = type_url.to_string();
        let timeout = effective_timeout(timeout);
        async move {
            let mut events = inner.events.subscribe();
            loop {
                events.borrow_and_update();
                match inner.initial_status(&type_url, timeout) {
                    Ok(outcome) => return outcome,
                    Err(deadline) => wait_event(&mut events, deadline).await,
                }
            }
        }
    }

    /// Resolves when the resource `name` of `type_url` is held (applied now or before), when
    /// the latest response offering it was rejected, when an established stream fails after
    /// this call, or after `timeout` (`None` or zero: never). For warming: an EDS cluster
    /// waiting for its assignment, a listener waiting for its route configuration. Does not
    /// subscribe.
    pub fn resource_fetch(
        &self,
        type_url: &str,
        name: &str,
        timeout: Option<Duration>,
    ) -> impl Future<Output = InitialFetch> + Send + use<> {
        let inner = self.inner.clone();
        let type_url = type_url.to_string();
        let name = name.to_string();
        let deadline = effective_timeout(timeout).map(|t| Instant::now() + t);
        let failures_before = inner.lock().stream_failures;
        async move {
            let mut events = inner.events.subscribe();
            loop {
                events.borrow_and_update();
                if let Some(outcome) = inner.resource_status(&type_url, &name, failures_before) {
                    return outcome;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return InitialFetch::TimedOut;
                }
                wait_event(&mut events, deadline).await;
            }
        }
    }

    /// Whether an ADS stream is established (`control_plane.connected_state`).
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed) == 1
    }

    /// Every stat as `(Envoy name, value)`: [`CONNECTED_STATE`] (a gauge) first, then each
    /// subscribed type's counters, in request order.
    pub fn stats(&self) -> Vec<(String, u64)> {
        let mut out = vec![(
            CONNECTED_STATE.to_string(),
            self.inner.connected.load(Ordering::Relaxed),
        )];
        let state = self.inner.lock();
        for type_url in request_order(state.types.keys()) {
            if let Some(t) = state.types.get(&type_url) {
                t.stats.collect(&mut out);
            }
        }
        out
    }

    /// The last accepted version of `type_url` (`None` before any), for `/config_dump`.
    pub fn accepted_version(&self, type_url: &str) -> Option<String> {
        self.inner
            .lock()
            .types
            .get(type_url)
            .map(|t| t.version.clone())
            .filter(|v| !v.is_empty())
    }

    /// Type URL → last accepted version, for every type that has accepted something.
    pub fn accepted_versions(&self) -> BTreeMap<String, String> {
        self.inner
            .lock()
            .types
            .iter()
            .filter(|(_, t)| !t.version.is_empty())
            .map(|(k, t)| (k.clone(), t.version.clone()))
            .collect()
    }

    /// The resources of `type_url` the proxy holds, name → version (delta: each resource's
    /// version; SotW: the `version_info` of the last accepted response carrying it).
    pub fn resource_versions(&self, type_url: &str) -> BTreeMap<String, String> {
        self.inner
            .lock()
            .types
            .get(type_url)
            .map(|t| t.held.clone())
            .unwrap_or_default()
    }

    /// The connection loop: connects, opens the ADS stream, sends every subscription, hands
    /// responses to the handler and ACKs/NACKs them; on failure backs off (full jitter) and
    /// starts over, resubscribing with what is held. Returns when `shutdown` completes. A
    /// second concurrent `run` on a clone returns at once.
    pub async fn run<F>(self, shutdown: F)
    where
        F: Future<Output = ()> + Send,
    {
        if self.inner.running.swap(true, Ordering::SeqCst) {
            warn!("XdsClient::run is already running; ignoring the second call");
            return;
        }
        let mut shutdown = std::pin::pin!(shutdown);
        match self.inner.config.mode {
            XdsMode::Sotw => connection_loop::<Sotw, F>(&self.inner, shutdown.as_mut()).await,
            XdsMode::Delta => connection_loop::<Delta, F>(&self.inner, shutdown.as_mut()).await,
        }
        self.inner.set_connected(false);
        self.inner.running.store(false, Ordering::SeqCst);
        info!("xDS client stopped");
    }
}

/// Waits for the next event, or until `deadline`.
async fn wait_event(events: &mut watch::Receiver<u64>, deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => {
            tokio::select! {
                changed = events.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep_until(deadline).await;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
        None => {
            if events.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the state is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.events.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn set_connected(&self, connected: bool) {
        self.connected
            .store(u64::from(connected), Ordering::Relaxed);
    }

    /// `Ok(outcome)` once the type's initial fetch is over, else `Err(deadline)`.
    fn initial_status(
        &self,
        type_url: &str,
        timeout: Option<Duration>,
    ) -> Result<InitialFetch, Option<Instant>> {
        let mut state = self.lock();
        let Some(t) = state.types.get_mut(type_url) else {
            return Err(None);
        };
        if let Some(outcome) = &t.initial {
            return Ok(outcome.clone());
        }
        let Some(timeout) = timeout else {
            return Err(None);
        };
        let deadline = t.subscribed_at + timeout;
        if Instant::now() < deadline {
            return Err(Some(deadline));
        }
        warn!(type_url, ?timeout, "initial fetch timed out");
        stats::inc(&t.stats.init_fetch_timeout);
        t.initial = Some(InitialFetch::TimedOut);
        Ok(InitialFetch::TimedOut)
    }

    fn resource_status(
        &self,
        type_url: &str,
        name: &str,
        failures_before: u64,
    ) -> Option<InitialFetch> {
        let state = self.lock();
        if let Some(t) = state.types.get(type_url) {
            if t.held.contains_key(name) {
                return Some(InitialFetch::Applied);
            }
            if let Some(message) = t.rejected.get(name) {
                return Some(InitialFetch::Rejected(message.clone()));
            }
        }
        (state.stream_failures > failures_before)
            .then(|| InitialFetch::Failed(state.last_stream_error.clone()))
    }

    /// Calls `f` for every subscription, in request order (under the lock: `f` must only
    /// build requests).
    pub(crate) fn for_each_subscription(&self, mut f: impl FnMut(SubscriptionRef<'_>)) {
        let state = self.lock();
        for type_url in request_order(state.types.keys()) {
            if let Some(t) = state.types.get(&type_url) {
                f(SubscriptionRef {
                    type_url: &type_url,
                    names: &t.names,
                    version: &t.version,
                    held: &t.held,
                });
            }
        }
    }

    /// Calls `f` with the subscription of `type_url` (under the lock); `None` if there is none.
    pub(crate) fn with_subscription<R>(
        &self,
        type_url: &str,
        f: impl FnOnce(&SubscriptionNames, &str) -> R,
    ) -> Option<R> {
        self.lock()
            .types
            .get(type_url)
            .map(|t| f(&t.names, &t.version))
    }

    pub(crate) fn response_received(&self, type_url: &str) {
        if let Some(t) = self.lock().types.get(type_url) {
            stats::inc(&t.stats.update_attempt);
        }
    }

    pub(crate) fn accepted(&self, type_url: &str, version: &str, change: Accepted) {
        {
            let mut state = self.lock();
            let Some(t) = state.types.get_mut(type_url) else {
                return;
            };
            t.version = version.to_string();
            match change {
                Accepted::Sotw { names } => {
                    if names.is_empty() {
                        stats::inc(&t.stats.update_empty);
                    }
                    t.held = names
                        .into_iter()
                        .map(|n| (n, version.to_string()))
                        .collect();
                    t.rejected.clear();
                }
                Accepted::Delta { updated, removed } => {
                    for name in &removed {
                        t.held.remove(name);
                        t.rejected.remove(name);
                    }
                    for (name, resource_version) in updated {
                        t.rejected.remove(&name);
                        t.held.insert(name, resource_version);
                    }
                }
            }
            stats::inc(&t.stats.update_success);
            t.initial.get_or_insert(InitialFetch::Applied);
        }
        debug!(type_url, version, "update accepted");
        self.bump();
    }

    pub(crate) fn rejected(
        &self,
        type_url: &str,
        rejected_version: &str,
        names: BTreeSet<String>,
        message: &str,
    ) {
        {
            let mut state = self.lock();
            let Some(t) = state.types.get_mut(type_url) else {
                return;
            };
            for name in names {
                t.rejected.insert(name, message.to_string());
            }
            stats::inc(&t.stats.update_rejected);
            t.initial
                .get_or_insert_with(|| InitialFetch::Rejected(message.to_string()));
        }
        warn!(
            type_url,
            rejected_version,
            error = message,
            "update rejected (NACK)"
        );
        self.bump();
    }

    /// The control plane could not be reached: counted, but initial fetches keep waiting.
    fn connect_failed(&self) {
        let state = self.lock();
        for t in state.types.values() {
            stats::inc(&t.stats.update_failure);
            stats::inc(&t.stats.update_attempt);
        }
    }

    /// An established stream ended: pending initial fetches fail (the configuration held so
    /// far stays).
    fn stream_failed(&self, error: &str) {
        {
            let mut state = self.lock();
            state.stream_failures += 1;
            state.last_stream_error = error.to_string();
            for t in state.types.values_mut() {
                stats::inc(&t.stats.update_failure);
                stats::inc(&t.stats.update_attempt);
                t.initial
                    .get_or_insert_with(|| InitialFetch::Failed(error.to_string()));
            }
        }
        self.bump();
    }
}

/// How one connection attempt ended.
enum StreamEnd {
    /// No stream: the control plane could not be reached.
    ConnectFailed(String),
    /// The stream was established (or the call was answered) and then failed.
    Failed { responses: u64, error: String },
}

async fn connection_loop<P, F>(inner: &Inner, mut shutdown: Pin<&mut F>)
where
    P: Protocol,
    F: Future<Output = ()> + Send,
{
    let mut backoff = Backoff::new(inner.config.backoff_base, inner.config.backoff_max);
    let mut failures: u64 = 0;
    loop {
        let end = tokio::select! {
            () = shutdown.as_mut() => return,
            end = one_stream::<P>(inner) => end,
        };
        inner.set_connected(false);
        failures += 1;
        match &end {
            StreamEnd::ConnectFailed(error) => {
                inner.connect_failed();
                // Every attempt while the control plane is away would be a warning otherwise.
                if failures == 1 {
                    warn!(
                        endpoint = inner.config.endpoint,
                        error, "cannot reach the control plane"
                    );
                } else {
                    debug!(
                        endpoint = inner.config.endpoint,
                        error, failures, "cannot reach the control plane"
                    );
                }
            }
            StreamEnd::Failed { responses, error } => {
                inner.stream_failed(error);
                warn!(
                    endpoint = inner.config.endpoint,
                    error, responses, "xDS stream ended; keeping the last accepted configuration"
                );
                if *responses > 0 {
                    backoff.reset();
                    failures = 0;
                }
            }
        }
        let delay = backoff.next_delay();
        debug!(?delay, "reconnecting after backoff");
        tokio::select! {
            () = shutdown.as_mut() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn send_all<T>(tx: &mpsc::UnboundedSender<T>, requests: Vec<T>) {
    for request in requests {
        // A closed request stream means the call is over; its end shows on the response side.
        if tx.send(request).is_err() {
            return;
        }
    }
}

/// The full chain of a transport error (tonic's top-level message is just "transport error").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let _ = write!(out, ": {e}");
        source = e.source();
    }
    out
}

fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

async fn one_stream<P: Protocol>(inner: &Inner) -> StreamEnd {
    let channel = match inner.endpoint.connect().await {
        Ok(channel) => channel,
        Err(e) => return StreamEnd::ConnectFailed(error_chain(&e)),
    };
    let client = AdsClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut protocol = P::new(inner.config.node.clone());
    // Resubscribe everything before the first response can arrive (CDS → EDS → LDS → RDS).
    send_all(&tx, protocol.subscription_requests(inner));
    let mut responses = match P::open(client, UnboundedReceiverStream::new(rx)).await {
        Ok(responses) => responses,
        Err(status) => {
            return StreamEnd::Failed {
                responses: 0,
                error: status_text(&status),
            };
        }
    };
    inner.set_connected(true);
    info!(endpoint = inner.config.endpoint, "xDS stream established");
    let mut received: u64 = 0;
    loop {
        tokio::select! {
            () = inner.wake.notified() => send_all(&tx, protocol.subscription_requests(inner)),
            message = responses.message() => match message {
                Ok(Some(response)) => {
                    received += 1;
                    send_all(&tx, protocol.on_response(inner, response));
                    // The handler may have subscribed to more (CDS → EDS names).
                    send_all(&tx, protocol.subscription_requests(inner));
                }
                Ok(None) => {
                    return StreamEnd::Failed {
                        responses: received,
                        error: "the control plane closed the stream".to_string(),
                    };
                }
                Err(status) => {
                    return StreamEnd::Failed {
                        responses: received,
                        error: status_text(&status),
                    };
                }
            },
        }
    }
}
