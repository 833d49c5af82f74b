//! The bridge to AWS Lambda durable functions: an SQS batch handler whose step
//! starts a durable execution named after the record's derived key, so that a
//! redelivered message never starts a second execution. (Event source mappings
//! do not dedupe deliveries into durable executions: each delivery would start
//! a new one.)
//!
//! `cargo run --example durable_bridge --features sqs,testing`; the test
//! command runs it as a test (`cargo test --example durable_bridge`).
//!
//! It runs here with no AWS: the testing kit's `Receiver` stands in for
//! Lambda's `Invoke`, deduping on the execution name as Lambda does. In a
//! function, `start_fulfilment` would be:
//!
//! ```text
//! lambda.invoke()
//!     .function_name("fulfilment:live")
//!     .invocation_type(InvocationType::Event)
//!     .durable_execution_name(&execution_name) // 64 characters of [0-9a-f]: it fits
//!     .payload(Blob::new(order.to_string()))
//!     .send()
//!     .await?;
//! ```

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use lambda_idempotency::testing::Receiver;
use lambda_idempotency::{effects, Idempotency, IdempotencyConfig, MemoryStore};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Starts the durable execution of `order`, named `execution_name`.
async fn start_fulfilment(
    lambda: &Receiver,
    execution_name: String,
    order: Value,
) -> Result<Value, lambda_runtime::Error> {
    Ok(lambda.call("start_execution", &execution_name, order).await)
}

fn batch_of(orders: &[&str]) -> LambdaEvent<SqsEvent> {
    let mut event = SqsEvent::default();
    event.records = orders
        .iter()
        .map(|id| {
            let mut message = SqsMessage::default();
            message.message_id = Some(format!("m-{id}"));
            message.body = Some(json!({ "order_id": id }).to_string());
            message
        })
        .collect();
    let mut context = Context::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    context.deadline = now.as_millis() as u64 + 30_000;
    LambdaEvent::new(event, context)
}

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    bridge().await
}

/// Two deliveries of a batch whose first times out after starting the
/// executions: one execution per order.
async fn bridge() -> Result<(), lambda_runtime::Error> {
    // A batch's records are keyed by order: the same order sent twice is one
    // record, one derived key, one execution name.
    let config = IdempotencyConfig::builder()
        .key_expression("powertools_json(body).order_id")
        .strict(true)
        .build()?;
    let lambda = Receiver::new();
    // The first delivery's function times out after starting the executions
    // and before it can acknowledge the batch.
    let times_out = Arc::new(AtomicBool::new(true));
    let idempotency = Idempotency::new(MemoryStore::new(), config);
    let dispatcher = {
        let (lambda, times_out) = (lambda.clone(), times_out.clone());
        idempotency.sqs_batch("dispatch", move |message: SqsMessage| {
            let (lambda, times_out) = (lambda.clone(), times_out.clone());
            async move {
                let order: Value = serde_json::from_str(message.body.as_deref().unwrap_or("{}"))?;
                let execution: Value = effects()?
                    .step("start_fulfilment", |name| {
                        start_fulfilment(&lambda, name, order)
                    })
                    .await?;
                if times_out.load(Ordering::SeqCst) {
                    return Err::<Value, lambda_runtime::Error>("timed out after starting".into());
                }
                Ok(execution)
            }
        })
    };

    let first = dispatcher.process(batch_of(&["o-1", "o-2", "o-1"])).await?;
    println!(
        "first delivery: {} records to retry",
        first.batch_item_failures.len()
    );
    // SQS redelivers them; this time the function finishes.
    times_out.store(false, Ordering::SeqCst);
    let again = dispatcher.process(batch_of(&["o-1", "o-2"])).await?;
    println!(
        "redelivery: {} records to retry",
        again.batch_item_failures.len()
    );

    let started = lambda.distinct_keys("start_execution");
    let invokes = lambda.requests("start_execution");
    println!("{started} durable executions started, with {invokes} invokes");
    assert_eq!(
        started, 2,
        "one execution per order, whatever the deliveries"
    );
    assert_eq!(
        invokes, 2,
        "the redelivery replayed the journaled starts: no second invoke"
    );
    assert!(again.batch_item_failures.is_empty());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_redelivered_message_starts_no_second_execution() {
        if let Err(err) = super::bridge().await {
            panic!("{err}");
        }
    }
}
