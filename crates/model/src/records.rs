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
    /// Shares of new calls sent to other Deployed revisions (canaries); the current
    /// revision takes the rest. Empty: it takes every call.
    pub traffic: Vec<TrafficShare>,
    pub guard: GuardSettings,
    /// What the guard watches now, if anything.
    pub guard_watch: Option<GuardWatch>,
}

/// How an app's guard judges a revision after a switch (or a canary while it has its
/// share), against the revision before it (or the current one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSettings {
    /// Every deploy and set-rev is guarded, not only those that ask (`--guard`).
    pub enabled: bool,
    /// Seconds after a switch during which the guard watches.
    pub window: u64,
    /// Percentage points by which the new revision's share of 5xx answers may exceed the
    /// old one's.
    pub max_error_increase: u32,
    /// Percent of the old revision's p95 the new one's may reach (200: twice as slow).
    pub max_p95_ratio: u32,
}

impl Default for GuardSettings {
    fn default() -> GuardSettings {
        GuardSettings { enabled: false, window: 300, max_error_increase: 5, max_p95_ratio: 200 }
    }
}

/// A revision the guard watches, until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardWatch {
    pub revision: RevisionId,
    /// After a switch: the revision to go back to, whose figures from before the switch
    /// are the baseline. `None` for a canary, which is compared with the current
    /// revision over the same time.
    pub previous: Option<RevisionId>,
    pub until: OffsetDateTime,
    pub baseline_calls: u64,
    pub baseline_errors: u64,
    pub baseline_p95_micros: Option<u64>,
}

/// A share of an app's new calls, in percent, sent to one of its revisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrafficShare {
    pub revision: RevisionId,
    pub percent: u8,
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
    /// The machine type it was placed on (while it waits: the ones it may run on).
    pub machine_type: String,
    /// The GPUs it holds (held, once it has ended), by id.
    pub gpus: Vec<String>,
    /// The cluster's node it runs on, for a runner a cluster placed.
    pub node: Option<String>,
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

/// A request in the durable queue, without its payload and result bodies (those can be
/// large and are read on their own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRequest {
    pub id: Uuid,
    /// Submission order; a smaller number is served first.
    pub seq: i64,
    pub team_id: Uuid,
    pub app_id: Uuid,
    /// `team/app` as it was called.
    pub route: String,
    /// The path under the app and the query, e.g. `/generate?steps=4`.
    pub path: String,
    pub webhook: Option<String>,
    pub state: crate::revision::QueueState,
    pub created_at: OffsetDateTime,
    /// It fails with `start_timeout` if no runner has taken it by then.
    pub start_deadline: Option<OffsetDateTime>,
    pub started_at: Option<OffsetDateTime>,
    pub completed_at: Option<OffsetDateTime>,
    /// The runner working on it, while in progress.
    pub runner: Option<crate::ids::RunnerId>,
    pub cancel_requested: bool,
    /// Attempts that ended with the runner lost, which count against the retry limit.
    pub failed_attempts: u32,
    /// Set once completed.
    pub outcome: Option<QueueOutcome>,
    pub attempts: Vec<QueueAttempt>,
    pub webhook_state: Option<crate::revision::WebhookState>,
    /// The revision it pins; `None`: it goes where the app's split sends it.
    pub revision: Option<RevisionId>,
}

/// How a queue request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOutcome {
    /// The HTTP status its result is served with.
    pub status: u16,
    /// In words, when it did not succeed.
    pub error: Option<String>,
    /// A stable name for the kind of failure, e.g. `request_cancelled`.
    pub error_type: Option<String>,
}

/// One time a queue request was sent to a runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueAttempt {
    pub runner: crate::ids::RunnerId,
    pub started_at: OffsetDateTime,
    pub ended_at: Option<OffsetDateTime>,
    /// What became of it, e.g. `answered 200` or `runner lost: forced rollout`.
    pub outcome: Option<String>,
}

/// A finished queue request's result: the runner's answer, or the platform's error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueResult {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// One line a runner printed, as it printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    pub at: OffsetDateTime,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    pub line: String,
}
