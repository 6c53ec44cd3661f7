//! The store: the one crate that knows SQL. It keeps teams, keys, apps, revisions and
//! each app's history, and hands out `model` records.
//!
//! Callers see only [`Store`] and its async methods; which database sits behind it is
//! this crate's business. The embedded backend is SQLite in the data dir (WAL, full
//! sync, so a crash never loses a committed change). A PostgreSQL backend for
//! multi-server deployments can be added as another variant of `Backend` without
//! touching any caller. Every multi-row change runs in one transaction.

mod queue;
mod sqlite;

use std::path::Path;
use std::sync::Arc;

use model::ids::RevisionId;
use model::manifest::{RunnerSpec, Scaling};
use model::records::{App, HistoryEntry, Key, Revision, Team};
use model::revision::{AuthMode, KeyScope};
use uuid::Uuid;

pub use queue::{CancelOutcome, Completion, NewQueueRequest, QueuePayload};

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
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

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
    Sqlite(sqlite::Sqlite),
}

impl Store {
    /// Opens (creating if needed) the embedded SQLite database at `path` and brings its
    /// schema up to date.
    pub async fn open_sqlite(path: &Path) -> Result<Store> {
        let path = path.to_owned();
        let db = tokio::task::spawn_blocking(move || sqlite::Sqlite::open(&path))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(Store { backend: Arc::new(Backend::Sqlite(db)) })
    }

    /// Runs `f` against the backend on the blocking pool, so SQL never stalls the
    /// async runtime.
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&sqlite::Sqlite) -> Result<T> + Send + 'static,
    {
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || match &*backend {
            Backend::Sqlite(db) => f(db),
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    pub async fn create_team(&self, name: &str) -> Result<Team> {
        let name = name.to_owned();
        self.run(move |db| db.create_team(&name)).await
    }

    pub async fn team_by_name(&self, name: &str) -> Result<Option<Team>> {
        let name = name.to_owned();
        self.run(move |db| db.team_by_name(&name)).await
    }

    pub async fn team_by_id(&self, id: Uuid) -> Result<Option<Team>> {
        self.run(move |db| db.team_by_id(id)).await
    }

    pub async fn list_teams(&self) -> Result<Vec<Team>> {
        self.run(|db| db.list_teams()).await
    }

    pub async fn create_key(&self, key: Key, secret_hash: String) -> Result<()> {
        self.run(move |db| db.create_key(&key, &secret_hash)).await
    }

    pub async fn key_by_id(&self, id: &str) -> Result<Option<StoredKey>> {
        let id = id.to_owned();
        self.run(move |db| db.key_by_id(&id)).await
    }

    /// Every key of a team, revoked ones included, oldest first.
    pub async fn list_keys(&self, team_id: Uuid) -> Result<Vec<Key>> {
        self.run(move |db| db.list_keys(team_id)).await
    }

    /// Revokes a key; false if it was unknown or revoked already.
    pub async fn revoke_key(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.run(move |db| db.revoke_key(&id)).await
    }

    /// Stores (or replaces) a team's encrypted secret.
    pub async fn put_secret(&self, team_id: Uuid, name: &str, nonce: Vec<u8>, ciphertext: Vec<u8>) -> Result<()> {
        let name = name.to_owned();
        self.run(move |db| db.put_secret(team_id, &name, &nonce, &ciphertext)).await
    }

    /// Deletes a secret; false if the team had none of that name.
    pub async fn delete_secret(&self, team_id: Uuid, name: &str) -> Result<bool> {
        let name = name.to_owned();
        self.run(move |db| db.delete_secret(team_id, &name)).await
    }

    /// A team's secrets, encrypted, by name.
    pub async fn secrets(&self, team_id: Uuid) -> Result<Vec<StoredSecret>> {
        self.run(move |db| db.secrets(team_id)).await
    }

    pub async fn count_keys(&self, scope: KeyScope) -> Result<u64> {
        self.run(move |db| db.count_keys(scope)).await
    }

    pub async fn list_apps(&self, team_id: Uuid) -> Result<Vec<App>> {
        self.run(move |db| db.list_apps(team_id)).await
    }

    pub async fn app_by_name(&self, team_id: Uuid, name: &str) -> Result<Option<App>> {
        let name = name.to_owned();
        self.run(move |db| db.app_by_name(team_id, &name)).await
    }

    pub async fn create_app(&self, app: NewApp) -> Result<App> {
        self.run(move |db| db.create_app(&app)).await
    }

    /// Deletes an app with all its revisions and history. Returns the artifacts that no
    /// revision refers to any more, so the caller can free their files.
    pub async fn delete_app(&self, app_id: Uuid) -> Result<Vec<String>> {
        self.run(move |db| db.delete_app(app_id)).await
    }

    pub async fn insert_revision(&self, revision: Revision) -> Result<()> {
        self.run(move |db| db.insert_revision(&revision)).await
    }

    pub async fn revision(&self, id: RevisionId) -> Result<Option<Revision>> {
        self.run(move |db| db.revision(id)).await
    }

    /// The app's revisions, newest first; only the newest `limit` when given.
    pub async fn list_revisions(&self, app_id: Uuid, limit: Option<u32>) -> Result<Vec<Revision>> {
        self.run(move |db| db.list_revisions(app_id, limit)).await
    }

    /// How many revisions the app has.
    pub async fn count_revisions(&self, app_id: Uuid) -> Result<u64> {
        self.run(move |db| db.count_revisions(app_id)).await
    }

    /// The app's revisions whose id starts with `prefix` (hyphens included).
    pub async fn revisions_by_prefix(&self, app_id: Uuid, prefix: &str) -> Result<Vec<Revision>> {
        let prefix = prefix.to_owned();
        self.run(move |db| db.revisions_by_prefix(app_id, &prefix)).await
    }

    /// Suspends or resumes an app: its flag, its current revision's status (Suspended or
    /// Deployed) and the history, in one transaction.
    pub async fn set_suspended(&self, app_id: Uuid, suspended: bool, history: NewHistory) -> Result<()> {
        self.run(move |db| db.set_suspended(app_id, suspended, &history)).await
    }

    /// Marks a revision Failed with its reason.
    pub async fn fail_revision(&self, id: RevisionId, reason: &str) -> Result<()> {
        let reason = reason.to_owned();
        self.run(move |db| db.fail_revision(id, &reason)).await
    }

    /// In one transaction: the revision becomes Deployed, the app's alias points at it,
    /// the app takes the revision's code-specific values (and the given runtime ones and
    /// auth mode), and the change is written to the history.
    pub async fn activate_revision(&self, activation: Activation, history: NewHistory) -> Result<()> {
        self.run(move |db| db.activate_revision(&activation, &history)).await
    }

    /// Deletes a revision that is not current. Returns its artifact if no other revision
    /// uses it any more.
    pub async fn delete_revision(&self, id: RevisionId) -> Result<Option<String>> {
        self.run(move |db| db.delete_revision(id)).await
    }

    /// Every revision left Deploying by a server that stopped in the middle becomes
    /// Failed with reason "interrupted". Returns the revisions it changed.
    pub async fn fail_interrupted_deploys(&self) -> Result<Vec<(Revision, Uuid)>> {
        self.run(|db| db.fail_interrupted_deploys()).await
    }

    /// Digests of every artifact some revision refers to.
    pub async fn artifacts_in_use(&self) -> Result<Vec<String>> {
        self.run(|db| db.artifacts_in_use()).await
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
        self.run(move |db| db.update_app_values(app_id, &scaling, &runner, &history)).await
    }

    pub async fn add_history(&self, entry: NewHistory) -> Result<()> {
        self.run(move |db| db.add_history(&entry)).await
    }

    /// The app's history, newest first.
    pub async fn list_history(&self, app_id: Uuid) -> Result<Vec<HistoryEntry>> {
        self.run(move |db| db.list_history(app_id)).await
    }
}
