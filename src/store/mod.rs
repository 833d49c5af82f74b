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
pub enum StoreError {
    /// The conditional write found a live record. `existing` is that record when the
    /// store returned it (DynamoDB does, with `ReturnValuesOnConditionCheckFailure`).
    #[error("a live record exists for this key")]
    Exists {
        /// The record that blocked the reservation.
        existing: Option<Box<IdempotencyRecord>>,
    },
    /// The record is no longer owned by the caller's token (or is gone).
    #[error("the record is not owned by this invocation")]
    NotOwner,
    /// Anything else: network, throttling, permissions, a malformed stored item.
    #[error(transparent)]
    Backend(BoxError),
}

/// An async store of idempotency records with conditional writes.
///
/// Implementations must make [`reserve`](Self::reserve) atomic: of two concurrent
/// reservations of the same absent key, exactly one succeeds.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Writes an `INPROGRESS` record if the key is absent, expired, or in progress
    /// past its in-progress expiry (all judged at `now_ms`); otherwise fails with
    /// [`StoreError::Exists`] carrying the live record.
    fn reserve(
        &self,
        record: &IdempotencyRecord,
        now_ms: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Replaces the record with its completed form if `record.owner` still owns it;
    /// otherwise [`StoreError::NotOwner`].
    fn complete(
        &self,
        record: &IdempotencyRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes the record if `owner` still owns it; otherwise [`StoreError::NotOwner`].
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

    /// The size this record would have as stored, to refuse oversized responses
    /// before writing them.
    fn item_size(&self, record: &IdempotencyRecord) -> usize {
        record.approximate_size()
    }
}
