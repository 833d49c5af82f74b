//! An SQS consumer that ships each order once, however often SQS delivers it.
//! Failed messages go back to the queue through `batchItemFailures`
//! (`FunctionResponseTypes: [ReportBatchItemFailures]` in `template.yaml`).

#[path = "common/mod.rs"]
mod common;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use lambda_idempotency::{Idempotency, IdempotencyConfig};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};

async fn ship(message: SqsMessage) -> Result<Value, Error> {
    let order: Value = serde_json::from_str(message.body.as_deref().unwrap_or_default())?;
    tracing::info!(order_id = %order["order_id"], "shipping");
    Ok(json!({ "shipped": order["order_id"] }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // The business id dedupes duplicate sends as well as redeliveries; strict mode
    // fails a message without one instead of shipping it unprotected.
    let config = IdempotencyConfig::builder()
        .key_expression("powertools_json(body).order_id")
        .strict(true)
        .build()?;
    let batch = Idempotency::new(common::store_from_env(&common::init().await)?, config)
        .sqs_batch("ship", ship)
        .concurrency(8);
    lambda_runtime::run(service_fn(|event: LambdaEvent<SqsEvent>| {
        batch.process(event)
    }))
    .await
}
