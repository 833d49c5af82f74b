//! Batches at the request floor, on LocalStack: an SQS or stream batch reserves
//! its records in one request and completes them in one, and keeps every rule of
//! the single-record path (counted requests, handler runs, the items in the
//! table). A crash between the two requests, at each point of a batch, reruns
//! the records with their steps replayed from the journal.

mod support;

use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_dynamodb::config::interceptors::BeforeSerializationInterceptorContextMut;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::operation::batch_execute_statement::BatchExecuteStatementInput;
use aws_sdk_dynamodb::types::AttributeValue;
use lambda_idempotency::store::StoreError;
use lambda_idempotency::{
    effects, DynamoDbStore, Idempotency, IdempotencyConfig, IdempotencyRecord, IdempotencyStore,
    StepJournal,
};
use lambda_runtime::LambdaEvent;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use support::events::sqs_message;
use support::localstack::{client, default_table, recorded_client, recorded_client_with, s, scan};
use support::{context, now_ms};
use tokio::sync::Notify;

/// Runs per order, and the step's external effect per derived key.
#[derive(Clone, Default)]
struct Ledger {
    runs: Arc<Mutex<BTreeMap<String, usize>>>,
    effects: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Ledger {
    fn runs(&self) -> BTreeMap<String, usize> {
        self.runs.lock().expect("lock").clone()
    }
    fn total_runs(&self) -> usize {
        self.runs().values().sum()
    }
    fn effects(&self) -> BTreeMap<String, usize> {
        self.effects.lock().expect("lock").clone()
    }
}

fn order_id(message: &SqsMessage) -> String {
    let body: Value =
        serde_json::from_str(message.body.as_deref().unwrap_or("{}")).unwrap_or_default();
    body["order_id"].as_str().unwrap_or_default().to_owned()
}

/// The handler: counts the run; orders starting with `fail` fail; with
/// `steps`, charges in a journaled step whose effect is counted by derived key.
fn ship(
    ledger: &Ledger,
    steps: bool,
) -> impl Fn(SqsMessage) -> std::pin::Pin<Box<dyn Future<Output = Result<Value, String>> + Send>> + Clone
{
    let ledger = ledger.clone();
    move |message: SqsMessage| {
        let ledger = ledger.clone();
        Box::pin(async move {
            let id = order_id(&message);
            *ledger
                .runs
                .lock()
                .expect("lock")
                .entry(id.clone())
                .or_default() += 1;
            if id.starts_with("fail") {
                return Err(format!("{id} failed"));
            }
            if steps {
                let effects = effects().map_err(|e| e.to_string())?;
                let charged = ledger.effects.clone();
                effects
                    .step("charge", |key| async move {
                        *charged
                            .lock()
                            .expect("lock")
                            .entry(key.clone())
                            .or_default() += 1;
                        Ok::<_, String>(key)
                    })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            tokio::task::yield_now().await;
            Ok(json!({ "shipped": id }))
        })
    }
}

fn sqs_batch_of(orders: &[&str]) -> SqsEvent {
    let mut event = SqsEvent::default();
    event.records = orders
        .iter()
        .map(|id| {
            sqs_message(
                &json!({ "order_id": id, "amount": 10 }).to_string(),
                &format!("m-{id}"),
            )
        })
        .collect();
    event
}

fn orders(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn config() -> lambda_idempotency::IdempotencyConfigBuilder {
    IdempotencyConfig::builder().key_expression("powertools_json(body).order_id")
}

fn failed_ids(response: &SqsBatchResponse) -> Vec<String> {
    let mut ids: Vec<String> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    ids.sort();
    ids
}

/// Every item of the table, by `id`, with its status and data.
async fn records(table: &str) -> BTreeMap<String, (String, Option<String>)> {
    scan(table)
        .await
        .into_iter()
        .filter(|item| matches!(item.get("status"), Some(AttributeValue::S(s)) if s == "COMPLETED" || s == "INPROGRESS"))
        .map(|item| {
            let data = item.get("data").and_then(|d| d.as_s().ok()).cloned();
            (s(&item, "id").to_owned(), (s(&item, "status").to_owned(), data))
        })
        .collect()
}

fn sorted(mut requests: Vec<String>) -> Vec<String> {
    requests.sort();
    requests
}

#[tokio::test]
async fn a_batch_of_ten_costs_two_requests_first_two_redelivered_and_three_half_new() {
    let table = default_table("batch-floor").await;
    let (client, requests) = recorded_client();
    let idempotency = Idempotency::new(
        DynamoDbStore::new(client, &table),
        config().build().expect("config"),
    );
    let ledger = Ledger::default();
    let batch = idempotency.sqs_batch("ship", ship(&ledger, false));
    let first = orders(10, "o");
    let first: Vec<&str> = first.iter().map(String::as_str).collect();

    let response = batch
        .process(LambdaEvent::new(sqs_batch_of(&first), context(30_000)))
        .await
        .expect("batch");
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        requests.take(),
        ["BatchExecuteStatement"; 2],
        "reserved in one request, completed in one"
    );
    assert_eq!(ledger.total_runs(), 10);
    let stored = records(&table).await;
    assert_eq!(stored.len(), 10);
    for id in &first {
        let (status, data) = stored
            .values()
            .find(|(_, d)| d.as_deref() == Some(&json!({ "shipped": id }).to_string()))
            .expect("the response is stored");
        assert_eq!((status.as_str(), data.is_some()), ("COMPLETED", true));
    }

    // Redelivered whole: the refused inserts bring no item back, so the records
    // are read in one request; all replay.
    let response = batch
        .process(LambdaEvent::new(sqs_batch_of(&first), context(30_000)))
        .await
        .expect("batch");
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(requests.take(), ["BatchExecuteStatement", "BatchGetItem"]);
    assert_eq!(ledger.total_runs(), 10, "nothing ran again");
    assert_eq!(
        records(&table).await,
        stored,
        "the records are untouched: replayed as stored"
    );

    // Half new, half completed.
    let mixed: Vec<String> = first[..5]
        .iter()
        .map(|s| s.to_string())
        .chain(orders(5, "n"))
        .collect();
    let mixed: Vec<&str> = mixed.iter().map(String::as_str).collect();
    let response = batch
        .process(LambdaEvent::new(sqs_batch_of(&mixed), context(30_000)))
        .await
        .expect("batch");
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        requests.take(),
        [
            "BatchExecuteStatement",
            "BatchGetItem",
            "BatchExecuteStatement"
        ]
    );
    assert_eq!(ledger.total_runs(), 15, "the five new ones ran, once each");
    assert!(ledger.runs().values().all(|&n| n == 1));
    assert_eq!(records(&table).await.len(), 15);
}

#[tokio::test]
async fn with_batched_requests_off_each_record_costs_its_own_two() {
    let table = default_table("batch-off").await;
    let (client, requests) = recorded_client();
    let idempotency = Idempotency::new(
        DynamoDbStore::new(client, &table),
        config().batch_requests(false).build().expect("config"),
    );
    let ledger = Ledger::default();
    let batch = idempotency.sqs_batch("ship", ship(&ledger, false));
    let ids = orders(10, "o");
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let response = batch
        .process(LambdaEvent::new(sqs_batch_of(&ids), context(30_000)))
        .await
        .expect("batch");
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(requests.take(), ["PutItem"; 20]);
    assert_eq!(ledger.total_runs(), 10);
}

/// A record as another call left it, written straight to the table.
async fn seed(
    table: &str,
    key: &str,
    status: &str,
    expiration_s: i64,
    in_progress_ms: i64,
    execution: &str,
    data: Option<&str>,
) {
    let mut request = client()
        .put_item()
        .table_name(table)
        .item("id", AttributeValue::S(key.to_owned()))
        .item("status", AttributeValue::S(status.to_owned()))
        .item("expiration", AttributeValue::N(expiration_s.to_string()))
        .item(
            "in_progress_expiration",
            AttributeValue::N(in_progress_ms.to_string()),
        )
        .item("owner", AttributeValue::S(format!("owner-of-{execution}")))
        .item("execution", AttributeValue::S(execution.to_owned()));
    if let Some(data) = data {
        request = request.item("data", AttributeValue::S(data.to_owned()));
    }
    request.send().await.expect("seed");
}

#[tokio::test]
async fn a_batch_mixing_new_completed_in_progress_expired_and_abandoned_records_handles_each_as_alone(
) {
    let table = default_table("batch-mixed").await;
    let (client, requests) = recorded_client();
    let store = DynamoDbStore::new(client, &table);
    let idempotency = Idempotency::new(store.clone(), config().build().expect("config"));
    let ledger = Ledger::default();
    let batch = idempotency.sqs_batch("ship", ship(&ledger, true));
    let now_s = now_ms() / 1000;
    let completed = r#"{"shipped":"done-before"}"#;
    let keys = batch_keys(&idempotency, &["done", "busy", "stale", "crashed"]);
    seed(
        &table,
        &keys["done"],
        "COMPLETED",
        now_s + 3600,
        now_ms() + 60_000,
        "e-done",
        Some(completed),
    )
    .await;
    seed(
        &table,
        &keys["busy"],
        "INPROGRESS",
        now_s + 3600,
        now_ms() + 60_000,
        "e-busy",
        None,
    )
    .await;
    seed(
        &table,
        &keys["stale"],
        "COMPLETED",
        now_s - 10,
        now_ms() - 60_000,
        "e-stale",
        Some(r#"{"shipped":"old"}"#),
    )
    .await;
    seed(
        &table,
        &keys["crashed"],
        "INPROGRESS",
        now_s + 3600,
        now_ms() - 1_000,
        "e-crashed",
        None,
    )
    .await;
    // The crashed attempt had charged in its step: the journal holds the result.
    let journaled = lambda_idempotency::store::StepRecord {
        key: format!("{}#e-crashed#step#0", keys["crashed"]),
        name: "charge".to_owned(),
        data: json!("receipt-of-the-crashed-attempt").to_string(),
        expiration: now_s + 3600,
    };
    assert!(StepJournal::put_step(&store, &journaled)
        .await
        .expect("journal")
        .is_none());
    requests.take();

    let event = sqs_batch_of(&["new", "done", "busy", "stale", "crashed"]);
    let response = batch
        .process(LambdaEvent::new(event, context(30_000)))
        .await
        .expect("batch");
    assert_eq!(
        failed_ids(&response),
        ["m-busy"],
        "only the one in progress elsewhere fails"
    );
    assert_eq!(
        ledger.runs(),
        BTreeMap::from([
            ("crashed".into(), 1),
            ("new".into(), 1),
            ("stale".into(), 1)
        ]),
        "the completed one replays, the one in progress is refused"
    );
    assert_eq!(
        sorted(requests.take()),
        [
            "BatchExecuteStatement",
            "BatchExecuteStatement",
            "BatchGetItem",
            "GetItem",
            "PutItem",
            "PutItem",
            "PutItem",
            "PutItem"
        ],
        "inserts, a read of the four in the way, the expired and the abandoned reserved alone \
         (PutItem x2), the resumed execution's journal read (GetItem), the two new charges \
         journaled (PutItem x2), the completions together"
    );
    let effects = ledger.effects();
    assert_eq!(
        effects.len(),
        2,
        "new and stale charged, the crashed attempt's charge replayed: {effects:?}"
    );
    let stored = records(&table).await;
    assert_eq!(
        stored[&keys["done"]].1.as_deref(),
        Some(completed),
        "replayed, not rewritten"
    );
    assert_eq!(stored[&keys["busy"]].0, "INPROGRESS");
    assert_eq!(stored[&keys["crashed"]].0, "COMPLETED");
    let crashed = scan(&table)
        .await
        .into_iter()
        .find(|i| s(i, "id") == keys["crashed"])
        .expect("record");
    assert_eq!(
        s(&crashed, "execution"),
        "e-crashed",
        "the takeover resumed the crashed execution"
    );
    assert_eq!(
        stored[&keys["stale"]].1.as_deref(),
        Some(r#"{"shipped":"stale"}"#),
        "re-executed"
    );
}

/// The record keys of `ids` under a batch named `ship` of `idempotency`.
fn batch_keys<S: IdempotencyStore>(
    idempotency: &Idempotency<S>,
    ids: &[&str],
) -> HashMap<String, String> {
    ids.iter()
        .map(|id| {
            let message = sqs_message(&json!({ "order_id": id, "amount": 10 }).to_string(), "m");
            let event = serde_json::to_value(&message).expect("a message as JSON");
            let key = idempotency
                .key_for(Some("ship"), &event)
                .expect("key")
                .expect("key material");
            (id.to_string(), key)
        })
        .collect()
}

#[tokio::test]
async fn a_different_payload_inside_a_batch_is_refused_and_the_others_run() {
    let table = default_table("batch-payload").await;
    let (client, requests) = recorded_client();
    let idempotency = Idempotency::new(
        DynamoDbStore::new(client, &table),
        config()
            .payload_validation("powertools_json(body).amount")
            .build()
            .expect("config"),
    );
    let ledger = Ledger::default();
    let batch = idempotency.sqs_batch("ship", ship(&ledger, false));
    batch
        .process(LambdaEvent::new(
            sqs_batch_of(&["o-1", "o-2"]),
            context(30_000),
        ))
        .await
        .expect("batch");
    requests.take();

    let mut event = sqs_batch_of(&["o-1", "o-2", "o-3"]);
    event.records[0].body = Some(json!({ "order_id": "o-1", "amount": 99 }).to_string());
    let response = batch
        .process(LambdaEvent::new(event, context(30_000)))
        .await
        .expect("batch");
    assert_eq!(
        failed_ids(&response),
        ["m-o-1"],
        "the changed payload is refused"
    );
    assert_eq!(
        ledger.runs(),
        BTreeMap::from([("o-1".into(), 1), ("o-2".into(), 1), ("o-3".into(), 1)]),
        "o-2 replays, o-3 runs"
    );
    assert_eq!(
        requests.take(),
        ["BatchExecuteStatement", "BatchGetItem", "PutItem"],
        "o-3's completion alone is one PutItem"
    );
}

/// Makes the statement at `position` of the first `BatchExecuteStatement` name a
/// table that does not exist: LocalStack fails that statement alone
/// (`ResourceNotFound`), as DynamoDB fails a throttled one, and applies the rest.
#[derive(Debug)]
struct FailOneStatement {
    position: usize,
    done: AtomicBool,
}

impl Intercept for FailOneStatement {
    fn name(&self) -> &'static str {
        "FailOneStatement"
    }

    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(input) = context
            .input_mut()
            .downcast_mut::<BatchExecuteStatementInput>()
        else {
            return Ok(());
        };
        if self.done.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let statement = input
            .statements
            .as_mut()
            .and_then(|s| s.get_mut(self.position))
            .expect("the statement to fail");
        let text = statement
            .statement
            .replacen("INTO \"", "INTO \"missing-", 1);
        statement.statement = text;
        Ok(())
    }
}

#[tokio::test]
async fn a_statement_that_fails_alone_is_sent_again_as_its_own_request() {
    let table = default_table("batch-statement").await;
    let (client, requests) = recorded_client_with(FailOneStatement {
        position: 3,
        done: AtomicBool::new(false),
    });
    let idempotency = Idempotency::new(
        DynamoDbStore::new(client, &table),
        config().build().expect("config"),
    );
    let ledger = Ledger::default();
    let batch = idempotency.sqs_batch("ship", ship(&ledger, false));
    let ids = orders(6, "o");
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let response = batch
        .process(LambdaEvent::new(sqs_batch_of(&ids), context(30_000)))
        .await
        .expect("batch");
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        response.batch_item_failures
    );
    assert_eq!(
        requests.take(),
        ["BatchExecuteStatement", "PutItem", "BatchExecuteStatement"],
        "five reserved in the batch, the failed one alone, all six completed together"
    );
    assert!(ledger.runs().values().all(|&n| n == 1));
    assert_eq!(ledger.total_runs(), 6);
    let stored = records(&table).await;
    assert_eq!(stored.len(), 6);
    assert!(stored.values().all(|(status, _)| status == "COMPLETED"));
}

fn kinesis_batch(ids: &[&str]) -> KinesisEvent {
    use base64::Engine;
    let records: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let data = base64::engine::general_purpose::STANDARD
                .encode(json!({ "order_id": id }).to_string());
            json!({
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": "p",
                    "sequenceNumber": format!("{}", 100 + i),
                    "data": data,
                    "approximateArrivalTimestamp": 1795341600.5
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": format!("shardId-000000000000:{}", 100 + i),
                "eventName": "aws:kinesis:record",
                "eventSourceARN": "arn:aws:kinesis:eu-west-1:123456789012:stream/orders"
            })
        })
        .collect();
    serde_json::from_value(json!({ "Records": records })).expect("a Kinesis event")
}

#[tokio::test]
async fn a_stream_batch_stops_at_its_first_failure_and_releases_the_rest_in_one_request() {
    let table = default_table("batch-stream").await;
    let (client, requests) = recorded_client();
    let idempotency = Idempotency::new(
        DynamoDbStore::new(client, &table),
        IdempotencyConfig::builder()
            .key_expression("powertools_json(powertools_base64(kinesis.data)).order_id")
            .build()
            .expect("config"),
    );
    let runs = Arc::new(Mutex::new(Vec::new()));
    let fail = Arc::new(AtomicBool::new(true));
    let batch = {
        let (runs, fail) = (runs.clone(), fail.clone());
        idempotency.stream_batch("index", move |record: KinesisEventRecord| {
            let (runs, fail) = (runs.clone(), fail.clone());
            async move {
                let order: Value =
                    serde_json::from_slice(&record.kinesis.data.0).map_err(|e| e.to_string())?;
                let id = order["order_id"].as_str().unwrap_or_default().to_owned();
                runs.lock().expect("lock").push(id.clone());
                if id == "s-2" && fail.load(Ordering::SeqCst) {
                    return Err(format!("{id} failed"));
                }
                Ok::<_, String>(order)
            }
        })
    };
    let ids = ["s-0", "s-1", "s-2", "s-3", "s-4"];
    let response = batch
        .process_kinesis(LambdaEvent::new(kinesis_batch(&ids), context(30_000)))
        .await
        .expect("batch");
    let failed: Vec<&str> = response
        .batch_item_failures
        .iter()
        .filter_map(|f| f.item_identifier.as_deref())
        .collect();
    assert_eq!(
        failed,
        ["102", "103", "104"],
        "the shard resumes at the failed record"
    );
    assert_eq!(
        *runs.lock().expect("lock"),
        ["s-0", "s-1", "s-2"],
        "in order, stopping at the failure"
    );
    assert_eq!(
        sorted(requests.take()),
        ["BatchExecuteStatement", "BatchExecuteStatement", "BatchExecuteStatement", "DeleteItem"],
        "the five reserved together; the failed one released alone; the two completed and the two not run released, a request each"
    );
    let stored = records(&table).await;
    assert_eq!(
        stored.len(),
        2,
        "only the completed records stay: {stored:?}"
    );

    // The shard resumes at the failed record, which now succeeds.
    fail.store(false, Ordering::SeqCst);
    let rest = batch
        .process_kinesis(LambdaEvent::new(kinesis_batch(&ids), context(30_000)))
        .await
        .expect("batch");
    assert!(rest.batch_item_failures.is_empty());
    assert_eq!(
        *runs.lock().expect("lock"),
        ["s-0", "s-1", "s-2", "s-2", "s-3", "s-4"],
        "the first two replay"
    );
    assert_eq!(records(&table).await.len(), 5);
}

/// Where a batch's process dies.
#[derive(Clone, Copy, Debug)]
enum Crash {
    /// After the batched reservation was applied, before any handler ran.
    AfterReserving,
    /// After every handler returned, before the batched completion was sent.
    BeforeCompleting,
    /// After the batched completion was applied, before the function returned.
    AfterCompleting,
}

/// What happens to a batch beside the real store.
#[derive(Clone)]
enum Fault {
    /// The process dies at a point of the batch: the call there is applied (or
    /// not) and then never returns; `died` is notified.
    Dies(Crash, Arc<Notify>),
    /// Another execution environment takes the record under this key over (its
    /// owner token changes) before the batch's completions are written.
    TakenOver { table: String, key: String },
}

/// The real store, with a [`Fault`].
#[derive(Clone)]
struct Faulty {
    inner: DynamoDbStore,
    fault: Fault,
}

impl Faulty {
    /// Dies here if the fault is a crash at `point`.
    async fn crash_at(&self, point: fn(Crash) -> bool) {
        if let Fault::Dies(crash, died) = &self.fault {
            if point(*crash) {
                died.notify_one();
                std::future::pending::<()>().await;
            }
        }
    }
}

impl IdempotencyStore for Faulty {
    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.inner.get(key).await
    }
    async fn reserve(
        &self,
        record: &IdempotencyRecord,
        now_ms: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.inner.reserve(record, now_ms).await
    }
    async fn complete(&self, record: &IdempotencyRecord) -> Result<(), StoreError> {
        self.inner.complete(record).await
    }
    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        self.inner.release(key, owner).await
    }
    async fn reserve_batch(
        &self,
        records: &[IdempotencyRecord],
        now_ms: i64,
    ) -> Vec<Result<Option<IdempotencyRecord>, StoreError>> {
        let answers = self.inner.reserve_batch(records, now_ms).await;
        self.crash_at(|c| matches!(c, Crash::AfterReserving)).await;
        answers
    }
    async fn complete_batch(&self, records: &[IdempotencyRecord]) -> Vec<Result<(), StoreError>> {
        self.crash_at(|c| matches!(c, Crash::BeforeCompleting))
            .await;
        if let Fault::TakenOver { table, key } = &self.fault {
            client()
                .update_item()
                .table_name(table)
                .key("id", AttributeValue::S(key.clone()))
                .update_expression("SET #owner = :other")
                .expression_attribute_names("#owner", "owner")
                .expression_attribute_values(
                    ":other",
                    AttributeValue::S("another-environment".into()),
                )
                .send()
                .await
                .expect("take the record over");
        }
        let answers = self.inner.complete_batch(records).await;
        self.crash_at(|c| matches!(c, Crash::AfterCompleting)).await;
        answers
    }
    async fn release_batch(
        &self,
        reservations: &[(String, String)],
    ) -> Vec<Result<(), StoreError>> {
        self.inner.release_batch(reservations).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
    fn journal(&self) -> Option<&dyn StepJournal> {
        self.inner.journal()
    }
}

async fn crash_then_redeliver(crash: Crash) {
    let table = default_table("batch-crash").await;
    let (client, requests) = recorded_client();
    let store = DynamoDbStore::new(client, &table);
    let ledger = Ledger::default();
    let ids = orders(6, "c");
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let died = Arc::new(Notify::new());
    let dying = Idempotency::new(
        Faulty {
            inner: store.clone(),
            fault: Fault::Dies(crash, died.clone()),
        },
        config().build().expect("config"),
    );
    // The first delivery's deadline: its reservations are abandoned after it.
    let first_deadline_ms = 1_500;
    let attempt = {
        let batch = dying.sqs_batch("ship", ship(&ledger, true));
        let event = sqs_batch_of(&ids);
        tokio::spawn(async move {
            batch
                .process(LambdaEvent::new(event, context(first_deadline_ms)))
                .await
        })
    };
    died.notified().await;
    attempt.abort();
    let runs_before = ledger.total_runs();
    let expected_runs = match crash {
        Crash::AfterReserving => 0,
        _ => 6,
    };
    assert_eq!(
        runs_before, expected_runs,
        "{crash:?}: handlers run before the process died"
    );
    let statuses: Vec<String> = records(&table)
        .await
        .into_values()
        .map(|(status, _)| status)
        .collect();
    let expected_status = match crash {
        Crash::AfterCompleting => "COMPLETED",
        _ => "INPROGRESS",
    };
    assert_eq!(
        statuses,
        vec![expected_status.to_owned(); 6],
        "{crash:?}: the table after the crash"
    );

    // SQS redelivers the batch once the visibility timeout (at least the
    // function's timeout) has passed: after the first delivery's deadline.
    let abandoned_at = now_ms() + first_deadline_ms + 50;
    while now_ms() < abandoned_at {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    requests.take();
    let idempotency = Idempotency::new(store, config().build().expect("config"));
    let batch = idempotency.sqs_batch("ship", ship(&ledger, true));
    let response = batch
        .process(LambdaEvent::new(sqs_batch_of(&ids), context(30_000)))
        .await
        .expect("batch");
    assert!(
        response.batch_item_failures.is_empty(),
        "{crash:?}: {:?}",
        response.batch_item_failures
    );

    let reruns = ledger.total_runs() - runs_before;
    let requests = requests.take();
    match crash {
        Crash::AfterCompleting => {
            assert_eq!(reruns, 0, "completed: the redelivery replays");
            assert_eq!(requests, ["BatchExecuteStatement", "BatchGetItem"]);
        }
        _ => {
            assert_eq!(reruns, 6, "{crash:?}: each record runs again, once");
            assert!(ledger.runs().values().all(|&n| n == expected_runs / 6 + 1));
            // Inserts refused, the abandoned records read, each taken over
            // alone (PutItem), its journal read (GetItem), its charge journaled
            // if the first delivery had not (PutItem), then completed together.
            let journaled = match crash {
                Crash::AfterReserving => 6,
                _ => 0,
            };
            assert_eq!(
                requests.iter().filter(|r| *r == "GetItem").count(),
                6,
                "{requests:?}"
            );
            assert_eq!(
                requests.iter().filter(|r| *r == "PutItem").count(),
                6 + journaled,
                "{requests:?}"
            );
            assert_eq!(
                requests
                    .iter()
                    .filter(|r| *r == "BatchExecuteStatement")
                    .count(),
                2,
                "{requests:?}"
            );
        }
    }
    // Whatever the point, each order's charge happened once, under one derived key.
    let effects = ledger.effects();
    assert_eq!(
        effects.len(),
        6,
        "{crash:?}: one derived key per order: {effects:?}"
    );
    assert!(
        effects.values().all(|&n| n == 1),
        "{crash:?}: charged once each: {effects:?}"
    );
    let stored = records(&table).await;
    assert_eq!(stored.len(), 6);
    assert!(
        stored.values().all(|(status, _)| status == "COMPLETED"),
        "{crash:?}: {stored:?}"
    );
}

#[tokio::test]
async fn a_crash_after_the_batched_reservation_reruns_the_records_after_their_deadline() {
    crash_then_redeliver(Crash::AfterReserving).await;
}

#[tokio::test]
async fn a_crash_before_the_batched_completion_reruns_the_records_with_their_steps_replayed() {
    crash_then_redeliver(Crash::BeforeCompleting).await;
}

#[tokio::test]
async fn a_crash_after_the_batched_completion_replays_the_records() {
    crash_then_redeliver(Crash::AfterCompleting).await;
}

fn fifo_batch_of(messages: &[(&str, &str)]) -> SqsEvent {
    let mut event = SqsEvent::default();
    event.records = messages
        .iter()
        .map(|(group, id)| {
            let mut message = sqs_message(
                &json!({ "order_id": id, "amount": 10 }).to_string(),
                &format!("m-{id}"),
            );
            message
                .attributes
                .insert("MessageGroupId".into(), (*group).to_owned());
            message.event_source_arn =
                Some("arn:aws:sqs:eu-west-1:123456789012:orders.fifo".into());
            message
        })
        .collect();
    event
}

#[tokio::test]
async fn a_fifo_group_after_a_failure_is_released_in_one_request_and_an_unwritten_completion_holds_back_its_group(
) {
    let table = default_table("batch-fifo").await;
    let (client, requests) = recorded_client();
    let store = DynamoDbStore::new(client, &table);
    let ledger = Ledger::default();
    // Group a: a-0, then a failure, then two that must not run. Group b: three
    // that run; b-1's record is taken over by another environment before the
    // batch's completions are written.
    let messages = [
        ("a", "a-0"),
        ("a", "fail-a"),
        ("a", "a-2"),
        ("a", "a-3"),
        ("b", "b-0"),
        ("b", "b-1"),
        ("b", "b-2"),
    ];
    let probe = Idempotency::new(store.clone(), config().build().expect("config"));
    let taken_over = batch_keys(&probe, &["b-1"])["b-1"].clone();
    let idempotency = Idempotency::new(
        Faulty {
            inner: store,
            fault: Fault::TakenOver {
                table: table.clone(),
                key: taken_over.clone(),
            },
        },
        config().build().expect("config"),
    );
    let batch = idempotency.sqs_batch("ship", ship(&ledger, false));
    let response = batch
        .process(LambdaEvent::new(fifo_batch_of(&messages), context(30_000)))
        .await
        .expect("batch");
    assert_eq!(
        failed_ids(&response),
        ["m-a-2", "m-a-3", "m-b-1", "m-b-2", "m-fail-a"],
        "a's failure holds back the rest of a; b-1's unwritten completion holds back b-2"
    );
    assert_eq!(
        ledger.runs(),
        BTreeMap::from([
            ("a-0".into(), 1),
            ("b-0".into(), 1),
            ("b-1".into(), 1),
            ("b-2".into(), 1),
            ("fail-a".into(), 1)
        ]),
        "in group order; a-2 and a-3 never ran"
    );
    assert_eq!(
        sorted(requests.take()),
        ["BatchExecuteStatement", "BatchExecuteStatement", "BatchExecuteStatement", "DeleteItem"],
        "reserved together; the failure released alone; completions together; a-2 and a-3 released together"
    );
    let stored = records(&table).await;
    assert_eq!(
        stored.len(),
        4,
        "a-0, b-0, b-2 completed; b-1 left to its new owner: {stored:?}"
    );
    assert_eq!(
        stored[&taken_over].0, "INPROGRESS",
        "the late completion did not overwrite the new owner's record"
    );
    let owners: Vec<String> = scan(&table)
        .await
        .iter()
        .filter(|i| s(i, "id") == taken_over)
        .map(|i| s(i, "owner").to_owned())
        .collect();
    assert_eq!(owners, ["another-environment"]);
}
