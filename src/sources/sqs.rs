//! SQS batches with partial batch failures.

use super::{field, run_record};
use crate::error::IdempotencyError;
use crate::idempotency::{Batch, Idempotency};
use crate::key::JsonPath;
use crate::outcome::Event;
use crate::store::IdempotencyStore;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use futures_util::stream::{self, StreamExt};
use lambda_runtime::LambdaEvent;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, LazyLock};

static MESSAGE_ID: LazyLock<JsonPath> = LazyLock::new(|| field("messageId"));

/// Messages run at once by default: a batch of 10 (the event source mapping's
/// default batch size) costs the DynamoDB round trips of one message, not ten
/// times them, while a large batch (up to 10,000 with a batching window) does not
/// open thousands of requests at once.
const DEFAULT_CONCURRENCY: usize = 10;

/// Messages that run in order, with their positions in the batch.
type Lane = Vec<(usize, SqsMessage)>;

impl<S: IdempotencyStore> Idempotency<S> {
    /// An SQS batch handler: each message runs through `handler` at most once per
    /// key, and [`SqsBatch::process`] reports the failed ones as `batchItemFailures`
    /// (set `ReportBatchItemFailures` on the event source mapping).
    ///
    /// The key comes from the config's expression over each message (e.g.
    /// `powertools_json(body).order_id`); without one, from its `messageId`, which
    /// dedupes redeliveries but not duplicate sends. `name` goes into the key prefix.
    ///
    /// ```no_run
    /// use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
    /// use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
    /// use lambda_runtime::{service_fn, Error, LambdaEvent};
    ///
    /// async fn ship(message: SqsMessage) -> Result<(), Error> {
    ///     println!("shipping {:?}", message.body);
    ///     Ok(())
    /// }
    ///
    /// # async fn run() -> Result<(), Error> {
    /// let config = IdempotencyConfig::builder().key_expression("powertools_json(body).order_id").build()?;
    /// let batch = Idempotency::new(MemoryStore::new(), config).sqs_batch("ship", ship);
    /// lambda_runtime::run(service_fn(|event: LambdaEvent<SqsEvent>| batch.process(event))).await
    /// # }
    /// ```
    pub fn sqs_batch<F>(&self, name: &str, handler: F) -> SqsBatch<F, S> {
        SqsBatch {
            handler,
            idempotency: self.clone(),
            scope: self.function_scope(name).into(),
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

/// Processes SQS batches; made by [`Idempotency::sqs_batch`].
pub struct SqsBatch<F, S> {
    handler: F,
    idempotency: Idempotency<S>,
    scope: Arc<str>,
    concurrency: usize,
}

impl<F, S> std::fmt::Debug for SqsBatch<F, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsBatch")
            .field("scope", &self.scope)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl<F, S: IdempotencyStore> SqsBatch<F, S> {
    /// Runs up to `limit` messages at a time (default 10; 1 runs a batch in
    /// order). On a FIFO queue, messages of one group always run in order, one at
    /// a time, whatever the limit: the limit applies to groups.
    pub fn concurrency(mut self, limit: usize) -> Self {
        self.concurrency = limit.max(1);
        self
    }

    /// Processes a batch. Messages that failed, were already in progress elsewhere,
    /// or (FIFO) come after a failed message of their group are reported as failed;
    /// completed and replayed ones are not. Each failure is logged with its reason.
    ///
    /// Errs only when a failed message has no `messageId` to report (not something
    /// SQS sends), so that Lambda retries the whole batch instead of losing it.
    pub async fn process<R, E, Fut>(
        &self,
        event: LambdaEvent<SqsEvent>,
    ) -> Result<SqsBatchResponse, IdempotencyError>
    where
        F: Fn(SqsMessage) -> Fut,
        Fut: Future<Output = Result<R, E>>,
        R: Serialize + DeserializeOwned,
        E: std::fmt::Display + 'static,
    {
        let deadline_ms = event.context.deadline as i64;
        let records = event.payload.records;
        let fifo = records.first().is_some_and(is_fifo);
        let meter = self.idempotency.meter(&self.scope);
        meter.event(Event::BatchRecords, records.len() as u64);
        // The batch's keys, reserved together (one request on DynamoDB).
        // Boxed, as each record's call: with event types as deep as Kinesis', the
        // unboxed futures overflow the compiler's layout query depth in `main`.
        let batch =
            Box::pin(
                self.idempotency
                    .begin_batch(&self.scope, deadline_ms, &records, &MESSAGE_ID),
            )
            .await;

        // Lanes run concurrently; records in a lane run in order. FIFO: a lane per
        // message group. Standard queues: a lane per message.
        let message_ids: Vec<Option<String>> =
            records.iter().map(|r| r.message_id.clone()).collect();
        let mut lanes: Vec<(Option<String>, Lane)> = Vec::new();
        let mut lane_of = Vec::with_capacity(records.len());
        for (index, record) in records.into_iter().enumerate() {
            let group = fifo
                .then(|| record.attributes.get("MessageGroupId").cloned())
                .flatten();
            match lanes
                .iter_mut()
                .position(|(g, _)| group.is_some() && *g == group)
            {
                Some(lane) => {
                    lane_of.push(lane);
                    lanes[lane].1.push((index, record));
                }
                None => {
                    lane_of.push(lanes.len());
                    lanes.push((group, vec![(index, record)]));
                }
            }
        }

        // Messages of the batch that share a key run once: the others wait for
        // (or find) the first one's record and replay it, with no request.
        let mut failed: BTreeSet<usize> = stream::iter(lanes)
            .map(|(_, lane)| self.run_lane(lane, deadline_ms, &batch))
            .buffer_unordered(self.concurrency)
            .flat_map(stream::iter)
            .collect()
            .await;
        // The completions that waited for the batch; a message whose completion
        // was not written fails, and on a FIFO queue so do the later messages
        // of its group (they ran, and will replay, in order).
        failed.extend(Box::pin(self.idempotency.finish_batch(batch)).await);
        if fifo {
            let mut stopped = vec![false; lane_of.len()];
            for (index, lane) in lane_of.iter().enumerate() {
                if stopped[*lane] {
                    failed.insert(index);
                }
                stopped[*lane] |= failed.contains(&index);
            }
        }
        meter.event(Event::BatchFailures, failed.len() as u64);

        let mut response = SqsBatchResponse::default();
        for index in failed {
            let message_id = message_ids[index].clone().ok_or_else(|| {
                IdempotencyError::InvalidEvent(format!(
                    "record {index} failed and has no messageId to report"
                ))
            })?;
            response.add_failure(message_id);
        }
        Ok(response)
    }

    /// Runs a lane in order; after a failure the rest of the lane fails unrun.
    async fn run_lane<R, E, Fut>(&self, lane: Lane, deadline_ms: i64, batch: &Batch) -> Vec<usize>
    where
        F: Fn(SqsMessage) -> Fut,
        Fut: Future<Output = Result<R, E>>,
        R: Serialize + DeserializeOwned,
        E: std::fmt::Display + 'static,
    {
        let mut failed = Vec::new();
        for (index, record) in lane {
            let message_id = record.message_id.clone();
            if !failed.is_empty() {
                self.idempotency
                    .meter(&self.scope)
                    .event(Event::BatchHeldBack, 1);
                tracing::warn!(
                    ?message_id,
                    "not run: an earlier message of its FIFO group failed"
                );
                failed.push(index);
                continue;
            }
            let scope = &self.scope;
            if let Err(reason) = Box::pin(run_record(
                &self.idempotency,
                scope,
                deadline_ms,
                &MESSAGE_ID,
                batch,
                index,
                record,
                &self.handler,
            ))
            .await
            {
                tracing::error!(?message_id, %reason, "SQS message failed; reported in batchItemFailures");
                failed.push(index);
            }
        }
        failed
    }
}

fn is_fifo(record: &SqsMessage) -> bool {
    record
        .event_source_arn
        .as_deref()
        .is_some_and(|arn| arn.ends_with(".fifo"))
        || record.attributes.contains_key("MessageGroupId")
}
