//! The PostgreSQL backend, for several servers sharing one database. It keeps the same
//! tables as the SQLite backend and writes values the same way (times as milliseconds,
//! ids as text), so both answer every call alike; only the SQL dialect differs.

mod fleet;
mod queue;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use model::ids::RevisionId;
use model::manifest::{RunnerSpec, Scaling};
use model::records::{App, GuardSettings, GuardWatch, HistoryEntry, Key, Revision, Team, TrafficShare};
use model::revision::{AuthMode, KeyScope, RevisionStatus};
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use crate::values::{
    annotations_from, annotations_text, corrupt, from_millis, guard_watch_from, guard_watch_text, millis, now,
    revision_id, traffic_from, traffic_text, uuid,
};
use crate::{Activation, NewApp, NewHistory, Result, StoreError, StoredKey, StoredSecret};

/// Schema migrations, applied in order; the number of each one applied is recorded in
/// `schema_migrations`. Only ever append. The first is the SQLite schema's final state.
///
/// Names compare byte by byte (`COLLATE "C"`) as they do in SQLite, so uniqueness and
/// the order of lists do not depend on the locale the cluster was created with. The
/// `seq` columns give rows their insertion order, which SQLite's rowid gives there.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE teams (
        id TEXT PRIMARY KEY,
        name TEXT COLLATE \"C\" NOT NULL UNIQUE,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE keys (
        seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        id TEXT PRIMARY KEY,
        team_id TEXT NOT NULL REFERENCES teams(id),
        scope TEXT NOT NULL,
        secret_hash TEXT NOT NULL,
        description TEXT,
        created_at BIGINT NOT NULL,
        revoked_at BIGINT
    );
    CREATE INDEX keys_by_team ON keys(team_id, created_at, seq);
    CREATE TABLE secrets (
        team_id TEXT NOT NULL REFERENCES teams(id),
        name TEXT COLLATE \"C\" NOT NULL,
        nonce BYTEA NOT NULL,
        ciphertext BYTEA NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (team_id, name)
    );
    CREATE TABLE apps (
        id TEXT PRIMARY KEY,
        team_id TEXT NOT NULL REFERENCES teams(id),
        name TEXT COLLATE \"C\" NOT NULL,
        auth TEXT NOT NULL,
        current_revision TEXT,
        keep_alive BIGINT NOT NULL,
        min_concurrency BIGINT NOT NULL,
        max_concurrency BIGINT NOT NULL,
        concurrency_buffer BIGINT NOT NULL,
        concurrency_buffer_perc BIGINT NOT NULL,
        scaling_delay BIGINT NOT NULL,
        request_timeout BIGINT NOT NULL,
        max_multiplexing BIGINT NOT NULL,
        startup_timeout BIGINT NOT NULL,
        machine_type TEXT NOT NULL,
        termination_grace_period BIGINT NOT NULL,
        suspended BOOLEAN NOT NULL DEFAULT FALSE,
        created_at BIGINT NOT NULL,
        num_gpus BIGINT,
        UNIQUE (team_id, name)
    );
    CREATE TABLE revisions (
        seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        id TEXT PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        artifact TEXT NOT NULL,
        manifest TEXT NOT NULL,
        max_multiplexing BIGINT NOT NULL,
        startup_timeout BIGINT NOT NULL,
        machine_type TEXT NOT NULL,
        termination_grace_period BIGINT NOT NULL,
        message TEXT,
        failure TEXT,
        created_at BIGINT NOT NULL,
        num_gpus BIGINT
    );
    CREATE INDEX revisions_by_app ON revisions(app_id, created_at, seq);
    CREATE INDEX revisions_by_artifact ON revisions(artifact);
    CREATE INDEX revisions_by_status ON revisions(status);
    CREATE TABLE history (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        app_id TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
        at BIGINT NOT NULL,
        action TEXT NOT NULL,
        key_id TEXT,
        details TEXT NOT NULL
    );
    CREATE INDEX history_by_app ON history(app_id, seq);
    CREATE TABLE queue_requests (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        team_id TEXT NOT NULL,
        app_id TEXT NOT NULL,
        route TEXT NOT NULL,
        path TEXT NOT NULL,
        headers TEXT NOT NULL,
        body BYTEA NOT NULL,
        webhook TEXT,
        state TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        start_deadline BIGINT,
        started_at BIGINT,
        completed_at BIGINT,
        runner_id TEXT,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        failed_attempts BIGINT NOT NULL DEFAULT 0,
        result_status INTEGER,
        result_type TEXT,
        result_body BYTEA,
        error TEXT,
        error_type TEXT,
        logs TEXT,
        webhook_state TEXT
    );
    CREATE INDEX queue_by_app ON queue_requests(app_id, state, seq);
    CREATE INDEX queue_by_state ON queue_requests(state, completed_at);
    CREATE INDEX queue_by_webhook ON queue_requests(webhook_state, seq);
    CREATE TABLE queue_attempts (
        request_seq BIGINT NOT NULL REFERENCES queue_requests(seq) ON DELETE CASCADE,
        n BIGINT NOT NULL,
        runner_id TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        ended_at BIGINT,
        outcome TEXT,
        PRIMARY KEY (request_seq, n)
    );",
    // Servers sharing the store, the lease on each app's controller, revisions' built code and upload.
    "CREATE TABLE servers (
        id TEXT PRIMARY KEY,
        api_url TEXT NOT NULL,
        gateway_url TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        seen_at BIGINT NOT NULL
    );
    CREATE TABLE app_leases (
        app_id TEXT PRIMARY KEY REFERENCES apps(id) ON DELETE CASCADE,
        owner TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        runners BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE revision_files (
        revision_id TEXT NOT NULL REFERENCES revisions(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        parts BIGINT NOT NULL,
        PRIMARY KEY (revision_id, kind)
    );
    CREATE TABLE revision_file_parts (
        revision_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        part BIGINT NOT NULL,
        bytes BYTEA NOT NULL,
        PRIMARY KEY (revision_id, kind, part),
        FOREIGN KEY (revision_id, kind) REFERENCES revision_files(revision_id, kind) ON DELETE CASCADE
    );",
    // The app's traffic split: `revision=percent` pairs (empty: none).
    // The revision a queue request pins (NULL: it follows the app's split).
    "ALTER TABLE apps ADD COLUMN traffic TEXT NOT NULL DEFAULT '';
    ALTER TABLE queue_requests ADD COLUMN revision TEXT;",
    // The app's guard: its settings, and what it watches (`key=value` pairs; empty: nothing).
    "ALTER TABLE apps ADD COLUMN guard_enabled BOOLEAN NOT NULL DEFAULT FALSE;
    ALTER TABLE apps ADD COLUMN guard_window BIGINT NOT NULL DEFAULT 300;
    ALTER TABLE apps ADD COLUMN guard_errors BIGINT NOT NULL DEFAULT 5;
    ALTER TABLE apps ADD COLUMN guard_p95 BIGINT NOT NULL DEFAULT 200;
    ALTER TABLE apps ADD COLUMN guard_watch TEXT NOT NULL DEFAULT '';",
    // A revision's annotations: `KEY=VALUE` lines.
    "ALTER TABLE revisions ADD COLUMN annotations TEXT NOT NULL DEFAULT '';",
];

/// The advisory lock that servers starting at once take around migrating, so that one
/// migrates and the others then find the schema up to date. Any fixed number serves;
/// this one is "hangar" in ASCII.
const MIGRATION_LOCK: i64 = 0x68_61_6e_67_61_72;

/// How many connections one server keeps at most.
const POOL_SIZE: usize = 16;

/// How long connecting may take, unless the URL says (`connect_timeout=`).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const APP_COLUMNS: &str = "id, team_id, name, auth, current_revision, keep_alive, min_concurrency, \
    max_concurrency, concurrency_buffer, concurrency_buffer_perc, scaling_delay, request_timeout, \
    max_multiplexing, startup_timeout, machine_type, termination_grace_period, suspended, created_at, num_gpus, traffic";

/// The guard's columns, which a new app takes the defaults of.
const GUARD_COLUMNS: &str = "guard_enabled, guard_window, guard_errors, guard_p95, guard_watch";

const REVISION_COLUMNS: &str = "id, app_id, status, artifact, manifest, max_multiplexing, \
    startup_timeout, machine_type, termination_grace_period, message, failure, created_at, num_gpus, annotations";

const KEY_COLUMNS: &str = "id, team_id, scope, description, created_at, revoked_at";

pub(crate) struct Postgres {
    pool: Pool,
    /// How to connect, for a connection of its own that listens for notifications.
    config: Box<tokio_postgres::Config>,
}

impl Postgres {
    pub(crate) async fn open(url: &str) -> Result<Postgres> {
        let mut config: tokio_postgres::Config = url.parse()?;
        // A server that does not answer is an error at start, not a hang.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot build the connection pool: {e}")))?;
        let db = Postgres { pool, config: Box::new(config) };
        db.migrate().await?;
        Ok(db)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client> {
        Ok(self.pool.get().await?)
    }

    /// Brings the schema up to date in one transaction that holds the migration lock:
    /// a server that waited for it sees what the first one applied and applies nothing.
    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await?;
        let applied: i64 =
            tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[]).await?.try_get(0)?;
        let known = MIGRATIONS.len() as i64;
        if applied > known {
            return Err(StoreError::Corrupt(format!(
                "the database's schema is version {applied}, newer than this server's {known}"
            )));
        }
        for (version, sql) in (1_i64..).zip(MIGRATIONS).skip(applied as usize) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[&version, &millis(now())],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn create_team(&self, name: &str) -> Result<Team> {
        let team = Team { id: Uuid::now_v7(), name: name.to_owned(), created_at: now() };
        let inserted = self
            .client()
            .await?
            .execute(
                "INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                &[&team.id.to_string(), &team.name, &millis(team.created_at)],
            )
            .await?;
        if inserted == 0 {
            return Err(StoreError::AlreadyExists(format!("team {name:?}")));
        }
        Ok(team)
    }

    pub(crate) async fn team_by_name(&self, name: &str) -> Result<Option<Team>> {
        let row =
            self.client().await?.query_opt("SELECT id, name, created_at FROM teams WHERE name = $1", &[&name]).await?;
        row.as_ref().map(team_from_row).transpose()
    }

    pub(crate) async fn team_by_id(&self, id: Uuid) -> Result<Option<Team>> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT id, name, created_at FROM teams WHERE id = $1", &[&id.to_string()])
            .await?;
        row.as_ref().map(team_from_row).transpose()
    }

    pub(crate) async fn list_teams(&self) -> Result<Vec<Team>> {
        let rows = self.client().await?.query("SELECT id, name, created_at FROM teams ORDER BY name", &[]).await?;
        rows.iter().map(team_from_row).collect()
    }

    pub(crate) async fn create_key(&self, key: &Key, secret_hash: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO keys (id, team_id, scope, secret_hash, description, created_at, revoked_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &key.id,
                    &key.team_id.to_string(),
                    &key.scope.as_str(),
                    &secret_hash,
                    &key.description,
                    &millis(key.created_at),
                    &key.revoked_at.map(millis),
                ],
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn key_by_id(&self, id: &str) -> Result<Option<StoredKey>> {
        let row = self
            .client()
            .await?
            .query_opt(&format!("SELECT {KEY_COLUMNS}, secret_hash FROM keys WHERE id = $1"), &[&id])
            .await?;
        row.map(|row| Ok(StoredKey { key: key_from_row(&row)?, secret_hash: row.try_get("secret_hash")? })).transpose()
    }

    pub(crate) async fn list_keys(&self, team_id: Uuid) -> Result<Vec<Key>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE team_id = $1 ORDER BY created_at, seq"),
                &[&team_id.to_string()],
            )
            .await?;
        rows.iter().map(key_from_row).collect()
    }

    pub(crate) async fn revoke_key(&self, id: &str) -> Result<bool> {
        let n = self
            .client()
            .await?
            .execute("UPDATE keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL", &[&id, &millis(now())])
            .await?;
        Ok(n > 0)
    }

    pub(crate) async fn put_secret(&self, team_id: Uuid, name: &str, nonce: &[u8], ciphertext: &[u8]) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO secrets (team_id, name, nonce, ciphertext, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $5)
                 ON CONFLICT (team_id, name) DO UPDATE SET nonce = $3, ciphertext = $4, updated_at = $5",
                &[&team_id.to_string(), &name, &nonce, &ciphertext, &millis(now())],
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn delete_secret(&self, team_id: Uuid, name: &str) -> Result<bool> {
        let n = self
            .client()
            .await?
            .execute("DELETE FROM secrets WHERE team_id = $1 AND name = $2", &[&team_id.to_string(), &name])
            .await?;
        Ok(n > 0)
    }

    pub(crate) async fn secrets(&self, team_id: Uuid) -> Result<Vec<StoredSecret>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT name, nonce, ciphertext, created_at, updated_at FROM secrets WHERE team_id = $1 ORDER BY name",
                &[&team_id.to_string()],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredSecret {
                    name: row.try_get("name")?,
                    nonce: row.try_get("nonce")?,
                    ciphertext: row.try_get("ciphertext")?,
                    created_at: from_millis(row.try_get("created_at")?)?,
                    updated_at: from_millis(row.try_get("updated_at")?)?,
                })
            })
            .collect()
    }

    pub(crate) async fn count_keys(&self, scope: KeyScope) -> Result<u64> {
        let n: i64 = self
            .client()
            .await?
            .query_one("SELECT COUNT(*) FROM keys WHERE scope = $1", &[&scope.as_str()])
            .await?
            .try_get(0)?;
        Ok(n as u64)
    }

    pub(crate) async fn list_apps(&self, team_id: Uuid) -> Result<Vec<App>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {APP_COLUMNS}, {GUARD_COLUMNS} FROM apps WHERE team_id = $1 ORDER BY name"),
                &[&team_id.to_string()],
            )
            .await?;
        rows.iter().map(app_from_row).collect()
    }

    pub(crate) async fn app_by_name(&self, team_id: Uuid, name: &str) -> Result<Option<App>> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {APP_COLUMNS}, {GUARD_COLUMNS} FROM apps WHERE team_id = $1 AND name = $2"),
                &[&team_id.to_string(), &name],
            )
            .await?;
        row.as_ref().map(app_from_row).transpose()
    }

    pub(crate) async fn create_app(&self, new: &NewApp) -> Result<App> {
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
        let inserted = self
            .client()
            .await?
            .execute(
                &format!(
                    "INSERT INTO apps ({APP_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                     $14, $15, $16, $17, $18, $19, $20)
                     ON CONFLICT (team_id, name) DO NOTHING"
                ),
                &[
                    &app.id.to_string(),
                    &app.team_id.to_string(),
                    &app.name,
                    &app.auth.as_str(),
                    &None::<String>,
                    &(s.keep_alive as i64),
                    &i64::from(s.min_concurrency),
                    &i64::from(s.max_concurrency),
                    &i64::from(s.concurrency_buffer),
                    &i64::from(s.concurrency_buffer_perc),
                    &(s.scaling_delay as i64),
                    &(s.request_timeout as i64),
                    &i64::from(r.max_multiplexing),
                    &(r.startup_timeout as i64),
                    &r.machine_type,
                    &(r.termination_grace_period as i64),
                    &false,
                    &millis(app.created_at),
                    &r.num_gpus.map(i64::from),
                    &"",
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(StoreError::AlreadyExists(format!("app {:?}", app.name)));
        }
        Ok(app)
    }

    pub(crate) async fn delete_app(&self, app_id: Uuid) -> Result<Vec<String>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let id = app_id.to_string();
        let artifacts: Vec<String> = tx
            .query("SELECT DISTINCT artifact FROM revisions WHERE app_id = $1", &[&id])
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        tx.execute("DELETE FROM apps WHERE id = $1", &[&id]).await?;
        let mut orphaned = Vec::new();
        for artifact in artifacts {
            if !artifact_used(&tx, &artifact).await? {
                orphaned.push(artifact);
            }
        }
        tx.commit().await?;
        Ok(orphaned)
    }

    pub(crate) async fn insert_revision(&self, rev: &Revision) -> Result<()> {
        self.client()
            .await?
            .execute(
                &format!(
                    "INSERT INTO revisions ({REVISION_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                ),
                &[
                    &rev.id.to_string(),
                    &rev.app_id.to_string(),
                    &rev.status.as_str(),
                    &rev.artifact,
                    &rev.manifest,
                    &i64::from(rev.runner.max_multiplexing),
                    &(rev.runner.startup_timeout as i64),
                    &rev.runner.machine_type,
                    &(rev.runner.termination_grace_period as i64),
                    &rev.message,
                    &rev.failure,
                    &millis(rev.created_at),
                    &rev.runner.num_gpus.map(i64::from),
                    &annotations_text(&rev.annotations),
                ],
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn revision(&self, id: RevisionId) -> Result<Option<Revision>> {
        let row = self
            .client()
            .await?
            .query_opt(&format!("SELECT {REVISION_COLUMNS} FROM revisions WHERE id = $1"), &[&id.to_string()])
            .await?;
        row.as_ref().map(revision_from_row).transpose()
    }

    pub(crate) async fn list_revisions(&self, app_id: Uuid, limit: Option<u32>) -> Result<Vec<Revision>> {
        // `seq` breaks ties between revisions made in the same millisecond in insertion
        // order, as the rowid does in SQLite. LIMIT NULL is no limit.
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {REVISION_COLUMNS} FROM revisions WHERE app_id = $1
                     ORDER BY created_at DESC, seq DESC LIMIT $2"
                ),
                &[&app_id.to_string(), &limit.map(i64::from)],
            )
            .await?;
        rows.iter().map(revision_from_row).collect()
    }

    pub(crate) async fn count_revisions(&self, app_id: Uuid) -> Result<u64> {
        let n: i64 = self
            .client()
            .await?
            .query_one("SELECT COUNT(*) FROM revisions WHERE app_id = $1", &[&app_id.to_string()])
            .await?
            .try_get(0)?;
        Ok(n as u64)
    }

    pub(crate) async fn revisions_by_prefix(&self, app_id: Uuid, prefix: &str) -> Result<Vec<Revision>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {REVISION_COLUMNS} FROM revisions WHERE app_id = $1 AND starts_with(id, $2)
                     ORDER BY created_at DESC, seq DESC"
                ),
                &[&app_id.to_string(), &prefix.to_ascii_lowercase()],
            )
            .await?;
        rows.iter().map(revision_from_row).collect()
    }

    pub(crate) async fn set_suspended(&self, app_id: Uuid, suspended: bool, history: &NewHistory) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let id = app_id.to_string();
        tx.execute("UPDATE apps SET suspended = $2 WHERE id = $1", &[&id, &suspended]).await?;
        // The current revision shows the app's state.
        let status = if suspended { RevisionStatus::Suspended } else { RevisionStatus::Deployed };
        tx.execute(
            "UPDATE revisions SET status = $2 WHERE id = (SELECT current_revision FROM apps WHERE id = $1)",
            &[&id, &status.as_str()],
        )
        .await?;
        insert_history(&tx, history).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn fail_revision(&self, id: RevisionId, reason: &str) -> Result<()> {
        self.client()
            .await?
            .execute(
                "UPDATE revisions SET status = $2, failure = $3 WHERE id = $1",
                &[&id.to_string(), &RevisionStatus::Failed.as_str(), &reason],
            )
            .await?;
        Ok(())
    }

    pub(crate) async fn activate_revision(&self, a: &Activation, history: &NewHistory) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        if let Some(fence) = &a.fence {
            fleet::check_fence(&tx, a.app_id, fence).await?;
        }
        let app_id = a.app_id.to_string();
        let revision = a.revision.to_string();
        // Only a revision that still exists, is the app's, and has not failed may become
        // current; nothing changes otherwise. The UPDATE locks the row, so a delete
        // running beside it either comes first (and this finds no row) or waits.
        let revised = tx
            .execute(
                "UPDATE revisions SET status = $2, failure = NULL WHERE id = $1 AND app_id = $3 AND status IN ($4, $2, $5)",
                &[
                    &revision,
                    &RevisionStatus::Deployed.as_str(),
                    &app_id,
                    &RevisionStatus::Deploying.as_str(),
                    &RevisionStatus::Suspended.as_str(),
                ],
            )
            .await?;
        if revised != 1 {
            return Err(StoreError::Conflict(format!(
                "revision {} is no longer one of this app's revisions that may become current",
                a.revision
            )));
        }
        // A switch ends any split: the new current revision takes every call.
        let moved = tx
            .execute("UPDATE apps SET current_revision = $2, traffic = '' WHERE id = $1", &[&app_id, &revision])
            .await?;
        if moved != 1 {
            return Err(StoreError::Conflict(format!("app {} no longer exists", a.app_id)));
        }
        set_runner_spec(&tx, &app_id, &a.runner).await?;
        if let Some(scaling) = &a.scaling {
            set_scaling(&tx, &app_id, scaling).await?;
        }
        if let Some(auth) = a.auth {
            tx.execute("UPDATE apps SET auth = $2 WHERE id = $1", &[&app_id, &auth.as_str()]).await?;
        }
        insert_history(&tx, history).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn set_traffic(&self, app_id: Uuid, shares: &[TrafficShare], history: &NewHistory) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let app = app_id.to_string();
        // The app's row is locked first, so a switch running beside this either comes
        // first (and the check below sees its new current revision) or waits.
        let locked = tx.execute("SELECT 1 FROM apps WHERE id = $1 FOR UPDATE", &[&app]).await?;
        if locked != 1 {
            return Err(StoreError::Conflict(format!("app {app_id} no longer exists")));
        }
        for share in shares {
            let ok: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM revisions r JOIN apps a ON a.id = r.app_id \
                     WHERE r.id = $1 AND r.app_id = $2 AND r.status = $3 \
                     AND (a.current_revision IS NULL OR a.current_revision <> r.id))",
                    &[&share.revision.to_string(), &app, &RevisionStatus::Deployed.as_str()],
                )
                .await?
                .try_get(0)?;
            if !ok {
                return Err(StoreError::Conflict(format!(
                    "revision {} is not one of this app's Deployed revisions other than the current one",
                    share.revision
                )));
            }
        }
        tx.execute("UPDATE apps SET traffic = $2 WHERE id = $1", &[&app, &traffic_text(shares)]).await?;
        insert_history(&tx, history).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn set_guard(&self, app_id: Uuid, guard: &GuardSettings, history: &NewHistory) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let set = tx
            .execute(
                "UPDATE apps SET guard_enabled = $2, guard_window = $3, guard_errors = $4, guard_p95 = $5 WHERE id = $1",
                &[
                    &app_id.to_string(),
                    &guard.enabled,
                    &(guard.window as i64),
                    &i64::from(guard.max_error_increase),
                    &i64::from(guard.max_p95_ratio),
                ],
            )
            .await?;
        if set != 1 {
            return Err(StoreError::Conflict(format!("app {app_id} no longer exists")));
        }
        insert_history(&tx, history).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn set_guard_watch(
        &self,
        app_id: Uuid,
        watch: Option<&GuardWatch>,
        history: Option<&NewHistory>,
    ) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("UPDATE apps SET guard_watch = $2 WHERE id = $1", &[&app_id.to_string(), &guard_watch_text(watch)])
            .await?;
        if let Some(history) = history {
            insert_history(&tx, history).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn update_app_values(
        &self,
        app_id: Uuid,
        s: &Scaling,
        r: &RunnerSpec,
        history: &NewHistory,
    ) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let id = app_id.to_string();
        set_scaling(&tx, &id, s).await?;
        set_runner_spec(&tx, &id, r).await?;
        insert_history(&tx, history).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn delete_revision(&self, id: RevisionId) -> Result<Option<String>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let deleted =
            tx.query_opt("DELETE FROM revisions WHERE id = $1 RETURNING artifact", &[&id.to_string()]).await?;
        let Some(row) = deleted else { return Ok(None) };
        let artifact: String = row.try_get("artifact")?;
        let used = artifact_used(&tx, &artifact).await?;
        tx.commit().await?;
        Ok((!used).then_some(artifact))
    }

    pub(crate) async fn fail_interrupted_deploys(&self, app: Option<Uuid>) -> Result<Vec<(Revision, Uuid)>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // FOR UPDATE: a second server doing the same at once waits, then finds them
        // failed already and reports nothing twice.
        let rows = tx
            .query(
                &format!(
                    "SELECT {REVISION_COLUMNS} FROM revisions WHERE status = $1 AND ($2::TEXT IS NULL OR app_id = $2) \
                     ORDER BY created_at, seq FOR UPDATE"
                ),
                &[&RevisionStatus::Deploying.as_str(), &app.map(|a| a.to_string())],
            )
            .await?;
        let mut changed = Vec::new();
        for row in &rows {
            let mut rev = revision_from_row(row)?;
            let updated = tx
                .execute(
                    "UPDATE revisions SET status = $2, failure = 'interrupted' WHERE id = $1 AND status = $3",
                    &[&rev.id.to_string(), &RevisionStatus::Failed.as_str(), &RevisionStatus::Deploying.as_str()],
                )
                .await?;
            if updated != 1 {
                continue;
            }
            insert_history(
                &tx,
                &NewHistory {
                    app_id: rev.app_id,
                    action: "deploy_failed".to_owned(),
                    key_id: None,
                    details: format!("revision {} failed: interrupted (the server stopped during the deploy)", rev.id),
                },
            )
            .await?;
            rev.status = RevisionStatus::Failed;
            rev.failure = Some("interrupted".to_owned());
            let app_id = rev.app_id;
            changed.push((rev, app_id));
        }
        tx.commit().await?;
        Ok(changed)
    }

    pub(crate) async fn artifacts_in_use(&self) -> Result<Vec<String>> {
        let rows = self.client().await?.query("SELECT DISTINCT artifact FROM revisions ORDER BY artifact", &[]).await?;
        Ok(rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?)
    }

    pub(crate) async fn add_history(&self, entry: &NewHistory) -> Result<()> {
        insert_history(&self.client().await?, entry).await
    }

    pub(crate) async fn list_history(&self, app_id: Uuid) -> Result<Vec<HistoryEntry>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT at, action, key_id, details FROM history WHERE app_id = $1 ORDER BY seq DESC",
                &[&app_id.to_string()],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(HistoryEntry {
                    at: from_millis(row.try_get("at")?)?,
                    action: row.try_get("action")?,
                    key_id: row.try_get("key_id")?,
                    details: row.try_get("details")?,
                })
            })
            .collect()
    }
}

async fn insert_history(conn: &impl GenericClient, entry: &NewHistory) -> Result<()> {
    conn.execute(
        "INSERT INTO history (app_id, at, action, key_id, details) VALUES ($1, $2, $3, $4, $5)",
        &[&entry.app_id.to_string(), &millis(now()), &entry.action, &entry.key_id, &entry.details],
    )
    .await?;
    Ok(())
}

/// Sets an app's runtime-tunable scaling values.
async fn set_scaling(conn: &impl GenericClient, app_id: &str, s: &Scaling) -> Result<()> {
    conn.execute(
        "UPDATE apps SET keep_alive = $2, min_concurrency = $3, max_concurrency = $4, concurrency_buffer = $5,
         concurrency_buffer_perc = $6, scaling_delay = $7, request_timeout = $8 WHERE id = $1",
        &[
            &app_id,
            &(s.keep_alive as i64),
            &i64::from(s.min_concurrency),
            &i64::from(s.max_concurrency),
            &i64::from(s.concurrency_buffer),
            &i64::from(s.concurrency_buffer_perc),
            &(s.scaling_delay as i64),
            &(s.request_timeout as i64),
        ],
    )
    .await?;
    Ok(())
}

/// Sets an app's code-specific values.
async fn set_runner_spec(conn: &impl GenericClient, app_id: &str, r: &RunnerSpec) -> Result<()> {
    conn.execute(
        "UPDATE apps SET max_multiplexing = $2, startup_timeout = $3, machine_type = $4,
         termination_grace_period = $5, num_gpus = $6 WHERE id = $1",
        &[
            &app_id,
            &i64::from(r.max_multiplexing),
            &(r.startup_timeout as i64),
            &r.machine_type,
            &(r.termination_grace_period as i64),
            &r.num_gpus.map(i64::from),
        ],
    )
    .await?;
    Ok(())
}

async fn artifact_used(conn: &impl GenericClient, artifact: &str) -> Result<bool> {
    Ok(conn.query_one("SELECT EXISTS (SELECT 1 FROM revisions WHERE artifact = $1)", &[&artifact]).await?.try_get(0)?)
}

/// A `BIGINT` column that holds a `u32`.
fn u32_at(row: &Row, column: &str) -> Result<u32> {
    let n: i64 = row.try_get(column)?;
    u32::try_from(n).map_err(|_| corrupt(column))
}

fn opt_u32_at(row: &Row, column: &str) -> Result<Option<u32>> {
    let n: Option<i64> = row.try_get(column)?;
    n.map(|n| u32::try_from(n).map_err(|_| corrupt(column))).transpose()
}

fn u64_at(row: &Row, column: &str) -> Result<u64> {
    Ok(row.try_get::<_, i64>(column)? as u64)
}

fn opt_millis_at(row: &Row, column: &str) -> Result<Option<time::OffsetDateTime>> {
    row.try_get::<_, Option<i64>>(column)?.map(from_millis).transpose()
}

fn team_from_row(row: &Row) -> Result<Team> {
    Ok(Team {
        id: uuid(row.try_get("id")?)?,
        name: row.try_get("name")?,
        created_at: from_millis(row.try_get("created_at")?)?,
    })
}

fn key_from_row(row: &Row) -> Result<Key> {
    Ok(Key {
        id: row.try_get("id")?,
        team_id: uuid(row.try_get("team_id")?)?,
        scope: KeyScope::parse(row.try_get("scope")?).ok_or_else(|| corrupt("key scope"))?,
        description: row.try_get("description")?,
        created_at: from_millis(row.try_get("created_at")?)?,
        revoked_at: opt_millis_at(row, "revoked_at")?,
    })
}

fn runner_spec_from_row(row: &Row) -> Result<RunnerSpec> {
    Ok(RunnerSpec {
        max_multiplexing: u32_at(row, "max_multiplexing")?,
        startup_timeout: u64_at(row, "startup_timeout")?,
        machine_type: row.try_get("machine_type")?,
        num_gpus: opt_u32_at(row, "num_gpus")?,
        termination_grace_period: u64_at(row, "termination_grace_period")?,
    })
}

fn app_from_row(row: &Row) -> Result<App> {
    Ok(App {
        id: uuid(row.try_get("id")?)?,
        team_id: uuid(row.try_get("team_id")?)?,
        name: row.try_get("name")?,
        auth: AuthMode::parse(row.try_get("auth")?).ok_or_else(|| corrupt("app auth"))?,
        current_revision: row.try_get::<_, Option<String>>("current_revision")?.map(revision_id).transpose()?,
        scaling: Scaling {
            keep_alive: u64_at(row, "keep_alive")?,
            min_concurrency: u32_at(row, "min_concurrency")?,
            max_concurrency: u32_at(row, "max_concurrency")?,
            concurrency_buffer: u32_at(row, "concurrency_buffer")?,
            concurrency_buffer_perc: u32_at(row, "concurrency_buffer_perc")?,
            scaling_delay: u64_at(row, "scaling_delay")?,
            request_timeout: u64_at(row, "request_timeout")?,
        },
        runner: runner_spec_from_row(row)?,
        suspended: row.try_get("suspended")?,
        created_at: from_millis(row.try_get("created_at")?)?,
        traffic: traffic_from(row.try_get("traffic")?)?,
        guard: GuardSettings {
            enabled: row.try_get("guard_enabled")?,
            window: u64_at(row, "guard_window")?,
            max_error_increase: u32_at(row, "guard_errors")?,
            max_p95_ratio: u32_at(row, "guard_p95")?,
        },
        guard_watch: guard_watch_from(row.try_get("guard_watch")?)?,
    })
}

fn revision_from_row(row: &Row) -> Result<Revision> {
    Ok(Revision {
        id: revision_id(row.try_get("id")?)?,
        app_id: uuid(row.try_get("app_id")?)?,
        status: RevisionStatus::parse(row.try_get("status")?).ok_or_else(|| corrupt("revision status"))?,
        artifact: row.try_get("artifact")?,
        manifest: row.try_get("manifest")?,
        runner: runner_spec_from_row(row)?,
        message: row.try_get("message")?,
        failure: row.try_get("failure")?,
        created_at: from_millis(row.try_get("created_at")?)?,
        annotations: annotations_from(row.try_get("annotations")?),
    })
}
