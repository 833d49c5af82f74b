//! DynamoDB Streams batches fed with real stream records read from LocalStack.

mod support;

use aws_lambda_events::event::dynamodb::EventRecord;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodbstreams::types::Record;
use lambda_idempotency::{DynamoDbStore, Idempotency, IdempotencyConfig};
use lambda_runtime::LambdaEvent;
use serde_json::json;
use std::sync::{Arc, Mutex};
use support::context;
use support::events::{dynamodb_event, Stream};
use support::localstack::{client, default_table, table_name};

/// A table with a NEW_IMAGE stream and `count` orders written to it; returns the
/// stream's records in shard order, read through the Streams API.
async fn orders_stream(count: usize) -> Vec<Record> {
    let stream = Stream::create(&table_name("orders")).await;
    for i in 0..count {
        client()
            .put_item()
            .table_name(&stream.table)
            .item("id", AttributeValue::S(format!("order-{i}")))
            .item("amount", AttributeValue::N(format!("{}", 10 + i)))
            .send()
            .await
            .expect("put order");
    }
    let records = stream.read_until(|records| records.len() >= count).await;
    assert_eq!(records.len(), count);
    records
}

fn order_id(record: &EventRecord) -> String {
    let image = serde_json::to_value(&record.change.new_image).expect("image");
    image["id"]["S"]
        .as_str()
        .or(image["id"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_re_read_shard_replays_and_a_failure_resumes_at_the_failed_record() {
    let records = orders_stream(5).await;
    let table = default_table("streams").await;
    let idempotency = Idempotency::new(
        DynamoDbStore::new(client(), &table),
        IdempotencyConfig::builder()
            .key_expression("dynamodb.NewImage.id")
            .strict(true)
            .build()
            .expect("config"),
    );
    let effects = Arc::new(Mutex::new(Vec::new()));
    let fail_on = Arc::new(Mutex::new(Some("order-2".to_owned())));
    let batch = {
        let (effects, fail_on) = (effects.clone(), fail_on.clone());
        idempotency.stream_batch("index", move |record: EventRecord| {
            let order = order_id(&record);
            let fail = fail_on
                .lock()
                .expect("lock")
                .take_if(|o| *o == order)
                .is_some();
            if !fail {
                effects.lock().expect("lock").push(order.clone());
            }
            std::future::ready(if fail {
                Err(format!("indexing {order} failed"))
            } else {
                Ok(json!(order))
            })
        })
    };
    let sequence = |r: &Record| {
        r.dynamodb()
            .and_then(|d| d.sequence_number())
            .expect("sequence")
            .to_owned()
    };

    // First read: order-2 fails; it and everything after it are reported.
    let response = batch
        .process_dynamodb(LambdaEvent::new(dynamodb_event(&records), context(60_000)))
        .await
        .expect("batch");
    let reported: Vec<String> = response
        .batch_item_failures
        .iter()
        .filter_map(|f| f.item_identifier.clone())
        .collect();
    assert_eq!(
        reported,
        records[2..].iter().map(sequence).collect::<Vec<_>>()
    );
    assert_eq!(*effects.lock().expect("lock"), ["order-0", "order-1"]);

    // Lambda resumes at the failed record; then the whole shard is read again.
    let response = batch
        .process_dynamodb(LambdaEvent::new(
            dynamodb_event(&records[2..]),
            context(60_000),
        ))
        .await
        .expect("batch");
    assert!(response.batch_item_failures.is_empty());
    let response = batch
        .process_dynamodb(LambdaEvent::new(dynamodb_event(&records), context(60_000)))
        .await
        .expect("batch");
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        *effects.lock().expect("lock"),
        ["order-0", "order-1", "order-2", "order-3", "order-4"],
        "each once, in order"
    );
}
