//! Wire types: the JSON the control API speaks (and the CLI prints with `--json`).
//! Keys are snake_case, enums lowercase, times RFC 3339, ids full UUIDs. These are a
//! stable interface for scripts: add fields, never rename or remove them.

use model::records::{App, HistoryEntry, Revision};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::{IntoParams, ToSchema};

// The request types' limits below are the ones the server enforces, so that the OpenAPI
// document tells a client exactly which values are taken (an unsigned integer's range is
// added to the document for every field). `315360000` is `model::manifest::MAX_SECONDS`
// (ten years), which an attribute cannot name.

/// An app, with its scaling values and runner settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct AppJson {
    pub name: String,
    pub team: String,
    /// The current revision's id; null until a deploy succeeds.
    pub revision: Option<String>,
    /// Who may call the app: private, public or shared.
    #[schema(schema_with = crate::openapi::auth_mode)]
    pub auth: String,
    /// Live (not ended) runners.
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
    /// The machine types its runners may run on, comma-separated in order of preference.
    pub machine_type: String,
    /// Whole GPUs per runner, when the manifest says (otherwise its machine type's).
    pub num_gpus: Option<u32>,
    pub termination_grace_period: u64,
    pub suspended: bool,
    /// Shares of new calls sent to other revisions (canaries); the current revision
    /// takes the rest. Empty: it takes every call.
    #[serde(default)]
    pub traffic: Vec<TrafficShareJson>,
    pub guard: GuardJson,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Why the server could not load the app, which it then does not serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub problem: Option<String>,
}

/// A revision of an app: its code, manifest and where it stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct RevisionJson {
    pub id: String,
    /// deploying, deployed, failed or suspended.
    #[schema(schema_with = crate::openapi::revision_status)]
    pub status: String,
    pub current: bool,
    #[schema(format = DateTime)]
    pub created_at: String,
    pub message: Option<String>,
    pub max_multiplexing: u32,
    pub startup_timeout: u64,
    /// The machine types its runners may run on, comma-separated in order of preference.
    pub machine_type: String,
    /// Whole GPUs per runner, when the manifest says (otherwise its machine type's).
    pub num_gpus: Option<u32>,
    pub termination_grace_period: u64,
    pub runners: u32,
    pub failure: Option<String>,
    /// The notes given at its deploy.
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The percent of the app's new calls it takes: the rest for the current revision,
    /// its share for a canary, 0 for any other.
    #[serde(default)]
    pub traffic: u8,
}

/// One entry of an app's history: who did what, when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct HistoryJson {
    #[schema(format = DateTime)]
    pub at: String,
    pub action: String,
    pub key_id: Option<String>,
    pub details: String,
}

/// The answer to a deploy: the revision made, and where it stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct DeployJson {
    pub app: String,
    pub revision: String,
    #[schema(schema_with = crate::openapi::revision_status)]
    pub status: String,
    /// Things the user should know about how the deploy was carried out.
    #[serde(default)]
    pub notes: Vec<String>,
    #[serde(default)]
    pub failure: Option<String>,
}

/// A piece of a log, from `offset` on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct LogChunk {
    /// The log's bytes from the offset asked for (invalid UTF-8 replaced).
    pub data: String,
    /// The offset to ask for next.
    pub next_offset: u64,
}

/// An app's cache directory (`HANGAR_CACHE_DIR` in its runners).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct CacheJson {
    pub app: String,
    /// Files in it (after a clear: the files removed).
    pub files: u64,
    /// Their size in bytes (after a clear: the bytes freed).
    pub bytes: u64,
    /// Whether it was emptied.
    pub cleared: bool,
}

/// One of the server's GPUs, and who holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct GpuJson {
    /// What its runner is told (`CUDA_VISIBLE_DEVICES`): the UUID of a detected GPU, or
    /// the id the server was given.
    pub id: String,
    pub index: u32,
    /// The device's name, where known.
    pub name: Option<String>,
    /// Its memory in bytes, where known.
    pub memory: Option<u64>,
    /// Whether a runner holds it.
    pub held: bool,
    /// The app (`team/app`) and runner holding it, when the caller's team owns that app.
    pub app: Option<String>,
    pub runner: Option<String>,
    /// Percent of the last sample period a kernel ran on it, where NVML can say.
    pub utilization: Option<u32>,
    /// Bytes of its memory in use, where NVML can say.
    pub memory_used: Option<u64>,
    /// The cluster's node it is on, for a GPU a cluster gave a runner (then `id` and
    /// `index` are as the node numbers it).
    #[serde(default)]
    pub node: Option<String>,
}

/// The answer of `/healthz`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct HealthJson {
    #[schema(schema_with = crate::openapi::health_status)]
    pub status: String,
    /// How deployed code is confined.
    #[schema(schema_with = crate::openapi::sandbox_mode)]
    pub sandbox: String,
    /// How runners' limits are enforced: by cgroups (`cgroup-v1`, `cgroup-v2`), or, with
    /// `none`, by measuring their memory (no limit on processes or CPU).
    #[schema(schema_with = crate::openapi::limits_mode)]
    pub limits: String,
    /// Set when something about the server needs its operator's attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub warning: Option<String>,
}

/// Query parameters of a deploy upload.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeployParams {
    /// Overrides the manifest's `name`.
    #[param(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", nullable = false)]
    pub app_name: Option<String>,
    /// Who may call the app: private, public or shared (default: the manifest's, else private).
    #[param(schema_with = crate::openapi::auth_mode)]
    pub auth: Option<String>,
    /// How the new revision replaces the current one: rolling (default) or recreate.
    #[param(schema_with = crate::openapi::strategy)]
    pub strategy: Option<String>,
    /// Set the scaling values to the manifest's, even those changed since with `scale`.
    #[serde(default)]
    pub reset_scale: bool,
    /// A note kept with the revision.
    #[param(nullable = false)]
    pub message: Option<String>,
    /// Watch the new revision after the switch, and switch back by itself if it answers
    /// clearly worse than the one before (the app's guard setting may do so anyway).
    #[serde(default)]
    pub guard: bool,
    /// Notes kept with the revision: `KEY=VALUE` lines (at most 32; keys of letters,
    /// digits and `_ . - /`, values of at most 256 characters).
    #[param(nullable = false)]
    pub annotations: Option<String>,
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
            num_gpus: app.runner.num_gpus,
            termination_grace_period: app.runner.termination_grace_period,
            suspended: app.suspended,
            traffic: app
                .traffic
                .iter()
                .map(|s| TrafficShareJson { revision: s.revision.to_string(), percent: s.percent })
                .collect(),
            guard: GuardJson {
                enabled: app.guard.enabled,
                window: app.guard.window,
                max_error_increase: app.guard.max_error_increase,
                max_p95_ratio: app.guard.max_p95_ratio,
                watching: app.guard_watch.as_ref().map(|w| w.revision.to_string()),
                previous: app.guard_watch.as_ref().and_then(|w| w.previous).map(|p| p.to_string()),
                until: app.guard_watch.as_ref().map(|w| rfc3339(w.until)),
            },
            created_at: rfc3339(app.created_at),
            problem: None,
        }
    }

    /// The same, saying why the server could not load the app, if it could not.
    pub fn with_problem(mut self, problem: Option<String>) -> AppJson {
        self.problem = problem;
        self
    }
}

impl RevisionJson {
    /// Revision `rev` of `app`, with its runners.
    pub fn new(rev: &Revision, app: &App, runners: u32) -> RevisionJson {
        let current = app.current_revision == Some(rev.id);
        let share = |r| app.traffic.iter().find(|s| s.revision == r).map_or(0, |s| s.percent);
        let traffic = match current {
            true => 100 - app.traffic.iter().map(|s| s.percent).sum::<u8>(),
            false => share(rev.id),
        };
        RevisionJson {
            traffic,
            id: rev.id.to_string(),
            status: rev.status.as_str().to_owned(),
            current,
            created_at: rfc3339(rev.created_at),
            message: rev.message.clone(),
            max_multiplexing: rev.runner.max_multiplexing,
            startup_timeout: rev.runner.startup_timeout,
            machine_type: rev.runner.machine_type.clone(),
            num_gpus: rev.runner.num_gpus,
            termination_grace_period: rev.runner.termination_grace_period,
            runners,
            failure: rev.failure.clone(),
            annotations: rev.annotations.iter().cloned().collect(),
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

/// A runner: one process serving one revision of an app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct RunnerJson {
    pub id: String,
    pub app: String,
    pub revision: String,
    /// The machine type it runs on (while it waits: the ones it may run on).
    pub machine_type: String,
    /// The ids of the GPUs it holds (held, once it has ended).
    pub gpus: Vec<String>,
    /// The cluster's node it runs on (Slurm's node name), for a runner a cluster placed.
    #[serde(default)]
    pub node: Option<String>,
    /// pending | setup | idle | running | draining | terminating | terminated | crash_backoff
    #[schema(schema_with = crate::openapi::runner_state)]
    pub state: String,
    pub in_flight: u32,
    /// Seconds until an idle runner is stopped by keep_alive, when it would be.
    pub expires_in: Option<u64>,
    /// Seconds since the runner started (until it ended, for an ended one).
    pub uptime: u64,
    /// Scheduled to be replaced.
    pub replacing: bool,
    #[schema(format = DateTime)]
    pub started_at: String,
    #[schema(format = DateTime)]
    pub ended_at: Option<String>,
    /// Why the runner ended or is ending.
    pub reason: Option<String>,
}

/// Which revisions a listing shows: the newest `limit` (100 when absent), or `all`.
/// The current revision is always among them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RevisionsQuery {
    /// Show the newest this many revisions (default 100).
    #[param(minimum = 1, nullable = false)]
    #[serde(default, deserialize_with = "whole_number::query_option")]
    pub limit: Option<u32>,
    /// Show every revision.
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
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunnersQuery {
    /// Comma-separated states to show (default: every state but terminated).
    #[param(schema_with = crate::openapi::runner_states)]
    pub state: Option<String>,
    /// Also show runners that ended up to this many seconds ago.
    #[param(nullable = false)]
    #[serde(default, deserialize_with = "whole_number::query_option")]
    pub since: Option<u64>,
}

/// New scaling values for an app; absent fields stay as they are. At least one value
/// must be given, and `min_concurrency` must not exceed `max_concurrency`. A whole number
/// may be written with a zero fraction (`30.0`): JSON knows one kind of number, and JSON
/// Schema's `integer` is any number without a fraction.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// Seconds an idle runner is kept.
    #[serde(default, deserialize_with = "whole_number::option")]
    #[schema(maximum = 315360000)]
    pub keep_alive: Option<u64>,
    #[serde(default, deserialize_with = "whole_number::option")]
    pub min_concurrency: Option<u32>,
    #[serde(default, deserialize_with = "whole_number::option")]
    pub max_concurrency: Option<u32>,
    #[serde(default, deserialize_with = "whole_number::option")]
    pub concurrency_buffer: Option<u32>,
    #[serde(default, deserialize_with = "whole_number::option")]
    #[schema(maximum = 1000)]
    pub concurrency_buffer_perc: Option<u32>,
    /// Seconds.
    #[serde(default, deserialize_with = "whole_number::option")]
    #[schema(maximum = 315360000)]
    pub scaling_delay: Option<u64>,
    /// Seconds.
    #[serde(default, deserialize_with = "whole_number::option")]
    #[schema(minimum = 1, maximum = 315360000)]
    pub request_timeout: Option<u64>,
    #[serde(default, deserialize_with = "whole_number::option")]
    #[schema(minimum = 1)]
    pub max_multiplexing: Option<u32>,
    /// Seconds.
    #[serde(default, deserialize_with = "whole_number::option")]
    #[schema(minimum = 1, maximum = 315360000)]
    pub startup_timeout: Option<u64>,
    /// One of the machine types this server defines.
    pub machine_type: Option<String>,
}

/// Reading whole numbers from JSON: `30`, and `30.0` too, which is the same JSON number.
/// A fraction, a negative number or one past the type's range is refused, naming the
/// value. Query strings are read the same way (`?limit=30.0`), from their text.
pub(crate) mod whole_number {
    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, Unexpected, Visitor};

    /// A JSON number without a fraction, at least 0 and below 2^64.
    struct WholeNumber(u64);

    impl<'de> Deserialize<'de> for WholeNumber {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<WholeNumber, D::Error> {
            deserializer.deserialize_any(WholeNumberVisitor { text: false }).map(WholeNumber)
        }
    }

    /// Reads a whole number from a JSON number, or, with `text`, from a query string's
    /// text (digits, or a JSON number without a fraction's worth: `30.0`, `3e1`).
    struct WholeNumberVisitor {
        text: bool,
    }

    impl Visitor<'_> for WholeNumberVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number, at least 0")
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<u64, E> {
            Ok(value)
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<u64, E> {
            u64::try_from(value).map_err(|_| E::invalid_value(Unexpected::Signed(value), &self))
        }

        fn visit_f64<E: de::Error>(self, value: f64) -> Result<u64, E> {
            // 2^64 is the first whole f64 past u64::MAX; every whole f64 below it converts
            // exactly.
            if value.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&value) {
                Ok(value as u64)
            } else {
                Err(E::invalid_value(Unexpected::Float(value), &self))
            }
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
            if !self.text {
                return Err(E::invalid_type(Unexpected::Str(text), &self));
            }
            let refused = || E::invalid_value(Unexpected::Str(text), &self);
            if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
                return text.parse().map_err(|_| refused());
            }
            if !is_json_number(text) {
                return Err(refused());
            }
            let value: f64 = text.parse().map_err(|_| refused())?;
            WholeNumberVisitor { text: false }.visit_f64::<E>(value).map_err(|_| refused())
        }
    }

    /// A whole number of type `T`.
    pub(super) fn required<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64> + Bounded,
    {
        let WholeNumber(n) = WholeNumber::deserialize(deserializer)?;
        within(n)
    }

    /// `n` as a `T`, or the error that names the largest `T`.
    fn within<T: TryFrom<u64> + Bounded, E: de::Error>(n: u64) -> Result<T, E> {
        T::try_from(n).map_err(|_| {
            de::Error::invalid_value(Unexpected::Unsigned(n), &format!("a whole number at most {}", T::MAX).as_str())
        })
    }

    /// A whole number of type `T` that may be left out but, when given, is not null.
    pub(super) fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64> + Bounded,
    {
        required(deserializer).map(Some)
    }

    /// An optional whole number of type `T` (`null` is absent).
    pub(super) fn option<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64> + Bounded,
    {
        match Option::<WholeNumber>::deserialize(deserializer)? {
            None => Ok(None),
            Some(WholeNumber(n)) => within(n).map(Some),
        }
    }

    /// The largest value of an unsigned type, for the message that refuses a larger one.
    pub(crate) trait Bounded {
        const MAX: u64;
    }

    impl Bounded for u8 {
        const MAX: u64 = u8::MAX as u64;
    }

    impl Bounded for u32 {
        const MAX: u64 = u32::MAX as u64;
    }

    impl Bounded for u64 {
        const MAX: u64 = u64::MAX;
    }

    /// A whole number written in a query string.
    struct QueryNumber(u64);

    impl<'de> Deserialize<'de> for QueryNumber {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<QueryNumber, D::Error> {
            deserializer.deserialize_str(WholeNumberVisitor { text: true }).map(QueryNumber)
        }
    }

    /// Whether `text` is a number as JSON writes one: `-`?, digits (no leading zero),
    /// then maybe `.` and digits, then maybe `e`, a sign and digits.
    fn is_json_number(text: &str) -> bool {
        let b = text.as_bytes();
        let mut i = usize::from(b.first() == Some(&b'-'));
        let digits = |i: &mut usize| {
            let start = *i;
            while b.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i - start
        };
        let start = i;
        match digits(&mut i) {
            0 => return false,
            n if n > 1 && b[start] == b'0' => return false,
            _ => {}
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            if digits(&mut i) == 0 {
                return false;
            }
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if digits(&mut i) == 0 {
                return false;
            }
        }
        i == b.len()
    }

    /// An optional whole number of type `T` in a query string.
    pub(crate) fn query_option<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64> + Bounded,
    {
        query(deserializer).map(Some)
    }

    /// A whole number of type `T` in a query string.
    pub(crate) fn query<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64> + Bounded,
    {
        let QueryNumber(n) = QueryNumber::deserialize(deserializer)?;
        within(n)
    }

    #[cfg(test)]
    mod tests {
        #[derive(Debug, serde::Deserialize)]
        struct Q {
            #[serde(default, deserialize_with = "super::query_option")]
            n: Option<u32>,
        }

        #[test]
        fn query_strings_take_whole_numbers_as_json_bodies_do() {
            let table = [
                ("n=287", Ok(Some(287))),
                ("n=287.0", Ok(Some(287))),
                ("n=2.87e2", Ok(Some(287))),
                ("n=2870E-1", Ok(Some(287))),
                ("n=007", Ok(Some(7))),
                ("", Ok(None)),
                ("n=-0", Ok(Some(0))),
                ("n=287.5", Err("287.5")),
                ("n=-1", Err("-1")),
                ("n=4294967296", Err("at most 4294967295")),
                ("n=4294967296.0", Err("at most 4294967295")),
                ("n=1e400", Err("1e400")),
                ("n=+5", Err("5")),
                ("n=5.", Err("5.")),
                ("n=.5", Err(".5")),
                ("n=07.0", Err("07.0")),
                ("n=NaN", Err("NaN")),
                ("n=inf", Err("inf")),
                ("n=", Err("")),
                ("n=0x10", Err("0x10")),
            ];
            for (query, expected) in table {
                let got = serde_urlencoded::from_str::<Q>(query).map(|q| q.n).map_err(|e| e.to_string());
                match (&got, &expected) {
                    (Ok(got), Ok(want)) => assert_eq!(got, want, "{query}"),
                    (Err(got), Err(part)) => assert!(got.contains(part), "{query}: {got}"),
                    _ => panic!("{query}: got {got:?}, expected {expected:?}"),
                }
            }
        }
    }
}

/// The answer to a scale: the app as it is now, and what changed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
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
            gpus: r.gpus.clone(),
            node: r.node.clone(),
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

/// An app's guard: how it judges a revision after a switch (or a canary), and what it
/// watches now.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct GuardJson {
    /// Every deploy and set-rev is guarded, not only those that ask.
    pub enabled: bool,
    /// Seconds after a switch during which the guard watches.
    pub window: u64,
    /// Percentage points by which the new revision's share of 5xx may exceed the old one's.
    pub max_error_increase: u32,
    /// Percent of the old revision's p95 the new one's may reach (200: twice as slow).
    pub max_p95_ratio: u32,
    /// The revision watched now, if any.
    pub watching: Option<String>,
    /// The revision it goes back to if the watched one trips; null for a canary, whose
    /// share ends instead.
    pub previous: Option<String>,
    /// When the watch ends.
    #[schema(format = DateTime)]
    pub until: Option<String>,
}

/// Change how an app's guard judges: at least one value. Values not given stay as
/// they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuardRequest {
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub enabled: Option<bool>,
    /// Seconds.
    #[serde(default, deserialize_with = "whole_number::present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 86400)]
    pub window: Option<u64>,
    #[serde(default, deserialize_with = "whole_number::present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, maximum = 100)]
    pub max_error_increase: Option<u32>,
    #[serde(default, deserialize_with = "whole_number::present", skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 100, maximum = 100000)]
    pub max_p95_ratio: Option<u32>,
}

/// A value that may be left out but, when given, is not null.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

/// An app's durable queue: its requests by status, and how long the oldest waiting one
/// has waited.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct QueueJson {
    pub in_queue: u64,
    pub in_progress: u64,
    /// Completed ones whose results are still kept.
    pub completed: u64,
    /// Seconds; null when none waits.
    pub oldest_waiting_seconds: Option<f64>,
    /// How many waiting requests a flush cancelled (only in a flush's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cancelled: Option<u64>,
}

/// An app's last hour on this server, for the dashboard's charts: a point per sample
/// interval, oldest first, each about the interval that ends at its `t`. The history is
/// kept in memory by the server running the app; it starts anew when the app moves to
/// another server or the server restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ChartsJson {
    /// Seconds between points.
    pub interval_seconds: f64,
    pub points: Vec<ChartPointJson>,
}

/// What an app did in one sample interval.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ChartPointJson {
    /// The end of the interval, in milliseconds since the Unix epoch.
    pub t: i64,
    /// Calls and 5xx answers per second, of each revision that had calls in the
    /// interval (one without calls is left out: its rates were 0).
    pub revisions: Vec<RevisionRateJson>,
    /// The median time to the answer's head of the app's calls in the interval, in
    /// milliseconds (to within 19 %); null without calls.
    pub p50_ms: Option<f64>,
    /// The 95th percentile, likewise.
    pub p95_ms: Option<f64>,
    /// The app's runners by state at the end of the interval.
    pub runners: RunnerCountsJson,
    /// Calls waiting for a runner at the end of the interval.
    pub queued: u32,
    /// Runners started in the interval while calls waited and no runner was set up.
    pub cold_starts: u64,
}

/// One revision's calls in a chart's interval.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct RevisionRateJson {
    pub revision: String,
    pub calls_per_s: f64,
    /// Calls answered 5xx, per second.
    pub errors_per_s: f64,
}

/// How many runners are in each state (an ended runner is not counted).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct RunnerCountsJson {
    pub pending: u32,
    pub setup: u32,
    pub idle: u32,
    pub running: u32,
    pub draining: u32,
    pub terminating: u32,
    pub crash_backoff: u32,
}

/// A share of an app's new calls, in percent, sent to one revision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrafficShareJson {
    /// Revision id (in answers, in full; in requests, or a unique prefix of it).
    #[schema(pattern = r"^[0-9a-fA-F-]{1,36}$")]
    pub revision: String,
    #[serde(deserialize_with = "whole_number::required")]
    #[schema(minimum = 1, maximum = 99)]
    pub percent: u8,
}

/// Split an app's new calls between its current revision and others: each named
/// revision gets its share, the current one the rest. No shares: end the split.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrafficRequest {
    pub shares: Vec<TrafficShareJson>,
    /// Watch the one canary named and end its share by itself if it answers clearly
    /// worse than the current revision meanwhile.
    #[serde(default)]
    pub guard: bool,
}

/// Switch an app to another revision.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRevRequest {
    /// Revision id or a unique prefix of it.
    #[schema(pattern = r"^[0-9a-fA-F-]{1,36}$")]
    pub revision: String,
    /// rolling (default) or recreate
    #[schema(schema_with = crate::openapi::nullable_strategy)]
    pub strategy: Option<String>,
    /// private, public or shared (default: unchanged)
    #[schema(schema_with = crate::openapi::nullable_auth_mode)]
    pub auth: Option<String>,
    /// Watch the revision after the switch and switch back by itself if it answers
    /// clearly worse than the one before.
    #[serde(default)]
    pub guard: bool,
}

/// Restart every runner of an app.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// Kill the runners at once instead of draining them.
    #[serde(default)]
    pub force: bool,
}

/// The answer to a rollout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct RolloutJson {
    pub app: String,
    pub revision: String,
    /// The runners being replaced.
    pub runners: Vec<String>,
    pub force: bool,
}

/// A team: the owner of apps, keys and secrets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct TeamJson {
    pub name: String,
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// A new team (root key only). Its name follows the rules of app names; `queue` is
/// reserved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTeamRequest {
    #[schema(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub name: String,
}

/// A new team and its first admin key, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct CreatedTeamJson {
    pub team: TeamJson,
    pub key: CreatedKeyJson,
}

/// An API key, without its secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct KeyJson {
    pub id: String,
    /// root, admin or api.
    #[schema(schema_with = crate::openapi::key_scope)]
    pub scope: String,
    pub description: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub revoked_at: Option<String>,
}

/// The longest key description taken, in characters.
pub const MAX_KEY_DESCRIPTION_CHARS: usize = 500;

/// A new key for the caller's team.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// admin or api
    #[schema(schema_with = crate::openapi::new_key_scope)]
    pub scope: String,
    /// At most 500 characters.
    #[schema(max_length = 500)]
    pub description: Option<String>,
}

/// A new key: `key` is `<id>:<secret>` and is never shown again (nor by `Debug`).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct CreatedKeyJson {
    pub id: String,
    pub key: String,
    #[schema(schema_with = crate::openapi::key_scope)]
    pub scope: String,
}

/// A secret's name and times; its value is never shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct SecretJson {
    pub name: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// Secrets to set, by name. Names are environment variable names (`PORT` and `HANGAR_*`
/// are reserved); a value is at most 64 KiB of UTF-8. `Debug` shows the names only.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecretsRequest {
    #[schema(schema_with = crate::openapi::secret_values)]
    pub values: std::collections::BTreeMap<String, String>,
}

/// What `Debug` shows in place of a secret value.
pub const REDACTED: &str = "<redacted>";

impl std::fmt::Debug for CreatedKeyJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKeyJson")
            .field("id", &self.id)
            .field("key", &REDACTED)
            .field("scope", &self.scope)
            .finish()
    }
}

impl std::fmt::Debug for SetSecretsRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let values: std::collections::BTreeMap<&str, &str> =
            self.values.keys().map(|k| (k.as_str(), REDACTED)).collect();
        f.debug_struct("SetSecretsRequest").field("values", &values).finish()
    }
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

/// The longest secret value taken, in bytes of UTF-8.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn scale(json: &str) -> Result<ScaleRequest, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn scale_values_are_whole_numbers_with_or_without_a_zero_fraction() {
        let request = scale(r#"{"keep_alive": 30.0, "min_concurrency": 2, "max_concurrency": null}"#).unwrap();
        assert_eq!((request.keep_alive, request.min_concurrency, request.max_concurrency), (Some(30), Some(2), None));
        assert_eq!(scale(r#"{"min_concurrency": 4294967295.0}"#).unwrap().min_concurrency, Some(u32::MAX));
        assert_eq!(scale("{}").unwrap(), ScaleRequest::default());
        for (json, named) in [
            (r#"{"keep_alive": 30.5}"#, "floating point `30.5`"),
            (r#"{"keep_alive": -1}"#, "integer `-1`"),
            (r#"{"keep_alive": "30"}"#, "string \"30\""),
            (r#"{"keep_alive": 1.8446744073709552e19}"#, "floating point"),
            (r#"{"min_concurrency": 4294967296}"#, "at most 4294967295"),
        ] {
            let error = scale(json).unwrap_err();
            assert!(error.contains(named), "{json}: {error}");
        }
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn secret_values_are_left_out_of_debug_output() {
        let key = CreatedKeyJson { id: "k1".into(), key: "k1:s3cr3t".into(), scope: "admin".into() };
        let secrets = SetSecretsRequest { values: [("TOKEN".to_owned(), "s3cr3t".to_owned())].into() };
        for shown in [
            format!("{key:?}"),
            format!("{secrets:?}"),
            format!("{:?}", crate::client::Client::new("http://x", Some("k1:s3cr3t".into()), None)),
        ] {
            assert!(!shown.contains("s3cr3t") && shown.contains(REDACTED), "{shown}");
        }
        assert!(format!("{secrets:?}").contains("TOKEN"));
    }
}

/// What a client sends on a runner's exec connection (`GET /v1/runners/{id}/exec`, a
/// WebSocket), each as a text message; the command's standard input goes as binary
/// messages. The first message must be `start`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExecClientMessage {
    /// What to run: a program and its arguments, looked up on the runner's `PATH`, and
    /// whether it gets a terminal of `rows` × `cols` (24 × 80 unless given).
    Start {
        command: Vec<String>,
        #[serde(default)]
        tty: bool,
        #[serde(default)]
        rows: Option<u16>,
        #[serde(default)]
        cols: Option<u16>,
    },
    /// The client's terminal has a new size.
    Resize { rows: u16, cols: u16 },
    /// The command's standard input ends (without a terminal).
    Eof,
}

/// What the server sends on a runner's exec connection as text messages: the command's
/// end, or why it could not run. Its output comes as binary messages whose first byte
/// names the stream (1 stdout, 2 stderr).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecServerMessage {
    /// The command ended with this status: its exit code, or 128 + the signal that
    /// ended it.
    Exit { code: i32 },
    /// It did not start; `code` and `message` as in the JSON error body.
    Error { code: String, message: String },
}

/// The first byte of a binary exec message from the server: which stream the rest is.
pub const EXEC_STDOUT: u8 = 1;
pub const EXEC_STDERR: u8 = 2;
