//! Ambiguous writes against LocalStack: every write of the state machine is
//! applied by DynamoDB, its response lost on the way back (a proxy closes the
//! connection instead), and the SDK sends it again. Each invocation must end
//! exactly as it would without the fault.

mod support;

use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use lambda_idempotency::{
    effects, Dispatcher, DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyRecord,
    IdempotencyStore, OutboxMessage, Status,
};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use support::http1::post;
use support::localstack::{client, default_table, endpoint};
use support::payments::Payments;
use support::proxy::{Entry, Proxy};
use support::{context, in_progress, key_for, poll, Audit, Counter};
use tokio::sync::Notify;

type Failure = Error<std::io::Error>;

/// In the reserving `PutItem`'s condition, and in no other write's.
const RESERVE: &str = "attribute_not_exists(#id) OR";
/// In the conditions of the `PutItem`s that complete or open a record.
const OWNED: &str = "#owner = :owner";
const SCOPE: &str = "shop.place_order";

/// The config of an SDK client that reaches LocalStack through `proxy`, as
/// `support::localstack` configures its clients.
fn proxied_config(proxy: &Proxy) -> aws_sdk_dynamodb::config::Builder {
    aws_sdk_dynamodb::config::Builder::new()
        .behavior_version_latest()
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(proxy.url())
}

/// A proxied client with the standard retry strategy, 3 attempts (also what
/// `BehaviorVersion::latest()` gives a client without a retry config).
fn proxied_client(proxy: &Proxy) -> aws_sdk_dynamodb::Client {
    let retry = RetryConfig::standard().with_max_attempts(3);
    aws_sdk_dynamodb::Client::from_conf(proxied_config(proxy).retry_config(retry).build())
}

/// The engine's warnings and errors, captured for the test's thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }
}

/// A fresh table, the proxy in front of LocalStack, and the engine behind it.
struct Fixture {
    proxy: Proxy,
    table: String,
    idempotency: Idempotency<DynamoDbStore>,
    logs: Logs,
    _subscriber: tracing::subscriber::DefaultGuard,
}

impl Fixture {
    async fn new(test: &str) -> Self {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "lambda_idempotency=warn",
            ))
            .finish();
        // #[tokio::test] runs every task of the test on this thread.
        let guard = tracing::subscriber::set_default(subscriber);
        let table = default_table(test).await;
        let proxy = Proxy::start(&endpoint()).await;
        let config = IdempotencyConfig::builder()
            .key_expression("order_id")
            .key_prefix("shop")
            .build()
            .expect("config");
        let idempotency =
            Idempotency::new(DynamoDbStore::new(proxied_client(&proxy), &table), config);
        Self {
            proxy,
            table,
            idempotency,
            logs,
            _subscriber: guard,
        }
    }

    /// The record of `order_id` as stored, read past the proxy.
    async fn record(&self, order_id: &str) -> Option<IdempotencyRecord> {
        DynamoDbStore::new(client(), &self.table)
            .get(&key_for(SCOPE, order_id))
            .await
            .expect("read the record")
    }

    /// (id, status) of every item of the table, sorted.
    async fn items(&self) -> Vec<(String, String)> {
        let scanned = client()
            .scan()
            .table_name(&self.table)
            .consistent_read(true)
            .send()
            .await
            .expect("scan");
        let s = |item: &std::collections::HashMap<String, AttributeValue>, name: &str| {
            item.get(name)
                .and_then(|v| v.as_s().ok())
                .cloned()
                .unwrap_or_default()
        };
        let mut items: Vec<_> = scanned
            .items()
            .iter()
            .map(|item| (s(item, "id"), s(item, "status")))
            .collect();
        items.sort();
        items
    }

    /// The proxy log since the last call, checked: exactly the armed response was
    /// lost, and the SDK sent that same request again right after.
    fn lost_and_retried(&self) -> Vec<Entry> {
        let log = self.proxy.take_log();
        assert_eq!(
            self.proxy.armed(),
            0,
            "the armed response was lost: {log:#?}"
        );
        let dropped: Vec<usize> = (0..log.len()).filter(|&i| log[i].dropped).collect();
        assert_eq!(dropped.len(), 1, "one lost response: {log:#?}");
        let (lost, retry) = (&log[dropped[0]], log.get(dropped[0] + 1).expect("a retry"));
        assert_eq!(retry.operation, lost.operation, "the SDK retried the write");
        assert_eq!(
            retry.request, lost.request,
            "the same request, byte for byte"
        );
        assert!(
            lost.status == 200,
            "the lost write was applied: {}",
            lost.response
        );
        log
    }

    fn no_engine_warnings(&self) {
        let logs = self.logs.text();
        assert!(logs.is_empty(), "the engine warned: {logs}");
    }
}

/// The operations of a log; a lost response is marked `*`.
fn ops(log: &[Entry]) -> Vec<String> {
    log.iter()
        .map(|e| format!("{}{}", e.operation, if e.dropped { "*" } else { "" }))
        .collect()
}

/// A refused write's refusal: `ConditionalCheckFailedException`.
fn refused(entry: &Entry) -> bool {
    entry.status == 400 && entry.response.contains("ConditionalCheckFailed")
}

/// The `S` value of `attribute` in a request's `Item` or a refusal's old `Item`.
fn item_s(body: &str, attribute: &str) -> String {
    let body: Value = serde_json::from_str(body).expect("JSON body");
    body["Item"][attribute]["S"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn reserve_put_item() {
    let f = Fixture::new("amb-reserve").await;
    let runs = Counter::default();
    let handler = echo_handler(&f, &runs);
    f.proxy.drop_response("PutItem", &[RESERVE], 1);
    let order = json!({ "order_id": "r-1" });
    let first: Value = handler
        .call(order.clone(), Some(&context(60_000)))
        .await
        .expect("runs, not refused as in progress");
    assert_eq!(runs.get(), 1);

    let log = f.lost_and_retried();
    assert_eq!(
        ops(&log),
        ["PutItem*", "PutItem", "PutItem"],
        "reserve (applied, response lost), the SDK's retry, complete"
    );
    assert!(refused(&log[1]), "the retry is refused: {:?}", log[1]);
    assert_eq!(
        item_s(&log[1].response, "owner"),
        item_s(&log[0].request, "owner"),
        "the refusal returns our own reservation"
    );

    let record = f.record("r-1").await.expect("a record");
    assert_eq!(record.status, Status::Completed);
    let stored = serde_json::to_string(&first).expect("json");
    assert_eq!(record.data.as_deref(), Some(stored.as_str()));
    let replay: Value = handler
        .call(order, Some(&context(60_000)))
        .await
        .expect("replay");
    assert_eq!(serde_json::to_string(&replay).expect("json"), stored);
    assert_eq!(runs.get(), 1, "replayed, not run again");
    f.no_engine_warnings();
}

/// Answers with the order and which run of the handler this is.
fn echo_handler(
    f: &Fixture,
    runs: &Counter,
) -> lambda_idempotency::IdempotentFunction<
    impl Fn(Value) -> futures_util::future::BoxFuture<'static, Result<Value, Failure>>,
    DynamoDbStore,
> {
    let runs = runs.clone();
    f.idempotency.function("place_order", move |order: Value| {
        let run = runs.hit();
        Box::pin(async move { Ok::<_, Failure>(json!({ "order": order["order_id"], "run": run })) })
            as futures_util::future::BoxFuture<'static, _>
    })
}

/// Charges through a step; its first attempt stops after the step is journaled
/// (`crash`: until its task is aborted) or returns an error (`fail`).
fn charging_handler(
    f: &Fixture,
    payments: &Payments,
    attempts: &Counter,
    journaled: &Arc<Notify>,
    first_attempt: &'static str,
) -> lambda_idempotency::IdempotentFunction<
    impl Fn(Value) -> futures_util::future::BoxFuture<'static, Result<Value, Failure>>,
    DynamoDbStore,
> {
    let (payments, attempts, journaled) = (payments.clone(), attempts.clone(), journaled.clone());
    f.idempotency.function("place_order", move |order: Value| {
        let attempt = attempts.hit();
        let (payments, journaled) = (payments.clone(), journaled.clone());
        Box::pin(async move {
            let charge = effects()?
                .step("charge", |key| async move {
                    let charge = post(payments.addr, "/charges", &key, &order).await?;
                    Ok::<_, std::io::Error>(json!({ "charge": charge, "key": key }))
                })
                .await?;
            if attempt == 1 {
                match first_attempt {
                    "crash" => {
                        journaled.notify_one();
                        std::future::pending::<()>().await;
                    }
                    "fail" => return Err(Error::Handler(std::io::Error::other("declined"))),
                    _ => {}
                }
            }
            Ok::<_, Failure>(charge)
        }) as futures_util::future::BoxFuture<'static, _>
    })
}

#[tokio::test]
async fn resume_put_item() {
    let f = Fixture::new("amb-resume").await;
    let payments = Payments::start().await;
    let (attempts, journaled) = (Counter::default(), Arc::new(Notify::new()));
    let handler = Arc::new(charging_handler(
        &f, &payments, &attempts, &journaled, "crash",
    ));
    let order = json!({ "order_id": "rs-1", "amount": 25 });

    // Attempt 1 journals its charge and dies; its reservation holds 300 ms.
    let crashed = tokio::spawn({
        let (handler, order) = (handler.clone(), order.clone());
        async move { handler.call(order, Some(&context(300))).await }
    });
    journaled.notified().await;
    crashed.abort();
    assert!(crashed.await.expect_err("crashed").is_cancelled());
    assert_eq!(
        ops(&f.proxy.take_log()),
        ["PutItem", "PutItem"],
        "reserve, journal"
    );
    let execution = f.record("rs-1").await.expect("a record").execution;

    // The retry's reservation that resumes that execution loses its response.
    f.proxy.drop_response("PutItem", &[RESERVE, &execution], 1);
    let fresh = context(60_000);
    let retried = poll(|| handler.call(order.clone(), Some(&fresh)), in_progress)
        .await
        .expect("the retry resumes and completes");

    let log = f.lost_and_retried();
    let lost = log.iter().position(|e| e.dropped).expect("lost");
    assert!(
        lost >= 1 && log[..lost].iter().all(refused),
        "refused (in progress, then another execution id) until the resume: {:?}",
        ops(&log)
    );
    assert_eq!(
        ops(&log[lost..]),
        ["PutItem*", "PutItem", "GetItem", "PutItem"],
        "resume (applied, response lost), the SDK's retry, read the journal, complete"
    );
    assert!(refused(&log[lost + 1]));
    assert_eq!(
        item_s(&log[lost + 1].response, "owner"),
        item_s(&log[lost].request, "owner"),
        "the refusal returns our own reservation"
    );

    let key = retried["key"].as_str().expect("derived key");
    assert_eq!(
        payments.requests_with_key(key),
        1,
        "the journaled charge replayed"
    );
    assert_eq!(payments.charges(), 1);
    assert_eq!(attempts.get(), 2);
    let record = f.record("rs-1").await.expect("a record");
    assert_eq!(
        (record.status, record.execution),
        (Status::Completed, execution)
    );
    assert_eq!(
        handler.call(order, Some(&fresh)).await.expect("replay"),
        retried
    );
    assert_eq!(attempts.get(), 2);
    f.no_engine_warnings();
}

#[tokio::test]
async fn journal_put_item() {
    let f = Fixture::new("amb-journal").await;
    let payments = Payments::start().await;
    let (attempts, journaled) = (Counter::default(), Arc::new(Notify::new()));
    let handler = charging_handler(&f, &payments, &attempts, &journaled, "succeed");
    f.proxy.drop_response("PutItem", &["\"STEP\""], 1);
    let order = json!({ "order_id": "j-1", "amount": 25 });
    let first = handler
        .call(order.clone(), Some(&context(60_000)))
        .await
        .expect("runs");

    let log = f.lost_and_retried();
    assert_eq!(
        ops(&log),
        ["PutItem", "PutItem*", "PutItem", "PutItem"],
        "reserve, journal (applied, response lost), the SDK's retry, complete"
    );
    assert!(
        refused(&log[2]),
        "the retry finds the entry it wrote: {:?}",
        log[2]
    );
    assert_eq!(
        item_s(&log[2].response, "data"),
        item_s(&log[1].request, "data"),
        "and gets it back"
    );

    let key = first["key"].as_str().expect("derived key");
    assert_eq!(payments.requests_with_key(key), 1, "charged once");
    assert_eq!(payments.charges(), 1);
    let steps: Vec<_> = f
        .items()
        .await
        .into_iter()
        .filter(|(_, status)| status == "STEP")
        .collect();
    assert_eq!(steps.len(), 1, "one journal entry: {steps:?}");
    assert_eq!(
        handler
            .call(order, Some(&context(60_000)))
            .await
            .expect("replay"),
        first
    );
    assert_eq!((attempts.get(), payments.requests()), (1, 1));
    f.no_engine_warnings();
}

#[tokio::test]
async fn complete_put_item() {
    let f = Fixture::new("amb-complete").await;
    let runs = Counter::default();
    let handler = echo_handler(&f, &runs);
    f.proxy
        .drop_response("PutItem", &[OWNED, "\"COMPLETED\""], 1);
    let order = json!({ "order_id": "c-1" });
    let first: Value = handler
        .call(order.clone(), Some(&context(60_000)))
        .await
        .expect("completes");

    let log = f.lost_and_retried();
    assert_eq!(
        ops(&log),
        ["PutItem", "PutItem*", "PutItem"],
        "reserve, complete (applied, response lost), the SDK's retry"
    );
    assert_eq!(log[2].status, 200, "still ours: written again");

    let record = f.record("c-1").await.expect("a record");
    assert_eq!(record.status, Status::Completed);
    let stored = serde_json::to_string(&first).expect("json");
    assert_eq!(record.data.as_deref(), Some(stored.as_str()));
    let replay: Value = handler
        .call(order, Some(&context(60_000)))
        .await
        .expect("replay");
    assert_eq!(serde_json::to_string(&replay).expect("json"), stored);
    assert_eq!(runs.get(), 1);
    f.no_engine_warnings();
}

/// Completes with one outbox message to `audit`; the response is its derived key.
async fn complete_with_outbox(test: &str, operation: &str) {
    let f = Fixture::new(test).await;
    let audit = Audit::default();
    let idempotency = f
        .idempotency
        .clone()
        .with_dispatcher(Dispatcher::new().with_sink("audit", audit.clone()));
    let runs = Counter::default();
    let handler = {
        let runs = runs.clone();
        idempotency.function("place_order", move |order: Value| {
            runs.hit();
            async move {
                let key = effects()?.outbox().push(OutboxMessage::Custom {
                    sink: "audit".into(),
                    payload: order,
                });
                Ok::<_, Failure>(json!(key))
            }
        })
    };
    f.proxy.drop_response(operation, &[], 1);
    let order = json!({ "order_id": "o-1" });
    let key = handler
        .call(order.clone(), Some(&context(60_000)))
        .await
        .expect("commits");

    let log = f.lost_and_retried();
    let expected: &[&str] = match operation {
        "TransactWriteItems" => &[
            "PutItem",
            "TransactWriteItems*",
            "TransactWriteItems",
            "UpdateItem",
        ],
        _ => &["PutItem", "TransactWriteItems", "UpdateItem*", "UpdateItem"],
    };
    assert_eq!(
        ops(&log),
        expected,
        "reserve, commit, mark delivered; the {operation} lost its response and was retried"
    );
    assert_eq!(log[2].status, 200, "the repeated write succeeds");
    assert!(
        log[1].request.contains("\"ClientRequestToken\""),
        "the SDK gives the transaction one token for all its attempts (DynamoDB \
         answers a repeat within 10 minutes without applying it again)"
    );

    assert_eq!(
        audit.0.lock().expect("lock").clone(),
        vec![(order.clone(), key.as_str().expect("derived key").to_owned())],
        "delivered once, with its derived key"
    );
    let items = f.items().await;
    let outbox: Vec<_> = items
        .iter()
        .filter(|(id, _)| id.contains("#outbox#"))
        .collect();
    assert_eq!(outbox.len(), 1, "{items:?}");
    assert_eq!(outbox[0].1, "DELIVERED");
    assert_eq!(
        f.record("o-1").await.expect("a record").status,
        Status::Completed
    );
    assert_eq!(
        handler
            .call(order, Some(&context(60_000)))
            .await
            .expect("replay"),
        key
    );
    assert_eq!(runs.get(), 1);
    let relay = idempotency.relay(Dispatcher::new().with_sink("audit", audit.clone()));
    assert_eq!(
        relay.sweep().await.expect("sweep").delivered,
        0,
        "nothing pending"
    );
    assert_eq!(audit.0.lock().expect("lock").len(), 1);
    f.no_engine_warnings();
}

#[tokio::test]
async fn complete_transact_write_items() {
    complete_with_outbox("amb-transact", "TransactWriteItems").await;
}

#[tokio::test]
async fn mark_delivered_update_item() {
    complete_with_outbox("amb-delivered", "UpdateItem").await;
}

#[tokio::test]
async fn open_release_put_item() {
    let f = Fixture::new("amb-open").await;
    let payments = Payments::start().await;
    let (attempts, journaled) = (Counter::default(), Arc::new(Notify::new()));
    let handler = charging_handler(&f, &payments, &attempts, &journaled, "fail");
    f.proxy
        .drop_response("PutItem", &[OWNED, "\"INPROGRESS\""], 1);
    let order = json!({ "order_id": "op-1", "amount": 25 });
    let failed = handler.call(order.clone(), Some(&context(60_000))).await;
    assert!(
        matches!(failed, Err(Error::Handler(Error::Handler(_)))),
        "the handler's error, unchanged: {failed:?}"
    );

    let log = f.lost_and_retried();
    assert_eq!(
        ops(&log),
        ["PutItem", "PutItem", "PutItem*", "PutItem"],
        "reserve, journal, open the record (applied, response lost), the SDK's retry"
    );
    assert_eq!(log[3].status, 200, "still ours: written again");
    let record = f.record("op-1").await.expect("the record stays");
    assert_eq!(
        (record.status, record.in_progress_expiration),
        (Status::InProgress, Some(0))
    );
    f.no_engine_warnings();

    // The next attempt resumes the execution and replays the charge.
    let retried = handler
        .call(order, Some(&context(60_000)))
        .await
        .expect("resumes");
    assert_eq!(
        ops(&f.proxy.take_log()),
        ["PutItem", "PutItem", "GetItem", "PutItem"],
        "refused (another execution id), resume, read the journal, complete"
    );
    let key = retried["key"].as_str().expect("derived key");
    assert_eq!(payments.requests_with_key(key), 1, "charged once");
    assert_eq!((attempts.get(), payments.charges()), (2, 1));
    let record = f.record("op-1").await.expect("a record");
    assert_eq!(
        (record.status, record.execution.as_str()),
        (
            Status::Completed,
            item_s(&log[0].request, "execution").as_str()
        )
    );
    f.no_engine_warnings();
}

#[tokio::test]
async fn release_delete_item() {
    let f = Fixture::new("amb-release").await;
    let runs = Counter::default();
    let handler = {
        let runs = runs.clone();
        f.idempotency.function("place_order", move |order: Value| {
            let run = runs.hit();
            async move {
                if run == 1 {
                    return Err(Error::Handler(std::io::Error::other("declined")));
                }
                Ok::<_, Failure>(json!({ "order": order["order_id"], "run": run }))
            }
        })
    };
    f.proxy.drop_response("DeleteItem", &[], 1);
    let order = json!({ "order_id": "rl-1" });
    let failed = handler.call(order.clone(), Some(&context(60_000))).await;
    assert!(
        matches!(failed, Err(Error::Handler(Error::Handler(_)))),
        "the handler's error, unchanged: {failed:?}"
    );

    let log = f.lost_and_retried();
    assert_eq!(
        ops(&log),
        ["PutItem", "DeleteItem*", "DeleteItem"],
        "reserve, release (applied, response lost), the SDK's retry"
    );
    assert!(refused(&log[2]), "the retry finds nothing: {:?}", log[2]);
    assert!(
        !log[2].response.contains("\"Item\"") || log[2].response.contains("\"Item\":{}"),
        "no item came back: {}",
        log[2].response
    );
    assert!(f.record("rl-1").await.is_none(), "the record is gone");
    f.no_engine_warnings();

    let retried = handler
        .call(order, Some(&context(60_000)))
        .await
        .expect("runs again");
    assert_eq!(retried["run"], 2);
    assert_eq!(runs.get(), 2, "run again exactly once");
    assert_eq!(ops(&f.proxy.take_log()), ["PutItem", "PutItem"]);
    f.no_engine_warnings();
}

/// What the SDK makes of a response lost after the request was sent: a dispatch
/// failure it classifies as transient, so the standard strategy sends the request
/// again, whatever the operation (`PutItem` is not idempotent to DynamoDB).
#[tokio::test]
async fn the_sdk_sends_a_write_again_when_its_response_is_lost() {
    let table = default_table("amb-sdk").await;
    let proxy = Proxy::start(&endpoint()).await;
    let put = |client: &aws_sdk_dynamodb::Client, id: &str| {
        client
            .put_item()
            .table_name(&table)
            .item("id", AttributeValue::S(id.to_owned()))
            .send()
    };

    // Without retries the loss surfaces (hyper: "connection closed before message
    // completed", IncompleteMessage; the SDK: Other(TransientError)), and the
    // write was applied all the same.
    let once = aws_sdk_dynamodb::Client::from_conf(
        proxied_config(&proxy)
            .retry_config(RetryConfig::disabled())
            .build(),
    );
    proxy.drop_response("PutItem", &[], 1);
    let err = put(&once, "lost").await.expect_err("the response was lost");
    let SdkError::DispatchFailure(failure) = &err else {
        panic!(
            "expected a dispatch failure, got {}",
            DisplayErrorContext(&err)
        );
    };
    assert!(
        // (`ErrorKind` is not re-exported by the SDK: compared by name.)
        failure.is_io() || format!("{:?}", failure.as_other()) == "Some(TransientError)",
        "a transient connector error: {}",
        DisplayErrorContext(&err)
    );
    let applied = client()
        .get_item()
        .table_name(&table)
        .key("id", AttributeValue::S("lost".into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get");
    assert!(
        applied.item().is_some(),
        "applied although its response was lost"
    );
    assert_eq!(ops(&proxy.take_log()), ["PutItem*"]);

    // A client configured like the tests' other clients, no retry config of its
    // own: BehaviorVersion::latest() retries (standard, 3 attempts).
    let default = aws_sdk_dynamodb::Client::from_conf(proxied_config(&proxy).build());
    proxy.drop_response("PutItem", &[], 1);
    put(&default, "retried")
        .await
        .expect("sent again, succeeds");
    let log = proxy.take_log();
    assert_eq!(ops(&log), ["PutItem*", "PutItem"]);
    assert_eq!(log[0].request, log[1].request);
}
