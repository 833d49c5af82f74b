//! The counts, read back from the CloudWatch Embedded Metric Format lines the
//! `emf` recorder writes, for a scripted sequence of calls against LocalStack:
//! first, replay, payload mismatch, conflict, takeover, lost ownership, expired
//! record, handler error, missing key; then observe-only mode, metrics turned off,
//! steps replayed and re-issued, outbox delivered and left for the relay, a stored
//! permanent error, a store error, an SQS batch's counts, the `EmfLayer`
//! flushing after each invocation; then duplicates that wait for the first call
//! (replayed, ran, timed out; the `wait_ms` histogram) and, observing, would
//! have waited.
//!
//! One test: the recorder is global to the process and a flush drains every
//! counter.

mod support;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_dynamodb::types::AttributeValue;
use lambda_idempotency::emf::{self, EmfLayer};
use lambda_idempotency::{
    effects, Dispatcher, DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyError,
    IdempotentFunction, OutboxMessage, PermanentError,
};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::localstack::{client, default_table, recorded_client};
use support::{context, in_progress, key_for, now_ms, until_requests, Audit, Counter};
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
/// (dimensions, metric values): a counter's value is its count, a histogram's the
/// array of the values recorded since the last flush (how
/// `metrics_cloudwatch_embedded` writes one: EMF's list of values, at most 100).
fn documents(text: &str) -> Vec<(BTreeMap<String, String>, BTreeMap<String, Value>)> {
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
                    if name.ends_with("wait_ms") {
                        assert_eq!(
                            metric["Unit"], "Milliseconds",
                            "the histogram's unit: {doc}"
                        );
                    }
                    let value = doc[&name].clone();
                    (name, value)
                })
                .collect();
            (dimensions, metrics)
        })
        .collect()
}

/// The metrics flushed for `handler` in `mode`, document by document.
fn metrics_of(text: &str, handler: &str, mode: &str) -> Vec<BTreeMap<String, Value>> {
    let function = std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "local".into());
    documents(text)
        .into_iter()
        .filter(|(dimensions, _)| {
            dimensions.get("handler").map(String::as_str) == Some(handler)
                && dimensions.get("mode").map(String::as_str) == Some(mode)
        })
        .map(|(dimensions, metrics)| {
            assert_eq!(dimensions.len(), 3, "{dimensions:?}");
            assert_eq!(dimensions["function"], function);
            metrics
        })
        .collect()
}

/// The counts flushed for `handler` in `mode`, by metric name: a counter's
/// count, a histogram's number of values.
fn counts(text: &str, handler: &str, mode: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for (name, value) in metrics_of(text, handler, mode).into_iter().flatten() {
        let n = match &value {
            Value::Array(values) => values.len() as u64,
            count => count.as_u64().expect("a count"),
        };
        *counts.entry(name).or_default() += n;
    }
    counts
}

/// The values of the histogram `idempotency.<name>` flushed for `handler` in
/// `mode`, in the order recorded.
fn values(text: &str, handler: &str, mode: &str, name: &str) -> Vec<f64> {
    let name = format!("idempotency.{name}");
    metrics_of(text, handler, mode)
        .iter()
        .filter_map(|metrics| metrics.get(&name))
        .flat_map(|values| values.as_array().expect("a histogram's values").clone())
        .map(|value| value.as_f64().expect("a number"))
        .collect()
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

/// `work`'s call on its own task, and how long it took, in milliseconds.
fn spawn_timed<F, Fut>(
    work: &Arc<IdempotentFunction<F, DynamoDbStore>>,
    event: Value,
    ms_left: i64,
) -> Timed
where
    F: Fn(Value) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Value, std::io::Error>> + Send,
{
    let work = Arc::clone(work);
    tokio::spawn(async move {
        let started = Instant::now();
        let result = work.call(event, Some(&context(ms_left))).await;
        (result, started.elapsed().as_secs_f64() * 1000.0)
    })
}

/// Flushes `collector`: the counts of `waits.work` (enforcing) are `pairs`, and
/// each of its `wait_ms` values lies in `plausible` (milliseconds).
fn flushed_waits(
    collector: &emf::Collector,
    pairs: &[(&str, u64)],
    plausible: std::ops::RangeInclusive<f64>,
) {
    let text = flush(collector);
    assert_eq!(
        counts(&text, "waits.work", "enforce"),
        expected(pairs),
        "{text}"
    );
    let waited = values(&text, "waits.work", "enforce", "wait_ms");
    assert!(
        waited.iter().all(|ms| plausible.contains(ms)),
        "{waited:?} not all in {plausible:?}"
    );
}

type Timed = tokio::task::JoinHandle<(Result<Value, Error<std::io::Error>>, f64)>;

/// The response of a first call that was held, once it completes.
async fn completed(first: Timed) -> Value {
    let (result, _) = first.await.expect("join");
    result.expect("the first call completes")
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
    let layered = Idempotency::new(store.clone(), config("layered").build().expect("config"));
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

    // Duplicates that wait for the first call (`wait_for_in_progress`). "Here" is
    // the first call's own `Idempotency` (a waiter is woken by the first call's
    // completion); "elsewhere" another on the same table, as another execution
    // environment would be (a waiter polls the record, its requests recorded).
    // Each first call is held at the handler's gate until the waiters wait.
    let waiting = |observe: bool| {
        config("waits")
            .observe_only(observe)
            .wait_for_in_progress(Duration::from_secs(20))
            .build()
            .expect("config")
    };
    let here =
        Arc::new(Idempotency::new(store.clone(), waiting(false)).function("work", handler.clone()));
    let (elsewhere_client, elsewhere_requests) = recorded_client();
    let elsewhere = Arc::new(
        Idempotency::new(DynamoDbStore::new(elsewhere_client, &table), waiting(false))
            .function("work", handler.clone()),
    );
    let event = |order: &str| json!({"order_id": order, "amount": 1});
    let held = |order: &str| json!({"order_id": order, "amount": 1, "hold": true});
    let runs_before = runs.get();

    // Two waiters, here and elsewhere, replay the first call's response.
    let first = spawn_timed(&here, held("wt-1"), 60_000);
    entered.notified().await;
    elsewhere_requests.take();
    let waiters = [
        spawn_timed(&here, event("wt-1"), 60_000),
        spawn_timed(&elsewhere, event("wt-1"), 60_000),
    ];
    // Elsewhere: its reservation refused, it read the record once. Here: polled
    // meanwhile on this current-thread runtime, it waits on the first call.
    until_requests(&elsewhere_requests, 2).await;
    gate.notify_one();
    let first = completed(first).await;
    let mut longest = 0.0_f64;
    for waiter in waiters {
        let (replayed, ms) = waiter.await.expect("join");
        assert_eq!(replayed.expect("replayed"), first);
        longest = longest.max(ms);
    }
    // Both waited past the first read elsewhere, which came at least 40 ms (the
    // first poll's 50 ms, less its jitter) after its refused reservation; neither
    // longer than its own call took.
    flushed_waits(
        collector,
        &[("executed", 1), ("waited_then_replayed", 2), ("wait_ms", 2)],
        40.0..=longest,
    );

    // The first call fails and gives the key back: the waiter elsewhere runs.
    let first = spawn_timed(
        &here,
        json!({"order_id": "wt-2", "amount": 1, "hold": true, "fail": true}),
        60_000,
    );
    entered.notified().await;
    elsewhere_requests.take();
    let waiter = spawn_timed(&elsewhere, event("wt-2"), 60_000);
    until_requests(&elsewhere_requests, 2).await;
    gate.notify_one();
    assert!(matches!(
        first.await.expect("join").0,
        Err(Error::Handler(_))
    ));
    let (ran, took) = waiter.await.expect("join");
    assert_eq!(
        ran.expect("the waiter ran"),
        json!({"run": runs_before + 3}),
        "its own run"
    );
    flushed_waits(
        collector,
        &[
            ("handler_error_released", 1),
            ("waited_then_ran", 1),
            ("wait_ms", 1),
        ],
        40.0..=took,
    );

    // A waiter here whose Lambda deadline is 1.5 s away may wait half a second
    // (it stops a second before its deadline): refused as in progress then.
    let first = spawn_timed(&here, held("wt-3"), 60_000);
    entered.notified().await;
    let (refused, took) = spawn_timed(&here, event("wt-3"), 1_500)
        .await
        .expect("join");
    assert!(in_progress(&refused), "{refused:?}");
    gate.notify_one();
    completed(first).await;
    // Most of the half second.
    flushed_waits(
        collector,
        &[("executed", 1), ("wait_timed_out", 1), ("wait_ms", 1)],
        400.0..=took,
    );

    // Observe only, waiting configured: a duplicate while the first holds the
    // key runs at once (the first is still held), counted as `in_progress`, the
    // outcome enforcing would have had without waiting, and `would_wait`.
    let watch =
        Arc::new(Idempotency::new(store.clone(), waiting(true)).function("watch", handler.clone()));
    let first = spawn_timed(&watch, held("ww-1"), 60_000);
    entered.notified().await;
    let (ran, _) = spawn_timed(&watch, event("ww-1"), 60_000)
        .await
        .expect("join");
    ran.expect("runs");
    assert!(!first.is_finished(), "the first is still held at the gate");
    gate.notify_one();
    completed(first).await;
    let text = flush(collector);
    assert_eq!(
        counts(&text, "waits.watch", "observe"),
        expected(&[("executed", 1), ("in_progress", 1), ("would_wait", 1)]),
        "{text}"
    );
    assert_eq!(counts(&text, "waits.watch", "enforce"), BTreeMap::new());
    // wt-1; wt-2 twice (the first failed); wt-3; ww-1 twice
    assert_eq!(runs.get() - runs_before, 6);
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
