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
    pub async fn queue_unfinished(&self) -> Result<Vec<QueueRequest>> {
        on_backend!(self, [], db => db.queue_unfinished())
    }

    /// After a restart: every request left in progress goes back to the queue, its open
    /// attempt closed with `outcome` (not counted against the retry limit).
    pub async fn queue_interrupted(&self, outcome: String) -> Result<u64> {
        on_backend!(self, [], db => db.queue_interrupted(&outcome))
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

#[cfg(test)]
mod tests {
    use model::revision::QueueState;

    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
        (dir, store)
    }

    fn new_request(app_id: Uuid, body: &str) -> NewQueueRequest {
        NewQueueRequest {
            id: Uuid::new_v4(),
            team_id: Uuid::nil(),
            app_id,
            route: "team/app".to_owned(),
            path: "/run?x=1".to_owned(),
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: body.as_bytes().to_vec(),
            webhook: None,
            start_deadline: None,
        }
    }

    fn completion(status: u16, error_type: Option<&str>) -> Completion {
        Completion {
            outcome: QueueOutcome { status, error: None, error_type: error_type.map(str::to_owned) },
            result: QueueResult { status, content_type: None, body: b"done".to_vec() },
            logs: String::new(),
            attempt_outcome: Some(format!("answered {status}")),
        }
    }

    #[tokio::test]
    async fn a_request_moves_through_its_states_and_keeps_its_attempts() {
        let (_dir, store) = store().await;
        let app = Uuid::new_v4();
        let first = store.queue_insert(new_request(app, "1")).await.unwrap();
        let second = store.queue_insert(new_request(app, "2")).await.unwrap();
        assert_eq!(store.queue_position(app, first.seq).await.unwrap(), 0);
        assert_eq!(store.queue_position(app, second.seq).await.unwrap(), 1);
        let payload = store.queue_payload(second.id).await.unwrap().unwrap();
        assert_eq!(payload.headers, vec![("content-type".to_owned(), "application/json".to_owned())]);
        assert_eq!(payload.body, b"2");

        let runner = RunnerId(Uuid::new_v4());
        assert!(store.queue_start(first.id, runner).await.unwrap());
        assert!(!store.queue_start(first.id, runner).await.unwrap(), "it is no longer waiting");
        assert_eq!(store.queue_position(app, second.seq).await.unwrap(), 0, "the running one is not ahead");
        assert!(store.queue_requeue(first.id, "runner lost".to_owned(), true).await.unwrap());
        assert!(store.queue_start(first.id, runner).await.unwrap());
        assert!(store.queue_complete(first.id, completion(200, None)).await.unwrap());
        assert!(!store.queue_complete(first.id, completion(500, None)).await.unwrap(), "completed once");

        let done = store.queue_request(first.id).await.unwrap().unwrap();
        assert_eq!(done.state, QueueState::Completed);
        assert_eq!(done.failed_attempts, 1);
        assert_eq!(done.outcome.unwrap().status, 200);
        let outcomes: Vec<_> = done.attempts.iter().map(|a| a.outcome.clone().unwrap()).collect();
        assert_eq!(outcomes, ["runner lost", "answered 200"]);
        let (result, _) = store.queue_result(first.id).await.unwrap().unwrap();
        assert_eq!(result.body, b"done");
        let unfinished: Vec<_> = store.queue_unfinished().await.unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(unfinished, [second.id]);
    }

    #[tokio::test]
    async fn cancel_wins_over_a_later_start_and_marks_a_running_request() {
        let (_dir, store) = store().await;
        let app = Uuid::new_v4();
        let waiting = store.queue_insert(new_request(app, "1")).await.unwrap();
        let running = store.queue_insert(new_request(app, "2")).await.unwrap();
        let runner = RunnerId(Uuid::new_v4());
        assert!(store.queue_start(running.id, runner).await.unwrap());

        let cancelled = completion(400, Some("request_cancelled"));
        assert_eq!(store.queue_cancel(waiting.id, cancelled.clone()).await.unwrap(), CancelOutcome::Cancelled);
        assert!(!store.queue_start(waiting.id, runner).await.unwrap(), "a cancelled request never starts");
        assert_eq!(
            store.queue_cancel(running.id, cancelled.clone()).await.unwrap(),
            CancelOutcome::Requested(Some(runner))
        );
        assert!(store.queue_request(running.id).await.unwrap().unwrap().cancel_requested);
        assert_eq!(store.queue_cancel(waiting.id, cancelled.clone()).await.unwrap(), CancelOutcome::AlreadyCompleted);
        assert_eq!(store.queue_cancel(Uuid::new_v4(), cancelled).await.unwrap(), CancelOutcome::NotFound);
    }

    #[tokio::test]
    async fn a_restart_requeues_running_requests_and_expiry_spares_pending_webhooks() {
        let (_dir, store) = store().await;
        let app = Uuid::new_v4();
        let running = store.queue_insert(new_request(app, "1")).await.unwrap();
        store.queue_start(running.id, RunnerId(Uuid::new_v4())).await.unwrap();
        assert_eq!(store.queue_interrupted("server restarted".to_owned()).await.unwrap(), 1);
        let back = store.queue_request(running.id).await.unwrap().unwrap();
        assert_eq!((back.state, back.failed_attempts), (QueueState::InQueue, 0));

        let mut hooked = new_request(app, "2");
        hooked.webhook = Some("http://127.0.0.1:9/hook".to_owned());
        let hooked = store.queue_insert(hooked).await.unwrap();
        store.queue_cancel(hooked.id, completion(400, None)).await.unwrap();
        assert_eq!(store.queue_pending_webhooks().await.unwrap().len(), 1);
        let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
        assert_eq!(store.queue_expire(later).await.unwrap(), 0, "its webhook is still pending");
        store.queue_set_webhook(hooked.id, WebhookState::Delivered).await.unwrap();
        assert_eq!(store.queue_expire(later).await.unwrap(), 1);
        assert!(store.queue_request(hooked.id).await.unwrap().is_none());
    }
}
