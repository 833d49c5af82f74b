//! Observe-only mode against LocalStack: the layer reserves and records as when
//! enforcing, but every call runs the handler and returns its own result; the
//! records written while observing decide once the layer enforces.

mod support;

use aws_sdk_dynamodb::types::AttributeValue;
use lambda_idempotency::{
    DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyConfigBuilder,
    IdempotencyError,
};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use support::counts::Counts;
use support::localstack::{client, default_table};
use support::{context, key_for, poll, Counter, Gate};

fn builder(observe: bool) -> IdempotencyConfigBuilder {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        .payload_validation("amount")
        .key_prefix("orders")
        .observe_only(observe)
}

fn config(observe: bool) -> IdempotencyConfig {
    builder(observe).build().expect("config")
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

/// A first call of order `o-2` held in its handler at a gate, and a duplicate
/// made meanwhile, under `config` on `table`. The handler answers its run's number.
struct Held {
    /// The duplicate's result, returned while the first was held.
    duplicate: Result<Value, Error<std::io::Error>>,
    /// The first call, held until the gate opens.
    first: tokio::task::JoinHandle<Result<Value, Error<std::io::Error>>>,
    gate: Gate,
    runs: Counter,
}

async fn a_duplicate_while_the_first_is_held(table: &str, config: IdempotencyConfig) -> Held {
    let idempotency = Idempotency::new(DynamoDbStore::new(client(), table), config);
    let (runs, gate) = (Counter::default(), Gate::closed());
    let work = Arc::new(idempotency.function("work", {
        let (runs, gate) = (runs.clone(), gate.clone());
        move |event: Value| {
            let run = runs.hit();
            let gate = gate.clone();
            async move {
                if event["hold"] == json!(true) {
                    gate.pass().await;
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
    // In its handler: the key is reserved.
    poll(|| async { runs.get() }, |runs| *runs == 0).await;
    // Bounded: a duplicate that waited for the first would never return before
    // the gate opens.
    let duplicate = tokio::time::timeout(
        Duration::from_secs(10),
        work.call(
            json!({"order_id": "o-2", "amount": 1}),
            Some(&context(60_000)),
        ),
    )
    .await
    .expect("the duplicate returns while the first is held at its gate");
    assert!(!first.is_finished(), "the first is still held");
    Held {
        duplicate,
        first,
        gate,
        runs,
    }
}

#[tokio::test]
async fn observing_runs_a_duplicate_while_the_first_is_in_progress() {
    let table = default_table("observe-inflight").await;
    let held = a_duplicate_while_the_first_is_held(&table, config(true)).await;
    let duplicate = held
        .duplicate
        .expect("runs although the first holds the key");
    assert_eq!(duplicate, json!({"run": 2}));
    held.gate.open(1);
    let first = held.first.await.expect("join").expect("first completes");
    assert_eq!(first, json!({"run": 1}));
    assert_eq!(held.runs.get(), 2);
    // The first (the reservation's owner) completed the record.
    assert_eq!(
        stored_data(&table, &key_for("orders.work", "o-2")).await,
        Some(serde_json::to_string(&first).expect("json"))
    );
}

/// With waiting configured, enforcing would make the duplicate wait for the
/// first call; observing runs it at once (it returns while the first is still
/// held at its gate) and counts `would_wait`, besides the `in_progress` that
/// enforcing without waiting would have answered.
#[tokio::test]
async fn observing_with_waiting_runs_a_duplicate_at_once_and_counts_would_wait() {
    let counts = Counts::default();
    // For the rest of the test: its tasks all run on this thread.
    let _recorder = metrics::set_default_local_recorder(&counts);
    let table = default_table("observe-wait").await;
    let waiting = builder(true)
        .wait_for_in_progress(Duration::from_secs(60))
        .build()
        .expect("config");
    let held = a_duplicate_while_the_first_is_held(&table, waiting).await;
    assert_eq!(
        held.duplicate.expect("runs, not refused"),
        json!({"run": 2})
    );
    assert_eq!(
        (counts.get("would_wait"), counts.get("in_progress")),
        (1, 1),
        "counted before the first call ends"
    );
    held.gate.open(1);
    assert_eq!(
        held.first.await.expect("join").expect("first completes"),
        json!({"run": 1})
    );
    assert_eq!(held.runs.get(), 2);
    assert_eq!(counts.get("executed"), 1);
    for enforcing_only in ["waited_then_replayed", "waited_then_ran", "wait_timed_out"] {
        assert_eq!(counts.get(enforcing_only), 0, "{enforcing_only}");
    }
    assert!(counts.values("wait_ms").is_empty(), "nobody waited");
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
