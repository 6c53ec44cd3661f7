//! SQL of the durable queue: requests, their attempts and their results.
//!
//! A request moves `in_queue` → `in_progress` → `completed`, and back from
//! `in_progress` to `in_queue` when its runner is lost. Every move is one conditional
//! `UPDATE … WHERE state = …`, so a cancel and a start racing each other cannot both
//! win: whichever commits first decides.

use model::ids::{RevisionId, RunnerId};
use model::records::{QueueAttempt, QueueOutcome, QueueRequest, QueueResult};
use model::revision::{QueueState, WebhookState};
use rusqlite::{Connection, OptionalExtension, Row, params};
use uuid::Uuid;

use super::Sqlite;
use crate::values::{corrupt, from_millis, millis, now, uuid};
use crate::{CancelOutcome, Completion, NewQueueRequest, QueueCounts, QueuePayload, Result};

const COLUMNS: &str = "seq, id, team_id, app_id, route, path, webhook, state, created_at, start_deadline, \
    started_at, completed_at, runner_id, cancel_requested, failed_attempts, result_status, error, error_type, \
    webhook_state, revision";

impl Sqlite {
    pub(crate) fn queue_insert(&self, new: &NewQueueRequest) -> Result<QueueRequest> {
        let headers: String = new.headers.iter().map(|(name, value)| format!("{name}: {value}\n")).collect();
        let conn = self.conn();
        conn.execute(
            "INSERT INTO queue_requests (id, team_id, app_id, route, path, headers, body, webhook, state,
             created_at, start_deadline, revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                new.id.to_string(),
                new.team_id.to_string(),
                new.app_id.to_string(),
                new.route,
                new.path,
                headers,
                new.body,
                new.webhook,
                QueueState::InQueue.as_str(),
                millis(now()),
                new.start_deadline.map(millis),
                new.revision.map(|r| r.to_string()),
            ],
        )?;
        request(&conn, new.id)?.ok_or_else(|| corrupt("queue request just written"))
    }

    pub(crate) fn queue_request(&self, id: Uuid) -> Result<Option<QueueRequest>> {
        request(&self.conn(), id)
    }

    pub(crate) fn queue_position(&self, app_id: Uuid, seq: i64) -> Result<u64> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM queue_requests WHERE app_id = ?1 AND state = ?2 AND seq < ?3",
            params![app_id.to_string(), QueueState::InQueue.as_str(), seq],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    pub(crate) fn queue_payload(&self, id: Uuid) -> Result<Option<QueuePayload>> {
        let row: Option<(String, Vec<u8>)> = self
            .conn()
            .query_row("SELECT headers, body FROM queue_requests WHERE id = ?1", [id.to_string()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        Ok(row.map(|(headers, body)| {
            let headers = headers
                .lines()
                .filter_map(|line| line.split_once(": "))
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect();
            QueuePayload { headers, body }
        }))
    }

    pub(crate) fn queue_start(&self, id: Uuid, runner: RunnerId) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let at = millis(now());
        let started = tx.execute(
            "UPDATE queue_requests SET state = ?2, runner_id = ?3, started_at = COALESCE(started_at, ?4)
             WHERE id = ?1 AND state = ?5",
            params![
                id.to_string(),
                QueueState::InProgress.as_str(),
                runner.to_string(),
                at,
                QueueState::InQueue.as_str()
            ],
        )?;
        if started == 1 {
            tx.execute(
                "INSERT INTO queue_attempts (request_seq, n, runner_id, started_at)
                 SELECT seq, (SELECT COUNT(*) FROM queue_attempts WHERE request_seq = seq), ?2, ?3
                 FROM queue_requests WHERE id = ?1",
                params![id.to_string(), runner.to_string(), at],
            )?;
        }
        tx.commit()?;
        Ok(started == 1)
    }

    pub(crate) fn queue_requeue(&self, id: Uuid, outcome: &str, counts: bool) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        close_attempt(&tx, id, outcome)?;
        let moved = tx.execute(
            "UPDATE queue_requests SET state = ?2, runner_id = NULL, failed_attempts = failed_attempts + ?3
             WHERE id = ?1 AND state = ?4",
            params![id.to_string(), QueueState::InQueue.as_str(), i64::from(counts), QueueState::InProgress.as_str()],
        )?;
        tx.commit()?;
        Ok(moved == 1)
    }

    pub(crate) fn queue_complete(&self, id: Uuid, completion: &Completion) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if let Some(outcome) = &completion.attempt_outcome {
            close_attempt(&tx, id, outcome)?;
        }
        let done = complete(&tx, id, completion)?;
        tx.commit()?;
        Ok(done)
    }

    pub(crate) fn queue_cancel(&self, id: Uuid, cancelled: &Completion) -> Result<CancelOutcome> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let row: Option<(String, Option<String>)> = tx
            .query_row("SELECT state, runner_id FROM queue_requests WHERE id = ?1", [id.to_string()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((state, runner)) = row else { return Ok(CancelOutcome::NotFound) };
        let outcome = match QueueState::parse(&state).ok_or_else(|| corrupt("queue state"))? {
            QueueState::Completed => CancelOutcome::AlreadyCompleted,
            QueueState::InQueue => {
                complete(&tx, id, cancelled)?;
                CancelOutcome::Cancelled
            }
            QueueState::InProgress => {
                tx.execute("UPDATE queue_requests SET cancel_requested = 1 WHERE id = ?1", [id.to_string()])?;
                let runner = runner.map(|r| uuid(r).map(RunnerId)).transpose()?;
                CancelOutcome::Requested(runner)
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    pub(crate) fn queue_result(&self, id: Uuid) -> Result<Option<(QueueResult, String)>> {
        self.conn()
            .query_row(
                "SELECT result_status, result_type, result_body, logs FROM queue_requests
                 WHERE id = ?1 AND state = ?2",
                params![id.to_string(), QueueState::Completed.as_str()],
                |r| {
                    Ok((
                        QueueResult {
                            status: r.get::<_, Option<u16>>(0)?.unwrap_or(500),
                            content_type: r.get(1)?,
                            body: r.get::<_, Option<Vec<u8>>>(2)?.unwrap_or_default(),
                        },
                        r.get::<_, Option<String>>(3)?.unwrap_or_default(),
                    ))
                },
            )
            .optional()
            .map_err(Into::into)
    }

    pub(crate) fn queue_counts(&self, app_id: Uuid) -> Result<QueueCounts> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT state, COUNT(*), MIN(created_at) FROM queue_requests WHERE app_id = ?1 GROUP BY state")?;
        let rows = stmt.query_map([app_id.to_string()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })?;
        let mut counts = QueueCounts::default();
        for row in rows {
            let (state, n, oldest) = row?;
            match QueueState::parse(&state).ok_or_else(|| corrupt("queue state"))? {
                QueueState::InQueue => {
                    counts.in_queue = n as u64;
                    counts.oldest_waiting = Some(from_millis(oldest)?);
                }
                QueueState::InProgress => counts.in_progress = n as u64,
                QueueState::Completed => counts.completed = n as u64,
            }
        }
        Ok(counts)
    }

    pub(crate) fn queue_unfinished(&self, app: Option<Uuid>) -> Result<Vec<QueueRequest>> {
        let conn = self.conn();
        let ids: Vec<String> = conn
            .prepare("SELECT id FROM queue_requests WHERE state != ?1 AND (?2 IS NULL OR app_id = ?2) ORDER BY seq")?
            .query_map(params![QueueState::Completed.as_str(), app.map(|a| a.to_string())], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        ids.into_iter().filter_map(|id| request(&conn, uuid(id).ok()?).transpose()).collect()
    }

    pub(crate) fn queue_interrupted(&self, outcome: &str, app: Option<Uuid>) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let app = app.map(|a| a.to_string());
        tx.execute(
            "UPDATE queue_attempts SET ended_at = ?1, outcome = ?2 WHERE ended_at IS NULL AND (?3 IS NULL OR \
             request_seq IN (SELECT seq FROM queue_requests WHERE app_id = ?3))",
            params![millis(now()), outcome, app],
        )?;
        let moved = tx.execute(
            "UPDATE queue_requests SET state = ?1, runner_id = NULL WHERE state = ?2 AND (?3 IS NULL OR app_id = ?3)",
            params![QueueState::InQueue.as_str(), QueueState::InProgress.as_str(), app],
        )?;
        tx.commit()?;
        Ok(moved as u64)
    }

    pub(crate) fn queue_set_webhook(&self, id: Uuid, state: WebhookState) -> Result<()> {
        self.conn().execute(
            "UPDATE queue_requests SET webhook_state = ?2 WHERE id = ?1",
            params![id.to_string(), state.as_str()],
        )?;
        Ok(())
    }

    pub(crate) fn queue_pending_webhooks(&self) -> Result<Vec<QueueRequest>> {
        let conn = self.conn();
        let ids: Vec<String> = conn
            .prepare("SELECT id FROM queue_requests WHERE webhook_state = ?1 ORDER BY seq")?
            .query_map([WebhookState::Pending.as_str()], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        ids.into_iter().filter_map(|id| request(&conn, uuid(id).ok()?).transpose()).collect()
    }

    pub(crate) fn queue_expire(&self, completed_before: time::OffsetDateTime) -> Result<u64> {
        let deleted = self.conn().execute(
            "DELETE FROM queue_requests WHERE state = ?1 AND completed_at < ?2
             AND (webhook_state IS NULL OR webhook_state != ?3)",
            params![QueueState::Completed.as_str(), millis(completed_before), WebhookState::Pending.as_str()],
        )?;
        Ok(deleted as u64)
    }
}

fn close_attempt(conn: &Connection, id: Uuid, outcome: &str) -> Result<()> {
    conn.execute(
        "UPDATE queue_attempts SET ended_at = ?2, outcome = ?3
         WHERE ended_at IS NULL AND request_seq = (SELECT seq FROM queue_requests WHERE id = ?1)",
        params![id.to_string(), millis(now()), outcome],
    )?;
    Ok(())
}

fn complete(conn: &Connection, id: Uuid, c: &Completion) -> Result<bool> {
    let done = conn.execute(
        "UPDATE queue_requests SET state = ?2, completed_at = ?3, runner_id = NULL, result_status = ?4,
         result_type = ?5, result_body = ?6, error = ?7, error_type = ?8, logs = ?9,
         webhook_state = CASE WHEN webhook IS NULL THEN NULL ELSE ?10 END
         WHERE id = ?1 AND state != ?2",
        params![
            id.to_string(),
            QueueState::Completed.as_str(),
            millis(now()),
            c.result.status,
            c.result.content_type,
            c.result.body,
            c.outcome.error,
            c.outcome.error_type,
            c.logs,
            WebhookState::Pending.as_str(),
        ],
    )?;
    Ok(done == 1)
}

fn request(conn: &Connection, id: Uuid) -> Result<Option<QueueRequest>> {
    let Some(mut request) = conn
        .query_row(&format!("SELECT {COLUMNS} FROM queue_requests WHERE id = ?1"), [id.to_string()], request_from_row)
        .optional()?
        .transpose()?
    else {
        return Ok(None);
    };
    request.attempts = conn
        .prepare(
            "SELECT runner_id, started_at, ended_at, outcome FROM queue_attempts WHERE request_seq = ?1 ORDER BY n",
        )?
        .query_map([request.seq], |r| {
            Ok((|| {
                Ok(QueueAttempt {
                    runner: RunnerId(uuid(r.get(0)?)?),
                    started_at: from_millis(r.get(1)?)?,
                    ended_at: r.get::<_, Option<i64>>(2)?.map(from_millis).transpose()?,
                    outcome: r.get(3)?,
                })
            })())
        })?
        .collect::<rusqlite::Result<Result<Vec<_>>>>()??;
    Ok(Some(request))
}

fn request_from_row(row: &Row<'_>) -> rusqlite::Result<Result<QueueRequest>> {
    Ok((|| {
        let state = QueueState::parse(&row.get::<_, String>(7)?).ok_or_else(|| corrupt("queue state"))?;
        let millis_at = |i: usize| -> Result<Option<time::OffsetDateTime>> {
            row.get::<_, Option<i64>>(i)?.map(from_millis).transpose()
        };
        let outcome = match state {
            QueueState::Completed => Some(QueueOutcome {
                status: row.get::<_, Option<u16>>(15)?.unwrap_or(500),
                error: row.get(16)?,
                error_type: row.get(17)?,
            }),
            _ => None,
        };
        Ok(QueueRequest {
            seq: row.get(0)?,
            id: uuid(row.get(1)?)?,
            team_id: uuid(row.get(2)?)?,
            app_id: uuid(row.get(3)?)?,
            route: row.get(4)?,
            path: row.get(5)?,
            webhook: row.get(6)?,
            state,
            created_at: from_millis(row.get(8)?)?,
            start_deadline: millis_at(9)?,
            started_at: millis_at(10)?,
            completed_at: millis_at(11)?,
            runner: row.get::<_, Option<String>>(12)?.map(|r| uuid(r).map(RunnerId)).transpose()?,
            cancel_requested: row.get(13)?,
            failed_attempts: row.get(14)?,
            outcome,
            attempts: Vec::new(),
            webhook_state: row
                .get::<_, Option<String>>(18)?
                .map(|s| WebhookState::parse(&s).ok_or_else(|| corrupt("webhook state")))
                .transpose()?,
            revision: row.get::<_, Option<String>>(19)?.map(|r| uuid(r).map(RevisionId)).transpose()?,
        })
    })())
}
