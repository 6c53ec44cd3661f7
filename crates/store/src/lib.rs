//! The store: the one crate that knows SQL. It keeps teams, keys, apps, revisions and
//! each app's history, and hands out `model` records.
//!
//! Callers see only [`Store`] and its async methods; which database sits behind it is
//! this crate's business. The embedded backend is SQLite in the data dir (WAL, full
//! sync, so a crash never loses a committed change); the other is PostgreSQL, made so
//! that several servers could share one database (they migrate it once, and a queue
//! request's moves lock its row). Both keep the same tables and answer every call alike.
//! Every multi-row change runs in one transaction.

/// Runs one call on the store's backend. SQLite's calls block, so they run on the
/// blocking pool and take by value (`[owned]`: the borrowed arguments to copy first)
/// what they need; PostgreSQL's are awaited as they are. Both see the same arguments.
macro_rules! on_backend {
    ($store:ident, [$($owned:ident),*], $db:ident => $call:expr) => {
        match &*$store.backend {
            Backend::Sqlite(sqlite) => {
                $(let $owned = $owned.to_owned();)*
                let sqlite = sqlite.clone();
                tokio::task::spawn_blocking(move || {
                    $(let $owned = &*$owned;)*
                    let $db = &*sqlite;
                    $call
                })
                .await
                .map_err(|e| StoreError::Task(e.to_string()))?
            }
            Backend::Postgres($db) => $call.await,
        }
    };
}

mod fleet;
mod postgres;
mod queue;
mod sqlite;
mod values;

use std::path::Path;
use std::sync::Arc;

use model::ids::RevisionId;
use model::manifest::{RunnerSpec, Scaling};
use model::records::{App, GuardSettings, GuardWatch, HistoryEntry, Key, Revision, Team, TrafficShare};
use model::revision::{AuthMode, KeyScope};
use uuid::Uuid;

pub use fleet::{Fence, Lease, LeaseChanges, RevisionFile, ServerRecord};
pub use queue::{CancelOutcome, Completion, NewQueueRequest, QueueCounts, QueuePayload};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// What the change needs is no longer so (a revision was deleted meanwhile, ...).
    #[error("{0}")]
    Conflict(String),
    #[error("database task failed: {0}")]
    Task(String),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// A write made under an app's lease that this server no longer holds.
    #[error("{0}")]
    Fenced(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's own words (with its detail and hint) say more than the client's
        // summary, which for every server-side error is only "db error".
        if let Some(db) = e.as_db_error() {
            return StoreError::Postgres(db.to_string());
        }
        let mut message = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            message = format!("{message}: {c}");
            cause = c.source();
        }
        StoreError::Postgres(message)
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            e => StoreError::Postgres(format!("cannot get a connection: {e}")),
        }
    }
}

/// A new app, created by its first deploy.
#[derive(Debug, Clone)]
pub struct NewApp {
    pub team_id: Uuid,
    pub name: String,
    pub auth: AuthMode,
    pub scaling: Scaling,
    pub runner: RunnerSpec,
}

/// A key as stored: the record and the hash of its secret (which `Debug` leaves out).
#[derive(Clone)]
pub struct StoredKey {
    pub key: Key,
    pub secret_hash: String,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey").field("key", &self.key).field("secret_hash", &"<redacted>").finish()
    }
}

/// A secret as stored: encrypted, with its nonce. The store never sees a value.
#[derive(Debug, Clone)]
pub struct StoredSecret {
    pub name: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_at: time::OffsetDateTime,
    pub updated_at: time::OffsetDateTime,
}

/// What becomes of an app when one of its revisions goes live.
#[derive(Debug, Clone)]
pub struct Activation {
    pub app_id: Uuid,
    pub revision: RevisionId,
    /// Code-specific values, always from the revision.
    pub runner: RunnerSpec,
    /// Runtime-tunable values to install, or `None` to keep the app's.
    pub scaling: Option<Scaling>,
    pub auth: Option<AuthMode>,
    /// The lease the app's controller holds, where servers share the store: the
    /// activation is refused ([`StoreError::Fenced`]) unless it is still in force.
    pub fence: Option<Fence>,
}

/// An entry to append to an app's history.
#[derive(Debug, Clone)]
pub struct NewHistory {
    pub app_id: Uuid,
    pub action: String,
    pub key_id: Option<String>,
    pub details: String,
}

/// The handle every other crate uses. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
}

enum Backend {
    Sqlite(Arc<sqlite::Sqlite>),
    Postgres(postgres::Postgres),
}

impl Store {
    /// Opens (creating if needed) the embedded SQLite database at `path` and brings its
    /// schema up to date.
    pub async fn open_sqlite(path: &Path) -> Result<Store> {
        let path = path.to_owned();
        let db = tokio::task::spawn_blocking(move || sqlite::Sqlite::open(&path))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(Store { backend: Arc::new(Backend::Sqlite(Arc::new(db))) })
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user@host:port/db`) and
    /// brings its schema up to date. Several servers may open the same database at once:
    /// one of them migrates, the others wait for it.
    pub async fn open_postgres(url: &str) -> Result<Store> {
        let db = postgres::Postgres::open(url).await?;
        Ok(Store { backend: Arc::new(Backend::Postgres(db)) })
    }

    pub async fn create_team(&self, name: &str) -> Result<Team> {
        on_backend!(self, [name], db => db.create_team(name))
    }

    pub async fn team_by_name(&self, name: &str) -> Result<Option<Team>> {
        on_backend!(self, [name], db => db.team_by_name(name))
    }

    pub async fn team_by_id(&self, id: Uuid) -> Result<Option<Team>> {
        on_backend!(self, [], db => db.team_by_id(id))
    }

    pub async fn list_teams(&self) -> Result<Vec<Team>> {
        on_backend!(self, [], db => db.list_teams())
    }

    pub async fn create_key(&self, key: Key, secret_hash: String) -> Result<()> {
        on_backend!(self, [], db => db.create_key(&key, &secret_hash))
    }

    pub async fn key_by_id(&self, id: &str) -> Result<Option<StoredKey>> {
        on_backend!(self, [id], db => db.key_by_id(id))
    }

    /// Every key of a team, revoked ones included, oldest first.
    pub async fn list_keys(&self, team_id: Uuid) -> Result<Vec<Key>> {
        on_backend!(self, [], db => db.list_keys(team_id))
    }

    /// Revokes a key; false if it was unknown or revoked already.
    pub async fn revoke_key(&self, id: &str) -> Result<bool> {
        on_backend!(self, [id], db => db.revoke_key(id))
    }

    /// Stores (or replaces) a team's encrypted secret.
    pub async fn put_secret(&self, team_id: Uuid, name: &str, nonce: Vec<u8>, ciphertext: Vec<u8>) -> Result<()> {
        on_backend!(self, [name], db => db.put_secret(team_id, name, &nonce, &ciphertext))
    }

    /// Deletes a secret; false if the team had none of that name.
    pub async fn delete_secret(&self, team_id: Uuid, name: &str) -> Result<bool> {
        on_backend!(self, [name], db => db.delete_secret(team_id, name))
    }

    /// A team's secrets, encrypted, by name.
    pub async fn secrets(&self, team_id: Uuid) -> Result<Vec<StoredSecret>> {
        on_backend!(self, [], db => db.secrets(team_id))
    }

    pub async fn count_keys(&self, scope: KeyScope) -> Result<u64> {
        on_backend!(self, [], db => db.count_keys(scope))
    }

    pub async fn list_apps(&self, team_id: Uuid) -> Result<Vec<App>> {
        on_backend!(self, [], db => db.list_apps(team_id))
    }

    pub async fn app_by_name(&self, team_id: Uuid, name: &str) -> Result<Option<App>> {
        on_backend!(self, [name], db => db.app_by_name(team_id, name))
    }

    pub async fn create_app(&self, app: NewApp) -> Result<App> {
        on_backend!(self, [], db => db.create_app(&app))
    }

    /// Deletes an app with all its revisions and history. Returns the artifacts that no
    /// revision refers to any more, so the caller can free their files.
    pub async fn delete_app(&self, app_id: Uuid) -> Result<Vec<String>> {
        on_backend!(self, [], db => db.delete_app(app_id))
    }

    pub async fn insert_revision(&self, revision: Revision) -> Result<()> {
        on_backend!(self, [], db => db.insert_revision(&revision))
    }

    pub async fn revision(&self, id: RevisionId) -> Result<Option<Revision>> {
        on_backend!(self, [], db => db.revision(id))
    }

    /// The app's revisions, newest first; only the newest `limit` when given.
    pub async fn list_revisions(&self, app_id: Uuid, limit: Option<u32>) -> Result<Vec<Revision>> {
        on_backend!(self, [], db => db.list_revisions(app_id, limit))
    }

    /// How many revisions the app has.
    pub async fn count_revisions(&self, app_id: Uuid) -> Result<u64> {
        on_backend!(self, [], db => db.count_revisions(app_id))
    }

    /// The app's revisions whose id starts with `prefix` (hyphens included).
    pub async fn revisions_by_prefix(&self, app_id: Uuid, prefix: &str) -> Result<Vec<Revision>> {
        on_backend!(self, [prefix], db => db.revisions_by_prefix(app_id, prefix))
    }

    /// Suspends or resumes an app: its flag, its current revision's status (Suspended or
    /// Deployed) and the history, in one transaction.
    pub async fn set_suspended(&self, app_id: Uuid, suspended: bool, history: NewHistory) -> Result<()> {
        on_backend!(self, [], db => db.set_suspended(app_id, suspended, &history))
    }

    /// Marks a revision Failed with its reason.
    pub async fn fail_revision(&self, id: RevisionId, reason: &str) -> Result<()> {
        on_backend!(self, [reason], db => db.fail_revision(id, reason))
    }

    /// In one transaction: the revision becomes Deployed, the app's alias points at it,
    /// the app takes the revision's code-specific values (and the given runtime ones and
    /// auth mode), and the change is written to the history.
    pub async fn activate_revision(&self, activation: Activation, history: NewHistory) -> Result<()> {
        on_backend!(self, [], db => db.activate_revision(&activation, &history))
    }

    /// Deletes a revision that is not current. Returns its artifact if no other revision
    /// uses it any more.
    pub async fn delete_revision(&self, id: RevisionId) -> Result<Option<String>> {
        on_backend!(self, [], db => db.delete_revision(id))
    }

    /// Every revision (of one app, if given) left Deploying by a server that stopped in
    /// the middle becomes Failed with reason "interrupted". Returns the revisions it
    /// changed.
    pub async fn fail_interrupted_deploys(&self, app: Option<Uuid>) -> Result<Vec<(Revision, Uuid)>> {
        on_backend!(self, [], db => db.fail_interrupted_deploys(app))
    }

    /// Digests of every artifact some revision refers to.
    pub async fn artifacts_in_use(&self) -> Result<Vec<String>> {
        on_backend!(self, [], db => db.artifacts_in_use())
    }

    /// Sets the app's traffic split (empty: none), with its history entry. Every
    /// revision named must be one of the app's Deployed revisions other than the
    /// current one ([`StoreError::Conflict`] otherwise, and nothing changes).
    pub async fn set_traffic(&self, app_id: Uuid, shares: &[TrafficShare], history: NewHistory) -> Result<()> {
        on_backend!(self, [shares], db => db.set_traffic(app_id, shares, &history))
    }

    /// Sets how the app's guard judges, with its history entry.
    pub async fn set_guard(&self, app_id: Uuid, guard: GuardSettings, history: NewHistory) -> Result<()> {
        on_backend!(self, [], db => db.set_guard(app_id, &guard, &history))
    }

    /// Sets (or, with `None`, ends) what the app's guard watches, with a history entry
    /// if one is given.
    pub async fn set_guard_watch(
        &self,
        app_id: Uuid,
        watch: Option<GuardWatch>,
        history: Option<NewHistory>,
    ) -> Result<()> {
        on_backend!(self, [], db => db.set_guard_watch(app_id, watch.as_ref(), history.as_ref()))
    }

    /// Sets an app's scaling values (runtime-tunable and code-specific) and records the
    /// change, in one transaction.
    pub async fn update_app_values(
        &self,
        app_id: Uuid,
        scaling: Scaling,
        runner: RunnerSpec,
        history: NewHistory,
    ) -> Result<()> {
        on_backend!(self, [], db => db.update_app_values(app_id, &scaling, &runner, &history))
    }

    pub async fn add_history(&self, entry: NewHistory) -> Result<()> {
        on_backend!(self, [], db => db.add_history(&entry))
    }

    /// The app's history, newest first.
    pub async fn list_history(&self, app_id: Uuid) -> Result<Vec<HistoryEntry>> {
        on_backend!(self, [], db => db.list_history(app_id))
    }
}
