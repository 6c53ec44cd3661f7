//! Reading runners' logs: `runners logs ID` and `apps logs APP`, with `--search`,
//! `--since` and `--until`. A runner's log has one line per output line, starting with
//! its time (RFC 3339, UTC) and its stream: `2026-12-03T11:40:00.698Z stdout text`.

use std::process::ExitCode;
use std::time::Duration;

use api::wire::RunnersQuery;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::context::Context;
use crate::output::{out, short};

/// Which lines to show.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct LogFilter {
    /// Only lines that contain TEXT
    #[arg(long, value_name = "TEXT")]
    search: Option<String>,
    /// Only lines from this time on: a duration ago (30s, 10m, 2h, 1d, 1h30m) or an
    /// RFC 3339 time
    #[arg(long, value_name = "T", value_parser = parse_when)]
    since: Option<OffsetDateTime>,
    /// Only lines before this time (the same forms as --since)
    #[arg(long, value_name = "T", value_parser = parse_when)]
    until: Option<OffsetDateTime>,
}

impl LogFilter {
    /// Whether `line` of a log passes the filter. A line whose time cannot be read passes
    /// the time bounds (it is kept rather than lost).
    pub(crate) fn keeps(&self, line: &str) -> bool {
        if self.search.as_deref().is_some_and(|text| !line.contains(text)) {
            return false;
        }
        let Some(at) = line_time(line) else { return true };
        self.since.is_none_or(|since| at >= since) && self.until.is_none_or(|until| at < until)
    }
}

/// The time a log line starts with.
fn line_time(line: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(line.split(' ').next()?, &Rfc3339).ok()
}

/// `--since`/`--until`: a duration ago, or an RFC 3339 time.
fn parse_when(value: &str) -> Result<OffsetDateTime, String> {
    when_from(value, OffsetDateTime::now_utc())
}

fn when_from(value: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(at) = OffsetDateTime::parse(value, &Rfc3339) {
        return Ok(at);
    }
    let ago = humantime::parse_duration(value).map_err(|_| {
        format!("{value:?} is neither a duration (30s, 10m, 2h, 1d) nor an RFC 3339 time (2026-12-03T10:00:00Z)")
    })?;
    Ok(now - ago)
}

/// Reads a runner's whole log from `offset` on; answers it and the offset after it.
async fn read_from(cx: &Context, runner: &str, mut offset: u64) -> anyhow::Result<(String, u64)> {
    let mut text = String::new();
    loop {
        let chunk = cx.client.runner_log(runner, offset).await?;
        if chunk.data.is_empty() {
            return Ok((text, offset));
        }
        text.push_str(&chunk.data);
        offset = chunk.next_offset;
    }
}

/// `apps logs APP`: the app's runners' lines (those still listed, ended ones too),
/// merged by time, each marked with its runner; with `follow`, new lines as they come.
pub(crate) async fn app_logs(cx: &Context, app: &str, filter: &LogFilter, follow: bool) -> anyhow::Result<ExitCode> {
    let mut offsets: Vec<(String, u64)> = Vec::new();
    loop {
        let query = RunnersQuery { state: None, since: Some(3600) };
        let runners = cx.client.runners(Some(app), &query).await?;
        let mut lines: Vec<(Option<OffsetDateTime>, String)> = Vec::new();
        for runner in &runners {
            let at = match offsets.iter().position(|(id, _)| *id == runner.id) {
                Some(at) => at,
                None => {
                    offsets.push((runner.id.clone(), 0));
                    offsets.len() - 1
                }
            };
            let (text, next) = read_from(cx, &runner.id, offsets[at].1).await?;
            // Only whole lines; the rest is read again next time.
            let whole = text.rfind('\n').map_or(0, |i| i + 1);
            offsets[at].1 = next - (text.len() - whole) as u64;
            let mark = short(&runner.id);
            for line in text[..whole].lines().filter(|l| filter.keeps(l)) {
                lines.push((line_time(line), format!("{mark} {line}")));
            }
        }
        // Merged by time; lines of one runner keep their order.
        lines.sort_by_key(|(at, _)| *at);
        for (_, line) in &lines {
            out!("{line}");
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &Rfc3339).unwrap()
    }

    #[test]
    fn times_are_durations_ago_or_rfc3339() {
        let now = at("2026-12-03T12:00:00Z");
        let cases = [
            ("30s", Ok(at("2026-12-03T11:59:30Z"))),
            ("10m", Ok(at("2026-12-03T11:50:00Z"))),
            ("1h30m", Ok(at("2026-12-03T10:30:00Z"))),
            ("1d", Ok(at("2026-12-02T12:00:00Z"))),
            ("2026-12-03T10:00:00Z", Ok(at("2026-12-03T10:00:00Z"))),
            ("2026-12-03T10:00:00.5+01:00", Ok(at("2026-12-03T09:00:00.5Z"))),
        ];
        for (input, want) in cases {
            assert_eq!(when_from(input, now), want, "{input}");
        }
        for bad in ["", "yesterday", "10", "2026-12-03"] {
            assert!(when_from(bad, now).unwrap_err().contains("neither a duration"), "{bad}");
        }
    }

    #[test]
    fn a_filter_keeps_lines_by_text_and_time() {
        let line = |t: &str, text: &str| format!("{t} stdout {text}");
        let filter = LogFilter {
            search: Some("error".to_owned()),
            since: Some(at("2026-12-03T10:00:00Z")),
            until: Some(at("2026-12-03T11:00:00Z")),
        };
        let cases = [
            (line("2026-12-03T10:30:00.123456789Z", "an error here"), true),
            (line("2026-12-03T10:30:00Z", "all fine"), false),
            (line("2026-12-03T09:59:59.999Z", "an error before"), false),
            (line("2026-12-03T10:00:00Z", "error at since"), true),
            (line("2026-12-03T11:00:00Z", "error at until"), false),
            ("not a log line with an error".to_owned(), true),
        ];
        for (input, want) in cases {
            assert_eq!(filter.keeps(&input), want, "{input}");
        }
        assert!(LogFilter::default().keeps("anything"));
    }
}
