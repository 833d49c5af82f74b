//! Where idempotency records live: the [`IdempotencyStore`] trait and its two
//! implementations, [`DynamoDbStore`] and [`MemoryStore`].

mod dynamodb;
mod memory;

pub use dynamodb::{AttributeNames, DynamoDbStore, KeyLayout};
pub use memory::MemoryStore;

use crate::record::IdempotencyRecord;
use aws_sdk_dynamodb::error::BoxError;
use std::future::Future;

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
    /// Anything else: network, throttling, permissions, a malformed stored item.
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
    /// The [`OutboxMessage`](crate::OutboxMessage) as JSON.
    pub message: String,
    /// Whether a dispatcher has delivered it.
    pub delivered: bool,
    /// Epoch seconds, the same TTL as the invocation's record.
    pub expiration: i64,
}

/// An async store of idempotency records with conditional writes.
///
/// Every write is conditional and safe to repeat: a store (or its SDK) may retry a
/// write whose response was lost, and the engine recognises its own owner token
/// wherever it comes back.
///
/// Implementations must make [`reserve`](Self::reserve) atomic: of two concurrent
/// reservations of the same key, at most one succeeds.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Writes the `INPROGRESS` `record` if the key is absent or the stored record
    /// [`may_be_replaced_by`](IdempotencyRecord::may_be_replaced_by) it at `now_ms`;
    /// otherwise fails with [`StoreError::Exists`] carrying the stored record.
    fn reserve(
        &self,
        record: &IdempotencyRecord,
        now_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Replaces the record with `record` if `record.owner` still owns it, and writes
    /// the `outbox` records in the same atomic write; otherwise
    /// [`StoreError::NotOwner`] and nothing is written.
    fn complete(
        &self,
        record: &IdempotencyRecord,
        outbox: &[OutboxRecord],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes the record if `owner` still owns it; a record already gone is not an
    /// error (a repeated delete). Another owner's record: [`StoreError::NotOwner`].
    fn release(
        &self,
        key: &str,
        owner: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads a record as stored, expired or not (diagnostics and tests).
    fn get(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<IdempotencyRecord>, StoreError>> + Send;

    /// Journals a completed step unless an entry exists under its key. The first
    /// entry wins: returns it when it was not this one (a late attempt of the same
    /// execution journaled first), so the caller goes on with the journaled result.
    fn put_step(
        &self,
        step: &StepRecord,
    ) -> impl Future<Output = Result<Option<StepRecord>, StoreError>> + Send;

    /// Reads a journaled step.
    fn get_step(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<StepRecord>, StoreError>> + Send;

    /// Reads an outbox record.
    fn get_outbox(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<OutboxRecord>, StoreError>> + Send;

    /// Marks an outbox record delivered.
    fn mark_delivered(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every outbox record not yet delivered (for the operator's sweep).
    fn pending_outbox(&self) -> impl Future<Output = Result<Vec<OutboxRecord>, StoreError>> + Send;

    /// The size this record would have as stored, to refuse oversized responses
    /// before writing them.
    fn item_size(&self, record: &IdempotencyRecord) -> usize {
        record.approximate_size()
    }

    /// The size an outbox record would have as stored (DynamoDB's 4 MB transaction limit).
    fn outbox_size(&self, record: &OutboxRecord) -> usize {
        record.key.len() + record.derived_key.len() + record.message.len() + 64
    }
}
