//! The testing kit on a small handler: run the same event twice, eight times at
//! once, and crashed at every phase boundary, then print what happened.
//!
//! `cargo run --example run_twice --features testing`. It exits non-zero if the
//! handler is not idempotent. The handler reserves stock and charges a card, each
//! in a step with its derived key, against the kit's deduping fake receiver.

use lambda_idempotency::testing::{Kit, Receiver};
use lambda_idempotency::{effects, Error, IdempotencyConfig};
use serde_json::{json, Value};

async fn place_order(order: Value, api: Receiver) -> Result<Value, Error<std::io::Error>> {
    let effects = effects()?;
    let (items, stock) = (order["items"].clone(), api.clone());
    let reservation = effects
        .step("reserve_stock", |key| async move {
            Ok::<_, std::io::Error>(stock.call("reserve_stock", &key, items).await)
        })
        .await?;
    let amount = order["amount_cents"].clone();
    let charge = effects
        .step("charge", |key| async move {
            Ok::<_, std::io::Error>(api.call("charge", &key, amount).await)
        })
        .await?;
    Ok(json!({
        "order_id": order["order_id"],
        "reservation": reservation["id"],
        "charge": charge["id"],
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    let api = Receiver::new();
    let handler = {
        let api = api.clone();
        move |order: Value| place_order(order, api.clone())
    };
    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .build()?;
    let kit = Kit::new(config, handler).with_receiver(api);
    let event = json!({ "order_id": "o-1", "items": ["book"], "amount_cents": 1299 });

    let twice = kit.run_twice(event.clone()).await;
    println!("run twice\n{twice}\n");
    let concurrent = kit.run_concurrently(event.clone(), 8).await;
    println!("run concurrently\n{concurrent}\n");
    let matrix = kit.crash_matrix(event).await;
    println!("crash matrix\n{matrix}");

    // The assert helpers panic with the report: in a test that is what you want;
    // here the same checks end the example with an error instead.
    let ok = twice.executions == 1
        && twice.same_response()
        && concurrent.executions == 1
        && concurrent.same_response()
        && matrix.converged()
        && matrix.repeated_effects().is_empty();
    if ok {
        Ok(())
    } else {
        Err("the handler is not idempotent (see the reports above)".into())
    }
}
