//! SQS batches of 10 on DynamoDB with batched store requests on (`now`: one
//! request reserves the batch, one completes it) and off (`before`: each record
//! reserves and completes alone): a first execution, a redelivery of completed
//! records, and half of each. Printed per batch: the requests
//! (`requests/dynamodb/sqs_batch_of_10/{case}/{mode}`) and the client CPU
//! (`cpu/…`, see `cpu.rs`); timed by criterion as `sqs_batch_of_10/{case}/{mode}`.

use super::localstack::{self, Requests};
use super::sqs_batch::{ship, Batches, Ship};
use aws_lambda_events::event::sqs::SqsEvent;
use criterion::{BatchSize, Criterion};
use lambda_idempotency::{DynamoDbStore, Idempotency, IdempotencyConfig, SqsBatch};
use lambda_runtime::LambdaEvent;
use std::collections::BTreeMap;
use tokio::runtime::Runtime;

const GROUP: &str = "sqs_batch_of_10";

/// The cases, by how many of the batch's 10 records are new; the others are
/// the old orders, completed by [`complete_the_old`].
const CASES: [(&str, usize); 3] = [
    ("first_execution", 10),
    ("redelivery_all_completed", 0),
    ("half_new_half_completed", 5),
];

/// `batch_requests` off (each record's own `PutItem`s, as before) and on.
const MODES: [(&str, bool); 2] = [("before", false), ("now", true)];

/// The batch handler on `store`. One name in every case and mode, so that all
/// find the same completed records.
fn batch(store: &DynamoDbStore, batch_requests: bool) -> SqsBatch<Ship, DynamoDbStore> {
    let config = IdempotencyConfig::builder()
        .key_expression("powertools_json(body).order_id")
        .batch_requests(batch_requests)
        .build()
        .expect("valid config");
    Idempotency::new(store.clone(), config).sqs_batch("ship", ship as Ship)
}

/// Processes `event`; whether every message succeeded.
async fn all_ok(batch: &SqsBatch<Ship, DynamoDbStore>, event: LambdaEvent<SqsEvent>) -> bool {
    batch
        .process(event)
        .await
        .is_ok_and(|response| response.batch_item_failures.is_empty())
}

/// Completes the old orders on `table`, before any case redelivers them.
pub fn complete_the_old(runtime: &Runtime, table: &str, batches: &Batches) {
    let store = DynamoDbStore::new(localstack::client(), table);
    let completed = runtime.block_on(all_ok(&batch(&store, true), batches.of(0)));
    assert!(completed, "the old orders complete");
}

/// Prints the requests and the client CPU per batch of each case and mode: the
/// requests counted by an SDK interceptor on a client of their own, the CPU on
/// `single` (current-thread) with a client of its own (a connection works on
/// the runtime it was made on).
pub fn measure(
    runtime: &Runtime,
    single: &Runtime,
    table: &str,
    batches: &Batches,
    benchmarking: bool,
) {
    let (recorded, requests) = localstack::recorded_client();
    let counted = DynamoDbStore::new(recorded, table);
    let on_single = DynamoDbStore::new(localstack::client(), table);
    for (case, new) in CASES {
        for (mode, batch_requests) in MODES {
            let name = format!("dynamodb/{GROUP}/{case}/{mode}");
            let event = batches.of(new);
            count(
                runtime,
                &name,
                &batch(&counted, batch_requests),
                &requests,
                event,
            );
            let f = batch(&on_single, batch_requests);
            let event = || batches.of(new);
            super::cpu::measure(single, &name, benchmarking, event, |e| all_ok(&f, e));
        }
    }
}

fn count(
    runtime: &Runtime,
    name: &str,
    batch: &SqsBatch<Ship, DynamoDbStore>,
    requests: &Requests,
    event: LambdaEvent<SqsEvent>,
) {
    requests.take();
    let ok = runtime.block_on(all_ok(batch, event));
    let sent = requests.take();
    // The records' requests run concurrently, in any order: by operation.
    let mut by_operation = BTreeMap::<&str, usize>::new();
    for operation in &sent {
        *by_operation.entry(operation).or_default() += 1;
    }
    println!(
        "requests/{name:<50} {} {by_operation:?} (all ok: {ok})",
        sent.len()
    );
}

/// Criterion's wall time per batch of each case and mode, on `store`.
pub fn bench(c: &mut Criterion, runtime: &Runtime, store: &DynamoDbStore, batches: &Batches) {
    let mut group = c.benchmark_group(GROUP);
    group.sample_size(20);
    for (case, new) in CASES {
        for (mode, batch_requests) in MODES {
            let batch = batch(store, batch_requests);
            group.bench_function(format!("{case}/{mode}"), |b| {
                b.to_async(runtime).iter_batched(
                    || batches.of(new),
                    |e| batch.process(e),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
}
