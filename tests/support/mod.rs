//! Shared test helpers. Each test binary uses a part of them.
#![allow(dead_code)]

pub mod events;
pub mod localstack;
pub mod payments;

use lambda_idempotency::store::{OutboxRecord, StepRecord, StoreError};
use lambda_idempotency::{IdempotencyRecord, IdempotencyStore};
use lambda_runtime::Context;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A Lambda context whose deadline is `ms_from_now` away (negative: already past).
pub fn context(ms_from_now: i64) -> Context {
    let mut ctx = Context::default();
    ctx.deadline = (now_ms() + ms_from_now) as u64;
    ctx.request_id = format!("req-{}", now_ms());
    ctx
}

/// Counts handler executions.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    pub fn reset(&self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

/// A store that counts the calls it forwards, and fails the operations named in
/// `fail` ("reserve", "complete", "release", "get").
#[derive(Clone)]
pub struct CountingStore<S> {
    pub inner: S,
    pub calls: Counter,
    pub fail: &'static [&'static str],
}

impl<S> CountingStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            calls: Counter::default(),
            fail: &[],
        }
    }
    pub fn failing(inner: S, fail: &'static [&'static str]) -> Self {
        Self {
            inner,
            calls: Counter::default(),
            fail,
        }
    }
    fn hit(&self, operation: &str) -> Result<(), StoreError> {
        self.calls.hit();
        if self.fail.contains(&operation) {
            return Err(StoreError::Backend(
                format!("injected store failure in {operation}").into(),
            ));
        }
        Ok(())
    }
}

impl<S: IdempotencyStore> IdempotencyStore for CountingStore<S> {
    async fn reserve(&self, record: &IdempotencyRecord, now_ms: i64) -> Result<bool, StoreError> {
        self.hit("reserve")?;
        self.inner.reserve(record, now_ms).await
    }
    async fn complete(
        &self,
        record: &IdempotencyRecord,
        outbox: &[OutboxRecord],
    ) -> Result<(), StoreError> {
        self.hit("complete")?;
        self.inner.complete(record, outbox).await
    }
    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        self.hit("release")?;
        self.inner.release(key, owner).await
    }
    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.hit("get")?;
        self.inner.get(key).await
    }
    async fn put_step(&self, step: &StepRecord) -> Result<(), StoreError> {
        self.hit("put_step")?;
        self.inner.put_step(step).await
    }
    async fn get_step(&self, key: &str) -> Result<Option<StepRecord>, StoreError> {
        self.hit("get_step")?;
        self.inner.get_step(key).await
    }
    async fn get_outbox(&self, key: &str) -> Result<Option<OutboxRecord>, StoreError> {
        self.hit("get_outbox")?;
        self.inner.get_outbox(key).await
    }
    async fn mark_delivered(&self, key: &str) -> Result<(), StoreError> {
        self.hit("mark_delivered")?;
        self.inner.mark_delivered(key).await
    }
    async fn pending_outbox(&self) -> Result<Vec<OutboxRecord>, StoreError> {
        self.hit("pending_outbox")?;
        self.inner.pending_outbox().await
    }
    fn item_size(&self, record: &IdempotencyRecord) -> usize {
        self.inner.item_size(record)
    }
    fn outbox_size(&self, record: &OutboxRecord) -> usize {
        self.inner.outbox_size(record)
    }
}
