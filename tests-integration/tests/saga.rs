//! Sagas with compensation against a local payments API: charge, reserve stock,
//! then shipping fails. A permanent failure refunds and releases once each, in
//! reverse order, each with its own derived key, also when the attempt crashes
//! between the two compensations; a transient failure compensates nothing. On the
//! memory store for the rules, on DynamoDB (LocalStack) for the crashes and the
//! request counts.

mod support;

use lambda_idempotency::{
    effects, DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyError,
    IdempotencyStore, IdempotentFunction, MemoryStore, PermanentError, Status,
};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use support::faults::{Fault, FaultStore, Mode, Op};
use support::http1::post;
use support::localstack::{default_table, recorded_client, Requests};
use support::payments::Payments;
use support::{context, in_progress, key_for, BoxError, Counter, ServiceError};

const CHARGES: &str = "/charges";
const REFUNDS: &str = "/refunds";
const RESERVATIONS: &str = "/stock/reservations";
const RELEASES: &str = "/stock/releases";

type Reply = Pin<Box<dyn Future<Output = Result<Value, BoxError>> + Send>>;

/// `POST` with the derived key; a 503 answer (`{"error": ..}`) is an error.
async fn send(addr: SocketAddr, path: &str, key: &str, body: Value) -> std::io::Result<Value> {
    let answer = post(addr, path, key, &body).await?;
    match answer.get("error") {
        Some(error) => Err(std::io::Error::other(format!("{path}: {error}"))),
        None => Ok(json!({ "id": answer["charge_id"], "key": key })),
    }
}

/// The order handler: charge (refund), reserve stock (release), ship. What
/// shipping does is the event's `ship`: `ok`, `reject` (permanent), `reject-once`
/// (permanent on the first run only), `timeout-once` (transient on the first run),
/// `abort` (an explicit abort, then an error that is not a `PermanentError`).
async fn place_order(addr: SocketAddr, run: usize, order: Value) -> Result<Value, BoxError> {
    let fx = effects()?;
    let id = order["order_id"].clone();
    let charge: Value = fx
        .step_with_compensation(
            "charge",
            |key| async move { send(addr, CHARGES, &key, json!({ "order": id })).await },
            move |charge: Value, key| async move {
                send(addr, REFUNDS, &key, json!({ "charge": charge["id"] })).await
            },
        )
        .await?;
    let stock: Value = fx
        .step_with_compensation(
            "reserve_stock",
            |key| async move { send(addr, RESERVATIONS, &key, json!({ "sku": "book" })).await },
            move |reservation: Value, key| async move {
                send(
                    addr,
                    RELEASES,
                    &key,
                    json!({ "reservation": reservation["id"] }),
                )
                .await
            },
        )
        .await?;
    match (order["ship"].as_str().unwrap_or("ok"), run) {
        ("reject", _) | ("reject-once", 1) => Err(PermanentError::new("address rejected").into()),
        ("timeout-once", 1) => Err(std::io::Error::other("carrier timeout").into()),
        ("abort", _) => {
            let cancelled = fx.abort(PermanentError::new("order cancelled"));
            Err(std::io::Error::other(cancelled.message).into())
        }
        _ => Ok(json!({ "charge": charge, "stock": stock })),
    }
}

type Order<S> = IdempotentFunction<Box<dyn Fn(Value) -> Reply + Send + Sync>, S>;

fn shop<S: IdempotencyStore>(store: S, addr: SocketAddr, runs: &Counter) -> Arc<Order<S>> {
    shop_with(store, addr, runs, false)
}

/// The order function; `disabled`: idempotency off (the handler runs unprotected).
fn shop_with<S: IdempotencyStore>(
    store: S,
    addr: SocketAddr,
    runs: &Counter,
    disabled: bool,
) -> Arc<Order<S>> {
    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("shop")
        .disabled(disabled)
        .build()
        .expect("config");
    let runs = runs.clone();
    let handler: Box<dyn Fn(Value) -> Reply + Send + Sync> =
        Box::new(move |order| Box::pin(place_order(addr, runs.hit(), order)));
    Arc::new(Idempotency::new(store, config).function("order", handler))
}

/// One call with a deadline `deadline_ms` ahead; `None` if it crashed (its task
/// is aborted, as a killed process would stop).
async fn attempt<S: IdempotencyStore + Clone + 'static>(
    order: &Arc<Order<FaultStore<S>>>,
    store: &FaultStore<S>,
    event: &Value,
    deadline_ms: i64,
) -> Option<Result<Value, ServiceError>> {
    let mut call = tokio::spawn({
        let (order, event) = (order.clone(), event.clone());
        async move { order.call(event, Some(&context(deadline_ms))).await }
    });
    tokio::select! {
        joined = &mut call => Some(joined.expect("join")),
        _ = store.faults.crashed.notified() => {
            call.abort();
            None
        }
    }
}

fn permanent_message(result: &Result<Value, ServiceError>) -> Option<String> {
    match result {
        Err(Error::Handler(e)) => e
            .downcast_ref::<PermanentError>()
            .map(|p| p.message.clone()),
        Err(Error::Replayed(p)) => Some(p.message.clone()),
        _ => None,
    }
}

fn is_hex_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Every path was applied once, the compensations in reverse order, each
/// request with a distinct derived key (per path: one key, however often sent).
fn assert_compensated_once(payments: &Payments, case: &str) {
    for path in [CHARGES, RESERVATIONS, RELEASES, REFUNDS] {
        assert_eq!(payments.applied(path), 1, "{case}: {path} applied once");
        let keys: BTreeSet<_> = payments.keys_on(path).into_iter().collect();
        assert_eq!(keys.len(), 1, "{case}: {path} with one derived key");
    }
    let log = payments.request_log();
    let first = |path: &str| log.iter().position(|(p, _, _)| p == path);
    assert!(
        first(RELEASES) < first(REFUNDS),
        "{case}: the stock is released before the charge is refunded: {log:?}"
    );
    let keys: BTreeSet<_> = log.iter().map(|(_, k, _)| k.clone()).collect();
    assert_eq!(keys.len(), 4, "{case}: four derived keys: {log:?}");
    assert!(keys.iter().all(|k| is_hex_key(k)), "{case}: {keys:?}");
}

#[tokio::test]
async fn a_permanent_failure_releases_then_refunds_once_each_and_the_error_replays() {
    let (payments, runs) = (Payments::start().await, Counter::default());
    let store = MemoryStore::new();
    let order = shop(store.clone(), payments.addr, &runs);
    let event = json!({ "order_id": "o-reject", "ship": "reject" });

    let failed = order.call(event.clone(), None).await;
    assert_eq!(
        permanent_message(&failed).as_deref(),
        Some("address rejected")
    );
    assert!(
        matches!(failed, Err(Error::Handler(_))),
        "the handler's own error: {failed:?}"
    );
    assert_compensated_once(&payments, "first attempt");

    // Stored although replay_permanent_errors is off: retries run nothing.
    let record = store
        .get(&key_for("shop.order", "o-reject"))
        .await
        .expect("get")
        .expect("record");
    assert_eq!((record.status, record.is_error), (Status::Completed, true));
    let requests = payments.requests();
    for _ in 0..2 {
        let replayed = order.call(event.clone(), None).await;
        assert!(matches!(replayed, Err(Error::Replayed(_))), "{replayed:?}");
        assert_eq!(
            permanent_message(&replayed).as_deref(),
            Some("address rejected")
        );
    }
    assert_eq!(
        (runs.get(), payments.requests()),
        (1, requests),
        "nothing ran again"
    );
}

#[tokio::test]
async fn an_explicit_abort_compensates_whatever_error_the_handler_returns() {
    let (payments, runs) = (Payments::start().await, Counter::default());
    let order = shop(MemoryStore::new(), payments.addr, &runs);
    let event = json!({ "order_id": "o-abort", "ship": "abort" });
    let failed = order.call(event.clone(), None).await;
    assert!(
        matches!(&failed, Err(Error::Handler(e)) if e.to_string() == "order cancelled"),
        "{failed:?}"
    );
    assert_compensated_once(&payments, "abort");
    let replayed = order.call(event, None).await;
    assert!(
        matches!(&replayed, Err(Error::Replayed(p)) if p.message == "order cancelled"),
        "{replayed:?}"
    );
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_transient_failure_compensates_nothing_and_the_retry_resumes_and_completes() {
    let (payments, runs) = (Payments::start().await, Counter::default());
    let order = shop(MemoryStore::new(), payments.addr, &runs);
    let event = json!({ "order_id": "o-timeout", "ship": "timeout-once" });

    let failed = order.call(event.clone(), None).await;
    assert!(matches!(&failed, Err(Error::Handler(e)) if e.to_string() == "carrier timeout"));
    assert_eq!(
        (payments.applied(RELEASES), payments.applied(REFUNDS)),
        (0, 0)
    );

    let done = order
        .call(event.clone(), None)
        .await
        .expect("the retry completes");
    assert_eq!(runs.get(), 2);
    assert_eq!(
        payments.requests(),
        2,
        "the charge and the reservation replayed from the journal"
    );
    assert_eq!(
        (payments.applied(RELEASES), payments.applied(REFUNDS)),
        (0, 0)
    );
    assert_eq!(order.call(event, None).await.expect("replay"), done);
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_failed_compensation_leaves_the_record_open_and_the_retry_runs_the_rest() {
    let (payments, runs) = (Payments::start().await, Counter::default());
    let store = MemoryStore::new();
    let order = shop(store.clone(), payments.addr, &runs);
    let event = json!({ "order_id": "o-refund-down", "ship": "reject" });
    payments.fail_next(REFUNDS, 1);

    match order.call(event.clone(), None).await {
        Err(Error::Idempotency(IdempotencyError::CompensationFailed { step, failure, .. })) => {
            assert_eq!(
                (step.as_str(), failure.as_str()),
                ("charge", "address rejected")
            );
        }
        other => panic!("expected CompensationFailed, got {other:?}"),
    }
    assert_eq!(
        (payments.applied(RELEASES), payments.applied(REFUNDS)),
        (1, 0)
    );
    let record = store
        .get(&key_for("shop.order", "o-refund-down"))
        .await
        .expect("get")
        .expect("record");
    assert_eq!(
        (record.status, record.in_progress_expiration),
        (Status::InProgress, Some(0)),
        "kept open for the retry"
    );

    let retried = order.call(event.clone(), None).await;
    assert_eq!(
        permanent_message(&retried).as_deref(),
        Some("address rejected")
    );
    assert_compensated_once(&payments, "after the retry");
    assert_eq!(
        payments.keys_on(RELEASES).len(),
        1,
        "the journaled release was not sent again"
    );
    let refunds = payments.keys_on(REFUNDS);
    assert_eq!(
        refunds.len(),
        2,
        "the refund re-sent once, with the same key"
    );
    assert!(matches!(
        order.call(event, None).await,
        Err(Error::Replayed(_))
    ));
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_retry_that_succeeds_after_compensating_began_keeps_what_was_compensated() {
    let (payments, runs) = (Payments::start().await, Counter::default());
    let order = shop(MemoryStore::new(), payments.addr, &runs);
    let event = json!({ "order_id": "o-flaky", "ship": "reject-once" });
    payments.fail_next(REFUNDS, 1);
    assert!(order.call(event.clone(), None).await.is_err());
    // A non-deterministic handler: the retry ships. Its response is stored; the
    // stock released by the first attempt stays released, nothing is refunded.
    let done = order
        .call(event.clone(), None)
        .await
        .expect("the retry succeeds");
    assert_eq!(
        (payments.applied(RELEASES), payments.applied(REFUNDS)),
        (1, 0)
    );
    assert_eq!(order.call(event, None).await.expect("replay"), done);
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_permanent_failure_before_any_compensated_step_is_not_a_saga() {
    let (payments, runs) = (Payments::start().await, Counter::default());
    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .build()
        .expect("config");
    let idempotency = Idempotency::new(MemoryStore::new(), config);
    let check = idempotency.function("check", |_: Value| {
        let run = runs.hit();
        async move { Err::<Value, BoxError>(PermanentError::new(format!("invalid {run}")).into()) }
    });
    for run in 1..=2 {
        let failed = check.call(json!({ "order_id": "o-invalid" }), None).await;
        let message = permanent_message(&failed).expect("the handler's permanent error");
        assert_eq!(
            message,
            format!("invalid {run}"),
            "released, as without sagas: it runs again"
        );
    }
    assert_eq!(payments.requests(), 0);
}

#[tokio::test]
async fn an_unprotected_invocation_runs_its_steps_and_compensates_nothing() {
    let (payments, runs) = (Payments::start().await, Counter::default());
    let order = shop_with(MemoryStore::new(), payments.addr, &runs, true);
    let event = json!({ "order_id": "o-unprotected", "ship": "reject" });
    for _ in 0..2 {
        let failed = order.call(event.clone(), None).await;
        assert_eq!(
            permanent_message(&failed).as_deref(),
            Some("address rejected")
        );
    }
    assert_eq!(runs.get(), 2);
    assert_eq!(
        (payments.applied(CHARGES), payments.applied(RESERVATIONS)),
        (2, 2)
    );
    assert_eq!(
        (payments.applied(RELEASES), payments.applied(REFUNDS)),
        (0, 0)
    );
}

/// The crash cases: charge and stock are journal writes 1 and 2, the release
/// (the first compensation) 3 and the refund 4.
fn crash_cases() -> [(&'static str, Fault); 3] {
    [
        (
            "crash after the release is journaled",
            Fault {
                op: Op::PutStep,
                nth: 3,
                mode: Mode::CrashAfter,
            },
        ),
        (
            "crash after the refund was sent, before it is journaled",
            Fault {
                op: Op::PutStep,
                nth: 4,
                mode: Mode::CrashBefore,
            },
        ),
        (
            "crash before completing",
            Fault {
                op: Op::Complete,
                nth: 1,
                mode: Mode::CrashBefore,
            },
        ),
    ]
}

/// A refund sent but not journaled is re-sent (same key); otherwise sent once.
fn refund_requests(fault: &Fault) -> usize {
    match (fault.op, fault.nth, fault.mode) {
        (Op::PutStep, 4, Mode::CrashBefore) => 2,
        _ => 1,
    }
}

/// What one crash case came to.
struct Row {
    runs: usize,
    refund_requests: usize,
    release_requests: usize,
    completing: Vec<String>,
}

async fn crash_between_compensations<S: IdempotencyStore + Clone + 'static>(
    inner: S,
    name: &str,
    fault: Fault,
    deadline_ms: i64,
    requests: Option<&Requests>,
) -> Row {
    let (payments, runs) = (Payments::start().await, Counter::default());
    let store = FaultStore::new(inner);
    let order = shop(store.clone(), payments.addr, &runs);
    let event = json!({ "order_id": name, "ship": "reject" });
    store.faults.set(&[fault]);

    assert!(
        attempt(&order, &store, &event, deadline_ms).await.is_none(),
        "{name}: the first attempt crashed"
    );
    // Refused while the crashed attempt's deadline holds, then it resumes.
    let mut completing = Vec::new();
    let mut retried = None;
    for _ in 0..500 {
        if let Some(requests) = requests {
            requests.take();
        }
        let result = attempt(&order, &store, &event, 60_000)
            .await
            .expect("no crash");
        completing = requests.map(Requests::take).unwrap_or_default();
        if !in_progress(&result) {
            retried = Some(result);
            break;
        }
        // Refused: the crashed attempt's reservation holds until its deadline.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let retried = retried.unwrap_or_else(|| panic!("{name}: still in progress"));
    assert_eq!(
        permanent_message(&retried).as_deref(),
        Some("address rejected"),
        "{name}: {retried:?}"
    );
    assert_compensated_once(&payments, name);
    let replayed = attempt(&order, &store, &event, 60_000)
        .await
        .expect("no crash");
    assert!(
        matches!(replayed, Err(Error::Replayed(_))),
        "{name}: {replayed:?}"
    );
    assert_eq!(
        runs.get(),
        2,
        "{name}: the crashed attempt and the one that resumed"
    );
    Row {
        runs: runs.get(),
        refund_requests: payments.keys_on(REFUNDS).len(),
        release_requests: payments.keys_on(RELEASES).len(),
        completing,
    }
}

#[tokio::test]
async fn a_crash_between_the_compensations_resumes_where_it_stopped_on_the_memory_store() {
    for (name, fault) in crash_cases() {
        let row = crash_between_compensations(MemoryStore::new(), name, fault, 150, None).await;
        let expected_refunds = refund_requests(&fault);
        assert_eq!(
            (row.release_requests, row.refund_requests),
            (1, expected_refunds),
            "{name}"
        );
    }
}

#[tokio::test]
async fn sagas_on_dynamodb_crashes_and_request_counts() {
    let table = default_table("saga").await;
    let (client, requests) = recorded_client();
    let store = DynamoDbStore::new(client, &table);

    // The request counts of a first execution, a compensated one, and replays.
    let (payments, runs) = (Payments::start().await, Counter::default());
    let order = shop(store.clone(), payments.addr, &runs);
    requests.take();
    order
        .call(
            json!({ "order_id": "d-ok", "ship": "ok" }),
            Some(&context(60_000)),
        )
        .await
        .expect("shipped");
    let succeeded = requests.take();
    let event = json!({ "order_id": "d-reject", "ship": "reject" });
    let failed = order.call(event.clone(), Some(&context(60_000))).await;
    assert_eq!(
        permanent_message(&failed).as_deref(),
        Some("address rejected")
    );
    let compensated = requests.take();
    assert!(matches!(
        order.call(event, Some(&context(60_000))).await,
        Err(Error::Replayed(_))
    ));
    let replayed = requests.take();
    println!("first execution, two compensable steps, no failure: {succeeded:?}");
    println!("permanent failure, two compensations: {compensated:?}");
    println!("replay of the stored failure: {replayed:?}");
    assert_eq!(succeeded, ["PutItem"; 4], "reserve, two steps, complete");
    assert_eq!(
        compensated, ["PutItem"; 6],
        "reserve, two steps, two compensations, complete"
    );
    assert_eq!(
        replayed,
        ["PutItem"],
        "the refused reserve returns the stored error"
    );

    println!("| crash | handler runs | release requests | refund requests | requests of the attempt that finished |");
    println!("|---|---|---|---|---|");
    for (name, fault) in crash_cases() {
        let row =
            crash_between_compensations(store.clone(), name, fault, 400, Some(&requests)).await;
        println!(
            "| {name} | {} | {} | {} | {} |",
            row.runs,
            row.release_requests,
            row.refund_requests,
            row.completing.join(", ")
        );
        assert_eq!(
            (row.release_requests, row.refund_requests),
            (1, refund_requests(&fault)),
            "{name}: the journaled release was not sent again"
        );
        let resumed = [
            "PutItem", "PutItem", "GetItem", "GetItem", "GetItem", "GetItem",
        ];
        let rest: &[&str] = match fault.op {
            // The refund (left to run) is journaled, then the failure stored.
            Op::PutStep => &["PutItem", "PutItem"],
            // Both compensations were journaled: only the failure is stored.
            _ => &["PutItem"],
        };
        assert_eq!(
            row.completing,
            [&resumed[..], rest].concat(),
            "{name}: refused, take over, two steps and two compensations read, then write"
        );
    }
}

/// The counters of a saga (feature `metrics`): a recorder local to the test's
/// thread, the calls on a current-thread runtime inside it.
mod counted {
    use super::*;
    use support::counts::Counts;

    #[test]
    fn compensations_run_and_replayed_are_counted_with_their_outcomes() {
        let counts = Counts::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        metrics::with_local_recorder(&counts, || {
            runtime.block_on(async {
                let (payments, runs) = (Payments::start().await, Counter::default());
                let order = shop(MemoryStore::new(), payments.addr, &runs);
                let event = json!({ "order_id": "o-counted", "ship": "reject" });
                payments.fail_next(REFUNDS, 1);
                for _ in 0..3 {
                    assert!(order.call(event.clone(), None).await.is_err());
                }
            })
        });
        let got = |name| counts.get(name);
        assert_eq!(
            (
                got("compensation_failed"),
                got("compensated"),
                got("replayed_from_store")
            ),
            (1, 1, 1),
            "the refund failed, the retry compensated, the third call replayed"
        );
        assert_eq!(
            (got("compensation_run"), got("compensation_replayed")),
            (3, 1),
            "release, refund (failed), refund; the journaled release skipped"
        );
        assert_eq!(got("step_replayed"), 2);
    }
}
