//! The two text formats `/metrics` answers in: OpenMetrics 1.0, which the server's
//! registry writes and which Prometheus asks for, and the Prometheus text format 0.0.4,
//! which every other scraper and tool (`promtool`, `curl`) reads. Which one a scraper
//! gets follows its `Accept` header.
//!
//! The two differ in what concerns hangar's series only in how counters are named (an
//! OpenMetrics counter family `x` has samples `x_total`; in 0.0.4 the family is
//! `x_total` itself), in the types 0.0.4 lacks, and in OpenMetrics' `# UNIT` and
//! `# EOF` lines.

use std::collections::HashMap;

/// The content type of an OpenMetrics answer.
pub(crate) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of a Prometheus text format answer.
pub(crate) const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper whose `Accept` header is `accept` prefers OpenMetrics to the
/// Prometheus text format: it names OpenMetrics with a weight above zero, and no
/// higher than any it gives `text/plain` (or everything, `*/*`).
pub(crate) fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let weight = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())
            .unwrap_or(0.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(weight),
            "text/plain" | "text/*" | "*/*" => text = text.max(weight),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

/// `openmetrics` in the Prometheus text format 0.0.4: counter families take their
/// samples' `_total` name, `info` families become gauges named `_info`, and the lines
/// 0.0.4 does not have (`# UNIT`, `# EOF`, counters' `_created` samples) go.
pub(crate) fn prometheus_text(openmetrics: &str) -> String {
    // Each family's type, as its `# TYPE` line says.
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name, kind.trim()))
        .collect();
    let renamed = |name: &str| -> String {
        match types.get(name) {
            Some(&"counter") => format!("{name}_total"),
            Some(&"info") => format!("{name}_info"),
            _ => name.to_owned(),
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", renamed(name)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = match kind.trim() {
                "info" | "stateset" => "gauge",
                "gaugehistogram" => "histogram",
                "unknown" => "untyped",
                other => other,
            };
            out.push_str(&format!("# TYPE {} {kind}\n", renamed(name)));
        } else if line.starts_with('#') || line.trim().is_empty() {
            // `# UNIT`, `# EOF` and comments: nothing in 0.0.4.
        } else if is_created_sample(line, &types) {
            // When a counter began: 0.0.4 has no place for it.
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Whether `line` is the `_created` sample of a counter, histogram or summary family.
fn is_created_sample(line: &str, types: &HashMap<&str, &str>) -> bool {
    let name = line.split(['{', ' ']).next().unwrap_or_default();
    name.strip_suffix("_created")
        .and_then(|family| types.get(family))
        .is_some_and(|kind| matches!(*kind, "counter" | "histogram" | "summary" | "gaugehistogram"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapers_get_openmetrics_only_when_they_prefer_it() {
        let table = [
            (None, false),
            (Some("*/*"), false),
            (Some("text/plain"), false),
            (Some("application/openmetrics-text"), true),
            // What Prometheus sends.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                     text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                true,
            ),
            (Some("text/plain;version=0.0.4;q=0.9, application/openmetrics-text;q=0.5"), false),
            (Some("application/openmetrics-text;q=0"), false),
            (Some("Application/OpenMetrics-Text; Q=0.8, text/plain; q=0.2"), true),
            (Some("application/openmetrics-text;q=nonsense"), false),
            (Some("application/json"), false),
        ];
        for (accept, expected) in table {
            assert_eq!(wants_openmetrics(accept), expected, "{accept:?}");
        }
    }

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let openmetrics = "\
# HELP hangar_calls Calls through the gateway.
# TYPE hangar_calls counter
hangar_calls_total{app=\"default/web\",status=\"200\"} 3
hangar_calls_created{app=\"default/web\",status=\"200\"} 1700000000.0
# HELP hangar_runners Runners by app and state.
# TYPE hangar_runners gauge
hangar_runners{app=\"default/web\",state=\"idle\"} 1
# HELP hangar_call_duration_seconds Time to the response head.
# TYPE hangar_call_duration_seconds histogram
# UNIT hangar_call_duration_seconds seconds
hangar_call_duration_seconds_sum{app=\"default/web\"} 0.5
hangar_call_duration_seconds_count{app=\"default/web\"} 3
hangar_call_duration_seconds_bucket{app=\"default/web\",le=\"+Inf\"} 3
# HELP hangar_build Build.
# TYPE hangar_build info
hangar_build_info{version=\"0.1.0\"} 1
# EOF
";
        let expected = "\
# HELP hangar_calls_total Calls through the gateway.
# TYPE hangar_calls_total counter
hangar_calls_total{app=\"default/web\",status=\"200\"} 3
# HELP hangar_runners Runners by app and state.
# TYPE hangar_runners gauge
hangar_runners{app=\"default/web\",state=\"idle\"} 1
# HELP hangar_call_duration_seconds Time to the response head.
# TYPE hangar_call_duration_seconds histogram
hangar_call_duration_seconds_sum{app=\"default/web\"} 0.5
hangar_call_duration_seconds_count{app=\"default/web\"} 3
hangar_call_duration_seconds_bucket{app=\"default/web\",le=\"+Inf\"} 3
# HELP hangar_build_info Build.
# TYPE hangar_build_info gauge
hangar_build_info{version=\"0.1.0\"} 1
";
        assert_eq!(prometheus_text(openmetrics), expected);
        assert_eq!(prometheus_text(""), "");
        assert_eq!(prometheus_text("# EOF\n"), "");
    }
}
