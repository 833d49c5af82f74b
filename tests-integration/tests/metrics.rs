//! The counts, read back from the CloudWatch Embedded Metric Format lines the
//! `emf` recorder writes, for a scripted sequence of calls against LocalStack:
//! first, replay, payload mismatch, conflict, takeover, lost ownership, expired
//! record, handler error, missing key; then observe-only mode, metrics turned off,
//! steps replayed and re-issued, outbox delivered and left for the relay, a stored
//! permanent error, a store error, an SQS batch's counts, and the `EmfLayer`
//! flushing after each invocation.
//!
//! One test: the recorder is global to the process and a flush drains every
//! counter.

mod support;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_dynamodb::types::AttributeValue;
use lambda_idempotency::emf::{self, EmfLayer};
use lambda_idempotency::{
    effects, Dispatcher, DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyError,
    OutboxMessage, PermanentError,
};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use support::localstack::{client, default_table};
use support::{context, key_for, now_ms, Audit, Counter};
use tokio::sync::Notify;
use tower::{Service, ServiceBuilder, ServiceExt};

const NAMESPACE: &str = "IdempotencyTest";

fn config(prefix: &str) -> lambda_idempotency::IdempotencyConfigBuilder {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        .payload_validation("amount")
        .key_prefix(prefix)
}

/// The EMF documents in `text`, checked for the format's structure, as
/// (dimensions, metric values).
fn documents(text: &str) -> Vec<(BTreeMap<String, String>, BTreeMap<String, u64>)> {
    text.lines()
        .map(|line| {
            let doc: Value = serde_json::from_str(line).expect("each line is a JSON document");
            let directive = &doc["_aws"]["CloudWatchMetrics"][0];
            assert_eq!(directive["Namespace"], NAMESPACE);
            assert!(doc["_aws"]["Timestamp"].is_u64(), "{doc}");
            let dimension_names: Vec<String> =
                serde_json::from_value(directive["Dimensions"][0].clone()).expect("dimensions");
            let dimensions = dimension_names
                .iter()
                .map(|name| {
                    let value = doc[name].as_str().expect("dimension value").to_owned();
                    (name.clone(), value)
                })
                .collect();
            let metrics = directive["Metrics"]
                .as_array()
                .expect("metrics")
                .iter()
                .map(|metric| {
                    let name = metric["Name"].as_str().expect("metric name").to_owned();
                    let value = doc[&name].as_u64().expect("a count");
                    (name, value)
                })
                .collect();
            (dimensions, metrics)
        })
        .collect()
}

/// The counts flushed for `handler` in `mode`, by metric name.
fn counts(text: &str, handler: &str, mode: &str) -> BTreeMap<String, u64> {
    let function = std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "local".into());
    let mut counts = BTreeMap::new();
    for (dimensions, metrics) in documents(text) {
        if dimensions.get("handler").map(String::as_str) != Some(handler)
            || dimensions.get("mode").map(String::as_str) != Some(mode)
        {
            continue;
        }
        assert_eq!(dimensions.len(), 3, "{dimensions:?}");
        assert_eq!(dimensions["function"], function);
        for (name, value) in metrics {
            *counts.entry(name).or_default() += value;
        }
    }
    counts
}

fn expected(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs
        .iter()
        .map(|(name, n)| (format!("idempotency.{name}"), *n))
        .collect()
}

fn flush(collector: &emf::Collector) -> String {
    let mut out = Vec::new();
    collector.flush(&mut out).expect("flush");
    String::from_utf8(out).expect("utf-8")
}

#[tokio::test]
async fn emf_lines_count_each_outcome_of_a_scripted_sequence() {
    let collector = emf::install(NAMESPACE).expect("the only recorder of this test binary");
    let table = default_table("metrics").await;
    let store = DynamoDbStore::new(client(), &table);

    // A handler that counts its runs, holds at a gate when asked, fails when asked.
    let runs = Counter::default();
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = {
        let (runs, entered, gate) = (runs.clone(), entered.clone(), gate.clone());
        move |event: Value| {
            let run = runs.hit();
            let (entered, gate) = (entered.clone(), gate.clone());
            async move {
                if event["hold"] == json!(true) {
                    entered.notify_one();
                    gate.notified().await;
                }
                match event["fail"] == json!(true) {
                    true => Err(std::io::Error::other("handler failed")),
                    false => Ok(json!({"run": run})),
                }
            }
        }
    };
    let idempotency = Idempotency::new(store.clone(), config("orders").build().expect("config"));
    let work = Arc::new(idempotency.function("work", handler.clone()));
    let call = |event: Value, ms_left: i64| {
        let work = work.clone();
        async move { work.call(event, Some(&context(ms_left))).await }
    };

    // first, replay, a different payload
    call(json!({"order_id": "m-1", "amount": 1}), 60_000)
        .await
        .expect("first");
    call(json!({"order_id": "m-1", "amount": 1}), 60_000)
        .await
        .expect("replay");
    let mismatch = call(json!({"order_id": "m-1", "amount": 2}), 60_000).await;
    assert!(matches!(
        mismatch,
        Err(Error::Idempotency(IdempotencyError::PayloadMismatch { .. }))
    ));

    // a duplicate while the first holds the key
    let held = tokio::spawn(call(
        json!({"order_id": "m-2", "amount": 1, "hold": true}),
        60_000,
    ));
    entered.notified().await;
    let conflict = call(json!({"order_id": "m-2", "amount": 1}), 60_000).await;
    assert!(matches!(
        conflict,
        Err(Error::Idempotency(
            IdempotencyError::AlreadyInProgress { .. }
        ))
    ));
    gate.notify_one();
    held.await.expect("join").expect("the holder completes");

    // an attempt outlives its deadline: taken over, then fenced off when it ends
    let late = tokio::spawn(call(
        json!({"order_id": "m-3", "amount": 1, "hold": true}),
        300,
    ));
    entered.notified().await;
    let deadline = now_ms() + 300;
    while now_ms() <= deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    call(json!({"order_id": "m-3", "amount": 1}), 60_000)
        .await
        .expect("takeover");
    gate.notify_one();
    assert!(matches!(
        late.await.expect("join"),
        Err(Error::Idempotency(IdempotencyError::LostOwnership { .. }))
    ));

    // an expired record still in the table (TTL deletes late)
    client()
        .put_item()
        .table_name(&table)
        .set_item(Some(HashMap::from([
            (
                "id".to_owned(),
                AttributeValue::S(key_for("orders.work", "m-4")),
            ),
            ("status".to_owned(), AttributeValue::S("COMPLETED".into())),
            (
                "expiration".to_owned(),
                AttributeValue::N((now_ms() / 1000 - 60).to_string()),
            ),
            ("data".to_owned(), AttributeValue::S("\"stale\"".into())),
        ])))
        .send()
        .await
        .expect("put an expired record");
    call(json!({"order_id": "m-4", "amount": 1}), 60_000)
        .await
        .expect("re-executed");

    // a handler error, and an event without key material (lenient: runs unprotected)
    call(
        json!({"order_id": "m-5", "amount": 1, "fail": true}),
        60_000,
    )
    .await
    .expect_err("the handler's error");
    call(json!({"amount": 1}), 60_000)
        .await
        .expect("runs unprotected");

    let text = flush(collector);
    assert_eq!(
        counts(&text, "orders.work", "enforce"),
        expected(&[
            ("executed", 4),
            ("replayed_from_store", 1),
            ("payload_mismatch", 1),
            ("in_progress", 1),
            ("taken_over", 1),
            ("lost_ownership", 1),
            ("expired_reexecuted", 1),
            ("handler_error_released", 1),
            ("missing_key_unprotected", 1),
        ]),
        "{text}"
    );
    // m-1, m-2, m-3 twice, m-4, m-5, the unkeyed event
    assert_eq!(runs.get(), 7);
    // Counters report what happened since the last flush.
    assert_eq!(flush(collector), "");

    // Observe only: the same table, another handler name; a duplicate runs and is
    // counted as the replay enforcing would have served, under mode "observe".
    let observing = Idempotency::new(
        store.clone(),
        config("orders").observe_only(true).build().expect("config"),
    );
    let watch = observing.function("watch", handler.clone());
    for _ in 0..2 {
        watch
            .call(
                json!({"order_id": "w-1", "amount": 1}),
                Some(&context(60_000)),
            )
            .await
            .expect("runs");
    }
    watch
        .call(
            json!({"order_id": "w-1", "amount": 5}),
            Some(&context(60_000)),
        )
        .await
        .expect("runs");
    assert_eq!(runs.get(), 10);
    let text = flush(collector);
    assert_eq!(
        counts(&text, "orders.watch", "observe"),
        expected(&[
            ("executed", 1),
            ("replayed_from_store", 1),
            ("payload_mismatch", 1)
        ]),
        "{text}"
    );
    assert_eq!(counts(&text, "orders.watch", "enforce"), BTreeMap::new());

    // Metrics off: nothing is counted.
    let quiet = Idempotency::new(
        store.clone(),
        config("quiet").metrics(false).build().expect("config"),
    );
    let silent = quiet.function("work", handler.clone());
    silent
        .call(
            json!({"order_id": "q-1", "amount": 1}),
            Some(&context(60_000)),
        )
        .await
        .expect("runs");
    assert_eq!(runs.get(), 11);
    assert_eq!(flush(collector), "");

    // Steps: the first attempt fails inside its first step, the second after it,
    // the third completes. Each retry resumes the execution: a step the journal
    // holds is replayed, one it lacks is re-issued with the same derived key.
    let attempts = Counter::default();
    let audit = Audit::default();
    let stepped = Idempotency::new(store.clone(), config("steps").build().expect("config"))
        .with_dispatcher(Dispatcher::new().with_sink("audit", audit.clone()));
    let order = stepped.function("order", {
        let attempts = attempts.clone();
        move |_: Value| {
            let attempt = attempts.hit();
            async move {
                let effects = effects()?;
                effects
                    .step("charge", |_| async move {
                        match attempt {
                            1 => Err(std::io::Error::other("charge failed")),
                            _ => Ok(json!("charged")),
                        }
                    })
                    .await?;
                effects
                    .step("ship", |_| async move {
                        match attempt {
                            2 => Err(std::io::Error::other("ship failed")),
                            _ => Ok(json!("shipped")),
                        }
                    })
                    .await?;
                effects.outbox().push(OutboxMessage::Custom {
                    sink: "audit".into(),
                    payload: json!("placed"),
                });
                Ok::<_, Error<std::io::Error>>(json!("placed"))
            }
        }
    });
    for _ in 0..2 {
        order
            .call(
                json!({"order_id": "s-1", "amount": 1}),
                Some(&context(60_000)),
            )
            .await
            .expect_err("a step failed");
    }
    order
        .call(
            json!({"order_id": "s-1", "amount": 1}),
            Some(&context(60_000)),
        )
        .await
        .expect("placed");
    assert_eq!(audit.delivered().len(), 1);
    // Without a dispatcher the message waits for the relay.
    let relayed = Idempotency::new(store.clone(), config("relayed").build().expect("config"));
    relayed
        .function("order", |_: Value| async move {
            effects()?.outbox().push(OutboxMessage::Custom {
                sink: "audit".into(),
                payload: json!("later"),
            });
            Ok::<_, Error<std::io::Error>>(json!("placed"))
        })
        .call(
            json!({"order_id": "s-2", "amount": 1}),
            Some(&context(60_000)),
        )
        .await
        .expect("placed");
    // A permanent error, stored and replayed; a store that fails.
    let permanent = Idempotency::new(
        store.clone(),
        config("permanent")
            .replay_permanent_errors(true)
            .build()
            .expect("config"),
    );
    let reject = permanent.function("order", |_: Value| async move {
        Err::<Value, _>(PermanentError::new("card declined"))
    });
    for _ in 0..2 {
        reject
            .call(
                json!({"order_id": "p-1", "amount": 1}),
                Some(&context(60_000)),
            )
            .await
            .expect_err("declined");
    }
    let broken = Idempotency::new(
        DynamoDbStore::new(client(), "no-such-table-metrics"),
        config("broken").build().expect("config"),
    );
    broken
        .function("order", handler.clone())
        .call(
            json!({"order_id": "b-1", "amount": 1}),
            Some(&context(60_000)),
        )
        .await
        .expect_err("no table");
    let text = flush(collector);
    assert_eq!(
        counts(&text, "steps.order", "enforce"),
        expected(&[
            ("handler_error_released", 2),
            ("executed", 1),
            ("step_replayed", 1),
            ("step_reissued", 2),
            ("outbox_delivered", 1),
        ]),
        "{text}"
    );
    assert_eq!(
        counts(&text, "relayed.order", "enforce"),
        expected(&[("executed", 1), ("outbox_left_for_relay", 1)]),
        "{text}"
    );
    assert_eq!(
        counts(&text, "permanent.order", "enforce"),
        expected(&[("permanent_error_stored", 1), ("replayed_from_store", 1)]),
        "{text}"
    );
    assert_eq!(
        counts(&text, "broken.order", "enforce"),
        expected(&[("store_error", 1)]),
        "{text}"
    );

    // An SQS FIFO batch: the second message fails, the third (same group) is held back.
    // Keyed by message id, the SQS source's default key.
    let keyed_by_message = IdempotencyConfig::builder().key_prefix("batch");
    let batch = Idempotency::new(store.clone(), keyed_by_message.build().expect("config"))
        .sqs_batch("ship", |message: SqsMessage| async move {
            match message.body.as_deref() {
                Some("bad") => Err("cannot ship"),
                _ => Ok(json!("shipped")),
            }
        });
    let records: Vec<Value> = ["good", "bad", "later"]
        .iter()
        .map(|body| {
            json!({"messageId": format!("{body}-id"), "body": body, "eventSource": "aws:sqs",
                   "attributes": {"MessageGroupId": "g-1"}})
        })
        .collect();
    let event: SqsEvent = serde_json::from_value(json!({"Records": records})).expect("event");
    let response = batch
        .process(LambdaEvent::new(event, context(60_000)))
        .await
        .expect("processed");
    assert_eq!(response.batch_item_failures.len(), 2);
    let text = flush(collector);
    assert_eq!(
        counts(&text, "batch.ship", "enforce"),
        expected(&[
            ("batch_records", 3),
            ("batch_failures", 2),
            ("batch_held_back", 1),
            ("executed", 1),
            ("handler_error_released", 1),
        ]),
        "{text}"
    );

    // The layer writes each invocation's documents when it ends.
    let written = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = {
        let written = written.clone();
        move || -> Box<dyn std::io::Write + Send> { Box::new(SharedWriter(written.clone())) }
    };
    let layered = Idempotency::new(store, config("layered").build().expect("config"));
    let mut service = ServiceBuilder::new()
        .layer(EmfLayer::with_writer(collector, writer))
        .layer(layered.layer().expect("layer"))
        .service(service_fn(|event: LambdaEvent<Value>| async move {
            Ok::<_, lambda_runtime::Error>(event.payload)
        }));
    for _ in 0..2 {
        service
            .ready()
            .await
            .expect("ready")
            .call(LambdaEvent::new(
                json!({"order_id": "l-1", "amount": 1}),
                context(60_000),
            ))
            .await
            .expect("call");
    }
    let text = String::from_utf8(written.lock().expect("lock").clone()).expect("utf-8");
    assert_eq!(
        text.lines().count(),
        2,
        "one document per invocation: {text}"
    );
    assert_eq!(
        counts(&text, "layered", "enforce"),
        expected(&[("executed", 1), ("replayed_from_store", 1)]),
        "{text}"
    );
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
