//! The queue's HTTP face, on the gateway's listener, shaped the way `fal_client`
//! expects it:
//!
//! - `POST /queue/{team}/{app}[/path][?fal_webhook=URL]` → 202 with `request_id`,
//!   `status_url`, `response_url`, `cancel_url` (and `queue_position`);
//! - `GET …/requests/{id}/status[?logs=1]` → `IN_QUEUE` with `queue_position`,
//!   `IN_PROGRESS`, or `COMPLETED` with `metrics`, `error` and `error_type`; `logs` is
//!   always there, a list when asked for, else null;
//! - `GET …/requests/{id}/status/stream[?logs=1]` → the same as server-sent events, one
//!   per change, ending with `COMPLETED`;
//! - `GET …/requests/{id}` → the result, with the status and body the app answered;
//! - `PUT …/requests/{id}/cancel` → 202 `CANCELLATION_REQUESTED`, 400 when completed.
//!
//! `…` is `/queue/{team}/{app}`, without the path the request was submitted to. Every
//! route checks the caller's key against the app's auth mode, as a sync call would.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use api::error::{ApiError, ErrorCode};
use axum::body::Body;
use axum::extract::Request;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use gateway::AppRoute;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use model::records::QueueRequest;
use model::revision::QueueState;
use serde_json::{Value, json};
use store::{CancelOutcome, NewQueueRequest};
use uuid::Uuid;

use crate::{LogEntry, Queue};

/// Query parameters that are the queue's, not the app's.
const WEBHOOK_PARAMS: &[&str] = &["fal_webhook", "webhook"];

/// Where a request's URLs start: `{scheme}://{host}/queue/{team}/{app}`.
struct Base {
    url: String,
    /// `team/app`, as the gateway names the route.
    route: String,
}

impl Base {
    fn request_url(&self, id: Uuid) -> String {
        format!("{}/requests/{id}", self.url)
    }
}

impl Queue {
    pub(crate) async fn answer(self: Arc<Self>, request: Request, secure: bool) -> Response {
        let mut response = match self.dispatch(request, secure).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }

    async fn dispatch(self: &Arc<Self>, request: Request, secure: bool) -> Result<Response, ApiError> {
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches("/queue/").split('/').collect();
        let (team, app, tail) = match segments.as_slice() {
            [team, app, tail @ ..] if !team.is_empty() && !app.is_empty() => (*team, *app, tail),
            _ => return Err(ApiError::new(ErrorCode::NotFound, "submit to the queue at /queue/{team}/{app}[/path]")),
        };
        let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
        let scheme = if secure { "https" } else { "http" };
        let base = Base { url: format!("{scheme}://{host}/queue/{team}/{app}"), route: format!("{team}/{app}") };
        let route = self.authorized_route(&base, request.headers()).await?;
        let logs = wants_logs(request.uri().query());
        match (request.method().clone(), tail) {
            (Method::POST, _) => self.submit(&base, &route, request, &tail.join("/")).await,
            (Method::GET, ["requests", id]) => self.result(&base, id).await,
            (Method::GET, ["requests", id, "status"]) => {
                let found = self.find(&base, id).await?;
                Ok(axum::Json(self.status(&base, &found, logs).await?).into_response())
            }
            (Method::GET, ["requests", id, "status", "stream"]) => self.stream(base, id, logs).await,
            (Method::PUT, ["requests", id, "cancel"]) => self.cancel(&base, id).await,
            (_, ["requests", ..]) => Err(ApiError::new(
                ErrorCode::NotFound,
                "a queue request has GET …/requests/{id}, GET …/status, GET …/status/stream and PUT …/cancel",
            )),
            _ => Err(ApiError::new(ErrorCode::NotFound, "submit to the queue with POST /queue/{team}/{app}[/path]")),
        }
    }

    async fn authorized_route(&self, base: &Base, headers: &HeaderMap) -> Result<Arc<AppRoute>, ApiError> {
        self.gateway.authorize(&base.route, headers).await
    }

    /// The request `id` of the app in `base`. Another app's request is not found.
    async fn find(&self, base: &Base, id: &str) -> Result<QueueRequest, ApiError> {
        let not_found =
            || ApiError::new(ErrorCode::RequestNotFound, format!("no request {id} in the queue of {}", base.route));
        let id = Uuid::parse_str(id).map_err(|_| not_found())?;
        match self.store.queue_request(id).await.map_err(ApiError::internal)? {
            Some(request) if request.route == base.route => Ok(request),
            _ => Err(not_found()),
        }
    }

    async fn submit(
        self: &Arc<Self>,
        base: &Base,
        route: &AppRoute,
        request: Request,
        path: &str,
    ) -> Result<Response, ApiError> {
        let config = route.config();
        if config.suspended {
            return Err(ApiError::new(
                ErrorCode::Suspended,
                format!("app {} is suspended; resume it to call it", base.route),
            ));
        }
        if route.revision().is_none() {
            return Err(ApiError::new(ErrorCode::NoRevision, format!("app {} has no deployed revision", base.route)));
        }
        let headers = request.headers();
        let start_deadline = match headers.contains_key(gateway::START_TIMEOUT_HEADER)
            || headers.contains_key(gateway::FAL_START_TIMEOUT_HEADER)
        {
            true => Some(
                time::OffsetDateTime::now_utc()
                    + gateway::start_timeout(headers, self.gateway.default_start_timeout())?,
            ),
            false => None,
        };
        let revision = self.gateway.pinned(route, headers).await?;
        let (query, webhook) = split_query(request.uri().query())?;
        if let Some(url) = &webhook
            && let Ok(parsed) = reqwest::Url::parse(url)
            && let Err(why) = self.config.webhook_policy.check(&parsed).await
        {
            return Err(ApiError::new(ErrorCode::InvalidRequest, format!("the webhook URL {url:?} is refused: {why}")));
        }
        let forward: Vec<(String, String)> = headers
            .iter()
            .filter(|(name, _)| gateway::forwarded(name) && *name != header::CONTENT_LENGTH)
            .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
            .collect();
        let too_large = || {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the request body is larger than the queue's limit of {} bytes", self.config.max_payload),
            )
        };
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.config.max_payload as u64) {
            return Err(too_large());
        }
        let body = match Limited::new(request.into_body(), self.config.max_payload).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => return Err(too_large()),
            Err(e) => {
                return Err(ApiError::new(ErrorCode::InvalidRequest, format!("cannot read the request body: {e}")));
            }
        };

        let stored = self
            .store
            .queue_insert(NewQueueRequest {
                id: Uuid::new_v4(),
                team_id: route.team_id,
                app_id: route.app_id,
                route: base.route.clone(),
                path: format!("/{path}{query}"),
                headers: forward,
                body: body.to_vec(),
                webhook,
                start_deadline,
                revision,
            })
            .await
            .map_err(ApiError::internal)?;
        let position = self.store.queue_position(stored.app_id, stored.seq).await.map_err(ApiError::internal)?;
        let id = stored.id;
        self.spawn_worker(stored);
        let url = base.request_url(id);
        let body = json!({
            "request_id": id.to_string(),
            "status_url": format!("{url}/status"),
            "response_url": url,
            "cancel_url": format!("{url}/cancel"),
            "queue_position": position,
        });
        let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
        if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
            response.headers_mut().insert(gateway::REQUEST_ID_HEADER, value);
        }
        Ok(response)
    }

    /// The status document of a request.
    async fn status(&self, base: &Base, request: &QueueRequest, with_logs: bool) -> Result<Value, ApiError> {
        let url = base.request_url(request.id);
        let attempts: Vec<Value> = request
            .attempts
            .iter()
            .map(|a| {
                json!({
                    "runner_id": a.runner.to_string(),
                    "started_at": api::wire::rfc3339(a.started_at),
                    "ended_at": a.ended_at.map(api::wire::rfc3339),
                    "outcome": a.outcome,
                })
            })
            .collect();
        let mut status = json!({
            "request_id": request.id.to_string(),
            "response_url": url,
            "status_url": format!("{url}/status"),
            "cancel_url": format!("{url}/cancel"),
            "attempts": attempts,
            "cancel_requested": request.cancel_requested,
            "logs": Value::Null,
        });
        let logs: Option<Vec<LogEntry>> = match (with_logs, request.state) {
            (false, _) => None,
            (true, QueueState::Completed) => {
                let (_, logs) =
                    self.store.queue_result(request.id).await.map_err(ApiError::internal)?.unwrap_or_default();
                Some(crate::worker::parse_logs(&logs))
            }
            (true, _) => Some(
                self.live(request.id).map(|live| live.progress().logs.iter().cloned().collect()).unwrap_or_default(),
            ),
        };
        if let Some(logs) = logs {
            status["logs"] = logs.iter().map(log_json).collect();
        }
        match request.state {
            QueueState::InQueue => {
                status["status"] = json!("IN_QUEUE");
                status["queue_position"] =
                    json!(self.store.queue_position(request.app_id, request.seq).await.map_err(ApiError::internal)?);
            }
            QueueState::InProgress => {
                status["status"] = json!("IN_PROGRESS");
                status["runner_id"] = json!(request.runner.map(|r| r.to_string()));
            }
            QueueState::Completed => {
                status["status"] = json!("COMPLETED");
                let outcome = request.outcome.clone().unwrap_or(model::records::QueueOutcome {
                    status: 500,
                    error: None,
                    error_type: None,
                });
                // The time the last attempt took, as fal reports it.
                let inference_time = request
                    .attempts
                    .last()
                    .and_then(|a| Some((a.ended_at? - a.started_at).as_seconds_f64()))
                    .map(|s| (s * 1000.0).round() / 1000.0);
                status["metrics"] = json!({ "inference_time": inference_time });
                status["error"] = json!(outcome.error);
                status["error_type"] = json!(outcome.error_type);
                status["result_status"] = json!(outcome.status);
            }
        }
        Ok(status)
    }

    async fn result(&self, base: &Base, id: &str) -> Result<Response, ApiError> {
        let request = self.find(base, id).await?;
        if request.state != QueueState::Completed {
            let state = if request.state == QueueState::InQueue { "IN_QUEUE" } else { "IN_PROGRESS" };
            return Err(ApiError::new(
                ErrorCode::NotCompleted,
                format!("request {} is {state}; its result is there once its status is COMPLETED", request.id),
            ));
        }
        let Some((result, _)) = self.store.queue_result(request.id).await.map_err(ApiError::internal)? else {
            return Err(ApiError::new(ErrorCode::RequestNotFound, format!("no request {id} in the queue")));
        };
        let mut response = Response::new(Body::from(result.body));
        *response.status_mut() = StatusCode::from_u16(result.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if let Some(value) = result.content_type.and_then(|t| HeaderValue::from_str(&t).ok()) {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        if let Ok(value) = HeaderValue::from_str(&request.id.to_string()) {
            response.headers_mut().insert(gateway::REQUEST_ID_HEADER, value);
        }
        Ok(response)
    }

    async fn cancel(self: &Arc<Self>, base: &Base, id: &str) -> Result<Response, ApiError> {
        let request = self.find(base, id).await?;
        let why = format!("request {} was cancelled before it ran", request.id);
        match self.cancel_request(&request, why).await.map_err(ApiError::internal)? {
            CancelOutcome::Cancelled | CancelOutcome::Requested(_) => {}
            CancelOutcome::AlreadyCompleted => {
                return Err(ApiError::new(
                    ErrorCode::AlreadyCompleted,
                    format!("request {} has already completed", request.id),
                ));
            }
            CancelOutcome::NotFound => {
                return Err(ApiError::new(ErrorCode::RequestNotFound, format!("no request {id} in the queue")));
            }
        }
        Ok((StatusCode::ACCEPTED, axum::Json(json!({ "status": "CANCELLATION_REQUESTED" }))).into_response())
    }

    /// Server-sent events: the status document each time it changes, until COMPLETED.
    async fn stream(self: &Arc<Self>, base: Base, id: &str, with_logs: bool) -> Result<Response, ApiError> {
        let request = self.find(&base, id).await?;
        let queue = self.clone();
        let changes = self.live(request.id).map(|live| live.changed.subscribe());
        let state = (queue, base, request.id, changes, None::<Value>, false);
        let events =
            futures_util::stream::unfold(state, move |(queue, base, id, mut changes, last, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let status = match queue.store.queue_request(id).await {
                        Ok(Some(request)) => queue.status(&base, &request, with_logs).await.ok(),
                        _ => None,
                    };
                    let Some(status) = status else {
                        // Expired or unreadable: end the stream.
                        return None;
                    };
                    let completed = status["status"] == "COMPLETED";
                    if last.as_ref() != Some(&status) {
                        let event = Event::default().data(status.to_string());
                        return Some((Ok::<_, Infallible>(event), (queue, base, id, changes, Some(status), completed)));
                    }
                    // Woken by a change, or every second to pick up new log lines and
                    // queue positions.
                    let wait = async {
                        match changes.as_mut() {
                            Some(rx) => {
                                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
                            }
                            None => tokio::time::sleep(Duration::from_millis(250)).await,
                        }
                    };
                    tokio::select! {
                        () = wait => {}
                        // The server is stopping: end the stream so its connection can close.
                        () = queue.shutdown.cancelled() => return None,
                    }
                }
            });
        Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
    }
}

fn log_json(entry: &LogEntry) -> Value {
    json!({
        "timestamp": api::wire::rfc3339(entry.at),
        "message": entry.line,
        "level": match entry.stream.as_str() {
            "stderr" => "STDERR",
            "stdout" => "STDOUT",
            _ => "INFO",
        },
        "source": if entry.stream == "hangar" { "hangar" } else { "USER" },
    })
}

/// `?logs=1` or `?logs=true` (httpx spells booleans that way).
fn wants_logs(query: Option<&str>) -> bool {
    query.unwrap_or("").split('&').any(|pair| matches!(pair, "logs=1" | "logs=true" | "logs=True"))
}

/// The query to pass to the app, and the webhook URL taken out of it.
fn split_query(query: Option<&str>) -> Result<(String, Option<String>), ApiError> {
    let Some(query) = query else { return Ok((String::new(), None)) };
    let mut webhook = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !WEBHOOK_PARAMS.contains(&key) {
            kept.push(pair);
            continue;
        }
        let decoded = percent_decode(value);
        let url = reqwest::Url::parse(&decoded)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidRequest, format!("{key} must be an http or https URL, got {decoded:?}"))
            })?;
        webhook = Some(url.to_string());
    }
    let query = if kept.is_empty() { String::new() } else { format!("?{}", kept.join("&")) };
    Ok((query, webhook))
}

/// Decodes a form-encoded query value (`+` is a space).
fn percent_decode(value: &str) -> String {
    let pairs = format!("v={value}");
    reqwest::Url::parse(&format!("http://x/?{pairs}"))
        .ok()
        .and_then(|u| u.query_pairs().next().map(|(_, v)| v.into_owned()))
        .unwrap_or_else(|| value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webhook_is_taken_out_of_the_query_and_the_rest_kept() {
        let (query, webhook) =
            split_query(Some("steps=4&fal_webhook=https%3A%2F%2Fhooks.example%2Fdone%3Fa%3D1&seed=7")).unwrap();
        assert_eq!(query, "?steps=4&seed=7");
        assert_eq!(webhook.as_deref(), Some("https://hooks.example/done?a=1"));
        assert_eq!(split_query(Some("a=1")).unwrap(), ("?a=1".to_owned(), None));
        assert_eq!(split_query(None).unwrap(), (String::new(), None));
        let err = split_query(Some("webhook=ftp%3A%2F%2Fx")).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        assert!(err.message.contains("webhook"), "{err}");
    }

    #[test]
    fn logs_are_asked_for_the_ways_clients_spell_it() {
        assert!(wants_logs(Some("logs=1")));
        assert!(wants_logs(Some("x=2&logs=true")));
        assert!(!wants_logs(Some("logs=false")));
        assert!(!wants_logs(None));
    }
}
