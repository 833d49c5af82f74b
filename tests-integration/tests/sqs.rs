//! SQS batches against real SQS and DynamoDB on LocalStack: duplicate sends,
//! redelivery after a crash and after failures, and FIFO group order.

mod support;

use aws_lambda_events::event::sqs::SqsMessage;
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use lambda_idempotency::{DynamoDbStore, Idempotency, IdempotencyConfig, SqsBatch};
use lambda_runtime::LambdaEvent;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::context;
use support::events::{sqs, sqs_event};
use support::localstack::{client, default_table, table_name};

struct Queue {
    url: String,
    arn: String,
}

async fn create_queue(name: &str, fifo: bool) -> Queue {
    let sqs = sqs();
    let mut request = sqs
        .create_queue()
        .queue_name(if fifo {
            format!("{name}.fifo")
        } else {
            name.to_owned()
        })
        .attributes(QueueAttributeName::VisibilityTimeout, "2");
    if fifo {
        request = request.attributes(QueueAttributeName::FifoQueue, "true");
    }
    let url = request
        .send()
        .await
        .expect("create queue")
        .queue_url()
        .expect("queue url")
        .to_owned();
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("queue attributes");
    let arn = attributes
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .expect("arn")
        .clone();
    Queue { url, arn }
}

async fn receive(queue: &Queue) -> Vec<Message> {
    let output = sqs()
        .receive_message()
        .queue_url(&queue.url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .expect("receive");
    output.messages().to_vec()
}

async fn is_drained(queue: &Queue) -> bool {
    let output = sqs()
        .get_queue_attributes()
        .queue_url(&queue.url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("queue attributes");
    let attributes = output.attributes().expect("attributes");
    attributes.values().all(|v| v == "0")
}

/// What the event source mapping does after the function returns: deletes every
/// message not reported as failed.
async fn delete_succeeded(queue: &Queue, messages: &[Message], failed: &BTreeSet<String>) {
    for message in messages
        .iter()
        .filter(|m| !failed.contains(m.message_id().unwrap_or_default()))
    {
        let handle = message.receipt_handle().expect("receipt handle");
        sqs()
            .delete_message()
            .queue_url(&queue.url)
            .receipt_handle(handle)
            .send()
            .await
            .expect("delete");
    }
}

fn order_of(message: &SqsMessage) -> String {
    let body: Value =
        serde_json::from_str(message.body.as_deref().unwrap_or("{}")).unwrap_or_default();
    body["order_id"].as_str().unwrap_or_default().to_owned()
}

/// Side effects counted per order, and the handler failures of the current batch.
#[derive(Clone, Default)]
struct Ledger {
    effects: Arc<Mutex<Vec<String>>>,
    fail_once: Arc<Mutex<HashSet<String>>>,
    failed_now: Arc<Mutex<BTreeSet<String>>>,
}

impl Ledger {
    fn batch(
        &self,
        idempotency: &Idempotency<DynamoDbStore>,
    ) -> SqsBatch<impl Fn(SqsMessage) -> std::future::Ready<Result<Value, String>>, DynamoDbStore>
    {
        let ledger = self.clone();
        idempotency.sqs_batch("ship", move |message: SqsMessage| {
            let order = order_of(&message);
            if ledger.fail_once.lock().expect("lock").remove(&order) {
                ledger
                    .failed_now
                    .lock()
                    .expect("lock")
                    .insert(message.message_id.clone().unwrap_or_default());
                return std::future::ready(Err(format!("transient failure shipping {order}")));
            }
            ledger.effects.lock().expect("lock").push(order.clone());
            std::future::ready(Ok(json!({ "shipped": order })))
        })
    }

    /// Lambda's part of one invocation: the event from the received messages in,
    /// the reported failures out, with the handler's own failures of this batch.
    async fn run<F>(
        &self,
        batch: &SqsBatch<F, DynamoDbStore>,
        queue: &Queue,
        messages: &[Message],
    ) -> (BTreeSet<String>, BTreeSet<String>)
    where
        F: Fn(SqsMessage) -> std::future::Ready<Result<Value, String>>,
    {
        self.failed_now.lock().expect("lock").clear();
        let event = LambdaEvent::new(sqs_event(&queue.arn, messages), context(60_000));
        let response = batch.process(event).await.expect("batch processed");
        let reported = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect();
        (reported, self.failed_now.lock().expect("lock").clone())
    }

    fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for order in self.effects.lock().expect("lock").iter() {
            *counts.entry(order.clone()).or_default() += 1;
        }
        counts
    }
}

fn idempotency(table: &str) -> Idempotency<DynamoDbStore> {
    let config = IdempotencyConfig::builder()
        .key_expression("powertools_json(body).order_id")
        .strict(true)
        .build()
        .expect("config");
    Idempotency::new(DynamoDbStore::new(client(), table), config)
}

#[tokio::test]
async fn duplicate_sends_crashes_and_failures_give_one_effect_per_order() {
    const ORDERS: usize = 20;
    let table = default_table("sqs").await;
    let queue = create_queue(&table_name("orders"), false).await;
    let ledger = Ledger::default();
    ledger
        .fail_once
        .lock()
        .expect("lock")
        .extend(["o-3".to_owned(), "o-11".to_owned()]);
    let idempotency = idempotency(&table);
    let batch = ledger.batch(&idempotency);

    // 20 orders, 5 of them sent twice (a producer retrying its send).
    let bodies: Vec<String> = (0..ORDERS)
        .chain(0..5)
        .map(|i| json!({ "order_id": format!("o-{i}"), "qty": 1 }).to_string())
        .collect();
    for body in &bodies {
        sqs()
            .send_message()
            .queue_url(&queue.url)
            .message_body(body)
            .send()
            .await
            .expect("send");
    }

    let (mut batches, mut received, mut redelivered, mut reported_total) = (0, 0, 0, 0);
    let mut crashed = false;
    let started = Instant::now();
    while !(ledger.counts().len() == ORDERS && is_drained(&queue).await) {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "queue not drained: {:?}",
            ledger.counts()
        );
        let messages = receive(&queue).await;
        if messages.is_empty() {
            continue;
        }
        batches += 1;
        received += messages.len();
        redelivered += messages
            .iter()
            .filter(|m| {
                m.attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .is_some_and(|n| n != "1")
            })
            .count();
        let (reported, failed_now) = ledger.run(&batch, &queue, &messages).await;
        assert_eq!(reported, failed_now, "reported exactly the failed messages");
        reported_total += reported.len();

        if !crashed {
            // The first invocation crashes after its handlers ran: nothing is deleted,
            // and the whole batch comes back after the visibility timeout.
            crashed = true;
            continue;
        }
        delete_succeeded(&queue, &messages, &reported).await;
    }

    let counts = ledger.counts();
    assert_eq!(counts.len(), ORDERS);
    assert!(
        counts.values().all(|&n| n == 1),
        "one effect per order: {counts:?}"
    );
    assert_eq!(reported_total, 2, "o-3 and o-11 failed once each");
    assert!(
        redelivered >= 2,
        "the crashed batch and the failures were redelivered"
    );
    println!(
        "sqs: {} messages sent ({ORDERS} orders, 5 duplicate sends), {batches} batches, {received} received, \
         {redelivered} redeliveries, {reported_total} reported failures, {} effects",
        bodies.len(),
        counts.values().sum::<usize>()
    );
}

#[tokio::test]
async fn a_failed_fifo_message_holds_back_the_rest_of_its_group() {
    let table = default_table("fifo").await;
    let queue = create_queue(&table_name("fifo"), true).await;
    let ledger = Ledger::default();
    ledger
        .fail_once
        .lock()
        .expect("lock")
        .insert("a2".to_owned());
    let idempotency = idempotency(&table);
    let batch = ledger.batch(&idempotency);

    for (group, order) in [
        ("a", "a1"),
        ("b", "b1"),
        ("a", "a2"),
        ("b", "b2"),
        ("a", "a3"),
        ("b", "b3"),
    ] {
        sqs()
            .send_message()
            .queue_url(&queue.url)
            .message_group_id(group)
            .message_deduplication_id(order)
            .message_body(json!({ "order_id": order }).to_string())
            .send()
            .await
            .expect("send");
    }

    let mut skipped = 0;
    let started = Instant::now();
    while !(ledger.counts().len() == 6 && is_drained(&queue).await) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "queue not drained: {:?}",
            ledger.counts()
        );
        let messages = receive(&queue).await;
        if messages.is_empty() {
            continue;
        }
        let before = ledger.effects.lock().expect("lock").len();
        let (reported, failed_now) = ledger.run(&batch, &queue, &messages).await;
        assert!(reported.is_superset(&failed_now));
        // Everything else reported was held back, unrun: it comes after a failure in its group.
        skipped += reported.len() - failed_now.len();
        let ran = ledger.effects.lock().expect("lock").len() - before;
        assert_eq!(
            ran + reported.len(),
            messages.len(),
            "every message ran or was reported"
        );
        delete_succeeded(&queue, &messages, &reported).await;
    }

    let effects = ledger.effects.lock().expect("lock").clone();
    let group = |prefix: &str| {
        effects
            .iter()
            .filter(|o| o.starts_with(prefix))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        group("a"),
        ["a1", "a2", "a3"],
        "group a in order, each once"
    );
    assert_eq!(
        group("b"),
        ["b1", "b2", "b3"],
        "group b unaffected by a's failure"
    );
    assert!(skipped >= 1, "a3 was held back behind a2 in the same batch");
}
