//! Real SQS and DynamoDB Streams clients on LocalStack, and conversions from what
//! their APIs return to the events Lambda would deliver.
#![allow(dead_code)]

use super::localstack::{client, create_table, endpoint};
use aws_lambda_events::event::dynamodb::{Event as DynamoDbEvent, EventRecord};
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_dynamodb::types::{StreamSpecification, StreamViewType};
use aws_sdk_dynamodbstreams::types::{AttributeValue as StreamValue, Record as StreamRecord};
use aws_sdk_dynamodbstreams::types::{ShardIteratorType, StreamStatus};
use aws_sdk_sqs::types::Message;
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};

pub fn sqs() -> aws_sdk_sqs::Client {
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

pub fn streams() -> aws_sdk_dynamodbstreams::Client {
    let config = aws_sdk_dynamodbstreams::config::Builder::new()
        .behavior_version_latest()
        .region(aws_sdk_dynamodbstreams::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodbstreams::config::Credentials::new(
            "test", "test", None, None, "tests",
        ))
        .endpoint_url(endpoint())
        .build();
    aws_sdk_dynamodbstreams::Client::from_conf(config)
}

/// The SQS event Lambda's poller would build from received messages.
pub fn sqs_event(queue_arn: &str, messages: &[Message]) -> SqsEvent {
    let records: Vec<Value> = messages
        .iter()
        .map(|m| {
            let attributes: Map<String, Value> = m
                .attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.as_str().to_owned(), json!(v)))
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "messageId": m.message_id(), "receiptHandle": m.receipt_handle(), "body": m.body(),
                "md5OfBody": m.md5_of_body(), "attributes": attributes, "messageAttributes": {},
                "eventSource": "aws:sqs", "eventSourceARN": queue_arn, "awsRegion": "us-east-1",
            })
        })
        .collect();
    serde_json::from_value(json!({ "Records": records })).expect("an SQS event")
}

pub fn sqs_message(body: &str, message_id: &str) -> SqsMessage {
    serde_json::from_value(json!({"messageId": message_id, "body": body, "eventSource": "aws:sqs"}))
        .expect("a message")
}

/// The DynamoDB Streams event Lambda would build from `GetRecords` output.
pub fn dynamodb_event(records: &[StreamRecord]) -> DynamoDbEvent {
    let records: Vec<EventRecord> = records.iter().map(dynamodb_record).collect();
    let mut event = DynamoDbEvent::default();
    event.records = records;
    event
}

fn dynamodb_record(record: &StreamRecord) -> EventRecord {
    let change = record.dynamodb().expect("a stream record has a change");
    let image = |item: Option<&std::collections::HashMap<String, StreamValue>>| -> Value {
        item.map(|i| {
            i.iter()
                .map(|(k, v)| (k.clone(), attribute(v)))
                .collect::<Map<_, _>>()
                .into()
        })
        .unwrap_or(json!({}))
    };
    let created = change
        .approximate_creation_date_time()
        .map(|t| t.secs())
        .unwrap_or(0);
    serde_json::from_value(json!({
        "eventID": record.event_id(), "eventName": record.event_name().map(|n| n.as_str()),
        "eventVersion": record.event_version(), "eventSource": "aws:dynamodb", "awsRegion": "us-east-1",
        "dynamodb": {
            "ApproximateCreationDateTime": created,
            "Keys": image(change.keys()), "NewImage": image(change.new_image()), "OldImage": image(change.old_image()),
            "SequenceNumber": change.sequence_number(), "SizeBytes": change.size_bytes().unwrap_or(0),
            "StreamViewType": change.stream_view_type().map(|v| v.as_str()),
        },
    }))
    .expect("a DynamoDB stream record")
}

fn attribute(value: &StreamValue) -> Value {
    match value {
        StreamValue::S(s) => json!({ "S": s }),
        StreamValue::N(n) => json!({ "N": n }),
        StreamValue::Bool(b) => json!({ "BOOL": b }),
        StreamValue::Null(_) => json!({ "NULL": true }),
        StreamValue::M(m) => {
            json!({ "M": m.iter().map(|(k, v)| (k.clone(), attribute(v))).collect::<Map<_, _>>() })
        }
        StreamValue::L(l) => json!({ "L": l.iter().map(attribute).collect::<Vec<_>>() }),
        other => panic!("attribute type not used in these tests: {other:?}"),
    }
}

/// A table (key `id`, TTL on `expiration`) with a NEW_IMAGE stream, ready to
/// capture writes.
pub struct Stream {
    pub table: String,
    pub arn: String,
    shard: String,
}

impl Stream {
    pub async fn create(table: &str) -> Self {
        create_table(&client(), table, "id", None, "expiration").await;
        let spec = StreamSpecification::builder()
            .stream_enabled(true)
            .stream_view_type(StreamViewType::NewImage)
            .build()
            .expect("stream spec");
        let updated = client()
            .update_table()
            .table_name(table)
            .stream_specification(spec)
            .send()
            .await
            .expect("enable stream");
        let arn = updated
            .table_description()
            .and_then(|t| t.latest_stream_arn())
            .expect("stream arn")
            .to_owned();

        // The stream captures writes once it is enabled and lists a shard.
        let started = Instant::now();
        let shard = loop {
            let described = streams()
                .describe_stream()
                .stream_arn(&arn)
                .send()
                .await
                .expect("describe stream");
            let description = described.stream_description();
            let enabled =
                description.and_then(|d| d.stream_status()) == Some(&StreamStatus::Enabled);
            let shard = description
                .and_then(|d| d.shards().first())
                .and_then(|s| s.shard_id());
            if let (true, Some(shard)) = (enabled, shard) {
                break shard.to_owned();
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "stream not enabled"
            );
            tokio::time::sleep(Duration::from_millis(200)).await; // polling interval
        };
        Self {
            table: table.to_owned(),
            arn,
            shard,
        }
    }

    /// Reads the shard from its start until `done` holds for what was read.
    pub async fn read_until(&self, done: impl Fn(&[StreamRecord]) -> bool) -> Vec<StreamRecord> {
        let streams = streams();
        let started = Instant::now();
        // The shard iterator is refused until the stream's backing shard is active.
        let mut iterator = loop {
            let result = streams
                .get_shard_iterator()
                .stream_arn(&self.arn)
                .shard_id(&self.shard)
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await;
            match result {
                Ok(output) => break output.shard_iterator().map(str::to_owned),
                Err(e) => assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "no shard iterator: {e:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await; // polling interval
        };
        let mut records = Vec::new();
        while !done(&records) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "stream condition not met after {} records",
                records.len()
            );
            let Some(current) = iterator else { break };
            let page = streams
                .get_records()
                .shard_iterator(current)
                .send()
                .await
                .expect("get records");
            records.extend(page.records().iter().cloned());
            iterator = page.next_shard_iterator().map(str::to_owned);
            if !done(&records) {
                tokio::time::sleep(Duration::from_millis(200)).await; // polling interval
            }
        }
        records
    }
}
