//! DynamoDB Streams and Kinesis batches: records in shard order, stopping at the
//! first failure so the source resumes there.

use super::{field, run_record};
use crate::error::IdempotencyError;
use crate::idempotency::Idempotency;
use crate::key::JsonPath;
use crate::outcome::Event;
use crate::store::IdempotencyStore;
use aws_lambda_events::event::dynamodb::{Event as DynamoDbEvent, EventRecord as DynamoDbRecord};
use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord};
use aws_lambda_events::event::streams::{
    DynamoDbBatchItemFailure, DynamoDbEventResponse, KinesisEventResponse,
};
use lambda_runtime::LambdaEvent;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::sync::{Arc, LazyLock};

static EVENT_ID: LazyLock<JsonPath> = LazyLock::new(|| field("eventID"));

impl<S: IdempotencyStore> Idempotency<S> {
    /// A stream batch handler for DynamoDB Streams ([`StreamBatch::process_dynamodb`])
    /// or Kinesis ([`StreamBatch::process_kinesis`]). Each record runs through
    /// `handler` at most once per key; records that completed on an earlier read of
    /// the shard replay.
    ///
    /// The key comes from the config's expression over each record (e.g.
    /// `dynamodb.NewImage.order_id.S`, or `powertools_json(powertools_base64(kinesis.data)).id`);
    /// without one, from the record's `eventID`, which is stable across re-reads.
    pub fn stream_batch<F>(&self, name: &str, handler: F) -> StreamBatch<F, S> {
        StreamBatch {
            handler,
            idempotency: self.clone(),
            scope: self.function_scope(name).into(),
        }
    }
}

/// Processes stream batches; made by [`Idempotency::stream_batch`].
///
/// At the first failed record, processing stops; that record and every later one
/// are reported (by sequence number) so that Lambda resumes the shard at the
/// failure. Set `ReportBatchItemFailures` on the event source mapping.
pub struct StreamBatch<F, S> {
    handler: F,
    idempotency: Idempotency<S>,
    scope: Arc<str>,
}

impl<F, S> std::fmt::Debug for StreamBatch<F, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamBatch")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl<F, S: IdempotencyStore> StreamBatch<F, S> {
    /// Processes a DynamoDB Streams batch.
    pub async fn process_dynamodb<R, E, Fut>(
        &self,
        event: LambdaEvent<DynamoDbEvent>,
    ) -> Result<DynamoDbEventResponse, IdempotencyError>
    where
        F: Fn(DynamoDbRecord) -> Fut,
        Fut: Future<Output = Result<R, E>>,
        R: Serialize + DeserializeOwned,
        E: std::fmt::Display + 'static,
    {
        let deadline_ms = event.context.deadline as i64;
        let failed = self
            .in_order(
                event.payload.records,
                |r| r.change.sequence_number.clone(),
                deadline_ms,
            )
            .await?;
        let mut response = DynamoDbEventResponse::default();
        for sequence_number in failed {
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = Some(sequence_number);
            response.batch_item_failures.push(failure);
        }
        Ok(response)
    }

    /// Processes a Kinesis batch.
    pub async fn process_kinesis<R, E, Fut>(
        &self,
        event: LambdaEvent<KinesisEvent>,
    ) -> Result<KinesisEventResponse, IdempotencyError>
    where
        F: Fn(KinesisEventRecord) -> Fut,
        Fut: Future<Output = Result<R, E>>,
        R: Serialize + DeserializeOwned,
        E: std::fmt::Display + 'static,
    {
        let deadline_ms = event.context.deadline as i64;
        let failed = self
            .in_order(
                event.payload.records,
                |r| Some(r.kinesis.sequence_number.clone()),
                deadline_ms,
            )
            .await?;
        let mut response = KinesisEventResponse::default();
        for sequence_number in failed {
            response.add_failure(sequence_number);
        }
        Ok(response)
    }

    /// Runs records in order until one fails; returns the sequence numbers of that
    /// record and every later one.
    async fn in_order<T, R, E, Fut>(
        &self,
        records: Vec<T>,
        sequence_number: impl Fn(&T) -> Option<String>,
        deadline_ms: i64,
    ) -> Result<Vec<String>, IdempotencyError>
    where
        F: Fn(T) -> Fut,
        Fut: Future<Output = Result<R, E>>,
        T: Serialize + 'static,
        R: Serialize + DeserializeOwned,
        E: std::fmt::Display + 'static,
    {
        let meter = self.idempotency.meter(&self.scope);
        meter.event(Event::BatchRecords, records.len() as u64);
        // The batch's keys, reserved together (one request on DynamoDB). A later
        // record of the batch with an earlier one's key replays it, with no
        // request (the shard's order is kept: records still run one by one).
        // Boxed, as each record's call: with event types as deep as Kinesis', the
        // unboxed futures overflow the compiler's layout query depth in `main`.
        let batch =
            Box::pin(
                self.idempotency
                    .begin_batch(&self.scope, deadline_ms, &records, &EVENT_ID),
            )
            .await;
        let sequences: Vec<Option<String>> = records.iter().map(&sequence_number).collect();
        let mut stopped_at = None;
        for (index, record) in records.into_iter().enumerate() {
            let outcome = Box::pin(run_record(
                &self.idempotency,
                &self.scope,
                deadline_ms,
                &EVENT_ID,
                &batch,
                index,
                record,
                &self.handler,
            ))
            .await;
            if let Err(reason) = outcome {
                let sequence = &sequences[index];
                tracing::error!(?sequence, %reason, "stream record failed; the shard resumes here");
                stopped_at = Some(index);
                break;
            }
        }
        // The completions that waited for the batch: the shard resumes at the
        // first record whose completion was not written, if that comes first
        // (the records after it ran, and will replay).
        let unwritten = Box::pin(self.idempotency.finish_batch(batch)).await;
        let resume_at = match (stopped_at, unwritten.first()) {
            (Some(stopped), Some(&unwritten)) => Some(stopped.min(unwritten)),
            (stopped, unwritten) => stopped.or(unwritten.copied()),
        };
        let Some(resume_at) = resume_at else {
            return Ok(Vec::new());
        };
        let failures = sequences.len() - resume_at;
        meter.event(Event::BatchFailures, failures as u64);
        meter.event(Event::BatchHeldBack, (failures - 1) as u64);
        sequences
            .into_iter()
            .skip(resume_at)
            .map(|s| {
                s.ok_or_else(|| {
                    IdempotencyError::InvalidEvent("a stream record has no sequence number".into())
                })
            })
            .collect()
    }
}
