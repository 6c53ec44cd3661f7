//! How values are written in either database, so that both backends read back exactly
//! what the other would: times as milliseconds since the epoch, ids as their hyphenated
//! lower-case text.

use model::ids::RevisionId;
use model::records::{GuardWatch, TrafficShare};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::StoreError;

/// The current time at the store's precision (milliseconds), so a record reads back
/// exactly as it was written.
pub(crate) fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(t.nanosecond() / 1_000_000 * 1_000_000).unwrap_or(t)
}

pub(crate) fn millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

pub(crate) fn from_millis(ms: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).map_err(|_| corrupt("timestamp"))
}

pub(crate) fn uuid(s: String) -> Result<Uuid, StoreError> {
    Uuid::parse_str(&s).map_err(|_| corrupt("uuid"))
}

pub(crate) fn revision_id(s: String) -> Result<RevisionId, StoreError> {
    uuid(s).map(RevisionId)
}

pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("unreadable {what}"))
}

/// A revision's annotations as one column: `KEY=VALUE` lines (values hold no newline).
pub(crate) fn annotations_text(annotations: &[(String, String)]) -> String {
    annotations.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

pub(crate) fn annotations_from(text: &str) -> Vec<(String, String)> {
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// An app's traffic split as one column: `revision=percent` pairs, comma-separated
/// (empty: no split).
pub(crate) fn traffic_text(shares: &[TrafficShare]) -> String {
    shares.iter().map(|s| format!("{}={}", s.revision, s.percent)).collect::<Vec<_>>().join(",")
}

pub(crate) fn traffic_from(text: &str) -> Result<Vec<TrafficShare>, StoreError> {
    text.split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (revision, percent) = pair.split_once('=').ok_or_else(|| corrupt("traffic split"))?;
            Ok(TrafficShare {
                revision: revision_id(revision.to_owned())?,
                percent: percent.parse().map_err(|_| corrupt("traffic split"))?,
            })
        })
        .collect()
}

/// What an app's guard watches, as one column: `key=value` pairs, `;`-separated (empty:
/// nothing).
pub(crate) fn guard_watch_text(watch: Option<&GuardWatch>) -> String {
    let Some(w) = watch else { return String::new() };
    let previous = w.previous.map_or_else(String::new, |p| p.to_string());
    let p95 = w.baseline_p95_micros.map_or_else(String::new, |p| p.to_string());
    format!(
        "revision={};previous={previous};until={};calls={};errors={};p95={p95}",
        w.revision,
        millis(w.until),
        w.baseline_calls,
        w.baseline_errors
    )
}

pub(crate) fn guard_watch_from(text: &str) -> Result<Option<GuardWatch>, StoreError> {
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || corrupt("guard watch");
    let field = |key: &str| text.split(';').find_map(|pair| pair.strip_prefix(key)?.strip_prefix('=')).ok_or_else(bad);
    let number = |key: &str| field(key)?.parse::<u64>().map_err(|_| bad());
    let optional = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    Ok(Some(GuardWatch {
        revision: revision_id(field("revision")?.to_owned())?,
        previous: optional(field("previous")?).map(revision_id).transpose()?,
        until: from_millis(field("until")?.parse().map_err(|_| bad())?)?,
        baseline_calls: number("calls")?,
        baseline_errors: number("errors")?,
        baseline_p95_micros: optional(field("p95")?).map(|p| p.parse().map_err(|_| bad())).transpose()?,
    }))
}
