//! Where idempotency records live: the store contracts and their two
//! implementations, [`DynamoDbStore`] and [`MemoryStore`].
//!
//! Three contracts, each with its own rules, so that a backend can offer records
//! without the rest:
//!
//! - [`IdempotencyStore`]: the records. Every backend implements it; it is all a
//!   wrapped handler needs. Its batch operations (`reserve_batch`,
//!   `complete_batch`, `release_batch`) let a backend serve an SQS or stream
//!   batch in a few requests; their defaults call the single-record ones.
//! - [`StepJournal`]: the results of a handler's steps, so a retry does not redo
//!   them ([`Effects::step`](crate::Effects::step)).
//! - [`OutboxStore`]: messages committed with the completed record and delivered
//!   after it (`Outbox::push` and the `Relay`, feature `outbox`).
//!
//! - `TransactionStore` (feature `atomic-writes`): the completed record, the
//!   outbox and the handler's staged DynamoDB writes in one transaction
//!   (`Effects::writes`). Its methods take the AWS SDK's own types, so it stays
//!   apart from the generic contracts above.
//!
//! A store offers the others through [`IdempotencyStore::journal`],
//! [`IdempotencyStore::outbox`] and `IdempotencyStore::transactions`; without
//! them a step, a staged message or a staged write fails with
//! [`IdempotencyError::Unsupported`](crate::IdempotencyError::Unsupported).

mod dynamodb;
mod large;
mod memory;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::RedisStore;
pub use dynamodb::{AttributeNames, DynamoDbStore, KeyLayout};
pub use memory::MemoryStore;

use crate::error::BoxError;
use crate::record::{IdempotencyRecord, MAX_ITEM_BYTES};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use futures_util::future::join_all;
use std::future::Future;
use std::pin::Pin;

/// A boxed future: what the [`StepJournal`], [`OutboxStore`] and
/// `Sink` methods return, so that they can be used as `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a store refused or failed an operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The conditional write found a live record. `existing` is that record when the
    /// store returned it (DynamoDB does, with `ReturnValuesOnConditionCheckFailure`).
    #[error("a live record exists for this key")]
    Exists {
        /// The record that blocked the reservation.
        existing: Option<Box<IdempotencyRecord>>,
    },
    /// The record is owned by another reservation's token.
    #[error("the record is not owned by this invocation")]
    NotOwner,
    /// The write exceeds the store's limits (an item over 400 KB, a transaction
    /// over 100 items or 4 MB on DynamoDB). Nothing was written.
    #[error("{items} items of {bytes} bytes exceed the store's limit ({limit})")]
    TooLarge {
        /// Items in the write (the record, plus outbox messages).
        items: usize,
        /// Their total size in bytes, as the store counts it.
        bytes: usize,
        /// Which limit was exceeded.
        limit: &'static str,
    },
    /// The store holds an item under this key that is not a valid record (written
    /// by something else, or edited by hand): a wrong attribute type, a missing
    /// attribute, an unknown status.
    #[error("malformed idempotency record {key}: attribute {attribute:?} {problem}")]
    Malformed {
        /// The item's key.
        key: String,
        /// The attribute at fault.
        attribute: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The transaction was cancelled because the conditions of these staged
    /// writes failed (indexes into the writes given to
    /// [`TransactionStore::commit_transaction`], ascending). Nothing was written.
    #[cfg(feature = "atomic-writes")]
    #[cfg_attr(docsrs, doc(cfg(feature = "atomic-writes")))]
    #[error("the conditions of staged writes {indexes:?} failed")]
    WriteConditionFailed {
        /// The failed writes' indexes.
        indexes: Vec<usize>,
    },
    /// Anything else: network, throttling, permissions.
    #[error(transparent)]
    Backend(BoxError),
}

impl From<StoreError> for crate::IdempotencyError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Backend(source) => Self::Store(source),
            StoreError::Malformed {
                key,
                attribute,
                problem,
            } => Self::MalformedRecord {
                key,
                attribute,
                problem,
            },
            other => Self::Store(Box::new(other)),
        }
    }
}

/// A completed step of a handler, journaled so that a retry replays it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// `{idempotency key}#{execution}#step#{position}`: a journal belongs to one execution.
    pub key: String,
    /// The step's name, checked on replay.
    pub name: String,
    /// The step's result as JSON.
    pub data: String,
    /// Epoch seconds, the same TTL as the invocation's record.
    pub expiration: i64,
}

/// An external effect staged by a handler, committed with its completed record.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    /// `{idempotency key}#{execution}#outbox#{index}`.
    pub key: String,
    /// The key the receiver dedupes on, stable across retries.
    pub derived_key: String,
    /// The `OutboxMessage` as JSON.
    pub message: String,
    /// Whether a dispatcher has delivered it.
    pub delivered: bool,
    /// Epoch seconds, the same TTL as the invocation's record.
    pub expiration: i64,
}

impl OutboxRecord {
    /// An upper bound of the record's size as DynamoDB counts it with the default
    /// attribute names.
    pub fn approximate_size(&self) -> usize {
        const NAMES_AND_NUMBERS: usize = 64;
        NAMES_AND_NUMBERS + self.key.len() + self.derived_key.len() + self.message.len()
    }
}

/// The records of idempotent invocations: the contract every backend implements
/// (a Redis or Postgres store would implement these four methods).
///
/// Every write is conditional and safe to repeat: a store (or its SDK) may retry a
/// write whose response was lost, and the engine recognises its own owner token
/// wherever it comes back. Expired records count as absent whether or not the
/// backend has deleted them yet.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Reads a record as stored, expired or not.
    fn get(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<IdempotencyRecord>, StoreError>> + Send;

    /// Writes the `INPROGRESS` `record`, atomically, only if the key is absent or
    /// the stored record [`may_be_replaced_by`](IdempotencyRecord::may_be_replaced_by)
    /// it at `now_ms`: of two concurrent reservations of a key at most one succeeds.
    /// An item under the key that is not a record (written by something else
    /// without a numeric expiration) is never replaced: it fails with
    /// [`StoreError::Malformed`] and is left as it is.
    /// Returns the record it replaced, if any (an expired record, or an abandoned
    /// attempt), when the backend can return it in the same request: the engine
    /// counts re-executions and takeovers with it.
    /// Otherwise fails with [`StoreError::Exists`], carrying the stored record when
    /// the backend can return it in the same request.
    fn reserve(
        &self,
        record: &IdempotencyRecord,
        now_ms: i64,
    ) -> impl Future<Output = Result<Option<IdempotencyRecord>, StoreError>> + Send;

    /// Replaces the stored record with `record` only if the stored one is owned by
    /// `record.owner`; otherwise [`StoreError::NotOwner`] and nothing is written.
    /// A record over the backend's item limit is refused with
    /// [`StoreError::TooLarge`] before anything is sent.
    fn complete(
        &self,
        record: &IdempotencyRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes the record only if `owner` owns it; a record already gone is not an
    /// error (a repeated delete). Another owner's record: [`StoreError::NotOwner`].
    fn release(
        &self,
        key: &str,
        owner: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reserves each of `records` as [`reserve`](Self::reserve) would, answering
    /// for each in order; what a batch of SQS or stream records asks for before
    /// they run, so that a backend can reserve them in one request.
    ///
    /// A backend's batched write may do less than `reserve`: it may refuse a
    /// record that `reserve` would replace (an expired record, an abandoned
    /// attempt), with [`StoreError::Exists`] and the record in the way. The
    /// engine then reserves that record alone, with `reserve`. It never does
    /// more: a live record is never replaced. The records' keys are distinct.
    ///
    /// The default calls `reserve` for every record at once (on one multiplexed
    /// connection, such as the Redis store's, the calls go out together).
    fn reserve_batch(
        &self,
        records: &[IdempotencyRecord],
        now_ms: i64,
    ) -> impl Future<Output = Vec<Result<Option<IdempotencyRecord>, StoreError>>> + Send {
        join_all(
            records
                .iter()
                .map(move |record| self.reserve(record, now_ms)),
        )
    }

    /// Completes each of `records` as [`complete`](Self::complete) would (only
    /// under its owner token), answering for each in order: a batch's completed
    /// records, written together once its records have run. The records' keys
    /// are distinct.
    ///
    /// The default calls `complete` for every record at once.
    fn complete_batch(
        &self,
        records: &[IdempotencyRecord],
    ) -> impl Future<Output = Vec<Result<(), StoreError>>> + Send {
        join_all(records.iter().map(|record| self.complete(record)))
    }

    /// Releases each `(key, owner)` as [`release`](Self::release) would,
    /// answering for each in order: the reservations of a batch's records that
    /// did not run (an earlier record of their FIFO group or shard failed).
    ///
    /// The default calls `release` for every reservation at once.
    fn release_batch(
        &self,
        reservations: &[(String, String)],
    ) -> impl Future<Output = Vec<Result<(), StoreError>>> + Send {
        join_all(
            reservations
                .iter()
                .map(|(key, owner)| self.release(key, owner)),
        )
    }

    /// Where this store keeps its records: stores with the same location read and
    /// write the same records (clones of one [`MemoryStore`]; [`DynamoDbStore`]s on
    /// one table, or on one partition of a shared table). Wrapping a handler under
    /// the default key prefix claims that prefix at this location for the whole
    /// process, so that two `Idempotency` values over the same records cannot give
    /// it to two different handlers, one replaying the other's responses
    /// ([`ConfigError::SharedKeyPrefix`](crate::ConfigError::SharedKeyPrefix)).
    ///
    /// The default, the store's type name, counts every store of the type as one
    /// location: never too lenient, but in a process that wraps different handlers
    /// under the default prefix over several stores of the type that keep their
    /// records apart (tests, each with a store of its own), the second is refused.
    /// Override it with what tells them apart (the table, the database); a store
    /// wrapping another returns the inner store's.
    fn location(&self) -> String {
        std::any::type_name::<Self>().to_owned()
    }

    /// This store's step journal, if it keeps one (`Some(self)`).
    fn journal(&self) -> Option<&dyn StepJournal> {
        None
    }

    /// This store's outbox, if it keeps one (`Some(self)`).
    fn outbox(&self) -> Option<&dyn OutboxStore> {
        None
    }

    /// This store's transactions with business writes, if it offers them
    /// (`Some(self)`; [`DynamoDbStore`] does, [`MemoryStore`] does not).
    #[cfg(feature = "atomic-writes")]
    #[cfg_attr(docsrs, doc(cfg(feature = "atomic-writes")))]
    fn transactions(&self) -> Option<&dyn TransactionStore> {
        None
    }
}

/// The completed record, its outbox and the handler's staged writes to any
/// DynamoDB table of the account, in one transaction (feature `atomic-writes`).
///
/// A separate, optional contract: its writes are the AWS SDK's
/// [`TransactWriteItem`](aws_sdk_dynamodb::types::TransactWriteItem)s, which only
/// a DynamoDB-backed store can commit atomically with its records.
#[cfg(feature = "atomic-writes")]
#[cfg_attr(docsrs, doc(cfg(feature = "atomic-writes")))]
pub trait TransactionStore: Send + Sync {
    /// Does what [`OutboxStore::commit`] does and applies `writes` in the same
    /// atomic write: all or nothing. The record's condition (ownership) failing
    /// gives [`StoreError::NotOwner`]; a write's own condition failing gives
    /// [`StoreError::WriteConditionFailed`] with the indexes of the failed
    /// writes; a transaction over the limits (100 items, 4 MB, 400 KB per item,
    /// record and outbox included) is refused with [`StoreError::TooLarge`]
    /// before anything is sent. With no writes, exactly [`OutboxStore::commit`].
    ///
    /// A retry of the same call (same record owner, same number of writes) must
    /// not apply the writes twice: DynamoDB's `ClientRequestToken` does that for
    /// [`DynamoDbStore`].
    fn commit_transaction<'a>(
        &'a self,
        record: &'a IdempotencyRecord,
        outbox: &'a [OutboxRecord],
        writes: &'a [aws_sdk_dynamodb::types::TransactWriteItem],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The `writes` alone in one transaction, for a call that runs unprotected
    /// (idempotency disabled, or no key material in lenient mode): all or
    /// nothing, [`StoreError::WriteConditionFailed`] when conditions fail,
    /// [`StoreError::TooLarge`] over the limits.
    fn commit_writes<'a>(
        &'a self,
        writes: &'a [aws_sdk_dynamodb::types::TransactWriteItem],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// The journal of a handler's completed steps, one entry per step of an execution.
pub trait StepJournal: Send + Sync {
    /// Writes `step` only if no entry exists under its key. The first entry wins:
    /// returns the stored entry when it is not `step` (a late attempt of the same
    /// execution journaled first), `None` when `step` is (now) the entry.
    fn put_step<'a>(
        &'a self,
        step: &'a StepRecord,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>>;

    /// Reads a journaled step.
    fn get_step<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>>;
}

/// Outbox messages, committed atomically with the completed record that staged
/// them and marked once delivered.
pub trait OutboxStore: Send + Sync {
    /// Does what [`IdempotencyStore::complete`] does and writes the `outbox`
    /// records in the same atomic write: all or nothing, the whole write
    /// conditional on `record.owner` owning the stored record
    /// ([`StoreError::NotOwner`] otherwise). A write over the backend's item or
    /// transaction limits is refused with [`StoreError::TooLarge`] before anything
    /// is sent.
    fn commit<'a>(
        &'a self,
        record: &'a IdempotencyRecord,
        outbox: &'a [OutboxRecord],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Reads an outbox record.
    fn get_outbox<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<OutboxRecord>, StoreError>>;

    /// Marks an outbox record delivered if it still exists (never recreating one
    /// that expired). Marking twice is harmless: delivery is at least once.
    fn mark_delivered<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Every outbox record not yet delivered (for the operator's sweep).
    fn pending_outbox(&self) -> BoxFuture<'_, Result<Vec<OutboxRecord>, StoreError>>;
}

/// DynamoDB's limits on one write: an item, and a transaction of the record and
/// its outbox. Both built-in stores enforce them, so that what passes a test on
/// the memory store also fits the table.
fn check_limits(
    record_bytes: usize,
    outbox_bytes: impl IntoIterator<Item = usize>,
) -> Result<(), StoreError> {
    const MAX_ITEMS: usize = 100;
    const MAX_TRANSACTION_BYTES: usize = 4 * 1024 * 1024;
    let (mut items, mut bytes, mut largest) = (1, record_bytes, record_bytes);
    for size in outbox_bytes {
        items += 1;
        bytes += size;
        largest = largest.max(size);
    }
    let limit = if items > MAX_ITEMS {
        "100 items per transaction"
    } else if largest > MAX_ITEM_BYTES {
        "400 KB per item"
    } else if bytes > MAX_TRANSACTION_BYTES {
        "4 MB per transaction"
    } else {
        return Ok(());
    };
    Err(StoreError::TooLarge {
        items,
        bytes,
        limit,
    })
}

/// What an AWS service said, `code: message`: the SDK's own `Display` says only
/// "service error". Here rather than in one client's module because the
/// DynamoDB store, the S3 response bucket (`large`) and versioned writes all
/// report through it (the S3 client's `SdkError` is the same type).
pub(crate) fn sdk_detail<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match (err.code(), err.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(err).to_string(),
    }
}
