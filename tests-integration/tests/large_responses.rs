//! Responses over DynamoDB's 400 KB item limit, through the engine and the real
//! SDKs against LocalStack (DynamoDB and S3): stored gzip-compressed in the item
//! when that fits, in S3 with the record pointing at it otherwise (a bucket
//! configured), refused without a bucket; a crash between the object's write and
//! the completion leaves an object no record points at.

mod support;

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::types::AttributeValue;
use lambda_idempotency::{DynamoDbStore, Idempotency, IdempotencyConfig, IdempotencyError};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use support::localstack::{client, default_table, endpoint, recorded_client, s, scan};
use support::{
    context, idempotency_error, in_progress, incompressible, invoke, key_for, poll, Counter,
};
use tower::{Service, ServiceExt};

type BoxError = lambda_runtime::Error;
type Item = HashMap<String, AttributeValue>;

fn config() -> lambda_idempotency::IdempotencyConfigBuilder {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("large")
}

/// The S3 requests a client sent, as `METHOD /bucket/key` (path-style).
#[derive(Clone, Default, Debug)]
struct S3Requests(Arc<Mutex<Vec<String>>>);

impl S3Requests {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().expect("lock"))
    }
}

#[derive(Debug)]
struct S3Recorder(S3Requests);

impl aws_sdk_s3::config::Intercept for S3Recorder {
    fn name(&self) -> &'static str {
        "S3Recorder"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents,
        _: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        let request = context.request();
        let path = request.uri().split('?').next().unwrap_or_default();
        let path = path.splitn(4, '/').nth(3).unwrap_or_default();
        let operation = match request.method() {
            "PUT" => "PutObject",
            "GET" => "GetObject",
            other => other,
        };
        self.0
             .0
            .lock()
            .expect("lock")
            .push(format!("{operation} /{path}"));
        Ok(())
    }
}

fn s3_config() -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::new()
        .behavior_version_latest()
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "test", "test", None, None, "tests",
        ))
        .endpoint_url(endpoint())
        // Host mode: no wildcard DNS for bucket.127.0.0.1.
        .force_path_style(true)
}

fn s3() -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(s3_config().build())
}

fn recorded_s3() -> (aws_sdk_s3::Client, S3Requests) {
    let requests = S3Requests::default();
    let client = aws_sdk_s3::Client::from_conf(
        s3_config()
            .interceptor(S3Recorder(requests.clone()))
            .build(),
    );
    (client, requests)
}

async fn new_bucket(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "idem-{test}-{}-{}",
        support::now_ms(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    s3().create_bucket()
        .bucket(&name)
        .send()
        .await
        .unwrap_or_else(|e| panic!("create bucket {name} at {}: {e:?}", endpoint()));
    name
}

/// Every object in the bucket: (key, body).
async fn objects(bucket: &str) -> Vec<(String, Vec<u8>)> {
    let listed = s3()
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .expect("list objects");
    let mut objects = Vec::new();
    for object in listed.contents() {
        let key = object.key().expect("object key").to_owned();
        let body = s3()
            .get_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .expect("get object")
            .body
            .collect()
            .await
            .expect("object body")
            .into_bytes()
            .to_vec();
        objects.push((key, body));
    }
    objects.sort();
    objects
}

async fn item(table: &str, key: &str) -> Item {
    client()
        .get_item()
        .table_name(table)
        .key("id", AttributeValue::S(key.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .expect("get item")
        .item()
        .cloned()
        .unwrap_or_else(|| panic!("no item under {key}"))
}

async fn item_count(table: &str) -> usize {
    scan(table).await.len()
}

fn gunzip(bytes: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .expect("gzip of UTF-8 text");
    text
}

/// A wrapped handler answering `response(run, event)`, counting its runs.
fn service<S: lambda_idempotency::IdempotencyStore>(
    idempotency: &Idempotency<S>,
    runs: &Counter,
    response: fn(usize, &Value) -> Value,
) -> impl Service<LambdaEvent<Value>, Response = Value, Error = support::ServiceError> + Clone {
    let runs = runs.clone();
    idempotency
        .wrap(service_fn(move |event: LambdaEvent<Value>| {
            let run = runs.hit();
            std::future::ready(Ok::<_, BoxError>(response(run, &event.payload)))
        }))
        .expect("one handler per key prefix")
}

/// About 1 MB of JSON that gzip takes well under 400 KB.
fn compressible(run: usize, _: &Value) -> Value {
    let rows: Vec<Value> = (0..14_000)
        .map(|i| json!({"row": i, "sku": format!("SKU-{:06}", i % 500), "note": "in stock, ships in 2 days", "run": run}))
        .collect();
    json!({ "rows": rows })
}

/// 10 MiB of base64 text over pseudo-random bytes (different for each run):
/// over 400 KB even compressed.
fn ten_mib(run: usize, _: &Value) -> Value {
    json!({ "run": run, "blob": incompressible(10 * 1024 * 1024, run as u64) })
}

#[tokio::test]
async fn a_1_mb_compressible_response_is_stored_gzip_in_the_item_and_replayed_byte_for_byte() {
    let table = default_table("gzip").await;
    let bucket = new_bucket("gzip").await;
    let (ddb, requests) = recorded_client();
    let (s3_client, s3_requests) = recorded_s3();
    let store = DynamoDbStore::new(ddb, &table).with_response_bucket(s3_client, &bucket);
    let idempotency = Idempotency::new(store, config().build().expect("config"));
    let runs = Counter::default();

    // A response that fits is stored as before: JSON text, no encoding attribute.
    let small = Idempotency::new(
        DynamoDbStore::new(client(), &table),
        config().key_prefix("small").build().expect("config"),
    );
    let mut small_service = service(&small, &Counter::default(), |run, _| json!({ "run": run }));
    invoke(&mut small_service, json!({"order_id": "s-1"}))
        .await
        .expect("small");
    let small_item = item(&table, &key_for("small", "s-1")).await;
    assert_eq!(s(&small_item, "data"), r#"{"run":1}"#);
    assert!(!small_item.contains_key("data_encoding"));

    let mut first = service(&idempotency, &runs, compressible);
    let response = invoke(&mut first, json!({"order_id": "g-1"}))
        .await
        .expect("runs");
    let text = serde_json::to_string(&response).expect("json");
    assert!(text.len() > 1_000_000, "{} bytes", text.len());
    assert_eq!(requests.take(), ["PutItem", "PutItem"]);
    assert_eq!(s3_requests.take(), Vec::<String>::new(), "no S3 request");

    let stored = item(&table, &key_for("large", "g-1")).await;
    assert_eq!(s(&stored, "status"), "COMPLETED");
    assert_eq!(s(&stored, "data_encoding"), "gzip");
    let compressed = stored
        .get("data")
        .and_then(|v| v.as_b().ok())
        .expect("data is binary");
    assert!(compressed.as_ref().len() < 400 * 1024);
    assert_eq!(gunzip(compressed.as_ref()), text, "stored byte for byte");
    assert!(objects(&bucket).await.is_empty(), "nothing in S3");

    // A replay from another execution environment: one request, byte for byte.
    let (ddb, requests) = recorded_client();
    let other = Idempotency::new(
        DynamoDbStore::new(ddb, &table).with_response_bucket(s3(), &bucket),
        config().build().expect("config"),
    );
    let mut replaying = service(&other, &runs, compressible);
    let replayed = invoke(&mut replaying, json!({"order_id": "g-1"}))
        .await
        .expect("replayed");
    assert_eq!(serde_json::to_string(&replayed).expect("json"), text);
    assert_eq!(requests.take(), ["PutItem"]);
    assert_eq!(runs.get(), 1);
    assert_eq!(item_count(&table).await, 2);
}

#[tokio::test]
async fn a_10_mb_incompressible_response_goes_to_s3_and_is_replayed_byte_for_byte() {
    let table = default_table("s3").await;
    let bucket = new_bucket("s3").await;
    let (ddb, requests) = recorded_client();
    let (s3_client, s3_requests) = recorded_s3();
    let store = DynamoDbStore::new(ddb, &table).with_response_bucket(s3_client, &bucket);
    let idempotency = Idempotency::new(store.clone(), config().build().expect("config"));
    let runs = Counter::default();

    let mut first = service(&idempotency, &runs, ten_mib);
    let response = invoke(&mut first, json!({"order_id": "b-1"}))
        .await
        .expect("runs");
    let text = serde_json::to_string(&response).expect("json");
    assert!(text.len() > 10 * 1024 * 1024);

    let key = key_for("large", "b-1");
    let stored = item(&table, &key).await;
    assert_eq!(s(&stored, "status"), "COMPLETED");
    // gzip takes base64 text to about 76 %: the object is the compressed text.
    assert_eq!(s(&stored, "data_encoding"), "s3+gzip");
    let hash = key.rsplit('#').next().expect("hash part");
    let object_key = format!("{hash}/{}.json.gz", s(&stored, "owner"));
    assert_eq!(s(&stored, "data"), format!("s3://{bucket}/{object_key}"));
    let objects = objects(&bucket).await;
    assert_eq!(objects.len(), 1, "one object");
    assert_eq!(objects[0].0, object_key);
    assert_eq!(gunzip(&objects[0].1), text, "stored byte for byte");
    // First execution: reserve, the object, then the completing write.
    assert_eq!(requests.take(), ["PutItem", "PutItem"]);
    assert_eq!(
        s3_requests.take(),
        [format!("PutObject /{bucket}/{object_key}")]
    );

    // Replays from another execution environment with a local cache: the first
    // costs the refused PutItem and one GetObject, the next nothing.
    let cached = Idempotency::new(store, config().local_cache(4).build().expect("config"));
    let mut replaying = service(&cached, &runs, ten_mib);
    for expected_requests in [1, 0] {
        let replayed = invoke(&mut replaying, json!({"order_id": "b-1"}))
            .await
            .expect("replayed");
        assert_eq!(serde_json::to_string(&replayed).expect("json"), text);
        assert_eq!(requests.take().len(), expected_requests);
        assert_eq!(s3_requests.take().len(), expected_requests);
    }
    assert_eq!(runs.get(), 1);
    assert_eq!(item_count(&table).await, 1);
}

#[tokio::test]
async fn without_a_bucket_a_10_mb_response_is_refused_and_the_key_released() {
    let table = default_table("nobucket").await;
    let (ddb, requests) = recorded_client();
    let idempotency = Idempotency::new(
        DynamoDbStore::new(ddb, &table),
        config().build().expect("config"),
    );
    let runs = Counter::default();
    let mut service = service(&idempotency, &runs, ten_mib);
    for attempt in 1..=2 {
        let err = invoke(&mut service, json!({"order_id": "n-1"}))
            .await
            .expect_err("too large");
        match idempotency_error(&err) {
            IdempotencyError::ResponseTooLarge { size, limit, .. } => {
                assert!(*size > 10 * 1024 * 1024, "the response's own size: {size}");
                assert_eq!(*limit, 400 * 1024);
            }
            other => panic!("expected ResponseTooLarge, got {other}"),
        }
        assert_eq!(requests.take(), ["PutItem", "DeleteItem"], "released");
        assert_eq!(runs.get(), attempt, "a retry runs the handler again");
        assert_eq!(item_count(&table).await, 0);
    }
}

/// Fails the completing `PutItem` (the one writing a `COMPLETED` record) while
/// armed: the attempt dies after its object was written, before its record.
#[derive(Debug, Clone, Default)]
struct FailCompletion {
    armed: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
}

impl Intercept for FailCompletion {
    fn name(&self) -> &'static str {
        "FailCompletion"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
        let request = context.request();
        let put_item = request
            .headers()
            .get("x-amz-target")
            .is_some_and(|t| t.ends_with(".PutItem"));
        let completes = request
            .body()
            .bytes()
            .is_some_and(|b| String::from_utf8_lossy(b).contains(r#"{"S":"COMPLETED"}"#));
        if self.armed.load(Ordering::SeqCst) && put_item && completes {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err("injected: the process died before the completing write".into());
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_crash_between_the_object_and_the_completion_leaves_an_orphan_no_record_points_at() {
    let table = default_table("crash").await;
    let bucket = new_bucket("crash").await;
    let fault = FailCompletion::default();
    let ddb = aws_sdk_dynamodb::Client::from_conf(
        client()
            .config()
            .to_builder()
            .interceptor(fault.clone())
            .build(),
    );
    let store = DynamoDbStore::new(ddb, &table).with_response_bucket(s3(), &bucket);
    let idempotency = Idempotency::new(store, config().build().expect("config"));
    let runs = Counter::default();
    let service = service(&idempotency, &runs, ten_mib);
    let call = |ms_from_now: i64| {
        let service = service.clone();
        async move {
            service
                .oneshot(LambdaEvent::new(
                    json!({"order_id": "c-1"}),
                    context(ms_from_now),
                ))
                .await
        }
    };

    // The first attempt writes its object, then its completion fails.
    fault.armed.store(true, Ordering::SeqCst);
    let err = call(1_000).await.expect_err("completion fails");
    assert!(
        matches!(idempotency_error(&err), IdempotencyError::Store(_)),
        "{err}"
    );
    fault.armed.store(false, Ordering::SeqCst);
    assert_eq!(
        fault.failed.load(Ordering::SeqCst),
        1,
        "not retried by the SDK"
    );
    assert_eq!(runs.get(), 1);
    let key = key_for("large", "c-1");
    let abandoned = item(&table, &key).await;
    assert_eq!(s(&abandoned, "status"), "INPROGRESS");
    assert!(!abandoned.contains_key("data"));
    let orphan = objects(&bucket).await;
    assert_eq!(orphan.len(), 1, "the first attempt's object");
    let first_text = serde_json::to_string(&ten_mib(1, &Value::Null)).expect("json");
    assert_eq!(gunzip(&orphan[0].1), first_text);

    // Refused until the first attempt's deadline passes, then taken over.
    let retried = poll(|| call(60_000), in_progress).await.expect("retry");
    assert_eq!(runs.get(), 2, "the retry ran the handler");
    let retry_text = serde_json::to_string(&retried).expect("json");
    assert_eq!(
        retry_text,
        serde_json::to_string(&ten_mib(2, &Value::Null)).expect("json")
    );
    assert_ne!(retry_text, first_text);

    let completed = item(&table, &key).await;
    assert_eq!(s(&completed, "status"), "COMPLETED");
    let objects = objects(&bucket).await;
    assert_eq!(objects.len(), 2, "the orphan and the retry's object");
    let pointer = s(&completed, "data");
    let (pointed, others): (Vec<_>, Vec<_>) = objects
        .iter()
        .partition(|(k, _)| pointer == format!("s3://{bucket}/{k}"));
    assert_eq!(pointed.len(), 1, "{pointer} is one of the objects");
    assert!(
        pointed[0].0.contains(s(&completed, "owner")),
        "the retry's own object"
    );
    assert_eq!(gunzip(&pointed[0].1), retry_text);
    assert_eq!(others[0].0, orphan[0].0, "the orphan is not referenced");

    // A replay returns the retry's response, byte for byte.
    let replayed = call(60_000).await.expect("replayed");
    assert_eq!(serde_json::to_string(&replayed).expect("json"), retry_text);
    assert_eq!(runs.get(), 2);
    assert_eq!(item_count(&table).await, 1);
}

/// Writes a completed record by hand, as another writer (or an operator) would.
async fn put_record(table: &str, key: &str, extra: &[(&str, AttributeValue)]) {
    let mut request = client()
        .put_item()
        .table_name(table)
        .item("id", AttributeValue::S(key.to_owned()))
        .item("status", AttributeValue::S("COMPLETED".into()))
        .item(
            "expiration",
            AttributeValue::N((support::now_ms() / 1000 + 3600).to_string()),
        )
        .item("owner", AttributeValue::S("someone".into()));
    for (name, value) in extra {
        request = request.item(*name, value.clone());
    }
    request.send().await.expect("put record");
}

#[tokio::test]
async fn an_uncompressed_s3_record_replays_and_malformed_forms_are_typed_errors() {
    let table = default_table("forms").await;
    let bucket = new_bucket("forms").await;
    let idempotency = Idempotency::new(
        DynamoDbStore::new(client(), &table).with_response_bucket(s3(), &bucket),
        config().build().expect("config"),
    );
    let runs = Counter::default();
    let mut service = service(&idempotency, &runs, |run, _| json!({ "run": run }));

    // The `s3` form (an object holding the text itself) replays.
    s3().put_object()
        .bucket(&bucket)
        .key("by-hand/plain.json")
        .body(br#"{"stored":"in S3, uncompressed"}"#.to_vec().into())
        .send()
        .await
        .expect("put object");
    put_record(
        &table,
        &key_for("large", "plain"),
        &[
            ("data_encoding", AttributeValue::S("s3".into())),
            (
                "data",
                AttributeValue::S(format!("s3://{bucket}/by-hand/plain.json")),
            ),
        ],
    )
    .await;
    let replayed = invoke(&mut service, json!({"order_id": "plain"}))
        .await
        .expect("replayed");
    assert_eq!(replayed, json!({"stored": "in S3, uncompressed"}));

    let s_ = |v: &str| AttributeValue::S(v.to_owned());
    let b_ = |v: &[u8]| AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(v.to_vec()));
    // (order id, the record's extra attributes, the attribute at fault, the problem)
    type Case<'a> = (&'a str, Vec<(&'a str, AttributeValue)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown-encoding",
            vec![("data_encoding", s_("zstd")), ("data", s_("{}"))],
            "data_encoding",
            "not gzip, s3 or s3+gzip",
        ),
        (
            "encoding-not-a-string",
            vec![("data_encoding", b_(b"gzip")), ("data", s_("{}"))],
            "data_encoding",
            "is not a string",
        ),
        (
            "gzip-but-text",
            vec![("data_encoding", s_("gzip")), ("data", s_("{}"))],
            "data",
            "is not binary",
        ),
        (
            "gzip-but-garbage",
            vec![("data_encoding", s_("gzip")), ("data", b_(b"not gzip"))],
            "data",
            "is not valid gzip",
        ),
        (
            "encoding-without-data",
            vec![("data_encoding", s_("s3+gzip"))],
            "data",
            "is missing",
        ),
        (
            "not-a-pointer",
            vec![("data_encoding", s_("s3")), ("data", s_("{\"a\":1}"))],
            "data",
            "not an s3://bucket/key pointer",
        ),
        (
            "pointer-not-a-string",
            vec![("data_encoding", s_("s3")), ("data", b_(b"s3://b/k"))],
            "data",
            "is not a string",
        ),
        (
            "missing-object",
            vec![
                ("data_encoding", s_("s3+gzip")),
                ("data", s_(&format!("s3://{bucket}/gone/object.json.gz"))),
            ],
            "data",
            "does not exist",
        ),
    ];
    for (order, extra, attribute, problem) in cases {
        let key = key_for("large", order);
        put_record(&table, &key, &extra).await;
        let err = invoke(&mut service, json!({ "order_id": order }))
            .await
            .expect_err("malformed");
        match idempotency_error(&err) {
            IdempotencyError::MalformedRecord {
                key: k,
                attribute: a,
                problem: p,
            } => {
                assert_eq!(
                    (k.as_str(), a.as_str()),
                    (key.as_str(), attribute),
                    "{order}: {p}"
                );
                assert!(p.contains(problem), "{order}: {p}");
            }
            other => panic!("{order}: expected MalformedRecord, got {other}"),
        }
        // The item is left as it was.
        assert_eq!(s(&item(&table, &key).await, "owner"), "someone");
    }
    assert_eq!(runs.get(), 0, "the handler never ran");

    // A store without a bucket cannot read an S3 record: a store error, the
    // handler not run.
    let no_bucket = Idempotency::new(
        DynamoDbStore::new(client(), &table),
        config().build().expect("config"),
    );
    let mut without = self::service(&no_bucket, &runs, |run, _| json!({ "run": run }));
    let err = invoke(&mut without, json!({"order_id": "plain"}))
        .await
        .expect_err("no bucket");
    assert!(
        matches!(idempotency_error(&err), IdempotencyError::Store(e) if e.to_string().contains("with_response_bucket")),
        "{err}"
    );
    assert_eq!(runs.get(), 0);
}

/// With staged outbox messages the record's `Put` goes in one
/// `TransactWriteItems` with them: the object is written first and the
/// transaction carries the pointer.
#[tokio::test]
async fn with_an_outbox_the_pointer_is_committed_in_the_transaction() {
    use lambda_idempotency::{effects, OutboxMessage};
    let table = default_table("outbox").await;
    let bucket = new_bucket("outbox").await;
    let (ddb, requests) = recorded_client();
    let (s3_client, s3_requests) = recorded_s3();
    let idempotency = Idempotency::new(
        DynamoDbStore::new(ddb, &table).with_response_bucket(s3_client, &bucket),
        config().build().expect("config"),
    );
    let runs = Counter::default();
    let mut staging = {
        let runs = runs.clone();
        idempotency
            .wrap(service_fn(move |event: LambdaEvent<Value>| {
                let run = runs.hit();
                let staged = effects().map(|effects| {
                    effects.outbox().push(OutboxMessage::Custom {
                        sink: "audit".into(),
                        payload: json!({ "order": event.payload["order_id"] }),
                    })
                });
                std::future::ready(
                    staged
                        .map(|_message_key| ten_mib(run, &event.payload))
                        .map_err(BoxError::from),
                )
            }))
            .expect("one handler per key prefix")
    };
    let response = invoke(&mut staging, json!({"order_id": "o-1"}))
        .await
        .expect("runs");
    let text = serde_json::to_string(&response).expect("json");
    assert_eq!(requests.take(), ["PutItem", "TransactWriteItems"]);
    assert_eq!(s3_requests.take().len(), 1, "one PutObject");
    let stored = item(&table, &key_for("large", "o-1")).await;
    assert_eq!(s(&stored, "data_encoding"), "s3+gzip");
    assert_eq!(item_count(&table).await, 2, "the record and its message");

    let other = Idempotency::new(
        DynamoDbStore::new(client(), &table).with_response_bucket(s3(), &bucket),
        config().build().expect("config"),
    );
    let mut replaying = service(&other, &runs, ten_mib);
    let replayed = invoke(&mut replaying, json!({"order_id": "o-1"}))
        .await
        .expect("replayed");
    assert_eq!(serde_json::to_string(&replayed).expect("json"), text);
    assert_eq!(runs.get(), 1);
}
