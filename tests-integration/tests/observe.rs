//! Observe-only mode against LocalStack: the layer reserves and records as when
//! enforcing, but every call runs the handler and returns its own result; the
//! records written while observing decide once the layer enforces.

mod support;

use aws_sdk_dynamodb::types::AttributeValue;
use lambda_idempotency::{DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyError};
use serde_json::{json, Value};
use std::sync::Arc;
use support::localstack::{client, default_table};
use support::{context, key_for, Counter};
use tokio::sync::Notify;

fn config(observe: bool) -> IdempotencyConfig {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        .payload_validation("amount")
        .key_prefix("orders")
        .observe_only(observe)
        .build()
        .expect("config")
}

async fn stored_data(table: &str, key: &str) -> Option<String> {
    let item = client()
        .get_item()
        .table_name(table)
        .key("id", AttributeValue::S(key.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .expect("get item")
        .item?;
    match item.get("data") {
        Some(AttributeValue::S(data)) => Some(data.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn observing_runs_every_duplicate_and_enforcing_then_replays_what_observing_recorded() {
    let table = default_table("observe").await;
    let runs = Counter::default();
    let handler = |runs: Counter| {
        move |event: Value| {
            let run = runs.hit();
            async move { Ok::<_, std::io::Error>(json!({"order": event["order_id"], "run": run})) }
        }
    };
    let observing = Idempotency::new(DynamoDbStore::new(client(), &table), config(true));
    let charge = observing.function("charge", handler(runs.clone()));

    let first = charge
        .call(
            json!({"order_id": "o-1", "amount": 10}),
            Some(&context(60_000)),
        )
        .await
        .expect("first");
    // Enforcing would replay the first response and refuse a different payload;
    // observing runs the handler each time and returns what it returned.
    let duplicate = charge
        .call(
            json!({"order_id": "o-1", "amount": 10}),
            Some(&context(60_000)),
        )
        .await
        .expect("duplicate runs");
    let mismatch = charge
        .call(
            json!({"order_id": "o-1", "amount": 99}),
            Some(&context(60_000)),
        )
        .await
        .expect("a different payload runs");
    assert_eq!(first, json!({"order": "o-1", "run": 1}));
    assert_eq!(duplicate, json!({"order": "o-1", "run": 2}));
    assert_eq!(mismatch, json!({"order": "o-1", "run": 3}));
    assert_eq!(runs.get(), 3);
    // The record is the first execution's, as enforcing would have written it.
    let key = key_for("orders.charge", "o-1");
    assert_eq!(
        stored_data(&table, &key).await.as_deref(),
        Some(serde_json::to_string(&first).expect("json").as_str())
    );

    // The switch: the same table, enforcing. The duplicate replays the record
    // written while observing, byte for byte, without running the handler.
    let enforcing = Idempotency::new(DynamoDbStore::new(client(), &table), config(false));
    let charge = enforcing.function("charge", handler(runs.clone()));
    let replayed = charge
        .call(
            json!({"order_id": "o-1", "amount": 10}),
            Some(&context(60_000)),
        )
        .await
        .expect("replayed");
    assert_eq!(
        serde_json::to_string(&replayed).expect("json"),
        serde_json::to_string(&first).expect("json")
    );
    assert!(matches!(
        charge
            .call(
                json!({"order_id": "o-1", "amount": 99}),
                Some(&context(60_000))
            )
            .await,
        Err(Error::Idempotency(IdempotencyError::PayloadMismatch { .. }))
    ));
    assert_eq!(runs.get(), 3);
}

#[tokio::test]
async fn observing_runs_a_duplicate_while_the_first_is_in_progress() {
    let table = default_table("observe-inflight").await;
    let idempotency = Idempotency::new(DynamoDbStore::new(client(), &table), config(true));
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let runs = Counter::default();
    let work = Arc::new(idempotency.function("work", {
        let (entered, gate, runs) = (entered.clone(), gate.clone(), runs.clone());
        move |event: Value| {
            let run = runs.hit();
            let (entered, gate) = (entered.clone(), gate.clone());
            async move {
                if event["hold"] == json!(true) {
                    entered.notify_one();
                    gate.notified().await;
                }
                Ok::<_, std::io::Error>(json!({"run": run}))
            }
        }
    }));
    let first = tokio::spawn({
        let work = work.clone();
        async move {
            work.call(
                json!({"order_id": "o-2", "amount": 1, "hold": true}),
                Some(&context(60_000)),
            )
            .await
        }
    });
    entered.notified().await;
    let duplicate = work
        .call(
            json!({"order_id": "o-2", "amount": 1}),
            Some(&context(60_000)),
        )
        .await
        .expect("runs although the first holds the key");
    assert_eq!(duplicate, json!({"run": 2}));
    gate.notify_one();
    let first = first.await.expect("join").expect("first completes");
    assert_eq!(first, json!({"run": 1}));
    assert_eq!(runs.get(), 2);
    // The first (the reservation's owner) completed the record.
    assert_eq!(
        stored_data(&table, &key_for("orders.work", "o-2")).await,
        Some(serde_json::to_string(&first).expect("json"))
    );
}

#[tokio::test]
async fn observing_runs_the_handler_when_the_store_fails() {
    // No such table: every store request fails.
    let store = DynamoDbStore::new(client(), "no-such-table-observe");
    let runs = Counter::default();
    let f = |idempotency: &Idempotency<DynamoDbStore>| {
        let runs = runs.clone();
        idempotency.function("work", move |_: Value| {
            let run = runs.hit();
            async move { Ok::<_, std::io::Error>(json!({"run": run})) }
        })
    };
    let observing = Idempotency::new(store.clone(), config(true));
    let response = f(&observing)
        .call(
            json!({"order_id": "o-3", "amount": 1}),
            Some(&context(60_000)),
        )
        .await
        .expect("observing never fails the call for the store");
    assert_eq!(response, json!({"run": 1}));

    let enforcing = Idempotency::new(store, config(false));
    assert!(matches!(
        f(&enforcing)
            .call(
                json!({"order_id": "o-3", "amount": 1}),
                Some(&context(60_000))
            )
            .await,
        Err(Error::Idempotency(IdempotencyError::Store(_)))
    ));
    assert_eq!(runs.get(), 1);
}
