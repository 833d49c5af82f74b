//! Duplicates that wait for the first call (`wait_for_in_progress`): the
//! requests one waiter makes, and its lag, the time from the moment the first
//! call's completing write returned to the moment the waiter returned. A waiter
//! in another execution environment (another `Idempotency` on the table) polls
//! the record; one in this environment (the same `Idempotency`) is woken by the
//! first call.
//!
//! Criterion times a function's whole run; the lag is between two tasks, so it
//! is measured here: each sample starts a first call whose handler takes a set
//! time, starts the waiter once the handler runs, and takes the instants from an
//! SDK interceptor (the first call's last `PutItem` returned) and from the
//! waiter's task. Medians and 99th percentiles (nearest rank) are printed.

use super::localstack::{self, Requests};
use aws_sdk_dynamodb::config::interceptors::FinalizerInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::operation::put_item::PutItemOutput;
use futures_util::future::BoxFuture;
use lambda_idempotency::{DynamoDbStore, Idempotency, IdempotencyConfig, IdempotentFunction};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The instants at which a client's successful `PutItem`s returned.
#[derive(Clone, Default, Debug)]
struct Returns(Arc<Mutex<Vec<Instant>>>);

impl Returns {
    fn last(&self) -> Option<Instant> {
        self.0.lock().expect("lock").last().copied()
    }
}

impl Intercept for Returns {
    fn name(&self) -> &'static str {
        "Returns"
    }

    // The last hook before the SDK hands the output to the store. (The request
    // is gone by then: the output tells the operation.)
    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
        let at = Instant::now();
        let put = context
            .output_or_error()
            .and_then(Result::ok)
            .is_some_and(|output| output.downcast_ref::<PutItemOutput>().is_some());
        if put {
            self.0.lock().expect("lock").push(at);
        }
        Ok(())
    }
}

type Handler =
    Box<dyn Fn(Value) -> BoxFuture<'static, Result<Value, std::io::Error>> + Send + Sync>;

/// One execution environment: its function, and its client's requests.
struct Environment {
    work: Arc<IdempotentFunction<Handler, DynamoDbStore>>,
    requests: Requests,
    returns: Returns,
}

/// Its handler says when it starts, then takes the event's `takes_ms`.
fn environment(table: &str, entered: &Arc<Notify>) -> Environment {
    let returns = Returns::default();
    let (client, requests) = localstack::recorded_client_with(returns.clone());
    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("bench-wait")
        .wait_for_in_progress(Duration::from_secs(20))
        .build()
        .expect("valid config");
    let entered = Arc::clone(entered);
    let handler: Handler = Box::new(move |order: Value| {
        entered.notify_one();
        Box::pin(async move {
            let takes = order["takes_ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(takes)).await;
            Ok(json!({"order_id": order["order_id"], "status": "charged"}))
        })
    });
    let idempotency = Idempotency::new(DynamoDbStore::new(client, table), config);
    Environment {
        work: Arc::new(idempotency.function("charge", handler)),
        requests,
        returns,
    }
}

/// A waiter's requests and lag.
struct Sample {
    requests: Vec<String>,
    lag: Duration,
}

/// A first call of `order` in `first`, and once its handler runs, a duplicate
/// in `waiter` (the same environment or another), which must replay it.
async fn sample(
    first: &Environment,
    waiter: &Environment,
    entered: &Notify,
    order: Value,
) -> Sample {
    let first_call = tokio::spawn({
        let (work, order) = (Arc::clone(&first.work), order.clone());
        async move { work.call(order, None).await }
    });
    entered.notified().await;
    // The first call's reservation is made: what comes now is its completion,
    // and the waiter's requests.
    first.requests.take();
    waiter.requests.take();
    let replayed = waiter.work.call(order, None).await;
    let returned = Instant::now();
    let first_response = first_call.await.expect("join").expect("the first call");
    assert_eq!(
        replayed.expect("the waiter replays"),
        first_response,
        "the first call's response"
    );
    let completed = first
        .returns
        .last()
        .expect("the first call's completing write");
    let lag = returned
        .checked_duration_since(completed)
        .expect("the waiter returned after the first call completed");
    let requests = if Arc::ptr_eq(&first.work, &waiter.work) {
        assert_eq!(
            waiter.requests.take(),
            ["PutItem"],
            "the first call's completion only: the waiter asked nothing"
        );
        Vec::new()
    } else {
        assert_eq!(first.requests.take(), ["PutItem"], "the completion");
        waiter.requests.take()
    };
    if let Some((refused, reads)) = requests.split_first() {
        assert!(
            refused == "PutItem" && !reads.is_empty() && reads.iter().all(|r| r == "GetItem"),
            "elsewhere: a refused reservation, then reads: {requests:?}"
        );
    }
    Sample { requests, lag }
}

/// The nearest-rank `p` quantile of sorted `values`.
fn quantile<T: Copy>(sorted: &[T], p: f64) -> T {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Measures and prints each flavour: `samples` per flavour when benchmarking,
/// one (and not the slow flavour) when `cargo test` runs the benches once.
pub fn measure(runtime: &tokio::runtime::Runtime, table: &str, benchmarking: bool) {
    let entered = Arc::new(Notify::new());
    let here = environment(table, &entered);
    let elsewhere = environment(table, &entered);
    // (name, waiter, the first call's handler time, samples)
    let flavours = [
        ("elsewhere_first_takes_100ms", &elsewhere, 100, 200),
        ("elsewhere_first_takes_1s", &elsewhere, 1000, 100),
        ("here_first_takes_100ms", &here, 100, 200),
    ];
    for (name, waiter, takes_ms, samples) in flavours {
        let samples = match (benchmarking, takes_ms) {
            (true, _) => samples,
            (false, 1000) => {
                println!("wait/{name} skipped in test mode");
                continue;
            }
            (false, _) => 1,
        };
        let measured: Vec<Sample> = runtime.block_on(async {
            let mut measured = Vec::with_capacity(samples);
            for i in 0..samples {
                let order = json!({"order_id": format!("{name}-{i}-{}", super::now_ms()), "takes_ms": takes_ms});
                measured.push(sample(&here, waiter, &entered, order).await);
            }
            measured
        });
        let mut counts: Vec<usize> = measured.iter().map(|s| s.requests.len()).collect();
        counts.sort_unstable();
        let mut lags: Vec<Duration> = measured.iter().map(|s| s.lag).collect();
        lags.sort_unstable();
        println!(
            "requests/waiter_{name:<28} {} {:?} (median of {samples}; min {}, max {})",
            quantile(&counts, 0.5),
            measured[0].requests,
            counts[0],
            counts[counts.len() - 1],
        );
        println!(
            "wait_lag/{name:<28} median {:.3} ms, p99 {:.3} ms (min {:.3}, max {:.3}; n={samples})",
            ms(quantile(&lags, 0.5)),
            ms(quantile(&lags, 0.99)),
            ms(lags[0]),
            ms(lags[lags.len() - 1]),
        );
    }
}
