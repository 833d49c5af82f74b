use super::{IdempotencyStore, OutboxRecord, StepRecord, StoreError};
use crate::record::IdempotencyRecord;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// An in-process store with the same conditional semantics as [`DynamoDbStore`](super::DynamoDbStore).
///
/// For unit tests, the quickstart, and single-process tools. It is not shared
/// between Lambda execution environments, so it does not protect against
/// duplicates delivered to different instances. Clones share the same records.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    tables: Arc<Mutex<Tables>>,
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

impl IdempotencyStore for MemoryStore {
    async fn reserve(&self, record: &IdempotencyRecord, now_ms: i64) -> Result<(), StoreError> {
        let mut tables = self.lock();
        if let Some(existing) = tables.records.get(&record.key) {
            if !existing.may_be_replaced_by(record, now_ms) {
                return Err(StoreError::Exists {
                    existing: Some(Box::new(existing.clone())),
                });
            }
        }
        tables.records.insert(record.key.clone(), record.clone());
        Ok(())
    }

    async fn complete(
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

    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        Ok(self.lock().records.get(key).cloned())
    }

    async fn put_step(&self, step: &StepRecord) -> Result<Option<StepRecord>, StoreError> {
        let mut tables = self.lock();
        let journaled = tables
            .steps
            .entry(step.key.clone())
            .or_insert_with(|| step.clone());
        Ok((journaled != step).then(|| journaled.clone()))
    }

    async fn get_step(&self, key: &str) -> Result<Option<StepRecord>, StoreError> {
        Ok(self.lock().steps.get(key).cloned())
    }

    async fn get_outbox(&self, key: &str) -> Result<Option<OutboxRecord>, StoreError> {
        Ok(self.lock().outbox.get(key).cloned())
    }

    async fn mark_delivered(&self, key: &str) -> Result<(), StoreError> {
        if let Some(record) = self.lock().outbox.get_mut(key) {
            record.delivered = true;
        }
        Ok(())
    }

    async fn pending_outbox(&self) -> Result<Vec<OutboxRecord>, StoreError> {
        let mut pending: Vec<_> = self
            .lock()
            .outbox
            .values()
            .filter(|r| !r.delivered)
            .cloned()
            .collect();
        pending.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(pending)
    }
}
