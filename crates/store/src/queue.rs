//! The durable queue's part of the store: requests are written before they are
//! acknowledged, and every change of state is one transaction.

use model::ids::RunnerId;
use model::records::{QueueOutcome, QueueRequest, QueueResult};
use model::revision::WebhookState;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Backend, Result, Store, StoreError};

/// A request accepted into the queue.
#[derive(Debug, Clone)]
pub struct NewQueueRequest {
    pub id: Uuid,
    pub team_id: Uuid,
    pub app_id: Uuid,
    pub route: String,
    pub path: String,
    /// Headers to send to the runner with it.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub webhook: Option<String>,
    pub start_deadline: Option<OffsetDateTime>,
    /// The revision it pins, if it pins one.
    pub revision: Option<model::ids::RevisionId>,
}

/// What is sent to a runner for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePayload {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// How a request ends.
#[derive(Debug, Clone)]
pub struct Completion {
    pub outcome: QueueOutcome,
    pub result: QueueResult,
    /// The log lines collected while it ran, one per line.
    pub logs: String,
    /// Closes the open attempt with this outcome, if it has one.
    pub attempt_outcome: Option<String>,
}

/// What a cancel did.
/// An app's queue requests by state, and when the oldest waiting one came.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub in_queue: u64,
    pub in_progress: u64,
    pub completed: u64,
    pub oldest_waiting: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was waiting; it is now completed as cancelled and will never run.
    Cancelled,
    /// It is running on this runner, which should be told; it is marked as such.
    Requested(Option<RunnerId>),
    AlreadyCompleted,
    NotFound,
}

impl Store {
    /// Stores a new request, in the queue. Once this returns, a crash loses it no more.
    pub async fn queue_insert(&self, request: NewQueueRequest) -> Result<QueueRequest> {
        on_backend!(self, [], db => db.queue_insert(&request))
    }

    pub async fn queue_request(&self, id: Uuid) -> Result<Option<QueueRequest>> {
        on_backend!(self, [], db => db.queue_request(id))
    }

    /// How many requests of the same app wait ahead of the one with `seq`.
    pub async fn queue_position(&self, app_id: Uuid, seq: i64) -> Result<u64> {
        on_backend!(self, [], db => db.queue_position(app_id, seq))
    }

    /// A request's headers and body, to send to a runner.
    pub async fn queue_payload(&self, id: Uuid) -> Result<Option<QueuePayload>> {
        on_backend!(self, [], db => db.queue_payload(id))
    }

    /// Moves a waiting request to in progress on `runner` and opens an attempt. False
    /// when it is no longer waiting (it was cancelled meanwhile).
    pub async fn queue_start(&self, id: Uuid, runner: RunnerId) -> Result<bool> {
        on_backend!(self, [], db => db.queue_start(id, runner))
    }

    /// Puts a request whose runner was lost back in the queue, closing its attempt with
    /// `outcome`; `counts` says whether the attempt counts against the retry limit.
    pub async fn queue_requeue(&self, id: Uuid, outcome: String, counts: bool) -> Result<bool> {
        on_backend!(self, [], db => db.queue_requeue(id, &outcome, counts))
    }

    /// Completes a request with its result. False if it was already completed.
    pub async fn queue_complete(&self, id: Uuid, completion: Completion) -> Result<bool> {
        on_backend!(self, [], db => db.queue_complete(id, &completion))
    }

    /// Cancels a request: a waiting one is completed with `cancelled`; a running one is
    /// marked as asked to stop.
    pub async fn queue_cancel(&self, id: Uuid, cancelled: Completion) -> Result<CancelOutcome> {
        on_backend!(self, [], db => db.queue_cancel(id, &cancelled))
    }

    /// A completed request's result and logs.
    pub async fn queue_result(&self, id: Uuid) -> Result<Option<(QueueResult, String)>> {
        on_backend!(self, [], db => db.queue_result(id))
    }

    /// Every request not completed, oldest first.
    /// The app's requests by state (completed ones until they expire).
    pub async fn queue_counts(&self, app_id: Uuid) -> Result<QueueCounts> {
        on_backend!(self, [], db => db.queue_counts(app_id))
    }

    pub async fn queue_unfinished(&self, app: Option<Uuid>) -> Result<Vec<QueueRequest>> {
        on_backend!(self, [], db => db.queue_unfinished(app))
    }

    /// After a restart: every request left in progress goes back to the queue, its open
    /// attempt closed with `outcome` (not counted against the retry limit).
    pub async fn queue_interrupted(&self, outcome: String, app: Option<Uuid>) -> Result<u64> {
        on_backend!(self, [], db => db.queue_interrupted(&outcome, app))
    }

    pub async fn queue_set_webhook(&self, id: Uuid, state: WebhookState) -> Result<()> {
        on_backend!(self, [], db => db.queue_set_webhook(id, state))
    }

    /// Completed requests whose webhook has not been delivered yet.
    pub async fn queue_pending_webhooks(&self) -> Result<Vec<QueueRequest>> {
        on_backend!(self, [], db => db.queue_pending_webhooks())
    }

    /// Deletes requests completed before `before` (and done with their webhook).
    pub async fn queue_expire(&self, before: OffsetDateTime) -> Result<u64> {
        on_backend!(self, [], db => db.queue_expire(before))
    }
}
