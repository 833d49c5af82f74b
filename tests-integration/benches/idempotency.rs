//! The cost the wrapper adds per invocation, on the in-memory store (so the figures
//! are our code, not the network): key derivation from an API Gateway-sized event,
//! a first execution, a replay from the store, and a replay from the local cache.
//!
//! `cargo bench --bench idempotency`; DynamoDB figures: `benches/dynamodb.rs`.

#[path = "support/sqs_batch.rs"]
mod sqs_batch;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
use serde_json::{json, Value};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

/// An API Gateway proxy event of about 2 KB, the order in its JSON body.
fn event(order: u64) -> Value {
    let body = json!({"order_id": format!("o-{order}"), "amount": 2500, "currency": "EUR",
                      "items": (0..10).map(|i| json!({"sku": format!("sku-{i}"), "qty": i})).collect::<Vec<_>>()});
    json!({
        "resource": "/orders", "path": "/orders", "httpMethod": "POST",
        "headers": (0..20).map(|i| (format!("x-header-{i}"), json!("value".repeat(4)))).collect::<serde_json::Map<_, _>>(),
        "requestContext": {"requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef", "stage": "prod"},
        "body": body.to_string(),
        "isBase64Encoded": false
    })
}

fn config(cache: bool) -> IdempotencyConfig {
    let builder = IdempotencyConfig::builder()
        .key_expression("powertools_json(body).order_id")
        .payload_validation("powertools_json(body).[amount, currency]")
        .key_prefix("bench");
    let builder = if cache {
        builder.local_cache(1024)
    } else {
        builder
    };
    builder.build().expect("valid config")
}

async fn handler(event: Value) -> Result<Value, std::io::Error> {
    Ok(json!({"statusCode": 201, "body": event["body"]}))
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("memory_store");

    group.bench_function("unwrapped_handler", |b| {
        b.to_async(&runtime).iter_batched(
            || event(1),
            |e| async { handler(black_box(e)).await },
            BatchSize::SmallInput,
        )
    });

    let next = AtomicU64::new(0);
    group.bench_function("first_execution", |b| {
        b.to_async(&runtime).iter_batched(
            || {
                let idempotency = Idempotency::new(MemoryStore::new(), config(false));
                (
                    idempotency.function("orders", handler),
                    event(next.fetch_add(1, Ordering::Relaxed)),
                )
            },
            // The function is returned, so that dropping it (and its store and
            // config) falls outside the measurement.
            |(f, event)| async move {
                let response = f.call(event, None).await.expect("runs");
                (f, response)
            },
            BatchSize::SmallInput,
        )
    });

    for (name, cache) in [
        ("replay_from_store", false),
        ("replay_from_local_cache", true),
    ] {
        let f = Idempotency::new(MemoryStore::new(), config(cache)).function("orders", handler);
        runtime
            .block_on(f.call(event(0), None))
            .expect("first execution");
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter_batched(
                || event(0),
                |e| async { f.call(black_box(e), None).await.expect("replays") },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();

    // The same on a small event keyed on a top-level field: the wrapper without
    // an embedded document to parse or a 2 KB event to drop.
    let mut group = c.benchmark_group("memory_store_small_event");
    let small = |order: u64| json!({"order_id": format!("o-{order}"), "amount": 2500});
    let plain = || {
        IdempotencyConfig::builder()
            .key_expression("order_id")
            .key_prefix("bench")
    };
    group.bench_function("unwrapped_handler", |b| {
        b.to_async(&runtime).iter_batched(
            || small(1),
            |e| async { handler(black_box(e)).await },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("first_execution", |b| {
        b.to_async(&runtime).iter_batched(
            || {
                let config = plain().build().expect("valid config");
                let idempotency = Idempotency::new(MemoryStore::new(), config);
                (
                    idempotency.function("orders", handler),
                    small(next.fetch_add(1, Ordering::Relaxed)),
                )
            },
            // The function is returned, so that dropping it (and its store and
            // config) falls outside the measurement.
            |(f, event)| async move {
                let response = f.call(event, None).await.expect("runs");
                (f, response)
            },
            BatchSize::SmallInput,
        )
    });
    let config = plain().local_cache(1024).build().expect("valid config");
    let f = Idempotency::new(MemoryStore::new(), config).function("orders", handler);
    runtime
        .block_on(f.call(small(0), None))
        .expect("first execution");
    group.bench_function("replay_from_local_cache", |b| {
        b.to_async(&runtime).iter_batched(
            || small(0),
            |e| async { f.call(black_box(e), None).await.expect("replays") },
            BatchSize::SmallInput,
        )
    });
    group.finish();

    // No deadline: reservations last the in-progress timeout.
    sqs_batch::bench(
        c,
        &runtime,
        &Remote::default(),
        "sqs_batch_of_10_store_5ms_away",
        0,
    );
}

/// A store a network away: each request takes `LATENCY` (DynamoDB's is a few
/// milliseconds in the same Region), so the figures show how many round trips
/// a batch waits for.
#[derive(Clone, Default)]
struct Remote(MemoryStore);

const LATENCY: std::time::Duration = std::time::Duration::from_millis(5);

impl lambda_idempotency::IdempotencyStore for Remote {
    async fn get(
        &self,
        key: &str,
    ) -> Result<Option<lambda_idempotency::IdempotencyRecord>, lambda_idempotency::store::StoreError>
    {
        tokio::time::sleep(LATENCY).await;
        self.0.get(key).await
    }
    async fn reserve(
        &self,
        record: &lambda_idempotency::IdempotencyRecord,
        now_ms: i64,
    ) -> Result<Option<lambda_idempotency::IdempotencyRecord>, lambda_idempotency::store::StoreError>
    {
        tokio::time::sleep(LATENCY).await;
        self.0.reserve(record, now_ms).await
    }
    async fn complete(
        &self,
        record: &lambda_idempotency::IdempotencyRecord,
    ) -> Result<(), lambda_idempotency::store::StoreError> {
        tokio::time::sleep(LATENCY).await;
        self.0.complete(record).await
    }
    async fn release(
        &self,
        key: &str,
        owner: &str,
    ) -> Result<(), lambda_idempotency::store::StoreError> {
        tokio::time::sleep(LATENCY).await;
        self.0.release(key, owner).await
    }
}

criterion_group!(idempotency, benches);
criterion_main!(idempotency);
