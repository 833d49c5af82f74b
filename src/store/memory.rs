use super::{IdempotencyStore, StoreError};
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
    records: Arc<Mutex<HashMap<String, IdempotencyRecord>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records held, expired ones included.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, IdempotencyRecord>> {
        // A panic while holding the lock cannot leave a half-written map: every
        // critical section is a single insert or remove.
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl IdempotencyStore for MemoryStore {
    async fn reserve(&self, record: &IdempotencyRecord, now_ms: i64) -> Result<(), StoreError> {
        let mut records = self.lock();
        if let Some(existing) = records.get(&record.key) {
            if !existing.can_be_taken_over(now_ms) {
                return Err(StoreError::Exists {
                    existing: Some(Box::new(existing.clone())),
                });
            }
        }
        records.insert(record.key.clone(), record.clone());
        Ok(())
    }

    async fn complete(&self, record: &IdempotencyRecord) -> Result<(), StoreError> {
        let mut records = self.lock();
        match records.get(&record.key) {
            Some(current) if current.owner == record.owner => {
                records.insert(record.key.clone(), record.clone());
                Ok(())
            }
            _ => Err(StoreError::NotOwner),
        }
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        let mut records = self.lock();
        match records.get(key) {
            Some(current) if current.owner == owner => {
                records.remove(key);
                Ok(())
            }
            _ => Err(StoreError::NotOwner),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        Ok(self.lock().get(key).cloned())
    }
}
