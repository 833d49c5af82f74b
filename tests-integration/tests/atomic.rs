//! Atomic business writes and version-checked writes, on LocalStack with the real
//! SDK, through the real engine: writes staged by a handler commit in the
//! TransactWriteItems of its completed record, once.

mod support;

use aws_sdk_dynamodb::config::interceptors::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Delete, Put, Update};
use aws_sdk_dynamodb::Client;
use lambda_idempotency::{
    effects, DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyError,
    IdempotencyStore, Versioned, VersionedWrite,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use support::faults::FaultStore;
use support::localstack::{
    client, create_table, default_table, recorded_client, recorded_client_with, s as text, scan,
    table_name, Requests,
};
use support::{context, idempotency_error, in_progress, poll, Counter};

type Failure = Error<aws_sdk_dynamodb::error::BuildError>;

fn config() -> IdempotencyConfig {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("atomic")
        .build()
        .expect("config")
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

fn n(value: i64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// Fails TransactWriteItems requests while armed: before they are sent (the
/// commit never reaches DynamoDB) or after (applied, the response lost).
#[derive(Debug, Clone, Default)]
struct FailTransactions {
    before: Arc<AtomicUsize>,
    after: Arc<AtomicUsize>,
    /// A transaction is on its way whose response is to be lost.
    losing: Arc<AtomicUsize>,
}

fn take(armed: &AtomicUsize) -> bool {
    armed
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl Intercept for FailTransactions {
    fn name(&self) -> &'static str {
        "FailTransactions"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
        let target = context.request().headers().get("x-amz-target");
        if !target.is_some_and(|t| t.ends_with(".TransactWriteItems")) {
            return Ok(());
        }
        if take(&self.before) {
            return Err("injected: the process died before the commit was sent".into());
        }
        if take(&self.after) {
            self.losing.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn read_after_transmit(
        &self,
        _: &BeforeDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
        if take(&self.losing) {
            return Err("injected: the commit's response was lost".into());
        }
        Ok(())
    }
}

/// A records table, a business table (partition key `pk`) seeded with a stock
/// item, a cart and a customer, and a store on a recorded client.
struct Shop {
    records: String,
    business: String,
    store_client: Client,
    requests: Requests,
    faults: FailTransactions,
}

impl Shop {
    async fn new(test: &str) -> Self {
        let records = default_table(test).await;
        let business = table_name(&format!("{test}-biz"));
        create_table(&client(), &business, "pk", None, "ttl").await;
        let faults = FailTransactions::default();
        let (store_client, requests) = recorded_client_with(faults.clone());
        let shop = Self {
            records,
            business,
            store_client,
            requests,
            faults,
        };
        shop.seed("stock#s-1", &[("available", n(10)), ("writes", n(0))])
            .await;
        shop.seed("stock#s-out", &[("available", n(0)), ("writes", n(0))])
            .await;
        shop.seed("customer#c-1", &[("name", s("Ada"))]).await;
        shop
    }

    fn idempotency(&self) -> Idempotency<DynamoDbStore> {
        Idempotency::new(
            DynamoDbStore::new(self.store_client.clone(), &self.records),
            config(),
        )
    }

    async fn seed(&self, pk: &str, attributes: &[(&str, AttributeValue)]) {
        let mut item: HashMap<String, AttributeValue> = attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        item.insert("pk".into(), s(pk));
        client()
            .put_item()
            .table_name(&self.business)
            .set_item(Some(item))
            .send()
            .await
            .expect("seed");
    }

    async fn item(&self, pk: &str) -> Option<HashMap<String, AttributeValue>> {
        client()
            .get_item()
            .table_name(&self.business)
            .key("pk", s(pk))
            .consistent_read(true)
            .send()
            .await
            .expect("get item")
            .item
    }

    async fn number(&self, pk: &str, attribute: &str) -> Option<i64> {
        self.item(pk)
            .await?
            .get(attribute)?
            .as_n()
            .ok()?
            .parse()
            .ok()
    }

    /// `(id, status)` of every record of the records table.
    async fn records(&self) -> Vec<(String, String)> {
        scan(&self.records)
            .await
            .iter()
            .map(|item| (text(item, "id").to_owned(), text(item, "status").to_owned()))
            .collect()
    }

    /// The staged writes of an order: the order put, the stock decremented (if
    /// enough is available), the cart deleted, the customer checked.
    fn stage_order(&self, order: &Value) -> Result<(), Failure> {
        let id = order["order_id"].as_str().unwrap_or_default();
        let sku = order["sku"].as_str().unwrap_or("s-1");
        let effects = effects()?;
        let writes = effects.writes();
        let put = writes.put(
            Put::builder()
                .table_name(&self.business)
                .item("pk", s(&format!("order#{id}")))
                .item("sku", s(sku))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(Error::Handler)?,
        );
        let update = writes.update(
            Update::builder()
                .table_name(&self.business)
                .key("pk", s(&format!("stock#{sku}")))
                .update_expression("ADD available :minus_one, writes :one")
                .condition_expression("available >= :one")
                .expression_attribute_values(":minus_one", n(-1))
                .expression_attribute_values(":one", n(1))
                .build()
                .map_err(Error::Handler)?,
        );
        let delete = writes.delete(
            Delete::builder()
                .table_name(&self.business)
                .key("pk", s(&format!("cart#{id}")))
                .build()
                .map_err(Error::Handler)?,
        );
        let check = writes.condition_check(
            ConditionCheck::builder()
                .table_name(&self.business)
                .key("pk", s("customer#c-1"))
                .condition_expression("attribute_exists(pk)")
                .build()
                .map_err(Error::Handler)?,
        );
        assert_eq!((put, update, delete, check), (0, 1, 2, 3));
        Ok(())
    }

    /// The record the engine stores for `order_id`.
    fn key(&self, order_id: &str) -> String {
        support::key_for("atomic.place", order_id)
    }
}

#[tokio::test]
async fn staged_writes_commit_once_with_the_record_and_a_replay_writes_nothing() {
    let shop = Shop::new("atomic-commit").await;
    shop.seed("cart#o-1", &[("items", n(1))]).await;
    let idempotency = shop.idempotency();
    let runs = Counter::default();
    let place = idempotency.function("place", |order: Value| {
        runs.hit();
        let staged = shop.stage_order(&order);
        async move {
            staged?;
            Ok::<_, Failure>(json!({ "placed": order["order_id"] }))
        }
    });
    shop.requests.take();

    let first = place
        .call(json!({ "order_id": "o-1" }), None)
        .await
        .expect("first");
    assert_eq!(first, json!({ "placed": "o-1" }));
    // First execution: the reservation, then one transaction.
    assert_eq!(shop.requests.take(), ["PutItem", "TransactWriteItems"]);
    assert!(shop.item("order#o-1").await.is_some(), "the order was put");
    assert_eq!(shop.number("stock#s-1", "available").await, Some(9));
    assert_eq!(shop.number("stock#s-1", "writes").await, Some(1));
    assert!(
        shop.item("cart#o-1").await.is_none(),
        "the cart was deleted"
    );
    assert_eq!(
        shop.records().await,
        [(shop.key("o-1"), "COMPLETED".to_owned())]
    );

    // A retry after the commit: one request, the stored response, no write.
    let replay = place
        .call(json!({ "order_id": "o-1" }), None)
        .await
        .expect("replay");
    assert_eq!(replay, first);
    assert_eq!(shop.requests.take(), ["PutItem"]);
    assert_eq!(runs.get(), 1);
    assert_eq!(shop.number("stock#s-1", "available").await, Some(9));
    assert_eq!(shop.number("stock#s-1", "writes").await, Some(1));
}

#[tokio::test]
async fn a_crash_before_the_commit_writes_nothing_and_the_retry_writes_once() {
    let shop = Shop::new("atomic-crash").await;
    shop.seed("cart#o-2", &[("items", n(1))]).await;
    let idempotency = shop.idempotency();
    let runs = Counter::default();
    let place = idempotency.function("place", |order: Value| {
        runs.hit();
        let staged = shop.stage_order(&order);
        async move {
            staged?;
            Ok::<_, Failure>(json!({ "placed": order["order_id"] }))
        }
    });

    shop.faults.before.store(1, Ordering::SeqCst);
    // A short deadline: the retry takes the reservation over once it passes.
    let crashed = place
        .call(json!({ "order_id": "o-2" }), Some(&context(1_500)))
        .await;
    assert!(
        matches!(crashed, Err(Error::Idempotency(IdempotencyError::Store(_)))),
        "{crashed:?}"
    );
    assert!(shop.item("order#o-2").await.is_none(), "no business write");
    assert_eq!(shop.number("stock#s-1", "available").await, Some(10));
    assert!(shop.item("cart#o-2").await.is_some());
    assert_eq!(
        shop.records().await,
        [(shop.key("o-2"), "INPROGRESS".to_owned())],
        "the record stays for a takeover"
    );

    let retried = poll(
        || async {
            let ctx = context(60_000);
            place.call(json!({ "order_id": "o-2" }), Some(&ctx)).await
        },
        in_progress,
    )
    .await
    .expect("the retry after the deadline");
    assert_eq!(retried, json!({ "placed": "o-2" }));
    assert_eq!(runs.get(), 2);
    assert_eq!(shop.number("stock#s-1", "available").await, Some(9));
    assert_eq!(shop.number("stock#s-1", "writes").await, Some(1));
    assert!(shop.item("order#o-2").await.is_some());
    assert!(shop.item("cart#o-2").await.is_none());
    assert_eq!(
        shop.records().await,
        [(shop.key("o-2"), "COMPLETED".to_owned())]
    );
}

#[tokio::test]
async fn a_retry_after_a_commit_whose_response_was_lost_replays_without_writing() {
    let shop = Shop::new("atomic-lost").await;
    let idempotency = shop.idempotency();
    let runs = Counter::default();
    let place = idempotency.function("place", |order: Value| {
        runs.hit();
        let staged = shop.stage_order(&order);
        async move {
            staged?;
            Ok::<_, Failure>(json!({ "placed": order["order_id"] }))
        }
    });

    shop.faults.after.store(1, Ordering::SeqCst);
    let lost = place.call(json!({ "order_id": "o-3" }), None).await;
    assert!(lost.is_err(), "the commit's response was lost: {lost:?}");
    assert_eq!(
        shop.number("stock#s-1", "writes").await,
        Some(1),
        "applied once"
    );
    shop.requests.take();

    let replay = place
        .call(json!({ "order_id": "o-3" }), None)
        .await
        .expect("replay");
    assert_eq!(replay, json!({ "placed": "o-3" }));
    assert_eq!(shop.requests.take(), ["PutItem"]);
    assert_eq!(runs.get(), 1);
    assert_eq!(shop.number("stock#s-1", "available").await, Some(9));
    assert_eq!(shop.number("stock#s-1", "writes").await, Some(1));
}

#[tokio::test]
async fn a_failing_user_condition_names_the_item_releases_the_key_and_writes_nothing() {
    let shop = Shop::new("atomic-condition").await;
    shop.seed("cart#o-4", &[("items", n(1))]).await;
    let idempotency = shop.idempotency();
    let runs = Counter::default();
    let place = idempotency.function("place", |order: Value| {
        runs.hit();
        let staged = shop.stage_order(&order);
        async move {
            staged?;
            Ok::<_, Failure>(json!({ "placed": order["order_id"] }))
        }
    });
    shop.requests.take();

    let event = json!({ "order_id": "o-4", "sku": "s-out" });
    for attempt in 1..=2 {
        let failed = place
            .call(event.clone(), None)
            .await
            .expect_err("out of stock");
        let err = idempotency_error(&failed);
        assert_eq!(err.error_type(), "IdempotencyWriteConditionError");
        match err {
            IdempotencyError::WriteConditionFailed {
                key,
                table,
                item,
                index,
            } => {
                assert_eq!(key, &shop.key("o-4"));
                assert_eq!(table, &shop.business);
                assert_eq!(item, r#"{pk: "stock#s-out"}"#);
                assert_eq!(*index, 1, "the stock update");
            }
            other => panic!("{other:?}"),
        }
        // Reserve, the cancelled transaction, the release: the retry runs again.
        assert_eq!(
            shop.requests.take(),
            ["PutItem", "TransactWriteItems", "DeleteItem"]
        );
        assert_eq!(runs.get(), attempt);
        assert!(
            shop.records().await.is_empty(),
            "the reservation was released"
        );
    }
    assert!(shop.item("order#o-4").await.is_none(), "nothing written");
    assert!(shop.item("cart#o-4").await.is_some());
    assert_eq!(shop.number("stock#s-out", "available").await, Some(0));
    assert_eq!(shop.number("stock#s-out", "writes").await, Some(0));
}

#[tokio::test]
async fn transactions_over_the_limits_are_refused_before_any_write() {
    let shop = Shop::new("atomic-limits").await;
    let idempotency = shop.idempotency();
    let business = shop.business.clone();
    let stage = idempotency.function("stage", move |event: Value| {
        let business = business.clone();
        async move {
            let effects = effects()?;
            let writes = effects.writes();
            let count = event["count"].as_u64().unwrap_or_default() as usize;
            let bytes = event["bytes"].as_u64().unwrap_or_default() as usize;
            for i in 0..count {
                writes.put(
                    Put::builder()
                        .table_name(&business)
                        .item("pk", s(&format!("bulk#{i}")))
                        .item("blob", s(&"x".repeat(bytes)))
                        .build()
                        .map_err(Error::Handler)?,
                );
            }
            Ok::<_, Failure>(json!({ "staged": count }))
        }
    });
    shop.requests.take();

    // 100 writes and the record: 101 items. 11 writes of 390 KB: over 4 MB.
    for (event, limit, items) in [
        (
            json!({"order_id": "many", "count": 100, "bytes": 1}),
            "100 items per transaction",
            101,
        ),
        (
            json!({"order_id": "big", "count": 11, "bytes": 390_000}),
            "4 MB per transaction",
            12,
        ),
    ] {
        let refused = stage.call(event, None).await.expect_err("too large");
        let err = idempotency_error(&refused);
        assert_eq!(err.error_type(), "IdempotencyTransactionTooLargeError");
        match err {
            IdempotencyError::TransactionTooLarge {
                items: got,
                limit: got_limit,
                ..
            } => assert_eq!((*got, *got_limit), (items, limit)),
            other => panic!("{other:?}"),
        }
        // No transaction sent; the reservation released.
        assert_eq!(shop.requests.take(), ["PutItem", "DeleteItem"]);
        assert!(shop.records().await.is_empty());
    }
    assert!(shop.item("bulk#0").await.is_none());
}

#[tokio::test]
async fn staged_writes_on_a_store_without_transactions_are_unsupported_and_write_nothing() {
    let shop = Shop::new("atomic-unsupported").await;
    shop.seed("cart#o-5", &[("items", n(1))]).await;
    // The store offers records, a journal and an outbox, no transactions.
    let store = FaultStore::new(DynamoDbStore::new(shop.store_client.clone(), &shop.records));
    assert!(store.transactions().is_none());
    let idempotency = Idempotency::new(store, config());
    let runs = Counter::default();
    let place = idempotency.function("place", |order: Value| {
        runs.hit();
        let staged = shop.stage_order(&order);
        async move {
            staged?;
            Ok::<_, Failure>(json!({ "placed": order["order_id"] }))
        }
    });
    shop.requests.take();

    let refused = place
        .call(json!({ "order_id": "o-5" }), None)
        .await
        .expect_err("unsupported");
    assert!(
        matches!(
            idempotency_error(&refused),
            IdempotencyError::Unsupported {
                missing: "transactions"
            }
        ),
        "{refused:?}"
    );
    assert_eq!(runs.get(), 1);
    assert_eq!(shop.requests.take(), ["PutItem", "DeleteItem"]);
    assert!(shop.records().await.is_empty(), "the key was released");
    assert!(shop.item("order#o-5").await.is_none());
    assert!(shop.item("cart#o-5").await.is_some());
    assert_eq!(shop.number("stock#s-1", "available").await, Some(10));
}

/// A versioned event: entity `e`, absolute state at `version`.
fn versioned(table: &str, entity: &str, version: u64) -> VersionedWrite {
    VersionedWrite::update(table, version)
        .key("pk", s(entity))
        .set("state", s(&format!("state at v{version}")))
        .add("writes", n(1))
}

const DELIVERIES: [(&str, [u64; 3], u64, i64); 3] = [
    ("in-order", [1, 2, 3], 3, 3),
    ("duplicate", [1, 2, 2], 2, 2),
    ("out-of-order", [1, 3, 2], 3, 2),
];

#[tokio::test]
async fn standalone_versioned_writes_leave_the_highest_version_written_once_each() {
    let shop = Shop::new("versioned-alone").await;
    let (recorded, requests) = recorded_client();
    for (name, versions, highest, writes) in DELIVERIES {
        let entity = format!("entity#{name}");
        let mut outcomes = Vec::new();
        for version in versions {
            outcomes.push(
                versioned(&shop.business, &entity, version)
                    .write(&recorded)
                    .await
                    .expect("versioned write"),
            );
        }
        let expected: Vec<Versioned> = versions
            .iter()
            .scan(0, |seen, &v| {
                let newer = v > *seen;
                *seen = (*seen).max(v);
                Some(if newer {
                    Versioned::Written
                } else {
                    Versioned::AlreadyCurrent
                })
            })
            .collect();
        assert_eq!(outcomes, expected, "{name}");
        // One UpdateItem per delivery, written or already current.
        assert_eq!(requests.take(), ["UpdateItem"; 3], "{name}");
        assert_eq!(shop.number(&entity, "version").await, Some(highest as i64));
        assert_eq!(shop.number(&entity, "writes").await, Some(writes), "{name}");
        let state = shop
            .item(&entity)
            .await
            .and_then(|i| i.get("state").cloned());
        assert_eq!(state, Some(s(&format!("state at v{highest}"))), "{name}");
    }

    // A put: the whole item, at its version.
    let put = |version: u64| {
        VersionedWrite::put(
            shop.business.clone(),
            HashMap::from([("pk".to_owned(), s("entity#put"))]),
            version,
        )
        .set("state", s(&format!("v{version}")))
    };
    assert_eq!(
        put(2).write(&recorded).await.expect("put"),
        Versioned::Written
    );
    assert_eq!(
        put(1).write(&recorded).await.expect("put"),
        Versioned::AlreadyCurrent
    );
    assert_eq!(requests.take(), ["PutItem", "PutItem"]);
    assert_eq!(shop.number("entity#put", "version").await, Some(2));
    let state = shop
        .item("entity#put")
        .await
        .and_then(|i| i.get("state").cloned());
    assert_eq!(state, Some(s("v2")));
}

#[tokio::test]
async fn staged_versioned_writes_commit_with_the_record_and_skip_when_already_current() {
    let shop = Shop::new("versioned-staged").await;
    let idempotency = shop.idempotency();
    let runs = Counter::default();
    let business = shop.business.clone();
    // Each delivery has its own id (the idempotency key): a redelivered version
    // under a new id is the versioned write's to absorb.
    let apply = idempotency.function("apply", |event: Value| {
        runs.hit();
        let business = business.clone();
        async move {
            let entity = event["entity"].as_str().unwrap_or_default().to_owned();
            let version = event["version"].as_u64().unwrap_or_default();
            effects()?
                .writes()
                .versioned(versioned(&business, &entity, version));
            Ok::<_, Failure>(json!({ "applied": version }))
        }
    });
    shop.requests.take();

    for (name, versions, highest, writes) in DELIVERIES {
        let entity = format!("entity#{name}");
        let mut seen = 0;
        for (i, version) in versions.into_iter().enumerate() {
            let event =
                json!({ "order_id": format!("{name}-{i}"), "entity": entity, "version": version });
            let response = apply.call(event, None).await.expect("applied");
            assert_eq!(response, json!({ "applied": version }));
            let expected: &[&str] = if version > seen {
                &["PutItem", "TransactWriteItems"]
            } else {
                // Already current: the transaction is cancelled, then the record
                // alone completes (a PutItem, as nothing else was staged).
                &["PutItem", "TransactWriteItems", "PutItem"]
            };
            assert_eq!(shop.requests.take(), expected, "{name} v{version}");
            seen = seen.max(version);
        }
        assert_eq!(shop.number(&entity, "version").await, Some(highest as i64));
        assert_eq!(shop.number(&entity, "writes").await, Some(writes), "{name}");
    }
    assert_eq!(runs.get(), 9);
    let completed = shop
        .records()
        .await
        .into_iter()
        .filter(|(_, status)| status == "COMPLETED")
        .count();
    assert_eq!(completed, 9, "every delivery completed");

    // The same delivery again: a replay, one request, no write.
    let event = json!({ "order_id": "in-order-2", "entity": "entity#in-order", "version": 3 });
    assert_eq!(
        apply.call(event, None).await.expect("replay"),
        json!({ "applied": 3 })
    );
    assert_eq!(shop.requests.take(), ["PutItem"]);
    assert_eq!(runs.get(), 9);
    assert_eq!(shop.number("entity#in-order", "writes").await, Some(3));
}

#[tokio::test]
async fn an_already_current_versioned_write_leaves_the_other_staged_writes_to_commit() {
    let shop = Shop::new("versioned-mixed").await;
    shop.seed("entity#m", &[("version", n(5)), ("writes", n(1))])
        .await;
    let idempotency = shop.idempotency();
    let business = shop.business.clone();
    let apply = idempotency.function("apply", |event: Value| {
        let business = business.clone();
        async move {
            let effects = effects()?;
            let writes = effects.writes();
            writes.versioned(versioned(&business, "entity#m", 4));
            writes.put(
                Put::builder()
                    .table_name(&business)
                    .item("pk", s("audit#m-4"))
                    .build()
                    .map_err(Error::Handler)?,
            );
            Ok::<_, Failure>(json!({ "id": event["order_id"] }))
        }
    });
    shop.requests.take();
    apply
        .call(json!({ "order_id": "m-4" }), None)
        .await
        .expect("applied");
    // The cancelled transaction, then the record and the audit put without the
    // versioned write.
    assert_eq!(
        shop.requests.take(),
        ["PutItem", "TransactWriteItems", "TransactWriteItems"]
    );
    assert!(shop.item("audit#m-4").await.is_some());
    assert_eq!(shop.number("entity#m", "version").await, Some(5));
    assert_eq!(shop.number("entity#m", "writes").await, Some(1));
}

#[tokio::test]
async fn unprotected_calls_commit_their_staged_writes_alone() {
    let shop = Shop::new("atomic-unprotected").await;
    shop.seed("cart#o-6", &[("items", n(1))]).await;
    let disabled = IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("atomic")
        .disabled(true)
        .build()
        .expect("config");
    let idempotency = Idempotency::new(
        DynamoDbStore::new(shop.store_client.clone(), &shop.records),
        disabled,
    );
    let place = idempotency.function("place", |order: Value| {
        let staged = shop.stage_order(&order);
        async move {
            staged?;
            Ok::<_, Failure>(json!({ "placed": order["order_id"] }))
        }
    });
    shop.requests.take();
    place
        .call(json!({ "order_id": "o-6" }), None)
        .await
        .expect("unprotected");
    assert_eq!(shop.requests.take(), ["TransactWriteItems"]);
    assert!(shop.records().await.is_empty());
    assert!(shop.item("order#o-6").await.is_some());
    assert_eq!(shop.number("stock#s-1", "available").await, Some(9));
    // Unprotected, a second call runs again: its order put's condition fails.
    let again = place
        .call(json!({ "order_id": "o-6" }), None)
        .await
        .expect_err("the order exists");
    assert!(
        matches!(
            idempotency_error(&again),
            IdempotencyError::WriteConditionFailed { index: 0, .. }
        ),
        "{again:?}"
    );
    assert_eq!(shop.number("stock#s-1", "available").await, Some(9));
}

#[tokio::test]
async fn the_same_commit_sent_twice_applies_the_writes_once() {
    use lambda_idempotency::{IdempotencyRecord, Status};
    // What an SDK retry of a commit whose response was lost does: DynamoDB sees
    // the same ClientRequestToken and does not apply the writes again.
    let shop = Shop::new("atomic-token").await;
    let store = DynamoDbStore::new(client(), &shop.records);
    let now = support::now_ms();
    let record = IdempotencyRecord {
        key: "atomic#token".into(),
        status: Status::InProgress,
        expiration: now / 1000 + 3600,
        in_progress_expiration: Some(now + 60_000),
        data: None,
        validation: None,
        // Unique, as every reservation's owner is: DynamoDB remembers a
        // token (derived from the owner) for 10 minutes, across tables.
        execution: format!("e-{now}"),
        owner: format!("e-{now}"),
        is_error: false,
    };
    store.reserve(&record, now).await.expect("reserve");
    let completed = IdempotencyRecord {
        status: Status::Completed,
        data: Some("{}".into()),
        ..record
    };
    let decrement = Update::builder()
        .table_name(&shop.business)
        .key("pk", s("stock#s-1"))
        .update_expression("ADD available :minus_one, writes :one")
        .expression_attribute_values(":minus_one", n(-1))
        .expression_attribute_values(":one", n(1))
        .build()
        .expect("update");
    let writes = [aws_sdk_dynamodb::types::TransactWriteItem::builder()
        .update(decrement)
        .build()];
    let transactions = store
        .transactions()
        .expect("DynamoDbStore offers transactions");
    for _ in 0..2 {
        transactions
            .commit_transaction(&completed, &[], &writes)
            .await
            .expect("commit");
    }
    assert_eq!(shop.number("stock#s-1", "writes").await, Some(1));
    assert_eq!(shop.number("stock#s-1", "available").await, Some(9));
}

#[tokio::test]
async fn observe_only_still_fails_a_call_whose_staged_writes_were_refused() {
    let shop = Shop::new("atomic-observe").await;
    let observing = IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("atomic")
        .observe_only(true)
        .build()
        .expect("config");
    let idempotency = Idempotency::new(
        DynamoDbStore::new(shop.store_client.clone(), &shop.records),
        observing,
    );
    let place = idempotency.function("place", |order: Value| {
        let staged = shop.stage_order(&order);
        async move {
            staged?;
            Ok::<_, Failure>(json!({ "placed": order["order_id"] }))
        }
    });
    // Out of stock: the response would claim an order that was not written.
    let failed = place
        .call(json!({ "order_id": "o-7", "sku": "s-out" }), None)
        .await
        .expect_err("the writes were refused");
    assert!(
        matches!(
            idempotency_error(&failed),
            IdempotencyError::WriteConditionFailed { index: 1, .. }
        ),
        "{failed:?}"
    );
    assert!(shop.item("order#o-7").await.is_none());
    assert!(shop.records().await.is_empty());
}
