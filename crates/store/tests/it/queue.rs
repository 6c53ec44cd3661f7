//! The durable queue: a request's states, its attempts, cancel, restart and expiry.

use model::ids::RunnerId;
use model::records::{QueueOutcome, QueueResult};
use model::revision::{QueueState, WebhookState};
use store::{CancelOutcome, Completion, NewQueueRequest, Store};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::now_millis;

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
        revision: None,
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

async fn a_request_moves_through_its_states_and_keeps_its_attempts(store: Store) {
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
    let unfinished: Vec<_> = store.queue_unfinished(None).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(unfinished, [second.id]);
}

async fn a_new_request_reads_back_as_it_was_written(store: Store) {
    let before = now_millis();
    let mut new = new_request(Uuid::new_v4(), "");
    new.team_id = Uuid::new_v4();
    new.webhook = Some("http://127.0.0.1:9/hook".to_owned());
    new.start_deadline = Some(now_millis() + time::Duration::seconds(30));
    new.headers.push(("x-trace".to_owned(), "a: b".to_owned()));
    new.body = vec![0, 255, 10, 13];
    new.revision = Some(model::ids::RevisionId(Uuid::new_v4()));
    let written = store.queue_insert(new.clone()).await.unwrap();
    assert_eq!(store.queue_request(new.id).await.unwrap(), Some(written.clone()));
    assert_eq!(
        (written.id, written.team_id, written.app_id, written.route.as_str(), written.path.as_str()),
        (new.id, new.team_id, new.app_id, "team/app", "/run?x=1")
    );
    assert_eq!((written.state, written.webhook.as_deref()), (QueueState::InQueue, Some("http://127.0.0.1:9/hook")));
    assert_eq!((written.start_deadline, written.started_at, written.completed_at), (new.start_deadline, None, None));
    assert!(written.created_at >= before && written.runner.is_none() && !written.cancel_requested);
    assert_eq!(written.revision, new.revision, "the revision it pins");
    assert!(written.outcome.is_none() && written.attempts.is_empty() && written.webhook_state.is_none());
    let payload = store.queue_payload(new.id).await.unwrap().unwrap();
    assert_eq!((payload.headers, payload.body), (new.headers, new.body));
    assert!(store.queue_result(new.id).await.unwrap().is_none(), "no result before it completes");
    assert!(store.queue_request(Uuid::new_v4()).await.unwrap().is_none());
    assert!(store.queue_payload(Uuid::new_v4()).await.unwrap().is_none());
    assert!(store.queue_insert(new_request(Uuid::new_v4(), "")).await.unwrap().seq > written.seq);
}

async fn requests_wait_in_submission_order_per_app(store: Store) {
    let app = Uuid::new_v4();
    let other = Uuid::new_v4();
    let mut ids = Vec::new();
    for i in 0..6 {
        let request = store.queue_insert(new_request(if i % 3 == 2 { other } else { app }, "x")).await.unwrap();
        ids.push(request);
    }
    let unfinished: Vec<_> = store.queue_unfinished(None).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(unfinished, ids.iter().map(|r| r.id).collect::<Vec<_>>());
    let positions = [0, 1, 0, 2, 3, 1];
    for (request, position) in ids.iter().zip(positions) {
        assert_eq!(store.queue_position(request.app_id, request.seq).await.unwrap(), position);
    }
    store.queue_start(ids[0].id, RunnerId(Uuid::new_v4())).await.unwrap();
    store.queue_cancel(ids[1].id, completion(400, Some("request_cancelled"))).await.unwrap();
    assert_eq!(store.queue_position(app, ids[4].seq).await.unwrap(), 1, "only waiting ones are ahead");
    let unfinished: Vec<_> = store.queue_unfinished(None).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(unfinished, [ids[0].id, ids[2].id, ids[3].id, ids[4].id, ids[5].id], "running ones too");
}

async fn concurrent_starts_of_a_request_have_one_winner(store: Store) {
    let app = Uuid::new_v4();
    for _ in 0..20 {
        let request = store.queue_insert(new_request(app, "x")).await.unwrap();
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.queue_start(request.id, RunnerId(Uuid::new_v4())).await.unwrap() })
            })
            .collect();
        let mut won = 0;
        for start in starts {
            won += usize::from(start.await.unwrap());
        }
        assert_eq!(won, 1, "exactly one start wins");
        let started = store.queue_request(request.id).await.unwrap().unwrap();
        assert_eq!((started.state, started.attempts.len()), (QueueState::InProgress, 1));
        assert_eq!(started.runner, Some(started.attempts[0].runner), "the winner's runner holds it");
    }
}

async fn a_cancel_racing_a_start_agrees_with_it(store: Store) {
    let app = Uuid::new_v4();
    for _ in 0..20 {
        let request = store.queue_insert(new_request(app, "x")).await.unwrap();
        let runner = RunnerId(Uuid::new_v4());
        let start = tokio::spawn({
            let store = store.clone();
            async move { store.queue_start(request.id, runner).await.unwrap() }
        });
        let cancel = tokio::spawn({
            let store = store.clone();
            async move { store.queue_cancel(request.id, completion(400, Some("request_cancelled"))).await.unwrap() }
        });
        let (started, cancelled) = (start.await.unwrap(), cancel.await.unwrap());
        let now = store.queue_request(request.id).await.unwrap().unwrap();
        match cancelled {
            CancelOutcome::Cancelled => {
                assert!(!started, "a cancelled request never starts");
                assert_eq!(now.state, QueueState::Completed);
            }
            CancelOutcome::Requested(on) => {
                assert!(started);
                assert_eq!(on, Some(runner));
                assert!(now.cancel_requested && now.state == QueueState::InProgress);
            }
            other => panic!("unexpected cancel outcome {other:?}"),
        }
    }
}

async fn cancel_wins_over_a_later_start_and_marks_a_running_request(store: Store) {
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
    let gone = store.queue_request(waiting.id).await.unwrap().unwrap();
    assert_eq!(gone.outcome.unwrap().error_type.as_deref(), Some("request_cancelled"));
    assert!(gone.attempts.is_empty() && gone.started_at.is_none() && gone.completed_at.is_some());
}

async fn a_completed_request_keeps_its_result_and_logs(store: Store) {
    let request = store.queue_insert(new_request(Uuid::new_v4(), "1")).await.unwrap();
    let runner = RunnerId(Uuid::new_v4());
    store.queue_start(request.id, runner).await.unwrap();
    assert!(!store.queue_requeue(Uuid::new_v4(), "lost".to_owned(), true).await.unwrap());
    assert!(store.queue_requeue(request.id, "lost".to_owned(), false).await.unwrap());
    assert!(!store.queue_requeue(request.id, "lost".to_owned(), false).await.unwrap(), "only a running one");
    store.queue_start(request.id, runner).await.unwrap();
    let done = Completion {
        outcome: QueueOutcome {
            status: 502,
            error: Some("the runner crashed".to_owned()),
            error_type: Some("runner_failed".to_owned()),
        },
        result: QueueResult { status: 502, content_type: Some("text/plain".to_owned()), body: vec![0, 1, 2] },
        logs: "line one\nline two\n".to_owned(),
        attempt_outcome: None,
    };
    assert!(store.queue_complete(request.id, done).await.unwrap());
    let (result, logs) = store.queue_result(request.id).await.unwrap().unwrap();
    assert_eq!(result, QueueResult { status: 502, content_type: Some("text/plain".to_owned()), body: vec![0, 1, 2] });
    assert_eq!(logs, "line one\nline two\n");
    let after = store.queue_request(request.id).await.unwrap().unwrap();
    assert_eq!(
        after.outcome,
        Some(QueueOutcome {
            status: 502,
            error: Some("the runner crashed".to_owned()),
            error_type: Some("runner_failed".to_owned())
        })
    );
    assert_eq!((after.failed_attempts, after.runner, after.webhook_state), (0, None, None));
    assert_eq!(after.attempts.len(), 2);
    assert_eq!(after.attempts[0].outcome.as_deref(), Some("lost"));
    assert!(after.attempts[0].ended_at.is_some());
    assert_eq!((after.attempts[1].outcome.as_deref(), after.attempts[1].ended_at), (None, None), "left open");
    assert!(store.queue_result(Uuid::new_v4()).await.unwrap().is_none());
}

async fn a_restart_requeues_running_requests_and_expiry_spares_pending_webhooks(store: Store) {
    let app = Uuid::new_v4();
    let running = store.queue_insert(new_request(app, "1")).await.unwrap();
    store.queue_start(running.id, RunnerId(Uuid::new_v4())).await.unwrap();
    assert_eq!(store.queue_interrupted("server restarted".to_owned(), None).await.unwrap(), 1);
    let back = store.queue_request(running.id).await.unwrap().unwrap();
    assert_eq!((back.state, back.failed_attempts), (QueueState::InQueue, 0));
    assert_eq!(back.attempts[0].outcome.as_deref(), Some("server restarted"));
    assert!(back.started_at.is_some(), "the first start is kept");

    let mut hooked = new_request(app, "2");
    hooked.webhook = Some("http://127.0.0.1:9/hook".to_owned());
    let hooked = store.queue_insert(hooked).await.unwrap();
    store.queue_cancel(hooked.id, completion(400, None)).await.unwrap();
    let pending = store.queue_pending_webhooks().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].webhook_state, Some(WebhookState::Pending));
    let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
    assert_eq!(store.queue_expire(later).await.unwrap(), 0, "its webhook is still pending");
    store.queue_set_webhook(hooked.id, WebhookState::Delivered).await.unwrap();
    assert!(store.queue_pending_webhooks().await.unwrap().is_empty());
    let earlier = OffsetDateTime::now_utc() - time::Duration::hours(1);
    assert_eq!(store.queue_expire(earlier).await.unwrap(), 0, "completed after the cut");
    assert_eq!(store.queue_expire(later).await.unwrap(), 1);
    assert!(store.queue_request(hooked.id).await.unwrap().is_none());
    assert!(store.queue_request(running.id).await.unwrap().is_some(), "an unfinished one never expires");
}

async fn an_apps_requests_are_counted_by_state(store: Store) {
    let (app, other) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(store.queue_counts(app).await.unwrap(), store::QueueCounts::default());
    let first = store.queue_insert(new_request(app, "1")).await.unwrap();
    let second = store.queue_insert(new_request(app, "2")).await.unwrap();
    store.queue_insert(new_request(app, "3")).await.unwrap();
    store.queue_insert(new_request(other, "x")).await.unwrap();
    assert!(store.queue_start(first.id, RunnerId(Uuid::new_v4())).await.unwrap());
    let counts = store.queue_counts(app).await.unwrap();
    assert_eq!((counts.in_queue, counts.in_progress, counts.completed), (2, 1, 0));
    assert_eq!(counts.oldest_waiting, Some(second.created_at), "the oldest still waiting");
    store.queue_complete(first.id, completion(200, None)).await.unwrap();
    let counts = store.queue_counts(app).await.unwrap();
    assert_eq!((counts.in_queue, counts.in_progress, counts.completed), (2, 0, 1));
}

on_both_backends!(
    a_request_moves_through_its_states_and_keeps_its_attempts,
    a_new_request_reads_back_as_it_was_written,
    requests_wait_in_submission_order_per_app,
    concurrent_starts_of_a_request_have_one_winner,
    a_cancel_racing_a_start_agrees_with_it,
    cancel_wins_over_a_later_start_and_marks_a_running_request,
    a_completed_request_keeps_its_result_and_logs,
    a_restart_requeues_running_requests_and_expiry_spares_pending_webhooks,
    an_apps_requests_are_counted_by_state,
);
