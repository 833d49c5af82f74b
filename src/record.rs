//! The stored state of one idempotency key.

/// Whether the key's handler is running or has finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// Reserved by an invocation that has not completed yet.
    InProgress,
    /// Finished; the record holds the response.
    Completed,
}

impl Status {
    /// The value stored in the `status` attribute (Powertools-compatible).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::InProgress => "INPROGRESS",
            Status::Completed => "COMPLETED",
        }
    }

    /// Parses a stored `status` value.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "INPROGRESS" => Some(Status::InProgress),
            "COMPLETED" => Some(Status::Completed),
            _ => None,
        }
    }
}

/// One idempotency record, as a store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyRecord {
    /// The full idempotency key, `{prefix}#{sha256}`.
    pub key: String,
    /// In progress or completed.
    pub status: Status,
    /// When the record stops counting, in epoch seconds (the TTL attribute).
    pub expiration: i64,
    /// When an in-progress reservation may be taken over, in epoch milliseconds.
    pub in_progress_expiration: Option<i64>,
    /// The serialized JSON response (completed records).
    pub data: Option<String>,
    /// Hash of the payload validation fields, when validation is on.
    pub validation: Option<String>,
    /// The reservation's owner token: completing or releasing requires it.
    pub owner: String,
    /// Whether `data` holds a stored [`PermanentError`](crate::PermanentError) rather than a response.
    pub is_error: bool,
    /// The execution this record belongs to: every attempt of one execution
    /// (a first run and the retries that resume it) carries the same id, and so
    /// do its journaled steps and outbox messages. A new execution of the key
    /// (after expiry, or after a completed record) gets a new id. Empty in
    /// records written by other tools.
    pub execution: String,
}

impl IdempotencyRecord {
    /// Expired records count as absent, whatever the store still holds
    /// (DynamoDB's TTL deletes items up to days late).
    pub fn is_expired(&self, now_ms: i64) -> bool {
        // Whole seconds, the same comparison the DynamoDB condition makes.
        self.expiration < now_ms.div_euclid(1000)
    }

    /// Whether this is an unfinished attempt whose in-progress expiry has passed:
    /// a retry may resume its execution.
    pub fn is_abandoned(&self, now_ms: i64) -> bool {
        self.status == Status::InProgress
            && self.in_progress_expiration.is_some_and(|at| at < now_ms)
    }

    /// Whether a store may replace this record with `new` at `now_ms`: the store's
    /// reservation condition, the same for every store.
    ///
    /// - an expired record counts as absent;
    /// - an unfinished attempt whose in-progress expiry has passed may be taken over
    ///   only by a reservation that resumes *its* execution (same `execution`), so
    ///   the journal follows the execution; records without an execution id (other
    ///   tools) may be taken over by any reservation;
    /// - a live completed record, or a live reservation, may not be replaced.
    ///
    /// Only a record is ever replaced: an item without a numeric `expiration`
    /// (written by something else; it never expires, and DynamoDB's TTL never
    /// deletes it) is none, whatever its status and deadline.
    /// [`DynamoDbStore`](crate::DynamoDbStore)'s condition requires the attribute
    /// to be a number before any of the rules above, so such an item is refused
    /// and reported as [`StoreError::Malformed`](crate::store::StoreError::Malformed).
    /// This method sees typed records, which always have one:
    /// [`MemoryStore`](crate::MemoryStore) cannot hold such an item, and a store
    /// of your own that can must refuse it before asking this method.
    pub fn may_be_replaced_by(&self, new: &IdempotencyRecord, now_ms: i64) -> bool {
        self.is_expired(now_ms)
            || (self.is_abandoned(now_ms)
                && (self.execution.is_empty() || self.execution == new.execution))
    }

    /// A conservative estimate of the record's DynamoDB item size: attribute names
    /// and values in UTF-8 bytes, numbers at their maximum of 21 bytes.
    pub fn approximate_size(&self) -> usize {
        const NAMES_AND_NUMBERS: usize = 128;
        NAMES_AND_NUMBERS
            + self.key.len()
            + self.status.as_str().len()
            + self.data.as_ref().map_or(0, String::len)
            + self.validation.as_ref().map_or(0, String::len)
            + self.owner.len()
            + self.execution.len()
    }
}

/// DynamoDB's maximum item size (400 KB).
pub const MAX_ITEM_BYTES: usize = 400 * 1024;
