//! Duplicates that wait for the first call (`wait_for_in_progress`) and records
//! of one batch that share a key, against DynamoDB on LocalStack.
//!
//! "Another execution environment" is a second `Idempotency` on its own client
//! and the same table (and key prefix), as a second Lambda instance would be;
//! "this execution environment" is clones of one wrapped service, as under
//! `run_concurrent`. Every first call is held in its handler by a gate the test
//! opens, so that the duplicate is known to arrive while it runs.

mod support;

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use base64::Engine;
use lambda_idempotency::{
    DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyError, IdempotencyStore,
    IdempotentFunction,
};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::events::sqs_message;
use support::faults::{Fault, FaultStore, Mode, Op};
use support::localstack::{default_table, recorded_client, s, scan, Requests};
use support::{context, poll, spawn_call, until_requests, Counter, Gate};

type BoxError = lambda_runtime::Error;

/// One execution environment: its own client (requests recorded) on `table`.
fn environment(table: &str, wait: Duration) -> (Idempotency<DynamoDbStore>, Requests) {
    let (client, requests) = recorded_client();
    (
        Idempotency::new(DynamoDbStore::new(client, table), config(wait)),
        requests,
    )
}

fn config(wait: Duration) -> IdempotencyConfig {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        // Every environment is one function: one prefix, said explicitly.
        .key_prefix("orders")
        .wait_for_in_progress(wait)
        .build()
        .expect("config")
}

type Charge = Box<
    dyn Fn(
            Value,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value, String>> + Send>>
        + Send
        + Sync,
>;

/// `charge`, idempotent: counts its runs, waits at the gate, then answers with
/// the run's number, or fails when `fail_first` and it is the first run.
fn charge<S: IdempotencyStore>(
    idempotency: &Idempotency<S>,
    runs: &Counter,
    gate: &Gate,
    fail_first: bool,
) -> IdempotentFunction<Charge, S> {
    let (runs, gate) = (runs.clone(), gate.clone());
    let f: Charge = Box::new(move |order: Value| {
        let run = runs.hit();
        let gate = gate.clone();
        Box::pin(async move {
            gate.pass().await;
            if fail_first && run == 1 {
                return Err("the card was declined".to_owned());
            }
            Ok(json!({ "order": order["order_id"], "run": run }))
        })
    });
    idempotency.function("charge", f)
}

fn stored(
    table_items: &[HashMap<String, aws_sdk_dynamodb::types::AttributeValue>],
) -> Vec<(String, String)> {
    table_items
        .iter()
        .map(|item| {
            (
                s(item, "status").to_owned(),
                s(item, "execution").to_owned(),
            )
        })
        .collect()
}

/// A first call of `order` in one environment, held in its handler, and
/// `charge` in a second environment on the same fresh table, which waits up
/// to `second_waits`.
struct HeldFirst {
    table: String,
    first_call: tokio::task::JoinHandle<Result<Value, Error<String>>>,
    second: IdempotentFunction<Charge, DynamoDbStore>,
    second_requests: Requests,
    runs: Counter,
    gate: Gate,
}

/// `first_deadline_ms`: the first call's Lambda deadline, from now;
/// `fail_first`: its handler fails once through the gate.
async fn held_first(
    test: &str,
    order: &Value,
    second_waits: Duration,
    first_deadline_ms: i64,
    fail_first: bool,
) -> HeldFirst {
    let table = default_table(test).await;
    let (first_env, _) = environment(&table, Duration::from_secs(20));
    let (second_env, second_requests) = environment(&table, second_waits);
    let (runs, gate) = (Counter::default(), Gate::closed());
    let first = charge(&first_env, &runs, &gate, fail_first);
    let first_call = tokio::spawn({
        let order = order.clone();
        async move { first.call(order, Some(&context(first_deadline_ms))).await }
    });
    poll(|| async { runs.get() }, |runs| *runs == 0).await;
    HeldFirst {
        table,
        first_call,
        second: charge(&second_env, &runs, &gate, fail_first),
        second_requests,
        runs,
        gate,
    }
}

fn in_progress(result: &Result<Value, Error<String>>) -> bool {
    matches!(
        result,
        Err(Error::Idempotency(
            IdempotencyError::AlreadyInProgress { .. }
        ))
    )
}

#[tokio::test]
async fn a_duplicate_elsewhere_waits_and_replays_the_first_response_byte_for_byte() {
    let order = json!({ "order_id": "o-1" });
    let held = held_first(
        "wait-replay",
        &order,
        Duration::from_secs(20),
        30_000,
        false,
    )
    .await;
    let waiter = tokio::spawn({
        let second = held.second;
        async move { second.call(order, Some(&context(30_000))).await }
    });
    // Its reservation refused, and at least one read of the record.
    until_requests(&held.second_requests, 2).await;
    held.gate.open(1);

    let first_response = held.first_call.await.expect("join").expect("first call");
    let waited = waiter.await.expect("join").expect("the waiter replays");
    assert_eq!(
        serde_json::to_vec(&waited).expect("json"),
        serde_json::to_vec(&first_response).expect("json"),
        "replayed byte for byte"
    );
    assert_eq!(held.runs.get(), 1, "the handler ran once");
    let requests = held.second_requests.take();
    assert_eq!(requests[0], "PutItem", "the refused reservation");
    assert!(
        requests[1..].iter().all(|r| r == "GetItem") && requests.len() >= 2,
        "then only reads: {requests:?}"
    );
    let statuses: Vec<_> = stored(&scan(&held.table).await)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(statuses, ["COMPLETED"]);
}

#[tokio::test]
async fn a_duplicate_in_this_environment_waits_with_no_store_request() {
    let table = default_table("wait-local").await;
    let (env, requests) = environment(&table, Duration::from_secs(20));
    let (runs, gate) = (Counter::default(), Gate::closed());
    let service = {
        let (runs, gate) = (runs.clone(), gate.clone());
        env.wrap(service_fn(move |event: LambdaEvent<Value>| {
            let run = runs.hit();
            let gate = gate.clone();
            async move {
                gate.pass().await;
                Ok::<_, BoxError>(json!({ "order": event.payload["order_id"], "run": run }))
            }
        }))
        .expect("one handler")
    };
    let first = spawn_call(&service, json!({ "order_id": "o-2" }));
    poll(|| async { runs.get() }, |runs| *runs == 0).await;
    assert_eq!(requests.take(), ["PutItem"], "the first call's reservation");
    // This test runs on a current-thread runtime: once spawned and yielded to,
    // the duplicate has run up to its first await, the wait for the flight.
    let duplicates: Vec<_> = (0..3)
        .map(|_| spawn_call(&service, json!({ "order_id": "o-2" })))
        .collect();
    tokio::task::yield_now().await;
    gate.open(1);

    let first = first.await.expect("join").expect("first");
    for duplicate in duplicates {
        let replayed = duplicate.await.expect("join").expect("replayed");
        assert_eq!(
            serde_json::to_vec(&replayed).expect("json"),
            serde_json::to_vec(&first).expect("json")
        );
    }
    assert_eq!(runs.get(), 1);
    assert_eq!(
        requests.take(),
        ["PutItem"],
        "the first call's completion only: the three duplicates asked the store nothing"
    );
}

#[tokio::test]
async fn when_the_first_call_fails_the_waiter_reserves_and_runs() {
    let order = json!({ "order_id": "o-3" });
    let held = held_first("wait-fails", &order, Duration::from_secs(20), 30_000, true).await;
    let waiter = tokio::spawn({
        let second = held.second;
        async move { second.call(order, Some(&context(30_000))).await }
    });
    until_requests(&held.second_requests, 2).await;
    held.gate.open(2);

    assert!(matches!(
        held.first_call.await.expect("join"),
        Err(Error::Handler(_))
    ));
    let ran = waiter.await.expect("join").expect("the waiter ran");
    assert_eq!(ran, json!({ "order": "o-3", "run": 2 }), "its own run");
    assert_eq!(held.runs.get(), 2);
    let requests = held.second_requests.take();
    assert_eq!(
        requests.iter().filter(|r| *r == "PutItem").count(),
        3,
        "refused, reserved, completed: {requests:?}"
    );
}

#[tokio::test]
async fn when_the_first_call_crashes_the_waiter_takes_over_at_its_deadline_and_resumes_it() {
    let order = json!({ "order_id": "o-4" });
    // The first call's Lambda deadline is 2 s away; it never gets past the gate
    // and is then dropped, as when Lambda kills a timed-out invocation.
    let held = held_first("wait-crash", &order, Duration::from_secs(20), 2_000, false).await;
    let abandoned = stored(&scan(&held.table).await);
    held.first_call.abort();

    held.gate.open(1);
    let taken_over = held
        .second
        .call(order, Some(&context(30_000)))
        .await
        .expect("the waiter took over");
    assert_eq!(taken_over, json!({ "order": "o-4", "run": 2 }));
    assert_eq!(held.runs.get(), 2);
    let now = stored(&scan(&held.table).await);
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].0, "COMPLETED");
    assert_eq!(
        now[0].1, abandoned[0].1,
        "the abandoned execution was resumed"
    );
}

#[tokio::test]
async fn a_duplicate_here_whose_wait_ends_on_a_duplicate_slow_in_the_store_replays_the_completed_response(
) {
    // Seen in the chaos run under DynamoDB throttling: the flight a duplicate
    // waited on was flown by another duplicate of its environment, itself
    // waiting in the store, whose read took seconds (the SDK's retries). The
    // key had been completed elsewhere meanwhile, yet when its wait ended the
    // duplicate was refused as in progress. It now looks at the record once
    // first, as a call that does not wait would.
    let table = default_table("wait-slow-pilot").await;
    let (first_env, _) = environment(&table, Duration::from_secs(20));
    let (client, _) = recorded_client();
    let here = FaultStore::new(DynamoDbStore::new(client, &table));
    let faults = here.faults.clone();
    // This environment's first reservation, the pilot's, is refused, and the
    // answer reaches the pilot only when the test says: a slow request.
    faults.set(&[Fault {
        op: Op::Reserve,
        nth: 1,
        mode: Mode::PauseAfter,
    }]);
    let here_env = Idempotency::new(here, config(Duration::from_secs(20)));
    let (runs, gate) = (Counter::default(), Gate::closed());
    let first = charge(&first_env, &runs, &gate, false);
    let here_charge = Arc::new(charge(&here_env, &runs, &gate, false));
    let order = json!({ "order_id": "o-7" });

    let first_call = tokio::spawn({
        let order = order.clone();
        async move { first.call(order, Some(&context(30_000))).await }
    });
    poll(|| async { runs.get() }, |runs| *runs == 0).await;
    let pilot = tokio::spawn({
        let (here_charge, order) = (here_charge.clone(), order.clone());
        async move { here_charge.call(order, Some(&context(30_000))).await }
    });
    faults.paused.notified().await;
    gate.open(1);
    let first_response = first_call.await.expect("join").expect("first call");

    // 1.3 s left: its wait on the pilot's flight ends 1 s before its deadline.
    let started = Instant::now();
    let replayed = here_charge
        .call(order, Some(&context(1_300)))
        .await
        .expect("the completed response, not a refusal");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "it waited for the pilot's flight first: {:?}",
        started.elapsed()
    );
    assert_eq!(
        serde_json::to_vec(&replayed).expect("json"),
        serde_json::to_vec(&first_response).expect("json")
    );
    faults.resume();
    let pilot_reply = pilot.await.expect("join").expect("the pilot replays too");
    assert_eq!(pilot_reply, first_response);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn the_maximum_elapsing_refuses_as_in_progress() {
    let order = json!({ "order_id": "o-5" });
    let held = held_first(
        "wait-max",
        &order,
        Duration::from_millis(400),
        30_000,
        false,
    )
    .await;
    let refused = held.second.call(order, Some(&context(30_000))).await;
    assert!(in_progress(&refused), "{refused:?}");
    let reads = held
        .second_requests
        .take()
        .iter()
        .filter(|r| *r == "GetItem")
        .count();
    assert!(reads >= 2, "it read while it waited: {reads}");
    held.gate.open(1);
    held.first_call
        .await
        .expect("join")
        .expect("the first call completes");
    assert_eq!(held.runs.get(), 1);
}

#[tokio::test]
async fn a_lambda_deadline_shorter_than_the_maximum_ends_the_wait_first() {
    let order = json!({ "order_id": "o-6" });
    let held = held_first(
        "wait-deadline",
        &order,
        Duration::from_secs(60),
        30_000,
        false,
    )
    .await;
    // 1.5 s left: it stops waiting a second before its deadline, long before
    // the minute it may wait.
    let started = Instant::now();
    let refused = held.second.call(order, Some(&context(1_500))).await;
    let waited = started.elapsed();
    assert!(in_progress(&refused), "{refused:?}");
    assert!(
        held.second_requests.take().iter().any(|r| r == "GetItem"),
        "it waited, reading the record, before it gave up"
    );
    assert!(
        waited < Duration::from_secs(30),
        "bounded by the deadline, not the maximum: {waited:?}"
    );
    held.gate.open(1);
    held.first_call
        .await
        .expect("join")
        .expect("the first call completes");
}

#[tokio::test]
async fn sqs_messages_of_one_batch_with_one_key_run_once_at_no_cost() {
    let table = default_table("wait-sqs").await;
    let (client, requests) = recorded_client();
    let idempotency = Idempotency::new(
        DynamoDbStore::new(client, &table),
        IdempotencyConfig::builder()
            .key_expression("powertools_json(body).order_id")
            .build()
            .expect("config"),
    );
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let batch = {
        let runs = runs.clone();
        idempotency.sqs_batch("ship", move |message: SqsMessage| {
            let runs = runs.clone();
            async move {
                let order: Value = serde_json::from_str(message.body.as_deref().unwrap_or("{}"))
                    .map_err(|e| e.to_string())?;
                let id = order["order_id"].as_str().unwrap_or_default().to_owned();
                *runs.lock().expect("lock").entry(id.clone()).or_default() += 1;
                // Let the batch's other messages start meanwhile.
                tokio::task::yield_now().await;
                Ok::<_, String>(json!({ "shipped": id }))
            }
        })
    };
    let messages: Vec<SqsMessage> = ["o-1", "o-2", "o-1", "o-2", "o-1"]
        .iter()
        .enumerate()
        .map(|(i, id)| sqs_message(&json!({ "order_id": id }).to_string(), &format!("m-{i}")))
        .collect();
    let mut event = SqsEvent::default();
    event.records = messages;

    let response = batch
        .process(LambdaEvent::new(event, context(30_000)))
        .await
        .expect("batch");
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        response.batch_item_failures
    );
    assert_eq!(
        *runs.lock().expect("lock"),
        HashMap::from([("o-1".to_owned(), 1), ("o-2".to_owned(), 1)])
    );
    assert_eq!(
        requests.take(),
        ["BatchExecuteStatement"; 2],
        "the two keys reserved in one request and completed in one; the three duplicates cost nothing"
    );
}

#[tokio::test]
async fn stream_records_of_one_batch_with_one_key_run_once_at_no_cost() {
    let table = default_table("wait-stream").await;
    let (client, requests) = recorded_client();
    let idempotency = Idempotency::new(
        DynamoDbStore::new(client, &table),
        IdempotencyConfig::builder()
            .key_expression("powertools_json(powertools_base64(kinesis.data)).reading_id")
            .build()
            .expect("config"),
    );
    let runs = Arc::new(Mutex::new(Vec::new()));
    let batch = {
        let runs = runs.clone();
        idempotency.stream_batch(
            "index",
            move |record: aws_lambda_events::event::kinesis::KinesisEventRecord| {
                let runs = runs.clone();
                async move {
                    let reading: Value = serde_json::from_slice(&record.kinesis.data.0)
                        .map_err(|e| e.to_string())?;
                    runs.lock()
                        .expect("lock")
                        .push(reading["reading_id"].clone());
                    Ok::<_, String>(reading)
                }
            },
        )
    };
    let records: Vec<Value> = ["r-1", "r-2", "r-1", "r-1", "r-2"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let data = base64::engine::general_purpose::STANDARD
                .encode(json!({ "reading_id": id, "celsius": 20 }).to_string());
            json!({
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": "sensor-1",
                    "sequenceNumber": format!("{}", 1000 + i),
                    "data": data,
                    "approximateArrivalTimestamp": 1795341600.5
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": format!("shardId-000000000000:{}", 1000 + i),
                "eventName": "aws:kinesis:record",
                "eventSourceARN": "arn:aws:kinesis:eu-west-1:123456789012:stream/readings"
            })
        })
        .collect();
    let event: KinesisEvent =
        serde_json::from_value(json!({ "Records": records })).expect("a Kinesis event");

    let response = batch
        .process_kinesis(LambdaEvent::new(event, context(30_000)))
        .await
        .expect("batch");
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        *runs.lock().expect("lock"),
        [json!("r-1"), json!("r-2")],
        "in shard order, once each"
    );
    assert_eq!(requests.take(), ["BatchExecuteStatement"; 2]);
    let items = scan(&table).await;
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|item| s(item, "status") == "COMPLETED"));
}

#[tokio::test]
async fn an_http_request_whose_key_is_in_flight_waits_when_the_adapter_opts_in() {
    use aws_lambda_events::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
    use aws_lambda_events::encodings::Body;

    let table = default_table("wait-http").await;
    let (client, requests) = recorded_client();
    // The config does not wait: the adapter opts in on its own.
    let idempotency = Idempotency::new(
        DynamoDbStore::new(client, &table),
        IdempotencyConfig::default(),
    );
    let (runs, gate) = (Counter::default(), Gate::closed());
    let http = {
        let (runs, gate) = (runs.clone(), gate.clone());
        Arc::new(
            idempotency
                .http("orders", move |_: ApiGatewayV2httpRequest| {
                    let run = runs.hit();
                    let gate = gate.clone();
                    async move {
                        gate.pass().await;
                        let mut response = ApiGatewayV2httpResponse::default();
                        response.status_code = 201;
                        response.body = Some(Body::Text(json!({ "run": run }).to_string()));
                        Ok::<_, String>(response)
                    }
                })
                .wait_for_in_progress(Duration::from_secs(20)),
        )
    };
    let path = format!(
        "{}/tests/fixtures/apigw_v2.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let request: ApiGatewayV2httpRequest =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("request");
    let send = || {
        let (http, request) = (http.clone(), request.clone());
        tokio::spawn(async move {
            http.handle_v2(LambdaEvent::new(request, context(30_000)))
                .await
        })
    };
    let first = send();
    poll(|| async { runs.get() }, |runs| *runs == 0).await;
    // Current-thread runtime: the duplicate runs up to its wait for the flight.
    let duplicate = send();
    tokio::task::yield_now().await;
    gate.open(1);

    let first = first.await.expect("join").expect("first");
    let duplicate = duplicate.await.expect("join").expect("not a 409");
    assert_eq!((first.status_code, duplicate.status_code), (201, 201));
    assert_eq!(duplicate.body, first.body, "the stored body, replayed");
    assert_eq!(
        duplicate
            .headers
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(runs.get(), 1);
    assert_eq!(
        requests.take(),
        ["PutItem", "PutItem"],
        "the duplicate asked the store nothing"
    );
}

/// The counts of the wait's outcomes, on the memory store: two `Idempotency`
/// values on one `MemoryStore` are two execution environments (each has its own
/// flights; the records are shared).
mod counted {
    use super::*;
    use lambda_idempotency::MemoryStore;
    use support::counts::Counts;
    use support::faults::{FaultStore, Op};

    fn waits(
        store: impl lambda_idempotency::IdempotencyStore,
        observe: bool,
    ) -> Idempotency<impl lambda_idempotency::IdempotencyStore> {
        let config = IdempotencyConfig::builder()
            .key_expression("order_id")
            .key_prefix("orders")
            .wait_for_in_progress(Duration::from_secs(10))
            .observe_only(observe)
            .build()
            .expect("config");
        Idempotency::new(store, config)
    }

    /// A first call of o-9 held at `gate` in its own environment.
    async fn held(store: &MemoryStore, runs: &Counter, gate: &Gate) -> tokio::task::JoinHandle<()> {
        let first = waits(store.clone(), false);
        let (runs, gate) = (runs.clone(), gate.clone());
        let handle = tokio::spawn(async move {
            let f = first.function("charge", move |order: Value| {
                runs.hit();
                let gate = gate.clone();
                async move {
                    gate.pass().await;
                    Ok::<_, String>(order)
                }
            });
            f.call(json!({ "order_id": "o-9" }), Some(&context(30_000)))
                .await
                .expect("the first call completes");
        });
        handle
    }

    #[tokio::test]
    async fn observing_a_batch_counts_would_wait_for_a_duplicate_inside_it() {
        let counts = Counts::default();
        let _recorder = metrics::set_default_local_recorder(&counts);
        // Observing, without wait_for_in_progress: enforcing would still make
        // the batch's second message wait for its first.
        let config = IdempotencyConfig::builder()
            .key_expression("powertools_json(body).order_id")
            .observe_only(true)
            .build()
            .expect("config");
        let runs = Counter::default();
        let batch = {
            let runs = runs.clone();
            Idempotency::new(MemoryStore::new(), config).sqs_batch("ship", move |_: SqsMessage| {
                runs.hit();
                async {
                    // The other message of the batch reaches the store meanwhile.
                    tokio::task::yield_now().await;
                    Ok::<_, String>(json!({ "shipped": true }))
                }
            })
        };
        let mut event = SqsEvent::default();
        event.records = (0..2)
            .map(|i| sqs_message(r#"{"order_id": "o-8"}"#, &format!("m-{i}")))
            .collect();
        let response = batch
            .process(LambdaEvent::new(event, context(30_000)))
            .await
            .expect("batch");
        assert!(response.batch_item_failures.is_empty());
        assert_eq!(runs.get(), 2, "observing runs the duplicate");
        assert_eq!(
            (
                counts.get("executed"),
                counts.get("in_progress"),
                counts.get("would_wait")
            ),
            (1, 1, 1)
        );
    }

    #[tokio::test]
    async fn a_wait_ended_by_a_store_error_still_records_its_time() {
        let counts = Counts::default();
        let _recorder = metrics::set_default_local_recorder(&counts);
        let (store, runs, gate) = (MemoryStore::new(), Counter::default(), Gate::closed());
        let first = held(&store, &runs, &gate).await;
        poll(|| async { runs.get() }, |runs| *runs == 0).await;
        // Its reads of the record fail.
        let waiter = waits(FaultStore::failing(store.clone(), &[Op::Get]), false).function(
            "charge",
            |order: Value| async move { Ok::<_, String>(order) },
        );
        let failed = waiter
            .call(json!({ "order_id": "o-9" }), Some(&context(30_000)))
            .await;
        assert!(
            matches!(failed, Err(Error::Idempotency(IdempotencyError::Store(_)))),
            "{failed:?}"
        );
        assert_eq!(counts.get("store_error"), 1);
        assert_eq!(
            counts.values("wait_ms").len(),
            1,
            "the time it waited before the error"
        );
        gate.open(1);
        first.await.expect("join");
    }

    #[tokio::test]
    async fn a_call_with_no_time_left_to_wait_is_refused_as_in_progress() {
        let counts = Counts::default();
        let _recorder = metrics::set_default_local_recorder(&counts);
        let (store, runs, gate) = (MemoryStore::new(), Counter::default(), Gate::closed());
        let first = held(&store, &runs, &gate).await;
        poll(|| async { runs.get() }, |runs| *runs == 0).await;
        let waiter = waits(store.clone(), false).function("charge", |order: Value| async move {
            Ok::<_, String>(order)
        });
        // Half a second left: under the second it keeps to answer.
        let refused = waiter
            .call(json!({ "order_id": "o-9" }), Some(&context(500)))
            .await;
        assert!(
            matches!(
                refused,
                Err(Error::Idempotency(
                    IdempotencyError::AlreadyInProgress { .. }
                ))
            ),
            "{refused:?}"
        );
        assert_eq!(
            (counts.get("in_progress"), counts.get("wait_timed_out")),
            (1, 0)
        );
        assert!(counts.values("wait_ms").is_empty(), "it did not wait");
        gate.open(1);
        first.await.expect("join");
    }
}
