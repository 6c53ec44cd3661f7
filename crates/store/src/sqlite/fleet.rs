//! SQL of servers, app leases and revisions' code on SQLite. One server owns an
//! embedded store, so its clock is the database's.

use std::io::{Read, Write};
use std::path::Path;

use model::ids::RevisionId;
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use super::Sqlite;
use crate::fleet::{CODE_PART, RevisionFile, fenced};
use crate::values::{from_millis, millis, now, uuid};
use crate::{Fence, Lease, Result, ServerRecord, StoreError};

/// Servers not seen for this many lease times are forgotten.
const FORGET_AFTER_TTLS: i64 = 60;

pub(super) fn check_fence(conn: &Connection, app_id: Uuid, fence: &Fence) -> Result<()> {
    let held: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM app_leases WHERE app_id = ?1 AND owner = ?2 AND epoch = ?3 AND expires_at > ?4",
            params![app_id.to_string(), fence.owner, fence.epoch, millis(now())],
            |r| r.get(0),
        )
        .optional()?;
    held.map(|_| ()).ok_or_else(|| fenced(app_id, fence))
}

impl Sqlite {
    pub(crate) fn announce_server(&self, id: &str, api: &str, gateway: &str, ttl: i64) -> Result<Vec<ServerRecord>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let at = millis(now());
        tx.execute(
            "INSERT INTO servers (id, api_url, gateway_url, started_at, seen_at) VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (id) DO UPDATE SET api_url = ?2, gateway_url = ?3, seen_at = ?4",
            params![id, api, gateway, at],
        )?;
        tx.execute("DELETE FROM servers WHERE seen_at < ?1", [at - ttl * FORGET_AFTER_TTLS])?;
        let servers = {
            let mut stmt = tx.prepare(
                "SELECT id, api_url, gateway_url, started_at, seen_at FROM servers WHERE seen_at > ?1
                 ORDER BY started_at, id",
            )?;
            let rows = stmt.query_map([at - ttl], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?))
            })?;
            rows.map(|row| {
                let (id, api_url, gateway_url, started, seen) = row?;
                Ok(ServerRecord {
                    id,
                    api_url,
                    gateway_url,
                    started_at: from_millis(started)?,
                    seen_at: from_millis(seen)?,
                })
            })
            .collect::<Result<Vec<_>>>()?
        };
        tx.commit()?;
        Ok(servers)
    }

    pub(crate) fn retire_server(&self, id: &str) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM servers WHERE id = ?1", [id])?;
        let released = tx.execute("UPDATE app_leases SET expires_at = 0 WHERE owner = ?1 AND expires_at > 0", [id])?;
        tx.commit()?;
        Ok(released as u64)
    }

    pub(crate) fn renew_leases(&self, owner: &str, ttl: i64) -> Result<Vec<(Uuid, i64)>> {
        let at = millis(now());
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "UPDATE app_leases SET expires_at = ?2 + ?3 WHERE owner = ?1 AND expires_at > ?2 RETURNING app_id, epoch",
        )?;
        let rows = stmt.query_map(params![owner, at, ttl], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        rows.map(|row| {
            let (app, epoch) = row?;
            Ok((uuid(app)?, epoch))
        })
        .collect()
    }

    pub(crate) fn take_lease(&self, app_id: Uuid, owner: &str, ttl: i64) -> Result<Option<i64>> {
        let at = millis(now());
        let taken = self
            .conn()
            .query_row(
                "INSERT INTO app_leases (app_id, owner, epoch, expires_at)
                 SELECT ?1, ?2, 1, ?3 + ?4 WHERE EXISTS (SELECT 1 FROM apps WHERE id = ?1)
                 ON CONFLICT (app_id) DO UPDATE SET owner = ?2, epoch = epoch + 1, expires_at = ?3 + ?4
                 WHERE expires_at <= ?3
                 RETURNING epoch",
                params![app_id.to_string(), owner, at, ttl],
                |r| r.get(0),
            )
            .optional()?;
        Ok(taken)
    }

    pub(crate) fn release_lease(&self, app_id: Uuid, fence: &Fence) -> Result<bool> {
        let released = self.conn().execute(
            "UPDATE app_leases SET expires_at = 0 WHERE app_id = ?1 AND owner = ?2 AND epoch = ?3 AND expires_at > ?4",
            params![app_id.to_string(), fence.owner, fence.epoch, millis(now())],
        )?;
        Ok(released == 1)
    }

    pub(crate) fn publish_runners(&self, owner: &str, counts: &[(Uuid, u32)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (app, n) in counts {
            tx.execute(
                "UPDATE app_leases SET runners = ?3 WHERE app_id = ?1 AND owner = ?2",
                params![app.to_string(), owner, n],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn leases(&self) -> Result<Vec<Lease>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT app_id, owner, epoch, expires_at > ?1, runners FROM app_leases ORDER BY app_id")?;
        let rows = stmt.query_map([millis(now())], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        rows.map(|row| {
            let (app, owner, epoch, live, runners) = row?;
            Ok(Lease { app_id: uuid(app)?, owner, epoch, live, runners: u32::try_from(runners).unwrap_or(0) })
        })
        .collect()
    }

    pub(crate) fn put_revision_file(
        &self,
        revision: RevisionId,
        kind: RevisionFile,
        digest: &str,
        path: &Path,
    ) -> Result<()> {
        let mut file = std::fs::File::open(path)?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let id = revision.to_string();
        tx.execute("DELETE FROM revision_files WHERE revision_id = ?1 AND kind = ?2", params![id, kind.as_str()])?;
        tx.execute(
            "INSERT INTO revision_files (revision_id, kind, digest, parts) VALUES (?1, ?2, ?3, 0)",
            params![id, kind.as_str(), digest],
        )?;
        let mut parts = 0_i64;
        loop {
            let mut part = Vec::with_capacity(CODE_PART);
            (&mut file).take(CODE_PART as u64).read_to_end(&mut part)?;
            if part.is_empty() {
                break;
            }
            tx.execute(
                "INSERT INTO revision_file_parts (revision_id, kind, part, bytes) VALUES (?1, ?2, ?3, ?4)",
                params![id, kind.as_str(), parts, part],
            )?;
            parts += 1;
        }
        tx.execute(
            "UPDATE revision_files SET parts = ?3 WHERE revision_id = ?1 AND kind = ?2",
            params![id, kind.as_str(), parts],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn revision_file(
        &self,
        revision: RevisionId,
        kind: RevisionFile,
        path: &Path,
    ) -> Result<Option<String>> {
        let conn = self.conn();
        let id = revision.to_string();
        let stored: Option<(String, i64)> = conn
            .query_row(
                "SELECT digest, parts FROM revision_files WHERE revision_id = ?1 AND kind = ?2",
                params![id, kind.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((digest, parts)) = stored else { return Ok(None) };
        let mut file = std::fs::File::create(path)?;
        for part in 0..parts {
            let bytes: Vec<u8> = conn
                .query_row(
                    "SELECT bytes FROM revision_file_parts WHERE revision_id = ?1 AND kind = ?2 AND part = ?3",
                    params![id, kind.as_str(), part],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("revision {revision}'s {} lacks part {part}", kind.as_str()))
                })?;
            file.write_all(&bytes)?;
        }
        file.sync_all()?;
        Ok(Some(digest))
    }
}
