//! Steps and the two-phase gate. Steps that cannot be fooled: a resumed execution whose steps no longer match
//! its journal (another step at a journaled position, or a journaled result that
//! no longer deserializes into the type asked for) ends with `NonDeterministic`
//! whatever the handler does with the step's error, and its record is neither
//! completed nor stored as a success. On the memory store and on DynamoDB.

mod support;

use lambda_idempotency::{
    effects, DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyError,
    IdempotencyStore, MemoryStore, Status,
};
use serde_json::{json, Value};
use support::localstack::{client, default_table};
use support::Counter;

type Failure = Error<std::io::Error>;

/// An order handler whose `plan` scripts this attempt; `stock` counts the calls
/// that reached the warehouse.
async fn scripted(event: Value, stock: Counter) -> Result<Value, Failure> {
    let fx = effects()?;
    match event["plan"].as_str() {
        // Journals its first step, then fails: the execution stays open.
        Some("journal-then-fail") => {
            fx.step("reserve_stock", |key| async move {
                stock.hit();
                Ok::<_, std::io::Error>(json!({ "reservation": key }))
            })
            .await?;
            Err(Error::Handler(std::io::Error::other("warehouse timeout")))
        }
        // A new version calls another step first, and ignores its error.
        Some("swallow-another-step") => {
            let _ignored = fx
                .step("charge", |_| async {
                    Ok::<_, std::io::Error>(json!("charged"))
                })
                .await
                .ok();
            Ok(json!("done"))
        }
        // A new version asks the journaled step for another type, and falls back.
        Some("swallow-another-type") => {
            let count: u64 = fx
                .step("reserve_stock", |_| async { Ok::<_, std::io::Error>(7u64) })
                .await
                .unwrap_or(0);
            Ok(json!({ "count": count }))
        }
        // The code that journaled the step, run to the end.
        _ => {
            let reservation: Value = fx
                .step("reserve_stock", |key| async move {
                    stock.hit();
                    Ok::<_, std::io::Error>(json!({ "reservation": key }))
                })
                .await?;
            Ok(json!({ "order": event["order_id"], "reservation": reservation }))
        }
    }
}

async fn swallowed_divergence_ends_the_invocation<S: IdempotencyStore + Clone>(
    store: S,
    plan: &str,
) {
    let idempotency = Idempotency::new(
        store.clone(),
        IdempotencyConfig::builder()
            .key_expression("order_id")
            .key_prefix(format!("steps-{plan}"))
            .build()
            .expect("config"),
    );
    let stock = Counter::default();
    let order = {
        let stock = stock.clone();
        idempotency.function("order", move |event: Value| scripted(event, stock.clone()))
    };
    let event = |plan: &str| json!({ "order_id": "o-1", "plan": plan });
    let key = idempotency
        .key_for(Some("order"), &event(plan))
        .expect("key")
        .expect("key material");

    let first = order.call(event("journal-then-fail"), None).await;
    assert!(
        matches!(first, Err(Error::Handler(Error::Handler(_)))),
        "{first:?}"
    );

    let second = order.call(event(plan), None).await;
    match &second {
        Err(Error::Idempotency(IdempotencyError::NonDeterministic {
            position,
            journaled,
            called,
            ..
        })) => {
            let expected_call = match plan {
                "swallow-another-step" => "charge",
                _ => "reserve_stock",
            };
            assert_eq!((*position, journaled.as_str(), called.as_str()), (0, "reserve_stock", expected_call));
        }
        other => panic!("{plan}: the invocation must end NonDeterministic whatever the handler returned: {other:?}"),
    }
    let record = store
        .get(&key)
        .await
        .expect("get")
        .expect("the record stays");
    assert_eq!(
        record.status,
        Status::InProgress,
        "{plan}: not completed: {record:?}"
    );
    assert!(record.data.is_none(), "{plan}: no response stored");

    // The code that matches the journal resumes the execution: the journaled
    // step replays, nothing reaches the warehouse again.
    let third = order.call(event("original"), None).await.expect("resumed");
    assert_eq!(stock.get(), 1, "{plan}: the journaled step ran once");
    let replay = order.call(event("original"), None).await.expect("replay");
    assert_eq!(third, replay);
}

#[tokio::test]
async fn another_step_at_a_journaled_position_ends_the_invocation_even_when_swallowed_on_the_memory_store(
) {
    swallowed_divergence_ends_the_invocation(MemoryStore::new(), "swallow-another-step").await;
}

#[tokio::test]
async fn a_journaled_result_of_another_type_is_non_deterministic_on_the_memory_store() {
    swallowed_divergence_ends_the_invocation(MemoryStore::new(), "swallow-another-type").await;
}

#[tokio::test]
async fn another_step_at_a_journaled_position_ends_the_invocation_even_when_swallowed_on_dynamodb()
{
    let table = default_table("steps-divergence").await;
    swallowed_divergence_ends_the_invocation(
        DynamoDbStore::new(client(), &table),
        "swallow-another-step",
    )
    .await;
}

#[tokio::test]
async fn a_journaled_result_of_another_type_is_non_deterministic_on_dynamodb() {
    let table = default_table("steps-type").await;
    swallowed_divergence_ends_the_invocation(
        DynamoDbStore::new(client(), &table),
        "swallow-another-type",
    )
    .await;
}

/// What `is_replaying` said at each point of an attempt.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(&'static str, bool)>>>;

async fn replaying_until_the_first_step_missing_from_the_journal<S: IdempotencyStore + Clone>(
    store: S,
) {
    let idempotency = Idempotency::new(
        store,
        IdempotencyConfig::builder()
            .key_expression("order_id")
            .key_prefix("replaying")
            .build()
            .expect("config"),
    );
    let seen: Seen = Default::default();
    let attempts = Counter::default();
    let order = {
        let (seen, attempts) = (seen.clone(), attempts.clone());
        idempotency.function("order", move |_: Value| {
            let (seen, attempt) = (seen.clone(), attempts.hit());
            async move {
                let fx = effects()?;
                let note = |point| seen.lock().expect("lock").push((point, fx.is_replaying()));
                note("start");
                fx.step("reserve_stock", |key| async move {
                    Ok::<_, std::io::Error>(key)
                })
                .await?;
                note("after the journaled step");
                if attempt == 1 {
                    return Err(Error::Handler(std::io::Error::other("warehouse timeout")));
                }
                fx.step("charge", |key| async move { Ok::<_, std::io::Error>(key) })
                    .await?;
                note("after the new step");
                Ok::<_, Failure>(json!("done"))
            }
        })
    };
    let event = json!({ "order_id": "r-1" });
    assert!(order.call(event.clone(), None).await.is_err());
    assert_eq!(
        std::mem::take(&mut *seen.lock().expect("lock")),
        [("start", false), ("after the journaled step", false)],
        "a first attempt replays nothing"
    );
    order.call(event, None).await.expect("the retry completes");
    assert_eq!(
        *seen.lock().expect("lock"),
        [
            ("start", true),
            ("after the journaled step", true),
            ("after the new step", false)
        ],
        "the retry replays until the step its first attempt never journaled"
    );
}

#[tokio::test]
async fn is_replaying_holds_until_the_first_step_missing_from_the_journal_on_the_memory_store() {
    replaying_until_the_first_step_missing_from_the_journal(MemoryStore::new()).await;
}

#[tokio::test]
async fn is_replaying_holds_until_the_first_step_missing_from_the_journal_on_dynamodb() {
    let table = default_table("steps-replaying").await;
    replaying_until_the_first_step_missing_from_the_journal(DynamoDbStore::new(client(), &table))
        .await;
}

/// A payments API that fails its first `failures` calls; it notes the key of
/// every call.
#[derive(Clone, Default)]
struct Flaky {
    failures: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    keys: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// When each call arrived (epoch milliseconds).
    arrivals: std::sync::Arc<std::sync::Mutex<Vec<i64>>>,
}

impl Flaky {
    fn failing(failures: usize) -> Self {
        let flaky = Self::default();
        flaky
            .failures
            .store(failures, std::sync::atomic::Ordering::SeqCst);
        flaky
    }
    async fn charge(&self, key: String) -> Result<String, std::io::Error> {
        self.keys.lock().expect("lock").push(key.clone());
        self.arrivals.lock().expect("lock").push(support::now_ms());
        let left = self.failures.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.failures
                .store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "payments unavailable",
            ));
        }
        Ok(format!("receipt-{key}"))
    }
    fn keys(&self) -> Vec<String> {
        self.keys.lock().expect("lock").clone()
    }
}

/// An order function whose one step charges `payments`, retried by `policy`.
fn charge_order<S: IdempotencyStore>(
    idempotency: &Idempotency<S>,
    payments: &Flaky,
    policy: lambda_idempotency::Retry<std::io::Error>,
) -> lambda_idempotency::IdempotentFunction<
    impl Fn(Value) -> futures_util::future::BoxFuture<'static, Result<Value, Failure>>,
    S,
> {
    let payments = payments.clone();
    idempotency.function("order", move |_: Value| {
        let (payments, policy) = (payments.clone(), policy.clone());
        Box::pin(async move {
            let receipt: String = effects()?
                .step("charge", |key| {
                    let payments = payments.clone();
                    async move { payments.charge(key).await }
                })
                .retry(policy)
                .await?;
            Ok::<_, Failure>(json!({ "receipt": receipt }))
        }) as futures_util::future::BoxFuture<'static, _>
    })
}

async fn a_retried_step_calls_again_with_its_key_and_journals_once<S: IdempotencyStore + Clone>(
    store: S,
) {
    use lambda_idempotency::Retry;
    use std::time::Duration;
    let idempotency = Idempotency::new(
        store,
        IdempotencyConfig::builder()
            .key_expression("order_id")
            .key_prefix("retry")
            .build()
            .expect("config"),
    );
    let payments = Flaky::failing(2);
    let order = charge_order(
        &idempotency,
        &payments,
        Retry::exponential(3, Duration::from_millis(20)),
    );
    let event = json!({ "order_id": "t-1" });
    let response = order
        .call(event.clone(), Some(&support::context(30_000)))
        .await
        .expect("the third attempt succeeds");
    let keys = payments.keys();
    assert_eq!(keys.len(), 3, "two failures, then the charge");
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "one derived key for every attempt: {keys:?}"
    );
    assert_eq!(
        response,
        json!({ "receipt": format!("receipt-{}", keys[0]) })
    );
    assert_eq!(order.call(event, None).await.expect("replay"), response);
    assert_eq!(payments.keys().len(), 3, "the replay calls nothing");
}

#[tokio::test]
async fn a_retried_step_calls_again_with_its_key_and_journals_once_on_the_memory_store() {
    a_retried_step_calls_again_with_its_key_and_journals_once(MemoryStore::new()).await;
}

#[tokio::test]
async fn a_retried_step_calls_again_with_its_key_and_journals_once_on_dynamodb() {
    let table = default_table("steps-retry").await;
    a_retried_step_calls_again_with_its_key_and_journals_once(DynamoDbStore::new(client(), &table))
        .await;
}

#[tokio::test]
async fn retries_stop_a_second_before_the_deadline() {
    use lambda_idempotency::Retry;
    use std::time::Duration;
    let idempotency = Idempotency::new(
        MemoryStore::new(),
        IdempotencyConfig::builder()
            .key_expression("order_id")
            .build()
            .expect("config"),
    );
    let payments = Flaky::failing(10);
    let order = charge_order(
        &idempotency,
        &payments,
        Retry::exponential(10, Duration::from_millis(300)),
    );
    // 1.8 s to the deadline, delays of 0.3 s doubling: about two attempts
    // fit before the last second; ten never do.
    let context = support::context(1_800);
    let deadline = context.deadline as i64;
    let result = order
        .call(json!({ "order_id": "d-1" }), Some(&context))
        .await;
    assert!(
        matches!(result, Err(Error::Handler(Error::Handler(_)))),
        "{result:?}"
    );
    let arrivals = payments.arrivals.lock().expect("lock").clone();
    assert!(
        (1..10).contains(&arrivals.len()),
        "stopped by the deadline, not the attempt limit: {arrivals:?}"
    );
    // A retry is decided a second and its delay before the deadline; the
    // timer may wake it a little late on a loaded machine.
    for at in &arrivals[1..] {
        assert!(
            *at < deadline - 1_000 + 250,
            "no retry starts within a second of the deadline: {} ms before it",
            deadline - at
        );
    }
    assert!(support::now_ms() < deadline, "gave up before the deadline");
}

#[tokio::test]
async fn an_error_the_policy_calls_permanent_compensates_and_is_stored() {
    use lambda_idempotency::{PermanentError, Retry};
    use std::time::Duration;
    let idempotency = Idempotency::new(
        MemoryStore::new(),
        IdempotencyConfig::builder()
            .key_expression("order_id")
            .build()
            .expect("config"),
    );
    let released = Counter::default();
    let payments = Flaky::failing(10);
    let order = {
        let (payments, released) = (payments.clone(), released.clone());
        idempotency.function("order", move |_: Value| {
            let (payments, released) = (payments.clone(), released.clone());
            async move {
                let fx = effects()?;
                let hold: String = fx
                    .step("reserve_stock", |key| async move {
                        Ok::<_, std::io::Error>(format!("hold-{key}"))
                    })
                    .compensate(move |hold: String, key| async move {
                        released.hit();
                        Ok::<_, std::io::Error>(json!({ "released": hold, "key": key }))
                    })
                    .await?;
                let receipt: String = fx
                    .step("charge", |key| {
                        let payments = payments.clone();
                        async move { payments.charge(key).await }
                    })
                    .retry(
                        Retry::exponential(5, Duration::from_millis(10)).permanent_if(
                            |e: &std::io::Error| {
                                (e.kind() == std::io::ErrorKind::TimedOut)
                                    .then(|| PermanentError::new("card declined"))
                            },
                        ),
                    )
                    .await?;
                Ok::<_, Failure>(json!({ "hold": hold, "receipt": receipt }))
            }
        })
    };
    let event = json!({ "order_id": "p-1" });
    let first = order.call(event.clone(), None).await;
    assert!(first.is_err(), "{first:?}");
    assert_eq!(payments.keys().len(), 1, "permanent: not retried");
    assert_eq!(released.get(), 1, "the stock hold was released");
    match order.call(event, None).await {
        Err(Error::Replayed(permanent)) => assert_eq!(permanent.message, "card declined"),
        other => panic!("the permanent failure is stored and replayed: {other:?}"),
    }
    assert_eq!(
        (payments.keys().len(), released.get()),
        (1, 1),
        "nothing runs again"
    );
}

async fn the_gate_runs_once_fences_late_tickets_and_replays<S: IdempotencyStore + Clone>(store: S) {
    use lambda_idempotency::{Claim, Ticket};
    use std::time::Duration;
    let idempotency = Idempotency::new(
        store.clone(),
        IdempotencyConfig::builder()
            .key_expression("order_id")
            .payload_validation("amount")
            .key_prefix("gate")
            .build()
            .expect("config"),
    );
    let gate = idempotency
        .gate("fulfilment")
        .holds_for(Duration::from_millis(1_500));
    let order = json!({ "order_id": "g-1", "amount": 10 });

    let Ok(Claim::Run(first)) = gate.claim::<_, Value>(&order).await else {
        panic!("the first claim runs");
    };
    assert!(matches!(
        gate.claim::<_, Value>(&order).await,
        Ok(Claim::InProgress)
    ));
    let other_payload = json!({ "order_id": "g-1", "amount": 99 });
    assert!(
        matches!(
            gate.claim::<_, Value>(&other_payload).await,
            Err(IdempotencyError::PayloadMismatch { .. })
        ),
        "a different payload under a claimed key is refused"
    );
    let record = store.get(first.key()).await.expect("get").expect("claimed");
    assert_eq!(
        (record.status, record.in_progress_expiration),
        (Status::InProgress, Some(first.held_until_ms()))
    );

    // The hold passes (the work died): the next claim takes over, resuming the
    // execution, and the first ticket is fenced out.
    while support::now_ms() <= first.held_until_ms() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Ok(Claim::Run(second)) = gate.claim::<_, Value>(&order).await else {
        panic!("a claim past its hold is taken over");
    };
    let carried: Ticket =
        serde_json::from_str(&serde_json::to_string(&second).expect("ticket")).expect("ticket");
    assert!(matches!(
        gate.complete(first.clone(), &json!("late")).await,
        Err(IdempotencyError::LostOwnership { .. })
    ));
    assert!(matches!(
        gate.release(first).await,
        Err(IdempotencyError::LostOwnership { .. })
    ));
    let taken_over = store
        .get(carried.key())
        .await
        .expect("get")
        .expect("record");
    assert_eq!(
        taken_over.status,
        Status::InProgress,
        "the late ticket wrote nothing"
    );
    assert_eq!(
        taken_over.execution, record.execution,
        "the takeover resumed the claim's execution"
    );
    assert_ne!(taken_over.owner, record.owner);

    gate.complete(carried, &json!({ "shipped": true }))
        .await
        .expect("the ticket carried as JSON completes");
    match gate.claim::<_, Value>(&order).await {
        Ok(Claim::Replayed(response)) => assert_eq!(response, json!({ "shipped": true })),
        other => panic!("completed: {other:?}"),
    }

    // A released claim lets the next one run.
    let job = json!({ "order_id": "g-2", "amount": 1 });
    let Ok(Claim::Run(ticket)) = gate.claim::<_, Value>(&job).await else {
        panic!("runs");
    };
    gate.release(ticket).await.expect("release");
    assert!(matches!(
        gate.claim::<_, Value>(&job).await,
        Ok(Claim::Run(_))
    ));
}

#[tokio::test]
async fn the_gate_runs_once_fences_late_tickets_and_replays_on_the_memory_store() {
    the_gate_runs_once_fences_late_tickets_and_replays(MemoryStore::new()).await;
}

#[tokio::test]
async fn the_gate_runs_once_fences_late_tickets_and_replays_on_dynamodb() {
    let table = default_table("gate").await;
    the_gate_runs_once_fences_late_tickets_and_replays(DynamoDbStore::new(client(), &table)).await;
}
