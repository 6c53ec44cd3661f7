//! What the gateway counts, in Prometheus terms. The server registers these in its
//! registry next to its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::route::SlotLabels;

/// Shared strings, so that labelling a call allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CallLabels {
    pub app: Arc<String>,
    pub revision: Arc<String>,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct AppLabel {
    app: Arc<String>,
}

/// Handles to the series of one runner's calls, made on its first call.
#[derive(Debug, Default)]
pub(crate) struct SeriesCache {
    ok: OnceLock<Counter>,
    latency: OnceLock<Histogram>,
}

pub struct Metrics {
    calls: Family<CallLabels, Counter>,
    latency: Family<AppLabel, Histogram>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            calls: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
            }),
        }
    }
}

impl Metrics {
    /// Counts a call to `app` on the runner `slot` by its status and records the time to
    /// its response head. A runner's series for 200 and its app's latency are looked up
    /// once and kept in its [`SeriesCache`], so that the common call hashes no labels.
    pub(crate) fn record(&self, app: &Arc<String>, slot: &SlotLabels, status: u16, elapsed: Duration) {
        let series = |status| CallLabels { app: app.clone(), revision: slot.revision_label.clone(), status };
        if status == 200 {
            slot.series.ok.get_or_init(|| self.calls.get_or_create(&series(200)).clone()).inc();
        } else {
            self.calls.get_or_create(&series(status)).inc();
        }
        let latency =
            slot.series.latency.get_or_init(|| self.latency.get_or_create(&AppLabel { app: app.clone() }).clone());
        latency.observe(elapsed.as_secs_f64());
        slot.figures.record(status, elapsed);
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register("hangar_calls", "Calls through the gateway by app, revision and status", self.calls.clone());
        registry.register(
            "hangar_call_duration_seconds",
            "Time from a call's arrival to its response head, by app",
            self.latency.clone(),
        );
    }
}

/// How many latency buckets a revision's figures keep: a quarter of a power of two each
/// (about 19 % apart), from 64 µs up; the last takes everything slower (over 18 h).
const BUCKETS: usize = 128;

/// One revision's calls as its app's guard reads them: how many, how many answered 5xx,
/// and their times to the response head. Counted since the route was made, by every
/// gateway thread.
#[derive(Debug)]
pub(crate) struct RevisionFigures {
    calls: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl Default for RevisionFigures {
    fn default() -> RevisionFigures {
        RevisionFigures {
            calls: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl RevisionFigures {
    fn record(&self, status: u16, elapsed: Duration) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.buckets[bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
    }

    /// The figures as they stand.
    pub(crate) fn read(&self) -> Figures {
        Figures {
            calls: self.calls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            buckets: self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
        }
    }
}

/// The bucket of a call that took `elapsed`.
fn bucket(elapsed: Duration) -> usize {
    let micros = elapsed.as_micros().max(64) as f64;
    ((4.0 * (micros / 64.0).log2()) as usize).min(BUCKETS - 1)
}

/// A revision's calls, read at one moment, or between two ([`Figures::since`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figures {
    pub calls: u64,
    /// Of those, the ones answered 5xx.
    pub errors: u64,
    buckets: Vec<u64>,
}

impl Figures {
    /// Figures with `calls` calls, `errors` of them 5xx, all as slow as `p95` (as a
    /// guard's stored baseline is read back).
    pub fn summary(calls: u64, errors: u64, p95: Option<Duration>) -> Figures {
        let mut buckets = vec![0; BUCKETS];
        if let Some(p95) = p95 {
            buckets[bucket(p95)] = calls;
        }
        Figures { calls, errors, buckets }
    }

    /// What happened after `earlier`, a reading of the same revision.
    pub fn since(&self, earlier: &Figures) -> Figures {
        let at = |b: &Vec<u64>, i: usize| b.get(i).copied().unwrap_or(0);
        Figures {
            calls: self.calls.saturating_sub(earlier.calls),
            errors: self.errors.saturating_sub(earlier.errors),
            buckets: (0..BUCKETS).map(|i| at(&self.buckets, i).saturating_sub(at(&earlier.buckets, i))).collect(),
        }
    }

    /// The share of calls answered 5xx, 0 to 1 (0 with no calls).
    pub fn error_share(&self) -> f64 {
        if self.calls == 0 { 0.0 } else { self.errors as f64 / self.calls as f64 }
    }

    /// These figures and `other`'s together (of another revision, say, for the app's
    /// latency as a whole).
    pub fn add(&mut self, other: &Figures) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.buckets.resize(BUCKETS, 0);
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
    }

    /// The time within which 95 % of the calls had their answer's head, to the upper
    /// edge of its bucket (within 19 %); `None` with no calls.
    pub fn p95(&self) -> Option<Duration> {
        self.percentile(95)
    }

    /// The time within which `percent` % of the calls (1 to 100) had their answer's
    /// head, to the upper edge of its bucket (within 19 %); `None` with no calls.
    pub fn percentile(&self, percent: u64) -> Option<Duration> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let wanted = (total * percent.clamp(1, 100)).div_ceil(100);
        let mut seen = 0;
        let at = self.buckets.iter().position(|n| {
            seen += n;
            seen >= wanted
        })?;
        Some(Duration::from_micros((64.0 * ((at + 1) as f64 / 4.0).exp2()) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls taking each of `ms` milliseconds, as figures.
    fn calls(ms: &[u64]) -> Figures {
        let figures = RevisionFigures::default();
        for &ms in ms {
            figures.record(200, Duration::from_millis(ms));
        }
        figures.read()
    }

    #[test]
    fn percentiles_are_the_upper_edge_of_the_bucket_they_fall_in() {
        // (calls in ms, percent, expected bucket's upper edge in µs)
        let check = |ms: &[u64], percent: u64, expect: Option<u64>| {
            let got = calls(ms).percentile(percent).map(|d| d.as_micros() as u64);
            assert_eq!(got, expect, "{percent} % of {ms:?}");
        };
        check(&[], 50, None);
        check(&[10], 50, Some(11_585));
        check(&[10], 1, Some(11_585));
        check(&[10], 100, Some(11_585));
        // Half of them within 1 ms, the other half within 100 ms.
        check(&[1, 1, 100, 100], 50, Some(1_024));
        check(&[1, 1, 100, 100], 51, Some(110_217));
        check(&[1, 1, 100, 100], 95, Some(110_217));
        // 19 of 20 fast: the p95 is still fast, the p96 is not.
        let mut ms = vec![2; 19];
        ms.push(1000);
        check(&ms, 95, Some(2_048));
        check(&ms, 96, Some(1_048_576));
        check(&ms, 50, Some(2_048));
        // Out-of-range percentages are taken as the nearest one.
        check(&[1, 100], 0, Some(1_024));
        check(&[1, 100], 250, Some(110_217));
    }

    #[test]
    fn figures_count_errors_and_place_the_p95_within_a_bucket() {
        let figures = RevisionFigures::default();
        for ms in 1..=100 {
            figures.record(if ms % 10 == 0 { 503 } else { 200 }, Duration::from_millis(ms));
        }
        let read = figures.read();
        assert_eq!((read.calls, read.errors), (100, 10));
        assert!((read.error_share() - 0.1).abs() < 1e-9);
        let p95 = read.p95().unwrap();
        assert!(p95 >= Duration::from_millis(95) && p95 <= Duration::from_millis(95 * 120 / 100), "{p95:?}");

        // What came after an earlier reading.
        for _ in 0..50 {
            figures.record(500, Duration::from_secs(2));
        }
        let later = figures.read().since(&read);
        assert_eq!((later.calls, later.errors), (50, 50));
        let p95 = later.p95().unwrap();
        assert!(p95 >= Duration::from_secs(2) && p95 <= Duration::from_millis(2400), "{p95:?}");
        assert_eq!(Figures::default().p95(), None);
        assert_eq!(Figures::default().error_share(), 0.0);

        // A stored summary reads back within a bucket.
        let summary = Figures::summary(40, 2, Some(Duration::from_millis(30)));
        assert_eq!((summary.calls, summary.errors), (40, 2));
        let p95 = summary.p95().unwrap();
        assert!(p95 >= Duration::from_millis(30) && p95 <= Duration::from_millis(36), "{p95:?}");
        // Figures of two revisions add up.
        let mut both = read.clone();
        both.add(&later);
        assert_eq!((both.calls, both.errors), (150, 60));
        assert_eq!(both.percentile(100), later.percentile(100));
        assert_eq!(Figures::default().percentile(50), None);
        // Very fast and very slow calls land in the first and the last bucket.
        assert_eq!((bucket(Duration::ZERO), bucket(Duration::from_secs(1 << 40))), (0, BUCKETS - 1));
    }
}
