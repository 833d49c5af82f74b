//! One idempotent invocation, top to bottom: derive the key, check the local cache,
//! reserve, run the handler, complete or release.

use crate::config::{IdempotencyConfig, KeySource};
use crate::effects::Effects;
use crate::error::{Error, IdempotencyError, PermanentError};
use crate::key::{hash_value, is_missing, JsonPath};
use crate::outbox::{deliver_and_mark, Dispatcher, OutboxMessage};
use crate::record::{IdempotencyRecord, Status, MAX_ITEM_BYTES};
use crate::store::{IdempotencyStore, OutboxRecord, StoreError};
use lru::LruCache;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::any::Any;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::{field, Instrument};

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
/// let service = idempotency.wrap(service_fn(handler));
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
    store: S,
    config: IdempotencyConfig,
    cache: Option<Mutex<LruCache<String, IdempotencyRecord>>>,
    function_name: String,
    dispatcher: OnceLock<Dispatcher>,
}

static DISABLED_LOGGED: AtomicBool = AtomicBool::new(false);

/// What an invocation brings besides its event: its key prefix and deadline.
pub(crate) struct Call<'a> {
    /// The key prefix (see [`Idempotency::scope_for`]).
    pub(crate) scope: &'a str,
    /// The Lambda deadline in epoch milliseconds, when there is a `Context`.
    pub(crate) deadline_ms: Option<i64>,
    /// Where the key comes from.
    pub(crate) key: CallKey<'a>,
}

/// Where an invocation's key material comes from.
pub(crate) enum CallKey<'a> {
    /// The config's key source and payload validation.
    Config,
    /// As `Config`, but an event source's own default replaces "the whole event"
    /// (e.g. an SQS record's `messageId`, which stays the same on redelivery).
    SourceDefault(&'a JsonPath),
    /// Material and validation fields chosen by the caller (HTTP `Idempotency-Key`).
    Given {
        material: Value,
        validation: Option<Value>,
    },
}

/// A response, and whether it was replayed rather than computed.
pub(crate) struct Executed<R> {
    pub(crate) response: R,
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
                store,
                config,
                cache,
                function_name,
                dispatcher: OnceLock::new(),
            }),
        }
    }

    /// Delivers the outbox messages of completed invocations right after commit
    /// with `dispatcher`. Without one, committed messages wait for the
    /// [`Relay`](crate::Relay). Set once, before the first invocation; later calls
    /// keep the first dispatcher.
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

    /// The key prefix for a handler: the configured prefix, or
    /// `{AWS_LAMBDA_FUNCTION_NAME}.{handler}`.
    pub(crate) fn scope_for(&self, handler: &str) -> String {
        match &self.inner.config.key_prefix {
            Some(prefix) => prefix.clone(),
            None => format!("{}.{handler}", self.inner.function_name),
        }
    }

    /// The key prefix for a named function: always includes the name, so two
    /// functions given the same payload get distinct keys.
    pub(crate) fn function_scope(&self, name: &str) -> String {
        let base = self
            .inner
            .config
            .key_prefix
            .as_deref()
            .unwrap_or(&self.inner.function_name);
        format!("{base}.{name}")
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
        if config.disabled {
            return handler(event)
                .await
                .map(Executed::ran)
                .map_err(Error::Handler);
        }

        // 1. Key and validation hash, from the event as JSON.
        let (material, validation_fields) = match call.key {
            CallKey::Given {
                material,
                validation,
            } => (material, validation),
            CallKey::Config => self.key_material(&event, None)?,
            CallKey::SourceDefault(path) => self.key_material(&event, Some(path))?,
        };
        if is_missing(&material) {
            if config.strict {
                return Err(IdempotencyError::MissingKey {
                    expression: config.key.describe().to_owned(),
                }
                .into());
            }
            tracing::warn!(
                expression = config.key.describe(),
                "no idempotency key material in the event; running the handler without idempotency"
            );
            return handler(event)
                .await
                .map(Executed::ran)
                .map_err(Error::Handler);
        }
        let key = format!("{}#{}", call.scope, hash_value(&material));
        let validation = validation_fields.as_ref().map(hash_value);

        let span = tracing::info_span!("idempotency", key = %key, replayed = field::Empty);
        // Boxed: with event types as deep as API Gateway's, the unboxed future
        // overflows the compiler's layout query depth in the user's `main`.
        Box::pin(
            async move {
                // 2. A completed record in this execution environment: no request at all.
                let now = now_ms();
                if let Some(record) = self.cached(&key, now) {
                    return self
                        .replay(record, validation.as_deref())
                        .map(|response| Executed {
                            response,
                            replayed: true,
                        });
                }

                // 3. Reserve. A live record comes back with the refusal (one request).
                let in_progress_until = call
                    .deadline_ms
                    .unwrap_or(now + duration_ms(config.in_progress_timeout));
                let reservation = IdempotencyRecord {
                    key: key.clone(),
                    status: Status::InProgress,
                    expiration: expiration_s(now, config),
                    in_progress_expiration: Some(in_progress_until),
                    data: None,
                    validation: validation.clone(),
                    owner: owner_token(),
                    is_error: false,
                };
                let retry = match self.reserve(&reservation, now).await? {
                    Reserved::Ours { retry } => retry,
                    Reserved::Completed(existing) => {
                        return self
                            .replay(existing, validation.as_deref())
                            .map(|response| Executed {
                                response,
                                replayed: true,
                            });
                    }
                };

                // 4. Run the handler, then complete or release. Its steps and outbox
                // hang off the invocation's key.
                let effects = Effects::new(self, &key, retry, reservation.expiration);
                // Called inside the scope: a handler may reach its effects before its first await.
                match effects.scope(async move { handler(event).await }).await {
                    Ok(response) => {
                        let data = match serde_json::to_string(&response) {
                            Ok(data) => data,
                            Err(source) => {
                                self.release(&reservation, &effects).await;
                                return Err(IdempotencyError::Serialization { key, source }.into());
                            }
                        };
                        self.complete(reservation, data, false, &effects).await?;
                        Ok(Executed::ran(response))
                    }
                    Err(err) => {
                        match as_permanent(&err).filter(|_| config.replay_permanent_errors) {
                            Some(permanent) => {
                                let data = serde_json::to_string(permanent).map_err(|source| {
                                    IdempotencyError::Serialization { key, source }
                                })?;
                                self.complete(reservation, data, true, &effects).await?;
                            }
                            None => self.release(&reservation, &effects).await,
                        }
                        Err(Error::Handler(err))
                    }
                }
            }
            .instrument(span),
        )
        .await
    }

    /// The key material and the validation fields, selected from the event as JSON.
    fn key_material<T: Serialize + 'static>(
        &self,
        event: &T,
        source_default: Option<&JsonPath>,
    ) -> Result<(Value, Option<Value>), IdempotencyError> {
        let config = &self.inner.config;
        let json = serde_json::to_value(event)
            .map_err(|e| IdempotencyError::InvalidEvent(e.to_string()))?;
        let search = |path: &JsonPath| path.search(&json).map_err(IdempotencyError::InvalidEvent);
        let material = match (&config.key, source_default) {
            (KeySource::Event, None) => json.clone(),
            (KeySource::Event, Some(path)) | (KeySource::Expression(path), _) => search(path)?,
            (KeySource::Closure { f, event_type }, _) => match f(event as &dyn Any) {
                Some(result) => result.map_err(IdempotencyError::InvalidEvent)?,
                None => {
                    return Err(IdempotencyError::InvalidEvent(format!(
                        "the key closure takes {event_type}, the handler's event is {}",
                        std::any::type_name::<T>()
                    )))
                }
            },
        };
        let validation = config.validation.as_ref().map(search).transpose()?;
        Ok((material, validation))
    }

    /// Reserves the key, or finds the completed record to replay. Errors: in
    /// progress, or the store failed.
    async fn reserve(
        &self,
        record: &IdempotencyRecord,
        now: i64,
    ) -> Result<Reserved, IdempotencyError> {
        // A second attempt only when the record that refused us has expired by our
        // clock (it expired between the store's check and ours).
        for _ in 0..2 {
            let existing = match self.inner.store.reserve(record, now).await {
                Ok(retry) => return Ok(Reserved::Ours { retry }),
                Err(StoreError::Exists {
                    existing: Some(existing),
                }) => *existing,
                Err(StoreError::Exists { existing: None }) => {
                    match self.inner.store.get(&record.key).await? {
                        Some(existing) => existing,
                        None => continue,
                    }
                }
                Err(err) => return Err(err.into()),
            };
            if existing.can_be_taken_over(now_ms()) {
                continue;
            }
            if existing.status == Status::InProgress {
                // Validate first: a different payload is refused even while in flight.
                check_payload(&existing, record.validation.as_deref())?;
                return Err(IdempotencyError::AlreadyInProgress {
                    key: record.key.clone(),
                });
            }
            return Ok(Reserved::Completed(existing));
        }
        Err(IdempotencyError::AlreadyInProgress {
            key: record.key.clone(),
        })
    }

    /// Returns a completed record's response (or stored permanent error).
    fn replay<R: DeserializeOwned, E>(
        &self,
        record: IdempotencyRecord,
        validation: Option<&str>,
    ) -> Result<R, Error<E>> {
        check_payload(&record, validation)?;
        let key = &record.key;
        let data = record.data.as_deref().unwrap_or("null");
        tracing::Span::current().record("replayed", true);
        tracing::info!(
            "replaying the stored {}",
            if record.is_error { "error" } else { "response" }
        );
        if let Some(hook) = &self.inner.config.on_replay {
            let value: Value =
                serde_json::from_str(data).map_err(|source| IdempotencyError::Serialization {
                    key: key.clone(),
                    source,
                })?;
            hook(&value, &record);
        }
        self.remember(&record);
        if record.is_error {
            let err: PermanentError =
                serde_json::from_str(data).map_err(|source| IdempotencyError::Serialization {
                    key: key.clone(),
                    source,
                })?;
            return Err(Error::Replayed(err));
        }
        serde_json::from_str(data).map_err(|source| {
            IdempotencyError::Serialization {
                key: key.clone(),
                source,
            }
            .into()
        })
    }

    /// Stores the response under our reservation, with the outbox messages the
    /// handler staged (one transaction), then dispatches them.
    async fn complete(
        &self,
        reservation: IdempotencyRecord,
        data: String,
        is_error: bool,
        effects: &Effects,
    ) -> Result<(), IdempotencyError> {
        let record = IdempotencyRecord {
            status: Status::Completed,
            expiration: expiration_s(now_ms(), &self.inner.config),
            data: Some(data),
            is_error,
            ..reservation
        };
        let store = &self.inner.store;
        let size = store.item_size(&record);
        if size > MAX_ITEM_BYTES {
            self.release(&record, effects).await;
            return Err(IdempotencyError::ResponseTooLarge {
                key: record.key,
                size,
                limit: MAX_ITEM_BYTES,
            });
        }
        // A failed handler's staged messages are dropped with it.
        let staged = if is_error {
            Vec::new()
        } else {
            effects.take_staged()
        };
        let outbox = outbox_records(&record, staged)?;
        if let Err(err) = check_transaction(store, &record.key, size, &outbox) {
            self.release(&record, effects).await;
            return Err(err);
        }
        match store.complete(&record, &outbox).await {
            Ok(()) => self.remember(&record),
            Err(StoreError::NotOwner) => {
                tracing::error!(
                    "reservation expired and was taken over before completion; the late result was not stored"
                );
                return Err(IdempotencyError::LostOwnership { key: record.key });
            }
            // The reservation stays until its in-progress expiry, then a retry takes over.
            Err(err) => return Err(err.into()),
        }
        if let Some(dispatcher) = self.inner.dispatcher.get() {
            for message in &outbox {
                if let Err(err) = deliver_and_mark(store, dispatcher, message).await {
                    tracing::warn!(key = %message.key, error = %err, "outbox message committed but not delivered; the relay will");
                }
            }
        }
        Ok(())
    }

    /// Gives the key back so a retry runs the handler again. Failures are logged,
    /// not returned: the caller is already returning a more important error, and
    /// an unreleased reservation expires at its in-progress expiry.
    ///
    /// With journaled steps the record stays, open to takeover at once, so the
    /// retry knows to replay the journal.
    async fn release(&self, reservation: &IdempotencyRecord, effects: &Effects) {
        let store = &self.inner.store;
        let result = if effects.journaled_any() {
            let open = IdempotencyRecord {
                status: Status::InProgress,
                in_progress_expiration: Some(0),
                data: None,
                ..reservation.clone()
            };
            store.complete(&open, &[]).await
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

    fn cached(&self, key: &str, now: i64) -> Option<IdempotencyRecord> {
        let cache = self.inner.cache.as_ref()?;
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(key) {
            Some(record) if !record.is_expired(now) => Some(record.clone()),
            Some(_) => {
                cache.pop(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, record: &IdempotencyRecord) {
        if let (Some(cache), Status::Completed) = (&self.inner.cache, record.status) {
            cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(record.key.clone(), record.clone());
        }
    }
}

/// Whether the reservation was ours, or a completed record is to be replayed.
enum Reserved {
    /// Ours; `retry` when it replaced an earlier record (steps may be journaled).
    Ours {
        retry: bool,
    },
    Completed(IdempotencyRecord),
}

/// The staged messages as records under the invocation's key.
fn outbox_records(
    record: &IdempotencyRecord,
    staged: Vec<(String, OutboxMessage)>,
) -> Result<Vec<OutboxRecord>, IdempotencyError> {
    staged
        .into_iter()
        .enumerate()
        .map(|(index, (derived_key, message))| {
            let key = format!("{}#outbox#{index}", record.key);
            let message = serde_json::to_string(&message).map_err(|source| {
                IdempotencyError::Serialization {
                    key: key.clone(),
                    source,
                }
            })?;
            Ok(OutboxRecord {
                key,
                derived_key,
                message,
                delivered: false,
                expiration: record.expiration,
            })
        })
        .collect()
}

/// Refuses a record plus outbox that would exceed a DynamoDB transaction limit.
fn check_transaction<S: IdempotencyStore>(
    store: &S,
    key: &str,
    record_size: usize,
    outbox: &[OutboxRecord],
) -> Result<(), IdempotencyError> {
    const MAX_ITEMS: usize = 100;
    const MAX_BYTES: usize = 4 * 1024 * 1024;
    if outbox.is_empty() {
        return Ok(());
    }
    let sizes: Vec<usize> = outbox.iter().map(|r| store.outbox_size(r)).collect();
    let bytes = record_size + sizes.iter().sum::<usize>();
    let limit = if outbox.len() + 1 > MAX_ITEMS {
        "100 items per transaction"
    } else if sizes.iter().any(|&size| size > MAX_ITEM_BYTES) {
        "400 KB per item"
    } else if bytes > MAX_BYTES {
        "4 MB per transaction"
    } else {
        return Ok(());
    };
    Err(IdempotencyError::OutboxTooLarge {
        key: key.to_owned(),
        items: outbox.len() + 1,
        bytes,
        limit,
    })
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

/// The handler's error as a [`PermanentError`], whether returned directly or boxed
/// as a `lambda_runtime::Error`.
fn as_permanent<E: 'static>(err: &E) -> Option<&PermanentError> {
    let any = err as &dyn Any;
    any.downcast_ref::<PermanentError>().or_else(|| {
        any.downcast_ref::<lambda_runtime::Error>()
            .and_then(|boxed| boxed.downcast_ref())
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn duration_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

fn expiration_s(now_ms: i64, config: &IdempotencyConfig) -> i64 {
    (now_ms + duration_ms(config.expires_after)).div_euclid(1000)
}

/// A token unique to one reservation. `RandomState` is seeded from the OS's
/// randomness per process, which with a counter and the clock is enough for a
/// fencing token (it must be unique, not secret); no `rand` dependency needed.
fn owner_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_i64(now_ms());
    format!("{:016x}{:08x}", hasher.finish(), std::process::id())
}
