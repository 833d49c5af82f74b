//! Store requests, latency and client CPU per invocation: a first execution, a
//! replay, a replay from the local cache, a first execution with a step and
//! outbox messages (and, counted only, a handler error), each on DynamoDB
//! (LocalStack) and on Redis (`redis/ensure.sh`'s standalone server), with the
//! same handlers, configs and events; then, on DynamoDB, a duplicate that waits
//! for the first call, its requests and its lag, and SQS batches of 10 (see
//! `support/sqs_batch.rs`), with batched store requests on and off (see
//! `support/batch_requests.rs`).
//!
//! `bash scripts/bench.sh` (starts LocalStack and Redis when needed). Printed
//! before criterion's timings: the requests per invocation
//! (`requests/{store}/{case}`: DynamoDB's HTTP requests, counted by an SDK
//! interceptor; Redis round trips, counted by a proxy that reads RESP, see
//! `support/resp_proxy.rs`) and the client CPU time per invocation
//! (`cpu/{store}/{case}`, see `support/cpu.rs`). Both servers are on loopback;
//! LocalStack is an emulator (a gateway in Python before DynamoDB Local, in
//! Java), so compare the scenarios and the stores with each other, not with
//! AWS or ElastiCache.

#[path = "support/batch_requests.rs"]
mod batch_requests;
#[path = "support/cpu.rs"]
mod cpu;
#[path = "../tests/support/localstack.rs"]
mod localstack;
#[allow(dead_code)] // the cluster is the tests'
#[path = "../tests/support/redis.rs"]
mod redis_servers;
#[path = "support/resp_proxy.rs"]
mod resp_proxy;
#[path = "support/sqs_batch.rs"]
mod sqs_batch;
#[path = "support/waiting.rs"]
mod waiting;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::future::BoxFuture;
use lambda_idempotency::{
    effects, Dispatcher, DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyStore,
    IdempotentFunction, OutboxMessage, RedisStore, Sink,
};
use serde_json::{json, Value};
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::runtime::Runtime;

/// Whether criterion runs the benchmarks (`cargo bench`) rather than each once
/// as a test (`cargo test --benches`, or `cargo bench -- --test`): its own rule.
fn benchmarking() -> bool {
    let flag = |name: &str| std::env::args().any(|arg| arg == name);
    flag("--bench") && !flag("--test") && !flag("--list")
}

/// Whether to measure and print `section`'s figures (`dynamodb`, `redis`,
/// `wait`, `sqs_batch_of_10`): criterion filters only its timings, so a filter
/// (the first argument not an option, e.g. `cargo bench --bench dynamodb --
/// sqs_batch`) that is part of a section's name, or names it, keeps that
/// section's (and no other's), and spares connecting to Redis when it does not
/// name it. No filter: all.
fn measured(section: &str) -> bool {
    match std::env::args().skip(1).find(|arg| !arg.starts_with('-')) {
        Some(filter) => section.contains(&filter) || filter.contains(section),
        None => true,
    }
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

fn config(prefix: &str, cache: bool) -> IdempotencyConfig {
    let builder = IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix(prefix);
    let builder = if cache {
        builder.local_cache(1024)
    } else {
        builder
    };
    builder.build().expect("valid config")
}

/// The handlers, as function pointers so that [`Functions`] can name them.
type Handler = fn(Value) -> Ready<Result<Value, std::io::Error>>;
type EffectsHandler = fn(Value) -> BoxFuture<'static, Result<Value, Error<std::io::Error>>>;

fn ok(order: Value) -> Ready<Result<Value, std::io::Error>> {
    ready(Ok(
        json!({"order_id": order["order_id"], "status": "charged"}),
    ))
}

/// One step, then three outbox messages to a sink that accepts everything.
fn with_effects(order: Value) -> BoxFuture<'static, Result<Value, Error<std::io::Error>>> {
    Box::pin(async move {
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
    })
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

fn fails(_: Value) -> Ready<Result<Value, std::io::Error>> {
    ready(Err(std::io::Error::other("downstream timeout")))
}

/// The functions of every case on one store: the same handlers and configs on
/// each store.
struct Functions<S> {
    plain: IdempotentFunction<Handler, S>,
    cached: IdempotentFunction<Handler, S>,
    effects: IdempotentFunction<EffectsHandler, S>,
    failing: IdempotentFunction<Handler, S>,
}

impl<S: IdempotencyStore + Clone> Functions<S> {
    fn new(store: S, prefix: &str) -> Self {
        let plain = Idempotency::new(store.clone(), config(prefix, false));
        let cached = Idempotency::new(store.clone(), config(prefix, true));
        let effects = Idempotency::new(store, config(prefix, false))
            .with_dispatcher(Dispatcher::new().with_sink("null", NullSink));
        Self {
            plain: plain.function("orders", ok as Handler),
            cached: cached.function("orders", ok as Handler),
            effects: effects.function("effects", with_effects as EffectsHandler),
            failing: plain.function("failing", fails as Handler),
        }
    }
}

/// The cases timed by criterion and measured for CPU, by the name both print.
#[derive(Clone, Copy)]
enum Case {
    FirstExecution,
    FirstExecutionWithEffects,
    Replay,
    ReplayFromLocalCache,
}

const CASES: [(&str, Case); 4] = [
    ("first_execution", Case::FirstExecution),
    (
        "first_execution_step_and_3_outbox_messages",
        Case::FirstExecutionWithEffects,
    ),
    ("replay", Case::Replay),
    ("replay_from_local_cache", Case::ReplayFromLocalCache),
];

impl Case {
    fn first(self) -> bool {
        matches!(self, Case::FirstExecution | Case::FirstExecutionWithEffects)
    }
}

/// New orders, and the one the replays replay (first executed by [`count`]).
struct Orders {
    next: AtomicU64,
    replayed: Value,
}

impl Orders {
    fn new() -> Self {
        Self {
            next: AtomicU64::new(1),
            replayed: json!({"order_id": "o-0"}),
        }
    }

    fn new_order(&self) -> Value {
        json!({"order_id": format!("o-{}", self.next.fetch_add(1, Ordering::Relaxed))})
    }

    fn for_case(&self, case: Case) -> Value {
        if case.first() {
            self.new_order()
        } else {
            self.replayed.clone()
        }
    }
}

/// The requests of each case on `store`, `take` returning those sent since its
/// last call, printed as `requests/{store}/{case}`. Replays `orders.replayed`
/// after first executing it.
fn count<S: IdempotencyStore + Clone>(
    runtime: &Runtime,
    store: &str,
    functions: &Functions<S>,
    orders: &Orders,
    take: &dyn Fn() -> Vec<String>,
) {
    let count = |what: &str, run: &dyn Fn() -> bool| {
        take();
        let outcome_ok = run();
        let sent = take();
        println!(
            "requests/{:<50} {} {sent:?} (handler ok: {outcome_ok})",
            format!("{store}/{what}"),
            sent.len()
        );
    };
    let replayed = &orders.replayed;
    let call = |f: &IdempotentFunction<Handler, S>, order: Value| {
        runtime.block_on(f.call(order, None)).is_ok()
    };
    count("first_execution", &|| {
        call(&functions.plain, replayed.clone())
    });
    count("replay", &|| call(&functions.plain, replayed.clone()));
    count("replay_filling_the_cache", &|| {
        call(&functions.cached, replayed.clone())
    });
    count("replay_from_local_cache", &|| {
        call(&functions.cached, replayed.clone())
    });
    count("first_execution_step_and_3_outbox_messages", &|| {
        runtime
            .block_on(functions.effects.call(orders.new_order(), None))
            .is_ok()
    });
    count("handler_error", &|| {
        matches!(
            runtime.block_on(functions.failing.call(orders.new_order(), None)),
            Err(Error::Handler(_))
        )
    });
}

/// Criterion's wall time of each case on `functions`' store, as `{store}/{case}`.
fn time<S: IdempotencyStore + Clone>(
    c: &mut Criterion,
    runtime: &Runtime,
    store: &str,
    functions: &Functions<S>,
    orders: &Orders,
) {
    let mut group = c.benchmark_group(store);
    group.sample_size(30);
    for (name, case) in CASES {
        group.bench_function(name, |b| {
            let mut b = b.to_async(runtime);
            let event = || orders.for_case(case);
            match case {
                Case::FirstExecution | Case::Replay => b.iter_batched(
                    event,
                    |o| functions.plain.call(o, None),
                    BatchSize::SmallInput,
                ),
                Case::ReplayFromLocalCache => b.iter_batched(
                    event,
                    |o| functions.cached.call(o, None),
                    BatchSize::SmallInput,
                ),
                Case::FirstExecutionWithEffects => b.iter_batched(
                    event,
                    |o| functions.effects.call(o, None),
                    BatchSize::SmallInput,
                ),
            }
        });
    }
    group.finish();
}

/// The client CPU time of each case on `functions`' store, on `runtime`
/// (current-thread, where the store was made), as `cpu/{store}/{case}`.
fn cpu<S: IdempotencyStore + Clone>(
    runtime: &Runtime,
    store: &str,
    functions: &Functions<S>,
    orders: &Orders,
) {
    for (name, case) in CASES {
        let name = format!("{store}/{name}");
        let event = || orders.for_case(case);
        let (bench, f) = (benchmarking(), functions);
        match case {
            Case::FirstExecution | Case::Replay => {
                cpu::measure(runtime, &name, bench, event, |o| async {
                    f.plain.call(o, None).await.is_ok()
                })
            }
            Case::ReplayFromLocalCache => cpu::measure(runtime, &name, bench, event, |o| async {
                f.cached.call(o, None).await.is_ok()
            }),
            Case::FirstExecutionWithEffects => {
                cpu::measure(runtime, &name, bench, event, |o| async {
                    f.effects.call(o, None).await.is_ok()
                })
            }
        }
    }
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // A current-thread runtime for the CPU times, with stores of its own (a
    // connection works on the runtime it was made on).
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Records on the Redis server outlive a run: a prefix of this run's.
    let prefix = format!("bench-{}", now_ms());
    let orders = Orders::new();

    // DynamoDB: requests counted by an SDK interceptor on a client of their
    // own; times on an uninstrumented one.
    let table = runtime.block_on(localstack::default_table("bench"));
    let dynamodb_store = DynamoDbStore::new(localstack::client(), &table);
    let dynamodb = Functions::new(dynamodb_store.clone(), &prefix);
    if measured("dynamodb") {
        let (recorded, requests) = localstack::recorded_client();
        let counted = Functions::new(DynamoDbStore::new(recorded, &table), &prefix);
        count(&runtime, "dynamodb", &counted, &orders, &|| requests.take());
        let dynamodb_single =
            Functions::new(DynamoDbStore::new(localstack::client(), &table), &prefix);
        cpu(&single, "dynamodb", &dynamodb_single, &orders);
    }

    // Redis: round trips counted by a proxy in front of the server, on a
    // connection of their own; times on a direct one. A warm-up first: on a
    // server that does not know a script yet, its first EVALSHA is refused
    // (NOSCRIPT) and the script loaded, two more round trips, once.
    if measured("redis") {
        let proxy = runtime.block_on(resp_proxy::RespProxy::start(&redis_servers::url()));
        let counted = runtime.block_on(async {
            RedisStore::connect(&proxy.url())
                .await
                .expect("Redis answers (redis/ensure.sh starts it)")
        });
        let connecting = proxy.take();
        let warm_up = Functions::new(counted.clone(), &format!("{prefix}-warm-up"));
        for f in [&warm_up.plain, &warm_up.failing] {
            let _ = runtime.block_on(f.call(orders.new_order(), None));
        }
        let _ = runtime.block_on(warm_up.effects.call(orders.new_order(), None));
        println!(
            "requests/redis/connecting {connecting:?}; warm-up (each script once) {:?}",
            proxy.take()
        );
        let redis = Functions::new(counted, &prefix);
        count(&runtime, "redis", &redis, &orders, &|| proxy.take());
        let redis_single = Functions::new(single.block_on(redis_servers::store()), &prefix);
        cpu(&single, "redis", &redis_single, &orders);
    }

    // A duplicate waiting for the first call: its requests and lag (measured
    // here, not by criterion: see the module).
    if measured("wait") {
        waiting::measure(&runtime, &table, benchmarking());
    }

    // SQS batches, carrying the deadline of a Lambda event a minute ahead.
    let deadline_ms = u64::try_from(now_ms() + 60_000).unwrap_or(0);
    let batches = sqs_batch::Batches::new(deadline_ms);
    batch_requests::complete_the_old(&runtime, &table, &batches);
    if measured("sqs_batch_of_10") {
        batch_requests::measure(&runtime, &single, &table, &batches, benchmarking());
    }

    time(c, &runtime, "dynamodb", &dynamodb, &orders);
    if measured("redis") {
        let redis = Functions::new(runtime.block_on(redis_servers::store()), &prefix);
        time(c, &runtime, "redis", &redis, &orders);
    }
    sqs_batch::bench(c, &runtime, &dynamodb_store, "sqs_batch_of_10", deadline_ms);
    batch_requests::bench(c, &runtime, &dynamodb_store, &batches);
}

criterion_group!(dynamodb, benches);
criterion_main!(dynamodb);
