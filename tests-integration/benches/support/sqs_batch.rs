//! An SQS batch of 10 first executions, one message at a time (the old default)
//! and with the default concurrency: how many store round trips a batch waits for.
//! Its events and handler serve `batch_requests.rs` too.

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use criterion::{BatchSize, Criterion};
use lambda_idempotency::{Idempotency, IdempotencyConfig, IdempotencyStore};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::{json, Value};
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicU64, Ordering};

pub type Ship = fn(SqsMessage) -> Ready<Result<Value, std::io::Error>>;

/// The handler: a small JSON response.
pub fn ship(_: SqsMessage) -> Ready<Result<Value, std::io::Error>> {
    ready(Ok(json!({"status": "shipped"})))
}

/// The events: new orders are numbered; completed ones (made completed by
/// whoever sends them) are always the same 10, `old-0` to `old-9`.
pub struct Batches {
    next: AtomicU64,
    /// The Lambda deadline the events carry.
    deadline_ms: u64,
}

impl Batches {
    pub fn new(deadline_ms: u64) -> Self {
        Self {
            next: AtomicU64::new(0),
            deadline_ms,
        }
    }

    /// A batch of 10: `new` new orders, then old ones.
    pub fn of(&self, new: usize) -> LambdaEvent<SqsEvent> {
        let mut event = SqsEvent::default();
        event.records = (0..10)
            .map(|i| {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let order = match i < new {
                    true => format!("sqs-{n}"),
                    false => format!("old-{i}"),
                };
                let mut message = SqsMessage::default();
                message.message_id = Some(format!("m-{n}"));
                message.body = Some(json!({ "order_id": order }).to_string());
                message
            })
            .collect();
        let mut context = Context::default();
        context.deadline = self.deadline_ms;
        LambdaEvent::new(event, context)
    }
}

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
    let batches = Batches::new(deadline_ms);
    let mut group = c.benchmark_group(group);
    group.sample_size(20);
    for (name, concurrency) in [("one_at_a_time", 1), ("default_concurrency", 10)] {
        let batch = idempotency
            .sqs_batch(name, ship as Ship)
            .concurrency(concurrency);
        group.bench_function(name, |b| {
            b.to_async(runtime).iter_batched(
                || batches.of(10),
                |e| batch.process(e),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}
