//! Steps that cannot be fooled: a resumed execution whose steps no longer match
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
