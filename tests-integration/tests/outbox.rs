//! Steps with derived keys and the outbox, against DynamoDB, SQS and DynamoDB
//! Streams on LocalStack and a payments API on a local port.

mod support;

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use lambda_idempotency::{
    effects, Dispatcher, DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyError,
    OutboxMessage,
};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use support::events::{dynamodb_event, sqs, Stream};
use support::http1::post;
use support::localstack::{client, default_table, recorded_client, table_name, Requests};
use support::payments::Payments;
use support::{context, in_progress, poll, Audit, Counter};
use tokio::sync::Notify;

type Failure = Error<std::io::Error>;

fn config() -> IdempotencyConfig {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix("shop")
        .build()
        .expect("config")
}

async fn recorded(test: &str) -> (Idempotency<DynamoDbStore>, Requests, String) {
    let table = default_table(test).await;
    let (client, requests) = recorded_client();
    (
        Idempotency::new(DynamoDbStore::new(client, &table), config()),
        requests,
        table,
    )
}

async fn statuses(table: &str) -> Vec<(String, String)> {
    let items = client()
        .scan()
        .table_name(table)
        .consistent_read(true)
        .send()
        .await
        .expect("scan");
    let mut statuses: Vec<_> = items
        .items()
        .iter()
        .map(|item| {
            let s = |name: &str| {
                item.get(name)
                    .and_then(|v| v.as_s().ok())
                    .cloned()
                    .unwrap_or_default()
            };
            (s("id"), s("status"))
        })
        .collect();
    statuses.sort();
    statuses
}

/// The handler of the crash tests: charges through a step, then (first attempt
/// only) stops at `crash_at` until its task is aborted.
#[derive(Clone, Default)]
struct Crash {
    after_charge_sent: bool,
    after_journal: bool,
}

#[tokio::test]
async fn a_retry_after_a_crash_replays_the_journaled_charge_or_reissues_it_with_the_same_key() {
    let payments = Payments::start().await;
    for crash in [
        Crash {
            after_journal: true,
            ..Crash::default()
        },
        Crash {
            after_charge_sent: true,
            ..Crash::default()
        },
    ] {
        let (idempotency, requests, _) = recorded(&format!("crash-{}", crash.after_journal)).await;
        let attempts = Counter::default();
        let entered = Arc::new(Notify::new());
        let place_order = {
            let (attempts, entered, payments, crash) = (
                attempts.clone(),
                entered.clone(),
                payments.clone(),
                crash.clone(),
            );
            Arc::new(idempotency.function("place_order", move |order: Value| {
                let attempt = attempts.hit();
                let (entered, payments, crash) = (entered.clone(), payments.clone(), crash.clone());
                async move {
                    let effects = effects()?;
                    let charge = effects
                        .step("charge", |key| async move {
                            let charge = post(payments.addr, "/charges", &key, &order).await?;
                            if attempt == 1 && crash.after_charge_sent {
                                std::future::pending::<()>().await; // dies before journaling
                            }
                            Ok::<_, std::io::Error>(json!({ "charge": charge, "key": key }))
                        })
                        .await?;
                    if attempt == 1 && crash.after_journal {
                        entered.notify_one();
                        std::future::pending::<()>().await; // dies after journaling
                    }
                    Ok::<_, Failure>(charge)
                }
            }))
        };

        // Attempt 1 times out (its deadline has passed) and its process dies.
        let order = json!({ "order_id": format!("o-{}", crash.after_journal), "amount": 25 });
        let first = tokio::spawn({
            let (place_order, order) = (place_order.clone(), order.clone());
            async move { place_order.call(order, Some(&context(300))).await }
        });
        if crash.after_journal {
            entered.notified().await;
        } else {
            payments.wait_for_requests(payments.requests() + 1).await;
        }
        first.abort();
        assert!(first.await.expect_err("crashed").is_cancelled());
        let before_retry = requests.take();

        // Refused while the crashed attempt's deadline holds, then it resumes.
        let fresh = context(60_000);
        let retried = poll(
            || place_order.call(order.clone(), Some(&fresh)),
            in_progress,
        )
        .await
        .expect("retry completes");
        let key = retried["key"].as_str().expect("derived key").to_owned();
        let mut retry_requests = requests.take();
        // Drop the refusals while the reservation was still valid.
        let resumed_at = retry_requests.len() - if crash.after_journal { 4 } else { 5 };
        let refusals: Vec<_> = retry_requests.drain(..resumed_at).collect();
        assert!(refusals.iter().all(|r| r == "PutItem"), "{refusals:?}");
        if crash.after_journal {
            assert_eq!(
                payments.requests_with_key(&key),
                1,
                "the journaled charge was not sent again"
            );
            assert_eq!(
                before_retry,
                ["PutItem", "PutItem"],
                "reserve, journal the step"
            );
            assert_eq!(
                retry_requests,
                ["PutItem", "PutItem", "GetItem", "PutItem"],
                "refused (another execution id), resume the execution, read the journal, complete"
            );
        } else {
            assert_eq!(
                payments.requests_with_key(&key),
                2,
                "re-issued with the same derived key"
            );
            assert_eq!(
                before_retry,
                ["PutItem"],
                "reserve; the step never finished"
            );
            assert_eq!(
                retry_requests,
                ["PutItem", "PutItem", "GetItem", "PutItem", "PutItem"],
                "refused, resume, journal miss, journal, complete"
            );
        }
    }
    assert_eq!(payments.charges(), 2, "one charge per order");
}

#[tokio::test]
async fn steps_called_in_another_order_on_a_retry_are_non_deterministic() {
    let (idempotency, _, _) = recorded("nondeterministic").await;
    let attempts = Counter::default();
    let handler = {
        let attempts = attempts.clone();
        idempotency.function("fulfil", move |_: Value| {
            let attempt = attempts.hit();
            async move {
                let effects = effects()?;
                let order = if attempt == 1 {
                    ["reserve_stock", "charge"]
                } else {
                    ["charge", "reserve_stock"]
                };
                effects
                    .step(order[0], |key| async move { Ok::<_, std::io::Error>(key) })
                    .await?;
                if attempt == 1 {
                    return Err(Error::Handler(std::io::Error::other("warehouse timeout")));
                }
                effects
                    .step(order[1], |key| async move { Ok::<_, std::io::Error>(key) })
                    .await?;
                Ok::<_, Failure>(json!("done"))
            }
        })
    };
    let event = json!({ "order_id": "n-1" });
    assert!(matches!(
        handler.call(event.clone(), None).await,
        Err(Error::Handler(Error::Handler(_)))
    ));
    match handler.call(event, None).await {
        Err(Error::Idempotency(IdempotencyError::NonDeterministic {
            position,
            journaled,
            called,
            ..
        })) => {
            assert_eq!(
                (position, journaled.as_str(), called.as_str()),
                (0, "reserve_stock", "charge")
            );
        }
        other => panic!("expected NonDeterministic, got {other:?}"),
    }
}

async fn fifo_queue(name: &str) -> String {
    sqs()
        .create_queue()
        .queue_name(format!("{name}.fifo"))
        .attributes(QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .expect("create queue")
        .queue_url()
        .expect("url")
        .to_owned()
}

/// Receives until the queue has nothing more: (body, idempotency-key attribute).
async fn drain(queue_url: &str) -> Vec<(String, String)> {
    let mut received = Vec::new();
    loop {
        let output = sqs()
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .expect("receive");
        if output.messages().is_empty() {
            return received;
        }
        for message in output.messages() {
            let key = message
                .message_attributes()
                .and_then(|a| a.get("idempotency-key"))
                .and_then(|v| v.string_value())
                .unwrap_or_default();
            received.push((
                message.body().unwrap_or_default().to_owned(),
                key.to_owned(),
            ));
            let handle = message.receipt_handle().expect("receipt handle");
            sqs()
                .delete_message()
                .queue_url(queue_url)
                .receipt_handle(handle)
                .send()
                .await
                .expect("delete");
        }
    }
}

/// A handler that places an order: publishes OrderPlaced and ShipmentRequested
/// to SQS and notifies a webhook, all through the outbox.
fn order_handler(
    idempotency: &Idempotency<DynamoDbStore>,
    queue_url: &str,
    webhook: &str,
    keys: &Arc<Mutex<Vec<String>>>,
) -> lambda_idempotency::IdempotentFunction<
    impl Fn(Value) -> std::future::Ready<Result<Value, Failure>>,
    DynamoDbStore,
> {
    let (queue_url, webhook, keys) = (queue_url.to_owned(), webhook.to_owned(), keys.clone());
    idempotency.function("place_order", move |order: Value| {
        let outbox = effects().map(|effects| {
            let outbox = effects.outbox();
            let mut staged = keys.lock().expect("lock");
            for event in ["OrderPlaced", "ShipmentRequested"] {
                let body = json!({ "event": event, "order": order["order_id"] }).to_string();
                staged.push(outbox.push(OutboxMessage::Sqs {
                    queue_url: queue_url.clone(),
                    body,
                    group_id: None,
                }));
            }
            let body = json!({ "order": order["order_id"] }).to_string();
            staged.push(outbox.push(OutboxMessage::Http {
                url: webhook.clone(),
                body,
                headers: Vec::new(),
            }));
        });
        std::future::ready(
            outbox
                .map(|()| json!({ "placed": order["order_id"] }))
                .map_err(Error::from),
        )
    })
}

#[tokio::test]
async fn outbox_messages_commit_with_the_response_and_are_delivered_with_their_derived_keys() {
    let payments = Payments::start().await;
    let (idempotency, requests, table) = recorded("outbox").await;
    let idempotency = idempotency.with_dispatcher(
        Dispatcher::new()
            .with_sqs(sqs())
            .with_http()
            .expect("http client"),
    );
    let queue_url = fifo_queue(&table_name("events")).await;
    let keys = Arc::new(Mutex::new(Vec::new()));
    let handler = order_handler(&idempotency, &queue_url, &payments.url("/webhooks"), &keys);

    let first = handler
        .call(json!({ "order_id": "ob-1" }), None)
        .await
        .expect("placed");
    assert_eq!(
        requests.take(),
        [
            "PutItem",
            "TransactWriteItems",
            "UpdateItem",
            "UpdateItem",
            "UpdateItem"
        ],
        "reserve, commit record + 3 messages in one transaction, mark each delivered"
    );
    let keys = keys.lock().expect("lock").clone();
    assert_eq!(keys.len(), 3);
    assert_eq!(
        keys.iter().collect::<BTreeSet<_>>().len(),
        3,
        "a distinct derived key per message"
    );

    let received = drain(&queue_url).await;
    let bodies: Vec<Value> = received
        .iter()
        .map(|(body, _)| serde_json::from_str(body).expect("json"))
        .collect();
    assert_eq!(
        bodies
            .iter()
            .map(|b| b["event"].as_str().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["OrderPlaced", "ShipmentRequested"]
    );
    assert_eq!(
        received
            .iter()
            .map(|(_, key)| key.clone())
            .collect::<Vec<_>>(),
        keys[..2]
    );
    let webhooks = payments.request_log();
    assert_eq!(webhooks.len(), 1);
    assert_eq!(
        (webhooks[0].0.as_str(), webhooks[0].1.as_str()),
        ("/webhooks", keys[2].as_str())
    );

    let statuses = statuses(&table).await;
    assert_eq!(
        statuses.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(),
        ["COMPLETED", "DELIVERED", "DELIVERED", "DELIVERED"]
    );

    // A replay stages and delivers nothing.
    assert_eq!(
        handler
            .call(json!({ "order_id": "ob-1" }), None)
            .await
            .expect("replay"),
        first
    );
    assert!(drain(&queue_url).await.is_empty());
    assert_eq!(payments.requests(), 1);
}

#[tokio::test]
async fn after_a_crash_between_commit_and_dispatch_the_relay_delivers_each_message_once() {
    let payments = Payments::start().await;
    let stream = Stream::create(&table_name("relay")).await;
    // No dispatcher: the messages are committed and nobody delivers them, as when
    // the process dies right after the commit.
    let idempotency = Idempotency::new(DynamoDbStore::new(client(), &stream.table), config());
    let queue_url = fifo_queue(&table_name("relayed")).await;
    let keys = Arc::new(Mutex::new(Vec::new()));
    let handler = order_handler(&idempotency, &queue_url, &payments.url("/webhooks"), &keys);
    handler
        .call(json!({ "order_id": "rl-1" }), None)
        .await
        .expect("placed");
    assert!(drain(&queue_url).await.is_empty(), "nothing delivered yet");

    let is_outbox_insert = |r: &aws_sdk_dynamodbstreams::types::Record| {
        r.event_name().map(|n| n.as_str()) == Some("INSERT")
            && r.dynamodb()
                .and_then(|d| d.keys())
                .and_then(|k| k.get("id"))
                .and_then(|v| v.as_s().ok())
                .is_some_and(|id| id.contains("#outbox#"))
    };
    let records = stream
        .read_until(|records| records.iter().filter(|r| is_outbox_insert(r)).count() >= 3)
        .await;
    let dispatcher = Dispatcher::new()
        .with_sqs(sqs())
        .with_http()
        .expect("http client");
    let relay = idempotency.relay(dispatcher.clone());
    let response = relay
        .process_dynamodb(lambda_runtime::LambdaEvent::new(
            dynamodb_event(&records),
            context(60_000),
        ))
        .await
        .expect("relay");
    assert!(response.batch_item_failures.is_empty());

    // The stream delivers the same records again: the relay sees them delivered.
    relay
        .process_dynamodb(lambda_runtime::LambdaEvent::new(
            dynamodb_event(&records),
            context(60_000),
        ))
        .await
        .expect("relay again");
    // And a redelivery that gets past that check (marking failed) is dropped by
    // SQS FIFO deduplication on the derived key.
    let keys = keys.lock().expect("lock").clone();
    let body = json!({ "event": "OrderPlaced", "order": "rl-1" }).to_string();
    dispatcher
        .deliver(
            &OutboxMessage::Sqs {
                queue_url: queue_url.clone(),
                body,
                group_id: None,
            },
            &keys[0],
        )
        .await
        .expect("redeliver");

    let received = drain(&queue_url).await;
    assert_eq!(
        received
            .iter()
            .map(|(_, key)| key.clone())
            .collect::<Vec<_>>(),
        keys[..2],
        "each message once"
    );
    assert_eq!(
        payments
            .request_log()
            .iter()
            .map(|r| r.1.clone())
            .collect::<Vec<_>>(),
        keys[2..],
        "the webhook once"
    );
    assert_eq!(
        relay.sweep().await.expect("sweep"),
        lambda_idempotency::SweepReport::default(),
        "nothing left pending"
    );
}

#[tokio::test]
async fn the_sweep_delivers_what_was_committed_but_not_delivered() {
    let payments = Payments::start().await;
    let table = default_table("sweep").await;
    let idempotency = Idempotency::new(DynamoDbStore::new(client(), &table), config());
    let queue_url = fifo_queue(&table_name("swept")).await;
    let keys = Arc::new(Mutex::new(Vec::new()));
    let handler = order_handler(&idempotency, &queue_url, &payments.url("/webhooks"), &keys);
    for order in ["sw-1", "sw-2"] {
        handler
            .call(json!({ "order_id": order }), None)
            .await
            .expect("placed");
    }
    let relay = idempotency.relay(
        Dispatcher::new()
            .with_sqs(sqs())
            .with_http()
            .expect("http client"),
    );
    assert_eq!(
        relay.sweep().await.expect("sweep"),
        lambda_idempotency::SweepReport {
            delivered: 6,
            failed: 0
        }
    );
    assert_eq!(relay.sweep().await.expect("second sweep").delivered, 0);
    assert_eq!(drain(&queue_url).await.len(), 4);
    assert_eq!(payments.requests(), 2);
}

#[tokio::test]
async fn an_outbox_over_the_transaction_limits_is_refused_and_nothing_is_written() {
    let (idempotency, _, table) = recorded("limits").await;
    let runs = Counter::default();
    let handler = {
        let runs = runs.clone();
        idempotency.function("bulk", move |order: Value| {
            runs.hit();
            let result = effects().map(|effects| {
                let (count, size) = (
                    order["count"].as_u64().unwrap_or(0),
                    order["kib"].as_u64().unwrap_or(0),
                );
                for _ in 0..count {
                    let payload = json!("x".repeat(size as usize * 1024));
                    effects.outbox().push(OutboxMessage::Custom {
                        sink: "audit".into(),
                        payload,
                    });
                }
            });
            std::future::ready(
                result
                    .map(|()| json!("staged"))
                    .map_err(Error::<std::io::Error>::from),
            )
        })
    };
    for (order, limit) in [
        (
            json!({ "order_id": "l-1", "count": 100, "kib": 1 }),
            "100 items per transaction",
        ),
        (
            json!({ "order_id": "l-2", "count": 11, "kib": 390 }),
            "4 MB per transaction",
        ),
        (
            json!({ "order_id": "l-3", "count": 1, "kib": 401 }),
            "400 KB per item",
        ),
    ] {
        match handler.call(order, None).await {
            Err(Error::Idempotency(IdempotencyError::OutboxTooLarge { limit: got, .. })) => {
                assert_eq!(got, limit)
            }
            other => panic!("expected OutboxTooLarge ({limit}), got {other:?}"),
        }
    }
    assert_eq!(runs.get(), 3);
    assert!(
        statuses(&table).await.is_empty(),
        "no record, no message: the reservations were released"
    );
    // Within the limits, the same handler commits.
    handler
        .call(json!({ "order_id": "l-4", "count": 99, "kib": 1 }), None)
        .await
        .expect("99 messages fit");
    assert_eq!(statuses(&table).await.len(), 100);
}

#[tokio::test]
async fn effects_outside_an_idempotent_handler_are_a_typed_error() {
    assert!(matches!(effects(), Err(IdempotencyError::NoEffects)));
}

#[tokio::test]
async fn a_custom_sink_gets_messages_after_commit_and_never_those_of_a_failed_handler() {
    let audit = Audit::default();
    let store = lambda_idempotency::MemoryStore::new();
    let idempotency = Idempotency::new(store.clone(), config())
        .with_dispatcher(Dispatcher::new().with_sink("audit", audit.clone()));
    let handler = idempotency.function("audit", |order: Value| async move {
        let key = effects()?.outbox().push(OutboxMessage::Custom {
            sink: "audit".into(),
            payload: order.clone(),
        });
        if order["fail"] == json!(true) {
            return Err(Error::Handler(std::io::Error::other("declined")));
        }
        Ok::<_, Failure>(json!(key))
    });

    let failed = handler
        .call(json!({ "order_id": "a-1", "fail": true }), None)
        .await;
    assert!(matches!(failed, Err(Error::Handler(Error::Handler(_)))));
    assert!(
        audit.0.lock().expect("lock").is_empty(),
        "a failed handler's messages are dropped"
    );

    let key = handler
        .call(json!({ "order_id": "a-2" }), None)
        .await
        .expect("committed");
    handler
        .call(json!({ "order_id": "a-2" }), None)
        .await
        .expect("replayed");
    let delivered = audit.0.lock().expect("lock").clone();
    assert_eq!(
        delivered,
        vec![(
            json!({ "order_id": "a-2" }),
            key.as_str().unwrap_or_default().to_owned()
        )]
    );
    let relay = idempotency.relay(Dispatcher::new().with_sink("audit", audit.clone()));
    assert_eq!(
        relay.sweep().await.expect("sweep").delivered,
        0,
        "marked delivered after dispatch"
    );
}
