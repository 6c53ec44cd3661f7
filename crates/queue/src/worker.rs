//! One task per unfinished request: wait for a slot on a runner of the app's current
//! revision (in the same fair queue as sync calls, so queued work drives the
//! autoscaler too), mark the request started, send it, and store what came back.
//!
//! A runner lost before answering (it crashed, was killed, or was cut off by a forced
//! rollout) sends the request back to the queue for another runner, until
//! `max_attempts` such losses; a request whose cancel was asked for is not retried.

use std::sync::Arc;
use std::time::Duration;

use api::error::{ApiError, ErrorCode};
use axum::body::Body;
use gateway::{AcquireError, CutOff, Lease, SendError};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use model::records::{QueueOutcome, QueueRequest, QueueResult};
use store::Completion;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Live, LogEntry, Queue};

/// The header fal's apps read a request's id from; sent along with hangar's own.
pub(crate) const FAL_REQUEST_ID_HEADER: &str = "x-fal-request-id";

/// How a request with no start deadline waits: as long as it takes.
const NO_DEADLINE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What one attempt came to.
enum Attempt {
    Done(Completion),
    /// The runner went away before answering.
    Lost(String),
}

impl Queue {
    pub(crate) fn spawn_worker(self: &Arc<Self>, request: QueueRequest) {
        let live = Live::new();
        self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(request.id, live.clone());
        let queue = self.clone();
        let stop = self.stop_token(request.app_id);
        self.tasks.spawn(async move {
            let id = request.id;
            if let Err(e) = queue.work(request, &live, &stop).await {
                // The store failed; the request stays as it is stored and is picked up
                // again on the next start.
                tracing::error!(request = %id, error = %e, "queue request stopped by a store error");
            }
            queue.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        });
    }

    async fn work(
        self: &Arc<Self>,
        mut request: QueueRequest,
        live: &Arc<Live>,
        stop: &CancellationToken,
    ) -> Result<(), store::StoreError> {
        let deadline = match request.start_deadline {
            Some(at) => {
                let left = (at - time::OffsetDateTime::now_utc()).try_into().unwrap_or(Duration::ZERO);
                Instant::now() + left
            }
            None => Instant::now() + NO_DEADLINE,
        };
        loop {
            let Some(route) = self.gateway.route(&request.route) else {
                return self.route_gone(&request, live, stop).await;
            };
            let acquired = tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(()),
                // Cancelled while waiting: the cancel has already completed it.
                () = live.cancelled.cancelled() => return Ok(()),
                acquired = route.acquire_waiting(deadline, request.revision) => acquired,
            };
            let lease = match acquired {
                Ok(lease) => lease,
                Err(AcquireError::Deadline) => {
                    let late = ApiError::new(
                        ErrorCode::StartTimeout,
                        "the request did not start within its start deadline (X-Fal-Request-Timeout)",
                    );
                    return self.complete(&request, live, failure(late, None, String::new())).await;
                }
                Err(AcquireError::Gone | AcquireError::NoRevision | AcquireError::Suspended) => {
                    return self.route_gone(&request, live, stop).await;
                }
            };
            // The runner is known before the start is stored, so that a cancel that
            // finds the request started also finds where it runs.
            live.progress().runner = Some((lease.runner, lease.addr.clone()));
            if !self.store.queue_start(request.id, lease.runner).await? {
                // Cancelled between getting the slot and starting: it never runs.
                return Ok(());
            }
            live.log("hangar", format!("started on runner {}", lease.runner));
            live.touch();
            let runner = lease.runner;
            let attempt = self.attempt(&request, &route, lease, live, stop).await?;
            {
                let mut progress = live.progress();
                progress.runner = None;
                progress.sent = false;
            }
            match attempt {
                Some(Attempt::Done(completion)) => return self.complete(&request, live, completion).await,
                // Shutting down: left in progress, queued again on the next start.
                None => return Ok(()),
                Some(Attempt::Lost(why)) => {
                    request = self.store.queue_request(request.id).await?.unwrap_or(request);
                    let failed = request.failed_attempts + 1;
                    if request.cancel_requested {
                        let stopped = ApiError::new(
                            ErrorCode::RequestCancelled,
                            format!("request {} was cancelled; its runner stopped ({why})", request.id),
                        );
                        return self.complete(&request, live, failure(stopped, Some(why), logs_text(live))).await;
                    }
                    if failed >= self.config.max_attempts {
                        let lost = ApiError::new(
                            ErrorCode::RunnerLost,
                            format!("the runner was lost {failed} times (the limit); last time: {why}"),
                        );
                        return self.complete(&request, live, failure(lost, Some(why), logs_text(live))).await;
                    }
                    live.log(
                        "hangar",
                        format!("{why}; queued again (attempt {failed} of {})", self.config.max_attempts),
                    );
                    wait_until_unrouted(&route, runner).await;
                    self.store.queue_requeue(request.id, why, true).await?;
                    request.failed_attempts = failed;
                    live.touch();
                }
            }
        }
    }

    /// The app's route is gone. If the app went to another server (its requests were
    /// released first, which `stop` says), the request is left as it is stored, for that
    /// server to take up; otherwise the app was deleted, and the request completes so.
    async fn route_gone(
        self: &Arc<Self>,
        request: &QueueRequest,
        live: &Arc<Live>,
        stop: &CancellationToken,
    ) -> Result<(), store::StoreError> {
        if stop.is_cancelled() {
            return Ok(());
        }
        let gone = ApiError::new(ErrorCode::AppNotFound, format!("app {} was deleted", request.route));
        self.complete(request, live, failure(gone, None, String::new())).await
    }

    /// Sends the request to the runner of `lease` and reads the whole answer. `None`
    /// when the server is shutting down or the app has gone to another server.
    async fn attempt(
        &self,
        request: &QueueRequest,
        route: &gateway::AppRoute,
        lease: Lease,
        live: &Arc<Live>,
        stop: &CancellationToken,
    ) -> Result<Option<Attempt>, store::StoreError> {
        let runner = lease.runner;
        let tap = self.output.subscribe(runner).map(|mut lines| {
            let live = live.clone();
            tokio::spawn(async move {
                while let Ok(line) = lines.recv().await {
                    live.push(LogEntry { at: line.at, stream: line.stream.to_owned(), line: line.line.clone() });
                    live.touch();
                }
            })
        });
        let _stop_tap = AbortOnDrop(tap);

        let Some(payload) = self.store.queue_payload(request.id).await? else {
            return Ok(Some(Attempt::Done(failure(
                ApiError::new(ErrorCode::RequestNotFound, "the request's payload is gone"),
                Some("payload missing".to_owned()),
                logs_text(live),
            ))));
        };
        let mut headers = HeaderMap::new();
        for (name, value) in payload.headers {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                headers.append(name, value);
            }
        }
        let id = HeaderValue::from_str(&request.id.to_string()).unwrap_or(HeaderValue::from_static("-"));
        headers.insert(FAL_REQUEST_ID_HEADER, id.clone());
        let upstream = match gateway::upstream_request(
            &lease.labels.host,
            http::Method::POST,
            &request.path,
            &headers,
            Body::from(payload.body),
            &id,
        ) {
            Ok(upstream) => upstream,
            Err(e) => return Ok(Some(Attempt::Done(failure(e, Some("unsendable".to_owned()), logs_text(live))))),
        };
        let config = route.config();
        let deadline = Instant::now() + config.request_timeout;
        let timed_out = || {
            let e = ApiError::new(
                ErrorCode::RequestTimeout,
                format!("the request ran longer than the app's request_timeout of {:?}", config.request_timeout),
            );
            Attempt::Done(failure(e, Some("ran past request_timeout".to_owned()), logs_text(live)))
        };
        {
            // A cancel that came before the request went out keeps it from going.
            let mut progress = live.progress();
            if request.cancel_requested || progress.cancel_requested {
                let e = ApiError::new(
                    ErrorCode::RequestCancelled,
                    format!("request {} was cancelled before it reached the runner", request.id),
                );
                return Ok(Some(Attempt::Done(failure(e, Some("cancelled before sending".to_owned()), String::new()))));
            }
            progress.sent = true;
        }
        let sent = tokio::select! {
            () = stop.cancelled() => return Ok(None),
            sent = self.gateway.send(route, runner, &lease.addr, upstream, deadline) => sent,
        };
        let response = match sent {
            Ok(response) => response,
            Err(SendError::Lost(cut)) => return Ok(Some(Attempt::Lost(lost_reason(runner, cut)))),
            Err(SendError::Timeout) => return Ok(Some(timed_out())),
        };
        let (parts, incoming) = response.into_parts();
        let collected = tokio::select! {
            () = stop.cancelled() => return Ok(None),
            collected = tokio::time::timeout_at(deadline, Limited::new(incoming, self.config.max_payload).collect()) => collected,
        };
        let body = match collected {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(e)) if e.is::<LengthLimitError>() => {
                let e = ApiError::new(
                    ErrorCode::ResultTooLarge,
                    format!("the app's answer is larger than the queue's limit of {} bytes", self.config.max_payload),
                );
                return Ok(Some(Attempt::Done(failure(e, Some("answer too large".to_owned()), logs_text(live)))));
            }
            Ok(Err(_)) => return Ok(Some(Attempt::Lost(lost_reason(runner, route.cut_reason(runner))))),
            Err(_) => {
                route.flag_timed_out(runner);
                return Ok(Some(timed_out()));
            }
        };
        drop(lease);
        if _stop_tap.0.is_some() {
            // The runner's last lines may still be on their way from its pipe: wait until
            // the log has been quiet a moment (at most a fifth of a second).
            let mut changes = live.changed.subscribe();
            let cap = Instant::now() + Duration::from_millis(200);
            while Instant::now() < cap
                && tokio::time::timeout(Duration::from_millis(20), changes.changed()).await.is_ok_and(|r| r.is_ok())
            {
            }
        }
        let status = parts.status.as_u16();
        let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let outcome = if parts.status.is_success() {
            QueueOutcome { status, error: None, error_type: None }
        } else {
            let detail: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
            let field = |name: &str| detail.as_ref().and_then(|d| d.get(name)?.as_str().map(str::to_owned));
            let cancelled = self.store.queue_request(request.id).await?.is_some_and(|r| r.cancel_requested);
            QueueOutcome {
                status,
                error: Some(field("detail").unwrap_or_else(|| format!("the app answered {status}"))),
                error_type: field("error_type")
                    .or_else(|| Some(if cancelled { "request_cancelled" } else { "app_error" }.to_owned())),
            }
        };
        live.log("hangar", format!("runner {runner} answered {status}"));
        Ok(Some(Attempt::Done(Completion {
            outcome,
            result: QueueResult { status, content_type, body: body.to_vec() },
            logs: logs_text(live),
            attempt_outcome: Some(format!("answered {status}")),
        })))
    }

    /// Stores the end of a request, then tells whoever waits for it.
    async fn complete(
        self: &Arc<Self>,
        request: &QueueRequest,
        live: &Live,
        completion: Completion,
    ) -> Result<(), store::StoreError> {
        if self.store.queue_complete(request.id, completion).await? {
            self.finished(request);
        }
        live.touch();
        Ok(())
    }

    /// A request has completed: wake its status readers and send its webhook.
    pub(crate) fn finished(self: &Arc<Self>, request: &QueueRequest) {
        if let Some(live) = self.live(request.id) {
            live.touch();
        }
        if request.webhook.is_some() {
            self.spawn_webhook(request.id);
        }
    }

    /// Tells the runner working on `request` that it was cancelled, the way fal's apps
    /// expect: a POST to the request's path with `/cancel` appended, carrying the same
    /// request id header.
    pub(crate) fn signal_cancel(&self, request: &QueueRequest) {
        let Some(live) = self.live(request.id) else { return };
        let (runner, addr) = {
            let mut progress = live.progress();
            progress.cancel_requested = true;
            match (progress.sent, progress.runner.clone()) {
                (true, Some(runner)) => runner,
                // Not sent yet: the worker sees the flag and does not send it.
                _ => return,
            }
        };
        let path = request.path.split('?').next().unwrap_or("/").trim_end_matches('/');
        let uri = format!("{path}/cancel");
        live.log("hangar", format!("cancel asked for; telling runner {runner}"));
        live.touch();
        let id = request.id;
        self.tasks.spawn(async move {
            let notice = http::Request::post(uri)
                .header(http::header::HOST, addr.addr.to_string())
                .header(FAL_REQUEST_ID_HEADER, id.to_string())
                .header(gateway::REQUEST_ID_HEADER, id.to_string())
                .body(axum::body::Body::empty());
            let sent = match notice {
                Ok(notice) => tokio::time::timeout(Duration::from_secs(10), gateway::notify_runner(&addr, notice))
                    .await
                    .unwrap_or_else(|_| Err("no answer within 10 s".to_owned())),
                Err(e) => Err(e.to_string()),
            };
            let note = match sent {
                Ok(status) => format!("runner {runner} answered the cancel with {}", status.as_u16()),
                Err(e) => format!("runner {runner} could not be told of the cancel: {e}"),
            };
            tracing::debug!(request = %id, "{note}");
            live.log("hangar", note);
            live.touch();
        });
    }
}

/// How long a retry waits for the runner that lost its request to be taken out of the
/// route.
const LOST_RUNNER_WAIT: Duration = Duration::from_secs(5);

/// Waits, for a while, until `runner` no longer takes calls. The runner that lost a
/// request may not be known to be gone yet (the node of a cluster's runner failed, and
/// the cluster says so a moment later): a retry at once would go to it, and be lost
/// again. One that still takes calls after the wait is retried all the same.
async fn wait_until_unrouted(route: &gateway::AppRoute, runner: model::ids::RunnerId) {
    let deadline = Instant::now() + LOST_RUNNER_WAIT;
    while route.has_runner(runner) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Aborts the log tap when an attempt ends.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

fn lost_reason(runner: model::ids::RunnerId, cut: Option<CutOff>) -> String {
    match cut {
        Some(CutOff::ForcedRollout) => format!("runner {runner} was cut off by a forced rollout"),
        Some(CutOff::Killed) => format!("runner {runner} was killed"),
        None => format!("runner {runner} stopped before answering"),
    }
}

/// A completion that is the platform's error rather than the app's answer.
pub(crate) fn failure(error: ApiError, attempt_outcome: Option<String>, logs: String) -> Completion {
    let status = error.code.status().as_u16();
    let body = serde_json::to_vec(&error.body()).unwrap_or_default();
    Completion {
        outcome: QueueOutcome { status, error: Some(error.message), error_type: Some(error.code.as_str().to_owned()) },
        result: QueueResult { status, content_type: Some("application/json".to_owned()), body },
        logs,
        attempt_outcome,
    }
}

/// A request's log lines as stored: one per line, `time stream text`.
fn logs_text(live: &Live) -> String {
    let progress = live.progress();
    let mut text = String::new();
    for entry in &progress.logs {
        let line = entry.line.replace('\n', " ");
        text.push_str(&format!("{} {} {line}\n", api::wire::rfc3339(entry.at), entry.stream));
    }
    text
}

pub(crate) fn parse_logs(text: &str) -> Vec<LogEntry> {
    let format = time::format_description::well_known::Rfc3339;
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            let at = time::OffsetDateTime::parse(parts.next()?, &format).ok()?;
            let stream = parts.next()?.to_owned();
            Some(LogEntry { at, stream, line: parts.next().unwrap_or("").to_owned() })
        })
        .collect()
}
