//! An order handler whose business writes commit with its idempotency record:
//! the order is put and the stock decremented in the same TransactWriteItems as
//! the COMPLETED record, so a retry (Lambda's, or a client's) never places the
//! order twice nor decrements twice, with no step and no dedup of its own.
//! Out of stock, the stock update's condition fails: the call fails with
//! `IdempotencyWriteConditionError` naming the stock item, nothing is written,
//! and the key is released (a retry after a restock runs again).
//!
//! Environment: `IDEMPOTENCY_TABLE`, `ORDERS_TABLE` (partition key `pk`, a string).

#[path = "common/mod.rs"]
mod common;

use aws_sdk_dynamodb::types::{AttributeValue, Put, Update};
use lambda_idempotency::{effects, Idempotency, IdempotencyConfig};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize, Serialize)]
struct Order {
    order_id: String,
    sku: String,
    quantity: u32,
}

async fn place_order(event: LambdaEvent<Order>, table: Arc<str>) -> Result<Value, Error> {
    let order = event.payload;
    let effects = effects()?;
    let writes = effects.writes();
    // The order: its own condition guards against another path writing it too.
    writes.put(
        Put::builder()
            .table_name(&*table)
            .item("pk", AttributeValue::S(format!("order#{}", order.order_id)))
            .item("sku", AttributeValue::S(order.sku.clone()))
            .item("quantity", AttributeValue::N(order.quantity.to_string()))
            .condition_expression("attribute_not_exists(pk)")
            .build()?,
    );
    // The stock: decremented once, only if enough is left.
    writes.update(
        Update::builder()
            .table_name(&*table)
            .key("pk", AttributeValue::S(format!("stock#{}", order.sku)))
            .update_expression("ADD available :taken")
            .condition_expression("available >= :quantity")
            .expression_attribute_values(
                ":taken",
                AttributeValue::N(format!("-{}", order.quantity)),
            )
            .expression_attribute_values(":quantity", AttributeValue::N(order.quantity.to_string()))
            .build()?,
    );
    // Nothing is written yet: the writes commit with the response, after this returns.
    Ok(json!({ "order_id": order.order_id, "status": "placed" }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let sdk = common::init().await;
    let table: Arc<str> = common::env("ORDERS_TABLE")?.into();
    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .payload_validation("[sku, quantity]")
        .build()?;
    let idempotency = Idempotency::new(common::store_from_env(&sdk)?, config);
    let handler = service_fn(move |event| place_order(event, table.clone()));
    lambda_runtime::run(idempotency.wrap(handler)?).await
}
