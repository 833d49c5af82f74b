//! DynamoDB requests and latency per invocation against LocalStack: a first
//! execution, a replay, a replay from the local cache, and a handler error; a
//! duplicate that waits for the first call, its requests and its lag.
//!
//! `bash scripts/bench.sh` (starts LocalStack when needed). The request counts are
//! printed before criterion's timings; LocalStack latency is loopback HTTP into an
//! emulator, so compare the scenarios with each other, not with AWS.

#[path = "../tests/support/localstack.rs"]
mod localstack;
#[path = "support/sqs_batch.rs"]
mod sqs_batch;
#[path = "support/waiting.rs"]
mod waiting;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use lambda_idempotency::{
    effects, Dispatcher, DynamoDbStore, Error, Idempotency, IdempotencyConfig, OutboxMessage, Sink,
};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether criterion runs the benchmarks (`cargo bench`) rather than each once
/// as a test (`cargo test --benches`, or `cargo bench -- --test`): its own rule.
fn benchmarking() -> bool {
    let flag = |name: &str| std::env::args().any(|arg| arg == name);
    flag("--bench") && !flag("--test") && !flag("--list")
}

/// For the shared LocalStack helpers (unique table names).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// For the shared LocalStack helpers (who sent a request): one caller here.
fn caller() -> &'static str {
    ""
}

fn config(cache: bool) -> IdempotencyConfig {
    let builder = IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("bench");
    let builder = if cache {
        builder.local_cache(1024)
    } else {
        builder
    };
    builder.build().expect("valid config")
}

async fn ok(order: Value) -> Result<Value, std::io::Error> {
    Ok(json!({"order_id": order["order_id"], "status": "charged"}))
}

/// One step, then three outbox messages to a sink that accepts everything.
async fn with_effects(order: Value) -> Result<Value, Error<std::io::Error>> {
    let effects = effects()?;
    let charge = effects
        .step("charge", |key| async move {
            Ok::<_, std::io::Error>(json!(key))
        })
        .await?;
    for _ in 0..3 {
        effects.outbox().push(OutboxMessage::Custom {
            sink: "null".into(),
            payload: order.clone(),
        });
    }
    Ok(charge)
}

struct NullSink;

impl Sink for NullSink {
    fn deliver<'a>(
        &'a self,
        _: &'a Value,
        _: &'a str,
    ) -> lambda_idempotency::store::BoxFuture<'a, Result<(), lambda_idempotency::BoxError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

async fn fails(_: Value) -> Result<Value, std::io::Error> {
    Err(std::io::Error::other("downstream timeout"))
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let table = runtime.block_on(localstack::default_table("bench"));
    let (client, requests) = localstack::recorded_client();
    let store = DynamoDbStore::new(client, &table);
    let plain = Idempotency::new(store.clone(), config(false));
    let cached = Idempotency::new(store, config(true));
    let next = AtomicU64::new(0);
    let order = || json!({"order_id": format!("o-{}", next.fetch_add(1, Ordering::Relaxed))});

    // Requests per scenario, counted by an SDK interceptor.
    let replayed = order();
    let count = |what: &str, run: &dyn Fn() -> bool| {
        requests.take();
        let outcome_ok = run();
        let sent = requests.take();
        println!(
            "requests/{what:<24} {} {sent:?} (handler ok: {outcome_ok})",
            sent.len()
        );
    };
    let ok_fn = plain.function("orders", ok);
    let cached_fn = cached.function("orders", ok);
    let failing_fn = plain.function("failing", fails);
    count("first_execution", &|| {
        runtime.block_on(ok_fn.call(replayed.clone(), None)).is_ok()
    });
    count("replay", &|| {
        runtime.block_on(ok_fn.call(replayed.clone(), None)).is_ok()
    });
    count("replay_filling_the_cache", &|| {
        runtime
            .block_on(cached_fn.call(replayed.clone(), None))
            .is_ok()
    });
    count("replay_from_local_cache", &|| {
        runtime
            .block_on(cached_fn.call(replayed.clone(), None))
            .is_ok()
    });
    let effects_fn = Idempotency::new(plain.store().clone(), config(false))
        .with_dispatcher(Dispatcher::new().with_sink("null", NullSink))
        .function("effects", with_effects);
    count("first_execution_step_and_3_outbox_messages", &|| {
        runtime.block_on(effects_fn.call(order(), None)).is_ok()
    });
    count("handler_error", &|| {
        matches!(
            runtime.block_on(failing_fn.call(order(), None)),
            Err(Error::Handler(_))
        )
    });

    // A duplicate waiting for the first call: its requests and lag (measured
    // here, not by criterion: see the module).
    waiting::measure(&runtime, &table, benchmarking());

    let mut group = c.benchmark_group("dynamodb");
    group.sample_size(30);
    group.bench_function("first_execution", |b| {
        b.to_async(&runtime)
            .iter_batched(order, |o| ok_fn.call(o, None), BatchSize::SmallInput)
    });
    group.bench_function("first_execution_step_and_3_outbox_messages", |b| {
        b.to_async(&runtime).iter_batched(
            order,
            |o| effects_fn.call(o, None),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("replay", |b| {
        b.to_async(&runtime)
            .iter(|| ok_fn.call(replayed.clone(), None))
    });
    group.bench_function("replay_from_local_cache", |b| {
        b.to_async(&runtime)
            .iter(|| cached_fn.call(replayed.clone(), None))
    });
    group.finish();

    // The deadline a Lambda event carries, a minute ahead.
    sqs_batch::bench(
        c,
        &runtime,
        plain.store(),
        "sqs_batch_of_10",
        u64::try_from(now_ms() + 60_000).unwrap_or(0),
    );
}

criterion_group!(dynamodb, benches);
criterion_main!(dynamodb);
