//! An SQS consumer applying absolute-state events ("account a-1 is frozen, as
//! of version 7") to a DynamoDB table. Each message is idempotent by its id, and
//! each entity write is version-checked: a duplicate sent under a new message id,
//! or an older event arriving late, finds the entity at its version or newer and
//! is skipped as a harmless retry. The entity ends at the highest version,
//! written once per version, whatever the delivery order.
//!
//! Two ways, picked by `COMMIT_WITH_RECORD`:
//! - staged (`1`): the write commits with the message's idempotency record, in
//!   one TransactWriteItems (one more request when the entity is already current);
//! - standalone (unset): the version check alone, one UpdateItem per event, no
//!   record needed (the write is safe to repeat by itself).
//!
//! Environment: `IDEMPOTENCY_TABLE`, `ACCOUNTS_TABLE` (partition key `id`).
//! Message body: `{"account": "a-1", "state": "frozen", "version": 7}`.

#[path = "common/mod.rs"]
mod common;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_dynamodb::types::AttributeValue;
use lambda_idempotency::{effects, Idempotency, IdempotencyConfig, Versioned, VersionedWrite};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize)]
struct AccountState {
    account: String,
    state: String,
    version: u64,
}

fn parse(message: &SqsMessage) -> Result<AccountState, Error> {
    Ok(serde_json::from_str(
        message.body.as_deref().unwrap_or_default(),
    )?)
}

fn write(table: &str, event: &AccountState) -> VersionedWrite {
    VersionedWrite::update(table, event.version)
        .key("id", AttributeValue::S(event.account.clone()))
        .set("state", AttributeValue::S(event.state.clone()))
}

/// Staged: committed with the message's record.
async fn apply_staged(message: SqsMessage, table: Arc<str>) -> Result<Value, Error> {
    let event = parse(&message)?;
    effects()?.writes().versioned(write(&table, &event));
    Ok(json!({ "account": event.account, "version": event.version }))
}

/// Standalone: the version check is the whole protection.
async fn apply_now(
    message: SqsMessage,
    table: Arc<str>,
    client: aws_sdk_dynamodb::Client,
) -> Result<Value, Error> {
    let event = parse(&message)?;
    let outcome = write(&table, &event).write(&client).await?;
    if outcome == Versioned::AlreadyCurrent {
        tracing::info!(account = %event.account, version = event.version, "already current");
    }
    Ok(json!({ "account": event.account, "version": event.version }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let sdk = common::init().await;
    let table: Arc<str> = common::env("ACCOUNTS_TABLE")?.into();
    if std::env::var("COMMIT_WITH_RECORD").is_ok_and(|v| v == "1") {
        // The message id stays the same on redelivery.
        let config = IdempotencyConfig::builder().build()?;
        let batch = Idempotency::new(common::store_from_env(&sdk)?, config)
            .sqs_batch("apply", move |message| apply_staged(message, table.clone()));
        return lambda_runtime::run(service_fn(|event: LambdaEvent<SqsEvent>| {
            batch.process(event)
        }))
        .await;
    }
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| {
        let (table, client) = (table.clone(), client.clone());
        async move {
            for message in event.payload.records {
                apply_now(message, table.clone(), client.clone()).await?;
            }
            Ok::<_, Error>(())
        }
    }))
    .await
}
