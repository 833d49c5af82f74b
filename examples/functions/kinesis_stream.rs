//! A Kinesis consumer that stores each sensor reading once, keyed on the reading id
//! inside the base64 record data.

#[path = "common/mod.rs"]
mod common;

use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord};
use lambda_idempotency::{Idempotency, IdempotencyConfig};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;

async fn store_reading(record: KinesisEventRecord) -> Result<Value, Error> {
    let reading: Value = serde_json::from_slice(&record.kinesis.data)?;
    tracing::info!(%reading, "storing");
    Ok(reading)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = IdempotencyConfig::builder()
        .key_expression("powertools_json(powertools_base64(kinesis.data)).reading_id")
        .build()?;
    let batch = Idempotency::new(common::store_from_env(&common::init().await)?, config)
        .stream_batch("readings", store_reading);
    lambda_runtime::run(service_fn(|event: LambdaEvent<KinesisEvent>| {
        batch.process_kinesis(event)
    }))
    .await
}
