//! Atomic business writes (feature `atomic-writes`): DynamoDB writes a handler
//! stages through [`Effects::writes`](crate::Effects::writes), committed in the
//! same `TransactWriteItems` as its completed record and its outbox.
//!
//! The invocation's [`Effects`](crate::Effects) hold a [`StagedWrites`] and
//! hand out [`Writes`] on it. This module does not know the effects: the
//! dependency runs one way, `effects` to `atomic`, as `effects` to `outbox`.

use crate::error::IdempotencyError;
use crate::outcome::{Event, Meter};
use crate::record::IdempotencyRecord;
use crate::store::{OutboxRecord, StoreError, TransactionStore};
use crate::versioned::VersionedWrite;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, Put, TransactWriteItem, Update,
};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// A write staged by a handler: the transaction item, and whether it is a
/// version-checked write (whose failed condition means "already current").
#[derive(Debug, Clone)]
pub(crate) struct StagedWrite {
    pub(crate) item: TransactWriteItem,
    pub(crate) versioned: bool,
}

/// The writes one invocation staged, in the order it staged them: an index into
/// them is what [`IdempotencyError::WriteConditionFailed`] reports.
#[derive(Debug, Default)]
pub(crate) struct StagedWrites {
    writes: Mutex<Vec<StagedWrite>>,
}

impl StagedWrites {
    /// The handle a handler stages writes through.
    pub(crate) fn writes(&self) -> Writes<'_> {
        Writes { staged: self }
    }

    /// The staged writes, emptying them.
    pub(crate) fn take(&self) -> Vec<StagedWrite> {
        std::mem::take(&mut self.lock())
    }

    /// Stages `write`; returns its index among the staged writes.
    fn push(&self, write: StagedWrite) -> usize {
        let mut writes = self.lock();
        writes.push(write);
        writes.len() - 1
    }

    /// The writes, even after a panic poisoned the lock, as for the rest of the
    /// invocation's state.
    fn lock(&self) -> MutexGuard<'_, Vec<StagedWrite>> {
        self.writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Stages DynamoDB writes committed with the invocation's completed record; see
/// [`Effects::writes`](crate::Effects::writes).
///
/// Each method returns the write's index among the staged writes, the `index` of
/// [`IdempotencyError::WriteConditionFailed`] if its condition fails.
pub struct Writes<'a> {
    staged: &'a StagedWrites,
}

impl std::fmt::Debug for Writes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writes").finish_non_exhaustive()
    }
}

impl Writes<'_> {
    /// Stages a `Put` (with its condition, if any) on any table.
    pub fn put(&self, put: Put) -> usize {
        self.stage(TransactWriteItem::builder().put(put).build(), false)
    }

    /// Stages an `Update` (with its condition, if any) on any table.
    pub fn update(&self, update: Update) -> usize {
        self.stage(TransactWriteItem::builder().update(update).build(), false)
    }

    /// Stages a `Delete` (with its condition, if any) on any table.
    pub fn delete(&self, delete: Delete) -> usize {
        self.stage(TransactWriteItem::builder().delete(delete).build(), false)
    }

    /// Stages a `ConditionCheck`: the transaction commits only if it holds.
    pub fn condition_check(&self, check: ConditionCheck) -> usize {
        self.stage(
            TransactWriteItem::builder().condition_check(check).build(),
            false,
        )
    }

    /// Stages a version-checked write. If the stored entity is already at its
    /// version or newer, the write is skipped and the rest commits (one more
    /// request): see [`VersionedWrite`].
    pub fn versioned(&self, write: VersionedWrite) -> usize {
        self.stage(write.to_transact_item(), true)
    }

    fn stage(&self, item: TransactWriteItem, versioned: bool) -> usize {
        self.staged.push(StagedWrite { item, versioned })
    }
}

/// Commits the record, the outbox and the staged writes. When the only failed
/// conditions are versioned writes' (their entities are already current), commits
/// again without them: at most once per such write, usually once. Other failed
/// conditions come back as [`StoreError::WriteConditionFailed`] with indexes into
/// `writes`.
///
/// `record` `None`: an unprotected call, the writes alone.
pub(crate) async fn commit(
    store: &dyn TransactionStore,
    record: Option<(&IdempotencyRecord, &[OutboxRecord])>,
    writes: &[StagedWrite],
    meter: &Meter,
) -> Result<(), StoreError> {
    // `positions[i]`: the index in `writes` of the i-th item sent.
    let mut positions: Vec<usize> = (0..writes.len()).collect();
    loop {
        let items: Vec<TransactWriteItem> =
            positions.iter().map(|&i| writes[i].item.clone()).collect();
        let committed = match record {
            Some((record, outbox)) => store.commit_transaction(record, outbox, &items).await,
            None => store.commit_writes(&items).await,
        };
        match committed {
            Err(StoreError::WriteConditionFailed { indexes }) => {
                let failed: Vec<usize> = indexes
                    .iter()
                    .filter_map(|&i| positions.get(i).copied())
                    .collect();
                if failed.is_empty() || failed.iter().any(|&i| !writes[i].versioned) {
                    return Err(StoreError::WriteConditionFailed { indexes: failed });
                }
                meter.event(Event::VersionedAlreadyCurrent, failed.len() as u64);
                tracing::debug!(
                    writes = failed.len(),
                    "versioned writes already current; committing without them"
                );
                positions.retain(|i| !failed.contains(i));
            }
            other => return other,
        }
    }
}

/// The typed error for a staged write whose condition failed: the first failed
/// write that is not an already-current versioned one.
pub(crate) fn condition_failed(
    key: String,
    writes: &[StagedWrite],
    indexes: &[usize],
) -> IdempotencyError {
    let index = indexes
        .iter()
        .copied()
        .find(|&i| writes.get(i).is_some_and(|w| !w.versioned))
        .or_else(|| indexes.first().copied())
        .unwrap_or_default();
    let (table, item) = writes
        .get(index)
        .map(|w| describe(&w.item))
        .unwrap_or_default();
    IdempotencyError::WriteConditionFailed {
        key,
        table,
        item,
        index,
    }
}

/// The table and the item of a write, as text: the key of an update, a delete or
/// a condition check; a put's whole item (the table's key schema is not known
/// here), cut at 256 characters.
fn describe(write: &TransactWriteItem) -> (String, String) {
    let (table, attributes) = if let Some(p) = write.put() {
        (p.table_name(), p.item())
    } else if let Some(u) = write.update() {
        (u.table_name(), u.key())
    } else if let Some(d) = write.delete() {
        (d.table_name(), d.key())
    } else if let Some(c) = write.condition_check() {
        (c.table_name(), c.key())
    } else {
        return (String::new(), String::new());
    };
    (table.to_owned(), render(attributes))
}

/// `{id: "o-1", n: 3}`, attributes in name order; sets, lists and maps abridged.
fn render(attributes: &HashMap<String, AttributeValue>) -> String {
    const MAX: usize = 256;
    let mut names: Vec<&String> = attributes.keys().collect();
    names.sort();
    let fields: Vec<String> = names
        .into_iter()
        .map(|name| {
            let value = match &attributes[name] {
                AttributeValue::S(s) => format!("{s:?}"),
                AttributeValue::N(n) => n.clone(),
                AttributeValue::Bool(b) => b.to_string(),
                AttributeValue::B(b) => format!("<{} bytes>", b.as_ref().len()),
                AttributeValue::Null(_) => "null".to_owned(),
                _ => "…".to_owned(),
            };
            format!("{name}: {value}")
        })
        .collect();
    let mut text = format!("{{{}}}", fields.join(", "));
    if text.chars().count() > MAX {
        text = text.chars().take(MAX - 1).collect::<String>() + "…";
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_described_by_its_table_and_key() {
        let delete = Delete::builder()
            .table_name("orders")
            .key("id", AttributeValue::S("o-1".into()))
            .key("n", AttributeValue::N("3".into()))
            .build()
            .expect("delete");
        let item = TransactWriteItem::builder().delete(delete).build();
        assert_eq!(
            describe(&item),
            ("orders".to_owned(), r#"{id: "o-1", n: 3}"#.to_owned())
        );
        let long: HashMap<_, _> = [("id".to_owned(), AttributeValue::S("x".repeat(1000)))].into();
        assert_eq!(render(&long).chars().count(), 256);
    }

    #[test]
    fn the_error_names_the_first_failed_write_that_is_not_versioned() {
        let check = |table: &str, versioned| StagedWrite {
            item: TransactWriteItem::builder()
                .condition_check(
                    ConditionCheck::builder()
                        .table_name(table)
                        .key("id", AttributeValue::S("a".into()))
                        .condition_expression("attribute_exists(id)")
                        .build()
                        .expect("check"),
                )
                .build(),
            versioned,
        };
        let writes = [check("t0", true), check("t1", false)];
        match condition_failed("k".into(), &writes, &[0, 1]) {
            IdempotencyError::WriteConditionFailed {
                key, table, index, ..
            } => assert_eq!((key.as_str(), table.as_str(), index), ("k", "t1", 1)),
            other => panic!("{other:?}"),
        }
    }
}
