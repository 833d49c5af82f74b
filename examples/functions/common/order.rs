//! The order example's logic, shared by `examples/functions/order_outbox.rs`
//! (the Lambda function) and `tests-integration/tests/testing_kit.rs` (which
//! runs it through the testing kit):
//! the card is charged in a step, with the step's derived key, and `OrderPlaced`
//! is staged in the outbox, delivered after the order is committed.

use lambda_idempotency::{effects, OutboxMessage};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::future::Future;

#[derive(Debug, Deserialize, Serialize)]
pub struct Order {
    pub order_id: String,
    pub amount_cents: u64,
}

/// The payment API: charges `order`, deduping on `key` (its `Idempotency-Key`).
pub trait Payments: Sync {
    fn charge(
        &self,
        key: &str,
        order: &Order,
    ) -> impl Future<Output = Result<Value, std::io::Error>> + Send;
}

/// Charges the order once whatever the retries, then stages `OrderPlaced` as the
/// message `placed` makes of it (an SQS message in the function, a sink's
/// payload in the tests).
pub async fn place_order<P: Payments>(
    order: Order,
    payments: &P,
    placed: impl FnOnce(Value) -> OutboxMessage,
) -> Result<Value, lambda_runtime::Error> {
    let effects = effects()?;
    // A retry after a crash replays this from the journal, or re-sends it with the
    // same key: one charge either way.
    let order_ref = &order;
    let receipt = effects
        .step("charge", |key| async move {
            payments.charge(&key, order_ref).await
        })
        .await?;
    let event = json!({ "event": "OrderPlaced", "order_id": order.order_id, "charge": receipt });
    effects.outbox().push(placed(event));
    Ok(json!({ "order_id": order.order_id, "status": "placed" }))
}
