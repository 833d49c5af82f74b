//! The DynamoDB store against LocalStack, with the real SDK over HTTP.
//!
//! `scripts/test.sh` makes sure LocalStack answers (at `AWS_ENDPOINT_URL`, default
//! `http://127.0.0.1:4566`). Every test creates its own table.

mod support;

use aws_sdk_dynamodb::types::AttributeValue;
use lambda_idempotency::store::{AttributeNames, KeyLayout};
use lambda_idempotency::{
    DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyError, PermanentError,
};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use support::localstack::{
    client, create_table, default_table, recorded_client, s, scan, table_name, Requests,
};
use support::{
    context, counting_service, idempotency_error, in_progress, incompressible, invoke, key_for,
    now_ms, poll, spawn_call, Counter,
};
use tokio::sync::Notify;
use tower::{Service, ServiceExt};

type BoxError = lambda_runtime::Error;
type Item = HashMap<String, AttributeValue>;

fn config() -> lambda_idempotency::IdempotencyConfigBuilder {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("orders")
}

/// A store on a fresh default table, with its requests recorded.
async fn recorded_store(test: &str) -> (DynamoDbStore, Requests, String) {
    let table = default_table(test).await;
    let (client, requests) = recorded_client();
    (DynamoDbStore::new(client, &table), requests, table)
}

fn n(item: &Item, name: &str) -> i64 {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not an N attribute in {item:?}"))
}

#[tokio::test]
async fn requests_per_invocation_first_two_replay_one_cached_zero_error_two() {
    let (store, requests, _) = recorded_store("counts").await;
    let runs = Counter::default();
    let cached = Idempotency::new(
        store.clone(),
        config().local_cache(16).build().expect("config"),
    );
    let uncached = Idempotency::new(store.clone(), config().build().expect("config"));
    let mut cached_service = counting_service(&cached, &runs);
    let mut uncached_service = counting_service(&uncached, &runs);

    let first = invoke(&mut cached_service, json!({"order_id": "n-1"}))
        .await
        .expect("first");
    assert_eq!(
        requests.take(),
        ["PutItem", "PutItem"],
        "first execution: reserve + complete"
    );

    let replay = invoke(&mut uncached_service, json!({"order_id": "n-1"}))
        .await
        .expect("replay");
    assert_eq!(
        requests.take(),
        ["PutItem"],
        "replay: the refused reserve returns the record"
    );
    assert_eq!(
        serde_json::to_vec(&replay).expect("json"),
        serde_json::to_vec(&first).expect("json")
    );

    let cached_replay = invoke(&mut cached_service, json!({"order_id": "n-1"}))
        .await
        .expect("cached replay");
    assert_eq!(
        requests.take(),
        Vec::<String>::new(),
        "cached replay: no request"
    );
    assert_eq!(cached_replay, first);
    assert_eq!(runs.get(), 1);

    let failing = cached.wrap_as(
        "failing",
        service_fn(|_: LambdaEvent<Value>| async {
            Err::<Value, BoxError>(std::io::Error::other("downstream timeout").into())
        }),
    );
    let err = invoke(&mut failing.clone(), json!({"order_id": "n-2"}))
        .await
        .expect_err("handler error");
    assert_eq!(err.to_string(), "downstream timeout");
    assert_eq!(
        requests.take(),
        ["PutItem", "DeleteItem"],
        "handler error: reserve + release"
    );
}

#[tokio::test]
async fn items_follow_the_powertools_schema() {
    let (store, _, table) = recorded_store("schema").await;
    let validated = config()
        .payload_validation("amount")
        .build()
        .expect("config");
    let idempotency = Idempotency::new(store, validated);
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let mut service = {
        let (entered, gate) = (entered.clone(), gate.clone());
        idempotency
            .wrap(service_fn(move |event: LambdaEvent<Value>| {
                let (entered, gate) = (entered.clone(), gate.clone());
                async move {
                    entered.notify_one();
                    gate.notified().await;
                    Ok::<_, BoxError>(json!({"paid": event.payload["amount"]}))
                }
            }))
            .expect("one handler per key prefix")
    };
    let ctx = context(30_000);
    let deadline = ctx.deadline as i64;
    let call = service.ready().await.expect("ready").call(LambdaEvent::new(
        json!({"order_id": "s-1", "amount": 42}),
        ctx,
    ));
    let running = tokio::spawn(call);
    entered.notified().await;

    let key = key_for("orders", "s-1");
    let items = scan(&table).await;
    assert_eq!(items.len(), 1);
    let reserved = &items[0];
    assert_eq!(s(reserved, "id"), key);
    assert_eq!(s(reserved, "status"), "INPROGRESS");
    assert_eq!(
        n(reserved, "in_progress_expiration"),
        deadline,
        "epoch ms, from the Lambda deadline"
    );
    assert!(!reserved.contains_key("data"));

    gate.notify_one();
    let response = running.await.expect("join").expect("handler");
    let items = scan(&table).await;
    assert_eq!(items.len(), 1);
    let done = &items[0];
    assert_eq!(s(done, "id"), key);
    assert_eq!(s(done, "status"), "COMPLETED");
    assert_eq!(
        s(done, "data"),
        serde_json::to_string(&response).expect("json")
    );
    let ttl = n(done, "expiration") - (now_ms() / 1000 + 3600);
    assert!(
        ttl.abs() <= 5,
        "expiration is epoch seconds an hour ahead (off by {ttl}s)"
    );
    let validation = s(done, "validation");
    assert_eq!(validation.len(), 64);
    assert!(
        validation.chars().all(|c| c.is_ascii_hexdigit()),
        "{validation}"
    );
    assert_eq!(
        s(done, "owner"),
        s(reserved, "owner"),
        "completed under its own reservation"
    );
}

#[tokio::test]
async fn a_different_payload_is_refused_from_the_record_returned_by_the_failed_put() {
    let (store, requests, _) = recorded_store("mismatch").await;
    let validated = config()
        .payload_validation("[amount, currency]")
        .build()
        .expect("config");
    let runs = Counter::default();
    let mut service = counting_service(&Idempotency::new(store, validated), &runs);

    invoke(
        &mut service,
        json!({"order_id": "m-1", "amount": 5, "currency": "EUR"}),
    )
    .await
    .expect("first");
    requests.take();
    let err = invoke(
        &mut service,
        json!({"order_id": "m-1", "amount": 6, "currency": "EUR"}),
    )
    .await
    .expect_err("refused");
    assert!(
        matches!(
            idempotency_error(&err),
            IdempotencyError::PayloadMismatch { .. }
        ),
        "{err}"
    );
    assert_eq!(requests.take(), ["PutItem"], "no extra read");
    assert_eq!(runs.get(), 1);
}

/// `lambda_runtime::run_concurrent` in miniature: clones of one service on four
/// threads, one DynamoDB client, one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_calls_run_the_handler_once() {
    const CALLS: usize = 50;
    let (store, requests, table) = recorded_store("concurrent").await;
    let idempotency = Idempotency::new(store, config().build().expect("config"));
    let gate = Arc::new(Notify::new());
    let runs = Counter::default();
    let service = {
        let (gate, runs) = (gate.clone(), runs.clone());
        idempotency
            .wrap(service_fn(move |_: LambdaEvent<Value>| {
                runs.hit();
                let gate = gate.clone();
                async move {
                    gate.notified().await;
                    Ok::<_, BoxError>(json!({"shipped": true}))
                }
            }))
            .expect("one handler per key prefix")
    };

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..CALLS {
        let (call, tx) = (spawn_call(&service, json!({"order_id": "c-1"})), tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(call.await.expect("join"));
        });
    }
    // While the one handler is held, every other call is refused.
    for _ in 0..CALLS - 1 {
        let err = rx
            .recv()
            .await
            .expect("result")
            .expect_err("only one call runs");
        assert!(err.contains("already in progress"), "{err}");
    }
    gate.notify_one();
    assert_eq!(
        rx.recv().await.expect("result").expect("the running call"),
        json!({"shipped": true})
    );
    assert_eq!(runs.get(), 1);
    assert_eq!(
        requests.count(),
        CALLS + 1,
        "50 reserves and one completion"
    );

    // Completed: another 50 at once all replay.
    let replays: Vec<_> = (0..CALLS)
        .map(|_| spawn_call(&service, json!({"order_id": "c-1"})))
        .collect();
    for replay in replays {
        assert_eq!(
            replay.await.expect("join").expect("replayed"),
            json!({"shipped": true})
        );
    }
    assert_eq!(runs.get(), 1);
    assert_eq!(scan(&table).await.len(), 1);
}

#[tokio::test]
async fn a_timed_out_reservation_is_taken_over_and_the_late_owner_cannot_write_or_delete() {
    let (store, _, table) = recorded_store("takeover").await;
    let idempotency = Idempotency::new(store, config().build().expect("config"));
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let runs = Counter::default();
    let work = {
        let (entered, gate, runs) = (entered.clone(), gate.clone(), runs.clone());
        Arc::new(idempotency.function("work", move |event: Value| {
            let run = runs.hit();
            let (entered, gate) = (entered.clone(), gate.clone());
            async move {
                if run % 2 == 1 {
                    entered.notify_one();
                    gate.notified().await;
                }
                match event["fail"].as_bool() {
                    Some(true) => Err(std::io::Error::other("late failure")),
                    _ => Ok(json!({"run": run})),
                }
            }
        }))
    };

    for (order_id, late_fails) in [("t-complete", false), ("t-release", true)] {
        // The first call's deadline passes while it runs: it timed out, as far as
        // anyone knows.
        let late = tokio::spawn({
            let (work, event) = (
                work.clone(),
                json!({"order_id": order_id, "fail": late_fails}),
            );
            async move { work.call(event, Some(&context(300))).await }
        });
        entered.notified().await;
        let fresh = context(60_000);
        let winner = poll(
            || work.call(json!({"order_id": order_id}), Some(&fresh)),
            in_progress,
        )
        .await
        .expect("takeover");
        let key = key_for("orders.work", order_id);
        let item_of = |items: Vec<Item>| {
            items
                .into_iter()
                .find(|item| s(item, "id") == key)
                .expect("record")
        };
        let before = item_of(scan(&table).await);
        assert_eq!(
            s(&before, "data"),
            serde_json::to_string(&winner).expect("json")
        );

        gate.notify_one();
        match (late_fails, late.await.expect("join")) {
            (false, Err(Error::Idempotency(IdempotencyError::LostOwnership { .. }))) => {}
            (true, Err(Error::Handler(e))) => assert_eq!(e.to_string(), "late failure"),
            (_, other) => panic!("{order_id}: unexpected {other:?}"),
        }
        assert_eq!(
            item_of(scan(&table).await),
            before,
            "{order_id}: the new owner's record is untouched"
        );
    }
    assert_eq!(runs.get(), 4);
}

#[tokio::test]
async fn an_expired_record_still_in_the_table_counts_as_absent() {
    let (store, _, table) = recorded_store("expired").await;
    let runs = Counter::default();
    let mut service = counting_service(
        &Idempotency::new(store, config().build().expect("config")),
        &runs,
    );
    // What DynamoDB TTL leaves behind for days: an expired item, not yet deleted.
    let key = key_for("orders", "e-1");
    let stale = HashMap::from([
        ("id".to_owned(), AttributeValue::S(key.clone())),
        ("status".to_owned(), AttributeValue::S("COMPLETED".into())),
        (
            "expiration".to_owned(),
            AttributeValue::N((now_ms() / 1000 - 60).to_string()),
        ),
        ("data".to_owned(), AttributeValue::S("\"stale\"".into())),
    ]);
    client()
        .put_item()
        .table_name(&table)
        .set_item(Some(stale))
        .send()
        .await
        .expect("put stale item");

    let response = invoke(&mut service, json!({"order_id": "e-1"}))
        .await
        .expect("runs");
    assert_eq!(response, json!({"order": "e-1", "run": 1}));
    assert_eq!(runs.get(), 1);
    let items = scan(&table).await;
    assert_eq!(items.len(), 1);
    assert!(n(&items[0], "expiration") > now_ms() / 1000);
}

#[tokio::test]
async fn a_composite_key_table_with_custom_attribute_names() {
    let table = table_name("composite");
    create_table(&client(), &table, "pk", Some("sk"), "ttl").await;
    let names = AttributeNames {
        key: "sk".into(),
        expiration: "ttl".into(),
        in_progress_expiration: "lease_until".into(),
        status: "state".into(),
        data: "response".into(),
        validation: "payload_hash".into(),
        owner: "lease_owner".into(),
        error: "is_error".into(),
        step: "step_name".into(),
        execution: "run".into(),
        derived_key: "effect_key".into(),
        data_encoding: "response_encoding".into(),
    };
    let layout = KeyLayout::Composite {
        partition_key: "pk".into(),
        partition_value: "idempotency#orders".into(),
    };
    let store = DynamoDbStore::new(client(), &table)
        .with_attribute_names(names)
        .with_key_layout(layout);
    let idempotency = Idempotency::new(
        store,
        config()
            .payload_validation("amount")
            .replay_permanent_errors(true)
            .build()
            .expect("config"),
    );
    let runs = Counter::default();
    let mut service = counting_service(&idempotency, &runs);

    let first = invoke(&mut service, json!({"order_id": "k-1", "amount": 1}))
        .await
        .expect("first");
    assert_eq!(
        invoke(&mut service, json!({"order_id": "k-1", "amount": 1}))
            .await
            .expect("replay"),
        first
    );
    let err = invoke(&mut service, json!({"order_id": "k-1", "amount": 2}))
        .await
        .expect_err("mismatch");
    assert!(
        matches!(
            idempotency_error(&err),
            IdempotencyError::PayloadMismatch { .. }
        ),
        "{err}"
    );
    assert_eq!(runs.get(), 1);

    let declined = idempotency.wrap_as(
        "declined",
        service_fn(|_: LambdaEvent<Value>| async {
            Err::<Value, BoxError>(PermanentError::new("card declined").into())
        }),
    );
    for attempt in ["handler", "replay"] {
        let err = invoke(
            &mut declined.clone(),
            json!({"order_id": "k-2", "amount": 1}),
        )
        .await
        .expect_err("declined");
        // First the handler's own error; then the stored one, replayed.
        let message = match (attempt, &err) {
            ("handler", Error::Handler(e)) => {
                e.downcast_ref::<PermanentError>().map(|p| &p.message)
            }
            ("replay", Error::Replayed(p)) => Some(&p.message),
            _ => None,
        };
        assert_eq!(
            message.map(String::as_str),
            Some("card declined"),
            "{attempt}: {err:?}"
        );
    }

    let mut items = scan(&table).await;
    items.sort_by_key(|item| s(item, "sk").to_owned());
    assert_eq!(items.len(), 2);
    let mut expected = [key_for("orders", "k-1"), key_for("orders.declined", "k-2")];
    expected.sort();
    for (item, key) in items.iter().zip(&expected) {
        assert_eq!(s(item, "pk"), "idempotency#orders");
        assert_eq!(s(item, "sk"), key);
        assert_eq!(s(item, "state"), "COMPLETED");
        for name in [
            "ttl",
            "lease_until",
            "response",
            "payload_hash",
            "lease_owner",
            "run",
        ] {
            assert!(item.contains_key(name), "{name} missing from {item:?}");
        }
        for default_name in ["id", "expiration", "status", "data", "validation", "owner"] {
            assert!(
                !item.contains_key(default_name),
                "{default_name} in {item:?}"
            );
        }
    }
    let error_item = items
        .iter()
        .find(|item| s(item, "sk") == key_for("orders.declined", "k-2"))
        .expect("error record");
    assert_eq!(
        error_item.get("is_error"),
        Some(&AttributeValue::Bool(true))
    );
}

#[tokio::test]
async fn responses_near_the_item_limit_are_stored_and_larger_ones_refused() {
    let (store, requests, table) = recorded_store("size").await;
    let idempotency = Idempotency::new(store, config().build().expect("config"));
    let runs = Counter::default();
    let mut service = {
        let runs = runs.clone();
        idempotency
            .wrap(service_fn(move |event: LambdaEvent<Value>| {
                runs.hit();
                let kib = event.payload["kib"].as_u64().unwrap_or(0) as usize;
                // Past the limit, text that stays over it gzip-compressed too (the
                // `compress-responses` feature would store "x"s compressed).
                let blob = match kib {
                    0..=400 => "x".repeat(kib * 1024),
                    _ => incompressible(kib * 1024, 2),
                };
                async move { Ok::<_, BoxError>(json!({ "blob": blob })) }
            }))
            .expect("one handler per key prefix")
    };

    let fits = invoke(&mut service, json!({"order_id": "z-1", "kib": 390}))
        .await
        .expect("390 KiB fits");
    let replay = invoke(&mut service, json!({"order_id": "z-1", "kib": 390}))
        .await
        .expect("replayed");
    assert_eq!(
        serde_json::to_vec(&replay).expect("json"),
        serde_json::to_vec(&fits).expect("json")
    );
    requests.take();

    let err = invoke(&mut service, json!({"order_id": "z-2", "kib": 600}))
        .await
        .expect_err("too large");
    assert!(
        matches!(
            idempotency_error(&err),
            IdempotencyError::ResponseTooLarge { .. }
        ),
        "{err}"
    );
    assert_eq!(
        requests.take(),
        ["PutItem", "DeleteItem"],
        "refused before the write, reservation released"
    );
    assert_eq!(scan(&table).await.len(), 1, "only the record that fits");
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_store_failure_is_a_typed_error_carrying_the_sdk_error_and_the_handler_does_not_run() {
    let store = DynamoDbStore::new(client(), table_name("does-not-exist"));
    let runs = Counter::default();
    let mut service = counting_service(
        &Idempotency::new(store, config().build().expect("config")),
        &runs,
    );
    let err = invoke(&mut service, json!({"order_id": "f-1"}))
        .await
        .expect_err("no table");
    let IdempotencyError::Store(source) = idempotency_error(&err) else {
        panic!("{err}")
    };
    // The text names the operation and DynamoDB's error code and message.
    let text = err.to_string();
    assert!(
        text.contains("DynamoDB PutItem (reserve) failed: ResourceNotFoundException: ")
            && text.len()
                > "DynamoDB PutItem (reserve) failed: ResourceNotFoundException: ".len() + 40,
        "{text}"
    );
    let sdk = std::error::Error::source(source.as_ref())
        .expect("the SDK error as the source")
        .downcast_ref::<aws_sdk_dynamodb::error::SdkError<aws_sdk_dynamodb::operation::put_item::PutItemError>>()
        .expect("the SDK error");
    assert!(
        sdk.as_service_error()
            .is_some_and(|e| e.is_resource_not_found_exception()),
        "{sdk:?}"
    );
    assert_eq!(runs.get(), 0);
}
