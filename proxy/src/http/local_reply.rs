//! Every response the proxy makes up itself, in one place: Envoy's status codes, bodies and
//! response flags for local failures, plus direct responses and redirects.
//!
//! The connection manager turns each failure into a [`LocalReply`] and nothing else writes an
//! error response, so codes and bodies stay consistent with Envoy's.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::body::ResponseBody;
use crate::cluster::pool::UpstreamError;

#[derive(Debug)]
pub enum LocalReply {
    /// No virtual host or route matched (`NR`): 404 with an empty body.
    NoRoute,
    /// The route's cluster does not exist (`NC`).
    ClusterNotFound(StatusCode),
    /// The cluster has no host to send to (`UH`).
    NoHealthyUpstream,
    /// The route timeout elapsed before the response headers (`UT`).
    UpstreamTimeout,
    /// Connecting failed or the connection was reset before response headers (`UF`, `UC`).
    UpstreamFailure(UpstreamError),
    /// An HTTP/1.1 upgrade with no upgrade configured for it.
    UpgradeFailed,
    /// A request the proxy cannot route at all (no `Host`).
    BadRequest(&'static str),
    DirectResponse(StatusCode, Option<Bytes>),
    Redirect(StatusCode, HeaderValue),
    /// The local rate limit filter found its bucket empty (`RL`); its configured status.
    RateLimited(StatusCode),
    /// A circuit breaker refused the request (`UO`): 503, with `x-envoy-overloaded: true`
    /// unless the router suppresses Envoy's headers (`header: false`).
    Overloaded {
        header: bool,
    },
}

impl LocalReply {
    /// Envoy's response flag, for access logs.
    pub fn response_flag(&self) -> &'static str {
        match self {
            LocalReply::NoRoute => "NR",
            LocalReply::ClusterNotFound(_) => "NC",
            LocalReply::NoHealthyUpstream => "UH",
            LocalReply::UpstreamTimeout => "UT",
            LocalReply::UpstreamFailure(UpstreamError::Reset(_)) => "UC",
            LocalReply::UpstreamFailure(_) => "UF",
            LocalReply::UpgradeFailed | LocalReply::BadRequest(_) => "DPE",
            LocalReply::DirectResponse(..) | LocalReply::Redirect(..) => "-",
            LocalReply::RateLimited(_) => "RL",
            LocalReply::Overloaded { .. } => "UO",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            LocalReply::NoRoute => StatusCode::NOT_FOUND,
            LocalReply::ClusterNotFound(code) => *code,
            LocalReply::NoHealthyUpstream
            | LocalReply::UpstreamFailure(_)
            | LocalReply::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            LocalReply::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            LocalReply::UpgradeFailed => StatusCode::FORBIDDEN,
            LocalReply::BadRequest(_) => StatusCode::BAD_REQUEST,
            LocalReply::DirectResponse(code, _)
            | LocalReply::Redirect(code, _)
            | LocalReply::RateLimited(code) => *code,
        }
    }

    fn body(&self) -> Option<Bytes> {
        match self {
            LocalReply::NoRoute
            | LocalReply::ClusterNotFound(_)
            | LocalReply::UpgradeFailed
            | LocalReply::Redirect(..) => None,
            LocalReply::NoHealthyUpstream => Some(Bytes::from_static(b"no healthy upstream")),
            LocalReply::UpstreamTimeout => Some(Bytes::from_static(b"upstream request timeout")),
            LocalReply::UpstreamFailure(e) => Some(Bytes::from(format!(
                "upstream connect error or disconnect/reset before headers. reset reason: {e}"
            ))),
            LocalReply::BadRequest(reason) => Some(Bytes::from_static(reason.as_bytes())),
            LocalReply::DirectResponse(_, body) => body.clone(),
            LocalReply::RateLimited(_) => Some(Bytes::from_static(b"local_rate_limited")),
            LocalReply::Overloaded { .. } => Some(Bytes::from_static(
                b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
            )),
        }
    }

    pub fn into_response(self) -> Response<ResponseBody> {
        let status = self.status();
        let body = self.body();
        let mut builder = Response::builder().status(status);
        if let LocalReply::Overloaded { header: true } = &self {
            builder = builder.header("x-envoy-overloaded", "true");
        }
        if let LocalReply::Redirect(_, location) = &self {
            builder = builder.header(header::LOCATION, location.clone());
        }
        let body = match body {
            Some(b) if !b.is_empty() => {
                builder = builder.header(header::CONTENT_TYPE, "text/plain");
                ResponseBody::full(b)
            }
            _ => ResponseBody::Empty,
        };
        builder.body(body).unwrap_or_else(|_| {
            // Only reachable with an invalid header, which the types above rule out.
            let mut r = Response::new(ResponseBody::Empty);
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Body as _;

    #[test]
    fn local_replies_use_envoy_codes_and_bodies() {
        let r = LocalReply::NoRoute.into_response();
        assert_eq!(r.status(), 404);
        assert!(r.body().is_end_stream());
        assert!(r.headers().get(header::CONTENT_TYPE).is_none());

        let r = LocalReply::NoHealthyUpstream.into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.body().size_hint().exact(), Some(19));
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain");

        let r = LocalReply::UpstreamTimeout.into_response();
        assert_eq!(r.status(), 504);
        assert_eq!(LocalReply::UpstreamTimeout.response_flag(), "UT");

        let r = LocalReply::Redirect(StatusCode::FOUND, HeaderValue::from_static("http://x/"))
            .into_response();
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()[header::LOCATION], "http://x/");
    }
}
