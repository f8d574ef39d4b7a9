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

use super::body::{RequestGuards, ResponseBody, UpstreamBody};
use super::headers::{
    self, X_ENVOY_EXPECTED_RQ_TIMEOUT_MS, X_ENVOY_ORIGINAL_PATH, X_ENVOY_UPSTREAM_SERVICE_TIME,
    X_FORWARDED_PROTO, X_REQUEST_ID,
};
use super::local_reply::LocalReply;
use super::router::{self, RedirectInput, RequestView, Selected};
use super::{Connection, HttpConnectionManager, active_request};
use crate::cluster::pool::PoolResponse;
use crate::config::cluster::UpstreamProtocol;
use crate::config::route::{Action, ClusterSpecifier, HeaderMutations, RouteAction, RouteConfig};
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
        if !h2 && headers::is_upgrade(&parts.headers) {
            return LocalReply::UpgradeFailed.into_response();
        }
        let Some(authority) = authority(&parts) else {
            return LocalReply::BadRequest("missing host header").into_response();
        };
        let authority =
            router::strip_port(&authority, self.config.strip_port, conn.local.port()).to_string();
        if !parts.headers.contains_key(&X_FORWARDED_PROTO) {
            parts
                .headers
                .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
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
        let Some(selected) = router::route(&rc, &view) else {
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
                self.forward(
                    &rc,
                    selected,
                    action,
                    Forward {
                        parts,
                        body,
                        authority,
                        path,
                        guard,
                    },
                )
                .await
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
        let Some(host) = cluster.choose_host() else {
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
        if let Some(t) = action.timeout
            && !suppress
        {
            parts.headers.insert(
                X_ENVOY_EXPECTED_RQ_TIMEOUT_MS.clone(),
                HeaderValue::from(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            );
        }
        let uri = match host.pool.protocol() {
            UpstreamProtocol::Http1 => {
                parts.version = Version::HTTP_11;
                match HeaderValue::from_str(&upstream_authority) {
                    Ok(h) => {
                        parts.headers.insert(header::HOST, h);
                    }
                    Err(_) => return LocalReply::BadRequest("invalid host").into_response(),
                }
                upstream_path.parse::<Uri>()
            }
            UpstreamProtocol::Http2 => {
                parts.version = Version::HTTP_2;
                parts.headers.remove(header::HOST);
                format!("http://{upstream_authority}{upstream_path}").parse::<Uri>()
            }
        };
        parts.uri = match uri {
            Ok(u) => u,
            Err(_) => return LocalReply::BadRequest("invalid path").into_response(),
        };

        let cluster_stats = cluster.stats();
        cluster_stats.upstream_rq_total.inc();
        host.stats.rq_total.inc();
        let guards = RequestGuards {
            downstream: guard,
            cluster: GaugeGuard::new(cluster_stats.clone()),
            host: GaugeGuard::new(host.stats.clone()),
        };
        let started = StdInstant::now();
        let deadline = action.timeout.map(|t| Instant::now() + t);
        let send = host.pool.send(Request::from_parts(parts, body));
        let result = match deadline {
            Some(d) => tokio::time::timeout_at(d, send).await.ok(),
            None => Some(send.await),
        };
        let upstream = match result {
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
            Some(Ok(r)) => r,
        };
        let PoolResponse {
            response,
            connection,
        } = upstream;
        let status = response.status();
        cluster_stats.upstream_rq.record(status.as_u16());
        if status.is_server_error() {
            host.stats.rq_error.inc();
        } else {
            host.stats.rq_success.inc();
        }
        let (mut rparts, incoming) = response.into_parts();
        headers::remove_hop_by_hop(&mut rparts.headers);
        if !suppress {
            rparts.headers.insert(
                X_ENVOY_UPSTREAM_SERVICE_TIME.clone(),
                HeaderValue::from(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
            );
        }
        let body = UpstreamBody::new(incoming, connection, deadline, guards);
        let mut r = Response::from_parts(rparts, ResponseBody::Upstream(Box::new(body)));
        apply_response(rc, selected, weighted_response, &mut r);
        r
    }
}

/// A request on its way upstream.
struct Forward {
    parts: Parts,
    body: Incoming,
    authority: String,
    path: String,
    guard: GaugeGuard<Arc<super::HttpStats>>,
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
