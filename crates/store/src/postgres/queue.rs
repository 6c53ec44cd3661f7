//! SQL of the durable queue on PostgreSQL: requests, their attempts and their results.
//!
//! As on SQLite, every move of a request is one conditional `UPDATE … WHERE state = …`.
//! Here several servers may race for the same request: PostgreSQL locks the row for the
//! first `UPDATE` and re-checks the condition for the second once the first commits, so
//! exactly one start (or one cancel) wins. A cancel reads the state `FOR UPDATE` before
//! it decides, so no start can slip in between its read and its write.

use deadpool_postgres::GenericClient;
use model::ids::{RevisionId, RunnerId};
use model::records::{QueueAttempt, QueueOutcome, QueueRequest, QueueResult};
use model::revision::{QueueState, WebhookState};
use tokio_postgres::{IsolationLevel, Row};
use uuid::Uuid;

use super::{Postgres, opt_millis_at, u32_at};
use crate::values::{corrupt, from_millis, millis, now, uuid};
use crate::{CancelOutcome, Completion, NewQueueRequest, QueueCounts, QueuePayload, Result};

const COLUMNS: &str = "seq, id, team_id, app_id, route, path, webhook, state, created_at, start_deadline, \
    started_at, completed_at, runner_id, cancel_requested, failed_attempts, result_status, error, error_type, \
    webhook_state, revision";

impl Postgres {
    pub(crate) async fn queue_insert(&self, new: &NewQueueRequest) -> Result<QueueRequest> {
        let headers: String = new.headers.iter().map(|(name, value)| format!("{name}: {value}\n")).collect();
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO queue_requests (id, team_id, app_id, route, path, headers, body, webhook, state,
                 created_at, start_deadline, revision) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[
                    &new.id.to_string(),
                    &new.team_id.to_string(),
                    &new.app_id.to_string(),
                    &new.route,
                    &new.path,
                    &headers,
                    &new.body,
                    &new.webhook,
                    &QueueState::InQueue.as_str(),
                    &millis(now()),
                    &new.start_deadline.map(millis),
                    &new.revision.map(|r| r.to_string()),
                ],
            )
            .await?;
        request(&client, new.id).await?.ok_or_else(|| corrupt("queue request just written"))
    }

    pub(crate) async fn queue_request(&self, id: Uuid) -> Result<Option<QueueRequest>> {
        let mut client = self.client().await?;
        let tx = snapshot(&mut client).await?;
        request(&tx, id).await
    }

    pub(crate) async fn queue_position(&self, app_id: Uuid, seq: i64) -> Result<u64> {
        let n: i64 = self
            .client()
            .await?
            .query_one(
                "SELECT COUNT(*) FROM queue_requests WHERE app_id = $1 AND state = $2 AND seq < $3",
                &[&app_id.to_string(), &QueueState::InQueue.as_str(), &seq],
            )
            .await?
            .try_get(0)?;
        Ok(n as u64)
    }

    pub(crate) async fn queue_payload(&self, id: Uuid) -> Result<Option<QueuePayload>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT headers, body FROM queue_requests WHERE id = $1", &[&id.to_string()])
            .await?;
        let Some(row) = row else { return Ok(None) };
        let headers: String = row.try_get("headers")?;
        let headers = headers
            .lines()
            .filter_map(|line| line.split_once(": "))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        Ok(Some(QueuePayload { headers, body: row.try_get("body")? }))
    }

    pub(crate) async fn queue_start(&self, id: Uuid, runner: RunnerId) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let at = millis(now());
        let started = tx
            .query_opt(
                // A row another transaction holds (a cancel deciding, or a second
                // start) is skipped, not waited for: that one decides the request.
                "UPDATE queue_requests SET state = $2, runner_id = $3, started_at = COALESCE(started_at, $4)
                 WHERE seq = (SELECT seq FROM queue_requests WHERE id = $1 AND state = $5 FOR UPDATE SKIP LOCKED)
                 RETURNING seq",
                &[
                    &id.to_string(),
                    &QueueState::InProgress.as_str(),
                    &runner.to_string(),
                    &at,
                    &QueueState::InQueue.as_str(),
                ],
            )
            .await?;
        let Some(row) = started else { return Ok(false) };
        let seq: i64 = row.try_get("seq")?;
        tx.execute(
            "INSERT INTO queue_attempts (request_seq, n, runner_id, started_at)
             VALUES ($1, (SELECT COUNT(*) FROM queue_attempts WHERE request_seq = $1), $2, $3)",
            &[&seq, &runner.to_string(), &at],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(crate) async fn queue_requeue(&self, id: Uuid, outcome: &str, counts: bool) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        close_attempt(&tx, id, outcome).await?;
        let moved = tx
            .execute(
                "UPDATE queue_requests SET state = $2, runner_id = NULL, failed_attempts = failed_attempts + $3
                 WHERE id = $1 AND state = $4",
                &[&id.to_string(), &QueueState::InQueue.as_str(), &i64::from(counts), &QueueState::InProgress.as_str()],
            )
            .await?;
        tx.commit().await?;
        Ok(moved == 1)
    }

    pub(crate) async fn queue_complete(&self, id: Uuid, completion: &Completion) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some(outcome) = &completion.attempt_outcome {
            close_attempt(&tx, id, outcome).await?;
        }
        let done = complete(&tx, id, completion).await?;
        tx.commit().await?;
        Ok(done)
    }

    pub(crate) async fn queue_cancel(&self, id: Uuid, cancelled: &Completion) -> Result<CancelOutcome> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt("SELECT state, runner_id FROM queue_requests WHERE id = $1 FOR UPDATE", &[&id.to_string()])
            .await?;
        let Some(row) = row else { return Ok(CancelOutcome::NotFound) };
        let state: &str = row.try_get("state")?;
        let outcome = match QueueState::parse(state).ok_or_else(|| corrupt("queue state"))? {
            QueueState::Completed => CancelOutcome::AlreadyCompleted,
            QueueState::InQueue => {
                complete(&tx, id, cancelled).await?;
                CancelOutcome::Cancelled
            }
            QueueState::InProgress => {
                tx.execute("UPDATE queue_requests SET cancel_requested = TRUE WHERE id = $1", &[&id.to_string()])
                    .await?;
                let runner =
                    row.try_get::<_, Option<String>>("runner_id")?.map(|r| uuid(r).map(RunnerId)).transpose()?;
                CancelOutcome::Requested(runner)
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    pub(crate) async fn queue_result(&self, id: Uuid) -> Result<Option<(QueueResult, String)>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT result_status, result_type, result_body, logs FROM queue_requests WHERE id = $1 AND state = $2",
                &[&id.to_string(), &QueueState::Completed.as_str()],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let result = QueueResult {
            status: status_at(&row, "result_status")?,
            content_type: row.try_get("result_type")?,
            body: row.try_get::<_, Option<Vec<u8>>>("result_body")?.unwrap_or_default(),
        };
        Ok(Some((result, row.try_get::<_, Option<String>>("logs")?.unwrap_or_default())))
    }

    pub(crate) async fn queue_counts(&self, app_id: Uuid) -> Result<QueueCounts> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT state, COUNT(*) AS n, MIN(created_at) AS oldest FROM queue_requests WHERE app_id = $1 GROUP BY state",
                &[&app_id.to_string()],
            )
            .await?;
        let mut counts = QueueCounts::default();
        for row in rows {
            let n = row.try_get::<_, i64>("n")? as u64;
            match QueueState::parse(row.try_get("state")?).ok_or_else(|| corrupt("queue state"))? {
                QueueState::InQueue => {
                    counts.in_queue = n;
                    counts.oldest_waiting = Some(from_millis(row.try_get("oldest")?)?);
                }
                QueueState::InProgress => counts.in_progress = n,
                QueueState::Completed => counts.completed = n,
            }
        }
        Ok(counts)
    }

    pub(crate) async fn queue_unfinished(&self, app: Option<Uuid>) -> Result<Vec<QueueRequest>> {
        let mut client = self.client().await?;
        let tx = snapshot(&mut client).await?;
        let rows = tx
            .query(
                "SELECT id FROM queue_requests WHERE state != $1 AND ($2::TEXT IS NULL OR app_id = $2) ORDER BY seq",
                &[&QueueState::Completed.as_str(), &app.map(|a| a.to_string())],
            )
            .await?;
        requests(&tx, &rows).await
    }

    pub(crate) async fn queue_interrupted(&self, outcome: &str, app: Option<Uuid>) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let app = app.map(|a| a.to_string());
        tx.execute(
            "UPDATE queue_attempts SET ended_at = $1, outcome = $2 WHERE ended_at IS NULL AND ($3::TEXT IS NULL OR \
             request_seq IN (SELECT seq FROM queue_requests WHERE app_id = $3))",
            &[&millis(now()), &outcome, &app],
        )
        .await?;
        let moved = tx
            .execute(
                "UPDATE queue_requests SET state = $1, runner_id = NULL WHERE state = $2 AND ($3::TEXT IS NULL OR app_id = $3)",
                &[&QueueState::InQueue.as_str(), &QueueState::InProgress.as_str(), &app],
            )
            .await?;
        tx.commit().await?;
        Ok(moved)
    }

    pub(crate) async fn queue_set_webhook(&self, id: Uuid, state: WebhookState) -> Result<()> {
        self.client()
            .await?
            .execute("UPDATE queue_requests SET webhook_state = $2 WHERE id = $1", &[&id.to_string(), &state.as_str()])
            .await?;
        Ok(())
    }

    pub(crate) async fn queue_pending_webhooks(&self) -> Result<Vec<QueueRequest>> {
        let mut client = self.client().await?;
        let tx = snapshot(&mut client).await?;
        let rows = tx
            .query(
                "SELECT id FROM queue_requests WHERE webhook_state = $1 ORDER BY seq",
                &[&WebhookState::Pending.as_str()],
            )
            .await?;
        requests(&tx, &rows).await
    }

    pub(crate) async fn queue_expire(&self, completed_before: time::OffsetDateTime) -> Result<u64> {
        let deleted = self
            .client()
            .await?
            .execute(
                "DELETE FROM queue_requests WHERE state = $1 AND completed_at < $2
                 AND (webhook_state IS NULL OR webhook_state != $3)",
                &[&QueueState::Completed.as_str(), &millis(completed_before), &WebhookState::Pending.as_str()],
            )
            .await?;
        Ok(deleted)
    }
}

/// A read-only transaction that sees one moment, so a request and its attempts read
/// together agree with each other (SQLite's reads hold its one connection throughout).
async fn snapshot(client: &mut deadpool_postgres::Client) -> Result<deadpool_postgres::Transaction<'_>> {
    Ok(client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start().await?)
}

async fn close_attempt(conn: &impl GenericClient, id: Uuid, outcome: &str) -> Result<()> {
    conn.execute(
        "UPDATE queue_attempts SET ended_at = $2, outcome = $3
         WHERE ended_at IS NULL AND request_seq = (SELECT seq FROM queue_requests WHERE id = $1)",
        &[&id.to_string(), &millis(now()), &outcome],
    )
    .await?;
    Ok(())
}

async fn complete(conn: &impl GenericClient, id: Uuid, c: &Completion) -> Result<bool> {
    let done = conn
        .execute(
            "UPDATE queue_requests SET state = $2, completed_at = $3, runner_id = NULL, result_status = $4,
             result_type = $5, result_body = $6, error = $7, error_type = $8, logs = $9,
             webhook_state = CASE WHEN webhook IS NULL THEN NULL ELSE $10::TEXT END
             WHERE id = $1 AND state != $2",
            &[
                &id.to_string(),
                &QueueState::Completed.as_str(),
                &millis(now()),
                &i32::from(c.result.status),
                &c.result.content_type,
                &c.result.body,
                &c.outcome.error,
                &c.outcome.error_type,
                &c.logs,
                &WebhookState::Pending.as_str(),
            ],
        )
        .await?;
    Ok(done == 1)
}

/// The requests whose ids `rows` hold, in that order; one deleted meanwhile is left out.
async fn requests(conn: &impl GenericClient, rows: &[Row]) -> Result<Vec<QueueRequest>> {
    let mut found = Vec::with_capacity(rows.len());
    for row in rows {
        let id = uuid(row.try_get("id")?)?;
        if let Some(request) = request(conn, id).await? {
            found.push(request);
        }
    }
    Ok(found)
}

async fn request(conn: &impl GenericClient, id: Uuid) -> Result<Option<QueueRequest>> {
    let row =
        conn.query_opt(&format!("SELECT {COLUMNS} FROM queue_requests WHERE id = $1"), &[&id.to_string()]).await?;
    let Some(row) = row else { return Ok(None) };
    let mut request = request_from_row(&row)?;
    let attempts = conn
        .query(
            "SELECT runner_id, started_at, ended_at, outcome FROM queue_attempts WHERE request_seq = $1 ORDER BY n",
            &[&request.seq],
        )
        .await?;
    request.attempts = attempts
        .iter()
        .map(|r| {
            Ok(QueueAttempt {
                runner: RunnerId(uuid(r.try_get("runner_id")?)?),
                started_at: from_millis(r.try_get("started_at")?)?,
                ended_at: opt_millis_at(r, "ended_at")?,
                outcome: r.try_get("outcome")?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Some(request))
}

/// A result's HTTP status; one never set reads as 500, as on SQLite.
fn status_at(row: &Row, column: &str) -> Result<u16> {
    let status: Option<i32> = row.try_get(column)?;
    status.map_or(Ok(500), |s| u16::try_from(s).map_err(|_| corrupt(column)))
}

fn request_from_row(row: &Row) -> Result<QueueRequest> {
    let state = QueueState::parse(row.try_get("state")?).ok_or_else(|| corrupt("queue state"))?;
    let outcome = match state {
        QueueState::Completed => Some(QueueOutcome {
            status: status_at(row, "result_status")?,
            error: row.try_get("error")?,
            error_type: row.try_get("error_type")?,
        }),
        _ => None,
    };
    Ok(QueueRequest {
        seq: row.try_get("seq")?,
        id: uuid(row.try_get("id")?)?,
        team_id: uuid(row.try_get("team_id")?)?,
        app_id: uuid(row.try_get("app_id")?)?,
        route: row.try_get("route")?,
        path: row.try_get("path")?,
        webhook: row.try_get("webhook")?,
        state,
        created_at: from_millis(row.try_get("created_at")?)?,
        start_deadline: opt_millis_at(row, "start_deadline")?,
        started_at: opt_millis_at(row, "started_at")?,
        completed_at: opt_millis_at(row, "completed_at")?,
        runner: row.try_get::<_, Option<String>>("runner_id")?.map(|r| uuid(r).map(RunnerId)).transpose()?,
        cancel_requested: row.try_get("cancel_requested")?,
        failed_attempts: u32_at(row, "failed_attempts")?,
        outcome,
        attempts: Vec::new(),
        webhook_state: row
            .try_get::<_, Option<String>>("webhook_state")?
            .map(|s| WebhookState::parse(&s).ok_or_else(|| corrupt("webhook state")))
            .transpose()?,
        revision: row.try_get::<_, Option<String>>("revision")?.map(|r| uuid(r).map(RevisionId)).transpose()?,
    })
}
