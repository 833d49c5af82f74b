//! Test your own wrapped handler: run the same event twice and concurrently, and
//! crash it at every phase boundary (feature `testing`, for dev-dependencies).
//!
//! A [`Kit`] wraps your handler as [`Idempotency::wrap`] does, over a store (a
//! [`MemoryStore`] by default, or yours, e.g. a [`DynamoDbStore`](crate::DynamoDbStore)
//! on LocalStack), and runs scenarios against it:
//!
//! - [`Kit::run_twice`]: the same event twice, one after the other. The second
//!   call must replay the first response byte for byte, and the handler must run once.
//! - [`Kit::run_concurrently`]: `n` duplicates at once. Exactly one may run the
//!   handler; the others replay or are refused as in progress.
//! - [`Kit::crash_matrix`]: a clean run first, to learn the steps the handler
//!   journals; then, for every phase boundary (after the reservation, around each
//!   step's journal write, before and after completing), an attempt that dies
//!   there (its future dropped, as when Lambda kills the process), followed by
//!   retries until one succeeds. Per phase: whether the retries converged on one
//!   replayed response, how often the handler ran, and which external effects
//!   really happened more than once.
//!
//! The handler's external calls go to a [`Receiver`], a fake service that dedupes
//! on the key each call carries (a payments API does) and records everything: a
//! call re-issued with the same derived key is harmless, a second distinct key
//! for the same effect is a repeated effect, a bug the matrix reports.
//!
//! ```
//! use lambda_idempotency::testing::{Kit, Receiver};
//! use lambda_idempotency::{effects, Error, IdempotencyConfig};
//! use serde_json::{json, Value};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let payments = Receiver::new();
//! let handler = {
//!     let payments = payments.clone();
//!     move |order: Value| {
//!         let payments = payments.clone();
//!         async move {
//!             let fx = effects()?;
//!             let amount = order["amount"].clone();
//!             // In a step, with the step's derived key: a retry never charges twice.
//!             let charge = fx
//!                 .step("charge", |key| async move {
//!                     Ok::<_, std::io::Error>(payments.call("charge", &key, amount).await)
//!                 })
//!                 .await?;
//!             Ok::<_, Error<std::io::Error>>(json!({ "order": order["order_id"], "charge": charge["id"] }))
//!         }
//!     }
//! };
//! let config = IdempotencyConfig::builder().key_expression("order_id").build()?;
//! let kit = Kit::new(config, handler).with_receiver(payments);
//! let event = json!({ "order_id": "o-1", "amount": 500 });
//!
//! kit.run_twice(event.clone()).await.assert_idempotent();
//! kit.run_concurrently(event.clone(), 8).await.assert_idempotent();
//! let report = kit.crash_matrix(event).await;
//! println!("{report}");
//! report.assert_converged();
//! # Ok(()) }
//! ```
//!
//! How the kit works, and what it changes:
//!
//! - Every scenario runs under a key prefix of its own (the handler is wrapped
//!   with [`Idempotency::wrap_as`] and a unique name), so scenarios never see each
//!   other's records, on a shared table too. Keys and derived keys differ from
//!   production's by that prefix only.
//! - The kit wraps your store in one of its own that counts requests and cuts an
//!   attempt at a chosen call. "Crash" means the attempt's future is dropped right
//!   before the call reaches the store, or right after the store applied it.
//! - A crashed attempt holds its reservation until its deadline (the kit gives
//!   each call a minute). The kit does not wait: it rewrites the crashed
//!   attempt's record with its in-progress expiry one millisecond in the past (a
//!   conditional write under that attempt's own owner token), as if Lambda's
//!   timeout had passed. The retry then takes the record over and resumes the
//!   execution, as a real retry after the timeout would.
//! - With the `outbox` feature and a dispatcher ([`Kit::with_dispatcher`]),
//!   messages a crash left committed but not delivered are delivered at the end of
//!   the scenario, as the relay would.
//! - Handler errors count as failed attempts: the kit retries (up to six attempts
//!   per scenario), as Lambda and the event sources do.

mod crash;
mod receiver;

pub use receiver::Receiver;

use crate::config::IdempotencyConfig;
use crate::error::{Error, IdempotencyError};
use crate::idempotency::now_ms;
use crate::idempotency::Idempotency;
use crate::record::Status;
use crate::store::{BoxFuture, IdempotencyStore, MemoryStore};
use crash::{CrashStore, Cut, Op, Probe};
use lambda_runtime::{service_fn, Context, LambdaEvent};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tower::{Service, ServiceExt};

/// Attempts per crash scenario, the crashed one included.
const MAX_ATTEMPTS: usize = 6;
/// The deadline each call gets: a minute, as a Lambda function's timeout.
const DEADLINE_MS: i64 = 60_000;

/// What one call through the wrapped handler gave.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// The response, as JSON text.
    Response(String),
    /// Refused: another call holds the key.
    InProgress(String),
    /// Any other error, as text.
    Failed(String),
}

impl Answer {
    fn into_result(self) -> Result<String, String> {
        match self {
            Answer::Response(text) => Ok(text),
            Answer::InProgress(text) | Answer::Failed(text) => Err(text),
        }
    }
}

type Invoke<S> = Arc<
    dyn Fn(&Idempotency<CrashStore<S>>, &str, Value) -> BoxFuture<'static, Answer> + Send + Sync,
>;

/// Runs a wrapped handler through duplicate, concurrent and crashed invocations;
/// see the [module documentation](self).
///
/// Generic over the store: [`MemoryStore`] by default ([`Kit::new`]); any other
/// with [`Kit::with_store`], e.g. a `DynamoDbStore` on LocalStack. Its scenarios
/// need a Tokio runtime with time enabled (`#[tokio::test]` and `#[tokio::main]`
/// have it) and run one after the other: give each kit its own [`Receiver`].
///
/// ```
/// use lambda_idempotency::testing::Kit;
/// use lambda_idempotency::IdempotencyConfig;
/// use serde_json::{json, Value};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = IdempotencyConfig::builder().key_expression("id").build()?;
/// let kit = Kit::new(config, |event: Value| async move {
///     Ok::<_, std::io::Error>(json!({ "greeted": event["id"] }))
/// });
/// let report = kit.run_twice(json!({ "id": 1 })).await;
/// assert_eq!(report.executions, 1);
/// assert!(report.same_response());
/// # Ok(()) }
/// ```
pub struct Kit<S = MemoryStore> {
    idempotency: Idempotency<CrashStore<S>>,
    probe: Arc<Probe>,
    invoke: Invoke<S>,
    receiver: Option<Receiver>,
    #[cfg(feature = "outbox")]
    dispatcher: Option<crate::Dispatcher>,
    /// Unique to this kit: part of every scenario's key prefix.
    token: String,
    scenarios: AtomicU64,
}

impl<S> fmt::Debug for Kit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kit")
            .field("idempotency", &self.idempotency)
            .field("receiver", &self.receiver)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl Kit<MemoryStore> {
    /// A kit running `handler` (an async function of the event's payload, as the
    /// body of a `service_fn` handler) on a fresh [`MemoryStore`], wrapped with `config`.
    pub fn new<H, Fut, R, E>(config: IdempotencyConfig, handler: H) -> Self
    where
        H: Fn(Value) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        Kit::with_store(MemoryStore::new(), config, handler)
    }
}

impl<S: IdempotencyStore> Kit<S> {
    /// A kit running `handler` on `store` (a `DynamoDbStore` on a test table, say).
    pub fn with_store<H, Fut, R, E>(store: S, config: IdempotencyConfig, handler: H) -> Self
    where
        H: Fn(Value) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let service = service_fn(move |event: LambdaEvent<Value>| handler(event.payload));
        Kit::for_service(store, config, service)
    }

    /// A kit running a Lambda handler service over `LambdaEvent<Value>` (what you
    /// pass to [`Idempotency::wrap`], e.g. `service_fn(handler)`) on `store`.
    pub fn for_service<Svc, R>(store: S, config: IdempotencyConfig, service: Svc) -> Self
    where
        Svc: Service<LambdaEvent<Value>, Response = R> + Clone + Send + Sync + 'static,
        Svc::Future: Send + 'static,
        Svc::Error: fmt::Display + Send + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let probe = Arc::new(Probe::default());
        let store = CrashStore {
            inner: store,
            probe: Arc::clone(&probe),
        };
        let counted = {
            let probe = Arc::clone(&probe);
            service_fn(move |event: LambdaEvent<Value>| {
                let (probe, service) = (Arc::clone(&probe), service.clone());
                async move {
                    probe.enter_handler().await;
                    service.oneshot(event).await
                }
            })
        };
        let invoke: Invoke<S> = Arc::new(move |idempotency, name, event| {
            let wrapped = idempotency.wrap_as(name, counted.clone());
            Box::pin(async move {
                match wrapped.oneshot(LambdaEvent::new(event, context())).await {
                    Ok(response) => match serde_json::to_string(&response) {
                        Ok(text) => Answer::Response(text),
                        Err(err) => {
                            Answer::Failed(format!("the response does not serialize: {err}"))
                        }
                    },
                    Err(Error::Idempotency(err @ IdempotencyError::AlreadyInProgress { .. })) => {
                        Answer::InProgress(err.to_string())
                    }
                    Err(err) => Answer::Failed(err.to_string()),
                }
            })
        });
        Self {
            idempotency: Idempotency::new(store, config),
            probe,
            invoke,
            receiver: None,
            #[cfg(feature = "outbox")]
            dispatcher: None,
            token: unique_token(),
            scenarios: AtomicU64::new(0),
        }
    }

    /// The receiver the handler sends its external calls to: the reports count
    /// its calls per effect. Without one, reports list no effects.
    pub fn with_receiver(mut self, receiver: Receiver) -> Self {
        self.receiver = Some(receiver);
        self
    }

    /// Delivers the handler's outbox messages with `dispatcher` after each commit
    /// (as `Idempotency::with_dispatcher`), and at the end of each scenario
    /// delivers those a crash left pending (as the relay would). Register
    /// [`Receiver::sink`]s on it to count deliveries as effects.
    #[cfg(feature = "outbox")]
    #[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
    pub fn with_dispatcher(mut self, dispatcher: crate::Dispatcher) -> Self {
        self.idempotency = self.idempotency.clone().with_dispatcher(dispatcher.clone());
        self.dispatcher = Some(dispatcher);
        self
    }

    /// The same event twice, one call after the other: the second must replay the
    /// first response byte for byte without running the handler.
    pub async fn run_twice(&self, event: Value) -> RunReport {
        let name = self.scenario();
        self.probe.begin(None, None);
        let mark = self.log_len();
        let first = self.call(&name, &event).await;
        let expected = self.tally(mark);
        let second = self.call(&name, &event).await;
        self.report(vec![first, second], &expected, mark)
    }

    /// `n` duplicates of the event at once. Exactly one may run the handler; the
    /// others replay its response or are refused as in progress. The handler's
    /// run is held until every duplicate has reached the store (for two seconds
    /// at most), so they really overlap. The effects are compared with those of
    /// one solo run of the event first (under its own key prefix).
    pub async fn run_concurrently(&self, event: Value, n: usize) -> RunReport {
        let (_, expected, _) = self.clean_run(&event).await;
        let name = self.scenario();
        self.probe.begin(None, Some(n));
        let mark = self.log_len();
        let calls = (0..n).map(|_| self.call(&name, &event));
        let answers = futures_util::future::join_all(calls).await;
        self.report(answers, &expected, mark)
    }

    /// A clean run, then a crash at every phase boundary followed by retries
    /// until one succeeds; see the [module documentation](self).
    pub async fn crash_matrix(&self, event: Value) -> CrashReport {
        let (clean, expected, steps) = self.clean_run(&event).await;
        let mut report = CrashReport {
            clean: clean.clone().into_result(),
            steps: steps.clone(),
            phases: Vec::new(),
        };
        if !matches!(clean, Answer::Response(_)) {
            return report;
        }
        let mut phases = vec![Phase::AfterReserve];
        for (index, name) in steps.iter().enumerate() {
            phases.push(Phase::StepNotJournaled {
                step: index + 1,
                name: name.clone(),
            });
            phases.push(Phase::AfterStep {
                step: index + 1,
                name: name.clone(),
            });
        }
        phases.extend([Phase::BeforeComplete, Phase::AfterComplete]);
        for phase in phases {
            let row = self.crash_at(phase, &event, &expected).await;
            report.phases.push(row);
        }
        report
    }

    /// One run without faults: its answer, effects and journaled steps.
    async fn clean_run(&self, event: &Value) -> (Answer, Tally, Vec<String>) {
        let name = self.scenario();
        self.probe.begin(None, None);
        let mark = self.log_len();
        let answer = self.call(&name, event).await;
        self.deliver_left_over().await;
        let steps = self.probe.state().steps.clone();
        (answer, self.tally(mark), steps)
    }

    async fn crash_at(&self, phase: Phase, event: &Value, expected: &Tally) -> PhaseReport {
        let name = self.scenario();
        let key = match self.idempotency.key_for(Some(&name), event) {
            Ok(Some(key)) => key,
            Ok(None) => String::new(),
            Err(err) => {
                return PhaseReport::failed(phase, format!("no key for the event: {err}"));
            }
        };
        self.probe.begin(Some(phase.cut()), None);
        let mark = self.log_len();
        let first = tokio::select! {
            answer = self.call(&name, event) => Some(answer),
            _ = self.probe.crashed.notified() => None,
        };
        let reached = first.is_none();
        let mut attempts = 1;
        let mut last = first;
        while !matches!(last, Some(Answer::Response(_))) && attempts < MAX_ATTEMPTS {
            self.abandon(&key).await;
            attempts += 1;
            last = Some(self.call(&name, event).await);
        }
        let (converged, response) = match last {
            Some(Answer::Response(text)) => {
                let duplicate = self.call(&name, event).await;
                let same = duplicate == Answer::Response(text.clone());
                let response = match same {
                    true => Ok(text),
                    false => Err(format!(
                        "a duplicate after the retry got {duplicate:?}, not the committed {text}"
                    )),
                };
                (same, response)
            }
            Some(other) => (false, other.into_result()),
            None => (false, Err("every attempt crashed".into())),
        };
        self.deliver_left_over().await;
        let state = self.probe.state();
        PhaseReport {
            phase,
            reached,
            converged,
            response,
            attempts,
            executions: state.executions,
            effects: counts(&self.tally(mark), expected),
            store_requests: state.requests,
        }
    }

    /// Makes the crashed attempt's reservation pass its deadline, without waiting:
    /// its record rewritten with the in-progress expiry just past, conditional on
    /// that attempt's own owner token.
    async fn abandon(&self, key: &str) {
        let store = &self.idempotency.store().inner;
        self.probe.state().requests += 1;
        let Ok(Some(mut record)) = store.get(key).await else {
            return;
        };
        let now = now_ms();
        if record.status != Status::InProgress || record.is_abandoned(now) {
            return;
        }
        record.in_progress_expiration = Some(now - 1);
        self.probe.state().requests += 1;
        if let Err(err) = store.complete(&record).await {
            tracing::warn!(error = %err, "testing kit: could not mark the crashed attempt abandoned");
        }
    }

    /// Delivers the committed outbox messages of this scenario that are still
    /// pending, as the relay would after a crash.
    async fn deliver_left_over(&self) {
        #[cfg(feature = "outbox")]
        {
            let (Some(dispatcher), Some(outbox)) =
                (&self.dispatcher, self.idempotency.store().inner.outbox())
            else {
                return;
            };
            let committed = std::mem::take(&mut self.probe.state().committed);
            let mut seen = std::collections::BTreeSet::new();
            for record in committed {
                if !seen.insert(record.key.clone()) {
                    continue;
                }
                self.probe.state().requests += 1;
                if let Ok(Some(stored)) = outbox.get_outbox(&record.key).await
                    && !stored.delivered
                {
                    self.probe.state().requests += 1;
                    if let Err(err) =
                        crate::outbox::deliver_and_mark(outbox, dispatcher, &stored).await
                    {
                        tracing::warn!(key = %stored.key, error = %err, "testing kit: could not deliver a pending outbox message");
                    }
                }
            }
        }
    }

    fn scenario(&self) -> String {
        let n = self.scenarios.fetch_add(1, Ordering::Relaxed);
        format!("kit-{}-{n}", self.token)
    }

    async fn call(&self, name: &str, event: &Value) -> Answer {
        (self.invoke)(&self.idempotency, name, event.clone()).await
    }

    fn log_len(&self) -> usize {
        self.receiver.as_ref().map_or(0, Receiver::len)
    }

    fn tally(&self, from: usize) -> Tally {
        self.receiver
            .as_ref()
            .map(|r| receiver::tally(&r.since(from)))
            .unwrap_or_default()
    }

    fn report(&self, answers: Vec<Answer>, expected: &Tally, mark: usize) -> RunReport {
        let state = self.probe.state();
        RunReport {
            in_progress: answers
                .iter()
                .filter(|a| matches!(a, Answer::InProgress(_)))
                .count(),
            responses: answers.into_iter().map(Answer::into_result).collect(),
            executions: state.executions,
            effects: counts(&self.tally(mark), expected),
            store_requests: state.requests,
        }
    }
}

/// Per effect: (distinct keys, requests).
type Tally = BTreeMap<String, (usize, usize)>;

fn counts(tally: &Tally, expected: &Tally) -> Vec<EffectCount> {
    let mut names: Vec<&String> = tally.keys().chain(expected.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let (distinct_keys, requests) = tally.get(name).copied().unwrap_or_default();
            EffectCount {
                effect: name.clone(),
                distinct_keys,
                requests,
                expected: expected.get(name).map_or(0, |(keys, _)| *keys),
            }
        })
        .collect()
}

/// What [`Kit::run_twice`] and [`Kit::run_concurrently`] saw.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunReport {
    /// Each call's response as JSON text (`Ok`), or its error's text, in the
    /// order the calls were made.
    pub responses: Vec<Result<String, String>>,
    /// How many calls were refused because another held the key (`AlreadyInProgress`).
    pub in_progress: usize,
    /// How many times the handler ran.
    pub executions: usize,
    /// The receiver's calls per effect, compared with one clean run's.
    pub effects: Vec<EffectCount>,
    /// Store requests the calls made (on DynamoDB, one request each); for
    /// [`Kit::run_concurrently`], not those of its solo run.
    pub store_requests: usize,
}

impl RunReport {
    /// Whether every call that returned a response returned the same bytes, and
    /// at least one did.
    pub fn same_response(&self) -> bool {
        let mut ok = self.responses.iter().filter_map(|r| r.as_ref().ok());
        match ok.next() {
            Some(first) => ok.all(|other| other == first),
            None => false,
        }
    }

    /// Responses that were replays (every response but the one the execution returned).
    pub fn replayed(&self) -> usize {
        let ok = self.responses.iter().filter(|r| r.is_ok()).count();
        ok.saturating_sub(self.executions.min(ok))
    }

    /// The effects that happened more often than in a clean run.
    pub fn repeated_effects(&self) -> Vec<&str> {
        repeated(&self.effects)
    }

    /// What keeps the calls from being idempotent, in words; empty when the
    /// handler ran exactly once, every call returned the same response byte for
    /// byte or was refused as in progress, and no effect was repeated.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.executions != 1 {
            problems.push(format!(
                "the handler ran {} times, not once",
                self.executions
            ));
        }
        if !self.same_response() {
            problems.push("the calls did not all return the same response".to_owned());
        }
        let failed = self.responses.iter().filter(|r| r.is_err()).count();
        if failed > self.in_progress {
            problems.push(format!(
                "{} calls failed other than in progress",
                failed - self.in_progress
            ));
        }
        for effect in self.repeated_effects() {
            problems.push(format!("effect {effect:?} happened more than once"));
        }
        problems
    }

    /// Panics, with the [`problems`](Self::problems) and the report, unless there are none.
    #[track_caller]
    pub fn assert_idempotent(&self) {
        let problems = self.problems();
        if !problems.is_empty() {
            panic!("not idempotent: {}\n{self}", problems.join("; "));
        }
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} calls: {} executions, {} replayed, {} in progress, store requests {}",
            self.responses.len(),
            self.executions,
            self.replayed(),
            self.in_progress,
            self.store_requests
        )?;
        for (n, response) in self.responses.iter().enumerate() {
            match response {
                Ok(text) => writeln!(f, "  call {}: {text}", n + 1)?,
                Err(err) => writeln!(f, "  call {}: error: {err}", n + 1)?,
            }
        }
        write!(f, "  effects: {}", Effects(&self.effects))
    }
}

/// One effect's calls to the [`Receiver`] in a scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EffectCount {
    /// The effect's name, as given to [`Receiver::call`].
    pub effect: String,
    /// Distinct keys that reached the receiver: how many times the effect really happened.
    pub distinct_keys: usize,
    /// Every call, re-issues with a key already seen included.
    pub requests: usize,
    /// Distinct keys in a clean run of the event: how many times it should happen.
    pub expected: usize,
}

impl EffectCount {
    /// Whether the effect happened more often than in a clean run: a bug.
    pub fn repeated(&self) -> bool {
        self.distinct_keys > self.expected
    }

    /// Calls the receiver deduped (re-issued with a key it had seen): harmless.
    pub fn deduplicated(&self) -> usize {
        self.requests.saturating_sub(self.distinct_keys)
    }
}

fn repeated(effects: &[EffectCount]) -> Vec<&str> {
    effects
        .iter()
        .filter(|e| e.repeated())
        .map(|e| e.effect.as_str())
        .collect()
}

/// Effects as `charge 1 key (1 deduped), email 2 keys (expected 1) REPEATED`.
struct Effects<'a>(&'a [EffectCount]);

impl fmt::Display for Effects<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "-");
        }
        for (n, e) in self.0.iter().enumerate() {
            if n > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{} {}", e.effect, e.distinct_keys)?;
            if e.deduplicated() > 0 {
                write!(f, " (+{} deduped)", e.deduplicated())?;
            }
            if e.repeated() {
                write!(f, " REPEATED (expected {})", e.expected)?;
            }
        }
        Ok(())
    }
}

/// A phase boundary the crash matrix cuts an attempt at.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// The reservation was written; the handler had not started.
    AfterReserve,
    /// Step `step` (1-based, in the order the handler ran them) made its call;
    /// its journal write never reached the store. The retry re-issues the call
    /// with the same derived key.
    StepNotJournaled {
        /// 1-based position.
        step: usize,
        /// The step's name.
        name: String,
    },
    /// Step `step` was journaled. The retry replays it.
    AfterStep {
        /// 1-based position.
        step: usize,
        /// The step's name.
        name: String,
    },
    /// The handler returned; the response (and outbox) never reached the store.
    BeforeComplete,
    /// The response was stored, the invocation's answer lost.
    AfterComplete,
}

impl Phase {
    fn cut(&self) -> Cut {
        let (op, nth, applied) = match self {
            Phase::AfterReserve => (Op::Reserve, 1, true),
            Phase::StepNotJournaled { step, .. } => (Op::PutStep, *step, false),
            Phase::AfterStep { step, .. } => (Op::PutStep, *step, true),
            Phase::BeforeComplete => (Op::Complete, 1, false),
            Phase::AfterComplete => (Op::Complete, 1, true),
        };
        Cut { op, nth, applied }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::AfterReserve => write!(f, "after reserve"),
            Phase::StepNotJournaled { step, name } => {
                write!(f, "step {step} ({name}) ran, not journaled")
            }
            Phase::AfterStep { step, name } => write!(f, "after step {step} ({name})"),
            Phase::BeforeComplete => write!(f, "before complete"),
            Phase::AfterComplete => write!(f, "after complete"),
        }
    }
}

/// What [`Kit::crash_matrix`] saw: the clean run, then one row per phase boundary.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CrashReport {
    /// The clean run's response as JSON text, or its error. When it failed there
    /// are no phases.
    pub clean: Result<String, String>,
    /// The steps the clean run journaled, in order.
    pub steps: Vec<String>,
    /// One row per phase boundary.
    pub phases: Vec<PhaseReport>,
}

impl CrashReport {
    /// Whether the clean run succeeded and every phase's retries converged.
    pub fn converged(&self) -> bool {
        self.clean.is_ok() && self.phases.iter().all(|p| p.converged)
    }

    /// (phase, effect) for every effect that happened more often than in the clean run.
    pub fn repeated_effects(&self) -> Vec<(&Phase, &str)> {
        self.phases
            .iter()
            .flat_map(|p| repeated(&p.effects).into_iter().map(move |e| (&p.phase, e)))
            .collect()
    }

    /// What went wrong, in words, one line per problem: the clean run failed, a
    /// phase did not converge or its crash point was never reached, an effect
    /// was repeated. Empty when the handler survives every crash.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(err) = &self.clean {
            problems.push(format!("the clean run failed: {err}"));
        }
        for p in &self.phases {
            if !p.converged {
                problems.push(format!("crash {}: the retries did not converge", p.phase));
            }
            if !p.reached {
                problems.push(format!(
                    "crash {}: the attempt never reached this point (the handler ran other steps than in the clean run?)",
                    p.phase
                ));
            }
        }
        for (phase, effect) in self.repeated_effects() {
            problems.push(format!("crash {phase}: effect {effect:?} happened twice"));
        }
        problems
    }

    /// Panics, with the [`problems`](Self::problems) and the report, unless there are none.
    #[track_caller]
    pub fn assert_converged(&self) {
        let problems = self.problems();
        if !problems.is_empty() {
            panic!("{}\n{self}", problems.join("\n"));
        }
    }
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.clean {
            Ok(text) => writeln!(f, "clean run: {text}")?,
            Err(err) => writeln!(f, "clean run failed: {err}")?,
        }
        match self.steps.is_empty() {
            true => writeln!(f, "steps: none")?,
            false => writeln!(f, "steps: {}", self.steps.join(", "))?,
        }
        writeln!(
            f,
            "| crash | converged | attempts | executions | effects | store requests | response |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|")?;
        for p in &self.phases {
            let response = match &p.response {
                Ok(text) => text.clone(),
                Err(err) => format!("error: {err}"),
            };
            writeln!(
                f,
                "| {}{} | {} | {} | {} | {} | {} | {} |",
                p.phase,
                if p.reached { "" } else { " (not reached)" },
                if p.converged { "yes" } else { "NO" },
                p.attempts,
                p.executions,
                Effects(&p.effects),
                p.store_requests,
                response
            )?;
        }
        Ok(())
    }
}

/// One row of the crash matrix.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PhaseReport {
    /// Where the first attempt was cut.
    pub phase: Phase,
    /// Whether the first attempt reached the cut (it was dropped there). `false`
    /// when it finished first: the handler took another path than the clean run.
    pub reached: bool,
    /// Whether a retry succeeded and a later duplicate replayed its response byte
    /// for byte.
    pub converged: bool,
    /// The response the retries converged on (JSON text), or the last error.
    pub response: Result<String, String>,
    /// Attempts made, the crashed one included (the duplicate check not counted).
    pub attempts: usize,
    /// How many times the handler ran (entered), across every attempt.
    pub executions: usize,
    /// The receiver's calls per effect, compared with the clean run's.
    pub effects: Vec<EffectCount>,
    /// Store requests of the scenario: the attempts', the duplicate check's, and
    /// the kit's own (marking the crashed attempt abandoned, delivering leftovers).
    pub store_requests: usize,
}

impl PhaseReport {
    fn failed(phase: Phase, error: String) -> Self {
        Self {
            phase,
            reached: false,
            converged: false,
            response: Err(error),
            attempts: 0,
            executions: 0,
            effects: Vec::new(),
            store_requests: 0,
        }
    }
}

/// A context whose deadline is a minute away.
fn context() -> Context {
    let mut context = Context::default();
    context.deadline = u64::try_from(now_ms() + DEADLINE_MS).unwrap_or(u64::MAX);
    context
}

/// Unique per kit: the process id, the clock and the process's hash seed.
fn unique_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    static KITS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(KITS.fetch_add(1, Ordering::Relaxed));
    hasher.write_i64(now_ms());
    hasher.write_u32(std::process::id());
    format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}
