#[cfg(feature = "outbox")]
use super::OutboxStore;
use super::{
    check_limits, BoxFuture, IdempotencyStore, OutboxRecord, StepJournal, StepRecord, StoreError,
};
use crate::record::IdempotencyRecord;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// An in-process store with the same conditional semantics as [`DynamoDbStore`](super::DynamoDbStore).
///
/// For unit tests, the quickstart, and single-process tools. It is not shared
/// between Lambda execution environments, so it does not protect against
/// duplicates delivered to different instances. Clones share the same records.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    tables: Arc<Mutex<Tables>>,
    /// Unique to the store and shared by its clones: its [`location`](IdempotencyStore::location).
    id: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        // A counter, not the tables' address: a later store may be allocated at
        // the address of a dropped one and would inherit its claims.
        static STORES: AtomicU64 = AtomicU64::new(0);
        Self {
            tables: Arc::default(),
            id: STORES.fetch_add(1, Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default)]
struct Tables {
    records: HashMap<String, IdempotencyRecord>,
    steps: HashMap<String, StepRecord>,
    outbox: HashMap<String, OutboxRecord>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of idempotency records held, expired ones included (steps and
    /// outbox records not counted).
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Whether the store holds no idempotency record.
    pub fn is_empty(&self) -> bool {
        self.lock().records.is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock cannot leave half-written tables: every
        // critical section checks first, then inserts or removes.
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl MemoryStore {
    /// Replaces an owned record (and adds its outbox) if it fits DynamoDB's limits.
    ///
    /// With the `compress-responses` feature a record fits when its response,
    /// gzip-compressed, would fit, as `DynamoDbStore` would store it (the text is
    /// kept as it is: only its size is measured). There is no S3 form here: a
    /// response that does not fit even compressed is refused with
    /// [`StoreError::TooLarge`], as by a `DynamoDbStore` without a response bucket.
    fn commit_now(
        &self,
        record: &IdempotencyRecord,
        outbox: &[OutboxRecord],
    ) -> Result<(), StoreError> {
        let outbox_sizes = || outbox.iter().map(OutboxRecord::approximate_size);
        if let Err(too_large) = check_limits(record.approximate_size(), outbox_sizes()) {
            let compressed = compressed_size(record);
            if compressed.is_none_or(|size| check_limits(size, outbox_sizes()).is_err()) {
                return Err(too_large);
            }
        }
        self.replace_owned(record, outbox)
    }

    fn replace_owned(
        &self,
        record: &IdempotencyRecord,
        outbox: &[OutboxRecord],
    ) -> Result<(), StoreError> {
        let mut tables = self.lock();
        match tables.records.get(&record.key) {
            Some(current) if current.owner == record.owner => {
                tables.records.insert(record.key.clone(), record.clone());
                for message in outbox {
                    tables.outbox.insert(message.key.clone(), message.clone());
                }
                Ok(())
            }
            _ => Err(StoreError::NotOwner),
        }
    }
}

/// The record's size as `DynamoDbStore` would store it gzip-compressed
/// (`data_encoding` = `gzip`, the compressed bytes in place of the text); `None`
/// without the `compress-responses` feature or a response.
fn compressed_size(record: &IdempotencyRecord) -> Option<usize> {
    #[cfg(feature = "compress-responses")]
    return record.data.as_ref().map(|data| {
        record.approximate_size() - data.len()
            + "data_encoding".len()
            + "gzip".len()
            + super::large::gzip(data.as_bytes()).len()
    });
    #[cfg(not(feature = "compress-responses"))]
    {
        let _ = record;
        None
    }
}

impl IdempotencyStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        Ok(self.lock().records.get(key).cloned())
    }

    async fn reserve(
        &self,
        record: &IdempotencyRecord,
        now_ms: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let mut tables = self.lock();
        if let Some(existing) = tables.records.get(&record.key)
            && !existing.may_be_replaced_by(record, now_ms)
        {
            return Err(StoreError::Exists {
                existing: Some(Box::new(existing.clone())),
            });
        }
        Ok(tables.records.insert(record.key.clone(), record.clone()))
    }

    async fn complete(&self, record: &IdempotencyRecord) -> Result<(), StoreError> {
        self.commit_now(record, &[])
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        let mut tables = self.lock();
        match tables.records.get(key) {
            Some(current) if current.owner != owner => Err(StoreError::NotOwner),
            _ => {
                tables.records.remove(key);
                Ok(())
            }
        }
    }

    /// Its own records: clones share them, other memory stores do not.
    fn location(&self) -> String {
        format!("memory:{}", self.id)
    }

    fn journal(&self) -> Option<&dyn StepJournal> {
        Some(self)
    }

    #[cfg(feature = "outbox")]
    fn outbox(&self) -> Option<&dyn OutboxStore> {
        Some(self)
    }
}

impl StepJournal for MemoryStore {
    fn put_step<'a>(
        &'a self,
        step: &'a StepRecord,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>> {
        let mut tables = self.lock();
        let journaled = tables
            .steps
            .entry(step.key.clone())
            .or_insert_with(|| step.clone());
        let first = (journaled != step).then(|| journaled.clone());
        Box::pin(std::future::ready(Ok(first)))
    }

    fn get_step<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>> {
        let step = self.lock().steps.get(key).cloned();
        Box::pin(std::future::ready(Ok(step)))
    }
}

#[cfg(feature = "outbox")]
impl OutboxStore for MemoryStore {
    fn commit<'a>(
        &'a self,
        record: &'a IdempotencyRecord,
        outbox: &'a [OutboxRecord],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(std::future::ready(self.commit_now(record, outbox)))
    }

    fn get_outbox<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<OutboxRecord>, StoreError>> {
        let record = self.lock().outbox.get(key).cloned();
        Box::pin(std::future::ready(Ok(record)))
    }

    fn mark_delivered<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        if let Some(record) = self.lock().outbox.get_mut(key) {
            record.delivered = true;
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn pending_outbox(&self) -> BoxFuture<'_, Result<Vec<OutboxRecord>, StoreError>> {
        let mut pending: Vec<_> = self
            .lock()
            .outbox
            .values()
            .filter(|r| !r.delivered)
            .cloned()
            .collect();
        pending.sort_by(|a, b| a.key.cmp(&b.key));
        Box::pin(std::future::ready(Ok(pending)))
    }
}
