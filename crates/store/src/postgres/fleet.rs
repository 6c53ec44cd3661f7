//! SQL of servers, app leases and revisions' code on PostgreSQL. Every time that decides
//! a lease is PostgreSQL's own (`clock_timestamp()`), so the servers' clocks never do.

use std::path::Path;

use deadpool_postgres::GenericClient;
use model::ids::RevisionId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use super::Postgres;
use crate::fleet::{CODE_PART, RevisionFile, fenced};
use crate::values::{from_millis, uuid};
use crate::{Fence, Lease, Result, ServerRecord, StoreError};

/// The database's clock, in milliseconds since the epoch.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// The channel on which a change of who holds which lease is announced.
const LEASES_CHANNEL: &str = "hangar_leases";

/// Servers not seen for this many lease times are forgotten.
const FORGET_AFTER_TTLS: i64 = 60;

/// Fails unless `fence` is the app's lease and in force. It locks the lease's row until
/// the transaction ends, so the lease cannot pass to another server before the write
/// this guards has committed.
pub(super) async fn check_fence(conn: &impl GenericClient, app_id: Uuid, fence: &Fence) -> Result<()> {
    let held = conn
        .query_opt(
            &format!(
                "SELECT 1 FROM app_leases WHERE app_id = $1 AND owner = $2 AND epoch = $3 AND expires_at > {NOW_MS} \
                 FOR UPDATE"
            ),
            &[&app_id.to_string(), &fence.owner, &fence.epoch],
        )
        .await?;
    held.map(|_| ()).ok_or_else(|| fenced(app_id, fence))
}

impl Postgres {
    /// A connection of its own that listens on the leases' channel: each notification
    /// (leases released) comes out of the returned [`LeaseChanges`], which ends when the
    /// connection does.
    pub(crate) async fn listen_leases(&self) -> Result<crate::fleet::LeaseChanges> {
        use futures_util::StreamExt;
        let (client, mut connection) = self.config.connect(tokio_postgres::NoTls).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the connection listening for lease changes ended");
                        return;
                    }
                }
            }
        });
        client.batch_execute(&format!("LISTEN {LEASES_CHANNEL}")).await?;
        Ok(crate::fleet::LeaseChanges { changes: rx, _client: Some(client) })
    }

    pub(crate) async fn announce_server(
        &self,
        id: &str,
        api: &str,
        gateway: &str,
        ttl: i64,
    ) -> Result<Vec<ServerRecord>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            &format!(
                "INSERT INTO servers (id, api_url, gateway_url, started_at, seen_at) VALUES ($1, $2, $3, {NOW_MS}, {NOW_MS})
                 ON CONFLICT (id) DO UPDATE SET api_url = $2, gateway_url = $3, seen_at = {NOW_MS}"
            ),
            &[&id, &api, &gateway],
        )
        .await?;
        tx.execute(&format!("DELETE FROM servers WHERE seen_at < {NOW_MS} - $1"), &[&(ttl * FORGET_AFTER_TTLS)])
            .await?;
        let rows = tx
            .query(
                &format!(
                    "SELECT id, api_url, gateway_url, started_at, seen_at FROM servers WHERE seen_at > {NOW_MS} - $1
                     ORDER BY started_at, id"
                ),
                &[&ttl],
            )
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| {
                Ok(ServerRecord {
                    id: r.try_get(0)?,
                    api_url: r.try_get(1)?,
                    gateway_url: r.try_get(2)?,
                    started_at: from_millis(r.try_get(3)?)?,
                    seen_at: from_millis(r.try_get(4)?)?,
                })
            })
            .collect()
    }

    pub(crate) async fn retire_server(&self, id: &str) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("DELETE FROM servers WHERE id = $1", &[&id]).await?;
        let released =
            tx.execute("UPDATE app_leases SET expires_at = 0 WHERE owner = $1 AND expires_at > 0", &[&id]).await?;
        if released > 0 {
            tx.execute("SELECT pg_notify($1, $2)", &[&LEASES_CHANNEL, &id]).await?;
        }
        tx.commit().await?;
        Ok(released)
    }

    pub(crate) async fn renew_leases(&self, owner: &str, ttl: i64) -> Result<Vec<(Uuid, i64)>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "UPDATE app_leases SET expires_at = {NOW_MS} + $2 WHERE owner = $1 AND expires_at > {NOW_MS}
                     RETURNING app_id, epoch"
                ),
                &[&owner, &ttl],
            )
            .await?;
        rows.iter().map(|r| Ok((uuid(r.try_get(0)?)?, r.try_get(1)?))).collect()
    }

    pub(crate) async fn take_lease(&self, app_id: Uuid, owner: &str, ttl: i64) -> Result<Option<i64>> {
        // A lease taken at the same moment by another server: the row's lock makes one
        // wait, and the condition is checked again once the other has committed.
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "INSERT INTO app_leases (app_id, owner, epoch, expires_at)
                     SELECT $1, $2, 1, {NOW_MS} + $3 WHERE EXISTS (SELECT 1 FROM apps WHERE id = $1)
                     ON CONFLICT (app_id) DO UPDATE
                     SET owner = EXCLUDED.owner, epoch = app_leases.epoch + 1, expires_at = EXCLUDED.expires_at
                     WHERE app_leases.expires_at <= {NOW_MS}
                     RETURNING epoch"
                ),
                &[&app_id.to_string(), &owner, &ttl],
            )
            .await;
        match row {
            Ok(row) => row.map(|r| r.try_get(0)).transpose().map_err(Into::into),
            // The app was deleted between the check and the insert.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn release_lease(&self, app_id: Uuid, fence: &Fence) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let released = tx
            .execute(
                &format!(
                    "UPDATE app_leases SET expires_at = 0
                     WHERE app_id = $1 AND owner = $2 AND epoch = $3 AND expires_at > {NOW_MS}"
                ),
                &[&app_id.to_string(), &fence.owner, &fence.epoch],
            )
            .await?;
        if released == 1 {
            tx.execute("SELECT pg_notify($1, $2)", &[&LEASES_CHANNEL, &app_id.to_string()]).await?;
        }
        tx.commit().await?;
        Ok(released == 1)
    }

    pub(crate) async fn publish_runners(&self, owner: &str, counts: &[(Uuid, u32)]) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        for (app, n) in counts {
            tx.execute(
                "UPDATE app_leases SET runners = $3 WHERE app_id = $1 AND owner = $2",
                &[&app.to_string(), &owner, &i64::from(*n)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn leases(&self) -> Result<Vec<Lease>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT app_id, owner, epoch, expires_at > {NOW_MS}, runners FROM app_leases ORDER BY app_id"),
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Lease {
                    app_id: uuid(r.try_get(0)?)?,
                    owner: r.try_get(1)?,
                    epoch: r.try_get(2)?,
                    live: r.try_get(3)?,
                    runners: u32::try_from(r.try_get::<_, i64>(4)?).unwrap_or(0),
                })
            })
            .collect()
    }

    pub(crate) async fn put_revision_file(
        &self,
        revision: RevisionId,
        kind: RevisionFile,
        digest: &str,
        path: &Path,
    ) -> Result<()> {
        let mut file = tokio::fs::File::open(path).await?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let id = revision.to_string();
        tx.execute("DELETE FROM revision_files WHERE revision_id = $1 AND kind = $2", &[&id, &kind.as_str()]).await?;
        tx.execute(
            "INSERT INTO revision_files (revision_id, kind, digest, parts) VALUES ($1, $2, $3, 0)",
            &[&id, &kind.as_str(), &digest],
        )
        .await?;
        let mut parts = 0_i64;
        loop {
            let mut part = Vec::with_capacity(CODE_PART);
            (&mut file).take(CODE_PART as u64).read_to_end(&mut part).await?;
            if part.is_empty() {
                break;
            }
            tx.execute(
                "INSERT INTO revision_file_parts (revision_id, kind, part, bytes) VALUES ($1, $2, $3, $4)",
                &[&id, &kind.as_str(), &parts, &part],
            )
            .await?;
            parts += 1;
        }
        tx.execute(
            "UPDATE revision_files SET parts = $3 WHERE revision_id = $1 AND kind = $2",
            &[&id, &kind.as_str(), &parts],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn revision_file(
        &self,
        revision: RevisionId,
        kind: RevisionFile,
        path: &Path,
    ) -> Result<Option<String>> {
        let client = self.client().await?;
        let id = revision.to_string();
        let stored = client
            .query_opt(
                "SELECT digest, parts FROM revision_files WHERE revision_id = $1 AND kind = $2",
                &[&id, &kind.as_str()],
            )
            .await?;
        let Some(stored) = stored else { return Ok(None) };
        let (digest, parts): (String, i64) = (stored.try_get(0)?, stored.try_get(1)?);
        let mut file = tokio::fs::File::create(path).await?;
        for part in 0..parts {
            let row = client
                .query_opt(
                    "SELECT bytes FROM revision_file_parts WHERE revision_id = $1 AND kind = $2 AND part = $3",
                    &[&id, &kind.as_str(), &part],
                )
                .await?
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("revision {revision}'s {} lacks part {part}", kind.as_str()))
                })?;
            let bytes: Vec<u8> = row.try_get(0)?;
            file.write_all(&bytes).await?;
        }
        file.sync_all().await?;
        Ok(Some(digest))
    }
}
