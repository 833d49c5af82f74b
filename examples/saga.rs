//! A saga with compensation on the in-memory store, no services: charge, reserve
//! stock, ship. When shipping fails permanently the stock is released and the
//! charge refunded, in that order, each once, each with its own derived key.
//!
//! `cargo run --example saga` runs three orders: one that ships, one whose
//! address is rejected (compensated, and its retry replays the failure), and one
//! whose refund fails the first time (the retry resumes and refunds). It exits
//! non-zero if any of them behaves otherwise.

use lambda_idempotency::{
    effects, Error, Idempotency, IdempotencyConfig, IdempotencyError, MemoryStore, PermanentError,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A fake payments and warehouse API: it dedupes on the idempotency key, as a
/// real one does with the `Idempotency-Key` header, and logs what it applies.
#[derive(Clone, Default)]
struct Backend {
    applied: Arc<Mutex<HashMap<String, Value>>>,
    log: Arc<Mutex<Vec<String>>>,
    /// Refunds to refuse before accepting one (an outage).
    refund_outages: Arc<Mutex<usize>>,
}

impl Backend {
    fn call(&self, operation: &str, key: &str, body: Value) -> Result<Value, std::io::Error> {
        if operation == "refund" {
            let mut outages = self.refund_outages.lock().map_err(poisoned)?;
            if *outages > 0 {
                *outages -= 1;
                println!("   {operation:<8} key {}..: 503, try later", &key[..8]);
                return Err(std::io::Error::other("payments API unavailable"));
            }
        }
        let mut applied = self.applied.lock().map_err(poisoned)?;
        if let Some(first) = applied.get(key) {
            println!("   {operation:<8} key {}..: deduped", &key[..8]);
            return Ok(first.clone());
        }
        let result = json!({ "id": format!("{operation}-{}", applied.len() + 1), "request": body });
        applied.insert(key.to_owned(), result.clone());
        println!("   {operation:<8} key {}..: applied", &key[..8]);
        self.log
            .lock()
            .map_err(poisoned)?
            .push(operation.to_owned());
        Ok(result)
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }
}

fn poisoned<T>(_: T) -> std::io::Error {
    std::io::Error::other("lock poisoned")
}

async fn place_order(backend: Backend, order: Value) -> Result<Value, lambda_runtime::Error> {
    let fx = effects()?;
    let (b1, b2, b3, b4) = (
        backend.clone(),
        backend.clone(),
        backend.clone(),
        backend.clone(),
    );
    let amount = order["amount"].clone();
    let charge: Value = fx
        .step_with_compensation(
            "charge",
            |key| async move { b1.call("charge", &key, json!({ "amount": amount })) },
            move |charge: Value, key| async move {
                b2.call("refund", &key, json!({ "charge": charge["id"] }))
            },
        )
        .await?;
    let stock: Value = fx
        .step_with_compensation(
            "reserve_stock",
            |key| async move { b3.call("reserve", &key, json!({ "sku": "book" })) },
            move |reservation: Value, key| async move {
                b4.call("release", &key, json!({ "reservation": reservation["id"] }))
            },
        )
        .await?;
    if order["address"].as_str().unwrap_or_default().is_empty() {
        // Permanent: the compensations run before this invocation returns.
        return Err(PermanentError::new("address rejected by the carrier").into());
    }
    Ok(json!({ "order": order["order_id"], "charge": charge["id"], "stock": stock["id"] }))
}

fn check(ok: bool, what: &str) -> Result<(), lambda_runtime::Error> {
    match ok {
        true => Ok(()),
        false => Err(format!("unexpected: {what}").into()),
    }
}

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .build()?;
    let idempotency = Idempotency::new(MemoryStore::new(), config);
    let backend = Backend::default();
    let order = {
        let backend = backend.clone();
        idempotency.function("order", move |order: Value| {
            place_order(backend.clone(), order)
        })
    };

    println!("1. an order that ships");
    let shipped = order
        .call(
            json!({ "order_id": "o-1", "amount": 25, "address": "1 Main St" }),
            None,
        )
        .await?;
    println!("   -> {shipped}");
    check(
        backend.log() == ["charge", "reserve"],
        "order 1 made other calls",
    )?;

    println!("2. an order whose address is rejected: release the stock, then refund");
    let rejected = json!({ "order_id": "o-2", "amount": 40, "address": "" });
    let failed = order.call(rejected.clone(), None).await;
    println!(
        "   -> {}",
        failed
            .as_ref()
            .map_or_else(|e| e.to_string(), |v| v.to_string())
    );
    check(
        backend.log()[2..] == ["charge", "reserve", "release", "refund"],
        "order 2 was not compensated in reverse order",
    )?;
    println!("   retry:");
    let replayed = order.call(rejected, None).await;
    println!("   -> {replayed:?} (stored, nothing runs again)");
    check(
        matches!(replayed, Err(Error::Replayed(_))),
        "order 2's retry ran",
    )?;

    println!("3. the same, but the payments API is down for the first refund");
    if let Ok(mut outages) = backend.refund_outages.lock() {
        *outages = 1;
    }
    let flaky = json!({ "order_id": "o-3", "amount": 15, "address": "" });
    match order.call(flaky.clone(), None).await {
        Err(Error::Idempotency(err @ IdempotencyError::CompensationFailed { .. })) => {
            println!("   -> {err}")
        }
        other => return Err(format!("expected CompensationFailed, got {other:?}").into()),
    }
    println!(
        "   retry (resumes: the stock release is journaled, the refund is re-sent with its key):"
    );
    let retried = order.call(flaky, None).await;
    println!(
        "   -> {}",
        retried
            .as_ref()
            .map_or_else(|e| e.to_string(), |v| v.to_string())
    );
    check(
        backend.log()[6..] == ["charge", "reserve", "release", "refund"],
        "order 3 was not compensated once each",
    )?;
    println!("every compensation ran once");
    Ok(())
}
