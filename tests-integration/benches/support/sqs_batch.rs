//! An SQS batch of 10 first executions, one message at a time (the old default)
//! and with the default concurrency: how many store round trips a batch waits for.

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use criterion::{BatchSize, Criterion};
use lambda_idempotency::{Idempotency, IdempotencyConfig, IdempotencyStore};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};

/// Benches `group` on `store`; `deadline_ms` is the Lambda deadline the events carry.
pub fn bench<S: IdempotencyStore + Clone>(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    store: &S,
    group: &str,
    deadline_ms: u64,
) {
    let config = IdempotencyConfig::builder()
        .key_expression("powertools_json(body).order_id")
        .build()
        .expect("valid config");
    let idempotency = Idempotency::new(store.clone(), config);
    let next = AtomicU64::new(0);
    let batch_of_10 = || {
        let mut event = SqsEvent::default();
        event.records = (0..10)
            .map(|_| {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let mut message = SqsMessage::default();
                message.message_id = Some(format!("m-{n}"));
                message.body = Some(json!({"order_id": format!("sqs-{n}")}).to_string());
                message
            })
            .collect();
        let mut context = Context::default();
        context.deadline = deadline_ms;
        LambdaEvent::new(event, context)
    };
    let ship = |_: SqsMessage| async { Ok::<_, std::io::Error>(json!("shipped")) };
    let mut group = c.benchmark_group(group);
    group.sample_size(20);
    for (name, concurrency) in [("one_at_a_time", 1), ("default_concurrency", 10)] {
        let batch = idempotency.sqs_batch(name, ship).concurrency(concurrency);
        group.bench_function(name, |b| {
            b.to_async(runtime).iter_batched(
                batch_of_10,
                |e| batch.process(e),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}
