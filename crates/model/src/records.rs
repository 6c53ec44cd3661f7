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
    /// `KEY=VALUE` notes given at deploy (`--annotation`), in the order given.
    pub annotations: Vec<(String, String)>,
}

/// The most annotations one revision keeps.
pub const MAX_ANNOTATIONS: usize = 32;

/// A deploy's annotations from `KEY=VALUE` lines: a key of 1–63 letters, digits and
/// `_ . - /` (starting with a letter or digit), each once; a value of at most 256
/// characters; at most [`MAX_ANNOTATIONS`]. The error names the first bad line.
pub fn parse_annotations(lines: &str) -> Result<Vec<(String, String)>, String> {
    let mut annotations: Vec<(String, String)> = Vec::new();
    for line in lines.split('\n').filter(|l| !l.is_empty()) {
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("annotation {line:?} is not KEY=VALUE"));
        };
        let key_ok = (1..=63).contains(&key.len())
            && key.starts_with(|c: char| c.is_ascii_alphanumeric())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c));
        if !key_ok {
            return Err(format!(
                "annotation key {key:?} must be 1 to 63 letters, digits, '_', '.', '-' or '/', starting with a letter or digit"
            ));
        }
        if value.chars().count() > 256 || value.chars().any(char::is_control) {
            return Err(format!(
                "the value of annotation {key:?} must be at most 256 characters, none of them control characters"
            ));
        }
        if annotations.iter().any(|(k, _)| k == key) {
            return Err(format!("annotation {key:?} is given twice"));
        }
        annotations.push((key.to_owned(), value.to_owned()));
    }
    if annotations.len() > MAX_ANNOTATIONS {
        return Err(format!("{} annotations given; a revision keeps at most {MAX_ANNOTATIONS}", annotations.len()));
    }
    Ok(annotations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_are_key_value_lines_with_plain_keys() {
        let ok = |s: &str| parse_annotations(s).unwrap();
        assert_eq!(ok(""), vec![]);
        assert_eq!(
            ok("git=3f2a1b\nticket=OPS-12\nnote=a = b, c"),
            vec![
                ("git".to_owned(), "3f2a1b".to_owned()),
                ("ticket".to_owned(), "OPS-12".to_owned()),
                ("note".to_owned(), "a = b, c".to_owned())
            ]
        );
        assert_eq!(
            ok("team.example/owner=ml\nempty="),
            vec![("team.example/owner".to_owned(), "ml".to_owned()), ("empty".to_owned(), String::new())]
        );
        let refused = [
            ("novalue", "not KEY=VALUE"),
            ("=x", "annotation key"),
            ("-a=x", "annotation key"),
            ("a b=x", "annotation key"),
            ("é=x", "annotation key"),
            (&format!("{}=x", "k".repeat(64)), "annotation key"),
            (&format!("k={}", "v".repeat(257)), "at most 256"),
            ("k=a\tb", "control"),
            ("k=1\nk=2", "twice"),
        ];
        for (input, why) in refused {
            let err = parse_annotations(input).unwrap_err();
            assert!(err.contains(why), "{input:?}: {err}");
        }
        let many: String = (0..33).map(|i| format!("k{i}=v\n")).collect();
        assert!(parse_annotations(&many).unwrap_err().contains("at most 32"));
    }
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

/// The size of a terminal, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermSize {
    pub rows: u16,
    pub cols: u16,
}

/// What a client sends a command running in a runner (`runners exec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecInput {
    /// Bytes for its standard input.
    Stdin(Vec<u8>),
    /// Its standard input ends (without a terminal; with one, the terminal's own
    /// end-of-file character does it).
    Eof,
    /// Its terminal has a new size.
    Resize(TermSize),
}

/// What a command running in a runner sends back, its exit status last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// It ended with this status: its exit code, or 128 + the signal that ended it.
    Exited(i32),
}
