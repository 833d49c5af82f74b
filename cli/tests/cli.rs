//! The `idempotency` binary against LocalStack: records written by the real
//! engine (`DynamoDbStore` through a wrapped handler), read, listed, released
//! and swept by the tool, every answer read as `--json`.
//!
//! LocalStack is reached at `AWS_ENDPOINT_URL` (default `http://127.0.0.1:4566`),
//! as `scripts/test.sh` ensures it.

use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};
use lambda_idempotency::{
    effects, DynamoDbStore, Idempotency, IdempotencyConfig, IdempotencyRecord, IdempotencyStore,
    OutboxMessage, OutboxStore, Status,
};
use lambda_runtime::{service_fn, Context, LambdaEvent};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tower::{Service, ServiceExt};

type BoxError = lambda_runtime::Error;

fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".to_owned())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        now_ms(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn dynamodb() -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::config::Builder::new()
        .behavior_version_latest()
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(endpoint())
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

fn sqs() -> aws_sdk_sqs::Client {
    let config = aws_sdk_sqs::config::Builder::new()
        .behavior_version_latest()
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "tests",
        ))
        .endpoint_url(endpoint())
        .build();
    aws_sdk_sqs::Client::from_conf(config)
}

/// A fresh table with the default layout (partition key `id`), TTL on `expiration`.
async fn table(test: &str) -> String {
    let name = unique(&format!("cli-{test}"));
    let client = dynamodb();
    client
        .create_table()
        .table_name(&name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("attribute"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(KeyType::Hash)
                .build()
                .expect("key schema"),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("create table {name} at {}: {e:?}", endpoint()));
    for _ in 0..100 {
        let described = client
            .describe_table()
            .table_name(&name)
            .send()
            .await
            .expect("describe table");
        if described.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .update_time_to_live()
        .table_name(&name)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name("expiration")
                .build()
                .expect("ttl"),
        )
        .send()
        .await
        .expect("enable TTL");
    name
}

/// The engine on `table`: key `order_id`, prefix `orders` (the `--function`).
fn idempotency(table: &str) -> Idempotency<DynamoDbStore> {
    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("orders")
        .build()
        .expect("config");
    Idempotency::new(DynamoDbStore::new(dynamodb(), table), config)
}

/// A Lambda context whose deadline is `ms_from_now` ahead.
fn context(ms_from_now: i64) -> Context {
    let mut context = Context::default();
    context.deadline = (now_ms() + ms_from_now) as u64;
    context
}

async fn call<S>(service: &mut S, event: &Value) -> Result<Value, S::Error>
where
    S: Service<LambdaEvent<Value>, Response = Value>,
{
    service
        .ready()
        .await?
        .call(LambdaEvent::new(event.clone(), context(600_000)))
        .await
}

/// The tool with the test's endpoint and credentials in its environment.
fn tool() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idempotency"));
    command
        .env("AWS_ENDPOINT_URL", endpoint())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_LAMBDA_FUNCTION_NAME");
    command
}

/// Runs the tool with the test's endpoint and credentials: (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    run_command(tool().args(args))
}

/// Runs `command` to its end: (exit code, stdout, stderr).
fn run_command(command: &mut Command) -> (i32, String, String) {
    let output = command.output().expect("run the idempotency binary");
    (
        output.status.code().expect("exit code"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs the tool with `--json`: (exit code, the one JSON document on stdout).
fn run_json(args: &[&str]) -> (i32, Value) {
    let mut args = args.to_vec();
    args.push("--json");
    let (code, stdout, stderr) = run(&args);
    let document = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("{args:?}: stdout is not one JSON document ({e}): {stdout:?}; stderr: {stderr}")
    });
    (code, document)
}

/// An event in a temporary file, removed when dropped.
struct EventFile(PathBuf);

impl EventFile {
    fn to_str(&self) -> Option<&str> {
        self.0.to_str()
    }
}

impl Drop for EventFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn event_file(event: &Value) -> EventFile {
    let path = std::env::temp_dir().join(format!("{}.json", unique("cli-event")));
    std::fs::write(&path, event.to_string()).expect("write the event file");
    EventFile(path)
}

/// The only idempotency record in `table`.
async fn only_record(table: &str) -> IdempotencyRecord {
    let mut records = DynamoDbStore::new(dynamodb(), table)
        .scan_records(None)
        .await
        .expect("scan");
    assert_eq!(records.len(), 1, "{records:?}");
    records.remove(0)
}

#[tokio::test]
async fn show_by_key_and_by_event_finds_the_record_the_engine_wrote() {
    let table = table("show").await;
    let idempotency = idempotency(&table);
    let mut service = idempotency
        .wrap(service_fn(|event: LambdaEvent<Value>| async move {
            Ok::<_, BoxError>(json!({ "charged": event.payload["order_id"] }))
        }))
        .expect("wrap");
    let event = json!({ "order_id": "o-1", "amount": 5 });
    let response = call(&mut service, &event).await.expect("first call");
    let stored = only_record(&table).await;

    // By key.
    let (code, doc) = run_json(&["show", "--table", &table, "--key", &stored.key]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["key"], stored.key.as_str());
    assert_eq!(doc["derived"], false);
    let record = &doc["record"];
    assert_eq!(record["key"], stored.key.as_str());
    assert_eq!(record["status"], "COMPLETED");
    assert_eq!(record["state"], "completed");
    assert_eq!(record["owner"], stored.owner.as_str());
    assert_eq!(record["execution"], stored.execution.as_str());
    assert_eq!(record["expiration"], stored.expiration);
    assert_eq!(record["expired"], false);
    let data: Value = serde_json::from_str(record["data"].as_str().expect("data")).expect("JSON");
    assert_eq!(data, response);
    assert_eq!(doc["steps"], json!([]));

    // By event file, key expression and function name: the derived key is the stored one.
    let file = event_file(&event);
    let file = file.to_str().expect("utf-8 path");
    let (code, doc) = run_json(&[
        "show",
        "--table",
        &table,
        "--event",
        file,
        "--key-expression",
        "order_id",
        "--function",
        "orders",
    ]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["derived"], true);
    assert_eq!(doc["key"], stored.key.as_str());
    assert_eq!(doc["record"]["status"], "COMPLETED");

    // A named handler (`wrap_as`): `--handler` gives its key.
    let mut refunds = idempotency.wrap_as(
        "refund",
        service_fn(|_: LambdaEvent<Value>| async { Ok::<_, BoxError>(json!("refunded")) }),
    );
    call(&mut refunds, &event).await.expect("refund");
    let refund_key = idempotency
        .key_for(Some("refund"), &event)
        .expect("key")
        .expect("material");
    let (code, doc) = run_json(&[
        "show",
        "--table",
        &table,
        "--event",
        file,
        "--key-expression",
        "order_id",
        "--function",
        "orders",
        "--handler",
        "refund",
    ]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["key"], refund_key.as_str());
    assert_eq!(doc["record"]["data"], "\"refunded\"");

    // Another order: no record (exit 1), and the human text says so.
    let other = event_file(&json!({ "order_id": "o-2" }));
    let other = other.to_str().expect("utf-8 path");
    let args = [
        "show",
        "--table",
        &table,
        "--event",
        other,
        "--key-expression",
        "order_id",
        "--function",
        "orders",
    ];
    let (code, doc) = run_json(&args);
    assert_eq!(code, 1, "{doc}");
    assert_eq!(doc["record"], Value::Null);
    assert!(doc["key"].as_str().expect("key").starts_with("orders#"));
    let (code, _, stderr) = run(&args);
    assert_eq!(code, 1);
    assert!(stderr.contains("no record under orders#"), "{stderr}");

    // No key material: nothing was recorded (exit 1).
    let empty = event_file(&json!({ "amount": 5 }));
    let (code, doc) = run_json(&[
        "show",
        "--table",
        &table,
        "--event",
        empty.to_str().expect("utf-8 path"),
        "--key-expression",
        "order_id",
    ]);
    assert_eq!(code, 1, "{doc}");
    assert_eq!(doc["key"], Value::Null);

    // Human output names the key, the status and what the next call does.
    let (code, stdout, _) = run(&["show", "--table", &table, "--key", &stored.key]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains(&stored.key) && stdout.contains("COMPLETED (completed)"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_stuck_reservation_is_listed_refused_to_others_and_released_by_its_owner() {
    let table = table("stuck").await;
    let idempotency = idempotency(&table);
    let store = DynamoDbStore::new(dynamodb(), &table);
    let event = json!({ "order_id": "o-stuck" });
    let key = idempotency
        .key_for(None, &event)
        .expect("key")
        .expect("material");
    // An attempt that died 20 minutes ago (deadline passed) and that no retry took over.
    let now = now_ms();
    let dead = IdempotencyRecord {
        key: key.clone(),
        status: Status::InProgress,
        expiration: now / 1000 + 3600,
        in_progress_expiration: Some(now - 20 * 60_000),
        data: None,
        validation: None,
        owner: "dead-owner".into(),
        is_error: false,
        execution: "dead-owner".into(),
    };
    store.reserve(&dead, now).await.expect("reserve");
    // A live one on another key: an attempt possibly still running.
    let live_key = idempotency
        .key_for(None, &json!({ "order_id": "o-live" }))
        .expect("key")
        .expect("material");
    let live = IdempotencyRecord {
        key: live_key.clone(),
        in_progress_expiration: Some(now + 10 * 60_000),
        owner: "live-owner".into(),
        execution: "live-owner".into(),
        ..dead.clone()
    };
    store.reserve(&live, now).await.expect("reserve");

    let (code, doc) = run_json(&["in-progress", "--table", &table, "--older-than", "10m"]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["count"], 1, "{doc}");
    let listed = &doc["reservations"][0];
    assert_eq!(listed["key"], key.as_str());
    assert_eq!(listed["owner"], "dead-owner");
    assert_eq!(listed["state"], "abandoned");
    assert_eq!(
        listed["in_progress_expiration"],
        dead.in_progress_expiration.expect("deadline")
    );
    assert_eq!(listed["expiration"], dead.expiration);

    let (code, doc) = run_json(&["in-progress", "--table", &table, "--older-than", "30m"]);
    assert_eq!((code, doc["count"].clone()), (0, json!(0)), "{doc}");
    let (code, doc) = run_json(&["in-progress", "--table", &table, "--live"]);
    assert_eq!(code, 0, "{doc}");
    let keys: Vec<&str> = doc["reservations"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|r| r["key"].as_str())
        .collect();
    assert_eq!(
        keys,
        [key.as_str(), live_key.as_str()],
        "oldest deadline first"
    );

    // Another dead attempt, nothing journaled: by default kept, open for
    // takeover, so a retry reuses its execution's derived keys.
    let open_key = idempotency
        .key_for(None, &json!({ "order_id": "o-open" }))
        .expect("key")
        .expect("material");
    let unjournaled = IdempotencyRecord {
        key: open_key.clone(),
        owner: "open-owner".into(),
        execution: "open-owner".into(),
        ..dead.clone()
    };
    store.reserve(&unjournaled, now).await.expect("reserve");
    let (code, doc) = run_json(&[
        "release",
        "--table",
        &table,
        "--key",
        &open_key,
        "--owner",
        "open-owner",
    ]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(
        (doc["outcome"].clone(), doc["journaled_steps"].clone()),
        (json!("opened"), json!(0))
    );
    let opened = store.get(&open_key).await.expect("get").expect("kept");
    assert_eq!(opened.in_progress_expiration, Some(0));
    assert_eq!(opened.execution, "open-owner");

    // Not the owner: refused, the item untouched.
    let (code, doc) = run_json(&[
        "release",
        "--table",
        &table,
        "--key",
        &key,
        "--owner",
        "someone-else",
    ]);
    assert_eq!(code, 3, "{doc}");
    assert_eq!(doc["outcome"], "refused");
    assert_eq!(doc["reason"], "not_owner");
    assert_eq!(store.get(&key).await.expect("get"), Some(dead.clone()));

    // Live without --force: refused.
    let (code, doc) = run_json(&[
        "release",
        "--table",
        &table,
        "--key",
        &live_key,
        "--owner",
        "live-owner",
    ]);
    assert_eq!(code, 3, "{doc}");
    assert_eq!(doc["reason"], "live");
    assert!(store.get(&live_key).await.expect("get").is_some());

    // The owner, deadline passed, no journal, --delete: deleted.
    let (code, doc) = run_json(&[
        "release",
        "--table",
        &table,
        "--key",
        &key,
        "--owner",
        "dead-owner",
        "--delete",
    ]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["outcome"], "deleted");
    assert_eq!(doc["journaled_steps"], 0);
    assert_eq!(store.get(&key).await.expect("get"), None);
    let (code, doc) = run_json(&[
        "release",
        "--table",
        &table,
        "--key",
        &key,
        "--owner",
        "dead-owner",
    ]);
    assert_eq!(
        (code, doc["outcome"].clone()),
        (1, json!("not_found")),
        "{doc}"
    );

    // A retry of the wrapped handler now executes.
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let mut service = idempotency
        .wrap(service_fn(move |event: LambdaEvent<Value>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, BoxError>(json!({ "charged": event.payload["order_id"] })) }
        }))
        .expect("wrap");
    let response = call(&mut service, &event).await.expect("retry");
    assert_eq!(response, json!({ "charged": "o-stuck" }));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let (code, doc) = run_json(&["show", "--table", &table, "--key", &key]);
    assert_eq!(
        (code, doc["record"]["status"].clone()),
        (0, json!("COMPLETED")),
        "{doc}"
    );
}

#[tokio::test]
async fn a_reservation_with_a_journaled_step_is_opened_and_the_retry_replays_the_step() {
    let table = table("journal").await;
    let idempotency = idempotency(&table);
    let charges = Arc::new(AtomicUsize::new(0));
    let attempts = Arc::new(AtomicUsize::new(0));
    let stepped = Arc::new(tokio::sync::Notify::new());
    let service = {
        let (charges, attempts, stepped) = (charges.clone(), attempts.clone(), stepped.clone());
        idempotency
            .wrap(service_fn(move |event: LambdaEvent<Value>| {
                let (charges, attempts, stepped) =
                    (charges.clone(), attempts.clone(), stepped.clone());
                async move {
                    let attempt = attempts.fetch_add(1, Ordering::SeqCst);
                    let charge = effects()?
                        .step("charge", |derived| async move {
                            charges.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, std::io::Error>(json!({ "charge": derived }))
                        })
                        .await?;
                    if attempt == 0 {
                        // The first attempt hangs after its step until it is cut off.
                        stepped.notify_one();
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, BoxError>(
                        json!({ "order": event.payload["order_id"], "charge": charge }),
                    )
                }
            }))
            .expect("wrap")
    };
    let event = json!({ "order_id": "o-journal" });
    let first = tokio::spawn(
        service
            .clone()
            .oneshot(LambdaEvent::new(event.clone(), context(600_000))),
    );
    stepped.notified().await;
    first.abort();
    assert!(first.await.expect_err("cut off").is_cancelled());
    let record = only_record(&table).await;
    assert_eq!(record.status, Status::InProgress);

    // Its deadline is ahead: listed only with --live, released only with --force.
    let (code, doc) = run_json(&["in-progress", "--table", &table]);
    assert_eq!((code, doc["count"].clone()), (0, json!(0)), "{doc}");
    let (code, doc) = run_json(&["in-progress", "--table", &table, "--live"]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["reservations"][0]["state"], "running");
    let release = [
        "release",
        "--table",
        &table,
        "--key",
        &record.key,
        "--owner",
        &record.owner,
    ];
    let (code, doc) = run_json(&release);
    assert_eq!((code, doc["reason"].clone()), (3, json!("live")), "{doc}");

    // Deleting would run the journaled step again under a new key: refused.
    let deleting: Vec<&str> = release
        .iter()
        .copied()
        .chain(["--force", "--delete"])
        .collect();
    let (code, doc) = run_json(&deleting);
    assert_eq!(
        (code, doc["reason"].clone()),
        (3, json!("journaled")),
        "{doc}"
    );
    assert_eq!(only_record(&table).await, record);

    let forced: Vec<&str> = release.iter().copied().chain(["--force"]).collect();
    let (code, doc) = run_json(&forced);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["outcome"], "opened");
    assert_eq!(doc["journaled_steps"], 1);
    assert_eq!(doc["forced"], true);

    // Open for takeover, the journal kept.
    let (code, doc) = run_json(&["show", "--table", &table, "--key", &record.key]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["record"]["state"], "open");
    assert_eq!(doc["record"]["in_progress_expiration"], 0);
    assert_eq!(doc["record"]["execution"], record.execution.as_str());
    assert_eq!(doc["steps"][0]["name"], "charge");

    // The retry resumes the execution: the step replays, its closure ran once in all.
    let response = service
        .clone()
        .oneshot(LambdaEvent::new(event.clone(), context(600_000)))
        .await
        .expect("retry");
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(charges.load(Ordering::SeqCst), 1);
    let journaled: Value =
        serde_json::from_str(doc["steps"][0]["data"].as_str().expect("data")).expect("JSON");
    assert_eq!(response["charge"], journaled);
    let completed = only_record(&table).await;
    assert_eq!(completed.status, Status::Completed);
    assert_eq!(completed.execution, record.execution);
}

#[tokio::test]
async fn the_outbox_sweep_delivers_pending_messages_once() {
    let table = table("outbox").await;
    let queue_url = sqs()
        .create_queue()
        .queue_name(unique("cli-outbox"))
        .send()
        .await
        .expect("create queue")
        .queue_url()
        .expect("queue url")
        .to_owned();
    // No dispatcher: the message is committed PENDING, as after a crash before delivery.
    let idempotency = idempotency(&table);
    let url = queue_url.clone();
    let mut service = idempotency
        .wrap(service_fn(move |event: LambdaEvent<Value>| {
            let url = url.clone();
            async move {
                effects()?.outbox().push(OutboxMessage::Sqs {
                    queue_url: url,
                    body: json!({ "shipped": event.payload["order_id"] }).to_string(),
                    group_id: None,
                });
                Ok::<_, BoxError>(json!("ok"))
            }
        }))
        .expect("wrap");
    call(&mut service, &json!({ "order_id": "o-out" }))
        .await
        .expect("call");
    // The outbox item shares the table but is not a record.
    assert_eq!(only_record(&table).await.status, Status::Completed);

    let (code, doc) = run_json(&["outbox", "pending", "--table", &table]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["count"], 1, "{doc}");
    let message = &doc["messages"][0];
    assert_eq!(message["delivered"], false);
    assert_eq!(message["message"]["kind"], "sqs");
    assert_eq!(message["message"]["queue_url"], queue_url.as_str());
    let outbox_key = message["key"].as_str().expect("key").to_owned();
    let derived_key = message["derived_key"]
        .as_str()
        .expect("derived key")
        .to_owned();
    assert!(outbox_key.contains("#outbox#0"), "{outbox_key}");

    let (code, doc) = run_json(&["outbox", "deliver", "--table", &table]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(
        (doc["delivered"].clone(), doc["failed"].clone()),
        (json!(1), json!(0))
    );

    // Arrived once, with its derived key: poll until it is there, then one more
    // long poll finds nothing else.
    let client = sqs();
    let mut received = Vec::new();
    for _ in 0..20 {
        received.extend(receive(&client, &queue_url).await);
        if !received.is_empty() {
            break;
        }
    }
    received.extend(receive(&client, &queue_url).await);
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].body(), Some(r#"{"shipped":"o-out"}"#));
    let attribute = received[0]
        .message_attributes()
        .and_then(|a| a.get("idempotency-key"))
        .and_then(|v| v.string_value());
    assert_eq!(attribute, Some(derived_key.as_str()));

    // Marked delivered: no longer pending, and a second sweep delivers nothing.
    let store = DynamoDbStore::new(dynamodb(), &table);
    let marked = store
        .get_outbox(&outbox_key)
        .await
        .expect("get")
        .expect("kept");
    assert!(marked.delivered);
    let (code, doc) = run_json(&["outbox", "pending", "--table", &table]);
    assert_eq!((code, doc["count"].clone()), (0, json!(0)), "{doc}");
    let (code, doc) = run_json(&["outbox", "deliver", "--table", &table]);
    assert_eq!((code, doc["delivered"].clone()), (0, json!(0)), "{doc}");
}

/// One long poll of the queue (1 s); the messages received are deleted.
async fn receive(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
) -> Vec<aws_sdk_sqs::types::Message> {
    let messages = client
        .receive_message()
        .queue_url(queue_url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .message_attribute_names("All")
        .send()
        .await
        .expect("receive")
        .messages()
        .to_vec();
    for message in &messages {
        client
            .delete_message()
            .queue_url(queue_url)
            .receipt_handle(message.receipt_handle().expect("receipt handle"))
            .send()
            .await
            .expect("delete");
    }
    messages
}

#[tokio::test]
async fn malformed_items_and_usage_errors_have_their_exit_codes() {
    let table = table("errors").await;
    dynamodb()
        .put_item()
        .table_name(&table)
        .item("id", AttributeValue::S("orders#bad".into()))
        .item("status", AttributeValue::S("WEIRD".into()))
        .item("expiration", AttributeValue::N("9999999999".into()))
        .send()
        .await
        .expect("put");
    let (code, doc) = run_json(&["show", "--table", &table, "--key", "orders#bad"]);
    assert_eq!(code, 5, "{doc}");
    assert_eq!(doc["error"]["kind"], "malformed_record");
    assert!(doc["error"]["message"]
        .as_str()
        .expect("message")
        .contains("orders#bad"));
    let (code, doc) = run_json(&["in-progress", "--table", &table]);
    assert_eq!(
        (code, doc["count"].clone()),
        (0, json!(0)),
        "a WEIRD status is not INPROGRESS: {doc}"
    );

    // Usage errors: ours and the argument parser's, both exit 2 with one JSON document.
    let (code, doc) = run_json(&["in-progress", "--table", &table, "--older-than", "ten"]);
    assert_eq!(code, 2, "{doc}");
    assert_eq!(doc["error"]["kind"], "usage");
    let (code, doc) = run_json(&[
        "show",
        "--table",
        &table,
        "--event",
        "/nonexistent.json",
        "--key-expression",
        "a",
    ]);
    assert_eq!(code, 2, "{doc}");
    let event = event_file(&json!({ "a": 1 }));
    let (code, doc) = run_json(&[
        "show",
        "--table",
        &table,
        "--event",
        event.to_str().expect("utf-8 path"),
        "--key-expression",
        "a.[",
    ]);
    assert_eq!(
        (code, doc["error"]["kind"].clone()),
        (2, json!("usage")),
        "{doc}"
    );

    let (code, doc) = run_json(&[
        "show",
        "--table",
        &table,
        "--event",
        event.to_str().expect("utf-8 path"),
        "--key-expression",
        "a",
        "--powertools-keys",
    ]);
    if cfg!(feature = "powertools") {
        assert_eq!(code, 1, "no record under the Powertools key: {doc}");
    } else {
        assert_eq!(
            (code, doc["error"]["kind"].clone()),
            (2, json!("usage")),
            "{doc}"
        );
    }

    // A missing table: an AWS error, DynamoDB's code in the message.
    let (code, doc) = run_json(&["show", "--table", &unique("cli-missing"), "--key", "k"]);
    assert_eq!(code, 4, "{doc}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .expect("message")
            .contains("ResourceNotFoundException"),
        "{doc}"
    );
}

#[tokio::test]
async fn show_lists_the_compensations_of_a_saga_that_failed_permanently() {
    let table = table("saga").await;
    let idempotency = idempotency(&table);
    let ship = idempotency.function("ship", |_: Value| async move {
        let effects = effects()?;
        effects
            .step_with_compensation(
                "charge",
                |_| async move { Ok::<_, lambda_idempotency::PermanentError>(json!("ch_1")) },
                |charge: Value, _| async move { Ok::<_, BoxError>(json!({ "refunded": charge })) },
            )
            .await?;
        Err::<Value, _>(lambda_idempotency::Error::Handler(
            lambda_idempotency::PermanentError::new("no carrier"),
        ))
    });
    let event = json!({ "order_id": "o-saga" });
    ship.call(event.clone(), Some(&context(60_000)))
        .await
        .expect_err("fails permanently");
    let record = only_record(&table).await;

    let (code, doc) = run_json(&["show", "--table", &table, "--key", &record.key]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["steps"][0]["name"], "charge");
    assert_eq!(doc["compensations"][0]["name"], "compensate:charge");
    assert_eq!(doc["compensations"][0]["position"], 0);
    assert_eq!(
        doc["compensations"][0]["data"],
        json!({ "refunded": "ch_1" }).to_string()
    );
}

/// Runs the tool with `args` twice, once with `global` (an option and its value)
/// before the command and once after it, and checks both answer alike: the same
/// exit code and the same `summary` of stdout (without the times, which differ).
/// Returns the exit code and the summary.
fn before_and_after(
    command: fn() -> Command,
    global: &[&str],
    args: &[&str],
    summary: fn(&str) -> Value,
) -> (i32, Value) {
    let (subcommand, rest) = args.split_first().expect("a command");
    let first: Vec<&str> = global
        .iter()
        .chain([subcommand])
        .chain(rest)
        .copied()
        .collect();
    let last: Vec<&str> = args.iter().chain(global).copied().collect();
    let (code, stdout, stderr) = run_command(command().args(&first));
    let (code_after, stdout_after, stderr_after) = run_command(command().args(&last));
    let (before, after) = (summary(&stdout), summary(&stdout_after));
    assert_eq!(
        (code, &before),
        (code_after, &after),
        "{first:?} (stderr: {stderr}) and {last:?} (stderr: {stderr_after}) differ"
    );
    (code, before)
}

/// An `in-progress --json` listing without its times: the table, the count and the keys.
fn listing(stdout: &str) -> Value {
    let document: Value = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {stdout:?}"));
    let keys: Vec<Value> = document["reservations"]
        .as_array()
        .map(|list| list.iter().map(|r| r["key"].clone()).collect())
        .unwrap_or_default();
    json!({ "table": document["table"], "count": document["count"], "keys": keys })
}

/// The first line of a text listing: the first reservation's key.
fn first_line(stdout: &str) -> Value {
    json!(stdout.lines().next())
}

#[tokio::test]
async fn global_options_are_accepted_before_and_after_the_command() {
    let table = table("globals").await;
    let store = DynamoDbStore::new(dynamodb(), &table);
    let now = now_ms();
    let dead = IdempotencyRecord {
        key: "orders#globals".into(),
        status: Status::InProgress,
        expiration: now / 1000 + 3600,
        in_progress_expiration: Some(now - 60_000),
        data: None,
        validation: None,
        owner: "dead-owner".into(),
        is_error: false,
        execution: "dead-owner".into(),
    };
    store.reserve(&dead, now).await.expect("reserve");
    let listed = json!({ "table": table, "count": 1, "keys": ["orders#globals"] });

    // --json, and --table.
    let (code, summary) = before_and_after(
        tool,
        &["--json"],
        &["in-progress", "--table", &table],
        listing,
    );
    assert_eq!((code, &summary), (0, &listed));
    let (code, summary) = before_and_after(
        tool,
        &["--table", &table],
        &["in-progress", "--json"],
        listing,
    );
    assert_eq!((code, &summary), (0, &listed));
    // Both before a nested command, and between its two words.
    for args in [
        ["--json", "--table", &table, "outbox", "pending"],
        ["outbox", "--json", "--table", &table, "pending"],
    ] {
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        let document: Value = serde_json::from_str(&stdout).expect("one JSON document");
        assert_eq!(document["count"], 0, "{args:?}: {document}");
    }
    // Text output too: the human listing starts with the key.
    let (code, summary) =
        before_and_after(tool, &["--table", &table], &["in-progress"], first_line);
    assert_eq!((code, summary), (0, json!("orders#globals")));

    // --endpoint-url: without AWS_ENDPOINT_URL, only the option reaches LocalStack.
    let endpoint = endpoint();
    let without_endpoint = || {
        let mut command = tool();
        command.env_remove("AWS_ENDPOINT_URL");
        command
    };
    let (code, summary) = before_and_after(
        without_endpoint,
        &["--endpoint-url", &endpoint],
        &["in-progress", "--table", &table, "--json"],
        listing,
    );
    assert_eq!((code, &summary), (0, &listed));

    // --region: LocalStack keeps tables per region, and the environment names another.
    let elsewhere = || {
        let mut command = tool();
        command.env("AWS_REGION", "eu-west-1");
        command
    };
    let (code, _, _) = run_command(elsewhere().args(["in-progress", "--table", &table, "--json"]));
    assert_eq!(code, 4, "the table is in us-east-1 only");
    let (code, summary) = before_and_after(
        elsewhere,
        &["--region", "us-east-1"],
        &["in-progress", "--table", &table, "--json"],
        listing,
    );
    assert_eq!((code, &summary), (0, &listed));

    // --profile: a profile file gives the region and the credentials, the
    // environment neither.
    let with_profile = || {
        let mut command = tool();
        command
            .env_remove("AWS_REGION")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_CONFIG_FILE", profile_files().join("config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                profile_files().join("credentials"),
            );
        command
    };
    let (code, _, _) = run_command(with_profile().args(["in-progress", "--table", &table]));
    assert_eq!(code, 4, "no credentials without the profile");
    let (code, summary) = before_and_after(
        with_profile,
        &["--profile", "cli-globals"],
        &["in-progress", "--table", &table, "--json"],
        listing,
    );
    assert_eq!((code, &summary), (0, &listed));
}

/// A folder holding AWS config and credentials files with one profile,
/// `cli-globals` (region us-east-1, LocalStack's test credentials).
fn profile_files() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(unique("cli-profiles"));
        std::fs::create_dir_all(&dir).expect("create the profile folder");
        std::fs::write(
            dir.join("config"),
            "[profile cli-globals]\nregion = us-east-1\n",
        )
        .expect("write the config file");
        std::fs::write(
            dir.join("credentials"),
            "[cli-globals]\naws_access_key_id = test\naws_secret_access_key = test\n",
        )
        .expect("write the credentials file");
        dir
    })
    .clone()
}

#[test]
fn a_missing_table_is_a_usage_error_naming_it() {
    for args in [
        &["in-progress"][..],
        &["show", "--key", "k"],
        &["release", "--key", "k", "--owner", "o"],
        &["outbox", "pending"],
        &["outbox", "deliver"],
    ] {
        let (code, stdout, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert!(stderr.contains("--table"), "{args:?}: {stderr}");

        // With --json before or after the command: one JSON document naming it.
        let (subcommand, rest) = args.split_first().expect("a command");
        let first: Vec<&str> = ["--json", subcommand]
            .into_iter()
            .chain(rest.iter().copied())
            .collect();
        let last: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
        for line in [first, last] {
            let (code, stdout, stderr) = run(&line);
            assert_eq!(code, 2, "{line:?}: {stderr}");
            let document: Value = serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("{line:?}: not one JSON document ({e}): {stdout:?}"));
            assert_eq!(document["error"]["kind"], "usage", "{line:?}: {document}");
            let message = document["error"]["message"].as_str().expect("message");
            assert!(message.contains("--table"), "{line:?}: {document}");
        }
    }
}

/// The tool in an environment without any AWS credentials: none in the
/// environment, profile files that do not exist, an empty home folder, only a
/// region and the endpoint. The instance metadata service is left enabled, as on
/// an operator's laptop (which has no route to it); the tool must still fail
/// fast and say so in one line.
fn without_credentials() -> (Command, PathBuf) {
    let home = std::env::temp_dir().join(unique("cli-home"));
    std::fs::create_dir_all(&home).expect("create the home folder");
    let mut command = Command::new(env!("CARGO_BIN_EXE_idempotency"));
    command
        .env_clear()
        .env("HOME", &home)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", endpoint())
        .env("AWS_CONFIG_FILE", home.join("no-such-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            home.join("no-such-credentials"),
        );
    (command, home)
}

/// Runs `command` to its end, killing it if it runs past `limit`: a guard
/// against a hang, far above what the command takes.
fn output_within(command: &mut Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the idempotency binary");
    let start = std::time::Instant::now();
    while child.try_wait().expect("wait for the binary").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "still running after {limit:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn without_credentials_one_line_on_stderr_and_exit_4() {
    // The instance metadata service at its address (from this machine, an answer
    // or no route, as from a laptop), and at a loopback port nothing listens on
    // (unreachable, whatever the machine's network).
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = listener.local_addr().expect("address").port();
        format!("http://127.0.0.1:{port}")
    };
    for imds in [None, Some(closed.as_str())] {
        let (mut command, home) = without_credentials();
        if let Some(imds) = imds {
            command.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds);
        }
        command.args(["in-progress", "--table", "cli-no-credentials"]);
        let output = output_within(&mut command, Duration::from_secs(120));
        let _ = std::fs::remove_dir_all(home);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(4), "IMDS {imds:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "IMDS {imds:?}: one line on stderr: {stderr}"
        );
        assert!(
            lines[0].starts_with("error: no AWS credentials found"),
            "IMDS {imds:?}: {stderr}"
        );
        assert!(lines[0].contains("EC2 instance metadata"), "{stderr}");
        assert!(output.stdout.is_empty(), "{:?}", output.stdout);
    }
}

#[test]
fn without_credentials_json_is_one_aws_error_document() {
    let (mut command, home) = without_credentials();
    command.args([
        "outbox",
        "pending",
        "--table",
        "cli-no-credentials",
        "--json",
    ]);
    let output = output_within(&mut command, Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(home);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_eq!(output.status.code(), Some(4), "{stdout}{stderr}");
    let document: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {stdout:?}; stderr: {stderr}"));
    assert_eq!(document["error"]["kind"], "aws", "{document}");
    let message = document["error"]["message"].as_str().expect("message");
    assert!(
        message.starts_with("no AWS credentials found"),
        "{document}"
    );
    assert!(!message.contains('\n'), "{document}");
    let lines = stderr.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(lines, 1, "one line on stderr: {stderr}");
}

#[test]
fn without_credentials_usage_errors_come_first() {
    // An unreadable event file is the operator's mistake whatever the machine:
    // the tool reads it before it looks for credentials.
    let (mut command, home) = without_credentials();
    command.args([
        "show",
        "--table",
        "cli-no-credentials",
        "--event",
        "/nonexistent.json",
        "--key-expression",
        "a",
    ]);
    let output = output_within(&mut command, Duration::from_secs(120));
    let _ = std::fs::remove_dir_all(home);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent.json"), "{stderr}");
}
