//! What the agents of a cluster's runners ask the server, on the API listener: their
//! runner's spec, its code by digest, and their reports. Each agent authenticates with
//! its runner's own token (`Authorization: Bearer …`), which gives it that runner and
//! nothing else; a token stops working when its runner has ended.

use std::sync::Arc;

use api::error::{ApiError, ErrorCode};
use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use model::records::{ExecInput, ExecOutput};
use supervisor::remote::{AgentReport, Agents, CODE_PATH, REPORT_PATH, Remote, SPEC_PATH};
use supervisor::remote_exec::{EXEC_PATH, EXECS_PATH, ExecControl, STDERR, STDOUT, control};
use tokio::sync::mpsc;

/// How long an agent's ask for commands waits for one before it is answered with none.
const ORDERS_WITHIN: std::time::Duration = std::time::Duration::from_secs(20);

/// The largest report an agent may send (a batch of output lines).
const MAX_REPORT_BYTES: usize = 8 << 20;

/// The agents' routes; `closing` is the server's shutdown, which ends agents' waits
/// for commands at once (they would hold its graceful stop up).
pub(crate) fn routes(agents: Arc<Agents>, closing: tokio_util::sync::CancellationToken) -> Router {
    Router::new()
        .route(SPEC_PATH, axum::routing::get(spec))
        .route(CODE_PATH, axum::routing::get(code))
        .route(REPORT_PATH, axum::routing::post(report).layer(DefaultBodyLimit::max(MAX_REPORT_BYTES)))
        .route(EXECS_PATH, axum::routing::get(exec_orders).layer(axum::Extension(closing)))
        .route(&format!("{EXEC_PATH}{{session}}"), axum::routing::get(exec_socket))
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

/// The commands the agent's runner has to run (`runners exec`): answered as soon as there
/// is one, or empty after a while.
async fn exec_orders(
    State(agents): State<Arc<Agents>>,
    axum::Extension(closing): axum::Extension<tokio_util::sync::CancellationToken>,
    headers: HeaderMap,
) -> Response {
    let Some(remote) = remote(&agents, &headers) else { return refused() };
    let orders = tokio::select! {
        orders = remote.execs.next_orders(ORDERS_WITHIN) => orders,
        () = closing.cancelled() => Vec::new(),
    };
    axum::Json(orders).into_response()
}

/// The agent's socket for one command, joined to the client's session.
async fn exec_socket(
    State(agents): State<Arc<Agents>>,
    headers: HeaderMap,
    Path(session): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Some(remote) = remote(&agents, &headers) else { return refused() };
    let Some((input, output)) = remote.execs.take(&session) else {
        return ApiError::new(ErrorCode::NotFound, "no command waits under this session").into_response();
    };
    upgrade.on_upgrade(move |socket| join_agent(socket, input, output))
}

/// Carries the client's input to the agent and the agent's output back, until the
/// command's end; closing the socket when the client has gone ends the command.
async fn join_agent(socket: WebSocket, mut input: mpsc::Receiver<ExecInput>, output: mpsc::Sender<ExecOutput>) {
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            message = input.recv() => {
                let message = match message {
                    Some(ExecInput::Stdin(bytes)) => Message::Binary(bytes.into()),
                    Some(ExecInput::Eof) => Message::Text(control(&ExecControl::Eof).into()),
                    Some(ExecInput::Resize(size)) => {
                        Message::Text(control(&ExecControl::Resize { rows: size.rows, cols: size.cols }).into())
                    }
                    None => {
                        let _ = sink.send(Message::Close(None)).await;
                        return;
                    }
                };
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            message = stream.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    let out = match bytes.split_first() {
                        Some((&STDOUT, rest)) => ExecOutput::Stdout(rest.to_vec()),
                        Some((&STDERR, rest)) => ExecOutput::Stderr(rest.to_vec()),
                        _ => continue,
                    };
                    let _ = output.send(out).await;
                }
                Some(Ok(Message::Text(text))) => {
                    if let Ok(ExecControl::Exit { code }) = serde_json::from_str(&text) {
                        let _ = output.send(ExecOutput::Exited(code)).await;
                        // The agent closes next; its close is answered as the socket goes.
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                            while let Some(Ok(_)) = stream.next().await {}
                        })
                        .await;
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    let lost = "the connection to the runner's agent broke before the command ended\n";
    let _ = output.send(ExecOutput::Stderr(lost.as_bytes().to_vec())).await;
    let _ = output.send(ExecOutput::Exited(255)).await;
}
