//! A `metrics` recorder local to one test (feature `metrics`): install it with
//! `metrics::with_local_recorder`, or `metrics::set_default_local_recorder` for
//! the rest of a `#[tokio::test]` (a current-thread runtime: every task of the
//! test runs on its thread). Labels are ignored: one handler per test.

use metrics::{CounterFn, Gauge, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The counters and histograms recorded, by name.
#[derive(Default)]
pub struct Counts {
    counters: Mutex<HashMap<String, Arc<Count>>>,
    histograms: Mutex<HashMap<String, Arc<Values>>>,
}

#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Values(Mutex<Vec<f64>>);

impl HistogramFn for Values {
    fn record(&self, value: f64) {
        self.0.lock().expect("lock").push(value);
    }
}

impl Counts {
    /// The count of `idempotency.<name>`.
    pub fn get(&self, name: &str) -> u64 {
        let counters = self.counters.lock().expect("lock");
        counters
            .get(&format!("idempotency.{name}"))
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }

    /// The values the histogram `idempotency.<name>` recorded, in order.
    pub fn values(&self, name: &str) -> Vec<f64> {
        let histograms = self.histograms.lock().expect("lock");
        histograms
            .get(&format!("idempotency.{name}"))
            .map_or_else(Vec::new, |h| h.0.lock().expect("lock").clone())
    }
}

impl metrics::Recorder for Counts {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> metrics::Counter {
        let mut counters = self.counters.lock().expect("lock");
        let count = counters.entry(key.name().to_owned()).or_default();
        metrics::Counter::from_arc(Arc::clone(count))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> metrics::Histogram {
        let mut histograms = self.histograms.lock().expect("lock");
        let values = histograms.entry(key.name().to_owned()).or_default();
        metrics::Histogram::from_arc(Arc::clone(values))
    }
}
