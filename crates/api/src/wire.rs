//! Wire types: the JSON the control API speaks (and the CLI prints with `--json`).
//! Keys are snake_case, enums lowercase, times RFC 3339, ids full UUIDs. These are a
//! stable interface for scripts: add fields, never rename or remove them.

use model::records::{App, HistoryEntry, Revision};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppJson {
    pub name: String,
    pub team: String,
    pub revision: Option<String>,
    pub auth: String,
    pub runners: u32,
    pub keep_alive: u64,
    pub min_concurrency: u32,
    pub max_concurrency: u32,
    pub concurrency_buffer: u32,
    pub concurrency_buffer_perc: u32,
    pub scaling_delay: u64,
    pub request_timeout: u64,
    pub max_multiplexing: u32,
    pub startup_timeout: u64,
    pub machine_type: String,
    pub termination_grace_period: u64,
    pub suspended: bool,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevisionJson {
    pub id: String,
    pub status: String,
    pub current: bool,
    pub created_at: String,
    pub message: Option<String>,
    pub max_multiplexing: u32,
    pub startup_timeout: u64,
    pub machine_type: String,
    pub termination_grace_period: u64,
    pub runners: u32,
    pub failure: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistoryJson {
    pub at: String,
    pub action: String,
    pub key_id: Option<String>,
    pub details: String,
}

/// The answer to a deploy: the revision made, and where it stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeployJson {
    pub app: String,
    pub revision: String,
    pub status: String,
    /// Things the user should know about how the deploy was carried out.
    #[serde(default)]
    pub notes: Vec<String>,
    #[serde(default)]
    pub failure: Option<String>,
}

/// A piece of a revision's build log, from `offset` on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogChunk {
    pub data: String,
    pub next_offset: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthJson {
    pub status: String,
}

/// Query parameters of a deploy upload.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeployParams {
    /// Overrides the manifest's `name`.
    pub app_name: Option<String>,
    pub auth: Option<String>,
    pub strategy: Option<String>,
    #[serde(default)]
    pub reset_scale: bool,
    pub message: Option<String>,
}

/// A time as RFC 3339 in UTC with exactly three decimals, so that times sort as strings.
pub fn rfc3339(t: OffsetDateTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.to_offset(time::UtcOffset::UTC).format(&format).unwrap_or_else(|_| t.format(&Rfc3339).unwrap_or_default())
}

impl AppJson {
    pub fn new(app: &App, team: &str, runners: u32) -> AppJson {
        AppJson {
            name: app.name.clone(),
            team: team.to_owned(),
            revision: app.current_revision.map(|r| r.to_string()),
            auth: app.auth.as_str().to_owned(),
            runners,
            keep_alive: app.scaling.keep_alive,
            min_concurrency: app.scaling.min_concurrency,
            max_concurrency: app.scaling.max_concurrency,
            concurrency_buffer: app.scaling.concurrency_buffer,
            concurrency_buffer_perc: app.scaling.concurrency_buffer_perc,
            scaling_delay: app.scaling.scaling_delay,
            request_timeout: app.scaling.request_timeout,
            max_multiplexing: app.runner.max_multiplexing,
            startup_timeout: app.runner.startup_timeout,
            machine_type: app.runner.machine_type.clone(),
            termination_grace_period: app.runner.termination_grace_period,
            suspended: app.suspended,
            created_at: rfc3339(app.created_at),
        }
    }
}

impl RevisionJson {
    pub fn new(rev: &Revision, current: bool, runners: u32) -> RevisionJson {
        RevisionJson {
            id: rev.id.to_string(),
            status: rev.status.as_str().to_owned(),
            current,
            created_at: rfc3339(rev.created_at),
            message: rev.message.clone(),
            max_multiplexing: rev.runner.max_multiplexing,
            startup_timeout: rev.runner.startup_timeout,
            machine_type: rev.runner.machine_type.clone(),
            termination_grace_period: rev.runner.termination_grace_period,
            runners,
            failure: rev.failure.clone(),
        }
    }
}

impl From<&HistoryEntry> for HistoryJson {
    fn from(h: &HistoryEntry) -> HistoryJson {
        HistoryJson {
            at: rfc3339(h.at),
            action: h.action.clone(),
            key_id: h.key_id.clone(),
            details: h.details.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunnerJson {
    pub id: String,
    pub app: String,
    pub revision: String,
    pub machine_type: String,
    /// pending | setup | idle | running | draining | terminating | terminated | crash_backoff
    pub state: String,
    pub in_flight: u32,
    /// Seconds until an idle runner is stopped by keep_alive, when it would be.
    pub expires_in: Option<u64>,
    /// Seconds since the runner started (until it ended, for an ended one).
    pub uptime: u64,
    /// Scheduled to be replaced.
    pub replacing: bool,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub reason: Option<String>,
}

/// Which revisions a listing shows: the newest `limit` (100 when absent), or `all`.
/// The current revision is always among them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevisionsQuery {
    pub limit: Option<u32>,
    #[serde(default)]
    pub all: bool,
}

/// The newest revisions shown when a listing does not say.
pub const DEFAULT_REVISION_LIMIT: u32 = 100;

/// The header that tells how many revisions an app has in all, when a listing shows
/// fewer.
pub const TOTAL_COUNT_HEADER: &str = "x-total-count";

/// A page of an app's revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevisionList {
    pub revisions: Vec<RevisionJson>,
    pub total: u64,
}

/// Filters of a runner listing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunnersQuery {
    /// Comma-separated states to show (default: every state but terminated).
    pub state: Option<String>,
    /// Also show runners that ended up to this many seconds ago.
    pub since: Option<u64>,
}

/// New scaling values for an app; absent fields stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    pub keep_alive: Option<u64>,
    pub min_concurrency: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub concurrency_buffer: Option<u32>,
    pub concurrency_buffer_perc: Option<u32>,
    pub scaling_delay: Option<u64>,
    pub request_timeout: Option<u64>,
    pub max_multiplexing: Option<u32>,
    pub startup_timeout: Option<u64>,
    pub machine_type: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScaleJson {
    pub app: AppJson,
    /// The names of the values that changed.
    pub changed: Vec<String>,
    pub warnings: Vec<String>,
}

impl RunnerJson {
    pub fn new(r: &model::records::RunnerInfo) -> RunnerJson {
        let end = r.ended_at.unwrap_or_else(OffsetDateTime::now_utc);
        RunnerJson {
            id: r.id.to_string(),
            app: r.app.clone(),
            revision: r.revision.to_string(),
            machine_type: r.machine_type.clone(),
            state: r.state.as_str().to_owned(),
            in_flight: r.in_flight,
            expires_in: r.expires_in.map(|d| d.as_secs()),
            uptime: (end - r.started_at).whole_seconds().max(0) as u64,
            replacing: r.replacing,
            started_at: rfc3339(r.started_at),
            ended_at: r.ended_at.map(rfc3339),
            reason: r.reason.clone(),
        }
    }
}

/// Switch an app to another revision.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetRevRequest {
    /// Revision id or a unique prefix of it.
    pub revision: String,
    /// rolling (default) or recreate
    pub strategy: Option<String>,
    pub auth: Option<String>,
}

/// Restart every runner of an app.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// Kill the runners at once instead of draining them.
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RolloutJson {
    pub app: String,
    pub revision: String,
    /// The runners being replaced.
    pub runners: Vec<String>,
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TeamJson {
    pub name: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateTeamRequest {
    pub name: String,
}

/// A new team and its first admin key, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreatedTeamJson {
    pub team: TeamJson,
    pub key: CreatedKeyJson,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyJson {
    pub id: String,
    pub scope: String,
    pub description: Option<String>,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// admin or api
    pub scope: String,
    pub description: Option<String>,
}

/// A new key: `key` is `<id>:<secret>` and is never shown again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreatedKeyJson {
    pub id: String,
    pub key: String,
    pub scope: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecretJson {
    pub name: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetSecretsRequest {
    pub values: std::collections::BTreeMap<String, String>,
}

impl From<&model::records::Key> for KeyJson {
    fn from(k: &model::records::Key) -> KeyJson {
        KeyJson {
            id: k.id.clone(),
            scope: k.scope.as_str().to_owned(),
            description: k.description.clone(),
            created_at: rfc3339(k.created_at),
            revoked_at: k.revoked_at.map(rfc3339),
        }
    }
}

impl From<&model::records::Team> for TeamJson {
    fn from(t: &model::records::Team) -> TeamJson {
        TeamJson { name: t.name.clone(), created_at: rfc3339(t.created_at) }
    }
}
