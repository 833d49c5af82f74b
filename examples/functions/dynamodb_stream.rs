//! A DynamoDB Streams consumer that indexes each new order once. On a failure the
//! shard resumes at the failed record; records done before it replay.

#[path = "common/mod.rs"]
mod common;

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use lambda_idempotency::{Idempotency, IdempotencyConfig};
use lambda_runtime::{service_fn, Error, LambdaEvent};

async fn index(record: EventRecord) -> Result<String, Error> {
    let keys = serde_json::to_value(&record.change.keys)?;
    tracing::info!(%keys, event = %record.event_name, "indexing");
    Ok(record.event_id)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // No key expression: each record's eventID, stable across re-reads of the shard.
    let idempotency = Idempotency::new(
        common::store_from_env(&common::init().await)?,
        IdempotencyConfig::default(),
    );
    let batch = idempotency.stream_batch("index", index);
    lambda_runtime::run(service_fn(|event: LambdaEvent<Event>| {
        batch.process_dynamodb(event)
    }))
    .await
}
