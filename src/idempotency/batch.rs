//! One SQS or stream batch's store requests, gathered: before its records run,
//! the keys of all of them are reserved in one request
//! ([`IdempotencyStore::reserve_batch`]); as they complete, their completed
//! records wait, and once the batch has run they are written in one request
//! ([`IdempotencyStore::complete_batch`]), with the reservations of records that
//! did not run released in another ([`IdempotencyStore::release_batch`]).
//!
//! Each record still runs through [`Idempotency::execute`]: its call finds the
//! store's answer to its reservation here instead of asking, and decides on it
//! as on its own (a completed record replays, a live one refuses or waits, an
//! expired or abandoned one is reserved alone, resuming its execution). Only a
//! plain completion waits for the batch: one with outbox messages or staged
//! writes, or over an item's size, is written when its handler returns.
//!
//! What waiting costs: a process that dies after a handler returned and before
//! the batch's completions were written leaves those records in progress until
//! their deadline (the Lambda deadline). The redelivered records then take them
//! over and run again, resuming their executions: journaled steps replay, with
//! the same derived keys, and a record's outbox is only ever written with it.

use super::{expiration_s, new_reservation, now_ms, CallKey, Idempotency};
use crate::flight::Flights;
use crate::key::JsonPath;
use crate::record::{IdempotencyRecord, MAX_ITEM_BYTES};
use crate::store::{IdempotencyStore, StoreError};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

/// A batch's shared state, made by [`Idempotency::begin_batch`].
pub(crate) struct Batch {
    /// Its records' calls in flight by key: a later record of the batch with an
    /// earlier one's key waits for it, and replays it.
    pub(crate) flights: Flights,
    /// Each record's key material and validation hashes, by position, when the
    /// record has key material (a record without is refused or runs
    /// unprotected in its call, as it would alone).
    derived: Vec<Option<(String, Option<String>)>>,
    /// The key prefix of the batch's records.
    scope: String,
    /// The reservations asked for before the records ran, by key: taken by the
    /// first call of the key.
    prepared: Mutex<HashMap<String, Prepared>>,
    /// Completed records whose write waits for the end of the batch; `None`
    /// when completions are written at once.
    deferred: Option<Mutex<Vec<IdempotencyRecord>>>,
}

/// A reservation asked for before its record ran, and the store's answer.
pub(crate) struct Prepared {
    pub(crate) record: IdempotencyRecord,
    pub(crate) answer: Result<Option<IdempotencyRecord>, StoreError>,
}

impl Batch {
    /// The key source of the record at `index`: its hashes, when derived here.
    pub(crate) fn call_key<'a>(&'a self, index: usize, default: &'a JsonPath) -> CallKey<'a> {
        match self.derived.get(index).and_then(Option::as_ref) {
            Some((material, validation)) => CallKey::Derived {
                material,
                validation: validation.as_deref(),
            },
            None => CallKey::SourceDefault(default),
        }
    }

    /// The record key of the record at `index`, when it has one.
    pub(crate) fn key_of(&self, index: usize) -> Option<String> {
        let (material, _) = self.derived.get(index)?.as_ref()?;
        Some(format!("{}#{material}", self.scope))
    }

    /// The reservation prepared for `key`, for the first call of the key.
    pub(crate) fn take(&self, key: &str) -> Option<Prepared> {
        lock(&self.prepared).remove(key)
    }

    /// Keeps `record`'s completion for the end of the batch, if completions
    /// wait and it fits an item; `false`: write it now.
    pub(crate) fn defer(&self, record: &IdempotencyRecord) -> bool {
        match &self.deferred {
            Some(deferred) if record.approximate_size() <= MAX_ITEM_BYTES => {
                lock(deferred).push(record.clone());
                true
            }
            _ => false,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section pushes or removes whole entries.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<S: IdempotencyStore> Idempotency<S> {
    /// Derives the keys of a batch's `records` and, when the batch has two or
    /// more keys to reserve (not in the local cache), reserves them in one
    /// request. Batched requests are off with `batch_requests(false)`, in
    /// observe-only mode (which must not change what the store is asked) and
    /// when idempotency is disabled.
    pub(crate) async fn begin_batch<T: Serialize + 'static>(
        &self,
        scope: &str,
        deadline_ms: i64,
        records: &[T],
        default_key: &JsonPath,
    ) -> Batch {
        let config = &self.inner.config;
        let batched = config.batch_requests && !config.observe_only && !config.disabled;
        let derived: Vec<_> = match batched {
            true => records
                .iter()
                .map(|record| self.key_material(record, Some(default_key)).ok().flatten())
                .collect(),
            false => Vec::new(),
        };
        let mut batch = Batch {
            flights: Flights::for_batch(),
            derived,
            scope: scope.to_owned(),
            prepared: Mutex::default(),
            deferred: batched.then(Mutex::default),
        };
        let now = now_ms();
        let holds_until = self.reservation_deadline(Some(deadline_ms), now);
        let mut keys = HashSet::new();
        let mut reservations = Vec::new();
        for index in 0..batch.derived.len() {
            let Some(key) = batch.key_of(index) else {
                continue;
            };
            if self.cached(&key, now).is_some() || !keys.insert(key.clone()) {
                continue;
            }
            let Some((_, validation)) = &batch.derived[index] else {
                continue;
            };
            let expiration = expiration_s(now, config);
            reservations.push(new_reservation(
                key,
                validation.clone(),
                expiration,
                holds_until,
            ));
        }
        // One key alone costs one request either way, and is reserved by its call.
        if reservations.len() < 2 {
            return batch;
        }
        let answers = self.inner.store.reserve_batch(&reservations, now).await;
        let prepared = batch.prepared.get_mut().unwrap_or_else(|p| p.into_inner());
        for (record, answer) in reservations.into_iter().zip(answers) {
            prepared.insert(record.key.clone(), Prepared { record, answer });
        }
        batch
    }

    /// Ends a batch: writes the completions that waited and releases the
    /// reservations of records that did not run. Returns the positions of the
    /// records whose completion was not written, which fail (their responses
    /// are dropped from the local cache; their reservations stay until their
    /// deadline, then a redelivery resumes them), with every other record of
    /// their key.
    pub(crate) async fn finish_batch(&self, batch: Batch) -> BTreeSet<usize> {
        let deferred = batch
            .deferred
            .map(|d| d.into_inner().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or_default();
        let unused: Vec<(String, String)> = batch
            .prepared
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_values()
            .filter(|prepared| prepared.answer.is_ok())
            .map(|prepared| (prepared.record.key, prepared.record.owner))
            .collect();
        let store = &self.inner.store;
        let (completed, released) = futures_util::future::join(
            async {
                match deferred.is_empty() {
                    true => Vec::new(),
                    false => store.complete_batch(&deferred).await,
                }
            },
            async {
                match unused.is_empty() {
                    true => Vec::new(),
                    false => store.release_batch(&unused).await,
                }
            },
        )
        .await;
        let mut failed = HashSet::new();
        for (record, result) in deferred.iter().zip(completed) {
            let Err(err) = result else { continue };
            self.forget(&record.key);
            match err {
                StoreError::NotOwner => tracing::error!(
                    key = %record.key,
                    "reservation expired and was taken over before the batch's completions were written; the late result was not stored"
                ),
                err => tracing::warn!(
                    key = %record.key,
                    error = %err,
                    "could not store the response; the record fails and its reservation expires at its deadline"
                ),
            }
            failed.insert(record.key.clone());
        }
        for ((key, _), result) in unused.iter().zip(released) {
            if let Err(err) = result {
                tracing::warn!(%key, error = %err, "could not release the reservation of a record that did not run; it expires at its in-progress expiry");
            }
        }
        (0..batch.derived.len())
            .filter(|&index| {
                batch.derived[index].as_ref().is_some_and(|(material, _)| {
                    failed.contains(&format!("{}#{material}", batch.scope))
                })
            })
            .collect()
    }
}
