//! One request through the connection manager and the router filter: normalize, route, then
//! answer directly, redirect, or forward to an upstream host and stream the response back.
//!
//! Decisions come from `router` (pure); failures become `LocalReply`s; this module only
//! sequences them and does the I/O.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant as StdInstant;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::body::{
    Buffered, RequestBody, RequestGuards, ResponseBody, UpstreamBody, buffer_request,
};
use super::headers::{
    self, X_ENVOY_EXPECTED_RQ_TIMEOUT_MS, X_ENVOY_ORIGINAL_PATH, X_ENVOY_UPSTREAM_SERVICE_TIME,
    X_FORWARDED_PROTO, X_REQUEST_ID,
};
use super::local_ratelimit;
use super::local_reply::LocalReply;
use super::retry::{self, TryOutcome};
use super::router::{self, RedirectInput, RequestView, Selected};
use super::{Connection, HttpConnectionManager, active_request};
use crate::cluster::circuit_breaker::Kind as BreakerKind;
use crate::cluster::outlier::Outcome as OutlierOutcome;
use crate::cluster::pool::{PoolBody, PoolResponse, UpstreamError};
use crate::config::cluster::UpstreamProtocol;
use crate::config::route::{
    Action, ClusterSpecifier, HeaderMutations, MirrorPolicy, RouteAction, RouteConfig,
};
use crate::stats::GaugeGuard;

impl HttpConnectionManager {
    /// Handles one request; never fails (failures are local replies).
    pub(crate) async fn handle(
        &self,
        conn: &Connection,
        req: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let stats = &self.stats;
        let version = req.version();
        let h2 = version == Version::HTTP_2;
        stats.downstream_rq_total.inc();
        if h2 {
            stats.downstream_rq_http2_total.inc();
        } else {
            stats.downstream_rq_http1_total.inc();
        }
        if !conn.seen_request.swap(true, Ordering::Relaxed) {
            if h2 {
                conn.http2.store(true, Ordering::Relaxed);
                stats.downstream_cx_http2_total.inc();
            } else {
                stats.downstream_cx_http1_total.inc();
            }
        }
        let draining = self.drain.is_draining();
        if draining && h2 {
            // A stream that arrives while draining still completes; the GOAWAY it triggers
            // covers it.
            conn.goaway.notify_one();
        }
        let guard = active_request(stats);

        let mut response = self.route_and_forward(conn, req, h2, guard).await;

        stats.downstream_rq.record(response.status().as_u16());
        headers::set_server(
            response.headers_mut(),
            &self.server_name,
            self.config.server_header_transformation,
        );
        if draining && !h2 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        *response.version_mut() = version;
        response
    }

    async fn route_and_forward(
        &self,
        conn: &Connection,
        req: Request<Incoming>,
        h2: bool,
        guard: GaugeGuard<Arc<super::HttpStats>>,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = req.into_parts();
        let upgrade = if !h2 && headers::is_upgrade(&parts.headers) {
            parts.headers.get(header::UPGRADE).cloned()
        } else {
            None
        };
        let Some(authority) = authority(&parts) else {
            return LocalReply::BadRequest("missing host header").into_response();
        };
        let authority =
            router::strip_port(&authority, self.config.strip_port, conn.local.port()).to_string();
        if !parts.headers.contains_key(&X_FORWARDED_PROTO) {
            let scheme = if conn.tls { "https" } else { "http" };
            parts
                .headers
                .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
        }
        if self.config.generate_request_id && !parts.headers.contains_key(&X_REQUEST_ID) {
            parts
                .headers
                .insert(X_REQUEST_ID.clone(), headers::request_id());
        }
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".to_string());

        let rc = self.route_config.load_full();
        let view = RequestView {
            method: &parts.method,
            authority: &authority,
            path: &path,
            scheme: "http",
            headers: &parts.headers,
        };
        let selected = router::route(&rc, &view);
        if let Some(kind) = &upgrade {
            let route_upgrades = match selected.map(|s| &s.route.action) {
                Some(Action::Route(a)) => a.upgrades.as_slice(),
                _ => &[],
            };
            let kind = kind.to_str().unwrap_or("");
            if !router::upgrade_allowed(&self.config.upgrades, route_upgrades, kind) {
                return LocalReply::UpgradeFailed.into_response();
            }
        }
        if let Some((filter, own)) = &self.config.local_rate_limit {
            // The most specific configuration wins: route, virtual host, route
            // configuration, then the filter's own.
            let config = selected
                .and_then(|s| {
                    [&s.route.per_filter, &s.virtual_host.per_filter]
                        .into_iter()
                        .find_map(|pf| pf.iter().find(|(k, _)| k == filter))
                })
                .or_else(|| rc.per_filter.iter().find(|(k, _)| k == filter))
                .map(|(_, c)| c)
                .unwrap_or(own);
            match local_ratelimit::decide(config, fastrand::u64(..), fastrand::u64(..)) {
                local_ratelimit::Decision::Pass => {}
                local_ratelimit::Decision::PassUnenforced => {
                    headers::apply(
                        &config.request_headers_when_not_enforced,
                        &mut parts.headers,
                    );
                }
                local_ratelimit::Decision::Limit => {
                    let mut r = LocalReply::RateLimited(config.status).into_response();
                    headers::apply(&config.response_headers, r.headers_mut());
                    return r;
                }
            }
        }
        let Some(selected) = selected else {
            self.stats.no_route.inc();
            return LocalReply::NoRoute.into_response();
        };
        match &selected.route.action {
            Action::DirectResponse(d) => {
                self.stats.rq_direct_response.inc();
                let mut r = LocalReply::DirectResponse(d.status, d.body.clone()).into_response();
                apply_response(&rc, selected, None, &mut r);
                r
            }
            Action::Redirect(redirect) => {
                self.stats.rq_redirect.inc();
                let scheme = parts
                    .headers
                    .get(&X_FORWARDED_PROTO)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("http");
                let location = router::redirect_location(
                    redirect,
                    &selected.route.matcher,
                    &RedirectInput {
                        scheme,
                        authority: &authority,
                        path: &path,
                    },
                );
                let mut r = match HeaderValue::from_str(&location) {
                    Ok(v) => LocalReply::Redirect(redirect.response_code, v).into_response(),
                    Err(_) => LocalReply::BadRequest("invalid redirect location").into_response(),
                };
                apply_response(&rc, selected, None, &mut r);
                r
            }
            Action::Route(action) => {
                // The route's priority picks the cluster's circuit-breaker thresholds.
                let forward = self.forward(
                    &rc,
                    selected,
                    action,
                    Forward {
                        addresses: (conn.remote, conn.local),
                        upgrade: upgrade.map(|kind| {
                            let on = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
                            (kind, on)
                        }),
                        parts,
                        body,
                        authority,
                        path,
                        guard,
                    },
                );
                crate::cluster::circuit_breaker::with_priority(action.priority, forward).await
            }
        }
    }

    async fn forward(
        &self,
        rc: &RouteConfig,
        selected: Selected<'_>,
        action: &RouteAction,
        request: Forward,
    ) -> Response<ResponseBody> {
        let Forward {
            mut parts,
            body,
            authority,
            path,
            guard,
            upgrade,
            addresses,
        } = request;
        let Selected {
            virtual_host,
            route,
        } = selected;
        let (cluster_name, weighted) = match &action.cluster {
            ClusterSpecifier::Cluster(name) => (name.as_str(), None),
            ClusterSpecifier::Weighted {
                clusters,
                total_weight,
            } => match router::pick_weighted(clusters, *total_weight, fastrand::u64(..)) {
                Some(entry) => (entry.name.as_str(), Some(entry)),
                None => ("", None),
            },
        };
        let weighted_response = weighted.map(|w| &w.response_headers);
        let Some(cluster) = self.clusters.get(cluster_name) else {
            self.stats.no_cluster.inc();
            let mut r =
                LocalReply::ClusterNotFound(action.cluster_not_found_response_code).into_response();
            apply_response(rc, selected, weighted_response, &mut r);
            return r;
        };
        self.stats.rq_total.inc();
        // As in Envoy, the route's hash policy runs only for clusters that hash (it may
        // generate a cookie).
        let hashed = if cluster.config().lb_policy.uses_hash() {
            super::hash_policy::compute(&action.hash_policy, &parts, &authority, addresses)
        } else {
            super::hash_policy::Hashed::default()
        };
        let lb = crate::cluster::LbContext { hash: hashed.hash };
        let Some(host) = cluster.choose_host(&lb) else {
            let mut r = LocalReply::NoHealthyUpstream.into_response();
            apply_response(rc, selected, weighted_response, &mut r);
            return r;
        };

        let suppress = self.config.suppress_envoy_headers;
        let rewritten = router::rewrite_path(
            &route.matcher,
            action.prefix_rewrite.as_deref(),
            action.regex_rewrite.as_ref(),
            &path,
        );
        if rewritten.is_some()
            && !suppress
            && let Ok(v) = HeaderValue::from_str(&path)
        {
            parts.headers.insert(X_ENVOY_ORIGINAL_PATH.clone(), v);
        }
        let upstream_path = rewritten.unwrap_or(path);
        headers::apply_levels(
            weighted.map(|w| &w.request_headers).into_iter().chain([
                &route.request_headers,
                &virtual_host.request_headers,
                &rc.request_headers,
            ]),
            &mut parts.headers,
        );
        let upstream_authority = match weighted
            .and_then(|w| w.host_rewrite.as_ref())
            .or(action.host_rewrite.as_ref())
        {
            Some(h) => h.to_str().unwrap_or(&authority).to_string(),
            None => authority,
        };
        headers::remove_hop_by_hop(&mut parts.headers);
        if let Some((kind, _)) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, kind.clone());
        }
        let mirror_parts = parts.clone();
        let upstream_protocol = host.pool.protocol_for(parts.version);
        if let Err(e) = set_target(
            &mut parts,
            upstream_protocol,
            &upstream_authority,
            &upstream_path,
        ) {
            return LocalReply::BadRequest(e).into_response();
        }

        let cluster_stats = cluster.stats();
        if let Some((kind, downstream)) = upgrade {
            if upstream_protocol != UpstreamProtocol::Http1 {
                // WebSocket over HTTP/2 upstreams (extended CONNECT) is not implemented.
                return LocalReply::UpgradeFailed.into_response();
            }
            if !suppress && let Some(t) = action.timeout {
                parts.headers.insert(
                    X_ENVOY_EXPECTED_RQ_TIMEOUT_MS.clone(),
                    HeaderValue::from(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                );
            }
            let deadline = action.timeout.map(|t| Instant::now() + t);
            cluster_stats.upstream_rq_total.inc();
            host.stats.rq_total.inc();
            let started = StdInstant::now();
            let send = host
                .pool
                .send_upgrade(Request::from_parts(parts, RequestBody::Streaming(body)));
            let result = match deadline {
                Some(d) => tokio::time::timeout_at(d, send).await.ok(),
                None => Some(send.await),
            };
            let mut response = match result {
                None => {
                    cluster_stats.upstream_rq_timeout.inc();
                    host.stats.rq_timeout.inc();
                    cluster_stats.upstream_rq.record(504);
                    let mut r = LocalReply::UpstreamTimeout.into_response();
                    apply_response(rc, selected, weighted_response, &mut r);
                    return r;
                }
                Some(Err(e)) => {
                    host.stats.rq_error.inc();
                    cluster_stats.upstream_rq.record(503);
                    let mut r = LocalReply::UpstreamFailure(e).into_response();
                    apply_response(rc, selected, weighted_response, &mut r);
                    return r;
                }
                Some(Ok(r)) => r,
            };
            let status = response.status();
            cluster_stats.upstream_rq.record(status.as_u16());
            if status.is_server_error() {
                host.stats.rq_error.inc();
            } else {
                host.stats.rq_success.inc();
            }
            let guards = RequestGuards {
                downstream: guard,
                cluster: GaugeGuard::new(cluster_stats.clone()),
                host: GaugeGuard::new(host.stats.clone()),
            };
            let upstream_upgrade = (status == http::StatusCode::SWITCHING_PROTOCOLS)
                .then(|| hyper::upgrade::on(&mut response));
            let (mut rparts, incoming) = response.into_parts();
            let upgraded_to = rparts.headers.get(header::UPGRADE).cloned();
            headers::remove_hop_by_hop(&mut rparts.headers);
            hashed.set_cookies(&mut rparts.headers);
            if !suppress {
                rparts.headers.insert(
                    X_ENVOY_UPSTREAM_SERVICE_TIME.clone(),
                    HeaderValue::from(
                        u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    ),
                );
            }
            let mut r = match (upstream_upgrade, downstream) {
                (Some(upstream), Some(downstream)) => {
                    rparts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    rparts
                        .headers
                        .insert(header::UPGRADE, upgraded_to.unwrap_or(kind));
                    tokio::spawn(splice(downstream, upstream, deadline, guards));
                    Response::from_parts(rparts, ResponseBody::Empty)
                }
                _ => {
                    let body = UpstreamBody::new(PoolBody::Hyper(incoming), deadline, guards);
                    Response::from_parts(rparts, ResponseBody::Upstream(Box::new(body)))
                }
            };
            apply_response(rc, selected, weighted_response, &mut r);
            return r;
        }
        let policy = action
            .retry_policy
            .as_ref()
            .or(virtual_host.retry_policy.as_ref())
            .filter(|p| p.num_retries > 0);
        let mirrors: Vec<&MirrorPolicy> = action
            .mirrors
            .iter()
            .filter(|m| router::sampled(m.numerator, m.denominator, fastrand::u64(..)))
            .collect();
        // A request that may be retried or mirrored is buffered first, as Envoy's router does;
        // one whose body exceeds the buffer limit is streamed once, neither retried nor
        // mirrored.
        let (mut streaming, replay, policy) = match (policy, mirrors.is_empty()) {
            (None, true) => (Some(RequestBody::Streaming(body)), None, None),
            _ => match buffer_request(body, RETRY_BUFFER_LIMIT).await {
                Buffered::Complete(data, trailers) => (None, Some((data, trailers)), policy),
                Buffered::TooLarge(prefix, rest) => (
                    Some(RequestBody::Prefixed {
                        prefix: Some(prefix),
                        rest,
                    }),
                    None,
                    None,
                ),
                Buffered::Failed => {
                    return LocalReply::BadRequest("downstream request body failed")
                        .into_response();
                }
            },
        };
        if let Some((data, trailers)) = &replay {
            for m in mirrors {
                let mut mp = mirror_parts.clone();
                if !suppress
                    && let Some(t) =
                        expected_timeout(policy.and_then(|p| p.per_try_timeout), action.timeout)
                {
                    mp.headers.insert(
                        X_ENVOY_EXPECTED_RQ_TIMEOUT_MS.clone(),
                        HeaderValue::from(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                    );
                }
                let authority = if m.keep_host {
                    upstream_authority.clone()
                } else {
                    router::shadow_host(&upstream_authority)
                };
                self.mirror(
                    m,
                    mp,
                    authority,
                    upstream_path.clone(),
                    RequestBody::buffered(data.clone(), trailers.clone()),
                    action.timeout,
                );
            }
        }
        let first_started = Instant::now();
        let deadline = action.timeout.map(|t| first_started + t);
        let mut host = host;
        let mut retries_done: u32 = 0;
        let mut retry_permit = None;
        let (upstream, host, started) = loop {
            let per_try = policy.and_then(|p| p.per_try_timeout);
            let now = Instant::now();
            let per_try_deadline = per_try.map(|t| now + t);
            let try_deadline = match (deadline, per_try_deadline) {
                (Some(d), Some(p)) => Some(d.min(p)),
                (d, p) => d.or(p),
            };
            let mut try_parts = parts.clone();
            if !suppress {
                // Envoy's expected timeout: the per-try timeout if set, else what is left of
                // the route timeout (elapsed time counts only on retries).
                let elapsed = if retries_done == 0 {
                    std::time::Duration::ZERO
                } else {
                    now - first_started
                };
                let remaining = action.timeout.map(|t| t.saturating_sub(elapsed));
                if let Some(t) = expected_timeout(per_try, remaining) {
                    try_parts.headers.insert(
                        X_ENVOY_EXPECTED_RQ_TIMEOUT_MS.clone(),
                        HeaderValue::from(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                    );
                }
            }
            let body = match &replay {
                Some((data, trailers)) => RequestBody::buffered(data.clone(), trailers.clone()),
                None => match streaming.take() {
                    Some(b) => b,
                    None => RequestBody::buffered(bytes::Bytes::new(), None),
                },
            };
            // The pool counts `upstream_rq_total` once the request is admitted.
            let started = StdInstant::now();
            let send = host.pool.send(Request::from_parts(try_parts, body));
            let result = match try_deadline {
                Some(d) => tokio::time::timeout_at(d, send).await.ok(),
                None => Some(send.await),
            };
            // The previous retry's circuit-breaker permit is held until this decision.
            drop(retry_permit.take());
            if let Some(Err(UpstreamError::Overflow)) = &result {
                // A circuit breaker refused the try: never retried, not held against the host.
                cluster_stats.upstream_rq.record(503);
                let mut r = LocalReply::Overloaded { header: !suppress }.into_response();
                apply_response(rc, selected, weighted_response, &mut r);
                return r;
            }
            let reported = match &result {
                None => Some(OutlierOutcome::Timeout),
                Some(Err(e)) => OutlierOutcome::of_error(e),
                Some(Ok(r)) => Some(OutlierOutcome::Response(r.response.status().as_u16())),
            };
            if let Some(o) = reported {
                cluster.report_outcome(&host, o);
            }
            let per_try_fired = result.is_none()
                && per_try_deadline.is_some_and(|p| deadline.is_none_or(|d| p < d));
            let outcome = match &result {
                None if per_try_fired => Some(TryOutcome::PerTryTimeout),
                None => None, // the route timeout: never retried
                Some(Err(e)) => Some(TryOutcome::from_error(e)),
                Some(Ok(r)) => Some(TryOutcome::Response(r.response.status())),
            };
            let headers = match &result {
                Some(Ok(r)) => Some(r.response.headers()),
                _ => None,
            };
            let retriable = match (policy, outcome) {
                (Some(p), Some(o)) => retry::should_retry(p, o, headers),
                _ => false,
            };
            let can_retry = policy.is_some_and(|p| retries_done < p.num_retries);
            if retriable && !can_retry {
                cluster_stats.upstream_rq_retry_limit_exceeded.inc();
            }
            // `max_retries` / `retry_budget`: a retry the breaker refuses is not made.
            let retry_overflow = retriable
                && can_retry
                && match cluster.breakers() {
                    Some(b) => match b.try_acquire(BreakerKind::Retries) {
                        Some(p) => {
                            retry_permit = Some(p);
                            false
                        }
                        None => {
                            cluster_stats.upstream_rq_retry_overflow.inc();
                            true
                        }
                    },
                    None => false,
                };
            if !(retriable && can_retry) || retry_overflow {
                if retries_done > 0 && !retriable {
                    cluster_stats.upstream_rq_retry_success.inc();
                }
                match result {
                    None if per_try_fired => {
                        cluster_stats.upstream_rq_per_try_timeout.inc();
                        host.stats.rq_timeout.inc();
                        cluster_stats.upstream_rq.record(504);
                        let mut r = LocalReply::UpstreamTimeout.into_response();
                        apply_response(rc, selected, weighted_response, &mut r);
                        return r;
                    }
                    None => {
                        cluster_stats.upstream_rq_timeout.inc();
                        host.stats.rq_timeout.inc();
                        cluster_stats.upstream_rq.record(504);
                        let mut r = LocalReply::UpstreamTimeout.into_response();
                        apply_response(rc, selected, weighted_response, &mut r);
                        return r;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(cluster = %cluster.name(), host = %host.address, error = %e, "upstream request failed");
                        host.stats.rq_error.inc();
                        cluster_stats.upstream_rq.record(503);
                        let mut r = LocalReply::UpstreamFailure(e).into_response();
                        apply_response(rc, selected, weighted_response, &mut r);
                        return r;
                    }
                    Some(Ok(r)) => break (r, host, started),
                }
            }
            // Retry: the failed try is abandoned (an HTTP/1.1 connection with an unread
            // response closes), then back off and let the load balancer pick again.
            match result {
                None => {
                    cluster_stats.upstream_rq_per_try_timeout.inc();
                    host.stats.rq_timeout.inc();
                }
                Some(Err(e)) => {
                    tracing::debug!(cluster = %cluster.name(), host = %host.address, error = %e, "upstream try failed; retrying");
                    host.stats.rq_error.inc();
                }
                Some(Ok(r)) => {
                    host.stats.rq_error.inc();
                    drop(r);
                }
            }
            retries_done += 1;
            cluster_stats.upstream_rq_retry.inc();
            let Some(p) = policy else { unreachable_retry() };
            let wait = retry::backoff(
                p.base_interval,
                p.max_interval,
                retries_done,
                fastrand::u64(..),
            );
            let wake = Instant::now() + wait;
            if let Some(d) = deadline
                && wake >= d
            {
                tokio::time::sleep_until(d).await;
                cluster_stats.upstream_rq_timeout.inc();
                cluster_stats.upstream_rq.record(504);
                let mut r = LocalReply::UpstreamTimeout.into_response();
                apply_response(rc, selected, weighted_response, &mut r);
                return r;
            }
            tokio::time::sleep_until(wake).await;
            host = match cluster.choose_host(&lb) {
                Some(h) => h,
                None => {
                    let mut r = LocalReply::NoHealthyUpstream.into_response();
                    apply_response(rc, selected, weighted_response, &mut r);
                    return r;
                }
            };
        };
        let guards = RequestGuards {
            downstream: guard,
            cluster: GaugeGuard::new(cluster_stats.clone()),
            host: GaugeGuard::new(host.stats.clone()),
        };
        let PoolResponse { response } = upstream;
        let status = response.status();
        cluster_stats.upstream_rq.record(status.as_u16());
        if status.is_server_error() {
            host.stats.rq_error.inc();
        } else {
            host.stats.rq_success.inc();
        }
        let (mut rparts, incoming) = response.into_parts();
        headers::remove_hop_by_hop(&mut rparts.headers);
        hashed.set_cookies(&mut rparts.headers);
        if !suppress {
            rparts.headers.insert(
                X_ENVOY_UPSTREAM_SERVICE_TIME.clone(),
                HeaderValue::from(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
            );
        }
        let body = UpstreamBody::new(incoming, deadline, guards);
        let mut r = Response::from_parts(rparts, ResponseBody::Upstream(Box::new(body)));
        apply_response(rc, selected, weighted_response, &mut r);
        r
    }
}

impl HttpConnectionManager {
    /// Sends a fire-and-forget copy of a request to a mirror policy's cluster; the response is
    /// read and discarded and never affects the main request.
    fn mirror(
        &self,
        policy: &MirrorPolicy,
        mut parts: Parts,
        authority: String,
        path: String,
        body: RequestBody,
        timeout: Option<std::time::Duration>,
    ) {
        let Some(cluster) = self.clusters.get(&policy.cluster) else {
            tracing::debug!(cluster = %policy.cluster, "mirror cluster not found");
            return;
        };
        tokio::spawn(async move {
            let Some(host) = cluster.choose_host(&crate::cluster::LbContext::default()) else {
                return;
            };
            let protocol = host.pool.protocol_for(parts.version);
            if set_target(&mut parts, protocol, &authority, &path).is_err() {
                return;
            }
            let stats = cluster.stats().clone();
            let _active = GaugeGuard::new(stats.clone());
            let exchange = async {
                match host.pool.send(Request::from_parts(parts, body)).await {
                    Ok(PoolResponse { response }) => {
                        let status = response.status().as_u16();
                        stats.upstream_rq.record(status);
                        if status >= 500 {
                            host.stats.rq_error.inc();
                        } else {
                            host.stats.rq_success.inc();
                        }
                        let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                    }
                    Err(e) => {
                        tracing::debug!(cluster = %cluster.name(), error = %e, "mirror request failed");
                        host.stats.rq_error.inc();
                        stats.upstream_rq.record(503);
                    }
                }
            };
            match timeout {
                Some(t) => {
                    if tokio::time::timeout(t, exchange).await.is_err() {
                        stats.upstream_rq_timeout.inc();
                        host.stats.rq_timeout.inc();
                    }
                }
                None => exchange.await,
            }
        });
    }
}

/// Joins an upgraded downstream connection to its upstream once both sides switched, until
/// either closes or the route timeout (which covers the whole upgraded stream, as in Envoy)
/// elapses.
async fn splice(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    deadline: Option<Instant>,
    guards: RequestGuards,
) {
    let (down, up) = tokio::join!(downstream, upstream);
    let (Ok(down), Ok(up)) = (down, up) else {
        return;
    };
    let mut down = hyper_util::rt::TokioIo::new(down);
    let mut up = hyper_util::rt::TokioIo::new(up);
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    match deadline {
        Some(d) => {
            if tokio::time::timeout_at(d, copy).await.is_err() {
                guards.cluster.inner().upstream_rq_timeout.inc();
            }
        }
        None => {
            let _ = copy.await;
        }
    }
    drop(guards);
}

/// Envoy's `x-envoy-expected-rq-timeout-ms`: the per-try timeout, capped by what is left of
/// the route timeout.
fn expected_timeout(
    per_try: Option<std::time::Duration>,
    remaining: Option<std::time::Duration>,
) -> Option<std::time::Duration> {
    match (per_try, remaining) {
        (Some(p), Some(r)) => Some(p.min(r)),
        (p, r) => p.or(r),
    }
}

/// Points a request at an upstream: origin-form URI and `Host` for HTTP/1.1, absolute URI
/// (`:authority`) for HTTP/2.
fn set_target(
    parts: &mut Parts,
    protocol: UpstreamProtocol,
    authority: &str,
    path: &str,
) -> Result<(), &'static str> {
    let uri = match protocol {
        // A pool answers `Auto` / `UseDownstream` only as the protocol a request gets
        // (`Pool::protocol_for`); never reached with them.
        UpstreamProtocol::Http1 | UpstreamProtocol::Auto | UpstreamProtocol::UseDownstream => {
            parts.version = Version::HTTP_11;
            let h = HeaderValue::from_str(authority).map_err(|_| "invalid host")?;
            parts.headers.insert(header::HOST, h);
            path.parse::<Uri>()
        }
        UpstreamProtocol::Http2 => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            format!("http://{authority}{path}").parse::<Uri>()
        }
    };
    parts.uri = uri.map_err(|_| "invalid path")?;
    Ok(())
}

/// Envoy's default connection buffer limit: a request body larger than this is not retried.
pub const RETRY_BUFFER_LIMIT: usize = 1024 * 1024;

/// Only reached if a retry was decided without a policy, which `can_retry` rules out.
fn unreachable_retry() -> ! {
    unreachable!("retry without a retry policy")
}

/// A request on its way upstream.
struct Forward {
    /// An allowed HTTP/1.1 upgrade: the `Upgrade` value and the downstream connection's
    /// upgrade handle.
    upgrade: Option<(HeaderValue, Option<hyper::upgrade::OnUpgrade>)>,
    parts: Parts,
    body: Incoming,
    authority: String,
    path: String,
    guard: GaugeGuard<Arc<super::HttpStats>>,
    /// The downstream connection's (remote, local) addresses, for hash policies.
    addresses: (std::net::SocketAddr, std::net::SocketAddr),
}

/// Response header mutations from the most specific level out (weighted cluster, route,
/// virtual host, route configuration).
fn apply_response(
    rc: &RouteConfig,
    selected: Selected<'_>,
    weighted: Option<&HeaderMutations>,
    response: &mut Response<ResponseBody>,
) {
    headers::apply_levels(
        weighted.into_iter().chain([
            &selected.route.response_headers,
            &selected.virtual_host.response_headers,
            &rc.response_headers,
        ]),
        response.headers_mut(),
    );
}

/// `:authority` for HTTP/2 and absolute-form requests, else `Host`.
fn authority(parts: &Parts) -> Option<String> {
    if let Some(a) = parts.uri.authority() {
        return Some(a.as_str().to_string());
    }
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}
