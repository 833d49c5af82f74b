//! Event-source semantics on recorded fixtures (API Gateway v1 and v2, Kinesis)
//! and hand-made SQS batches; the in-memory store keeps these independent of
//! LocalStack (the real SQS and Streams runs are in `sqs.rs` and `streams.rs`).

mod support;

use aws_lambda_events::apigw::{
    ApiGatewayProxyRequest, ApiGatewayProxyResponse, ApiGatewayV2httpRequest,
    ApiGatewayV2httpResponse,
};
use aws_lambda_events::encodings::Body;
use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord};
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_lambda_events::http::HeaderValue;
use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
use lambda_runtime::LambdaEvent;
use serde_json::{json, Value};
use std::future::{ready, Ready};
use std::sync::{Arc, Mutex};
use support::events::sqs_message;
use support::{context, Counter};
use tokio::sync::Notify;

fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("fixture parses")
}

fn idempotency() -> Idempotency<MemoryStore> {
    Idempotency::new(MemoryStore::new(), IdempotencyConfig::default())
}

fn body_of(body: &Option<Body>) -> Value {
    match body {
        Some(Body::Text(text)) => serde_json::from_str(text).expect("JSON body"),
        other => panic!("expected a text body, got {other:?}"),
    }
}

fn created(
    runs: &Counter,
) -> impl Fn(ApiGatewayProxyRequest) -> Ready<Result<ApiGatewayProxyResponse, String>> {
    let runs = runs.clone();
    move |request: ApiGatewayProxyRequest| {
        let run = runs.hit();
        let mut response = ApiGatewayProxyResponse::default();
        response.status_code = 201;
        response
            .headers
            .insert("location", HeaderValue::from_static("/orders/1"));
        response.body = Some(Body::Text(
            json!({"run": run, "request": request.body}).to_string(),
        ));
        ready(Ok(response))
    }
}

#[tokio::test]
async fn api_gateway_v1_replays_the_stored_response_with_the_replayed_header() {
    let runs = Counter::default();
    let http = idempotency().http("orders", created(&runs));
    let request: ApiGatewayProxyRequest = fixture("apigw_v1.json");

    let first = http
        .handle_v1(LambdaEvent::new(request.clone(), context(30_000)))
        .await
        .expect("first");
    let replay = http
        .handle_v1(LambdaEvent::new(request, context(30_000)))
        .await
        .expect("replay");
    assert_eq!(runs.get(), 1);
    assert_eq!((first.status_code, replay.status_code), (201, 201));
    assert_eq!(
        replay.headers.get("location"),
        first.headers.get("location")
    );
    assert_eq!(first.headers.get("idempotent-replayed"), None);
    assert_eq!(
        replay
            .headers
            .get("idempotent-replayed")
            .map(|v| v.to_str().ok()),
        Some(Some("true"))
    );
    assert_eq!(body_of(&replay.body), body_of(&first.body));

    // Another principal with the same key and body is not served this response.
    let mut other: ApiGatewayProxyRequest = fixture("apigw_v1.json");
    let authorizer = other
        .request_context
        .authorizer
        .fields
        .get_mut("principalId")
        .expect("principalId");
    *authorizer = json!("customer-77");
    let theirs = http
        .handle_v1(LambdaEvent::new(other, context(30_000)))
        .await
        .expect("other caller");
    assert_eq!(theirs.headers.get("idempotent-replayed"), None);
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn api_gateway_v1_missing_key_is_400_and_a_different_body_is_422() {
    let runs = Counter::default();
    let http = idempotency().http("orders", created(&runs));
    let request: ApiGatewayProxyRequest = fixture("apigw_v1.json");

    let mut without_key = request.clone();
    without_key.headers.remove("idempotency-key");
    let response = http
        .handle_v1(LambdaEvent::new(without_key, context(30_000)))
        .await
        .expect("400");
    assert_eq!(response.status_code, 400);
    assert_eq!(
        response.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/problem+json"[..])
    );
    assert_eq!(body_of(&response.body)["status"], 400);
    assert_eq!(runs.get(), 0);

    http.handle_v1(LambdaEvent::new(request.clone(), context(30_000)))
        .await
        .expect("first");
    let mut other_body = request;
    other_body.body = Some(r#"{"sku":"book-1","quantity":3}"#.into());
    let response = http
        .handle_v1(LambdaEvent::new(other_body, context(30_000)))
        .await
        .expect("422");
    assert_eq!(response.status_code, 422);
    assert_eq!(body_of(&response.body)["status"], 422);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn api_gateway_v2_in_flight_duplicate_is_409_with_retry_after() {
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let runs = Counter::default();
    let http = {
        let (entered, release, runs) = (entered.clone(), release.clone(), runs.clone());
        Arc::new(
            idempotency().http("orders", move |_: ApiGatewayV2httpRequest| {
                let (entered, release, run) = (entered.clone(), release.clone(), runs.hit());
                async move {
                    entered.notify_one();
                    release.notified().await;
                    let mut response = ApiGatewayV2httpResponse::default();
                    response.status_code = 202;
                    response.body = Some(Body::Text(json!({ "run": run }).to_string()));
                    Ok::<_, String>(response)
                }
            }),
        )
    };
    let request: ApiGatewayV2httpRequest = fixture("apigw_v2.json");
    let first = tokio::spawn({
        let (http, request) = (http.clone(), request.clone());
        async move {
            http.handle_v2(LambdaEvent::new(request, context(30_000)))
                .await
        }
    });
    entered.notified().await;

    let conflict = http
        .handle_v2(LambdaEvent::new(request.clone(), context(30_000)))
        .await
        .expect("409");
    assert_eq!(conflict.status_code, 409);
    assert!(conflict.headers.contains_key("retry-after"));
    assert_eq!(body_of(&conflict.body)["status"], 409);

    release.notify_one();
    let first = first.await.expect("join").expect("first");
    let replay = http
        .handle_v2(LambdaEvent::new(request, context(30_000)))
        .await
        .expect("replay");
    assert_eq!((first.status_code, replay.status_code), (202, 202));
    assert_eq!(body_of(&replay.body), json!({"run": 1}));
    assert_eq!(
        replay
            .headers
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn api_gateway_keys_are_scoped_by_caller_and_server_errors_are_not_stored() {
    let runs = Counter::default();
    let status = Arc::new(Mutex::new(500));
    let http = {
        let (runs, status) = (runs.clone(), status.clone());
        idempotency().http("orders", move |_: ApiGatewayV2httpRequest| {
            runs.hit();
            let mut response = ApiGatewayV2httpResponse::default();
            response.status_code = *status.lock().expect("lock");
            ready(Ok::<_, String>(response))
        })
    };
    let alice: ApiGatewayV2httpRequest = fixture("apigw_v2.json");
    let mut bob = alice.clone();
    let claims = bob
        .request_context
        .authorizer
        .as_mut()
        .and_then(|a| a.jwt.as_mut())
        .expect("jwt authorizer");
    claims.claims.insert("sub".into(), "customer-77".into());

    // A 5xx is returned but not stored: the retry runs again.
    let response = http
        .handle_v2(LambdaEvent::new(alice.clone(), context(30_000)))
        .await
        .expect("500");
    assert_eq!(response.status_code, 500);
    *status.lock().expect("lock") = 201;
    let response = http
        .handle_v2(LambdaEvent::new(alice.clone(), context(30_000)))
        .await
        .expect("retry");
    assert_eq!((response.status_code, runs.get()), (201, 2));

    // Bob sends the same key and body: his own request, not Alice's replay.
    let response = http
        .handle_v2(LambdaEvent::new(bob, context(30_000)))
        .await
        .expect("bob");
    assert_eq!(response.headers.get("idempotent-replayed"), None);
    assert_eq!(runs.get(), 3);
    let response = http
        .handle_v2(LambdaEvent::new(alice, context(30_000)))
        .await
        .expect("alice replay");
    assert!(response.headers.contains_key("idempotent-replayed"));
    assert_eq!(runs.get(), 3);
}

// aws_lambda_events reads Kinesis timestamps through an untagged enum that
// serde_json's `arbitrary_precision` breaks (see the `exact-numbers` feature).
#[tokio::test]
async fn kinesis_records_replay_and_a_failure_reports_it_and_every_later_record() {
    let event: KinesisEvent = fixture("kinesis.json");
    let sequences: Vec<String> = event
        .records
        .iter()
        .map(|r| r.kinesis.sequence_number.clone())
        .collect();
    let config = IdempotencyConfig::builder()
        .key_expression("powertools_json(powertools_base64(kinesis.data)).reading_id")
        .strict(true)
        .build()
        .expect("config");
    let effects = Arc::new(Mutex::new(Vec::new()));
    let fail_once = Arc::new(Mutex::new(Some("r-1".to_owned())));
    let batch = {
        let (effects, fail_once) = (effects.clone(), fail_once.clone());
        Idempotency::new(MemoryStore::new(), config).stream_batch(
            "readings",
            move |record: KinesisEventRecord| {
                let reading: Value =
                    serde_json::from_slice(&record.kinesis.data.0).expect("reading");
                let id = reading["reading_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if fail_once
                    .lock()
                    .expect("lock")
                    .take_if(|f| *f == id)
                    .is_some()
                {
                    return ready(Err(format!("storing {id} failed")));
                }
                effects.lock().expect("lock").push(id);
                ready(Ok(json!("stored")))
            },
        )
    };

    let response = batch
        .process_kinesis(LambdaEvent::new(event.clone(), context(30_000)))
        .await
        .expect("batch");
    let reported: Vec<_> = response
        .batch_item_failures
        .iter()
        .filter_map(|f| f.item_identifier.clone())
        .collect();
    assert_eq!(reported, sequences[1..]);
    assert_eq!(*effects.lock().expect("lock"), ["r-0"]);

    let response = batch
        .process_kinesis(LambdaEvent::new(event, context(30_000)))
        .await
        .expect("re-read");
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(*effects.lock().expect("lock"), ["r-0", "r-1", "r-2", "r-3"]);
}

fn sqs_batch_event(messages: Vec<SqsMessage>) -> SqsEvent {
    let mut event = SqsEvent::default();
    event.records = messages;
    event
}

#[tokio::test]
async fn bad_sqs_records_fail_alone_and_concurrent_results_map_to_their_message_ids() {
    let config = IdempotencyConfig::builder()
        .key_expression("powertools_json(body).order_id")
        .strict(true)
        .build()
        .expect("config");
    let runs = Counter::default();
    let batch = {
        let runs = runs.clone();
        Idempotency::new(MemoryStore::new(), config)
            .sqs_batch("ship", move |message: SqsMessage| {
                runs.hit();
                let fail = message
                    .body
                    .as_deref()
                    .is_some_and(|b| b.contains("\"fail\""));
                async move {
                    tokio::task::yield_now().await;
                    if fail {
                        Err("refused by the warehouse".to_owned())
                    } else {
                        Ok(json!("shipped"))
                    }
                }
            })
            .concurrency(4)
    };
    let messages = vec![
        sqs_message(r#"{"order_id": "a"}"#, "m-0"),
        sqs_message("not json", "m-1"),
        sqs_message(r#"{"order_id": "b"}"#, "m-2"),
        sqs_message(r#"{"no_order": true}"#, "m-3"),
        sqs_message(r#"{"order_id": "fail"}"#, "m-4"),
        sqs_message(r#"{"order_id": "c"}"#, "m-5"),
        sqs_message(r#"{"order_id": "d"}"#, "m-6"),
    ];
    let response = batch
        .process(LambdaEvent::new(sqs_batch_event(messages), context(30_000)))
        .await
        .expect("batch");
    let reported: Vec<_> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    assert_eq!(
        reported,
        ["m-1", "m-3", "m-4"],
        "bad body, missing key and the failing handler"
    );
    assert_eq!(runs.get(), 5, "the bad records never reached the handler");
}

/// Runs `messages` through a batch with the default concurrency; returns the
/// most messages that were running at once.
async fn most_at_once(messages: Vec<SqsMessage>) -> usize {
    let (running, most) = (Arc::new(Mutex::new(0usize)), Arc::new(Mutex::new(0usize)));
    let batch = {
        let (running, most) = (running.clone(), most.clone());
        idempotency().sqs_batch("ship", move |_: SqsMessage| {
            let (running, most) = (running.clone(), most.clone());
            async move {
                {
                    let mut now = running.lock().expect("lock");
                    *now += 1;
                    let mut most = most.lock().expect("lock");
                    *most = (*most).max(*now);
                }
                // Let every other message that may run start before this one ends.
                for _ in 0..20 {
                    tokio::task::yield_now().await;
                }
                *running.lock().expect("lock") -= 1;
                Ok::<_, String>(json!("shipped"))
            }
        })
    };
    let response = batch
        .process(LambdaEvent::new(sqs_batch_event(messages), context(30_000)))
        .await
        .expect("batch");
    assert!(response.batch_item_failures.is_empty());
    let most = *most.lock().expect("lock");
    most
}

#[tokio::test]
async fn a_standard_batch_of_ten_runs_at_once_and_a_fifo_group_one_at_a_time() {
    let standard: Vec<_> = (0..10)
        .map(|i| sqs_message(&format!(r#"{{"order_id": "s{i}"}}"#), &format!("s-{i}")))
        .collect();
    assert_eq!(most_at_once(standard).await, 10);

    let fifo: Vec<_> = (0..10)
        .map(|i| {
            let mut message = sqs_message(&format!(r#"{{"order_id": "f{i}"}}"#), &format!("f-{i}"));
            message.event_source_arn =
                Some("arn:aws:sqs:eu-west-1:123456789012:orders.fifo".into());
            message
                .attributes
                .insert("MessageGroupId".into(), format!("g{}", i % 2));
            message
        })
        .collect();
    assert_eq!(most_at_once(fifo).await, 2, "two groups, each in order");
}

fn lambda_http_request(fixture_name: &str, edit: impl FnOnce(&mut Value)) -> lambda_http::Request {
    let path = format!(
        "{}/tests/fixtures/{fixture_name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut event: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
    edit(&mut event);
    lambda_http::request::from_str(&event.to_string()).expect("a lambda_http request")
}

#[tokio::test]
async fn lambda_http_requests_get_the_same_header_semantics() {
    let runs = Counter::default();
    let http = {
        let runs = runs.clone();
        idempotency().http("orders", move |request: lambda_http::Request| {
            let run = runs.hit();
            let body = json!({ "run": run, "path": request.uri().path() }).to_string();
            let response = lambda_http::Response::builder()
                .status(201)
                .header("location", "/orders/1")
                .body(Body::Text(body))
                .map_err(|e| e.to_string());
            ready(response)
        })
    };
    for fixture_name in ["apigw_v1.json", "apigw_v2.json"] {
        let first = http
            .handle_request(lambda_http_request(fixture_name, |_| {}))
            .await
            .expect("first");
        let replay = http
            .handle_request(lambda_http_request(fixture_name, |_| {}))
            .await
            .expect("replay");
        assert_eq!(
            (first.status().as_u16(), replay.status().as_u16()),
            (201, 201),
            "{fixture_name}"
        );
        assert_eq!(
            replay.body().as_ref() as &[u8],
            first.body().as_ref() as &[u8],
            "{fixture_name}: same bytes"
        );
        assert_eq!(
            replay.headers().get("location"),
            first.headers().get("location")
        );
        assert_eq!(
            replay
                .headers()
                .get("idempotent-replayed")
                .map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        assert_eq!(first.headers().get("idempotent-replayed"), None);

        let changed =
            lambda_http_request(fixture_name, |e| e["body"] = json!(r#"{"sku":"book-2"}"#));
        assert_eq!(
            http.handle_request(changed)
                .await
                .expect("422")
                .status()
                .as_u16(),
            422
        );
        let other_caller = lambda_http_request(fixture_name, |e| {
            e["requestContext"]["authorizer"]["principalId"] = json!("customer-77");
            if let Some(claims) = e["requestContext"]["authorizer"]["jwt"]["claims"].as_object_mut()
            {
                claims.insert("sub".into(), json!("customer-77"));
            }
        });
        let theirs = http
            .handle_request(other_caller)
            .await
            .expect("another caller's own request");
        assert_eq!(
            theirs.headers().get("idempotent-replayed"),
            None,
            "{fixture_name}"
        );
    }
    assert_eq!(runs.get(), 4, "one run per fixture and caller");
    let no_key = lambda_http_request("apigw_v2.json", |e| {
        e["headers"]
            .as_object_mut()
            .map(|h| h.remove("idempotency-key"));
    });
    assert_eq!(
        http.handle_request(no_key)
            .await
            .expect("400")
            .status()
            .as_u16(),
        400
    );
    assert_eq!(runs.get(), 4);
}
