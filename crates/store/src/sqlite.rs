//! The SQLite backend. All SQL of the embedded store lives here.

mod fleet;
mod queue;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use model::ids::RevisionId;
use model::manifest::{RunnerSpec, Scaling};
use model::records::{App, GuardSettings, GuardWatch, HistoryEntry, Key, Revision, Team, TrafficShare};
use model::revision::{AuthMode, KeyScope, RevisionStatus};
use rusqlite::{Connection, OptionalExtension, Row, params};
use rusqlite_migration::{M, Migrations};
use uuid::Uuid;

use crate::values::{
    annotations_from, annotations_text, corrupt, from_millis, guard_watch_from, guard_watch_text, millis, now,
    revision_id, traffic_from, traffic_text, uuid,
};
use crate::{Activation, NewApp, NewHistory, Result, StoreError, StoredKey};

/// Schema migrations, applied in order and recorded in `user_version`. Only ever append.
const MIGRATIONS: &[M<'static>] = &[
    M::up(
        "CREATE TABLE teams (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        team_id TEXT NOT NULL REFERENCES teams(id),
        scope TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        description TEXT,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE TABLE apps (
        id TEXT PRIMARY KEY,
        team_id TEXT NOT NULL REFERENCES teams(id),
        name TEXT NOT NULL,
        auth TEXT NOT NULL,
        current_revision TEXT,
        keep_alive INTEGER NOT NULL,
        min_concurrency INTEGER NOT NULL,
        max_concurrency INTEGER NOT NULL,
        concurrency_buffer INTEGER NOT NULL,
        concurrency_buffer_perc INTEGER NOT NULL,
        scaling_delay INTEGER NOT NULL,
        request_timeout INTEGER NOT NULL,
        max_multiplexing INTEGER NOT NULL,
        startup_timeout INTEGER NOT NULL,
        machine_type TEXT NOT NULL,
        termination_grace_period INTEGER NOT NULL,
        suspended INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        UNIQUE (team_id, name)
    );
    CREATE TABLE revisions (
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        artifact TEXT NOT NULL,
        manifest TEXT NOT NULL,
        max_multiplexing INTEGER NOT NULL,
        startup_timeout INTEGER NOT NULL,
        machine_type TEXT NOT NULL,
        termination_grace_period INTEGER NOT NULL,
        message TEXT,
        failure TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX revisions_by_app ON revisions(app_id, created_at);
    CREATE INDEX revisions_by_artifact ON revisions(artifact);
    CREATE TABLE history (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        at INTEGER NOT NULL,
        action TEXT NOT NULL,
        key_id TEXT,
        details TEXT NOT NULL
    );
    CREATE INDEX history_by_app ON history(app_id, seq);",
    ),
    M::up(
        "CREATE TABLE secrets (
        team_id TEXT NOT NULL REFERENCES teams(id),
        name TEXT NOT NULL,
        nonce BLOB NOT NULL,
        ciphertext BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (team_id, name)
    );",
    ),
    M::up(
        "CREATE TABLE queue_requests (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        team_id TEXT NOT NULL,
        app_id TEXT NOT NULL,
        route TEXT NOT NULL,
        path TEXT NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        webhook TEXT,
        state TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        start_deadline INTEGER,
        started_at INTEGER,
        completed_at INTEGER,
        runner_id TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        failed_attempts INTEGER NOT NULL DEFAULT 0,
        result_status INTEGER,
        result_type TEXT,
        result_body BLOB,
        error TEXT,
        error_type TEXT,
        logs TEXT,
        webhook_state TEXT
    );
    CREATE INDEX queue_by_app ON queue_requests(app_id, state, seq);
    CREATE INDEX queue_by_state ON queue_requests(state, completed_at);
    CREATE TABLE queue_attempts (
        request_seq INTEGER NOT NULL REFERENCES queue_requests(seq) ON DELETE CASCADE,
        n INTEGER NOT NULL,
        runner_id TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        ended_at INTEGER,
        outcome TEXT,
        PRIMARY KEY (request_seq, n)
    );",
    ),
    // GPUs per runner, where the manifest or `apps scale` says (NULL: the machine type's).
    M::up(
        "ALTER TABLE apps ADD COLUMN num_gpus INTEGER;
    ALTER TABLE revisions ADD COLUMN num_gpus INTEGER;",
    ),
    // Servers sharing the store, the lease on each app's controller, revisions' built code and upload.
    M::up(
        "CREATE TABLE servers (
        id TEXT PRIMARY KEY,
        api_url TEXT NOT NULL,
        gateway_url TEXT NOT NULL,
        started_at INTEGER NOT NULL,
        seen_at INTEGER NOT NULL
    );
    CREATE TABLE app_leases (
        app_id TEXT PRIMARY KEY REFERENCES apps(id) ON DELETE CASCADE,
        owner TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        runners INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE revision_files (
        revision_id TEXT NOT NULL REFERENCES revisions(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        parts INTEGER NOT NULL,
        PRIMARY KEY (revision_id, kind)
    );
    CREATE TABLE revision_file_parts (
        revision_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        part INTEGER NOT NULL,
        bytes BLOB NOT NULL,
        PRIMARY KEY (revision_id, kind, part),
        FOREIGN KEY (revision_id, kind) REFERENCES revision_files(revision_id, kind) ON DELETE CASCADE
    );",
    ),
    // The app's traffic split: `revision=percent` pairs (empty: none).
    // The revision a queue request pins (NULL: it follows the app's split).
    M::up(
        "ALTER TABLE apps ADD COLUMN traffic TEXT NOT NULL DEFAULT '';
    ALTER TABLE queue_requests ADD COLUMN revision TEXT;",
    ),
    // The app's guard: its settings, and what it watches (`key=value` pairs; empty: nothing).
    M::up(
        "ALTER TABLE apps ADD COLUMN guard_enabled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE apps ADD COLUMN guard_window INTEGER NOT NULL DEFAULT 300;
    ALTER TABLE apps ADD COLUMN guard_errors INTEGER NOT NULL DEFAULT 5;
    ALTER TABLE apps ADD COLUMN guard_p95 INTEGER NOT NULL DEFAULT 200;
    ALTER TABLE apps ADD COLUMN guard_watch TEXT NOT NULL DEFAULT '';",
    ),
    // A revision's annotations: `KEY=VALUE` lines.
    M::up("ALTER TABLE revisions ADD COLUMN annotations TEXT NOT NULL DEFAULT '';"),
];

pub(crate) struct Sqlite {
    conn: Mutex<Connection>,
}

const APP_COLUMNS: &str = "id, team_id, name, auth, current_revision, keep_alive, min_concurrency, \
    max_concurrency, concurrency_buffer, concurrency_buffer_perc, scaling_delay, request_timeout, \
    max_multiplexing, startup_timeout, machine_type, termination_grace_period, suspended, created_at, num_gpus, traffic";

/// The guard's columns, which a new app takes the defaults of.
const GUARD_COLUMNS: &str = "guard_enabled, guard_window, guard_errors, guard_p95, guard_watch";

const REVISION_COLUMNS: &str = "id, app_id, status, artifact, manifest, max_multiplexing, \
    startup_timeout, machine_type, termination_grace_period, message, failure, created_at, num_gpus, annotations";

impl Sqlite {
    pub(crate) fn open(path: &Path) -> Result<Sqlite> {
        let mut conn = Connection::open(path)?;
        // WAL keeps readers off the writer's back; FULL sync makes every commit survive
        // a crash of the process or of the machine.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Migrations::from_slice(MIGRATIONS).to_latest(&mut conn)?;
        Ok(Sqlite { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no half-done transaction (rusqlite rolls
        // back on drop), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn create_team(&self, name: &str) -> Result<Team> {
        let team = Team { id: Uuid::now_v7(), name: name.to_owned(), created_at: now() };
        let inserted = self.conn().execute(
            "INSERT INTO teams (id, name, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (name) DO NOTHING",
            params![team.id.to_string(), team.name, millis(team.created_at)],
        )?;
        if inserted == 0 {
            return Err(StoreError::AlreadyExists(format!("team {name:?}")));
        }
        Ok(team)
    }

    pub(crate) fn team_by_name(&self, name: &str) -> Result<Option<Team>> {
        self.conn()
            .query_row("SELECT id, name, created_at FROM teams WHERE name = ?1", [name], team_from_row)
            .optional()?
            .transpose()
    }

    pub(crate) fn team_by_id(&self, id: Uuid) -> Result<Option<Team>> {
        self.conn()
            .query_row("SELECT id, name, created_at FROM teams WHERE id = ?1", [id.to_string()], team_from_row)
            .optional()?
            .transpose()
    }

    pub(crate) fn list_teams(&self) -> Result<Vec<Team>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, name, created_at FROM teams ORDER BY name")?;
        let rows = stmt.query_map([], team_from_row)?;
        rows.map(|r| r?).collect()
    }

    pub(crate) fn create_key(&self, key: &Key, secret_hash: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO keys (id, team_id, scope, secret_hash, description, created_at, revoked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                key.id,
                key.team_id.to_string(),
                key.scope.as_str(),
                secret_hash,
                key.description,
                millis(key.created_at),
                key.revoked_at.map(millis),
            ],
        )?;
        Ok(())
    }

    pub(crate) fn key_by_id(&self, id: &str) -> Result<Option<StoredKey>> {
        self.conn()
            .query_row(
                "SELECT id, team_id, scope, description, created_at, revoked_at, secret_hash FROM keys WHERE id = ?1",
                [id],
                |row| {
                    Ok((|| {
                        let key = Key {
                            id: row.get(0)?,
                            team_id: uuid(row.get(1)?)?,
                            scope: KeyScope::parse(&row.get::<_, String>(2)?).ok_or_else(|| corrupt("key scope"))?,
                            description: row.get(3)?,
                            created_at: from_millis(row.get(4)?)?,
                            revoked_at: row.get::<_, Option<i64>>(5)?.map(from_millis).transpose()?,
                        };
                        Ok(StoredKey { key, secret_hash: row.get(6)? })
                    })())
                },
            )
            .optional()?
            .transpose()
    }

    pub(crate) fn list_keys(&self, team_id: Uuid) -> Result<Vec<Key>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, team_id, scope, description, created_at, revoked_at FROM keys WHERE team_id = ?1 ORDER BY created_at",
        )?;
        let rows = stmt.query_map([team_id.to_string()], |row| {
            Ok((|| {
                Ok(Key {
                    id: row.get(0)?,
                    team_id: uuid(row.get(1)?)?,
                    scope: KeyScope::parse(&row.get::<_, String>(2)?).ok_or_else(|| corrupt("key scope"))?,
                    description: row.get(3)?,
                    created_at: from_millis(row.get(4)?)?,
                    revoked_at: row.get::<_, Option<i64>>(5)?.map(from_millis).transpose()?,
                })
            })())
        })?;
        rows.map(|r| r?).collect()
    }

    pub(crate) fn revoke_key(&self, id: &str) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, millis(now())],
        )?;
        Ok(n > 0)
    }

    pub(crate) fn put_secret(&self, team_id: Uuid, name: &str, nonce: &[u8], ciphertext: &[u8]) -> Result<()> {
        let at = millis(now());
        self.conn().execute(
            "INSERT INTO secrets (team_id, name, nonce, ciphertext, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
             ON CONFLICT (team_id, name) DO UPDATE SET nonce = ?3, ciphertext = ?4, updated_at = ?5",
            params![team_id.to_string(), name, nonce, ciphertext, at],
        )?;
        Ok(())
    }

    pub(crate) fn delete_secret(&self, team_id: Uuid, name: &str) -> Result<bool> {
        let n = self
            .conn()
            .execute("DELETE FROM secrets WHERE team_id = ?1 AND name = ?2", params![team_id.to_string(), name])?;
        Ok(n > 0)
    }

    pub(crate) fn secrets(&self, team_id: Uuid) -> Result<Vec<crate::StoredSecret>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, nonce, ciphertext, created_at, updated_at FROM secrets WHERE team_id = ?1 ORDER BY name",
        )?;
        let rows = stmt.query_map([team_id.to_string()], |row| {
            Ok((|| {
                Ok(crate::StoredSecret {
                    name: row.get(0)?,
                    nonce: row.get(1)?,
                    ciphertext: row.get(2)?,
                    created_at: from_millis(row.get(3)?)?,
                    updated_at: from_millis(row.get(4)?)?,
                })
            })())
        })?;
        rows.map(|r| r?).collect()
    }

    pub(crate) fn count_keys(&self, scope: KeyScope) -> Result<u64> {
        let n: i64 =
            self.conn().query_row("SELECT COUNT(*) FROM keys WHERE scope = ?1", [scope.as_str()], |r| r.get(0))?;
        Ok(n as u64)
    }

    pub(crate) fn list_apps(&self, team_id: Uuid) -> Result<Vec<App>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("SELECT {APP_COLUMNS}, {GUARD_COLUMNS} FROM apps WHERE team_id = ?1 ORDER BY name"))?;
        let rows = stmt.query_map([team_id.to_string()], app_from_row)?;
        rows.map(|r| r?).collect()
    }

    pub(crate) fn app_by_name(&self, team_id: Uuid, name: &str) -> Result<Option<App>> {
        self.conn()
            .query_row(
                &format!("SELECT {APP_COLUMNS}, {GUARD_COLUMNS} FROM apps WHERE team_id = ?1 AND name = ?2"),
                params![team_id.to_string(), name],
                app_from_row,
            )
            .optional()?
            .transpose()
    }

    pub(crate) fn create_app(&self, new: &NewApp) -> Result<App> {
        let app = App {
            id: Uuid::now_v7(),
            team_id: new.team_id,
            name: new.name.clone(),
            auth: new.auth,
            current_revision: None,
            scaling: new.scaling.clone(),
            runner: new.runner.clone(),
            suspended: false,
            created_at: now(),
            traffic: Vec::new(),
            guard: GuardSettings::default(),
            guard_watch: None,
        };
        let s = &app.scaling;
        let r = &app.runner;
        let inserted = self.conn().execute(
            &format!(
                "INSERT INTO apps ({APP_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)
                 ON CONFLICT (team_id, name) DO NOTHING"
            ),
            params![
                app.id.to_string(),
                app.team_id.to_string(),
                app.name,
                app.auth.as_str(),
                None::<String>,
                s.keep_alive as i64,
                s.min_concurrency,
                s.max_concurrency,
                s.concurrency_buffer,
                s.concurrency_buffer_perc,
                s.scaling_delay as i64,
                s.request_timeout as i64,
                r.max_multiplexing,
                r.startup_timeout as i64,
                r.machine_type,
                r.termination_grace_period as i64,
                false,
                millis(app.created_at),
                r.num_gpus,
                "",
            ],
        )?;
        if inserted == 0 {
            return Err(StoreError::AlreadyExists(format!("app {:?}", app.name)));
        }
        Ok(app)
    }

    pub(crate) fn delete_app(&self, app_id: Uuid) -> Result<Vec<String>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let artifacts: Vec<String> = {
            let mut stmt = tx.prepare("SELECT DISTINCT artifact FROM revisions WHERE app_id = ?1")?;
            stmt.query_map([app_id.to_string()], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
        };
        tx.execute("DELETE FROM apps WHERE id = ?1", [app_id.to_string()])?;
        let mut orphaned = Vec::new();
        for artifact in artifacts {
            if !artifact_used(&tx, &artifact)? {
                orphaned.push(artifact);
            }
        }
        tx.commit()?;
        Ok(orphaned)
    }

    pub(crate) fn insert_revision(&self, rev: &Revision) -> Result<()> {
        self.conn().execute(
            &format!(
                "INSERT INTO revisions ({REVISION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
            ),
            params![
                rev.id.to_string(),
                rev.app_id.to_string(),
                rev.status.as_str(),
                rev.artifact,
                rev.manifest,
                rev.runner.max_multiplexing,
                rev.runner.startup_timeout as i64,
                rev.runner.machine_type,
                rev.runner.termination_grace_period as i64,
                rev.message,
                rev.failure,
                millis(rev.created_at),
                rev.runner.num_gpus,
                annotations_text(&rev.annotations),
            ],
        )?;
        Ok(())
    }

    pub(crate) fn revision(&self, id: RevisionId) -> Result<Option<Revision>> {
        self.conn()
            .query_row(
                &format!("SELECT {REVISION_COLUMNS} FROM revisions WHERE id = ?1"),
                [id.to_string()],
                revision_from_row,
            )
            .optional()?
            .transpose()
    }

    pub(crate) fn list_revisions(&self, app_id: Uuid, limit: Option<u32>) -> Result<Vec<Revision>> {
        let conn = self.conn();
        // Ids are random; SQLite's rowid breaks ties between revisions made in the same
        // millisecond in insertion order. A negative LIMIT is none.
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {REVISION_COLUMNS} FROM revisions WHERE app_id = ?1 ORDER BY created_at DESC, rowid DESC LIMIT ?2"
        ))?;
        let limit = limit.map_or(-1, i64::from);
        let rows = stmt.query_map(params![app_id.to_string(), limit], revision_from_row)?;
        rows.map(|r| r?).collect()
    }

    pub(crate) fn count_revisions(&self, app_id: Uuid) -> Result<u64> {
        let n: i64 =
            self.conn()
                .query_row("SELECT COUNT(*) FROM revisions WHERE app_id = ?1", [app_id.to_string()], |r| r.get(0))?;
        Ok(n as u64)
    }

    pub(crate) fn revisions_by_prefix(&self, app_id: Uuid, prefix: &str) -> Result<Vec<Revision>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {REVISION_COLUMNS} FROM revisions WHERE app_id = ?1 AND substr(id, 1, length(?2)) = ?2
             ORDER BY created_at DESC, rowid DESC"
        ))?;
        let rows = stmt.query_map(params![app_id.to_string(), prefix.to_ascii_lowercase()], revision_from_row)?;
        rows.map(|r| r?).collect()
    }

    pub(crate) fn set_suspended(&self, app_id: Uuid, suspended: bool, history: &NewHistory) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("UPDATE apps SET suspended = ?2 WHERE id = ?1", params![app_id.to_string(), suspended])?;
        // The current revision shows the app's state.
        let status = if suspended { RevisionStatus::Suspended } else { RevisionStatus::Deployed };
        tx.execute(
            "UPDATE revisions SET status = ?2 WHERE id = (SELECT current_revision FROM apps WHERE id = ?1)",
            params![app_id.to_string(), status.as_str()],
        )?;
        insert_history(&tx, history)?;
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn fail_revision(&self, id: RevisionId, reason: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE revisions SET status = ?2, failure = ?3 WHERE id = ?1",
            params![id.to_string(), RevisionStatus::Failed.as_str(), reason],
        )?;
        Ok(())
    }

    pub(crate) fn activate_revision(&self, a: &Activation, history: &NewHistory) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if let Some(fence) = &a.fence {
            fleet::check_fence(&tx, a.app_id, fence)?;
        }
        // Only a revision that still exists, is the app's, and has not failed may become
        // current; nothing changes otherwise.
        let revised = tx.execute(
            "UPDATE revisions SET status = ?2, failure = NULL \
             WHERE id = ?1 AND app_id = ?3 AND status IN (?4, ?2, ?5)",
            params![
                a.revision.to_string(),
                RevisionStatus::Deployed.as_str(),
                a.app_id.to_string(),
                RevisionStatus::Deploying.as_str(),
                RevisionStatus::Suspended.as_str()
            ],
        )?;
        if revised != 1 {
            return Err(StoreError::Conflict(format!(
                "revision {} is no longer one of this app's revisions that may become current",
                a.revision
            )));
        }
        // A switch ends any split: the new current revision takes every call.
        let moved = tx.execute(
            "UPDATE apps SET current_revision = ?2, traffic = '' WHERE id = ?1",
            params![a.app_id.to_string(), a.revision.to_string()],
        )?;
        if moved != 1 {
            return Err(StoreError::Conflict(format!("app {} no longer exists", a.app_id)));
        }
        set_runner_spec(&tx, a.app_id, &a.runner)?;
        if let Some(scaling) = &a.scaling {
            set_scaling(&tx, a.app_id, scaling)?;
        }
        if let Some(auth) = a.auth {
            tx.execute("UPDATE apps SET auth = ?2 WHERE id = ?1", params![a.app_id.to_string(), auth.as_str()])?;
        }
        insert_history(&tx, history)?;
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn update_app_values(
        &self,
        app_id: Uuid,
        s: &Scaling,
        r: &RunnerSpec,
        history: &NewHistory,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        set_scaling(&tx, app_id, s)?;
        set_runner_spec(&tx, app_id, r)?;
        insert_history(&tx, history)?;
        tx.commit()?;
        Ok(())
    }

    /// Sets the app's traffic split. Every revision in it must be one of the app's
    /// Deployed revisions other than the current one; nothing changes otherwise.
    pub(crate) fn set_traffic(&self, app_id: Uuid, shares: &[TrafficShare], history: &NewHistory) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for share in shares {
            let ok: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM revisions r JOIN apps a ON a.id = r.app_id \
                 WHERE r.id = ?1 AND r.app_id = ?2 AND r.status = ?3 \
                 AND (a.current_revision IS NULL OR a.current_revision <> r.id))",
                params![share.revision.to_string(), app_id.to_string(), RevisionStatus::Deployed.as_str()],
                |r| r.get(0),
            )?;
            if !ok {
                return Err(StoreError::Conflict(format!(
                    "revision {} is not one of this app's Deployed revisions other than the current one",
                    share.revision
                )));
            }
        }
        let set = tx
            .execute("UPDATE apps SET traffic = ?2 WHERE id = ?1", params![app_id.to_string(), traffic_text(shares)])?;
        if set != 1 {
            return Err(StoreError::Conflict(format!("app {app_id} no longer exists")));
        }
        insert_history(&tx, history)?;
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn set_guard(&self, app_id: Uuid, guard: &GuardSettings, history: &NewHistory) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let set = tx.execute(
            "UPDATE apps SET guard_enabled = ?2, guard_window = ?3, guard_errors = ?4, guard_p95 = ?5 WHERE id = ?1",
            params![
                app_id.to_string(),
                guard.enabled,
                guard.window as i64,
                guard.max_error_increase,
                guard.max_p95_ratio
            ],
        )?;
        if set != 1 {
            return Err(StoreError::Conflict(format!("app {app_id} no longer exists")));
        }
        insert_history(&tx, history)?;
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn set_guard_watch(
        &self,
        app_id: Uuid,
        watch: Option<&GuardWatch>,
        history: Option<&NewHistory>,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE apps SET guard_watch = ?2 WHERE id = ?1",
            params![app_id.to_string(), guard_watch_text(watch)],
        )?;
        if let Some(history) = history {
            insert_history(&tx, history)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn delete_revision(&self, id: RevisionId) -> Result<Option<String>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let artifact: Option<String> =
            tx.query_row("SELECT artifact FROM revisions WHERE id = ?1", [id.to_string()], |r| r.get(0)).optional()?;
        let Some(artifact) = artifact else { return Ok(None) };
        tx.execute("DELETE FROM revisions WHERE id = ?1", [id.to_string()])?;
        let used = artifact_used(&tx, &artifact)?;
        tx.commit()?;
        Ok((!used).then_some(artifact))
    }

    pub(crate) fn fail_interrupted_deploys(&self, app: Option<Uuid>) -> Result<Vec<(Revision, Uuid)>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let revisions: Vec<Revision> = {
            let mut stmt = tx.prepare(&format!(
                "SELECT {REVISION_COLUMNS} FROM revisions WHERE status = ?1 AND (?2 IS NULL OR app_id = ?2)"
            ))?;
            let rows = stmt.query_map(
                params![RevisionStatus::Deploying.as_str(), app.map(|a| a.to_string())],
                revision_from_row,
            )?;
            rows.map(|r| r?).collect::<Result<_>>()?
        };
        let mut changed = Vec::new();
        for mut rev in revisions {
            tx.execute(
                "UPDATE revisions SET status = ?2, failure = 'interrupted' WHERE id = ?1",
                params![rev.id.to_string(), RevisionStatus::Failed.as_str()],
            )?;
            insert_history(
                &tx,
                &NewHistory {
                    app_id: rev.app_id,
                    action: "deploy_failed".to_owned(),
                    key_id: None,
                    details: format!("revision {} failed: interrupted (the server stopped during the deploy)", rev.id),
                },
            )?;
            rev.status = RevisionStatus::Failed;
            rev.failure = Some("interrupted".to_owned());
            let app_id = rev.app_id;
            changed.push((rev, app_id));
        }
        tx.commit()?;
        Ok(changed)
    }

    pub(crate) fn artifacts_in_use(&self) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT DISTINCT artifact FROM revisions")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub(crate) fn add_history(&self, entry: &NewHistory) -> Result<()> {
        insert_history(&self.conn(), entry)
    }

    pub(crate) fn list_history(&self, app_id: Uuid) -> Result<Vec<HistoryEntry>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT at, action, key_id, details FROM history WHERE app_id = ?1 ORDER BY seq DESC")?;
        let rows = stmt.query_map([app_id.to_string()], |row| {
            Ok((|| {
                Ok(HistoryEntry {
                    at: from_millis(row.get(0)?)?,
                    action: row.get(1)?,
                    key_id: row.get(2)?,
                    details: row.get(3)?,
                })
            })())
        })?;
        rows.map(|r| r?).collect()
    }
}

fn insert_history(conn: &Connection, entry: &NewHistory) -> Result<()> {
    conn.execute(
        "INSERT INTO history (app_id, at, action, key_id, details) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![entry.app_id.to_string(), millis(now()), entry.action, entry.key_id, entry.details],
    )?;
    Ok(())
}

/// Sets an app's runtime-tunable scaling values.
fn set_scaling(conn: &Connection, app_id: Uuid, s: &Scaling) -> Result<()> {
    conn.execute(
        "UPDATE apps SET keep_alive = ?2, min_concurrency = ?3, max_concurrency = ?4, concurrency_buffer = ?5,
         concurrency_buffer_perc = ?6, scaling_delay = ?7, request_timeout = ?8 WHERE id = ?1",
        params![
            app_id.to_string(),
            s.keep_alive as i64,
            s.min_concurrency,
            s.max_concurrency,
            s.concurrency_buffer,
            s.concurrency_buffer_perc,
            s.scaling_delay as i64,
            s.request_timeout as i64,
        ],
    )?;
    Ok(())
}

/// Sets an app's code-specific values.
fn set_runner_spec(conn: &Connection, app_id: Uuid, r: &RunnerSpec) -> Result<()> {
    conn.execute(
        "UPDATE apps SET max_multiplexing = ?2, startup_timeout = ?3, machine_type = ?4,
         termination_grace_period = ?5, num_gpus = ?6 WHERE id = ?1",
        params![
            app_id.to_string(),
            r.max_multiplexing,
            r.startup_timeout as i64,
            r.machine_type,
            r.termination_grace_period as i64,
            r.num_gpus,
        ],
    )?;
    Ok(())
}

fn artifact_used(conn: &Connection, artifact: &str) -> Result<bool> {
    Ok(conn.query_row("SELECT EXISTS (SELECT 1 FROM revisions WHERE artifact = ?1)", [artifact], |r| r.get(0))?)
}

fn team_from_row(row: &Row<'_>) -> rusqlite::Result<Result<Team>> {
    Ok((|| Ok(Team { id: uuid(row.get(0)?)?, name: row.get(1)?, created_at: from_millis(row.get(2)?)? }))())
}

fn app_from_row(row: &Row<'_>) -> rusqlite::Result<Result<App>> {
    Ok((|| {
        Ok(App {
            id: uuid(row.get(0)?)?,
            team_id: uuid(row.get(1)?)?,
            name: row.get(2)?,
            auth: AuthMode::parse(&row.get::<_, String>(3)?).ok_or_else(|| corrupt("app auth"))?,
            current_revision: row.get::<_, Option<String>>(4)?.map(revision_id).transpose()?,
            scaling: Scaling {
                keep_alive: row.get::<_, i64>(5)? as u64,
                min_concurrency: row.get(6)?,
                max_concurrency: row.get(7)?,
                concurrency_buffer: row.get(8)?,
                concurrency_buffer_perc: row.get(9)?,
                scaling_delay: row.get::<_, i64>(10)? as u64,
                request_timeout: row.get::<_, i64>(11)? as u64,
            },
            runner: RunnerSpec {
                max_multiplexing: row.get(12)?,
                startup_timeout: row.get::<_, i64>(13)? as u64,
                machine_type: row.get(14)?,
                num_gpus: row.get(18)?,
                termination_grace_period: row.get::<_, i64>(15)? as u64,
            },
            suspended: row.get(16)?,
            created_at: from_millis(row.get(17)?)?,
            traffic: traffic_from(&row.get::<_, String>(19)?)?,
            guard: GuardSettings {
                enabled: row.get(20)?,
                window: row.get::<_, i64>(21)? as u64,
                max_error_increase: row.get(22)?,
                max_p95_ratio: row.get(23)?,
            },
            guard_watch: guard_watch_from(&row.get::<_, String>(24)?)?,
        })
    })())
}

fn revision_from_row(row: &Row<'_>) -> rusqlite::Result<Result<Revision>> {
    Ok((|| {
        Ok(Revision {
            id: revision_id(row.get(0)?)?,
            app_id: uuid(row.get(1)?)?,
            status: RevisionStatus::parse(&row.get::<_, String>(2)?).ok_or_else(|| corrupt("revision status"))?,
            artifact: row.get(3)?,
            manifest: row.get(4)?,
            runner: RunnerSpec {
                max_multiplexing: row.get(5)?,
                startup_timeout: row.get::<_, i64>(6)? as u64,
                machine_type: row.get(7)?,
                num_gpus: row.get(12)?,
                termination_grace_period: row.get::<_, i64>(8)? as u64,
            },
            message: row.get(9)?,
            failure: row.get(10)?,
            created_at: from_millis(row.get(11)?)?,
            annotations: annotations_from(&row.get::<_, String>(13)?),
        })
    })())
}
