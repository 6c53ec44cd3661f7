//! Records: what the platform remembers about teams, keys, apps, revisions and their
//! history. The store reads and writes them; the API turns them into wire types.

use time::OffsetDateTime;
use uuid::Uuid;

use crate::ids::RevisionId;
use crate::manifest::{RunnerSpec, Scaling};
use crate::revision::{AuthMode, KeyScope, RevisionStatus};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub id: Uuid,
    pub name: String,
    pub created_at: OffsetDateTime,
}

/// An API credential. The secret itself is never kept; only its hash is, next to this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub id: String,
    pub team_id: Uuid,
    pub scope: KeyScope,
    pub description: Option<String>,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

/// An app: the alias `team/name`, the revision it points at, and the scaling values
/// that are in force now (runtime-tunable ones survive deploys, code-specific ones are
/// taken from the current revision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    pub id: Uuid,
    pub team_id: Uuid,
    pub name: String,
    pub auth: AuthMode,
    pub current_revision: Option<RevisionId>,
    pub scaling: Scaling,
    pub runner: RunnerSpec,
    pub suspended: bool,
    pub created_at: OffsetDateTime,
}

/// One immutable deploy of an app's code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub id: RevisionId,
    pub app_id: Uuid,
    pub status: RevisionStatus,
    /// Content digest of the uploaded archive (`sha256:<hex>`); shared by revisions with
    /// the same code.
    pub artifact: String,
    /// The revision's `hangar.toml` exactly as uploaded.
    pub manifest: String,
    /// Code-specific values from this revision's manifest.
    pub runner: RunnerSpec,
    pub message: Option<String>,
    pub failure: Option<String>,
    pub created_at: OffsetDateTime,
}

/// One recorded change to an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub at: OffsetDateTime,
    pub action: String,
    pub key_id: Option<String>,
    pub details: String,
}

/// What is known of one runner, as listings show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerInfo {
    pub id: crate::ids::RunnerId,
    pub app: String,
    pub revision: RevisionId,
    pub machine_type: String,
    pub state: crate::revision::RunnerState,
    pub in_flight: u32,
    /// For an idle runner above the app's minimum: how long until keep_alive stops it.
    pub expires_in: Option<std::time::Duration>,
    pub started_at: OffsetDateTime,
    pub ended_at: Option<OffsetDateTime>,
    /// Marked to be replaced (by a rollout or `runners stop --replace`).
    pub replacing: bool,
    /// Why it ended or is backing off, in words for people.
    pub reason: Option<String>,
}
