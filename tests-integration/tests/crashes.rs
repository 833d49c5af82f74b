//! Crash at every phase: for each store call of an invocation (and right after the
//! external effect of a step), the first attempt fails there, dies there, or
//! stalls there past its deadline; the retries then run to completion. Whatever
//! the point, the charge reaches the payments API with one derived key and is
//! charged once, one response is committed and replayed byte for byte, the outbox
//! message is delivered with one derived key, no key stays in progress, and a late
//! attempt never overwrites the new owner. On the memory store and on DynamoDB.

mod support;

use lambda_idempotency::{
    effects, Dispatcher, Error, Idempotency, IdempotencyConfig, IdempotencyStore, MemoryStore,
    OutboxMessage, Status,
};
use serde_json::{json, Value};
use std::sync::Arc;
use support::faults::{Fault, FaultStore, Mode, Op};
use support::http1::post;
use support::localstack::{default_table, recorded_client, Requests};
use support::payments::Payments;
use support::{context, in_progress, key_for, Audit, Counter};

type Failure = Error<std::io::Error>;

/// One row of the matrix: what the first attempt does and where it is cut.
struct Case {
    name: &'static str,
    /// `ok`, `fail-before-step` or `fail-after-step`: the first attempt's handler.
    first: &'static str,
    faults: Vec<Fault>,
}

fn case(name: &'static str, first: &'static str, faults: &[(Op, usize, Mode)]) -> Case {
    Case {
        name,
        first,
        faults: faults
            .iter()
            .map(|&(op, nth, mode)| Fault { op, nth, mode })
            .collect(),
    }
}

fn cases() -> Vec<Case> {
    use Mode::*;
    use Op::*;
    vec![
        case("reserve fails", "ok", &[(Reserve, 1, Fail)]),
        case("crash before reserve", "ok", &[(Reserve, 1, CrashBefore)]),
        case("crash after reserve", "ok", &[(Reserve, 1, CrashAfter)]),
        case("stall after reserve", "ok", &[(Reserve, 1, PauseAfter)]),
        case("crash after the charge", "ok", &[(Effect, 1, CrashBefore)]),
        case("stall after the charge", "ok", &[(Effect, 1, PauseAfter)]),
        case("journal write fails", "ok", &[(PutStep, 1, Fail)]),
        case(
            "crash before journal write",
            "ok",
            &[(PutStep, 1, CrashBefore)],
        ),
        case(
            "crash after journal write",
            "ok",
            &[(PutStep, 1, CrashAfter)],
        ),
        case(
            "stall after journal write",
            "ok",
            &[(PutStep, 1, PauseAfter)],
        ),
        case(
            "journal read fails on resume",
            "ok",
            &[(PutStep, 1, CrashAfter), (GetStep, 1, Fail)],
        ),
        case(
            "crash at journal read on resume",
            "ok",
            &[(PutStep, 1, CrashAfter), (GetStep, 1, CrashBefore)],
        ),
        case("complete fails", "ok", &[(Complete, 1, Fail)]),
        case("crash before complete", "ok", &[(Complete, 1, CrashBefore)]),
        case("crash after complete", "ok", &[(Complete, 1, CrashAfter)]),
        case("stall after complete", "ok", &[(Complete, 1, PauseAfter)]),
        case("mark delivered fails", "ok", &[(MarkDelivered, 1, Fail)]),
        case(
            "crash before mark delivered",
            "ok",
            &[(MarkDelivered, 1, CrashBefore)],
        ),
        case(
            "crash after mark delivered",
            "ok",
            &[(MarkDelivered, 1, CrashAfter)],
        ),
        case("handler error after the charge", "fail-after-step", &[]),
        case(
            "open release fails",
            "fail-after-step",
            &[(Complete, 1, Fail)],
        ),
        case(
            "crash before open release",
            "fail-after-step",
            &[(Complete, 1, CrashBefore)],
        ),
        case(
            "crash after open release",
            "fail-after-step",
            &[(Complete, 1, CrashAfter)],
        ),
        case("handler error before the charge", "fail-before-step", &[]),
        case("release fails", "fail-before-step", &[(Release, 1, Fail)]),
        case(
            "crash before release",
            "fail-before-step",
            &[(Release, 1, CrashBefore)],
        ),
        case(
            "crash after release",
            "fail-before-step",
            &[(Release, 1, CrashAfter)],
        ),
    ]
}

/// What a case ended with, for the table the DynamoDB run prints.
struct Row {
    attempts: usize,
    payment_calls: usize,
    deliveries: usize,
    completing_requests: Vec<String>,
}

/// Runs `case` against `inner` until an attempt succeeds, then checks every promise.
async fn run_case<S: IdempotencyStore + Clone>(
    inner: S,
    case: &Case,
    deadline_ms: i64,
    requests: Option<&Requests>,
) -> Row {
    let store = FaultStore::new(inner.clone());
    let faults = store.faults.clone();
    let (audit, payments) = (Audit::default(), Payments::start().await);
    let dispatcher = Dispatcher::new().with_sink("audit", audit.clone());
    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("crash")
        .build()
        .expect("config");
    let idempotency = Idempotency::new(store.clone(), config).with_dispatcher(dispatcher.clone());
    let attempts = Counter::default();
    let order = {
        let (attempts, faults, addr) = (attempts.clone(), faults.clone(), payments.addr);
        Arc::new(idempotency.function("order", move |event: Value| {
            let plan = match attempts.hit() {
                1 => event["first"].as_str().unwrap_or("ok").to_owned(),
                _ => "ok".to_owned(),
            };
            let faults = faults.clone();
            async move {
                let fx = effects()?;
                if plan == "fail-before-step" {
                    return Err(Error::Handler(std::io::Error::other("before the charge")));
                }
                let id = event["order_id"].clone();
                let charge: Value = fx
                    .step("charge", |key| async move {
                        let charged = post(addr, "/charges", &key, &json!({ "order": id })).await?;
                        faults.after_effect().await;
                        Ok::<_, std::io::Error>(charged)
                    })
                    .await?;
                if plan == "fail-after-step" {
                    return Err(Error::Handler(std::io::Error::other("after the charge")));
                }
                fx.outbox().push(OutboxMessage::Custom {
                    sink: "audit".into(),
                    payload: json!({ "order": event["order_id"] }),
                });
                Ok::<_, Failure>(json!({ "order": event["order_id"], "charge": charge }))
            }
        }))
    };

    faults.set(&case.faults);
    let event = json!({ "order_id": case.name, "first": case.first });
    let mut late = None;
    let mut completing_requests = Vec::new();
    let mut committed = None;
    for _ in 0..200 {
        if let Some(requests) = requests {
            requests.take();
        }
        let mut attempt = tokio::spawn({
            let (order, event) = (order.clone(), event.clone());
            async move { order.call(event, Some(&context(deadline_ms))).await }
        });
        tokio::select! {
            joined = &mut attempt => match joined.expect("join") {
                Ok(response) => {
                    completing_requests = requests.map(Requests::take).unwrap_or_default();
                    committed = Some(response);
                    break;
                }
                Err(err) => {
                    let result: Result<(), _> = Err(err);
                    if in_progress(&result) {
                        // The first attempt's reservation holds until its deadline.
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                }
            },
            _ = faults.crashed.notified() => attempt.abort(),
            _ = faults.paused.notified() => late = Some(attempt),
        }
    }
    let committed = committed.unwrap_or_else(|| panic!("{}: never completed", case.name));
    let key = key_for("crash.order", case.name);
    let record = store.get(&key).await.expect("get").expect("record");

    // A stalled attempt wakes up after the retry committed: it must not overwrite.
    if let Some(late) = late {
        faults.resume();
        let outcome = late.await.expect("join");
        assert!(
            outcome.as_ref().is_ok_and(|r| *r == committed) || outcome.is_err(),
            "{}: late attempt {outcome:?}",
            case.name
        );
        assert_eq!(
            store.get(&key).await.expect("get").as_ref(),
            Some(&record),
            "{}: the late attempt left the committed record alone",
            case.name
        );
    }

    assert_eq!(record.status, Status::Completed, "{}", case.name);
    assert_eq!(
        record.data.as_deref(),
        Some(serde_json::to_string(&committed).expect("json").as_str()),
        "{}: the committed response is the one returned",
        case.name
    );
    let replay = order
        .call(event.clone(), Some(&context(deadline_ms)))
        .await
        .expect("replay");
    assert_eq!(
        serde_json::to_vec(&replay).expect("json"),
        serde_json::to_vec(&committed).expect("json"),
        "{}: replayed byte for byte",
        case.name
    );

    // The charge: one derived key, charged once, whatever was re-issued.
    let log = payments.request_log();
    let charge_keys: std::collections::BTreeSet<_> = log.iter().map(|(_, k, _)| k).collect();
    assert_eq!(
        charge_keys.len(),
        1,
        "{}: one derived key {log:?}",
        case.name
    );
    assert_eq!(payments.charges(), 1, "{}: charged once", case.name);

    // The outbox: what a crash left pending, the relay delivers; one derived key.
    idempotency.relay(dispatcher).sweep().await.expect("sweep");
    assert!(
        inner
            .outbox()
            .expect("an outbox")
            .pending_outbox()
            .await
            .expect("pending")
            .is_empty(),
        "{}: nothing left pending",
        case.name
    );
    let delivered = audit.delivered();
    let message_keys: std::collections::BTreeSet<_> = delivered.iter().map(|(_, k)| k).collect();
    assert!(
        !delivered.is_empty() && message_keys.len() == 1,
        "{}: delivered at least once, with one key: {delivered:?}",
        case.name
    );
    Row {
        attempts: attempts.get(),
        payment_calls: log.len(),
        deliveries: delivered.len(),
        completing_requests,
    }
}

#[tokio::test]
async fn crash_matrix_on_the_memory_store() {
    for case in cases() {
        run_case(MemoryStore::new(), &case, 150, None).await;
    }
}

#[tokio::test]
async fn crash_matrix_on_dynamodb() {
    let table = default_table("crashes").await;
    let (client, requests) = recorded_client();
    let store = lambda_idempotency::DynamoDbStore::new(client, &table);
    println!("| crash point | handler runs | payment calls | deliveries | requests of the completing attempt |");
    println!("|---|---|---|---|---|");
    for case in cases() {
        let row = run_case(store.clone(), &case, 400, Some(&requests)).await;
        println!(
            "| {} | {} | {} | {} | {} |",
            case.name,
            row.attempts,
            row.payment_calls,
            row.deliveries,
            row.completing_requests.join(", ")
        );
    }
}
