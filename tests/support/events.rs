//! Real SQS and DynamoDB Streams clients on LocalStack, and conversions from what
//! their APIs return to the events Lambda would deliver.
#![allow(dead_code)]

use super::localstack::endpoint;
use aws_lambda_events::event::dynamodb::{Event as DynamoDbEvent, EventRecord};
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_dynamodbstreams::types::{AttributeValue as StreamValue, Record as StreamRecord};
use aws_sdk_sqs::types::Message;
use serde_json::{json, Map, Value};

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
