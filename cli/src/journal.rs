//! What hangs off a record's execution: its journaled steps and outbox messages.

use lambda_idempotency::store::{OutboxRecord, StepRecord, StoreError};
use lambda_idempotency::{DynamoDbStore, IdempotencyRecord, OutboxStore, StepJournal};

/// How far the probes look (a handler with more steps than this is unheard of).
const MAX_ENTRIES: usize = 1000;

/// The execution's journaled steps, from position 0 up to the first gap
/// (`{key}#{execution}#step#{n}`: positions are consecutive, since a handler
/// reaches step n+1 only after step n returned). None for a record without an
/// execution id (written by another tool).
pub async fn steps(
    store: &DynamoDbStore,
    record: &IdempotencyRecord,
) -> Result<Vec<StepRecord>, StoreError> {
    let mut steps = Vec::new();
    if record.execution.is_empty() {
        return Ok(steps);
    }
    for position in 0..MAX_ENTRIES {
        let key = format!("{}#{}#step#{position}", record.key, record.execution);
        match store.get_step(&key).await? {
            Some(step) => steps.push(step),
            None => break,
        }
    }
    Ok(steps)
}

/// The compensations the execution journaled (a saga that failed permanently),
/// as (step position, entry): `{key}#{execution}#compensation#{n}`, `n` the
/// position of the step it undoes, so one probe per journaled step.
pub async fn compensations(
    store: &DynamoDbStore,
    record: &IdempotencyRecord,
    steps: usize,
) -> Result<Vec<(usize, StepRecord)>, StoreError> {
    let mut compensations = Vec::new();
    for position in 0..steps {
        let key = format!(
            "{}#{}#compensation#{position}",
            record.key, record.execution
        );
        if let Some(entry) = store.get_step(&key).await? {
            compensations.push((position, entry));
        }
    }
    Ok(compensations)
}

/// The execution's outbox messages (`{key}#{execution}#outbox#{n}`), delivered
/// or not.
pub async fn outbox(
    store: &DynamoDbStore,
    record: &IdempotencyRecord,
) -> Result<Vec<OutboxRecord>, StoreError> {
    let mut messages = Vec::new();
    if record.execution.is_empty() {
        return Ok(messages);
    }
    for index in 0..MAX_ENTRIES {
        let key = format!("{}#{}#outbox#{index}", record.key, record.execution);
        match store.get_outbox(&key).await? {
            Some(message) => messages.push(message),
            None => break,
        }
    }
    Ok(messages)
}
