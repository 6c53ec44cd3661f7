//! What the agents of a cluster's runners ask the server, on the API listener: their
//! runner's spec, its code by digest, and their reports. Each agent authenticates with
//! its runner's own token (`Authorization: Bearer …`), which gives it that runner and
//! nothing else; a token stops working when its runner has ended.

use std::sync::Arc;

use api::error::{ApiError, ErrorCode};
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use supervisor::remote::{AgentReport, Agents, CODE_PATH, REPORT_PATH, Remote, SPEC_PATH};

/// The largest report an agent may send (a batch of output lines).
const MAX_REPORT_BYTES: usize = 8 << 20;

pub(crate) fn routes(agents: Arc<Agents>) -> Router {
    Router::new()
        .route(SPEC_PATH, axum::routing::get(spec))
        .route(CODE_PATH, axum::routing::get(code))
        .route(REPORT_PATH, axum::routing::post(report).layer(DefaultBodyLimit::max(MAX_REPORT_BYTES)))
        .with_state(agents)
}

/// The token in the request's `Authorization: Bearer` header.
fn token(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

fn refused() -> Response {
    ApiError::new(ErrorCode::Unauthorized, "no runner has this agent token (it may have ended)").into_response()
}

fn remote(agents: &Agents, headers: &HeaderMap) -> Option<Arc<Remote>> {
    token(headers).and_then(|t| agents.find(t))
}

async fn spec(State(agents): State<Arc<Agents>>, headers: HeaderMap) -> Response {
    match remote(&agents, &headers) {
        Some(remote) => axum::Json(remote.spec.clone()).into_response(),
        None => refused(),
    }
}

async fn code(State(agents): State<Arc<Agents>>, headers: HeaderMap) -> Response {
    let Some(remote) = remote(&agents, &headers) else { return refused() };
    match tokio::fs::File::open(&remote.archive).await {
        Ok(file) => {
            let length = file.metadata().await.map(|m| m.len()).ok();
            let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/gzip"));
            if let Some(length) = length {
                headers.insert(header::CONTENT_LENGTH, length.into());
            }
            if let Ok(digest) = header::HeaderValue::from_str(&remote.spec.digest) {
                headers.insert("x-hangar-digest", digest);
            }
            response
        }
        Err(e) => {
            tracing::error!(archive = %remote.archive.display(), error = %e, "cannot open a revision's packed code");
            ApiError::new(ErrorCode::Internal, "the revision's code cannot be read").into_response()
        }
    }
}

async fn report(State(agents): State<Arc<Agents>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let Some(token) = token(&headers) else { return refused() };
    let report: AgentReport = match serde_json::from_slice(&body) {
        Ok(report) => report,
        Err(e) => return ApiError::new(ErrorCode::InvalidRequest, format!("not a valid report: {e}")).into_response(),
    };
    if agents.report(token, report) { StatusCode::NO_CONTENT.into_response() } else { refused() }
}
