//! Calls for an app that another server runs, where servers share one store: they go,
//! as they came (the caller's key included), to that server's gateway, over the same
//! per-thread keep-alive pool as calls to runners. A forwarded call carries
//! [`FORWARDED_HEADER`], and is never forwarded again: servers that disagree for a
//! moment about who runs an app answer rather than pass a call back and forth.

use std::net::SocketAddr;
use std::sync::Arc;

use api::error::{ApiError, ErrorCode};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{
    self,
    header::{self, HeaderValue},
};
use axum::response::{IntoResponse, Response};

/// Set on a call one server passes to another; its value is the sender's id.
pub const FORWARDED_HEADER: &str = "x-hangar-forwarded";

/// Where another server runs an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elsewhere {
    pub server: String,
    pub api: SocketAddr,
    pub gateway: SocketAddr,
}

/// Where an app that this server does not run is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// Another server runs it.
    Elsewhere(Arc<Elsewhere>),
    /// No server runs it at the moment: the one that did has gone, and another is
    /// about to take it over.
    Nowhere,
}

/// Says which server runs an app that this one does not.
pub trait Locator: Send + Sync + 'static {
    /// Where `team/app` runs, if it is an app this server knows of and does not run.
    fn locate(&self, team_and_app: &str) -> Option<Located>;
    /// This server's id, sent along with what it forwards.
    fn me(&self) -> &str;
}

/// Whether `request` was forwarded to this server by another.
pub fn was_forwarded(request: &Request) -> bool {
    request.headers().contains_key(FORWARDED_HEADER)
}

/// The answer to a call for an app that no server runs at the moment.
pub fn nowhere(team_and_app: &str) -> Response {
    ApiError::new(
        ErrorCode::OwnerUnavailable,
        format!("app {team_and_app} is being taken over by another server (its last one stopped); try again shortly"),
    )
    .into_response()
}

/// Sends `request` to the server at `to` as it is (its path, query, headers and
/// streaming body), and answers what that server answers. A server that cannot be
/// reached is a 503 `owner_unavailable`: it has died, and another server takes its apps
/// over within the lease time.
pub async fn forward(to: SocketAddr, server: &str, me: &str, request: Request) -> Response {
    match try_forward(to, server, me, request).await {
        Ok(response) => response,
        Err((_, unavailable)) => unavailable,
    }
}

/// [`forward`], but a server that cannot be reached gives the request back (nothing of
/// it was sent) along with the answer that says so, so that it can be sent elsewhere.
pub(crate) async fn try_forward(
    to: SocketAddr,
    server: &str,
    me: &str,
    request: Request,
) -> Result<Response, (Request, Response)> {
    let endpoint = netns::Endpoint::host(to);
    let upstream = match crate::upstream::connect(&endpoint).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::debug!(server, %to, error = %e, "cannot reach the server running an app");
            return Err((request, unreachable(to, server, &e)));
        }
    };
    Ok(send(upstream, to, server, me, request).await)
}

fn unreachable(to: SocketAddr, server: &str, e: &dyn std::fmt::Display) -> Response {
    ApiError::new(
        ErrorCode::OwnerUnavailable,
        format!(
            "server {server} ({to}), which runs this app, does not answer ({e}); another server takes the app over \
             once its lease runs out"
        ),
    )
    .into_response()
}

async fn send(
    upstream: crate::upstream::Upstream,
    to: SocketAddr,
    server: &str,
    me: &str,
    request: Request,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = http::Uri::try_from(path) else {
        return ApiError::new(ErrorCode::InvalidRequest, format!("invalid path {path:?}")).into_response();
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    for name in [header::CONNECTION, header::TE, header::TRAILER, header::UPGRADE, header::PROXY_AUTHORIZATION] {
        parts.headers.remove(name);
    }
    // The host the caller named stays: the URLs the owner hands out (a queue request's
    // status URL, say) then lead back through the server the caller chose.
    if !parts.headers.contains_key(header::HOST)
        && let Ok(host) = HeaderValue::from_str(&to.to_string())
    {
        parts.headers.insert(header::HOST, host);
    }
    if let Ok(me) = HeaderValue::from_str(me) {
        parts.headers.insert(FORWARDED_HEADER, me);
    }
    match crate::upstream::send_on(upstream, http::Request::from_parts(parts, body)).await {
        Ok(response) => response.map(Body::new),
        Err(e) => {
            tracing::debug!(server, %to, error = %e, "cannot forward a call");
            unreachable(to, server, &e)
        }
    }
}
