//! The cases nobody tries by hand: retries of retries, expiry, deadlines that are
//! not deadlines, records written by something else, writes retried after their
//! response was lost. Each test reproduces a defect found in review.

mod support;

use aws_sdk_dynamodb::types::AttributeValue;
use futures_util::future::BoxFuture;
use lambda_idempotency::IdempotentFunction;
use lambda_idempotency::{
    effects, ConfigError, Dispatcher, Error, Idempotency, IdempotencyConfig, IdempotencyError,
    IdempotencyRecord, IdempotencyStore, MemoryStore, OutboxMessage, Status,
};
use lambda_runtime::{service_fn, Context, LambdaEvent};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use support::faults::FaultStore;
use support::localstack::{client, default_table};
use support::{context, expire_in_place, in_progress, invoke, key_for, now_ms, Audit, Counter};
use tokio::sync::Notify;

type Failure = Error<std::io::Error>;
type Outcome = Result<Value, Error<Failure>>;

fn config() -> lambda_idempotency::IdempotencyConfigBuilder {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("test")
}

/// An order handler whose `plan` field scripts what this attempt does around its
/// one "charge" step; `charges` counts the calls that reached the payment API.
async fn scripted(event: Value, charges: Counter) -> Result<Value, Failure> {
    let fx = effects()?;
    match event["plan"].as_str() {
        Some("fail-before-step") => return Err(Error::Handler(std::io::Error::other("early"))),
        Some("other-step-first") => {
            fx.step("refund", |_| async {
                Ok::<_, std::io::Error>(json!("refund"))
            })
            .await?;
        }
        _ => {}
    }
    let charge: Value = fx
        .step("charge", |key| async move {
            Ok::<_, std::io::Error>(json!({ "charge": charges.hit(), "key": key }))
        })
        .await?;
    if event["plan"] == "fail-after-step" {
        return Err(Error::Handler(std::io::Error::other("after the charge")));
    }
    Ok(json!({ "order": event["order_id"], "charge": charge }))
}

/// [`scripted`] as the idempotent function `order`.
fn place_order<S: IdempotencyStore>(
    idempotency: &Idempotency<S>,
    charges: &Counter,
) -> IdempotentFunction<impl Fn(Value) -> BoxFuture<'static, Result<Value, Failure>>, S> {
    let charges = charges.clone();
    idempotency.function("order", move |event: Value| -> BoxFuture<'static, _> {
        Box::pin(scripted(event, charges.clone()))
    })
}

fn order(id: &str, plan: &str) -> Value {
    json!({ "order_id": id, "plan": plan })
}

#[tokio::test]
async fn a_retry_that_fails_before_its_first_step_keeps_the_journal() {
    for second_attempt in ["fail-before-step", "other-step-first"] {
        let idempotency = Idempotency::new(MemoryStore::new(), config().build().expect("config"));
        let charges = Counter::default();
        let place = place_order(&idempotency, &charges);

        let first: Outcome = place.call(order("j-1", "fail-after-step"), None).await;
        assert!(
            matches!(first, Err(Error::Handler(Error::Handler(_)))),
            "{first:?}"
        );
        let second: Outcome = place.call(order("j-1", second_attempt), None).await;
        match (second_attempt, &second) {
            ("fail-before-step", Err(Error::Handler(Error::Handler(_)))) => {}
            (
                "other-step-first",
                Err(Error::Idempotency(IdempotencyError::NonDeterministic { .. })),
            ) => {}
            _ => panic!("{second_attempt}: {second:?}"),
        }
        let third = place
            .call(order("j-1", "ok"), None)
            .await
            .expect("third attempt completes");

        assert_eq!(charges.get(), 1, "{second_attempt}: the charge ran once");
        assert_eq!(
            third["charge"]["charge"], 1,
            "the journaled charge is in the response"
        );
        let replay = place.call(order("j-1", "ok"), None).await.expect("replay");
        assert_eq!(replay, third);
    }
}

#[tokio::test]
async fn a_new_execution_after_expiry_runs_its_steps_afresh() {
    let store = MemoryStore::new();
    let idempotency = Idempotency::new(store.clone(), config().build().expect("config"));
    let charges = Counter::default();
    let place = place_order(&idempotency, &charges);
    let first = place.call(order("x-1", "ok"), None).await.expect("first");

    expire_in_place(&store, &key_for("test.order", "x-1")).await;

    let again = place
        .call(order("x-1", "ok"), None)
        .await
        .expect("runs again");
    assert_eq!(charges.get(), 2, "a new execution charges again");
    assert_eq!(again["charge"]["charge"], 2);
    assert_ne!(
        again["charge"]["key"], first["charge"]["key"],
        "a new execution derives new keys"
    );
}

#[tokio::test]
async fn steps_and_the_outbox_work_unprotected_when_disabled_or_the_key_is_missing() {
    let unprotected = [
        ("disabled", config().disabled(true)),
        ("no key", config().key_expression("missing_field")),
    ];
    for (case, builder) in unprotected {
        let store = MemoryStore::new();
        let audit = Audit::default();
        let idempotency = Idempotency::new(store.clone(), builder.build().expect("config"))
            .with_dispatcher(Dispatcher::new().with_sink("audit", audit.clone()));
        let charges = Counter::default();
        let place = {
            let charges = charges.clone();
            idempotency.function("order", move |event: Value| {
                let charges = charges.clone();
                async move {
                    let fx = effects()?;
                    assert_eq!(fx.idempotency_key(), None);
                    let charge: Value = fx
                        .step("charge", |key| async move {
                            Ok::<_, std::io::Error>(json!({ "charge": charges.hit(), "key": key }))
                        })
                        .await?;
                    let message = fx.outbox().push(OutboxMessage::Custom {
                        sink: "audit".into(),
                        payload: event,
                    });
                    Ok::<_, Failure>(json!({ "charge": charge, "message": message }))
                }
            })
        };

        let first = place.call(order("u-1", "ok"), None).await.expect(case);
        let second = place.call(order("u-1", "ok"), None).await.expect(case);

        assert_eq!(charges.get(), 2, "{case}: every call runs its steps");
        assert_ne!(
            first["charge"]["key"], second["charge"]["key"],
            "{case}: keys unique per call"
        );
        assert_eq!(
            audit.delivered(),
            vec![
                (
                    order("u-1", "ok"),
                    first["message"].as_str().unwrap_or_default().to_owned()
                ),
                (
                    order("u-1", "ok"),
                    second["message"].as_str().unwrap_or_default().to_owned()
                ),
            ],
            "{case}: messages delivered after each call, with their keys"
        );
        assert!(store.is_empty(), "{case}: nothing stored");
    }
}

async fn created(_: LambdaEvent<Value>) -> Result<Value, lambda_runtime::Error> {
    Ok(json!("created"))
}

#[tokio::test]
async fn two_handlers_never_share_a_key_prefix_unless_named_alike() {
    let store = MemoryStore::new();
    let idempotency = Idempotency::new(
        store.clone(),
        IdempotencyConfig::builder()
            .key_expression("order_id")
            .build()
            .expect("config"),
    );
    let mut create = idempotency
        .wrap(service_fn(created))
        .expect("the first handler");
    // The same handler again (a clone, a test) keeps the prefix.
    idempotency
        .wrap(service_fn(created))
        .expect("the same handler");
    let refused = idempotency
        .wrap(service_fn(|_: LambdaEvent<Value>| async {
            Ok::<_, lambda_runtime::Error>(json!("cancelled"))
        }))
        .map(|_| ())
        .expect_err("a second handler under the same prefix");
    assert!(
        matches!(&refused, ConfigError::SharedKeyPrefix { prefix } if prefix == "local"),
        "{refused}"
    );
    assert!(matches!(
        idempotency.layer(),
        Err(ConfigError::SharedKeyPrefix { .. })
    ));

    let mut cancel = idempotency.wrap_as(
        "cancel",
        service_fn(|_: LambdaEvent<Value>| async {
            Ok::<_, lambda_runtime::Error>(json!("cancelled"))
        }),
    );
    let event = json!({ "order_id": "p-1" });
    assert_eq!(
        invoke(&mut create, event.clone()).await.expect("create"),
        json!("created")
    );
    assert_eq!(
        invoke(&mut cancel, event).await.expect("cancel"),
        json!("cancelled")
    );
    // The default prefix is the function's name (`local` outside Lambda), never the code's path.
    for prefix in ["local", "local.cancel"] {
        assert!(
            store
                .get(&key_for(prefix, "p-1"))
                .await
                .expect("get")
                .is_some(),
            "{prefix}"
        );
    }
}

async fn cancelled(_: LambdaEvent<Value>) -> Result<Value, lambda_runtime::Error> {
    Ok(json!("cancelled"))
}

/// Two `Idempotency` values over one store in one process (a function that builds
/// one per handler), both under the default prefix: the records are the same, so
/// a second, different handler would replay the first one's responses (a cancel
/// answered "created"). It is refused when wrapped, whichever value wraps it.
#[tokio::test]
async fn a_second_handler_under_the_default_prefix_is_refused_whichever_idempotency_wraps_it() {
    let default_prefix = || {
        IdempotencyConfig::builder()
            .key_expression("order_id")
            .build()
            .expect("config")
    };
    let refused = |wrapped: Result<(), ConfigError>, case: &str| match wrapped {
        Err(ConfigError::SharedKeyPrefix { prefix }) => assert_eq!(prefix, "local", "{case}"),
        other => panic!("{case}: {other:?}"),
    };
    let store = MemoryStore::new();
    let first = Idempotency::new(store.clone(), default_prefix());
    let second = Idempotency::new(store.clone(), default_prefix());
    let mut create = first.wrap(service_fn(created)).expect("the first handler");
    refused(second.wrap(service_fn(cancelled)).map(|_| ()), "wrap");
    refused(second.layer().map(|_| ()), "layer");
    // The same handler through another value (a test that builds its own) is
    // the same handler: it shares the records and replays.
    let mut again = second.wrap(service_fn(created)).expect("the same handler");
    let event = json!({ "order_id": "d-1" });
    assert_eq!(
        invoke(&mut create, event.clone()).await.expect("create"),
        json!("created")
    );
    assert_eq!(
        invoke(&mut again, event.clone()).await.expect("replay"),
        json!("created")
    );
    assert_eq!(store.len(), 1);

    // A layer first: then no other handler, through any value.
    let layered = MemoryStore::new();
    Idempotency::new(layered.clone(), default_prefix())
        .layer()
        .expect("the first layer");
    let other = Idempotency::new(layered, default_prefix());
    refused(
        other.wrap(service_fn(created)).map(|_| ()),
        "wrap after a layer",
    );
    refused(other.layer().map(|_| ()), "a second layer");

    // Another store holds other records: nothing to share.
    let mut cancel = Idempotency::new(MemoryStore::new(), default_prefix())
        .wrap(service_fn(cancelled))
        .expect("another store");
    assert_eq!(
        invoke(&mut cancel, event.clone()).await.expect("cancel"),
        json!("cancelled")
    );
    // Two DynamoDB stores on one table are one store; another table is another.
    let table = |name: &str| {
        Idempotency::new(
            lambda_idempotency::DynamoDbStore::new(client(), name),
            default_prefix(),
        )
    };
    table("orders")
        .wrap(service_fn(created))
        .expect("the first handler on the table");
    refused(
        table("orders").wrap(service_fn(cancelled)).map(|_| ()),
        "the same table",
    );
    table("payments")
        .wrap(service_fn(cancelled))
        .expect("another table");

    // An explicit `key_prefix` shares records because the user said so.
    let named = || {
        Idempotency::new(
            store.clone(),
            IdempotencyConfig::builder()
                .key_expression("order_id")
                .key_prefix("orders")
                .build()
                .expect("config"),
        )
    };
    let mut create = named().wrap(service_fn(created)).expect("named");
    let mut cancel = named()
        .wrap(service_fn(cancelled))
        .expect("named alike on purpose");
    assert_eq!(
        invoke(&mut create, event.clone()).await.expect("create"),
        json!("created")
    );
    assert_eq!(
        invoke(&mut cancel, event).await.expect("shared"),
        json!("created")
    );
}

/// A handler that waits at a gate the first time it runs.
fn gated(
    idempotency: &Idempotency<impl IdempotencyStore>,
    entered: &Arc<Notify>,
    gate: &Arc<Notify>,
) -> lambda_idempotency::IdempotentFunction<
    impl Fn(Value) -> futures_util::future::BoxFuture<'static, Result<Value, std::io::Error>> + Clone,
    impl IdempotencyStore,
> {
    let (entered, gate, runs) = (entered.clone(), gate.clone(), Counter::default());
    let gated = idempotency.clone();
    gated.function(
        "slow",
        move |event: Value| -> futures_util::future::BoxFuture<'static, _> {
            let run = runs.hit();
            let (entered, gate) = (entered.clone(), gate.clone());
            Box::pin(async move {
                if run == 1 {
                    entered.notify_one();
                    gate.notified().await;
                }
                Ok(json!({ "order": event["order_id"], "run": run }))
            })
        },
    )
}

#[tokio::test]
async fn a_deadline_in_the_past_or_not_in_epoch_ms_falls_back_to_the_in_progress_timeout() {
    for (case, deadline) in [("Context::default()", 0u64), ("cargo-lambda", 600_000)] {
        let store = MemoryStore::new();
        let idempotency = Idempotency::new(
            store.clone(),
            config()
                .in_progress_timeout(Duration::from_secs(60))
                .build()
                .expect("config"),
        );
        let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let slow = Arc::new(gated(&idempotency, &entered, &gate));
        let mut ctx = Context::default();
        ctx.deadline = deadline;
        let first = tokio::spawn({
            let (slow, ctx) = (slow.clone(), ctx.clone());
            async move { slow.call(json!({ "order_id": case }), Some(&ctx)).await }
        });
        entered.notified().await;

        let duplicate = slow.call(json!({ "order_id": case }), Some(&ctx)).await;
        assert!(
            in_progress(&duplicate),
            "{case}: a duplicate must wait, got {duplicate:?}"
        );
        let record = store
            .get(&key_for("test.slow", case))
            .await
            .expect("get")
            .expect("reservation");
        let held_for = record.in_progress_expiration.unwrap_or_default() - now_ms();
        assert!(
            (55_000..=60_000).contains(&held_for),
            "{case}: held for {held_for} ms"
        );

        gate.notify_one();
        first
            .await
            .expect("join")
            .expect("the first call completes");
    }
}

#[tokio::test]
async fn a_real_deadline_with_no_time_left_is_honoured() {
    let store = MemoryStore::new();
    let idempotency = Idempotency::new(store.clone(), config().build().expect("config"));
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let slow = Arc::new(gated(&idempotency, &entered, &gate));
    let ctx = context(0);
    let first = tokio::spawn({
        let (slow, ctx) = (slow.clone(), ctx.clone());
        async move { slow.call(json!({ "order_id": "now" }), Some(&ctx)).await }
    });
    entered.notified().await;
    let record = store
        .get(&key_for("test.slow", "now"))
        .await
        .expect("get")
        .expect("reservation");
    assert_eq!(record.in_progress_expiration, Some(ctx.deadline as i64));
    gate.notify_one();
    first.await.expect("join").expect("completes");
}

#[tokio::test]
async fn a_reservation_refused_by_a_record_that_expired_meanwhile_is_retried_with_a_fresh_clock() {
    let store = MemoryStore::new();
    let idempotency = Idempotency::new(store.clone(), config().build().expect("config"));
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let slow = Arc::new(gated(&idempotency, &entered, &gate));
    let first = tokio::spawn({
        let slow = slow.clone();
        async move {
            slow.call(json!({ "order_id": "clock" }), Some(&context(150)))
                .await
        }
    });
    entered.notified().await;

    // Refused while the first reservation holds; the refusal arrives after it expired.
    let late_view = Idempotency::new(
        FaultStore::new(store.clone()).with_slow_refusals(Duration::from_millis(400)),
        config().build().expect("config"),
    );
    let retry = late_view
        .function("slow", |_: Value| async {
            Ok::<_, std::io::Error>(json!("retry ran"))
        })
        .call(json!({ "order_id": "clock" }), Some(&context(60_000)))
        .await
        .expect("the expired reservation is taken over, not reported in progress");
    assert_eq!(retry, json!("retry ran"));
    gate.notify_one();
    let late = first.await.expect("join");
    assert!(
        matches!(
            late,
            Err(Error::Idempotency(IdempotencyError::LostOwnership { .. }))
        ),
        "{late:?}"
    );
}

#[tokio::test]
async fn a_completed_record_without_a_json_response_is_malformed_not_null() {
    let store = MemoryStore::new();
    let idempotency = Idempotency::new(store.clone(), config().build().expect("config"));
    let charges = Counter::default();
    let place = place_order(&idempotency, &charges);
    place.call(order("m-1", "ok"), None).await.expect("first");
    let key = key_for("test.order", "m-1");
    let stored = store.get(&key).await.expect("get").expect("record");
    for data in [None, Some("not json".to_owned())] {
        let broken = IdempotencyRecord {
            data: data.clone(),
            ..stored.clone()
        };
        store.complete(&broken).await.expect("overwrite");
        let replay: Outcome = place.call(order("m-1", "ok"), None).await;
        match replay {
            Err(Error::Idempotency(IdempotencyError::MalformedRecord {
                key: k,
                attribute,
                ..
            })) => {
                assert_eq!(
                    (k.as_str(), attribute.as_str()),
                    (key.as_str(), "data"),
                    "{data:?}"
                );
            }
            other => panic!("{data:?}: {other:?}"),
        }
    }
    assert_eq!(charges.get(), 1, "the handler never ran again");
}

#[tokio::test]
async fn every_write_repeated_after_a_lost_response_is_recognised_as_ours() {
    let store = MemoryStore::new();
    let idempotency = Idempotency::new(
        FaultStore::new(store.clone()).repeating_writes(),
        config().build().expect("config"),
    );
    let charges = Counter::default();
    let place = place_order(&idempotency, &charges);
    // Reserve, journal, release (kept open), resume, complete: each written twice.
    let failed: Outcome = place.call(order("r-1", "fail-after-step"), None).await;
    assert!(
        matches!(failed, Err(Error::Handler(Error::Handler(_)))),
        "{failed:?}"
    );
    let done = place
        .call(order("r-1", "ok"), None)
        .await
        .expect("resumes and completes");
    assert_eq!((charges.get(), &done["charge"]["charge"]), (1, &json!(1)));
    // A release by delete, written twice: the key is free again.
    let early: Outcome = place.call(order("r-2", "fail-before-step"), None).await;
    assert!(
        matches!(early, Err(Error::Handler(Error::Handler(_)))),
        "{early:?}"
    );
    assert_eq!(
        store.get(&key_for("test.order", "r-2")).await.expect("get"),
        None
    );
    let record = store
        .get(&key_for("test.order", "r-1"))
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.status, Status::Completed);
}

/// A raw item in the default table layout.
fn item(pairs: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[tokio::test]
async fn items_written_by_something_else_are_typed_errors_that_never_run_the_handler() {
    let table = default_table("malformed").await;
    let idempotency = Idempotency::new(
        lambda_idempotency::DynamoDbStore::new(client(), &table),
        config().build().expect("config"),
    );
    let charges = Counter::default();
    let place = place_order(&idempotency, &charges);
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let n = |v: i64| AttributeValue::N(v.to_string());
    let later = now_ms() / 1000 + 3600;
    let past = now_ms() - 60_000;
    // (order id, the item's attributes besides its key, the attribute at fault)
    type Case<'a> = (&'a str, Vec<(&'a str, AttributeValue)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "status-number",
            vec![("status", n(1)), ("expiration", n(later))],
            "status",
        ),
        (
            "status-unknown",
            vec![("status", s("DONE")), ("expiration", n(later))],
            "status",
        ),
        (
            "no-expiration",
            vec![("status", s("COMPLETED")), ("data", s("{}"))],
            "expiration",
        ),
        (
            "expiration-text",
            vec![("status", s("INPROGRESS")), ("expiration", s("soon"))],
            "expiration",
        ),
        (
            "no-data",
            vec![("status", s("COMPLETED")), ("expiration", n(later))],
            "data",
        ),
        (
            "data-not-json",
            vec![
                ("status", s("COMPLETED")),
                ("expiration", n(later)),
                ("data", s("{oops")),
            ],
            "data",
        ),
        (
            "data-number",
            vec![
                ("status", s("COMPLETED")),
                ("expiration", n(later)),
                ("data", n(7)),
            ],
            "data",
        ),
        (
            "owner-bool",
            vec![
                ("status", s("INPROGRESS")),
                ("expiration", n(later)),
                ("owner", AttributeValue::Bool(true)),
            ],
            "owner",
        ),
        // Reservations past their deadline, which a takeover would replace: not
        // without a numeric `expiration`, with an owner token or without one (as
        // Powertools writes them).
        (
            "abandoned-no-expiration",
            vec![
                ("status", s("INPROGRESS")),
                ("in_progress_expiration", n(past)),
            ],
            "expiration",
        ),
        (
            "abandoned-expiration-text",
            vec![
                ("status", s("INPROGRESS")),
                ("expiration", s("soon")),
                ("in_progress_expiration", n(past)),
            ],
            "expiration",
        ),
        (
            "abandoned-owner-no-expiration",
            vec![
                ("status", s("INPROGRESS")),
                ("in_progress_expiration", n(past)),
                ("owner", s("another-tool")),
            ],
            "expiration",
        ),
        // With another execution's id (as this crate writes them), refused by the
        // execution clause too.
        (
            "abandoned-execution-no-expiration",
            vec![
                ("status", s("INPROGRESS")),
                ("in_progress_expiration", n(past)),
                ("owner", s("another-owner")),
                ("execution", s("another-execution")),
            ],
            "expiration",
        ),
    ];
    for (id, attributes, attribute) in cases {
        let key = key_for("test.order", id);
        let mut raw = item(&attributes);
        raw.insert("id".into(), s(&key));
        client()
            .put_item()
            .table_name(&table)
            .set_item(Some(raw.clone()))
            .send()
            .await
            .expect("put");

        let outcome: Outcome = place.call(order(id, "ok"), None).await;
        match &outcome {
            Err(Error::Idempotency(IdempotencyError::MalformedRecord {
                key: k,
                attribute: a,
                ..
            })) => {
                assert_eq!((k.as_str(), a.as_str()), (key.as_str(), attribute), "{id}");
                let text = outcome.as_ref().map(|_| ()).expect_err("error").to_string();
                assert!(
                    text.contains(&key) && text.contains("delete or repair the item"),
                    "{text}"
                );
            }
            other => panic!("{id}: {other:?}"),
        }
        let after = client()
            .get_item()
            .table_name(&table)
            .key("id", s(&key))
            .send()
            .await
            .expect("get");
        assert_eq!(after.item(), Some(&raw), "{id}: the item is left as it was");
    }
    assert_eq!(charges.get(), 0, "the handler never ran");

    // The operator's recovery for an item that never expires: delete it.
    let key = key_for("test.order", "no-expiration");
    client()
        .delete_item()
        .table_name(&table)
        .key("id", s(&key))
        .send()
        .await
        .expect("delete");
    place
        .call(order("no-expiration", "ok"), None)
        .await
        .expect("runs once deleted");
    assert_eq!(charges.get(), 1);
}

/// A reservation another tool left past its deadline with a numeric
/// `expiration` (as Powertools writes one: no owner, no execution id) is taken
/// over on both stores: the handler runs once and the record becomes ours. The
/// same item without a numeric `expiration` is malformed and left alone (above);
/// the memory store cannot hold one, its records being typed.
#[tokio::test]
async fn a_foreign_reservation_past_its_deadline_is_taken_over_on_both_stores() {
    let (later, past) = (now_ms() / 1000 + 3600, now_ms() - 60_000);
    let key = key_for("test.order", "foreign");
    let memory = MemoryStore::new();
    let foreign = IdempotencyRecord {
        key: key.clone(),
        status: Status::InProgress,
        expiration: later,
        in_progress_expiration: Some(past),
        data: None,
        validation: None,
        owner: String::new(),
        is_error: false,
        execution: String::new(),
    };
    memory.reserve(&foreign, now_ms()).await.expect("put");
    taken_over(memory, &key).await;

    let table = default_table("foreign").await;
    client()
        .put_item()
        .table_name(&table)
        .set_item(Some(item(&[
            ("id", AttributeValue::S(key.clone())),
            ("status", AttributeValue::S("INPROGRESS".into())),
            ("expiration", AttributeValue::N(later.to_string())),
            (
                "in_progress_expiration",
                AttributeValue::N(past.to_string()),
            ),
        ])))
        .send()
        .await
        .expect("put");
    taken_over(
        lambda_idempotency::DynamoDbStore::new(client(), &table),
        &key,
    )
    .await;
}

/// Calls the `order` function for the order `foreign` on `store`, which holds an
/// abandoned reservation of it: the handler runs and the record is ours.
async fn taken_over<S: IdempotencyStore>(store: S, key: &str) {
    let idempotency = Idempotency::new(store, config().build().expect("config"));
    let charges = Counter::default();
    let outcome: Outcome = place_order(&idempotency, &charges)
        .call(order("foreign", "ok"), None)
        .await;
    outcome.expect("taken over");
    assert_eq!(charges.get(), 1, "the handler ran");
    let record = idempotency
        .store()
        .get(key)
        .await
        .expect("get")
        .expect("record");
    assert_eq!(record.status, Status::Completed);
    assert!(!record.owner.is_empty(), "ours now");
}

#[test]
fn an_event_nested_ten_thousand_deep_gives_a_key_or_a_typed_error_not_an_overflow() {
    // A value built in code (serde_json's parser stops at 128 levels), on a thread
    // with the 2 MiB stack of a test.
    let outcome = std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(|| {
            let mut deep = json!("bottom");
            for _ in 0..10_000 {
                deep = Value::Array(vec![deep]);
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let idempotency = Idempotency::new(
                    MemoryStore::new(),
                    IdempotencyConfig::builder()
                        .key_prefix("deep")
                        .build()
                        .expect("config"),
                );
                let echo = idempotency.function("echo", |_: Value| async {
                    Ok::<_, std::io::Error>(json!("ran"))
                });
                let outcome = echo.call(deep, None).await.map_err(|e| e.to_string());
                // Taken apart level by level: dropping it is not under test.
                outcome
            })
        })
        .expect("thread")
        .join()
        .expect("no stack overflow");
    assert_eq!(
        outcome,
        Ok(json!("ran")),
        "the whole event is the key material"
    );
}

#[tokio::test]
async fn integers_beyond_64_bits_never_share_a_key() {
    let idempotency = Idempotency::new(MemoryStore::new(), config().build().expect("config"));
    let echo = idempotency.function("echo", |event: Value| async move {
        Ok::<_, std::io::Error>(json!({ "echo": event["note"] }))
    });
    // As lambda_runtime parses them from the wire.
    let first: Value =
        serde_json::from_str(r#"{"order_id": 18446752753646647040, "note": "first"}"#)
            .expect("json");
    let second: Value =
        serde_json::from_str(r#"{"order_id": 18446752753646647041, "note": "second"}"#)
            .expect("json");
    let (first, second) = (echo.call(first, None).await, echo.call(second, None).await);
    // serde_json rounded both to one f64: refused, never confused. (With
    // `exact-numbers` both are distinct keys: the library's unit tests cover
    // that build, which this package cannot be, see its Cargo.toml.)
    for outcome in [first, second] {
        match outcome {
            Err(Error::Idempotency(IdempotencyError::InvalidEvent(reason))) => {
                assert!(reason.contains("exact-numbers"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
