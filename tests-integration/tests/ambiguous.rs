//! Ambiguous writes: every write of the state machine is applied by the store,
//! its response lost on the way back (a proxy closes the connection instead),
//! and the client sends it again. Each invocation must end exactly as it would
//! without the fault.
//!
//! Each rule is written once and runs on two stores: DynamoDB on LocalStack
//! (`dynamodb::`), through an HTTP proxy (`support/proxy.rs`), the AWS SDK
//! sending the request again; and Redis (`redis::`), through a RESP proxy
//! (`support/resp_proxy.rs`), `RedisStore` sending the script again. Both
//! proxies' logs are read in the engine's terms ([`Exchange`]: reserve,
//! put_step, complete, ...), so that one sequence of operations is expected of
//! both.

mod support;

use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use lambda_idempotency::{
    effects, Dispatcher, DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyRecord,
    IdempotencyStore, IdempotentFunction, OutboxMessage, RedisStore, Relay, Status,
};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use support::faults::FaultStore;
use support::http1::post;
use support::localstack::{client, default_table, endpoint};
use support::payments::Payments;
use support::proxy::Proxy;
use support::resp_proxy::{Resp, RespProxy};
use support::{context, in_progress, key_for, poll, Audit, Counter};
use tokio::sync::Notify;

type Failure = Error<std::io::Error>;
type Handler = Box<
    dyn Fn(Value) -> futures_util::future::BoxFuture<'static, Result<Value, Failure>> + Send + Sync,
>;

/// One request of the store and its response, as a proxy saw them, in the
/// engine's terms.
#[derive(Clone, Debug)]
struct Exchange {
    /// `reserve`, `put_step`, `get_step`, `complete`, `open` (the record kept
    /// open after a failed attempt with steps), `commit` (complete with the
    /// outbox), `mark_delivered`, `release`, `get`, `get_outbox`.
    op: &'static str,
    /// The client connection it came on.
    connection: usize,
    /// Whether the proxy withheld its response.
    dropped: bool,
    /// The store applied the write (a read: answered).
    applied: bool,
    /// The write's condition failed: nothing written.
    refused: bool,
    /// The request as sent, to compare a repeat with.
    request: String,
    /// The fields of the record or journal entry the request writes (`owner`,
    /// `execution`, `data`, `name`), null where it writes none.
    sent: Value,
    /// The fields of the record or entry the response returned (a refusal's
    /// stored item), null when none came back.
    returned: Value,
    /// The response, for the messages of failed assertions.
    response: String,
}

/// The operations of a log; a lost response is marked `*`.
fn ops(log: &[Exchange]) -> Vec<String> {
    log.iter()
        .map(|e| format!("{}{}", e.op, if e.dropped { "*" } else { "" }))
        .collect()
}

/// A store behind a proxy that loses chosen responses.
trait Backend: Sized {
    type Store: IdempotencyStore + Clone;

    /// The proxy, a store whose client reaches the records through it, and a
    /// key prefix for `test`.
    async fn start(test: &str) -> (Self, Self::Store, String);

    /// Loses the response of the next `op` (see [`Exchange::op`]), when it is
    /// a reservation with `execution` given, of the one resuming that execution.
    fn lose(&self, op: &str, execution: Option<&str>);

    /// Losses armed and not happened yet.
    fn armed(&self) -> usize;

    /// What the store sent since the last call, in the engine's terms.
    fn take(&self) -> Vec<Exchange>;

    /// The record under `key`, read past the proxy.
    async fn record(&self, key: &str) -> Option<IdempotencyRecord>;

    /// The journal entries and (outbox message, delivered) of the record under
    /// `key`, read past the proxy.
    async fn companions(&self, key: &str) -> (usize, Vec<(String, bool)>);

    /// Checks the commit of a record with its outbox for what makes a repeat
    /// of it harmless.
    fn check_repeatable_commit(commit: &Exchange);
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

/// A store behind its proxy, and the engine on it.
struct Fixture<B: Backend> {
    backend: B,
    prefix: String,
    idempotency: Idempotency<B::Store>,
    logs: Logs,
    _subscriber: tracing::subscriber::DefaultGuard,
}

impl<B: Backend> Fixture<B> {
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
        let (backend, store, prefix) = B::start(test).await;
        let config = IdempotencyConfig::builder()
            .key_expression("order_id")
            .key_prefix(&prefix)
            .build()
            .expect("config");
        Self {
            backend,
            idempotency: Idempotency::new(store, config),
            prefix,
            logs,
            _subscriber: guard,
        }
    }

    /// The key of `order_id` for the `place_order` function.
    fn key(&self, order_id: &str) -> String {
        key_for(&format!("{}.place_order", self.prefix), order_id)
    }

    /// The record of `order_id` as stored, read past the proxy.
    async fn record(&self, order_id: &str) -> Option<IdempotencyRecord> {
        self.backend.record(&self.key(order_id)).await
    }

    /// The log since the last call, checked: exactly the armed response was
    /// lost, and the client sent that same request again right after, on
    /// a new connection.
    fn lost_and_retried(&self) -> Vec<Exchange> {
        let log = self.backend.take();
        assert_eq!(
            self.backend.armed(),
            0,
            "the armed response was lost: {log:#?}"
        );
        let dropped: Vec<usize> = (0..log.len()).filter(|&i| log[i].dropped).collect();
        assert_eq!(dropped.len(), 1, "one lost response: {log:#?}");
        let (lost, retry) = (&log[dropped[0]], log.get(dropped[0] + 1).expect("a retry"));
        assert_eq!(retry.op, lost.op, "the client sent the write again");
        assert_eq!(
            retry.request, lost.request,
            "the same request, byte for byte"
        );
        assert_ne!(
            retry.connection, lost.connection,
            "on a new connection: the lost one was closed"
        );
        assert!(
            lost.applied,
            "the lost write was applied: {}",
            lost.response
        );
        log
    }

    fn no_engine_warnings(&self) {
        let logs = self.logs.text();
        assert!(logs.is_empty(), "the engine warned: {logs}");
    }

    /// Answers with the order and which run of the handler this is.
    fn echo_handler(&self, runs: &Counter) -> IdempotentFunction<Handler, B::Store> {
        let runs = runs.clone();
        let handler: Handler = Box::new(move |order: Value| {
            let run = runs.hit();
            Box::pin(
                async move { Ok::<_, Failure>(json!({ "order": order["order_id"], "run": run })) },
            )
        });
        self.idempotency.function("place_order", handler)
    }

    /// Charges through a step; its first attempt stops after the step is
    /// journaled (`crash`: until its task is aborted) or returns an error
    /// (`fail`).
    fn charging_handler(
        &self,
        payments: &Payments,
        attempts: &Counter,
        journaled: &Arc<Notify>,
        first_attempt: &'static str,
    ) -> IdempotentFunction<Handler, B::Store> {
        let (payments, attempts, journaled) =
            (payments.clone(), attempts.clone(), journaled.clone());
        let handler: Handler = Box::new(move |order: Value| {
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
            })
        });
        self.idempotency.function("place_order", handler)
    }
}

/// A test per rule and store: `dynamodb::rule` (a table of its own on
/// LocalStack) and `redis::rule` (the standalone server's database of the
/// lost-response tests, a key prefix of its own).
macro_rules! on_stores {
    ($($rule:ident),* $(,)?) => {
        mod dynamodb {
            $(
                #[tokio::test]
                async fn $rule() {
                    super::$rule::<super::DynamoDb>(stringify!($rule)).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $rule() {
                    super::$rule::<super::Redis>(stringify!($rule)).await
                }
            )*
        }
    };
}

on_stores!(
    reserve,
    resume,
    journal,
    complete,
    complete_with_outbox,
    mark_delivered,
    open_release,
    release,
);

async fn reserve<B: Backend>(test: &str) {
    let f = Fixture::<B>::new(test).await;
    let runs = Counter::default();
    let handler = f.echo_handler(&runs);
    f.backend.lose("reserve", None);
    let order = json!({ "order_id": "r-1" });
    let first: Value = handler
        .call(order.clone(), Some(&context(60_000)))
        .await
        .expect("runs, not refused as in progress");
    assert_eq!(runs.get(), 1);

    let log = f.lost_and_retried();
    assert_eq!(
        ops(&log),
        ["reserve*", "reserve", "complete"],
        "reserve (applied, response lost), the retry, complete"
    );
    assert!(log[1].refused, "the retry is refused: {:?}", log[1]);
    assert_eq!(
        log[1].returned["owner"], log[0].sent["owner"],
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

async fn resume<B: Backend>(test: &str) {
    let f = Fixture::<B>::new(test).await;
    let payments = Payments::start().await;
    let (attempts, journaled) = (Counter::default(), Arc::new(Notify::new()));
    let handler = Arc::new(f.charging_handler(&payments, &attempts, &journaled, "crash"));
    let order = json!({ "order_id": "rs-1", "amount": 25 });

    // Attempt 1 journals its charge and dies; its reservation holds 300 ms.
    let crashed = tokio::spawn({
        let (handler, order) = (handler.clone(), order.clone());
        async move { handler.call(order, Some(&context(300))).await }
    });
    journaled.notified().await;
    crashed.abort();
    assert!(crashed.await.expect_err("crashed").is_cancelled());
    assert_eq!(ops(&f.backend.take()), ["reserve", "put_step"]);
    let execution = f.record("rs-1").await.expect("a record").execution;

    // The retry's reservation that resumes that execution loses its response.
    f.backend.lose("reserve", Some(&execution));
    let fresh = context(60_000);
    let retried = poll(|| handler.call(order.clone(), Some(&fresh)), in_progress)
        .await
        .expect("the retry resumes and completes");

    let log = f.lost_and_retried();
    let lost = log.iter().position(|e| e.dropped).expect("lost");
    assert!(
        lost >= 1 && log[..lost].iter().all(|e| e.refused),
        "refused (in progress, then another execution id) until the resume: {:?}",
        ops(&log)
    );
    assert_eq!(
        ops(&log[lost..]),
        ["reserve*", "reserve", "get_step", "complete"],
        "resume (applied, response lost), the retry, read the journal, complete"
    );
    assert!(log[lost + 1].refused);
    assert_eq!(
        log[lost + 1].returned["owner"],
        log[lost].sent["owner"],
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

async fn journal<B: Backend>(test: &str) {
    let f = Fixture::<B>::new(test).await;
    let payments = Payments::start().await;
    let (attempts, journaled) = (Counter::default(), Arc::new(Notify::new()));
    let handler = f.charging_handler(&payments, &attempts, &journaled, "succeed");
    f.backend.lose("put_step", None);
    let order = json!({ "order_id": "j-1", "amount": 25 });
    let first = handler
        .call(order.clone(), Some(&context(60_000)))
        .await
        .expect("runs");

    let log = f.lost_and_retried();
    assert_eq!(
        ops(&log),
        ["reserve", "put_step*", "put_step", "complete"],
        "reserve, journal (applied, response lost), the retry, complete"
    );
    assert!(
        log[2].refused,
        "the retry finds the entry it wrote: {:?}",
        log[2]
    );
    assert_eq!(
        log[2].returned["data"], log[1].sent["data"],
        "and gets it back"
    );

    let key = first["key"].as_str().expect("derived key");
    assert_eq!(payments.requests_with_key(key), 1, "charged once");
    assert_eq!(payments.charges(), 1);
    let (steps, _) = f.backend.companions(&f.key("j-1")).await;
    assert_eq!(steps, 1, "one journal entry");
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

async fn complete<B: Backend>(test: &str) {
    let f = Fixture::<B>::new(test).await;
    let runs = Counter::default();
    let handler = f.echo_handler(&runs);
    f.backend.lose("complete", None);
    let order = json!({ "order_id": "c-1" });
    let first: Value = handler
        .call(order.clone(), Some(&context(60_000)))
        .await
        .expect("completes");

    let log = f.lost_and_retried();
    assert_eq!(
        ops(&log),
        ["reserve", "complete*", "complete"],
        "reserve, complete (applied, response lost), the retry"
    );
    assert!(log[2].applied, "still ours: written again");

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

async fn complete_with_outbox<B: Backend>(test: &str) {
    completes_with_outbox::<B>(test, "commit").await;
}

async fn mark_delivered<B: Backend>(test: &str) {
    completes_with_outbox::<B>(test, "mark_delivered").await;
}

/// Completes with one outbox message to `audit`, losing the response of `op`;
/// the response is the message's derived key.
async fn completes_with_outbox<B: Backend>(test: &str, op: &str) {
    let f = Fixture::<B>::new(test).await;
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
    f.backend.lose(op, None);
    let order = json!({ "order_id": "o-1" });
    let key = handler
        .call(order.clone(), Some(&context(60_000)))
        .await
        .expect("commits");

    let log = f.lost_and_retried();
    let expected: &[&str] = match op {
        "commit" => &["reserve", "commit*", "commit", "mark_delivered"],
        _ => &["reserve", "commit", "mark_delivered*", "mark_delivered"],
    };
    assert_eq!(
        ops(&log),
        expected,
        "reserve, commit, mark delivered; the {op} lost its response and was retried"
    );
    assert!(log[2].applied, "the repeated write succeeds: {:?}", log[2]);
    B::check_repeatable_commit(&log[1]);

    assert_eq!(
        audit.delivered(),
        vec![(order.clone(), key.as_str().expect("derived key").to_owned())],
        "delivered once, with its derived key"
    );
    let record_key = f.key("o-1");
    let (_, outbox) = f.backend.companions(&record_key).await;
    assert_eq!(
        outbox
            .iter()
            .map(|(_, delivered)| *delivered)
            .collect::<Vec<_>>(),
        [true],
        "one message, delivered: {outbox:?}"
    );
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
    // A sweep of the record's messages (on Redis the database holds other
    // tests' too) finds nothing pending.
    let store = FaultStore::new(idempotency.store().clone()).with_outbox_scope(&record_key);
    let relay = Relay::new(store, Dispatcher::new().with_sink("audit", audit.clone()));
    assert_eq!(
        relay.sweep().await.expect("sweep").delivered,
        0,
        "nothing pending"
    );
    assert_eq!(audit.delivered().len(), 1);
    f.no_engine_warnings();
}

async fn open_release<B: Backend>(test: &str) {
    let f = Fixture::<B>::new(test).await;
    let payments = Payments::start().await;
    let (attempts, journaled) = (Counter::default(), Arc::new(Notify::new()));
    let handler = f.charging_handler(&payments, &attempts, &journaled, "fail");
    f.backend.lose("open", None);
    let order = json!({ "order_id": "op-1", "amount": 25 });
    let failed = handler.call(order.clone(), Some(&context(60_000))).await;
    assert!(
        matches!(failed, Err(Error::Handler(Error::Handler(_)))),
        "the handler's error, unchanged: {failed:?}"
    );

    let log = f.lost_and_retried();
    assert_eq!(
        ops(&log),
        ["reserve", "put_step", "open*", "open"],
        "reserve, journal, open the record (applied, response lost), the retry"
    );
    assert!(log[3].applied, "still ours: written again");
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
        ops(&f.backend.take()),
        ["reserve", "reserve", "get_step", "complete"],
        "refused (another execution id), resume, read the journal, complete"
    );
    let key = retried["key"].as_str().expect("derived key");
    assert_eq!(payments.requests_with_key(key), 1, "charged once");
    assert_eq!((attempts.get(), payments.charges()), (2, 1));
    let record = f.record("op-1").await.expect("a record");
    assert_eq!(
        (record.status, json!(record.execution)),
        (Status::Completed, log[0].sent["execution"].clone())
    );
    f.no_engine_warnings();
}

async fn release<B: Backend>(test: &str) {
    let f = Fixture::<B>::new(test).await;
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
    f.backend.lose("release", None);
    let order = json!({ "order_id": "rl-1" });
    let failed = handler.call(order.clone(), Some(&context(60_000))).await;
    assert!(
        matches!(failed, Err(Error::Handler(Error::Handler(_)))),
        "the handler's error, unchanged: {failed:?}"
    );

    let log = f.lost_and_retried();
    assert_eq!(
        ops(&log),
        ["reserve", "release*", "release"],
        "reserve, release (applied, response lost), the retry"
    );
    // DynamoDB refuses the repeated delete; the release script answers a
    // record already gone as released. Neither returns a record.
    assert!(
        log[2].returned.is_null() && (log[2].refused || log[2].applied),
        "the retry finds nothing: {:?}",
        log[2]
    );
    assert!(f.record("rl-1").await.is_none(), "the record is gone");
    f.no_engine_warnings();

    let retried = handler
        .call(order, Some(&context(60_000)))
        .await
        .expect("runs again");
    assert_eq!(retried["run"], 2);
    assert_eq!(runs.get(), 2, "run again exactly once");
    assert_eq!(ops(&f.backend.take()), ["reserve", "complete"]);
    f.no_engine_warnings();
}

// ---------------------------------------------------------------------------
// DynamoDB on LocalStack
// ---------------------------------------------------------------------------

/// In the reserving `PutItem`'s condition, and in no other write's.
const RESERVE: &str = "attribute_not_exists(#id) OR";
/// In the conditions of the `PutItem`s that complete or open a record.
const OWNED: &str = "#owner = :owner";

/// A table of its own on LocalStack, reached through the HTTP proxy.
struct DynamoDb {
    proxy: Proxy,
    table: String,
}

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

/// The fields of a DynamoDB item (`Item` of a request or of a refusal) that
/// [`Exchange`] compares, null when there is no item.
fn item_fields(body: &str) -> Value {
    let body: Value = serde_json::from_str(body).unwrap_or_default();
    let Some(item) = body["Item"].as_object().filter(|item| !item.is_empty()) else {
        return Value::Null;
    };
    ["owner", "execution", "data", "name"]
        .iter()
        .filter_map(|name| Some((name.to_string(), item.get(*name)?["S"].clone())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

impl DynamoDb {
    fn exchange(entry: &support::proxy::Entry) -> Exchange {
        let request = &entry.request;
        let op = match entry.operation.as_str() {
            "PutItem" if request.contains(RESERVE) => "reserve",
            "PutItem" if request.contains("\"STEP\"") => "put_step",
            "PutItem" if request.contains(OWNED) && request.contains("\"COMPLETED\"") => "complete",
            "PutItem" if request.contains(OWNED) && request.contains("\"INPROGRESS\"") => "open",
            "TransactWriteItems" => "commit",
            "UpdateItem" => "mark_delivered",
            "DeleteItem" => "release",
            "GetItem" if request.contains("#step#") => "get_step",
            "GetItem" if request.contains("#outbox#") => "get_outbox",
            "GetItem" => "get",
            other => panic!("an unexpected request {other}: {request}"),
        };
        Exchange {
            op,
            connection: entry.connection,
            dropped: entry.dropped,
            applied: entry.status == 200,
            refused: entry.status == 400 && entry.response.contains("ConditionalCheckFailed"),
            request: request.clone(),
            sent: item_fields(request),
            returned: item_fields(&entry.response),
            response: entry.response.clone(),
        }
    }
}

impl Backend for DynamoDb {
    type Store = DynamoDbStore;

    async fn start(test: &str) -> (Self, DynamoDbStore, String) {
        let table = default_table(test).await;
        let proxy = Proxy::start(&endpoint()).await;
        let store = DynamoDbStore::new(proxied_client(&proxy), &table);
        (Self { proxy, table }, store, "shop".to_owned())
    }

    fn lose(&self, op: &str, execution: Option<&str>) {
        let (operation, mut contains): (&str, Vec<&str>) = match op {
            "reserve" => ("PutItem", vec![RESERVE]),
            "put_step" => ("PutItem", vec!["\"STEP\""]),
            "complete" => ("PutItem", vec![OWNED, "\"COMPLETED\""]),
            "open" => ("PutItem", vec![OWNED, "\"INPROGRESS\""]),
            "commit" => ("TransactWriteItems", vec![]),
            "mark_delivered" => ("UpdateItem", vec![]),
            "release" => ("DeleteItem", vec![]),
            other => panic!("no write {other}"),
        };
        contains.extend(execution);
        self.proxy.drop_response(operation, &contains, 1);
    }

    fn armed(&self) -> usize {
        self.proxy.armed()
    }

    fn take(&self) -> Vec<Exchange> {
        self.proxy.take_log().iter().map(Self::exchange).collect()
    }

    async fn record(&self, key: &str) -> Option<IdempotencyRecord> {
        DynamoDbStore::new(client(), &self.table)
            .get(key)
            .await
            .expect("read the record")
    }

    async fn companions(&self, key: &str) -> (usize, Vec<(String, bool)>) {
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
        let ours = scanned
            .items()
            .iter()
            .map(|item| (s(item, "id"), s(item, "status")))
            .filter(|(id, _)| id.starts_with(&format!("{key}#")));
        let (mut steps, mut outbox) = (0, Vec::new());
        for (id, status) in ours {
            match status.as_str() {
                "STEP" => steps += 1,
                _ if id.contains("#outbox#") => outbox.push((id, status == "DELIVERED")),
                _ => {}
            }
        }
        (steps, outbox)
    }

    fn check_repeatable_commit(commit: &Exchange) {
        assert!(
            commit.request.contains("\"ClientRequestToken\""),
            "the SDK gives the transaction one token for all its attempts (DynamoDB \
             answers a repeat within 10 minutes without applying it again)"
        );
    }
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
    let operations = |proxy: &Proxy| {
        proxy
            .take_log()
            .iter()
            .map(|e| format!("{}{}", e.operation, if e.dropped { "*" } else { "" }))
            .collect::<Vec<_>>()
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
    assert_eq!(operations(&proxy), ["PutItem*"]);

    // A client configured like the tests' other clients, no retry config of its
    // own: BehaviorVersion::latest() retries (standard, 3 attempts).
    let default = aws_sdk_dynamodb::Client::from_conf(proxied_config(&proxy).build());
    proxy.drop_response("PutItem", &[], 1);
    put(&default, "retried")
        .await
        .expect("sent again, succeeds");
    let log = proxy.take_log();
    assert_eq!(
        log.iter().map(|e| e.dropped).collect::<Vec<_>>(),
        [true, false]
    );
    assert_eq!(log[0].request, log[1].request);
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// The standalone server's database of the lost-response tests, reached
/// through the RESP proxy.
struct Redis {
    proxy: RespProxy,
    direct: RedisStore,
}

impl Redis {
    /// The store's request in the engine's terms; `None` for what is not one
    /// of its requests (a new connection's `CLIENT SETINFO`, `SELECT`).
    fn exchange(entry: &support::resp_proxy::Entry) -> Option<Exchange> {
        let json = |text: &str| serde_json::from_str::<Value>(text).unwrap_or_default();
        let fields = |record: Value| -> Value {
            ["owner", "execution", "data"]
                .iter()
                .filter_map(|name| Some((name.to_string(), record.get(*name)?.clone())))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let key = entry.args.first().map(String::as_str).unwrap_or_default();
        let (op, sent, applied, refused, returned) = match entry.name.as_str() {
            "EVALSHA" => {
                let script = support::redis::script_name(key)?;
                let keys: usize = entry.args.get(1)?.parse().ok()?;
                let argv = entry.args.get(2 + keys..)?;
                match (script, &entry.reply) {
                    // {written, the replaced or blocking record}
                    ("reserve", Resp::Array(reply)) => {
                        let written = reply.first() == Some(&Resp::Integer(1));
                        let old = reply.get(1).and_then(Resp::text).map(json);
                        (
                            "reserve",
                            fields(json(argv.first()?)),
                            written,
                            !written,
                            old.map_or(Value::Null, fields),
                        )
                    }
                    ("complete", Resp::Integer(written)) => {
                        let record = json(argv.get(1)?);
                        let op = match (keys, record["status"].as_str()) {
                            (2.., _) => "commit",
                            (_, Some("INPROGRESS")) => "open",
                            _ => "complete",
                        };
                        (
                            op,
                            fields(record),
                            *written == 1,
                            *written == 0,
                            Value::Null,
                        )
                    }
                    // 1: deleted, or already gone; 0: another owner's.
                    ("release", Resp::Integer(released)) => (
                        "release",
                        json!({ "owner": argv.first()? }),
                        *released == 1,
                        *released == 0,
                        Value::Null,
                    ),
                    // Nil when written, the stored entry otherwise.
                    ("put_step", reply) => {
                        let stored = match reply {
                            Resp::Array(entry) => json!({
                                "name": entry.first().and_then(Resp::text),
                                "data": entry.get(1).and_then(Resp::text),
                            }),
                            _ => Value::Null,
                        };
                        let written = *reply == Resp::Nil;
                        (
                            "put_step",
                            json!({ "name": argv.first()?, "data": argv.get(1)? }),
                            written,
                            !written,
                            stored,
                        )
                    }
                    ("mark_delivered", Resp::Integer(marked)) => (
                        "mark_delivered",
                        Value::Null,
                        *marked == 1,
                        *marked == 0,
                        Value::Null,
                    ),
                    // An error (NOSCRIPT, a script error): neither applied nor refused.
                    (script, _) => (script, Value::Null, false, false, Value::Null),
                }
            }
            "GET" => ("get", Value::Null, true, false, Value::Null),
            "HMGET" if key.contains("#step#") => {
                ("get_step", Value::Null, true, false, Value::Null)
            }
            "HMGET" if key.contains("#outbox#") => {
                ("get_outbox", Value::Null, true, false, Value::Null)
            }
            _ => return None,
        };
        Some(Exchange {
            op,
            connection: entry.connection,
            dropped: entry.dropped,
            applied,
            refused,
            request: String::from_utf8_lossy(&entry.raw).into_owned(),
            sent,
            returned,
            response: format!("{:?}", entry.reply),
        })
    }
}

impl Backend for Redis {
    type Store = RedisStore;

    async fn start(test: &str) -> (Self, RedisStore, String) {
        let database = support::redis::LOST_RESPONSES_DATABASE;
        let direct_url = support::redis::url_of_database(database);
        // Loaded beforehand: the first EVALSHA of a script on a fresh server
        // would meet NOSCRIPT, and the armed loss fire on that refusal.
        support::redis::load_scripts(&direct_url).await;
        let proxy = RespProxy::start(&support::redis::address()).await;
        let store = RedisStore::connect(&proxy.url(Some(database as u32)))
            .await
            .expect("Redis answers through the proxy");
        let direct = RedisStore::connect(&direct_url)
            .await
            .expect("Redis answers");
        // What the store sent while connecting.
        proxy.take_log();
        (Self { proxy, direct }, store, support::redis::prefix(test))
    }

    fn lose(&self, op: &str, execution: Option<&str>) {
        // The completing script writes a record `COMPLETED`, or kept open
        // `INPROGRESS`, or with outbox messages (keys `{record}#...#outbox#n`).
        let (script, mut contains): (&str, Vec<&str>) = match op {
            "reserve" | "put_step" | "release" | "mark_delivered" => (op, vec![]),
            "complete" => ("complete", vec!["\"status\":\"COMPLETED\""]),
            "open" => ("complete", vec!["\"status\":\"INPROGRESS\""]),
            "commit" => ("complete", vec!["#outbox#"]),
            other => panic!("no write {other}"),
        };
        let sha = support::redis::script_sha(script);
        contains.push(&sha);
        contains.extend(execution);
        self.proxy.drop_reply("EVALSHA", &contains, 1);
    }

    fn armed(&self) -> usize {
        self.proxy.armed()
    }

    fn take(&self) -> Vec<Exchange> {
        self.proxy
            .take_log()
            .iter()
            .filter_map(Self::exchange)
            .collect()
    }

    async fn record(&self, key: &str) -> Option<IdempotencyRecord> {
        self.direct.get(key).await.expect("read the record")
    }

    async fn companions(&self, key: &str) -> (usize, Vec<(String, bool)>) {
        let url = support::redis::url_of_database(support::redis::LOST_RESPONSES_DATABASE);
        let (mut steps, mut outbox) = (0, Vec::new());
        // A companion's key is its record's in braces (a hash tag), then the
        // execution and its kind.
        for companion in support::redis::scan(&url, &format!("{{{key}}}#*")).await {
            if companion.contains("#step#") {
                steps += 1;
            } else if companion.contains("#outbox#") {
                let status: Option<String> = support::redis::query(
                    std::slice::from_ref(&url),
                    false,
                    ::redis::cmd("HGET").arg(&companion).arg("status"),
                )
                .await;
                outbox.push((companion, status.as_deref() == Some("DELIVERED")));
            }
        }
        (steps, outbox)
    }

    /// The script is conditional on our owner token, which a repeat still
    /// holds, and writes the record and the messages again, unchanged (the
    /// messages still `PENDING`: none is delivered before the commit
    /// answers). Nothing but the request itself is needed.
    fn check_repeatable_commit(commit: &Exchange) {
        assert!(
            commit.sent["owner"].is_string() && commit.request.contains("#outbox#"),
            "the record, conditional on its owner, and its messages in one script: {}",
            commit.request
        );
    }
}
