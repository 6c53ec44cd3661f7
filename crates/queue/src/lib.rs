//! The durable queue: `POST /queue/{team}/{app}[/path]` accepts a call, stores it, and
//! answers 202 at once; the call then waits its turn for a runner, like a sync call,
//! and its result is stored for the caller to fetch. The wire protocol is the one
//! `fal_client` speaks (see [`http`]), so its code works against hangar unchanged.
//!
//! The store is the truth: a request is acknowledged only once it is written, and
//! every change of state is one transaction, so a crash loses nothing. In memory
//! there is only one task per unfinished request (see [`worker`]) and the log lines
//! of the ones running. On start, requests left in progress go back to the queue
//! and every unfinished request gets its task again.
//!
//! Delivery is at least once: a request whose runner is lost before answering is sent
//! again to another runner, up to a bounded number of attempts, each recorded.

mod egress;
mod http;
mod webhook;

pub use egress::WebhookPolicy;
mod worker;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use gateway::{Gateway, QueueHandler};
use model::ids::RunnerId;
use model::records::{OutputLine, QueueRequest};
use store::Store;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// How the queue behaves.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Largest request body accepted (413 above) and largest result kept.
    pub max_payload: usize,
    /// How long a completed request's result is kept.
    pub retention: Duration,
    /// Attempts that may end with the runner lost before the request fails.
    pub max_attempts: u32,
    /// Tries to deliver a result to a webhook, and the first pause between them
    /// (doubling each time).
    pub webhook_attempts: u32,
    pub webhook_backoff: Duration,
    /// Which addresses webhooks may go to.
    pub webhook_policy: WebhookPolicy,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            max_payload: 16 << 20,
            retention: Duration::from_secs(24 * 3600),
            max_attempts: 3,
            webhook_attempts: 5,
            webhook_backoff: Duration::from_secs(1),
            webhook_policy: WebhookPolicy::default(),
        }
    }
}

/// Live views of what runners print, so a request's logs can be shown while it runs.
pub trait RunnerOutput: Send + Sync + 'static {
    fn subscribe(&self, runner: RunnerId) -> Option<broadcast::Receiver<Arc<OutputLine>>>;
}

pub struct Queue {
    store: Store,
    gateway: Arc<Gateway>,
    config: QueueConfig,
    output: Arc<dyn RunnerOutput>,
    /// The requests this process is working on.
    live: Mutex<HashMap<Uuid, Arc<Live>>>,
    /// Per app whose requests this process works on: cancelled when it stops (the app
    /// went to another server), leaving them as they are stored.
    apps: Mutex<HashMap<Uuid, CancellationToken>>,
    /// For webhooks and cancel signals.
    client: reqwest::Client,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// What is known in memory of an unfinished request.
struct Live {
    /// Told when the request is cancelled while it waits.
    cancelled: CancellationToken,
    /// Bumped on every change a status reader may want to see.
    changed: watch::Sender<u64>,
    progress: Mutex<Progress>,
}

#[derive(Default)]
struct Progress {
    /// The runner it is on, and where that runner listens.
    runner: Option<(RunnerId, netns::Endpoint)>,
    /// The request has gone to the runner, so a cancel must be sent after it.
    sent: bool,
    /// A cancel came before the request was sent: it is not sent at all.
    cancel_requested: bool,
    logs: std::collections::VecDeque<LogEntry>,
}

/// A log line of a request, as the status shows it.
#[derive(Debug, Clone)]
struct LogEntry {
    at: time::OffsetDateTime,
    /// `stdout`, `stderr`, or `hangar` for the platform's own notes.
    stream: String,
    line: String,
}

/// Lines kept per request; a chatty app keeps its last ones.
const MAX_LOG_LINES: usize = 2000;

impl Live {
    fn new() -> Arc<Live> {
        Arc::new(Live {
            cancelled: CancellationToken::new(),
            changed: watch::Sender::new(0),
            progress: Mutex::default(),
        })
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Adds a line of the platform's own to the request's logs.
    fn log(&self, stream: &str, line: String) {
        self.push(LogEntry { at: time::OffsetDateTime::now_utc(), stream: stream.to_owned(), line });
    }

    fn push(&self, entry: LogEntry) {
        let mut progress = self.progress();
        if progress.logs.len() == MAX_LOG_LINES {
            progress.logs.pop_front();
        }
        progress.logs.push_back(entry);
    }
}

impl Queue {
    /// A queue that stops its work when `shutdown` is cancelled (the server's own
    /// shutdown, so that open status streams end with it).
    pub fn new(
        store: Store,
        gateway: Arc<Gateway>,
        config: QueueConfig,
        output: Arc<dyn RunnerOutput>,
        shutdown: CancellationToken,
    ) -> Arc<Queue> {
        let client = config.webhook_policy.client();
        Arc::new(Queue {
            store,
            gateway,
            config,
            output,
            live: Mutex::default(),
            apps: Mutex::default(),
            client,
            shutdown,
            tasks: TaskTracker::new(),
        })
    }

    /// Picks up where the last run of the server left off: requests it left in
    /// progress go back to the queue, every unfinished request is worked on again, and
    /// undelivered webhooks are sent. Call it once the apps' routes are registered.
    ///
    /// Where servers share the store (`every_app` false), each works on the requests of
    /// the apps it runs, taking them up with [`adopt`](Self::adopt); this only starts
    /// the expiry of old results.
    pub async fn start(self: &Arc<Self>, every_app: bool) -> Result<(), store::StoreError> {
        if every_app {
            self.resume(None, "the server stopped during the attempt").await?;
        }
        let queue = self.clone();
        self.tasks.spawn(async move { queue.expire_results().await });
        Ok(())
    }

    /// Takes up the requests of an app this server has begun to run, after another
    /// server (or an earlier run of this one) ran it: those left in progress go back to
    /// the queue, each unfinished one is worked on, undelivered webhooks are sent.
    pub async fn adopt(self: &Arc<Self>, app_id: Uuid) -> Result<(), store::StoreError> {
        self.resume(Some(app_id), "the server running the app stopped during the attempt").await
    }

    /// Stops working on an app's requests (it runs on another server now): their tasks
    /// end, and the requests stay as they are stored, for that server to take up.
    pub fn release(&self, app_id: Uuid) {
        if let Some(token) = self.apps.lock().unwrap_or_else(|e| e.into_inner()).remove(&app_id) {
            token.cancel();
        }
    }

    async fn resume(self: &Arc<Self>, app: Option<Uuid>, why: &str) -> Result<(), store::StoreError> {
        let requeued = self.store.queue_interrupted(why.to_owned(), app).await?;
        if requeued > 0 {
            tracing::warn!(count = requeued, app = ?app, "queue requests interrupted by a server stop are queued again");
        }
        let unfinished = self.store.queue_unfinished(app).await?;
        if !unfinished.is_empty() {
            tracing::info!(count = unfinished.len(), app = ?app, "resuming queue requests");
        }
        for request in unfinished {
            if self.live(request.id).is_none() {
                self.spawn_worker(request);
            }
        }
        for request in self.store.queue_pending_webhooks().await? {
            if app.is_none_or(|a| a == request.app_id) {
                self.spawn_webhook(request.id);
            }
        }
        Ok(())
    }

    /// Cancelled when the server stops, or when the app's requests are released.
    fn stop_token(&self, app_id: Uuid) -> CancellationToken {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        apps.entry(app_id).or_insert_with(|| self.shutdown.child_token()).clone()
    }

    /// Stops every task. Requests in progress stay so in the store and are queued
    /// again on the next start.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Cancels every request of the app that is still waiting (those running go on),
    /// and answers how many were.
    pub async fn flush(self: &Arc<Self>, app_id: Uuid) -> Result<u64, store::StoreError> {
        let mut cancelled = 0;
        let waiting = self.store.queue_unfinished(Some(app_id)).await?;
        for request in waiting.iter().filter(|r| r.state == model::revision::QueueState::InQueue) {
            let why = format!("request {} was cancelled by a flush of its app's queue", request.id);
            if self.cancel_request(request, why).await? == store::CancelOutcome::Cancelled {
                cancelled += 1;
            }
        }
        Ok(cancelled)
    }

    /// Cancels one request: a waiting one completes as cancelled and never runs; a
    /// running one's runner is told.
    pub(crate) async fn cancel_request(
        self: &Arc<Self>,
        request: &QueueRequest,
        why: String,
    ) -> Result<store::CancelOutcome, store::StoreError> {
        let error = api::error::ApiError::new(api::error::ErrorCode::RequestCancelled, why);
        let outcome = self.store.queue_cancel(request.id, worker::failure(error, None, String::new())).await?;
        match outcome {
            store::CancelOutcome::Cancelled => {
                if let Some(live) = self.live(request.id) {
                    live.cancelled.cancel();
                }
                self.finished(request);
            }
            store::CancelOutcome::Requested(_) => self.signal_cancel(request),
            store::CancelOutcome::AlreadyCompleted | store::CancelOutcome::NotFound => {}
        }
        Ok(outcome)
    }

    fn live(&self, id: Uuid) -> Option<Arc<Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }

    /// Deletes results older than the retention, now and then.
    async fn expire_results(self: Arc<Self>) {
        let every = (self.config.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            let cutoff = time::OffsetDateTime::now_utc() - self.config.retention;
            match self.store.queue_expire(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(count = n, "expired queue results"),
                Err(e) => tracing::warn!(error = %e, "cannot expire queue results"),
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }
}

impl QueueHandler for Queue {
    fn handle(self: Arc<Self>, request: Request, secure: bool) -> Pin<Box<dyn Future<Output = Response> + Send>> {
        Box::pin(async move { self.answer(request, secure).await })
    }
}
