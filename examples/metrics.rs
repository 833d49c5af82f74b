//! Dedup metrics as CloudWatch Embedded Metric Format, on the in-memory store.
//!
//! `cargo run --example metrics --features emf` sends an order, its retry, a
//! retry with another amount and an event without an order id through the
//! wrapped handler; after each invocation the `EmfLayer` prints the EMF document
//! Lambda's log agent would turn into CloudWatch metrics. Then the same in
//! observe-only mode: the duplicates run, and are counted as what enforcing
//! would have done.

use lambda_idempotency::emf::{self, EmfLayer};
use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
use lambda_runtime::{service_fn, Context, Error, LambdaEvent};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tower::{Service, ServiceBuilder, ServiceExt};

fn event(payload: Value) -> LambdaEvent<Value> {
    let mut context = Context::default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    context.deadline = (now + Duration::from_secs(30)).as_millis() as u64;
    LambdaEvent::new(payload, context)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let collector = emf::install("Orders")?;
    for observe in [false, true] {
        let config = IdempotencyConfig::builder()
            .key_expression("order_id")
            .payload_validation("amount")
            .key_prefix(if observe { "orders-observed" } else { "orders" })
            .observe_only(observe)
            .build()?;
        let idempotency = Idempotency::new(MemoryStore::new(), config);
        let mut service = ServiceBuilder::new()
            .layer(EmfLayer::new(collector))
            .layer(idempotency.layer()?)
            .service(service_fn(|event: LambdaEvent<Value>| async move {
                Ok::<_, Error>(json!({ "charged": event.payload["amount"] }))
            }));
        println!("# {}", if observe { "observe only" } else { "enforcing" });
        for payload in [
            json!({"order_id": "o-1", "amount": 25}),
            json!({"order_id": "o-1", "amount": 25}),
            json!({"order_id": "o-1", "amount": 99}),
            json!({"amount": 25}),
        ] {
            let result = service.ready().await?.call(event(payload)).await;
            eprintln!(
                "{}",
                result.map_or_else(|e| e.to_string(), |r| r.to_string())
            );
        }
    }
    Ok(())
}
