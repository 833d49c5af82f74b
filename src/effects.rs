//! What a running handler does to the outside world: steps with derived keys,
//! journaled so a retry does not redo them, and outbox messages committed with
//! the response.

#[cfg(feature = "atomic-writes")]
use crate::atomic::{StagedWrite, StagedWrites, Writes};
use crate::error::{Error, IdempotencyError};
use crate::key::hash_value;
#[cfg(feature = "outbox")]
use crate::outbox::OutboxMessage;
use crate::outcome::{Event, Meter};
use crate::store::{IdempotencyStore, StepJournal, StepRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

mod saga;
mod step;

pub use step::{Retry, Step};

tokio::task_local! {
    static CURRENT: Effects;
}

/// The effects of the idempotent invocation running on this task: call it from
/// inside a wrapped handler (on the handler's own task, not a spawned one).
///
/// ```
/// use lambda_idempotency::{effects, Idempotency, IdempotencyConfig, MemoryStore};
/// use serde_json::{json, Value};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
/// let place_order = idempotency.function("place_order", |order: Value| async move {
///     let effects = effects()?;
///     // The key is the same on every retry of this order: send it to the payment API.
///     let charge = effects
///         .step("charge", |key| async move { Ok::<_, std::io::Error>(json!({ "charge": key })) })
///         .await?;
///     Ok::<_, lambda_idempotency::Error<std::io::Error>>(json!({ "order": order["id"], "charge": charge }))
/// });
/// let first = place_order.call(json!({ "id": 7 }), None).await?;
/// assert_eq!(first, place_order.call(json!({ "id": 7 }), None).await?);
/// # Ok(()) }
/// ```
pub fn effects() -> Result<Effects, IdempotencyError> {
    CURRENT
        .try_with(Effects::clone)
        .map_err(|_| IdempotencyError::NoEffects)
}

/// Steps and outbox of one invocation; see [`effects`].
///
/// When the invocation is protected, steps are journaled under its execution and
/// its outbox is committed with the response. When it runs unprotected
/// (idempotency disabled, or no key material in lenient mode), steps run
/// directly with keys unique to the invocation, and the outbox is delivered after
/// the handler succeeds, if a dispatcher is set.
#[derive(Clone)]
pub struct Effects {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Effects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Effects")
            .field("scope", &self.inner.scope)
            .field("journaled", &self.inner.store.is_some())
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// The invocation's idempotency key; `None` when unprotected.
    key: Option<String>,
    /// What derived keys, journal entries and outbox records hang off:
    /// `{key}#{execution}`, or `unprotected#{invocation id}`.
    scope: String,
    /// The store whose journal keeps the steps; `None` when unprotected.
    store: Option<Arc<dyn JournalSource>>,
    /// Only a resumed execution can find journaled steps; a new one skips the reads.
    resumed: bool,
    expiration: i64,
    /// Until when (epoch milliseconds) the invocation may run: a step's retries
    /// stop before it. `None` when unprotected.
    deadline_ms: Option<i64>,
    /// The handler's counters (steps replayed and re-issued).
    meter: Meter,
    /// The compensations of the completed steps, and an explicit abort.
    saga: Mutex<saga::Saga>,
    /// The DynamoDB writes staged for the commit.
    #[cfg(feature = "atomic-writes")]
    writes: StagedWrites,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    position: usize,
    occurrences: HashMap<String, usize>,
    /// Whether a step's closure was called: its effect may have happened, so the
    /// execution must be resumable (its record kept) even if nothing was journaled.
    attempted: bool,
    /// Whether a resumed execution has met a step missing from its journal.
    missed: bool,
    /// The first mismatch between the handler's steps and the journal: sticky,
    /// so that the invocation ends with it whatever the handler does.
    diverged: Option<Divergence>,
    #[cfg(feature = "outbox")]
    staged: Vec<(String, OutboxMessage)>,
}

/// A step that did not match the journal at its position.
struct Divergence {
    position: usize,
    journaled: String,
    called: String,
    detail: String,
}

impl Divergence {
    fn error(&self, key: Option<&str>) -> IdempotencyError {
        IdempotencyError::NonDeterministic {
            key: key.unwrap_or_default().to_owned(),
            position: self.position,
            journaled: self.journaled.clone(),
            called: self.called.clone(),
            detail: self.detail.clone(),
        }
    }
}

impl Effects {
    /// The effects of a protected invocation: attempt of execution `execution`
    /// of `key`, `resumed` when an earlier attempt of that execution ran.
    pub(crate) fn journaled(
        store: Arc<dyn JournalSource>,
        key: &str,
        execution: &str,
        resumed: bool,
        expiration: i64,
        deadline_ms: i64,
        meter: Meter,
    ) -> Self {
        Self::with(Inner {
            key: Some(key.to_owned()),
            scope: format!("{key}#{execution}"),
            store: Some(store),
            resumed,
            expiration,
            deadline_ms: Some(deadline_ms),
            meter,
            saga: Mutex::default(),
            #[cfg(feature = "atomic-writes")]
            writes: StagedWrites::default(),
            state: Mutex::default(),
        })
    }

    /// The effects of an unprotected invocation, identified by `invocation` (the
    /// Lambda request id, or a random token).
    pub(crate) fn unprotected(invocation: &str) -> Self {
        Self::with(Inner {
            key: None,
            scope: format!("unprotected#{invocation}"),
            store: None,
            resumed: false,
            expiration: 0,
            deadline_ms: None,
            meter: Meter::default(),
            saga: Mutex::default(),
            #[cfg(feature = "atomic-writes")]
            writes: StagedWrites::default(),
            state: Mutex::default(),
        })
    }

    fn with(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Runs `future` with these effects reachable through [`effects`].
    pub(crate) async fn scope<F: Future>(&self, future: F) -> F::Output {
        CURRENT.scope(self.clone(), future).await
    }

    /// The invocation's idempotency key; `None` when it runs unprotected.
    ///
    /// ```
    /// # async fn handler() -> Result<(), lambda_idempotency::IdempotencyError> {
    /// let fx = lambda_idempotency::effects()?;
    /// tracing::info!(key = fx.idempotency_key(), "shipping");
    /// # Ok(()) }
    /// ```
    pub fn idempotency_key(&self) -> Option<&str> {
        self.inner.key.as_deref()
    }

    /// Whether this attempt is going over ground an earlier attempt of its
    /// execution covered: `true` on a resumed execution (a retry that took over
    /// a crashed, timed-out or failed attempt) until its first step that is not
    /// in the journal, from where on the code runs for the first time; `false`
    /// on a first attempt and when unprotected. Keep the logs and metrics of the
    /// code around your steps behind it, so that a retry does not count them
    /// again.
    ///
    /// ```
    /// # async fn handler() -> Result<(), lambda_idempotency::Error<std::io::Error>> {
    /// let fx = lambda_idempotency::effects()?;
    /// let receipt: String = fx
    ///     .step("charge", |key| async move { Ok::<_, std::io::Error>(key) })
    ///     .await?;
    /// if !fx.is_replaying() {
    ///     tracing::info!(%receipt, "order charged"); // once per execution
    /// }
    /// # Ok(()) }
    /// ```
    pub fn is_replaying(&self) -> bool {
        self.inner.resumed && !self.state().missed
    }

    /// A step: `f` runs once per execution at this point of the handler, passed
    /// a key derived from the execution, the step's name and how many steps of
    /// that name came before: the same on every retry of the execution. Send it
    /// with the call (an `Idempotency-Key` header, a `ClientRequestToken`) so the
    /// receiver dedupes a call re-issued after a crash. Await the [`Step`] for
    /// its result; before that, [`Step::compensate`] declares what undoes it and
    /// [`Step::retry`] retries its call.
    ///
    /// The result is journaled before the handler goes on; a retry gets it back
    /// without calling `f`. A failed step is not journaled. A resumed execution
    /// whose step does not match its journal (another step at a journaled
    /// position, or a journaled result that does not deserialize into `T`) gets
    /// [`IdempotencyError::NonDeterministic`], and the invocation ends with it
    /// whatever the handler does. Unprotected, `f` runs every time, with a key
    /// unique to the invocation. The call's future, its result and its error
    /// must be `Send`, as a Lambda handler's future is under the wrappers.
    ///
    /// ```
    /// # async fn handler() -> Result<(), lambda_idempotency::Error<std::io::Error>> {
    /// let fx = lambda_idempotency::effects()?;
    /// let receipt: String = fx
    ///     .step("charge", |key| async move {
    ///         // e.g. POST /charges with the header `Idempotency-Key: {key}`
    ///         Ok::<_, std::io::Error>(format!("receipt for {key}"))
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn step<T, E, F, Fut>(&self, name: &str, f: F) -> Step<'_, step::Once<F>, T, E>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
    {
        Step::new(self, name, step::Once::new(f))
    }

    /// Runs a step (see [`step`](Self::step)): replays it from the journal, or
    /// calls it (with retries, if given), journals its result and registers
    /// its compensation.
    async fn run_step<A, T, E>(
        &self,
        name: String,
        mut calls: A,
        compensation: Option<step::Register<T>>,
    ) -> Result<T, Error<E>>
    where
        A: step::sealed::Calls<T, E>,
        T: Serialize + DeserializeOwned,
    {
        let name = name.as_str();
        let (position, occurrence, derived) = {
            let mut state = self.state();
            let position = state.position;
            state.position += 1;
            let occurrence = state.occurrences.entry(name.to_owned()).or_default();
            let taken = *occurrence;
            *occurrence += 1;
            (position, taken, derive_key(&self.inner.scope, name, taken))
        };
        let Some(store) = &self.inner.store else {
            return self.call(&mut calls, derived).await;
        };
        let journal = store.journal().ok_or(IdempotencyError::Unsupported {
            missing: "step journal",
        })?;
        let journal_key = format!("{}#step#{position}", self.inner.scope);

        if self.inner.resumed {
            let journaled = journal
                .get_step(&journal_key)
                .await
                .map_err(IdempotencyError::from)?;
            if let Some(step) = journaled {
                self.inner.meter.event(Event::StepReplayed, 1);
                tracing::debug!(step = name, position, "replaying a journaled step");
                let result = self.replay_step(step, name, position)?;
                self.register(compensation, &result, position, name, occurrence);
                return Ok(result);
            }
            // The first step missing from the journal is the one an earlier attempt
            // may have been calling when it failed: re-issued, same derived key.
            if !std::mem::replace(&mut self.state().missed, true) {
                self.inner.meter.event(Event::StepReissued, 1);
            }
        }

        self.state().attempted = true;
        let result = self.call(&mut calls, derived).await?;
        let data =
            serde_json::to_string(&result).map_err(|source| IdempotencyError::Serialization {
                key: journal_key.clone(),
                source,
            })?;
        let step = StepRecord {
            key: journal_key,
            name: name.to_owned(),
            data,
            expiration: self.inner.expiration,
        };
        let result = match journal
            .put_step(&step)
            .await
            .map_err(IdempotencyError::from)?
        {
            None => result,
            // A late attempt of this execution journaled first: go on with its result,
            // so the response and the journal agree.
            Some(first) => {
                tracing::warn!(
                    step = name,
                    position,
                    "step journaled first by another attempt; using its result"
                );
                self.replay_step(first, name, position)?
            }
        };
        self.register(compensation, &result, position, name, occurrence);
        Ok(result)
    }

    /// Calls a step's closure, again after a failure as its retry policy says,
    /// never waiting past the invocation's deadline less a second.
    async fn call<A, T, E>(&self, calls: &mut A, derived: String) -> Result<T, Error<E>>
    where
        A: step::sealed::Calls<T, E>,
    {
        let mut attempt = 1;
        loop {
            let Some(call) = calls.call(derived.clone()) else {
                return Err(IdempotencyError::NoEffects.into());
            };
            let error = match call.await {
                Ok(result) => return Ok(result),
                Err(error) => error,
            };
            match calls.after(attempt, &error) {
                step::sealed::AfterFailure::Wait(delay) if self.may_wait(delay) => {
                    tracing::info!(
                        attempt,
                        delay_ms = delay.as_millis() as u64,
                        "step failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                step::sealed::AfterFailure::GiveUp(Some(permanent)) => {
                    tracing::warn!(attempt, error = %permanent, "step failed permanently");
                    self.abort(permanent);
                    return Err(Error::Handler(error));
                }
                _ => return Err(Error::Handler(error)),
            }
        }
    }

    /// Whether a retry after `delay` still starts a second before the deadline.
    fn may_wait(&self, delay: std::time::Duration) -> bool {
        const MARGIN_MS: i64 = 1_000;
        let Some(deadline) = self.inner.deadline_ms else {
            return true;
        };
        let delay = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4);
        crate::idempotency::now_ms() + delay + MARGIN_MS < deadline
    }

    fn replay_step<T: DeserializeOwned, E>(
        &self,
        step: StepRecord,
        name: &str,
        position: usize,
    ) -> Result<T, Error<E>> {
        if step.name != name {
            let detail = format!("the handler now calls {name:?}");
            return Err(self.diverge(position, step.name, name, detail).into());
        }
        serde_json::from_str(&step.data).map_err(|source| {
            // JSON of another shape is the code having changed, not the record.
            match serde_json::from_str::<serde::de::IgnoredAny>(&step.data) {
                Ok(_) => {
                    let detail =
                        format!("the handler now asks it for another result type ({source})");
                    self.diverge(position, step.name, name, detail)
                }
                Err(_) => IdempotencyError::MalformedRecord {
                    key: step.key,
                    attribute: "data".into(),
                    problem: "does not hold the step's result as JSON".into(),
                },
            }
            .into()
        })
    }

    /// Notes a mismatch with the journal (the first one sticks) and returns it.
    fn diverge(
        &self,
        position: usize,
        journaled: String,
        called: &str,
        detail: String,
    ) -> IdempotencyError {
        let divergence = Divergence {
            position,
            journaled,
            called: called.to_owned(),
            detail,
        };
        let error = divergence.error(self.inner.key.as_deref());
        self.state().diverged.get_or_insert(divergence);
        error
    }

    /// The mismatch with the journal this execution met, if any: the engine ends
    /// the invocation with it whatever the handler returned.
    pub(crate) fn divergence(&self) -> Option<IdempotencyError> {
        let state = self.state();
        let divergence = state.diverged.as_ref()?;
        Some(divergence.error(self.inner.key.as_deref()))
    }

    /// The invocation's outbox: messages delivered after the response is committed.
    ///
    /// ```
    /// use lambda_idempotency::{effects, Idempotency, IdempotencyConfig, MemoryStore, OutboxMessage};
    /// use serde_json::{json, Value};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    /// let place_order = idempotency.function("place_order", |order: Value| async move {
    ///     // Staged, not sent: if the handler fails after this, nobody hears of the order.
    ///     effects()?.outbox().push(OutboxMessage::Custom {
    ///         sink: "events".into(),
    ///         payload: json!({ "event": "OrderPlaced", "order": order["id"] }),
    ///     });
    ///     Ok::<_, lambda_idempotency::Error<std::io::Error>>(json!({ "placed": order["id"] }))
    /// });
    /// place_order.call(json!({ "id": 7 }), None).await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "outbox")]
    #[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
    pub fn outbox(&self) -> Outbox<'_> {
        Outbox { effects: self }
    }

    /// The invocation's DynamoDB writes, committed in the same transaction as its
    /// completed record and its outbox: all of them once, or none.
    ///
    /// ```no_run
    /// use aws_sdk_dynamodb::types::{AttributeValue, Put, Update};
    /// use lambda_idempotency::{effects, Idempotency, IdempotencyConfig, DynamoDbStore};
    /// use serde_json::{json, Value};
    ///
    /// # async fn f(client: aws_sdk_dynamodb::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let store = DynamoDbStore::new(client, "idempotency");
    /// let idempotency = Idempotency::new(store, IdempotencyConfig::default());
    /// let place = idempotency.function("place_order", |order: Value| async move {
    ///     let effects = effects()?;
    ///     let writes = effects.writes();
    ///     let id = AttributeValue::S(order["id"].as_str().unwrap_or_default().into());
    ///     writes.put(Put::builder().table_name("orders").item("id", id).build()?);
    ///     writes.update(
    ///         Update::builder()
    ///             .table_name("stock")
    ///             .key("sku", AttributeValue::S("s-1".into()))
    ///             .update_expression("ADD available :minus_one")
    ///             .condition_expression("available >= :one")
    ///             .expression_attribute_values(":minus_one", AttributeValue::N("-1".into()))
    ///             .expression_attribute_values(":one", AttributeValue::N("1".into()))
    ///             .build()?,
    ///     );
    ///     // Nothing is written yet: the writes commit with the response.
    ///     Ok::<_, lambda_runtime::Error>(json!({ "placed": order["id"] }))
    /// });
    /// place.call(json!({ "id": "o-1" }), None).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// A handler that fails drops its staged writes. On a store without
    /// transactions ([`IdempotencyStore::transactions`]) staged writes fail the
    /// call with [`IdempotencyError::Unsupported`], nothing is written and the key
    /// is released. In an unprotected call (idempotency disabled, or no key
    /// material in lenient mode) they are committed alone, in one transaction,
    /// after the handler succeeds: on every call, like the handler.
    #[cfg(feature = "atomic-writes")]
    #[cfg_attr(docsrs, doc(cfg(feature = "atomic-writes")))]
    pub fn writes(&self) -> Writes<'_> {
        self.inner.writes.writes()
    }

    /// The staged writes, emptying them.
    #[cfg(feature = "atomic-writes")]
    pub(crate) fn take_writes(&self) -> Vec<StagedWrite> {
        self.inner.writes.take()
    }

    /// Whether a step's closure was called in this attempt.
    pub(crate) fn attempted_any(&self) -> bool {
        self.state().attempted
    }

    /// The staged messages as outbox records of this execution, emptying the outbox.
    #[cfg(feature = "outbox")]
    pub(crate) fn take_staged(&self) -> Vec<(String, String, OutboxMessage)> {
        std::mem::take(&mut self.state().staged)
            .into_iter()
            .enumerate()
            .map(|(index, (derived, message))| {
                (
                    format!("{}#outbox#{index}", self.inner.scope),
                    derived,
                    message,
                )
            })
            .collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Stages messages for delivery after commit; see [`Effects::outbox`].
#[cfg(feature = "outbox")]
pub struct Outbox<'a> {
    effects: &'a Effects,
}

#[cfg(feature = "outbox")]
impl std::fmt::Debug for Outbox<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("scope", &self.effects.inner.scope)
            .field("staged", &self.effects.state().staged.len())
            .finish()
    }
}

#[cfg(feature = "outbox")]
impl Outbox<'_> {
    /// Stages `message`. It is written with the completed record, in one
    /// transaction, and delivered after that with its derived key (returned here),
    /// at least once. Messages staged by a handler that fails are dropped.
    ///
    /// ```
    /// use lambda_idempotency::{effects, OutboxMessage};
    /// use serde_json::json;
    ///
    /// # async fn handler() -> Result<(), lambda_idempotency::IdempotencyError> {
    /// let key = effects()?.outbox().push(OutboxMessage::Http {
    ///     url: "https://partner.example/webhooks/orders".into(),
    ///     body: json!({ "event": "OrderPlaced", "order": 7 }).to_string(),
    ///     headers: vec![("x-tenant".into(), "acme".into())],
    /// });
    /// // The partner sees `key` as the webhook's Idempotency-Key: log it to match their logs.
    /// tracing::info!(%key, "webhook staged");
    /// # Ok(()) }
    /// ```
    pub fn push(&self, mut message: OutboxMessage) -> String {
        // One FIFO group per invocation keeps its messages in order.
        if let OutboxMessage::Sqs {
            group_id: group @ None,
            ..
        } = &mut message
        {
            *group = Some(hash_value(&json!(self.effects.inner.scope)));
        }
        let mut state = self.effects.state();
        let key = derive_key(&self.effects.inner.scope, "outbox", state.staged.len());
        state.staged.push((key.clone(), message));
        key
    }
}

/// SHA-256 over (execution scope, name, occurrence), hex: 64 characters of
/// `[0-9a-f]`, valid as an `Idempotency-Key` header and as the `ClientRequestToken`
/// of AWS APIs (at most 64 characters).
fn derive_key(scope: &str, name: &str, occurrence: usize) -> String {
    hash_value(&json!([scope, name, occurrence]))
}

/// The `Idempotency-Key` header: send a derived key in it with any HTTP client
/// (a derived key is always a valid header value).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A derived key as the `ClientRequestToken` of AWS APIs that take one (at most
/// 64 characters of `[a-zA-Z0-9-]`; a derived key always fits).
///
/// ```no_run
/// use lambda_idempotency::{client_request_token, effects};
///
/// # async fn handler(dynamodb: aws_sdk_dynamodb::Client) -> Result<(), lambda_runtime::Error> {
/// effects()?
///     .step("transfer", |key| async move {
///         // DynamoDB ignores a resent transaction with the same token: no second transfer.
///         dynamodb
///             .transact_write_items()
///             .client_request_token(client_request_token(&key))
///             .send()
///             .await?;
///         Ok::<_, aws_sdk_dynamodb::Error>(())
///     })
///     .await?;
/// # Ok(()) }
/// ```
pub fn client_request_token(derived_key: &str) -> String {
    derived_key
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect()
}

/// A store as `dyn`, for its journal: [`Effects`] is one type whatever the store.
pub(crate) trait JournalSource: Send + Sync {
    fn journal(&self) -> Option<&dyn StepJournal>;
}

impl<S: IdempotencyStore> JournalSource for S {
    fn journal(&self) -> Option<&dyn StepJournal> {
        IdempotencyStore::journal(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_stable_distinct_and_fit_a_client_request_token() {
        let a = derive_key("fn#abc", "charge", 0);
        assert_eq!(a, derive_key("fn#abc", "charge", 0));
        assert_ne!(a, derive_key("fn#abc", "charge", 1));
        assert_ne!(a, derive_key("fn#abc", "refund", 0));
        assert_ne!(a, derive_key("fn#abd", "charge", 0));
        assert_eq!(a.len(), 64);
        assert_eq!(client_request_token(&a), a);
        assert_eq!(client_request_token("a_b!c"), "abc");
        assert!(
            a.bytes().all(|b| b.is_ascii_hexdigit()),
            "a valid header value"
        );
    }
}
