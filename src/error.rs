//! Errors of the idempotency layer.

/// A boxed error from a store, a sink or a client: the source of
/// [`IdempotencyError::Store`] and [`IdempotencyError::Delivery`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an idempotent call did not produce the handler's result.
///
/// The handler's own errors are never wrapped in this type: see [`Error`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// Another invocation holds the reservation for this key and has not finished.
    /// The event source should retry later.
    #[error("an invocation with idempotency key {key} is already in progress")]
    AlreadyInProgress {
        /// The idempotency key.
        key: String,
    },
    /// The key was seen before with a different payload (the validation fields differ).
    #[error("idempotency key {key} was already used with a different payload")]
    PayloadMismatch {
        /// The idempotency key.
        key: String,
    },
    /// The key expression selected nothing usable and the config is strict.
    #[error("no idempotency key material in the event (expression: {expression})")]
    MissingKey {
        /// The key expression, or `closure` for a key closure.
        expression: String,
    },
    /// The event could not be serialized, or the key closure was given another event type.
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// The response could not be serialized or a stored response could not be deserialized.
    #[error("response serialization failed for key {key}: {source}")]
    Serialization {
        /// The idempotency key.
        key: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The record holding the response would exceed DynamoDB's 400 KB item limit.
    /// The reservation has been released, so a retry runs the handler again.
    #[error("the record for key {key} would be {size} bytes, over the {limit}-byte item limit")]
    ResponseTooLarge {
        /// The idempotency key.
        key: String,
        /// Estimated item size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// Our reservation expired and another invocation took the key over before we
    /// completed (or released) it. The late result was not written: the new owner's
    /// record is untouched.
    #[error("lost ownership of idempotency key {key}: the reservation expired and was taken over")]
    LostOwnership {
        /// The idempotency key.
        key: String,
    },
    /// A resumed execution's steps no longer match its journal: at a journaled
    /// position the handler called another step, or asked the journaled result
    /// for a type it does not deserialize into. The handler's code or branching
    /// changed between attempts, and replaying would give a wrong result. Once an
    /// execution has met a mismatch the invocation ends with this error whatever
    /// the handler does with the step's error, and its record is neither
    /// completed nor stored as a success: it stays open, with its journal, for
    /// code that matches it (see the guide's
    /// [steps and outbox](crate::guide::steps_and_outbox) chapter).
    #[error("step {position} of {key} was journaled as {journaled:?} but {detail}")]
    NonDeterministic {
        /// The idempotency key of the invocation.
        key: String,
        /// The step's position in the invocation (0-based).
        position: usize,
        /// The name journaled at that position.
        journaled: String,
        /// The name the handler called at that position.
        called: String,
        /// What does not match: the handler now calls another step there, or
        /// asks the journaled result for another type.
        detail: String,
    },
    /// Delivering a committed outbox message failed; it stays pending for the relay.
    #[error("outbox delivery failed: {0}")]
    Delivery(#[source] BoxError),
    /// `effects()` was called outside an idempotent handler (or on another task).
    #[error("no idempotent invocation is running on this task; steps and the outbox work inside a wrapped handler")]
    NoEffects,
    /// The completed record and the staged outbox messages do not fit in one
    /// DynamoDB transaction (100 items, 4 MB, 400 KB per item). Nothing was written.
    #[error("idempotency key {key}: {items} items of {bytes} bytes exceed the transaction limits ({limit})")]
    OutboxTooLarge {
        /// The idempotency key.
        key: String,
        /// Items in the transaction (the record plus the messages).
        items: usize,
        /// Their total size.
        bytes: usize,
        /// Which limit was exceeded.
        limit: &'static str,
    },
    /// The completed record, the outbox messages and the staged writes
    /// (`Effects::writes`, feature `atomic-writes`) do not fit in one DynamoDB
    /// transaction (100 items, 4 MB, 400 KB per item). Nothing was written and the
    /// reservation was released.
    #[error("idempotency key {key}: {items} items of {bytes} bytes with the staged writes exceed the transaction limits ({limit})")]
    TransactionTooLarge {
        /// The idempotency key.
        key: String,
        /// Items in the transaction (the record, the messages and the writes).
        items: usize,
        /// Their total size (an upper bound for the writes).
        bytes: usize,
        /// Which limit was exceeded.
        limit: &'static str,
    },
    /// The condition of a write the handler staged failed (a `ConditionCheck`,
    /// or a `Put`/`Update`/`Delete` with a condition expression). The transaction
    /// was cancelled: nothing was written, and the reservation was released, so a
    /// retry runs the handler again.
    #[error("idempotency key {key}: the condition of staged write {index} on table {table} failed for item {item}; nothing was written")]
    WriteConditionFailed {
        /// The idempotency key.
        key: String,
        /// The write's table.
        table: String,
        /// The item: the key of an update, a delete or a condition check, the
        /// whole item of a put (cut at 256 characters), as text.
        item: String,
        /// The write's index among the staged writes (what `Writes::put` and
        /// the others returned).
        index: usize,
    },
    /// The store holds an item under the key that is not a valid record (wrong
    /// attribute type, missing attribute, unknown status, a completed record without
    /// a JSON response). The handler has not run and the item was left as it is:
    /// an operator deletes it (or fixes it) to let the key run again.
    #[error("malformed idempotency record {key}: attribute {attribute:?} {problem}; the handler did not run (delete or repair the item to let this key run again)")]
    MalformedRecord {
        /// The record's key.
        key: String,
        /// The attribute at fault.
        attribute: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The handler staged outbox messages or called a step, and the store keeps no
    /// outbox or no step journal ([`IdempotencyStore::outbox`](crate::IdempotencyStore::outbox),
    /// [`IdempotencyStore::journal`](crate::IdempotencyStore::journal)). Nothing was
    /// committed and the reservation was released.
    #[error("the idempotency store keeps no {missing}")]
    Unsupported {
        /// `step journal`, `outbox` or `transactions`.
        missing: &'static str,
    },
    /// The handler failed permanently and one of the compensations of its completed
    /// steps failed ([`Effects::step_with_compensation`](crate::Effects::step_with_compensation)).
    /// The compensations before it are journaled; the record stays open, so a retry
    /// resumes the execution and runs the remaining ones. Retry the call.
    #[error("compensating {key} failed at {step:?} (the permanent failure: {failure}); a retry resumes the compensations: {source}")]
    CompensationFailed {
        /// The idempotency key of the invocation.
        key: String,
        /// The name of the step whose compensation failed.
        step: String,
        /// The message of the permanent failure being compensated.
        failure: String,
        /// The compensation's error.
        #[source]
        source: BoxError,
    },
    /// The store failed (network, throttling, permissions). When this happens while
    /// reserving, the handler has not run.
    #[error("idempotency store failure: {0}")]
    Store(#[source] BoxError),
}

/// The error of a wrapped call: either the handler's own error, unchanged, or the
/// idempotency layer's. Under `lambda_runtime` it converts to a `Diagnostic` that
/// keeps the handler's own `errorType` and gives each of the layer's failures its
/// own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error<E> {
    /// The handler ran and failed; its error is returned as it was. The reservation
    /// has been released (if still ours) so a retry runs the handler again.
    // Displayed, not `transparent`: `Error<E>` is then an error for any `E: Display`,
    // boxed handler errors included, so `?` turns it into a `lambda_runtime::Error`.
    #[error("{0}")]
    Handler(E),
    /// A permanent error stored by an earlier invocation, replayed
    /// (see [`IdempotencyConfigBuilder::replay_permanent_errors`](crate::IdempotencyConfigBuilder::replay_permanent_errors)).
    #[error(transparent)]
    Replayed(crate::PermanentError),
    /// The idempotency layer refused or failed the call.
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
}

/// A handler error that is not worth retrying (a declined card, an invalid order).
///
/// With [`replay_permanent_errors`](crate::IdempotencyConfigBuilder::replay_permanent_errors)
/// on, a handler that fails with this error (directly, or boxed as a
/// `lambda_runtime::Error`) has it stored like a response, and retries get the same
/// error back without running the handler.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct PermanentError {
    /// Human-readable message.
    pub message: String,
    /// Optional structured details, replayed as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl PermanentError {
    /// A permanent error with a message and no details.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            details: None,
        }
    }

    /// Attaches structured details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
}

impl IdempotencyError {
    /// The `errorType` this failure reaches Lambda with: one stable name per kind,
    /// Powertools' name where it has one, so alarms and log filters can tell
    /// failures apart.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::AlreadyInProgress { .. } => "IdempotencyAlreadyInProgressError",
            Self::PayloadMismatch { .. } => "IdempotencyValidationError",
            Self::MissingKey { .. } => "IdempotencyKeyError",
            Self::InvalidEvent(_) => "IdempotencyInvalidEventError",
            Self::Serialization { .. } => "IdempotencySerializationError",
            Self::ResponseTooLarge { .. } => "IdempotencyResponseTooLargeError",
            Self::LostOwnership { .. } => "IdempotencyLostOwnershipError",
            Self::NonDeterministic { .. } => "IdempotencyNonDeterministicError",
            Self::Delivery(_) => "IdempotencyDeliveryError",
            Self::NoEffects => "IdempotencyNoEffectsError",
            Self::OutboxTooLarge { .. } => "IdempotencyOutboxTooLargeError",
            Self::TransactionTooLarge { .. } => "IdempotencyTransactionTooLargeError",
            Self::WriteConditionFailed { .. } => "IdempotencyWriteConditionError",
            Self::MalformedRecord { .. } => "IdempotencyMalformedRecordError",
            Self::Unsupported { .. } => "IdempotencyUnsupportedError",
            Self::CompensationFailed { .. } => "IdempotencyCompensationError",
            Self::Store(_) => "IdempotencyPersistenceLayerError",
        }
    }
}

impl IdempotencyError {
    /// Whether the handler's staged writes were refused (their condition, the
    /// transaction's limits, a store without transactions): nothing of them was
    /// written, so even observe-only mode returns the error, not the response.
    pub(crate) fn refused_staged_writes(&self) -> bool {
        matches!(
            self,
            Self::WriteConditionFailed { .. }
                | Self::TransactionTooLarge { .. }
                | Self::Unsupported {
                    missing: "transactions"
                }
        )
    }
}

/// Each failure reaches Lambda with its own `errorType` (see
/// [`IdempotencyError::error_type`]); also lets batch helpers that return
/// `Result<_, IdempotencyError>` go straight into `lambda_runtime::run`.
impl From<IdempotencyError> for lambda_runtime::Diagnostic {
    fn from(err: IdempotencyError) -> Self {
        Self {
            error_type: err.error_type().to_owned(),
            error_message: err.to_string(),
        }
    }
}

/// A replayed permanent error reaches Lambda as `errorType` `PermanentError`.
impl From<PermanentError> for lambda_runtime::Diagnostic {
    fn from(err: PermanentError) -> Self {
        Self {
            error_type: "PermanentError".to_owned(),
            error_message: err.to_string(),
        }
    }
}

/// The error of a wrapped Lambda service under `lambda_runtime`: the handler's own
/// error keeps its own diagnostic (its `errorType`), the layer's failures get theirs.
impl<E: Into<lambda_runtime::Diagnostic>> From<Error<E>> for lambda_runtime::Diagnostic {
    fn from(err: Error<E>) -> Self {
        match err {
            Error::Handler(e) => e.into(),
            Error::Replayed(e) => e.into(),
            Error::Idempotency(e) => e.into(),
        }
    }
}
