//! The testing kit on three handlers, on the memory store and on DynamoDB
//! (LocalStack): a quickstart-style order handler (no steps; it charges with the
//! order id as the payment API's key), the order example's own logic
//! (`examples/functions/common/order.rs`: a charge in a step, an `OrderPlaced` outbox
//! message), and a broken handler that charges outside a step with a fresh random
//! key, whose repeated charge the crash matrix must report.

#[path = "../../examples/functions/common/order.rs"]
mod order;
mod support;

use lambda_idempotency::testing::{Kit, Phase, Receiver};
use lambda_idempotency::{
    Dispatcher, DynamoDbStore, IdempotencyConfig, IdempotencyStore, MemoryStore, OutboxMessage,
};
use order::{Order, Payments};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use support::localstack::{client, default_table};

/// The payment API of the tests: the kit's deduping receiver.
struct FakePayments(Receiver);

impl Payments for FakePayments {
    async fn charge(&self, key: &str, order: &Order) -> Result<Value, std::io::Error> {
        Ok(self.0.call("charge", key, json!(order)).await)
    }
}

fn config() -> IdempotencyConfig {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        .payload_validation("amount_cents")
        .build()
        .expect("config")
}

/// The order example's logic, `OrderPlaced` going to the receiver's `events` sink.
fn order_kit<S: IdempotencyStore>(store: S) -> Kit<S> {
    let receiver = Receiver::new();
    let payments = std::sync::Arc::new(FakePayments(receiver.clone()));
    let handler = move |event: Value| {
        let payments = payments.clone();
        async move {
            let order: Order = serde_json::from_value(event)?;
            order::place_order(order, &*payments, |placed| OutboxMessage::Custom {
                sink: "events".into(),
                payload: placed,
            })
            .await
        }
    };
    let dispatcher = Dispatcher::new().with_sink("events", receiver.sink("order_placed"));
    Kit::with_store(store, config(), handler)
        .with_receiver(receiver)
        .with_dispatcher(dispatcher)
}

/// The quickstart's handler, charging through the receiver with the order id as
/// the payment API's key: no step, and still safe, since the key is the same on
/// every retry.
fn quickstart_kit<S: IdempotencyStore>(store: S) -> Kit<S> {
    let receiver = Receiver::new();
    let payments = receiver.clone();
    let handler = move |event: Value| {
        let payments = payments.clone();
        async move {
            let key = event["order_id"].as_str().unwrap_or_default().to_owned();
            let charge = payments
                .call("charge", &key, event["amount_cents"].clone())
                .await;
            Ok::<_, lambda_runtime::Error>(
                json!({ "order_id": event["order_id"], "charged": event["amount_cents"], "charge": charge["id"] }),
            )
        }
    };
    Kit::with_store(store, config(), handler).with_receiver(receiver)
}

/// Broken: charges outside a step, with a fresh random key on every attempt.
fn broken_kit<S: IdempotencyStore>(store: S) -> Kit<S> {
    static ATTEMPTS: AtomicU64 = AtomicU64::new(0);
    let receiver = Receiver::new();
    let payments = receiver.clone();
    let handler = move |event: Value| {
        let payments = payments.clone();
        async move {
            let key = format!("random-{}", ATTEMPTS.fetch_add(1, Ordering::Relaxed));
            let charge = payments
                .call("charge", &key, event["amount_cents"].clone())
                .await;
            Ok::<_, lambda_runtime::Error>(
                json!({ "order_id": event["order_id"], "charge": charge["id"] }),
            )
        }
    };
    Kit::with_store(store, config(), handler).with_receiver(receiver)
}

fn event() -> Value {
    json!({ "order_id": "o-42", "amount_cents": 2500 })
}

async fn check_order<S: IdempotencyStore>(kit: Kit<S>) {
    let twice = kit.run_twice(event()).await;
    println!("run twice: {twice}");
    twice.assert_idempotent();
    let concurrent = kit.run_concurrently(event(), 8).await;
    println!("run concurrently: {concurrent}");
    concurrent.assert_idempotent();
    assert_eq!(
        concurrent.in_progress + concurrent.replayed(),
        7,
        "{concurrent}"
    );
    let matrix = kit.crash_matrix(event()).await;
    println!("{matrix}");
    matrix.assert_converged();
    assert_eq!(matrix.steps, ["charge"]);
    let phases: Vec<String> = matrix.phases.iter().map(|p| p.phase.to_string()).collect();
    assert_eq!(
        phases,
        [
            "after reserve",
            "step 1 (charge) ran, not journaled",
            "after step 1 (charge)",
            "before complete",
            "after complete"
        ]
    );
    // The charge was re-issued with the same key where the journal write was lost,
    // and deduped; the message is delivered with one key whatever the crash.
    let not_journaled = &matrix.phases[1];
    let charge = &not_journaled.effects[0];
    assert_eq!(
        (
            charge.effect.as_str(),
            charge.distinct_keys,
            charge.deduplicated()
        ),
        ("charge", 1, 1)
    );
    for phase in &matrix.phases {
        let placed = phase
            .effects
            .iter()
            .find(|e| e.effect == "order_placed")
            .expect("delivered");
        assert_eq!(placed.distinct_keys, 1, "{}", phase.phase);
    }
}

async fn check_quickstart<S: IdempotencyStore>(kit: Kit<S>) {
    kit.run_twice(event()).await.assert_idempotent();
    kit.run_concurrently(event(), 4).await.assert_idempotent();
    let matrix = kit.crash_matrix(event()).await;
    println!("{matrix}");
    matrix.assert_converged();
    assert!(matrix.steps.is_empty());
    assert_eq!(matrix.phases.len(), 3);
}

async fn check_broken<S: IdempotencyStore>(kit: Kit<S>) {
    // Duplicates alone do not show the bug: the wrapper replays the response.
    kit.run_twice(event()).await.assert_idempotent();
    let matrix = kit.crash_matrix(event()).await;
    println!("{matrix}");
    assert!(
        matrix.converged(),
        "the retries converge, on a second charge"
    );
    assert_eq!(
        matrix.repeated_effects(),
        [(&Phase::BeforeComplete, "charge")],
        "the charge repeats when the attempt dies after charging\n{matrix}"
    );
    assert_eq!(
        matrix.problems(),
        ["crash before complete: effect \"charge\" happened twice"],
        "what assert_converged would panic with"
    );
}

#[tokio::test]
async fn the_order_example_on_the_memory_store() {
    check_order(order_kit(MemoryStore::new())).await;
}

#[tokio::test]
async fn the_quickstart_handler_on_the_memory_store() {
    check_quickstart(quickstart_kit(MemoryStore::new())).await;
}

#[tokio::test]
async fn a_broken_handler_is_caught_on_the_memory_store() {
    check_broken(broken_kit(MemoryStore::new())).await;
}

async fn dynamodb_store() -> DynamoDbStore {
    DynamoDbStore::new(client(), default_table("testing-kit").await)
}

#[tokio::test]
async fn the_order_example_on_dynamodb() {
    check_order(order_kit(dynamodb_store().await)).await;
}

#[tokio::test]
async fn the_quickstart_handler_on_dynamodb() {
    check_quickstart(quickstart_kit(dynamodb_store().await)).await;
}

#[tokio::test]
async fn a_broken_handler_is_caught_on_dynamodb() {
    check_broken(broken_kit(dynamodb_store().await)).await;
}
