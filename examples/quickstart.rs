//! The quickstart: an idempotent order handler on the in-memory store, no services.
//!
//! `cargo run --example quickstart` shows a first execution, a replay, a duplicate
//! arriving while the first is still running, and the same key with another payload.
//! It exits non-zero if any of them behaves otherwise.

use lambda_idempotency::{Idempotency, IdempotencyConfig, IdempotencyError, MemoryStore};
use lambda_runtime::{service_fn, Context, Error, LambdaEvent};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tower::{Service, ServiceExt};

static CHARGES: AtomicUsize = AtomicUsize::new(0);

/// Holds a call in flight so a duplicate can arrive meanwhile.
#[derive(Default)]
struct Hold {
    entered: Notify,
    release: Notify,
}

/// The side effect we must not repeat. A real handler would call a payment API.
async fn charge(event: LambdaEvent<Value>, hold: Arc<Hold>) -> Result<Value, Error> {
    if event.payload["hold"] == json!(true) {
        hold.entered.notify_one();
        hold.release.notified().await;
    }
    let n = CHARGES.fetch_add(1, Ordering::SeqCst) + 1;
    Ok(
        json!({ "order_id": event.payload["order_id"], "charged": event.payload["amount"], "charge_no": n }),
    )
}

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
    // Key: the order id. The amount must match on every retry of that order.
    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .payload_validation("amount")
        .on_replay(|_, record| println!("   (replayed record {})", record.key))
        .build()?;
    let idempotency = Idempotency::new(MemoryStore::new(), config);
    let hold = Arc::new(Hold::default());
    let handler = {
        let hold = hold.clone();
        service_fn(move |e| charge(e, hold.clone()))
    };
    let mut service = idempotency.wrap(handler)?;

    println!("1. first execution of order A-1");
    let first = service
        .ready()
        .await?
        .call(event(json!({"order_id": "A-1", "amount": 25})))
        .await?;
    println!("   -> {first}");

    println!("2. the same event again (a retry): replayed, not charged again");
    let replay = service
        .ready()
        .await?
        .call(event(json!({"order_id": "A-1", "amount": 25})))
        .await?;
    println!("   -> {replay}");
    expect(replay == first, "the retry returns the first response")?;

    println!("3. a duplicate of order B-7 while the first is still running");
    let running = tokio::spawn(service.ready().await?.call(event(
        json!({"order_id": "B-7", "amount": 40, "hold": true}),
    )));
    hold.entered.notified().await;
    match service
        .ready()
        .await?
        .call(event(json!({"order_id": "B-7", "amount": 40})))
        .await
    {
        Err(
            err @ lambda_idempotency::Error::Idempotency(IdempotencyError::AlreadyInProgress {
                ..
            }),
        ) => {
            println!("   -> refused: {err}")
        }
        other => return Err(format!("expected the duplicate to be refused, got {other:?}").into()),
    }
    hold.release.notify_one();
    println!("   first call finished -> {}", running.await??);

    println!("4. order A-1 again with a different amount");
    match service
        .ready()
        .await?
        .call(event(json!({"order_id": "A-1", "amount": 99})))
        .await
    {
        Err(
            err @ lambda_idempotency::Error::Idempotency(IdempotencyError::PayloadMismatch {
                ..
            }),
        ) => {
            println!("   -> refused: {err}")
        }
        other => return Err(format!("expected a payload mismatch, got {other:?}").into()),
    }

    let charges = CHARGES.load(Ordering::SeqCst);
    println!("\ncharges made: {charges} (one per order)");
    expect(charges == 2, "one charge per order")
}

fn expect(ok: bool, what: &str) -> Result<(), Error> {
    if ok {
        Ok(())
    } else {
        Err(format!("quickstart: expected {what}").into())
    }
}
