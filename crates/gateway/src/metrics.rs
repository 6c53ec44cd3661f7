//! What the gateway counts, in Prometheus terms. The server registers these in its
//! registry next to its own.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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
    /// Counts a call by its status and records the time to its response head.
    pub(crate) fn record(&self, labels: &CallLabels, status: u16, elapsed: Duration) {
        let labels = CallLabels { status, ..labels.clone() };
        self.calls.get_or_create(&labels).inc();
        self.latency.get_or_create(&AppLabel { app: labels.app }).observe(elapsed.as_secs_f64());
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
