//! What each invocation came to: one [`Outcome`] per call (the `outcome` field of
//! the `idempotency` span), and the [`Event`]s along the way. With the `metrics`
//! feature both are counted through the [`metrics`](https://docs.rs/metrics)
//! facade as `idempotency.<name>`, labelled `function`, `handler` (the key
//! prefix, as in the record keys) and `mode` (`enforce` or `observe`).

/// How one invocation ended. In observe-only mode, the outcome enforcing would
/// have had (the handler ran anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The handler ran and its response (or nothing, see below) was stored.
    Executed,
    ReplayedFromStore,
    ReplayedFromCache,
    /// Another attempt holds the key.
    InProgress,
    PayloadMismatch,
    /// No key material: ran without idempotency (lenient mode).
    MissingKeyUnprotected,
    /// No key material: refused (strict mode).
    MissingKeyRefused,
    /// The handler failed; the key was given back for a retry.
    HandlerErrorReleased,
    /// The handler failed permanently; the error is stored and replayed.
    PermanentErrorStored,
    /// The reservation expired and was taken over before this attempt completed.
    LostOwnership,
    StoreError,
    /// The response (or the outbox) does not fit the store.
    TooLarge,
    /// A stored record the layer cannot read.
    MalformedRecord,
    /// An event, response or step result that is not what the layer needs.
    InvalidInput,
    /// The handler failed permanently; the compensations of its completed steps
    /// ran (or were journaled already) and the error is stored and replayed.
    Compensated,
    /// The handler failed permanently and a compensation failed: the record stays
    /// open and the retry resumes compensating.
    CompensationFailed,
    /// The condition of a staged write failed: nothing written, key released.
    WriteConditionFailed,
    /// Found the key in progress, waited for the first call, and replayed what it
    /// stored.
    WaitedThenReplayed,
    /// Found the key in progress, waited, and ran the handler: the first call
    /// released the key, or passed its deadline and was taken over.
    WaitedThenRan,
    /// Found the key in progress and waited for the most it may: refused as in
    /// progress.
    WaitTimedOut,
}

/// Something an invocation met on its way, counted besides its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Some are met only with optional features (the outbox, batch sources).
#[cfg_attr(
    not(all(feature = "outbox", feature = "sqs", feature = "streams")),
    allow(dead_code)
)]
pub(crate) enum Event {
    /// The stored record had expired: a new execution ran.
    ExpiredReexecuted,
    /// An earlier attempt's reservation had passed its deadline: taken over.
    TakenOver,
    StepReplayed,
    /// The first step a resumed execution finds missing from its journal: the
    /// call its earlier attempt may have been making when it failed, run again
    /// with the same derived key.
    StepReissued,
    OutboxDelivered,
    OutboxLeftForRelay,
    BatchRecords,
    BatchFailures,
    /// FIFO messages not run because an earlier message of their group failed.
    BatchHeldBack,
    /// A compensation ran (its closure was called).
    CompensationRun,
    /// A compensation found journaled by an earlier attempt of the execution: not run again.
    CompensationReplayed,
    /// Staged versioned writes skipped because their entity was already at their
    /// version or newer (the rest committed again without them).
    VersionedAlreadyCurrent,
    /// Observing: a call found its key in progress and would have waited for it.
    WouldWait,
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
impl Outcome {
    const ALL: [Outcome; 20] = [
        Outcome::Executed,
        Outcome::ReplayedFromStore,
        Outcome::ReplayedFromCache,
        Outcome::InProgress,
        Outcome::PayloadMismatch,
        Outcome::MissingKeyUnprotected,
        Outcome::MissingKeyRefused,
        Outcome::HandlerErrorReleased,
        Outcome::PermanentErrorStored,
        Outcome::LostOwnership,
        Outcome::StoreError,
        Outcome::TooLarge,
        Outcome::MalformedRecord,
        Outcome::InvalidInput,
        Outcome::Compensated,
        Outcome::CompensationFailed,
        Outcome::WriteConditionFailed,
        Outcome::WaitedThenReplayed,
        Outcome::WaitedThenRan,
        Outcome::WaitTimedOut,
    ];

    /// The stable name: the span's `outcome` field, and the counter's name after
    /// `idempotency.`.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::ReplayedFromStore => "replayed_from_store",
            Outcome::ReplayedFromCache => "replayed_from_cache",
            Outcome::InProgress => "in_progress",
            Outcome::PayloadMismatch => "payload_mismatch",
            Outcome::MissingKeyUnprotected => "missing_key_unprotected",
            Outcome::MissingKeyRefused => "missing_key_refused",
            Outcome::HandlerErrorReleased => "handler_error_released",
            Outcome::PermanentErrorStored => "permanent_error_stored",
            Outcome::LostOwnership => "lost_ownership",
            Outcome::StoreError => "store_error",
            Outcome::TooLarge => "too_large",
            Outcome::MalformedRecord => "malformed_record",
            Outcome::InvalidInput => "invalid_input",
            Outcome::Compensated => "compensated",
            Outcome::CompensationFailed => "compensation_failed",
            Outcome::WriteConditionFailed => "write_condition_failed",
            Outcome::WaitedThenReplayed => "waited_then_replayed",
            Outcome::WaitedThenRan => "waited_then_ran",
            Outcome::WaitTimedOut => "wait_timed_out",
        }
    }

    /// The outcome of a call that ends with `err`.
    pub(crate) fn of(err: &crate::IdempotencyError) -> Self {
        use crate::IdempotencyError as E;
        match err {
            E::AlreadyInProgress { .. } => Outcome::InProgress,
            E::PayloadMismatch { .. } => Outcome::PayloadMismatch,
            E::MissingKey { .. } => Outcome::MissingKeyRefused,
            E::LostOwnership { .. } => Outcome::LostOwnership,
            E::Store(_) => Outcome::StoreError,
            E::ResponseTooLarge { .. }
            | E::OutboxTooLarge { .. }
            | E::TransactionTooLarge { .. } => Outcome::TooLarge,
            E::WriteConditionFailed { .. } => Outcome::WriteConditionFailed,
            E::MalformedRecord { .. } => Outcome::MalformedRecord,
            E::CompensationFailed { .. } => Outcome::CompensationFailed,
            _ => Outcome::InvalidInput,
        }
    }
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
impl Event {
    const ALL: [Event; 13] = [
        Event::ExpiredReexecuted,
        Event::TakenOver,
        Event::StepReplayed,
        Event::StepReissued,
        Event::OutboxDelivered,
        Event::OutboxLeftForRelay,
        Event::BatchRecords,
        Event::BatchFailures,
        Event::BatchHeldBack,
        Event::CompensationRun,
        Event::CompensationReplayed,
        Event::VersionedAlreadyCurrent,
        Event::WouldWait,
    ];

    /// The stable name, after `idempotency.` in the counter's name.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Event::ExpiredReexecuted => "expired_reexecuted",
            Event::TakenOver => "taken_over",
            Event::StepReplayed => "step_replayed",
            Event::StepReissued => "step_reissued",
            Event::OutboxDelivered => "outbox_delivered",
            Event::OutboxLeftForRelay => "outbox_left_for_relay",
            Event::BatchRecords => "batch_records",
            Event::BatchFailures => "batch_failures",
            Event::BatchHeldBack => "batch_held_back",
            Event::CompensationRun => "compensation_run",
            Event::CompensationReplayed => "compensation_replayed",
            Event::VersionedAlreadyCurrent => "versioned_already_current",
            Event::WouldWait => "would_wait",
        }
    }
}

/// The counters of one handler. Cheap to clone; a no-op when metrics are off (or
/// without the `metrics` feature).
#[derive(Clone, Default)]
pub(crate) struct Meter {
    #[cfg(feature = "metrics")]
    counters: Option<std::sync::Arc<Counters>>,
}

/// The handler's labels, and a counter handle per name, each registered with
/// the recorder on its first use: a handler's first call registers the one or
/// two counters it touches, not all of them.
#[cfg(feature = "metrics")]
struct Counters {
    labels: [(&'static str, String); 3],
    outcomes: [std::sync::OnceLock<metrics::Counter>; Outcome::ALL.len()],
    events: [std::sync::OnceLock<metrics::Counter>; Event::ALL.len()],
    wait_ms: std::sync::OnceLock<metrics::Histogram>,
}

#[cfg(feature = "metrics")]
impl Counters {
    fn add(&self, counter: &std::sync::OnceLock<metrics::Counter>, name: &str, count: u64) {
        counter
            .get_or_init(|| metrics::counter!(format!("idempotency.{name}"), &self.labels))
            .increment(count);
    }
}

impl Meter {
    /// The counters of `handler` in `function`; handles are taken from the
    /// recorder on first use, so counting then costs an atomic add.
    #[cfg(feature = "metrics")]
    pub(crate) fn new(function: &str, handler: &str, observe: bool) -> Self {
        let mode = if observe { "observe" } else { "enforce" };
        Self {
            counters: Some(std::sync::Arc::new(Counters {
                labels: [
                    ("function", function.to_owned()),
                    ("handler", handler.to_owned()),
                    ("mode", mode.to_owned()),
                ],
                outcomes: Default::default(),
                events: Default::default(),
                wait_ms: Default::default(),
            })),
        }
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        #[cfg(feature = "metrics")]
        if let Some(counters) = &self.counters {
            counters.add(&counters.outcomes[outcome as usize], outcome.name(), 1);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = outcome;
    }

    /// How long a call waited for the first call of its key (`idempotency.wait_ms`,
    /// a histogram in milliseconds).
    pub(crate) fn wait_time(&self, waited: std::time::Duration) {
        #[cfg(feature = "metrics")]
        if let Some(counters) = &self.counters {
            counters
                .wait_ms
                .get_or_init(|| {
                    metrics::describe_histogram!(
                        "idempotency.wait_ms",
                        metrics::Unit::Milliseconds,
                        "how long a call waited for the first call of its key"
                    );
                    metrics::histogram!("idempotency.wait_ms", &counters.labels)
                })
                .record(waited.as_secs_f64() * 1000.0);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = waited;
    }

    pub(crate) fn event(&self, event: Event, count: u64) {
        #[cfg(feature = "metrics")]
        if let (Some(counters), 1..) = (&self.counters, count) {
            counters.add(&counters.events[event as usize], event.name(), count);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (event, count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_is_listed_once_at_its_index_with_a_distinct_name() {
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i, "{o:?}");
        }
        for (i, e) in Event::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i, "{e:?}");
        }
        let mut names: Vec<_> = Outcome::ALL.iter().map(|o| o.name()).collect();
        names.extend(Event::ALL.iter().map(|e| e.name()));
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count);
    }

    /// The names quoted in the first column of each table of the production
    /// chapter's metrics section, table by table.
    fn documented() -> Vec<Vec<String>> {
        let chapter = include_str!("../docs/production.md");
        let section = chapter
            .split("\n## ")
            .find(|section| section.starts_with("Metrics"))
            .expect("the production chapter has a metrics section");
        let mut tables: Vec<Vec<String>> = Vec::new();
        let mut in_table = false;
        for line in section.lines() {
            if !line.starts_with('|') {
                in_table = false;
                continue;
            }
            if !in_table {
                // A header row starts a table.
                in_table = true;
                tables.push(Vec::new());
                continue;
            }
            let first = line.trim_matches('|').split('|').next().unwrap_or_default();
            let names = first.split('`').skip(1).step_by(2).map(str::to_owned);
            tables.last_mut().expect("a table").extend(names);
        }
        tables
    }

    #[test]
    fn the_production_chapter_lists_exactly_what_is_counted() {
        let sorted = |mut names: Vec<String>| {
            names.sort_unstable();
            names
        };
        let tables = documented();
        assert_eq!(tables.len(), 2, "the outcomes, then the events");
        let outcomes = Outcome::ALL.iter().map(|o| o.name().to_owned()).collect();
        assert_eq!(sorted(tables[0].clone()), sorted(outcomes), "outcomes");
        let events = Event::ALL.iter().map(|e| e.name().to_owned()).collect();
        assert_eq!(sorted(tables[1].clone()), sorted(events), "events");
        let chapter = include_str!("../docs/production.md");
        for histogram in ["`idempotency.wait_ms`", "`waited_ms`"] {
            assert!(chapter.contains(histogram), "{histogram}");
        }
    }
}
