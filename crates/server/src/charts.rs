//! The dashboard's charts: for each app this server runs, what its calls, runners and
//! queue did over the last hour, in memory. One task ([`sample`]) reads the same counters
//! as `/metrics` every `--chart-interval` and keeps, per app, the points between each
//! reading and the one before ([`History`]). The turning of readings into points is pure.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use gateway::Figures;
use model::ids::RevisionId;
use model::revision::RunnerState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;

/// How far back the charts go.
pub(crate) const WINDOW: Duration = Duration::from_secs(3600);

/// The runner states a chart shows (an ended runner is no longer one of the app's).
pub(crate) const STATES: [RunnerState; 7] = [
    RunnerState::Pending,
    RunnerState::Setup,
    RunnerState::Idle,
    RunnerState::Running,
    RunnerState::Draining,
    RunnerState::Terminating,
    RunnerState::CrashBackoff,
];

/// The counters of one app at one moment.
#[derive(Debug, Clone)]
pub(crate) struct Reading {
    /// When, for the rates between two readings.
    pub(crate) at: Instant,
    /// When, as milliseconds since the Unix epoch, for the chart's time axis.
    pub(crate) unix_ms: i64,
    /// Each revision's calls so far.
    pub(crate) revisions: Vec<(RevisionId, Figures)>,
    /// How many runners are in each of [`STATES`].
    pub(crate) runners: [u32; STATES.len()],
    /// Calls waiting for a runner.
    pub(crate) queued: u32,
    /// Cold starts so far.
    pub(crate) cold_starts: u64,
}

/// What happened between two readings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Point {
    /// The later reading's time, in milliseconds since the Unix epoch.
    pub(crate) unix_ms: i64,
    /// Calls and 5xx answers per second of each revision that had calls, in the order
    /// the route first saw them.
    pub(crate) rates: Vec<Rate>,
    /// The app's calls' latency (every revision's together); `None` without calls.
    pub(crate) p50: Option<Duration>,
    pub(crate) p95: Option<Duration>,
    /// Runners in each of [`STATES`], at the later reading.
    pub(crate) runners: [u32; STATES.len()],
    /// Calls waiting, at the later reading.
    pub(crate) queued: u32,
    /// Cold starts between the two readings.
    pub(crate) cold_starts: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rate {
    pub(crate) revision: RevisionId,
    pub(crate) calls_per_s: f64,
    pub(crate) errors_per_s: f64,
}

/// The point between `earlier` and `later`, two readings of one app. Counters that went
/// back (the app's route was made anew) count from zero.
pub(crate) fn point(earlier: &Reading, later: &Reading) -> Point {
    let seconds = later.at.saturating_duration_since(earlier.at).as_secs_f64();
    let per_s = |n: u64| if seconds > 0.0 { n as f64 / seconds } else { 0.0 };
    let mut all = Figures::default();
    let mut rates = Vec::new();
    for (revision, figures) in &later.revisions {
        let before = earlier.revisions.iter().find(|(r, _)| r == revision).map(|(_, f)| f.clone()).unwrap_or_default();
        let mut between = figures.since(&before);
        if figures.calls < before.calls {
            between = figures.clone();
        }
        if between.calls == 0 {
            continue;
        }
        all.add(&between);
        rates.push(Rate {
            revision: *revision,
            calls_per_s: per_s(between.calls),
            errors_per_s: per_s(between.errors),
        });
    }
    Point {
        unix_ms: later.unix_ms,
        rates,
        p50: all.percentile(50),
        p95: all.percentile(95),
        runners: later.runners,
        queued: later.queued,
        cold_starts: later.cold_starts.checked_sub(earlier.cold_starts).unwrap_or(later.cold_starts),
    }
}

/// One app's points of the last hour, oldest first, and the reading the next one starts
/// from.
#[derive(Debug, Default)]
pub(crate) struct History {
    last: Option<Reading>,
    points: VecDeque<Point>,
}

impl History {
    /// Adds the point from the last reading to `reading` (none for the first), and
    /// forgets points more than [`WINDOW`] older than it.
    pub(crate) fn record(&mut self, reading: Reading) {
        if let Some(last) = &self.last {
            self.points.push_back(point(last, &reading));
        }
        let oldest = reading.unix_ms - WINDOW.as_millis() as i64;
        while self.points.front().is_some_and(|p| p.unix_ms <= oldest) {
            self.points.pop_front();
        }
        self.last = Some(reading);
    }

    pub(crate) fn points(&self) -> impl Iterator<Item = &Point> {
        self.points.iter()
    }
}

/// Reads every app this server runs each `interval` into its history, until `stop`.
pub(crate) async fn sample(fleet: Arc<Fleet>, interval: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => fleet.sample_charts(),
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn unix_ms_now() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revision(n: u8) -> RevisionId {
        RevisionId::from(uuid::Uuid::from_bytes([n; 16]))
    }

    /// A reading `secs` seconds after `origin`, with each revision's figures as `(id,
    /// calls, errors, p95 in ms)`, `runners` idle and running, `queued` and `cold` starts.
    fn reading(
        origin: Instant,
        secs: u64,
        revs: &[(u8, u64, u64, u64)],
        runners: (u32, u32),
        queued: u32,
        cold: u64,
    ) -> Reading {
        let mut states = [0; STATES.len()];
        states[2] = runners.0;
        states[3] = runners.1;
        Reading {
            at: origin + Duration::from_secs(secs),
            unix_ms: 1_000_000 + 1000 * secs as i64,
            revisions: revs
                .iter()
                .map(|&(n, calls, errors, ms)| {
                    (revision(n), Figures::summary(calls, errors, Some(Duration::from_millis(ms))))
                })
                .collect(),
            runners: states,
            queued,
            cold_starts: cold,
        }
    }

    /// The point between two readings, as (rates as (revision, calls/s, errors/s), p95
    /// in whole ms, idle and running runners, queued, cold starts).
    type Seen = (Vec<(u8, f64, f64)>, Option<u128>, (u32, u32), u32, u64);

    fn check(earlier: &Reading, later: &Reading, expect: Seen) {
        let p = point(earlier, later);
        let rates = p
            .rates
            .iter()
            .map(|r| ((0..=255).find(|&n| revision(n) == r.revision).unwrap(), r.calls_per_s, r.errors_per_s))
            .collect();
        let seen = (rates, p.p95.map(|d| d.as_millis()), (p.runners[2], p.runners[3]), p.queued, p.cold_starts);
        assert_eq!(seen, expect, "{earlier:?} -> {later:?}");
        assert_eq!(p.unix_ms, later.unix_ms);
        assert_eq!(p.p50.is_some(), p.p95.is_some());
    }

    #[test]
    fn two_readings_make_a_point() {
        let t = Instant::now();
        // Nothing happened: no rates, no latency.
        check(&reading(t, 0, &[], (0, 0), 0, 0), &reading(t, 5, &[], (1, 0), 0, 0), (vec![], None, (1, 0), 0, 0));
        // 50 calls in 5 s, 10 of them 5xx, all within 20 ms (23, the upper edge of its bucket).
        check(
            &reading(t, 0, &[(1, 100, 0, 20)], (0, 0), 0, 0),
            &reading(t, 5, &[(1, 150, 10, 20)], (0, 2), 3, 1),
            (vec![(1, 10.0, 2.0)], Some(23), (0, 2), 3, 1),
        );
        // A revision first seen in the later reading counts from zero; one without calls
        // in between is left out.
        check(
            &reading(t, 0, &[(1, 10, 0, 5)], (1, 0), 0, 2),
            &reading(t, 2, &[(1, 10, 0, 5), (2, 8, 8, 300)], (1, 1), 0, 2),
            (vec![(2, 4.0, 4.0)], Some(311), (1, 1), 0, 0),
        );
        // Counters that went back (the route was made anew) count from zero.
        check(
            &reading(t, 0, &[(1, 500, 5, 5)], (0, 0), 0, 7),
            &reading(t, 4, &[(1, 20, 0, 5)], (0, 0), 0, 1),
            (vec![(1, 5.0, 0.0)], Some(5), (0, 0), 0, 1),
        );
        // Readings at the same instant give no rates rather than infinite ones.
        check(
            &reading(t, 3, &[(1, 0, 0, 5)], (0, 0), 0, 0),
            &reading(t, 3, &[(1, 4, 0, 5)], (0, 0), 0, 0),
            (vec![(1, 0.0, 0.0)], Some(5), (0, 0), 0, 0),
        );
    }

    #[test]
    fn the_history_keeps_the_last_hour() {
        let t = Instant::now();
        let mut history = History::default();
        let times = |h: &History| h.points().map(|p| (p.unix_ms - 1_000_000) / 1000).collect::<Vec<_>>();
        history.record(reading(t, 0, &[], (0, 0), 0, 0));
        assert_eq!(times(&history), Vec::<i64>::new(), "the first reading only starts the history");
        for secs in (5..=3600).step_by(5) {
            history.record(reading(t, secs, &[], (0, 0), 0, 0));
        }
        assert_eq!(history.points().count(), 720);
        assert_eq!(times(&history).first(), Some(&5));
        history.record(reading(t, 3605, &[], (0, 0), 0, 0));
        assert_eq!(history.points().count(), 720, "one in, the one an hour old out");
        assert_eq!((times(&history)[0], times(&history)[719]), (10, 3605));
        // A pause (the server was busy) leaves out everything older than an hour.
        history.record(reading(t, 8000, &[], (0, 0), 0, 0));
        assert_eq!(times(&history), vec![8000]);
    }
}
