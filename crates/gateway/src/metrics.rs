//! What the gateway counts, in Prometheus terms. The server registers these in its
//! registry next to its own.

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
