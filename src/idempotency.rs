//! One idempotent invocation, top to bottom: derive the key, check the local cache,
//! reserve, run the handler, complete or release.

use crate::config::{IdempotencyConfig, KeyHash, KeySource};
use crate::effects::Effects;
use crate::error::{Error, IdempotencyError, PermanentError};
use crate::flight::{Boarded, Flights, Landing, Pilot};
use crate::key::{hex, rounded_integer, share_parses, JsonPath};
#[cfg(feature = "outbox")]
use crate::outbox::{self, deliver_and_mark, Dispatcher, Relay};
use crate::outcome::{Event, Meter, Outcome};
use crate::record::{IdempotencyRecord, Status, MAX_ITEM_BYTES};
use crate::store::{IdempotencyStore, StoreError};
use crate::ConfigError;
use lru::LruCache;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{field, Instrument};

// Only the SQS and stream adapters begin and finish batches.
#[cfg_attr(not(any(feature = "sqs", feature = "streams")), allow(dead_code))]
mod batch;
mod gate;
pub(crate) use batch::Batch;
pub use gate::{Claim, Gate, Ticket};

/// The idempotency layer: a store and a config, shared by every handler it wraps.
///
/// Cloning is cheap and clones share the store client and the local cache, so one
/// `Idempotency` can serve concurrent invocations (`lambda_runtime::run_concurrent`).
///
/// ```
/// use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
/// use lambda_runtime::{service_fn, Error, LambdaEvent};
/// use serde_json::{json, Value};
///
/// async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
///     Ok(json!({ "charged": event.payload["order_id"] }))
/// }
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = IdempotencyConfig::builder().key_expression("order_id").build()?;
/// let idempotency = Idempotency::new(MemoryStore::new(), config);
/// let service = idempotency.wrap(service_fn(handler))?;
/// // In a Lambda binary: lambda_runtime::run(service).await
/// # let _ = service;
/// # Ok(()) }
/// ```
pub struct Idempotency<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Idempotency<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S> std::fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner<S> {
    /// Shared with the invocations' [`Effects`] (for the journal) and with relays.
    store: Arc<S>,
    config: IdempotencyConfig,
    /// Completed records, shared: a cached replay copies no record.
    cache: Option<Mutex<LruCache<String, Arc<Cached>>>>,
    function_name: String,
    #[cfg(feature = "outbox")]
    dispatcher: OnceLock<Dispatcher>,
    /// Explicit key prefixes taken by wrapped handlers and layers (the default
    /// prefix is claimed process-wide: [`DEFAULT_PREFIX_CLAIMS`]).
    claims: Mutex<HashMap<String, Claimant>>,
    /// Calls in flight that a duplicate may wait for (when waiting is on).
    flights: Flights,
    /// Each handler's counters, by key prefix.
    #[cfg(feature = "metrics")]
    meters: Mutex<HashMap<String, Meter>>,
}

/// The default key prefix's holders, by store location and prefix, for the whole
/// process: every `Idempotency` over the same records without a `key_prefix`
/// shares that prefix, so a claim held by one value only would let another give
/// it to a second handler.
static DEFAULT_PREFIX_CLAIMS: LazyLock<Mutex<HashMap<(String, String), Claimant>>> =
    LazyLock::new(Mutex::default);

/// Takes `prefix` in `claims` for `claimant`; false when another claimant has it.
fn claim<K: Eq + std::hash::Hash>(
    claims: &Mutex<HashMap<K, Claimant>>,
    prefix: K,
    claimant: Claimant,
) -> bool {
    let mut claims = claims
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *claims.entry(prefix).or_insert(claimant) == claimant
}

static DISABLED_LOGGED: AtomicBool = AtomicBool::new(false);
static IMPLAUSIBLE_DEADLINE_LOGGED: AtomicBool = AtomicBool::new(false);

/// A Lambda deadline further ahead than this is not one (Lambda's longest timeout
/// is 15 minutes): it is taken for a mistake, like a deadline in the past.
const MAX_DEADLINE_AHEAD_MS: i64 = 24 * 3600 * 1000;
/// A deadline this recent still counts as now (clock skew, time spent getting here).
const DEADLINE_GRACE_MS: i64 = 1000;
/// A waiting call stops this long before its own Lambda deadline: it still has to
/// answer, or run the handler when the key comes free.
const WAIT_MARGIN_MS: i64 = 1000;
/// A waiter polling the store reads 50 ms after its refused reservation, then
/// twice as long each time, up to once a second: a first call that takes 100 ms
/// costs its waiter 2 or 3 reads and about 50 ms of lag, one that takes 10 s
/// about 14 reads and at most a second of lag.
const FIRST_POLL_MS: i64 = 50;
const MAX_POLL_MS: i64 = 1000;

/// Who holds a key prefix: a wrapped handler type, or one layer (whose services'
/// types are not known when it is made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claimant {
    Handler(TypeId),
    Layer(u64),
}

/// What an invocation brings besides its event: its key prefix and deadline.
pub(crate) struct Call<'a> {
    /// The key prefix (see [`Idempotency::scope_for`]).
    pub(crate) scope: &'a str,
    /// The Lambda deadline in epoch milliseconds, when there is a `Context`.
    pub(crate) deadline_ms: Option<i64>,
    /// Where the key comes from.
    pub(crate) key: CallKey<'a>,
    /// How long to wait for a first call that holds the key; `None`: refuse.
    pub(crate) wait: Option<Duration>,
    /// The batch this call's record belongs to: a record of the batch with the
    /// same key waits for (or replays) the first one's; the batch may hold the
    /// store's answer to this key's reservation, and take its completion.
    pub(crate) batch: Option<&'a Batch>,
}

/// Where an invocation's key material comes from.
pub(crate) enum CallKey<'a> {
    /// The config's key source and payload validation.
    Config,
    /// As `Config`, but an event source's own default replaces "the whole event"
    /// (e.g. an SQS record's `messageId`, which stays the same on redelivery).
    #[cfg_attr(not(any(feature = "sqs", feature = "streams")), allow(dead_code))]
    SourceDefault(&'a JsonPath),
    /// The hashes of the key material and of the validation fields, derived
    /// already (a batch derives its records' keys before they run).
    #[cfg_attr(not(any(feature = "sqs", feature = "streams")), allow(dead_code))]
    Derived {
        material: &'a str,
        validation: Option<&'a str>,
    },
    /// Material and validation fields chosen by the caller (HTTP `Idempotency-Key`).
    #[cfg_attr(not(feature = "apigw"), allow(dead_code))]
    Given {
        material: Value,
        validation: Option<Value>,
    },
}

/// A response, and whether it was replayed rather than computed.
pub(crate) struct Executed<R> {
    pub(crate) response: R,
    #[cfg_attr(not(feature = "apigw"), allow(dead_code))] // read by the HTTP source
    pub(crate) replayed: bool,
}

impl<R> Executed<R> {
    fn ran(response: R) -> Self {
        Self {
            response,
            replayed: false,
        }
    }
}

impl<S: IdempotencyStore> Idempotency<S> {
    /// An idempotency layer over `store`.
    pub fn new(store: S, config: IdempotencyConfig) -> Self {
        if config.disabled && !DISABLED_LOGGED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "idempotency is disabled (IDEMPOTENCY_DISABLED): handlers run on every call"
            );
        }
        let cache = config
            .local_cache
            .map(|capacity| Mutex::new(LruCache::new(capacity)));
        let function_name =
            std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "local".to_owned());
        Self {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                config,
                cache,
                function_name,
                #[cfg(feature = "outbox")]
                dispatcher: OnceLock::new(),
                claims: Mutex::default(),
                flights: Flights::default(),
                #[cfg(feature = "metrics")]
                meters: Mutex::default(),
            }),
        }
    }

    /// Delivers the outbox messages of completed invocations right after commit
    /// with `dispatcher`. Without one, committed messages wait for the
    /// [`Relay`](crate::Relay). Set once, before the first invocation; later calls
    /// keep the first dispatcher.
    ///
    /// ```
    /// # use lambda_idempotency::{store::BoxFuture, BoxError, Sink};
    /// # struct AuditLog;
    /// # impl Sink for AuditLog {
    /// #     fn deliver<'a>(&'a self, _: &'a serde_json::Value, _: &'a str) -> BoxFuture<'a, Result<(), BoxError>> {
    /// #         Box::pin(async { Ok(()) })
    /// #     }
    /// # }
    /// use lambda_idempotency::{Dispatcher, Idempotency, IdempotencyConfig, MemoryStore};
    ///
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default())
    ///     .with_dispatcher(Dispatcher::new().with_sink("audit", AuditLog));
    /// # let _ = idempotency;
    /// ```
    #[cfg(feature = "outbox")]
    #[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
    pub fn with_dispatcher(self, dispatcher: Dispatcher) -> Self {
        if self.inner.dispatcher.set(dispatcher).is_err() {
            tracing::warn!("a dispatcher was already set; keeping the first");
        }
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The config.
    pub fn config(&self) -> &IdempotencyConfig {
        &self.inner.config
    }

    /// A relay delivering this store's pending outbox messages with `dispatcher`.
    ///
    /// ```
    /// # use lambda_idempotency::{store::BoxFuture, BoxError, Sink};
    /// # struct AuditLog;
    /// # impl Sink for AuditLog {
    /// #     fn deliver<'a>(&'a self, _: &'a serde_json::Value, _: &'a str) -> BoxFuture<'a, Result<(), BoxError>> {
    /// #         Box::pin(async { Ok(()) })
    /// #     }
    /// # }
    /// use lambda_idempotency::{Dispatcher, Idempotency, IdempotencyConfig, MemoryStore};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), lambda_idempotency::IdempotencyError> {
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    /// // The handlers' own store: the relay sees exactly what they committed.
    /// let report = idempotency.relay(Dispatcher::new().with_sink("audit", AuditLog)).sweep().await?;
    /// assert_eq!(report.delivered, 0);
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "outbox")]
    #[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
    pub fn relay(&self, dispatcher: Dispatcher) -> Relay<S> {
        Relay::shared(Arc::clone(&self.inner.store), dispatcher)
    }

    /// The key prefix of handlers wrapped without a name: the configured prefix,
    /// or the function's name (`AWS_LAMBDA_FUNCTION_NAME`, `local` outside Lambda).
    /// Never anything derived from the code, which a refactoring or a compiler
    /// upgrade would change.
    pub(crate) fn default_scope(&self) -> &str {
        self.inner
            .config
            .key_prefix
            .as_deref()
            .unwrap_or(&self.inner.function_name)
    }

    /// Takes the default key prefix for `claimant`. Wrapping the same handler type
    /// again is fine (clones, tests); a second, different handler (or a second
    /// layer) would share every key with the first, so it is refused.
    ///
    /// The function's name is claimed for the whole process at the store's
    /// location, whichever `Idempotency` wraps: two values over the same records
    /// share it without anyone saying so. A `key_prefix` given to several values is
    /// shared on purpose, so it is claimed for this value only.
    pub(crate) fn claim_default_scope(&self, claimant: Claimant) -> Result<String, ConfigError> {
        let scope = self.default_scope().to_owned();
        let taken = match self.inner.config.key_prefix {
            Some(_) => claim(&self.inner.claims, scope.clone(), claimant),
            None => claim(
                &DEFAULT_PREFIX_CLAIMS,
                (self.inner.store.location(), scope.clone()),
                claimant,
            ),
        };
        if taken {
            Ok(scope)
        } else {
            Err(ConfigError::SharedKeyPrefix { prefix: scope })
        }
    }

    /// The key prefix for a named function: always includes the name, so two
    /// functions given the same payload get distinct keys.
    pub(crate) fn function_scope(&self, name: &str) -> String {
        format!("{}.{name}", self.default_scope())
    }

    /// The counters of the handler under `scope`, made on its first call (after
    /// the application has installed its metrics recorder).
    pub(crate) fn meter(&self, scope: &str) -> Meter {
        #[cfg(feature = "metrics")]
        if self.inner.config.metrics {
            let mut meters = self
                .inner
                .meters
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(meter) = meters.get(scope) {
                return meter.clone();
            }
            let meter = Meter::new(
                &self.inner.function_name,
                scope,
                self.inner.config.observe_only,
            );
            meters.insert(scope.to_owned(), meter.clone());
            return meter;
        }
        let _ = scope;
        Meter::default()
    }

    /// The record key a handler wrapped by this layer uses for `event`: under
    /// [`wrap`](Self::wrap) or [`layer`](Self::layer) with `handler` `None`, under
    /// [`wrap_as`](Self::wrap_as) or [`function`](Self::function) with its name.
    /// `None` when the event holds no key material. For operators and tests: it
    /// answers "which record decided this event?" without running anything.
    ///
    /// ```
    /// use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
    /// let config = IdempotencyConfig::builder()
    ///     .key_expression("order_id")
    ///     .key_prefix("orders")
    ///     .build()
    ///     .unwrap();
    /// let idempotency = Idempotency::new(MemoryStore::new(), config);
    /// let key = idempotency.key_for(None, &serde_json::json!({"order_id": "o-1"})).unwrap();
    /// assert!(key.unwrap().starts_with("orders#"));
    /// ```
    pub fn key_for(
        &self,
        handler: Option<&str>,
        event: &Value,
    ) -> Result<Option<String>, IdempotencyError> {
        let Some((material_hash, _)) = self.key_material(event, None)? else {
            return Ok(None);
        };
        let scope = match handler {
            Some(name) => self.function_scope(name),
            None => self.default_scope().to_owned(),
        };
        Ok(Some(format!("{scope}#{material_hash}")))
    }

    /// Runs `handler(event)` at most once per key and returns its response, or the
    /// stored response of an earlier run.
    pub(crate) async fn execute<T, R, E, F, Fut>(
        &self,
        call: Call<'_>,
        event: T,
        handler: F,
    ) -> Result<Executed<R>, Error<E>>
    where
        T: Serialize + 'static,
        R: Serialize + DeserializeOwned,
        E: 'static,
        F: FnOnce(T) -> Fut,
        Fut: Future<Output = Result<R, E>>,
    {
        let config = &self.inner.config;
        // Boxed, like the protected path below: an unboxed future here nests the
        // handler's type deep enough to overflow the compiler's layout query
        // depth in the user's `main` (seen with Kinesis batches).
        if config.disabled {
            return Box::pin(self.run_unprotected(event, handler)).await;
        }
        let meter = self.meter(call.scope);
        let observe = config.observe_only;

        // One span per call, from the start: every outcome is named on it.
        let span = tracing::info_span!(
            "idempotency",
            key = field::Empty,
            handler = %call.scope,
            outcome = field::Empty,
            replayed = field::Empty,
            waited_ms = field::Empty
        );
        // Steps 1 and 2 need no await: a replay from the local cache ends here,
        // without allocating the protected path's future.
        let keyed = span.in_scope(|| self.key_and_cache(&call, &event, &meter));
        let (key, validation, now) = match keyed {
            Keyed::Protect {
                key,
                validation,
                now,
            } => (key, validation, now),
            Keyed::Replayed(replayed) => return replayed,
            Keyed::Refused(err) => {
                return Box::pin(self.refuse(&meter, err, event, handler).instrument(span)).await
            }
            Keyed::Unprotected => {
                return Box::pin(self.run_unprotected(event, handler).instrument(span)).await
            }
            Keyed::Observed(outcome) => {
                return Box::pin(
                    self.observed(&meter, outcome, event, handler)
                        .instrument(span),
                )
                .await
            }
        };
        // Boxed: with event types as deep as API Gateway's, the unboxed future
        // overflows the compiler's layout query depth in the user's `main`. The
        // rare paths' futures are boxed apart, so that on the memory store this
        // one stays under the kilobyte past which glibc's malloc consolidates its
        // free lists (the wrapper's benchmarks).
        Box::pin(
            async move {
                // 3. A call of this key already in flight in this execution
                // environment (waiting is on, or another record of the batch): wait
                // for it to land rather than ask the store.
                let mut waiting = Waiting::new(self.waiting_until(&call, now));
                let mut pilots = Pilots::default();
                let holds_until = self.reservation_deadline(call.deadline_ms, now);
                // The store's answer to the batch's reservation of this key, for
                // its first call. Holding the key already, it waits for no call
                // of another invocation here (which would wait for it).
                let prepared = call.batch.and_then(|batch| batch.take(&key));
                let holds_key = prepared.as_ref().is_some_and(|p| p.answer.is_ok());
                if !observe {
                    match self.board(&call, &key, holds_until, holds_key, &mut pilots, &mut waiting).await {
                        Boarding::Fly => {}
                        Boarding::Replay(cached) => {
                            let replayed = self.replay_cached(&cached, validation.as_deref());
                            pilots.land(Landing::Completed(cached));
                            let outcome = waiting.replayed_outcome(&meter, Outcome::ReplayedFromCache);
                            settle(&meter, replay_outcome(&replayed, outcome));
                            return replayed.map(|response| Executed { response, replayed: true });
                        }
                        Boarding::TimedOut => {
                            return self.timed_out(&meter, &waiting, key);
                        }
                    }
                }

                // 4. Reserve. A live record comes back with the refusal (one request).
                // A new execution is named after its first reservation's token.
                let (mut reservation, mut answer) = match prepared {
                    Some(prepared) => (prepared.record, Some(prepared.answer)),
                    None => {
                        let expiration = expiration_s(now, config);
                        (new_reservation(key.clone(), validation.clone(), expiration, holds_until), None)
                    }
                };
                let resumed = loop {
                    match self.reserve(&mut reservation, answer.take(), &meter).await {
                        Ok(Reserved::Ours { resumed }) => break resumed,
                        Ok(Reserved::Completed(_)) if observe => {
                            return Box::pin(self.observed(&meter, Outcome::ReplayedFromStore, event, handler))
                                .await;
                        }
                        Ok(Reserved::Completed(existing)) => {
                            let replayed = self.replay(&existing, validation.as_deref());
                            if matches!(replayed, Ok(_) | Err(Error::Replayed(_))) {
                                self.keep(existing, pilots);
                            }
                            let outcome = waiting.replayed_outcome(&meter, Outcome::ReplayedFromStore);
                            settle(&meter, replay_outcome(&replayed, outcome));
                            return replayed.map(|response| Executed {
                                response,
                                replayed: true,
                            });
                        }
                        // 4b. Held by a call elsewhere: wait for it, polling the store.
                        Err(IdempotencyError::AlreadyInProgress { .. }) if !observe && call.wait.is_some() => {
                            match self.wait_in_store(&key, validation.as_deref(), &mut waiting).await {
                                // Gone, expired or abandoned: reserve again, as a
                                // new execution unless an abandoned one is found.
                                Ok(None) => {
                                    reservation.execution.clone_from(&reservation.owner);
                                    reservation.expiration = expiration_s(now_ms(), config);
                                    continue;
                                }
                                Ok(Some(completed)) => {
                                    let replayed = self.replay(&completed, validation.as_deref());
                                    if matches!(replayed, Ok(_) | Err(Error::Replayed(_))) {
                                        self.keep(completed, pilots);
                                    }
                                    let outcome = waiting.replayed_outcome(&meter, Outcome::ReplayedFromStore);
                                    settle(&meter, replay_outcome(&replayed, outcome));
                                    return replayed.map(|response| Executed { response, replayed: true });
                                }
                                Err(IdempotencyError::AlreadyInProgress { key }) => {
                                    return self.timed_out(&meter, &waiting, key);
                                }
                                Err(err) => {
                                    waiting.record_if_waited(&meter);
                                    return Box::pin(self.refuse(&meter, err, event, handler)).await;
                                }
                            }
                        }
                        Err(err) => {
                            // Enforcing, a record of a batch waits for another of its
                            // batch whatever the config says.
                            let would_wait = call.wait.is_some() || call.batch.is_some();
                            if observe && would_wait && matches!(err, IdempotencyError::AlreadyInProgress { .. }) {
                                meter.event(Event::WouldWait, 1);
                            }
                            waiting.record_if_waited(&meter);
                            return Box::pin(self.refuse(&meter, err, event, handler)).await;
                        }
                    }
                };
                let executed = waiting.ran_outcome(&meter);

                // 5. Run the handler, then complete or release. Its steps and outbox
                // hang off the execution.
                let effects = Effects::journaled(
                    self.inner.store.clone(),
                    &key,
                    &reservation.execution,
                    resumed,
                    reservation.expiration,
                    reservation.in_progress_expiration.unwrap_or(holds_until),
                    meter.clone(),
                );
                // Called inside the scope: a handler may reach its effects before its first await.
                let result = effects.scope(async move { handler(event).await }).await;
                // Steps that no longer match the journal end the invocation,
                // whatever the handler made of the step's error. The record stays
                // open, with its journal, for code that matches it.
                if let Some(diverged) = effects.divergence() {
                    tracing::error!(error = %diverged, "the execution's steps no longer match its journal; not completed");
                    self.release(&reservation, &effects, resumed).await;
                    settle(&meter, Outcome::of(&diverged));
                    return Err(diverged.into());
                }
                match result {
                    Ok(response) => {
                        let stored = match serde_json::to_string(&response) {
                            Ok(data) => {
                                Box::pin(self.complete(reservation, data, false, &effects, resumed, &meter, call.batch))
                                    .await
                            }
                            Err(source) => {
                                self.release(&reservation, &effects, resumed).await;
                                Err(IdempotencyError::Serialization { key, source })
                            }
                        };
                        match stored {
                            Ok(completed) => {
                                self.keep(completed, pilots);
                                settle(&meter, executed);
                                Ok(Executed::ran(response))
                            }
                            Err(err) => {
                                settle(&meter, Outcome::of(&err));
                                // Not when staged writes were refused: the response
                                // would claim writes that did not happen.
                                if observe && !err.refused_staged_writes() {
                                    tracing::info!(error = %err, "observe only: the response was not stored; returning it");
                                    return Ok(Executed::ran(response));
                                }
                                Err(err.into())
                            }
                        }
                    }
                    Err(err) => {
                        let permanent = as_permanent(&err).cloned().or_else(|| effects.aborted());
                        // A saga failed permanently: undo its completed steps first.
                        if let Some(failure) = permanent.as_ref().filter(|_| effects.has_compensations()) {
                            let (result, completed) =
                                Box::pin(self.compensate(reservation, failure, err, &effects, resumed, &meter)).await;
                            if let Some(completed) = completed {
                                self.keep(completed, pilots);
                            }
                            return result;
                        }
                        let permanent = permanent.filter(|_| config.replay_permanent_errors);
                        let outcome = match permanent {
                            Some(permanent) => {
                                let stored = match serde_json::to_string(&permanent) {
                                    Ok(data) => {
                                        Box::pin(self.complete(reservation, data, true, &effects, resumed, &meter, call.batch))
                                            .await
                                    }
                                    Err(source) => Err(IdempotencyError::Serialization { key, source }),
                                };
                                match stored {
                                    Ok(completed) => {
                                        self.keep(completed, pilots);
                                        Outcome::PermanentErrorStored
                                    }
                                    Err(stored) if observe => {
                                        tracing::info!(error = %stored, "observe only: the permanent error was not stored; returning it");
                                        Outcome::of(&stored)
                                    }
                                    Err(stored) => {
                                        settle(&meter, Outcome::of(&stored));
                                        return Err(stored.into());
                                    }
                                }
                            }
                            None => {
                                self.release(&reservation, &effects, resumed).await;
                                Outcome::HandlerErrorReleased
                            }
                        };
                        settle(&meter, outcome);
                        Err(Error::Handler(err))
                    }
                }
            }
            .instrument(span),
        )
        .await
    }

    /// Steps 1 and 2 of a call: the key and validation hashes from the event as
    /// JSON, then a completed record in this execution environment (no request).
    fn key_and_cache<T: Serialize + 'static, R: DeserializeOwned, E>(
        &self,
        call: &Call<'_>,
        event: &T,
        meter: &Meter,
    ) -> Keyed<R, E> {
        let config = &self.inner.config;
        // 1. Key and validation hashes, from the event as JSON.
        let hashes = match &call.key {
            CallKey::Given {
                material,
                validation,
            } => hashed(material, validation.as_ref(), config.key_hash),
            CallKey::Derived {
                material,
                validation,
            } => Ok(Some((
                (*material).to_owned(),
                validation.map(str::to_owned),
            ))),
            CallKey::Config => self.key_material(event, None),
            CallKey::SourceDefault(path) => self.key_material(event, Some(path)),
        };
        let (material_hash, validation) = match hashes {
            Ok(Some(hashes)) => hashes,
            Err(err) => return Keyed::Refused(err),
            Ok(None) if config.strict => {
                return Keyed::Refused(IdempotencyError::MissingKey {
                    expression: config.key.describe().to_owned(),
                })
            }
            Ok(None) => {
                settle(meter, Outcome::MissingKeyUnprotected);
                tracing::warn!(
                    expression = config.key.describe(),
                    "no idempotency key material in the event; running the handler without idempotency"
                );
                return Keyed::Unprotected;
            }
        };
        let key = [call.scope, "#", &material_hash].concat();
        tracing::Span::current().record("key", field::display(&key));

        // 2. A completed record in this execution environment: no request at all.
        let now = now_ms();
        let Some(cached) = self.cached(&key, now) else {
            return Keyed::Protect {
                key,
                validation,
                now,
            };
        };
        if config.observe_only {
            return Keyed::Observed(match check_payload(&cached.record, validation.as_deref()) {
                Ok(()) => Outcome::ReplayedFromCache,
                Err(_) => Outcome::PayloadMismatch,
            });
        }
        let replayed = self.replay_cached(&cached, validation.as_deref());
        settle(meter, replay_outcome(&replayed, Outcome::ReplayedFromCache));
        Keyed::Replayed(replayed.map(|response| Executed {
            response,
            replayed: true,
        }))
    }

    /// A call that enforcing refuses with `err`: refused, or, observing, run anyway.
    async fn refuse<T, R, E, F, Fut>(
        &self,
        meter: &Meter,
        err: IdempotencyError,
        event: T,
        handler: F,
    ) -> Result<Executed<R>, Error<E>>
    where
        F: FnOnce(T) -> Fut,
        Fut: Future<Output = Result<R, E>>,
    {
        let outcome = Outcome::of(&err);
        if self.inner.config.observe_only {
            return self.observed(meter, outcome, event, handler).await;
        }
        settle(meter, outcome);
        Err(err.into())
    }

    /// Observe only: counts and logs what enforcing would have done instead of
    /// running the handler, then runs it without a record of its own (the record
    /// that decided is another call's, or none could be made).
    async fn observed<T, R, E, F, Fut>(
        &self,
        meter: &Meter,
        outcome: Outcome,
        event: T,
        handler: F,
    ) -> Result<Executed<R>, Error<E>>
    where
        F: FnOnce(T) -> Fut,
        Fut: Future<Output = Result<R, E>>,
    {
        settle(meter, outcome);
        tracing::info!(
            outcome = outcome.name(),
            "observe only: enforcing would not have run the handler; running it"
        );
        self.run_unprotected(event, handler).await
    }

    /// The key material and the validation fields, selected from the event as JSON.
    /// The hashes of the key material and of the validation fields selected from
    /// the event as JSON; `None` when there is no key material.
    fn key_material<T: Serialize + 'static>(
        &self,
        event: &T,
        source_default: Option<&JsonPath>,
    ) -> Result<Option<(String, Option<String>)>, IdempotencyError> {
        let config = &self.inner.config;
        // A key closure reads the typed event: serialize it only for validation.
        if let (KeySource::Closure { f, event_type }, None) = (&config.key, &config.validation) {
            let material = closure_material(f.as_ref(), event_type, event)?;
            return hashed(&material, None, config.key_hash);
        }
        // A `Value` event is read where it is: no copy, and no recursive
        // serialization of a deeply nested value built in code.
        let converted;
        let json = match (event as &dyn Any).downcast_ref::<Value>() {
            Some(value) => value,
            None => {
                converted = serde_json::to_value(event)
                    .map_err(|e| IdempotencyError::InvalidEvent(e.to_string()))?;
                &converted
            }
        };
        let search = |path: &JsonPath| path.search(json).map_err(IdempotencyError::InvalidEvent);
        let key_path = match (&config.key, source_default) {
            (KeySource::Event, Some(path)) | (KeySource::Expression(path), _) => Some(path),
            _ => None,
        };
        // A source's default key is a plain field: the config's fields are all.
        let (material, validation) = share_parses(&config.embedded_fields, || {
            let material = match (&config.key, key_path) {
                (_, Some(path)) => Some(search(path)?),
                (KeySource::Closure { f, event_type }, None) => {
                    Some(closure_material(f.as_ref(), event_type, event)?)
                }
                _ => None,
            };
            let validation = config.validation.as_ref().map(search).transpose()?;
            Ok::<_, IdempotencyError>((material, validation))
        })?;
        hashed(
            material.as_ref().unwrap_or(json),
            validation.as_ref(),
            config.key_hash,
        )
    }

    /// Runs the handler without a record: idempotency is disabled, or the event has
    /// no key material. Its steps run directly, with keys unique to this call, and
    /// its outbox is delivered once it succeeds (if a dispatcher is set).
    async fn run_unprotected<T, R, E, F, Fut>(
        &self,
        event: T,
        handler: F,
    ) -> Result<Executed<R>, Error<E>>
    where
        F: FnOnce(T) -> Fut,
        Fut: Future<Output = Result<R, E>>,
    {
        let effects = Effects::unprotected(&owner_token());
        let response = effects
            .scope(async move { handler(event).await })
            .await
            .map_err(Error::Handler)?;
        #[cfg(feature = "atomic-writes")]
        self.write_unprotected(effects.take_writes()).await?;
        #[cfg(feature = "outbox")]
        self.deliver_unprotected(effects.take_staged()).await;
        Ok(Executed::ran(response))
    }

    /// An unprotected call's staged writes: committed now, alone, in one
    /// transaction (they happen on every call, as the handler runs on every call).
    #[cfg(feature = "atomic-writes")]
    async fn write_unprotected(
        &self,
        writes: Vec<crate::atomic::StagedWrite>,
    ) -> Result<(), IdempotencyError> {
        if writes.is_empty() {
            return Ok(());
        }
        let Some(transactions) = self.inner.store.transactions() else {
            return Err(IdempotencyError::Unsupported {
                missing: "transactions",
            });
        };
        let key = "unprotected".to_owned();
        match crate::atomic::commit(transactions, None, &writes, &Meter::default()).await {
            Ok(()) => Ok(()),
            Err(StoreError::WriteConditionFailed { indexes }) => {
                Err(crate::atomic::condition_failed(key, &writes, &indexes))
            }
            Err(StoreError::TooLarge {
                items,
                bytes,
                limit,
            }) => Err(IdempotencyError::TransactionTooLarge {
                key,
                items,
                bytes,
                limit,
            }),
            Err(err) => Err(err.into()),
        }
    }

    /// An unprotected call's outbox: delivered now, once, or lost (logged).
    #[cfg(feature = "outbox")]
    async fn deliver_unprotected(&self, staged: Vec<(String, String, outbox::OutboxMessage)>) {
        match (self.inner.dispatcher.get(), staged.is_empty()) {
            (_, true) => {}
            (Some(dispatcher), false) => {
                for (_, derived_key, message) in &staged {
                    if let Err(err) = dispatcher.deliver(message, derived_key).await {
                        tracing::error!(derived_key, error = %err, "outbox message of an unprotected call not delivered; it is lost");
                    }
                }
            }
            (None, false) => tracing::error!(
                messages = staged.len(),
                "an unprotected call staged outbox messages but no dispatcher is set; they are lost"
            ),
        }
    }

    /// How long the reservation holds: until the Lambda deadline, or for the
    /// in-progress timeout when there is no deadline or it cannot be one (in the
    /// past: `Context::default()` has 0; not epoch milliseconds: some emulators).
    /// A reservation born expired would let a duplicate take over at once.
    fn reservation_deadline(&self, deadline_ms: Option<i64>, now: i64) -> i64 {
        let fallback = now + duration_ms(self.inner.config.in_progress_timeout);
        match deadline_ms {
            None => fallback,
            Some(deadline)
                if (now - DEADLINE_GRACE_MS..=now + MAX_DEADLINE_AHEAD_MS).contains(&deadline) =>
            {
                deadline
            }
            Some(deadline) => {
                if !IMPLAUSIBLE_DEADLINE_LOGGED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        deadline,
                        now,
                        "the Lambda deadline is not a plausible epoch-millisecond time in the next day; reservations last in_progress_timeout instead (logged once)"
                    );
                }
                fallback
            }
        }
    }

    /// Until when (epoch milliseconds) a call may wait for the first call of its
    /// key: never past its Lambda deadline minus a margin (the in-progress
    /// timeout stands in for a deadline it does not have).
    fn waiting_until(&self, call: &Call<'_>, now: i64) -> Until {
        let limit = self.reservation_deadline(call.deadline_ms, now) - WAIT_MARGIN_MS;
        let waits = call
            .wait
            .map(|max| (now.saturating_add(duration_ms(max))).min(limit));
        Until {
            // Another record of its own batch: as long as the invocation may.
            batch: limit,
            elsewhere: waits,
        }
    }

    /// Step 3: waits for a call of `key` in flight in this execution environment
    /// (another record of the batch, or, when waiting is on, any call of this
    /// `Idempotency`), or flies the key so that later ones wait for this call.
    /// `holds_until` is this call's reservation deadline. A call in flight is
    /// waited for until its own deadline at most: stalled past it, the store
    /// lets this call take the key over, as a call elsewhere would. When the
    /// wait for a call of this `Idempotency` ends first, the store has the last
    /// word (`Fly`, with no flight of its own); for another record of the batch,
    /// the call is refused.
    async fn board<'a>(
        &'a self,
        call: &Call<'a>,
        key: &str,
        holds_until: i64,
        holds_key: bool,
        pilots: &mut Pilots<'a>,
        waiting: &mut Waiting,
    ) -> Boarding {
        loop {
            let now = now_ms();
            // The flight joined, until when to wait for it, and whether it is
            // the batch's.
            let mut joined = None;
            if let (Some(batch), None) = (call.batch, &pilots.batch) {
                let batch = &batch.flights;
                match batch.board(key, holds_until, now) {
                    Boarded::Joined(flight) => joined = Some((flight, waiting.until.batch, true)),
                    Boarded::Pilot(pilot) => pilots.batch = Some(pilot),
                }
            }
            let waits_here = waiting.until.elsewhere.filter(|_| !holds_key);
            if let (None, None, Some(until)) = (&joined, &pilots.process, waits_here) {
                match self.inner.flights.board(key, holds_until, now) {
                    Boarded::Joined(flight) => joined = Some((flight, until, false)),
                    Boarded::Pilot(pilot) => pilots.process = Some(pilot),
                }
            }
            let Some((flight, until, batch)) = joined else {
                return Boarding::Fly;
            };
            if !flight.has_landed() {
                waiting.waited = true;
            }
            let overdue_at = flight.overdue_at();
            match flight.landed(instant_at(until.min(overdue_at))).await {
                Some(Landing::Completed(cached)) => return Boarding::Replay(cached),
                // It ended without a record: board again, to fly the key or to
                // wait for the call that flies it now.
                Some(_) => continue,
                // Its pilot passed its deadline in flight: board again, to
                // replace its flight and go to the store.
                None if overdue_at < until => continue,
                // The wait is over, and the pilot may not even hold the key: a
                // duplicate itself, whose request to the store is slow (throttled,
                // retried) while the key was completed elsewhere. One reservation
                // attempt decides, as for a call that does not wait: a completed
                // record replays, a free key runs, a held one refuses.
                None if !batch => return Boarding::Fly,
                None => return Boarding::TimedOut,
            }
        }
    }

    /// Step 4b: the key is held by a call in another execution environment. Reads
    /// the record (consistent reads; see [`FIRST_POLL_MS`]) until that call
    /// completes (its record, to replay), the key comes free (`None`: gone,
    /// expired, or past its deadline: reserve again), or the wait ends
    /// (`AlreadyInProgress`). A read never waits past the holder's deadline, so
    /// a crashed holder is taken over as soon as it may be.
    async fn wait_in_store(
        &self,
        key: &str,
        validation: Option<&str>,
        waiting: &mut Waiting,
    ) -> Result<Option<IdempotencyRecord>, IdempotencyError> {
        let until = waiting.until.elsewhere.unwrap_or(i64::MIN);
        let mut holder_deadline: Option<i64> = None;
        loop {
            let now = now_ms();
            if now >= until {
                return Err(IdempotencyError::AlreadyInProgress {
                    key: key.to_owned(),
                });
            }
            waiting.waited = true;
            let mut pause = jittered(waiting.poll_ms).min(until - now);
            if let Some(deadline) = holder_deadline {
                pause = pause.min((deadline - now + 1).max(0));
            }
            tokio::time::sleep(Duration::from_millis(pause.unsigned_abs())).await;
            waiting.poll_ms = (waiting.poll_ms * 2).min(MAX_POLL_MS);
            let now = now_ms();
            let Some(record) = self.inner.store.get(key).await? else {
                return Ok(None);
            };
            if record.is_expired(now) {
                return Ok(None);
            }
            check_payload(&record, validation)?;
            match record.status {
                Status::Completed => return Ok(Some(record)),
                Status::InProgress if record.is_abandoned(now) => return Ok(None),
                Status::InProgress => holder_deadline = record.in_progress_expiration,
            }
        }
    }

    /// A call that waited as long as it may: refused as in progress, as without
    /// waiting. One whose deadline left it no time to wait at all is an
    /// ordinary `in_progress`.
    fn timed_out<R, E>(
        &self,
        meter: &Meter,
        waiting: &Waiting,
        key: String,
    ) -> Result<Executed<R>, Error<E>> {
        if waiting.record_if_waited(meter) {
            settle(meter, Outcome::WaitTimedOut);
            tracing::info!("waited for the call that holds the key as long as this call may; refused as in progress");
        } else {
            settle(meter, Outcome::InProgress);
        }
        Err(IdempotencyError::AlreadyInProgress { key }.into())
    }

    /// Reserves the key, or finds the completed record to replay. Errors: in
    /// progress, a different payload, a malformed record, or the store failed.
    ///
    /// `record` starts as a new execution; when the table holds an abandoned
    /// attempt (crashed, timed out, or released after a step), the reservation
    /// resumes that attempt's execution, so its journaled steps replay.
    async fn reserve(
        &self,
        record: &mut IdempotencyRecord,
        mut answered: Option<Result<Option<IdempotencyRecord>, StoreError>>,
        meter: &Meter,
    ) -> Result<Reserved, IdempotencyError> {
        let store = &self.inner.store;
        let mut resumed = false;
        // Bounded: each further attempt follows a change seen in the table.
        for _ in 0..3 {
            let now = now_ms();
            // The first attempt's answer may have come with the batch's.
            let answer = match answered.take() {
                Some(answer) => answer,
                None => store.reserve(record, now).await,
            };
            let existing = match answer {
                Ok(replaced) => {
                    match replaced.filter(|old| old.owner != record.owner) {
                        Some(old) if old.is_expired(now) => {
                            meter.event(Event::ExpiredReexecuted, 1)
                        }
                        // A failed attempt left its execution open for this retry.
                        Some(old) if old.in_progress_expiration == Some(0) => {}
                        Some(old) => {
                            meter.event(Event::TakenOver, 1);
                            tracing::warn!(
                                deadline = old.in_progress_expiration,
                                resumed,
                                "took over the reservation of an attempt that passed its deadline"
                            );
                        }
                        None => {}
                    }
                    return Ok(Reserved::Ours { resumed });
                }
                Err(StoreError::Exists {
                    existing: Some(existing),
                }) => *existing,
                Err(StoreError::Exists { existing: None }) => match store.get(&record.key).await? {
                    Some(existing) => existing,
                    None => continue,
                },
                Err(err) => {
                    tracing::warn!(error = %err, "could not reserve the key");
                    return Err(err.into());
                }
            };
            if existing.owner == record.owner {
                // Our own write: it was applied, its response lost, the request retried.
                return Ok(Reserved::Ours { resumed });
            }
            // A fresh clock: the record may have expired since the store judged it.
            let now = now_ms();
            if existing.is_expired(now) {
                if resumed {
                    record.execution = owner_token();
                    record.expiration = expiration_s(now, &self.inner.config);
                    resumed = false;
                }
                continue;
            }
            // A different payload is refused even while in flight, and never resumes
            // another payload's execution.
            check_payload(&existing, record.validation.as_deref())?;
            match existing.status {
                Status::Completed => return Ok(Reserved::Completed(existing)),
                Status::InProgress if existing.is_abandoned(now) => {
                    if !existing.execution.is_empty() {
                        record.execution = existing.execution;
                        record.expiration = existing.expiration;
                        resumed = true;
                    }
                }
                Status::InProgress => {
                    return Err(IdempotencyError::AlreadyInProgress {
                        key: record.key.clone(),
                    })
                }
            }
        }
        Err(IdempotencyError::AlreadyInProgress {
            key: record.key.clone(),
        })
    }

    /// Returns a completed record's response (or stored permanent error).
    fn replay<R: DeserializeOwned, E>(
        &self,
        record: &IdempotencyRecord,
        validation: Option<&str>,
    ) -> Result<R, Error<E>> {
        check_payload(record, validation)?;
        let key = &record.key;
        let malformed = |problem: &str| IdempotencyError::MalformedRecord {
            key: key.clone(),
            attribute: "data".into(),
            problem: problem.into(),
        };
        let data = record
            .data
            .as_deref()
            .ok_or_else(|| malformed("is missing from a completed record"))?;
        tracing::Span::current().record("replayed", true);
        tracing::debug!(
            "replaying the stored {}",
            if record.is_error { "error" } else { "response" }
        );
        // The common replay parses the stored text once, straight into the response.
        let hook = self.inner.config.on_replay.as_ref();
        if hook.is_none() && !record.is_error {
            return serde_json::from_str(data).map_err(|source| {
                match serde_json::from_str::<serde::de::IgnoredAny>(data) {
                    Ok(_) => IdempotencyError::Serialization {
                        key: key.clone(),
                        source,
                    },
                    Err(_) => malformed("does not hold JSON"),
                }
                .into()
            });
        }
        let value: Value =
            serde_json::from_str(data).map_err(|_| malformed("does not hold JSON"))?;
        if let Some(hook) = hook {
            hook(&value, record);
        }
        if record.is_error {
            let err: PermanentError = serde_json::from_value(value)
                .map_err(|_| malformed("does not hold a stored permanent error"))?;
            return Err(Error::Replayed(err));
        }
        serde_json::from_value(value).map_err(|source| {
            IdempotencyError::Serialization {
                key: key.clone(),
                source,
            }
            .into()
        })
    }

    /// Stores the response under our reservation, with the outbox messages and
    /// the writes the handler staged (one transaction), then dispatches the
    /// messages.
    #[allow(clippy::too_many_arguments)] // one invocation's state, passed down
    async fn complete(
        &self,
        reservation: IdempotencyRecord,
        data: String,
        is_error: bool,
        effects: &Effects,
        resumed: bool,
        meter: &Meter,
        batch: Option<&Batch>,
    ) -> Result<IdempotencyRecord, IdempotencyError> {
        let record = IdempotencyRecord {
            status: Status::Completed,
            expiration: expiration_s(now_ms(), &self.inner.config),
            data: Some(data),
            is_error,
            ..reservation
        };
        let store = &*self.inner.store;
        // The messages the handler staged; a failed handler's are dropped with it.
        #[cfg(feature = "outbox")]
        let outbox = match is_error {
            true => Vec::new(),
            false => outbox::records(record.expiration, effects.take_staged())?,
        };
        #[cfg(not(feature = "outbox"))]
        let outbox: Vec<crate::store::OutboxRecord> = Vec::new();
        // The writes the handler staged go in the same transaction (a failed
        // handler's are dropped with it).
        #[cfg(feature = "atomic-writes")]
        let writes = match is_error {
            true => Vec::new(),
            false => effects.take_writes(),
        };
        #[cfg(not(feature = "atomic-writes"))]
        let writes: [(); 0] = [];
        let committed = match (outbox.is_empty(), store.outbox()) {
            #[cfg(feature = "atomic-writes")]
            _ if !writes.is_empty() => match store.transactions() {
                Some(transactions) => {
                    let committed = Some((&record, outbox.as_slice()));
                    crate::atomic::commit(transactions, committed, &writes, meter).await
                }
                None => {
                    self.release(&record, effects, resumed).await;
                    return Err(IdempotencyError::Unsupported {
                        missing: "transactions",
                    });
                }
            },
            // A batch's record: written with the batch's others once they ran.
            (true, _) if batch.is_some_and(|batch| batch.defer(&record)) => Ok(()),
            (true, _) => store.complete(&record).await,
            (false, Some(outbox_store)) => outbox_store.commit(&record, &outbox).await,
            (false, None) => {
                self.release(&record, effects, resumed).await;
                return Err(IdempotencyError::Unsupported { missing: "outbox" });
            }
        };
        match committed {
            Ok(()) => {}
            Err(StoreError::TooLarge {
                items,
                bytes,
                limit,
            }) => {
                self.release(&record, effects, resumed).await;
                return Err(if !writes.is_empty() {
                    IdempotencyError::TransactionTooLarge {
                        key: record.key,
                        items,
                        bytes,
                        limit,
                    }
                } else if outbox.is_empty() {
                    IdempotencyError::ResponseTooLarge {
                        key: record.key,
                        size: bytes,
                        limit: MAX_ITEM_BYTES,
                    }
                } else {
                    IdempotencyError::OutboxTooLarge {
                        key: record.key,
                        items,
                        bytes,
                        limit,
                    }
                });
            }
            // A staged write's own condition: nothing was written, the key goes back.
            #[cfg(feature = "atomic-writes")]
            Err(StoreError::WriteConditionFailed { indexes }) => {
                self.release(&record, effects, resumed).await;
                let err = crate::atomic::condition_failed(record.key, &writes, &indexes);
                tracing::warn!(error = %err, "a staged write's condition failed; nothing was written");
                return Err(err);
            }
            Err(StoreError::NotOwner) => {
                tracing::error!(
                    "reservation expired and was taken over before completion; the late result was not stored"
                );
                return Err(IdempotencyError::LostOwnership { key: record.key });
            }
            // The reservation stays until its in-progress expiry, then a retry resumes it.
            Err(err) => {
                tracing::warn!(error = %err, "could not store the response; the reservation expires at its deadline");
                return Err(err.into());
            }
        }
        #[cfg(feature = "outbox")]
        match (self.inner.dispatcher.get(), store.outbox()) {
            (Some(dispatcher), Some(outbox_store)) => {
                for message in &outbox {
                    match deliver_and_mark(outbox_store, dispatcher, message).await {
                        Ok(()) => meter.event(Event::OutboxDelivered, 1),
                        Err(err) => {
                            meter.event(Event::OutboxLeftForRelay, 1);
                            tracing::warn!(key = %message.key, error = %err, "outbox message committed but not delivered; the relay will");
                        }
                    }
                }
            }
            _ => meter.event(Event::OutboxLeftForRelay, outbox.len() as u64),
        }
        #[cfg(not(feature = "outbox"))]
        let _ = meter;
        Ok(record)
    }

    /// A saga's permanent failure: runs the compensations of its completed steps
    /// (see [`Effects::step_with_compensation`]), then stores `failure` as the
    /// outcome, whatever `replay_permanent_errors` says, so no retry runs anything
    /// again. A compensation that fails leaves the record open: the retry resumes.
    /// Returns the stored record too, for the calls waiting on this one.
    async fn compensate<R, E>(
        &self,
        reservation: IdempotencyRecord,
        failure: &PermanentError,
        err: E,
        effects: &Effects,
        resumed: bool,
        meter: &Meter,
    ) -> (Result<Executed<R>, Error<E>>, Option<IdempotencyRecord>) {
        let stored = match effects.compensate(failure).await {
            Ok(()) => match serde_json::to_string(failure) {
                Ok(data) => {
                    self.complete(reservation, data, true, effects, resumed, meter, None)
                        .await
                }
                Err(source) => Err(IdempotencyError::Serialization {
                    key: reservation.key,
                    source,
                }),
            },
            Err(failed) => {
                tracing::error!(error = %failed, "compensating failed; the record stays open and a retry resumes the compensations");
                self.release(&reservation, effects, resumed).await;
                Err(failed)
            }
        };
        match stored {
            Ok(completed) => {
                settle(meter, Outcome::Compensated);
                (Err(Error::Handler(err)), Some(completed))
            }
            Err(stored) => {
                settle(meter, Outcome::of(&stored));
                (Err(stored.into()), None)
            }
        }
    }

    /// Gives the key back so a retry runs the handler again. Failures are logged,
    /// not returned: the caller is already returning a more important error, and
    /// an unreleased reservation expires at its in-progress expiry.
    ///
    /// When the execution may have journaled steps (a step was attempted now, or
    /// this attempt resumed an earlier one) the record stays, open to takeover at
    /// once, so the retry resumes the execution and replays its journal.
    async fn release(&self, reservation: &IdempotencyRecord, effects: &Effects, resumed: bool) {
        let store = &self.inner.store;
        let result = if resumed || effects.attempted_any() {
            let open = IdempotencyRecord {
                status: Status::InProgress,
                in_progress_expiration: Some(0),
                data: None,
                ..reservation.clone()
            };
            store.complete(&open).await
        } else {
            store.release(&reservation.key, &reservation.owner).await
        };
        match result {
            Ok(()) => {}
            Err(StoreError::NotOwner) => {
                tracing::error!(
                    "reservation expired and was taken over; the new owner's record was left alone"
                )
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not release the reservation; it expires at its in-progress expiry")
            }
        }
    }

    /// Drops `key` from the local cache (its completion was not written).
    fn forget(&self, key: &str) {
        if let Some(cache) = &self.inner.cache {
            cache.lock().unwrap_or_else(|p| p.into_inner()).pop(key);
        }
    }

    fn cached(&self, key: &str, now: i64) -> Option<Arc<Cached>> {
        let cache = self.inner.cache.as_ref()?;
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(key) {
            Some(cached) if !cached.record.is_expired(now) => Some(Arc::clone(cached)),
            Some(_) => {
                cache.pop(key);
                None
            }
            None => None,
        }
    }

    /// Keeps a completed record for replays from this execution environment: in
    /// the local cache, and for the calls waiting on this one's flights.
    fn keep(&self, record: IdempotencyRecord, pilots: Pilots<'_>) {
        if record.status != Status::Completed || (self.inner.cache.is_none() && pilots.is_empty()) {
            return;
        }
        let cached = Arc::new(Cached::new(record));
        if let Some(cache) = &self.inner.cache {
            cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(cached.record.key.clone(), Arc::clone(&cached));
        }
        pilots.land(Landing::Completed(cached));
    }

    /// A replay from the local cache: the stored response is parsed once, on the
    /// first cached replay, and later replays read the parsed value.
    fn replay_cached<R: DeserializeOwned, E>(
        &self,
        cached: &Cached,
        validation: Option<&str>,
    ) -> Result<R, Error<E>> {
        let record = &cached.record;
        let parsed = cached.response.get_or_init(|| {
            let data = record.data.as_deref()?;
            serde_json::from_str(data).ok()
        });
        // Hooks, stored errors and malformed data take the full path.
        let (Some(value), None, false) = (parsed, &self.inner.config.on_replay, record.is_error)
        else {
            return self.replay(record, validation);
        };
        check_payload(record, validation)?;
        tracing::Span::current().record("replayed", true);
        tracing::debug!("replaying the stored response");
        R::deserialize(value).map_err(|source| {
            IdempotencyError::Serialization {
                key: record.key.clone(),
                source,
            }
            .into()
        })
    }
}

/// What steps 1 and 2 of a call decided.
enum Keyed<R, E> {
    /// Run protected, under `key`.
    Protect {
        key: String,
        validation: Option<String>,
        now: i64,
    },
    /// Replayed from the local cache (or failed to).
    Replayed(Result<Executed<R>, Error<E>>),
    /// Refused when enforcing (run anyway when observing).
    Refused(IdempotencyError),
    /// No key material, and not strict: run without a record.
    Unprotected,
    /// Observing: enforcing would have replayed from the cache, or refused.
    Observed(Outcome),
}

/// A completed record in the local cache (or landed for waiting calls), with
/// its response once parsed.
pub(crate) struct Cached {
    record: IdempotencyRecord,
    response: OnceLock<Option<Value>>,
}

impl Cached {
    pub(crate) fn new(record: IdempotencyRecord) -> Self {
        Self {
            record,
            response: OnceLock::new(),
        }
    }
}

/// Whether the reservation was ours, or a completed record is to be replayed.
enum Reserved {
    /// Ours; `resumed` when it continues an earlier attempt's execution (steps
    /// may be journaled).
    Ours {
        resumed: bool,
    },
    Completed(IdempotencyRecord),
}

/// Until when (epoch milliseconds) a call may wait for the first call of its key.
#[derive(Clone, Copy)]
struct Until {
    /// For another record of its own batch.
    batch: i64,
    /// For any other call (in this execution environment or another); `None`:
    /// waiting is off, the call is refused.
    elsewhere: Option<i64>,
}

/// A call's waiting: its limits, whether it waited, the store's poll interval.
struct Waiting {
    until: Until,
    started: std::time::Instant,
    waited: bool,
    poll_ms: i64,
}

impl Waiting {
    fn new(until: Until) -> Self {
        Self {
            until,
            started: std::time::Instant::now(),
            waited: false,
            poll_ms: FIRST_POLL_MS,
        }
    }

    /// Counts the time waited (the histogram, the span's `waited_ms`), if the
    /// call waited; returns whether it did.
    fn record_if_waited(&self, meter: &Meter) -> bool {
        if self.waited {
            let waited = self.started.elapsed();
            meter.wait_time(waited);
            tracing::Span::current().record("waited_ms", duration_ms(waited));
        }
        self.waited
    }

    /// The outcome of a replay: `otherwise` unless the call waited first.
    fn replayed_outcome(&self, meter: &Meter, otherwise: Outcome) -> Outcome {
        match self.record_if_waited(meter) {
            true => Outcome::WaitedThenReplayed,
            false => otherwise,
        }
    }

    /// The outcome of a call that reserved the key and ran the handler.
    fn ran_outcome(&self, meter: &Meter) -> Outcome {
        match self.record_if_waited(meter) {
            true => Outcome::WaitedThenRan,
            false => Outcome::Executed,
        }
    }
}

/// What step 3 decided.
enum Boarding {
    /// Go to the store: no other call of the key in flight here, or the wait
    /// for one of this `Idempotency` is over (its pilot stalled past its
    /// deadline, or this call's wait ended first: the store decides then).
    Fly,
    /// Another call here completed the key: replay its record.
    Replay(Arc<Cached>),
    /// Another record of the batch did not land before this call had to stop
    /// waiting.
    TimedOut,
}

/// The flights this call flies (its batch's, the engine's), landed together:
/// with its completed record, or open when the call is dropped without one.
#[derive(Default)]
struct Pilots<'a> {
    batch: Option<Pilot<'a>>,
    process: Option<Pilot<'a>>,
}

impl Pilots<'_> {
    fn is_empty(&self) -> bool {
        self.batch.is_none() && self.process.is_none()
    }

    fn land(self, landing: Landing) {
        for pilot in [self.batch, self.process].into_iter().flatten() {
            pilot.land(landing.clone());
        }
    }
}

/// A Tokio instant for an epoch-milliseconds time (now if it has passed).
fn instant_at(epoch_ms: i64) -> tokio::time::Instant {
    let ahead = (epoch_ms - now_ms()).max(0).unsigned_abs();
    tokio::time::Instant::now() + Duration::from_millis(ahead)
}

/// `ms` give or take a fifth, so that waiters started together do not read
/// together.
fn jittered(ms: i64) -> i64 {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let spread = (ms / 5).max(1);
    ms - spread + (random % (2 * spread as u64 + 1)) as i64
}

/// The key material a key closure selects from the typed event.
fn closure_material<T: 'static>(
    f: &crate::config::KeyClosure,
    event_type: &str,
    event: &T,
) -> Result<Value, IdempotencyError> {
    match f(event as &dyn Any) {
        Some(result) => result.map_err(IdempotencyError::InvalidEvent),
        None => Err(IdempotencyError::InvalidEvent(format!(
            "the key closure takes {event_type}, the handler's event is {}",
            std::any::type_name::<T>()
        ))),
    }
}

/// The hashes of key material and validation fields; `None` when the material
/// cannot identify an event. Material with a number serde_json may have rounded
/// is refused: two different orders would share a key.
fn hashed(
    material: &Value,
    validation: Option<&Value>,
    key_hash: KeyHash,
) -> Result<Option<(String, Option<String>)>, IdempotencyError> {
    if let Some(n) = rounded_integer(material) {
        return Err(IdempotencyError::InvalidEvent(format!(
            "the key material holds {n}, an integer beyond 64 bits that serde_json rounded to an f64, \
             so different values would share a key; enable the `exact-numbers` feature or key on a string"
        )));
    }
    Ok((!key_hash.is_missing(material)).then(|| {
        (
            key_hash.hash(material),
            validation.map(|v| key_hash.hash(v)),
        )
    }))
}

/// Names the call's outcome on its span and counts it.
fn settle(meter: &Meter, outcome: Outcome) {
    meter.outcome(outcome);
    tracing::Span::current().record("outcome", outcome.name());
}

/// The outcome of a replay: `replayed` (a stored permanent error included), or
/// what stopped it.
fn replay_outcome<R, E>(replayed: &Result<R, Error<E>>, replayed_as: Outcome) -> Outcome {
    match replayed {
        Ok(_) | Err(Error::Replayed(_)) => replayed_as,
        Err(Error::Idempotency(err)) => Outcome::of(err),
        Err(Error::Handler(_)) => Outcome::InvalidInput,
    }
}

fn check_payload(
    record: &IdempotencyRecord,
    validation: Option<&str>,
) -> Result<(), IdempotencyError> {
    match (validation, record.validation.as_deref()) {
        (Some(ours), Some(stored)) if ours != stored => Err(IdempotencyError::PayloadMismatch {
            key: record.key.clone(),
        }),
        _ => Ok(()),
    }
}

/// The handler's error as a [`PermanentError`], whether returned directly, boxed
/// as a `lambda_runtime::Error`, or as a step's failure passed on with `?` (an
/// `Error<PermanentError>`, directly or boxed).
fn as_permanent<E: 'static>(err: &E) -> Option<&PermanentError> {
    fn from_step(err: &Error<PermanentError>) -> Option<&PermanentError> {
        match err {
            Error::Handler(permanent) | Error::Replayed(permanent) => Some(permanent),
            Error::Idempotency(_) => None,
        }
    }
    let any = err as &dyn Any;
    any.downcast_ref::<PermanentError>()
        .or_else(|| any.downcast_ref().and_then(from_step))
        .or_else(|| {
            let boxed = any.downcast_ref::<lambda_runtime::Error>()?;
            boxed
                .downcast_ref::<PermanentError>()
                .or_else(|| boxed.downcast_ref().and_then(from_step))
        })
}

/// The clock, in epoch milliseconds: the one every part of the crate reads.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2))
}

fn duration_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

fn expiration_s(now_ms: i64, config: &IdempotencyConfig) -> i64 {
    (now_ms + duration_ms(config.expires_after)).div_euclid(1000)
}

/// The reservation of `key` by a new execution, named after its owner token.
fn new_reservation(
    key: String,
    validation: Option<String>,
    expiration: i64,
    holds_until: i64,
) -> IdempotencyRecord {
    let owner = owner_token();
    IdempotencyRecord {
        key,
        status: Status::InProgress,
        expiration,
        in_progress_expiration: Some(holds_until),
        data: None,
        validation,
        execution: owner.clone(),
        owner,
        is_error: false,
    }
}

/// A token unique to one reservation (and to one execution). `RandomState` is seeded from the OS's
/// randomness per process, which with a counter and the clock is enough for a
/// fencing token (it must be unique, not secret); no `rand` dependency needed.
fn owner_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // `process::id` is a system call on every use; the id does not change.
    static PROCESS: OnceLock<[u8; 4]> = OnceLock::new();
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_i64(now_ms());
    let process = PROCESS.get_or_init(|| std::process::id().to_be_bytes());
    let mut token = hex(&hasher.finish().to_be_bytes());
    token.push_str(&hex(process));
    token
}
