//! The outbox relay: on the idempotency table's stream, delivers each committed
//! outbox message that is still pending (its invocation died between commit and
//! dispatch, or the destination was down). Deliveries carry the derived key, so
//! a deduping receiver applies each once.

#[path = "common/mod.rs"]
mod common;

use aws_lambda_events::event::dynamodb::Event;
use lambda_idempotency::{Dispatcher, Idempotency, IdempotencyConfig};
use lambda_runtime::{service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let sdk = common::init().await;
    let idempotency = Idempotency::new(common::store_from_env(&sdk)?, IdempotencyConfig::default());
    let dispatcher = Dispatcher::new()
        .with_sqs(aws_sdk_sqs::Client::new(&sdk))
        .with_http()?;
    let relay = idempotency.relay(dispatcher);
    lambda_runtime::run(service_fn(|event: LambdaEvent<Event>| {
        relay.process_dynamodb(event)
    }))
    .await
}
