//! How values are written in either database, so that both backends read back exactly
//! what the other would: times as milliseconds since the epoch, ids as their hyphenated
//! lower-case text.

use model::ids::RevisionId;
use model::records::TrafficShare;
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
