//! Outbox messages, their delivery after commit, and the relay that delivers
//! what a crash left behind.

use crate::error::IdempotencyError;
use crate::idempotency::Idempotency;
use crate::store::{IdempotencyStore, OutboxRecord};
use aws_lambda_events::event::dynamodb::Event as DynamoDbEvent;
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use aws_lambda_events::http::{Method, Request};
use aws_sdk_sqs::types::MessageAttributeValue;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use lambda_runtime::LambdaEvent;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An effect staged with [`Outbox::push`](crate::Outbox::push).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutboxMessage {
    /// An SQS message. On a FIFO queue (URL ending in `.fifo`) the derived key is
    /// the `MessageDeduplicationId`; on every queue it is the `idempotency-key`
    /// message attribute.
    Sqs {
        /// The queue URL.
        queue_url: String,
        /// The message body.
        body: String,
        /// The FIFO message group (default: one per invocation, from its key).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_id: Option<String>,
    },
    /// An HTTP `POST` (a webhook), with the derived key in the `Idempotency-Key` header.
    Http {
        /// The URL (`http` or `https`).
        url: String,
        /// The request body.
        body: String,
        /// Extra headers.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<(String, String)>,
    },
    /// A payload for a [`Sink`] registered under `sink` on the [`Dispatcher`].
    Custom {
        /// The sink's name.
        sink: String,
        /// What the sink receives.
        payload: Value,
    },
}

/// A user-defined destination for [`OutboxMessage::Custom`]. Deliveries are at
/// least once: dedupe on `derived_key`.
pub trait Sink: Send + Sync + 'static {
    /// Delivers `payload`.
    fn deliver<'a>(
        &'a self,
        payload: &'a Value,
        derived_key: &'a str,
    ) -> BoxFuture<'a, Result<(), BoxError>>;
}

/// Why a delivery failed. The message stays pending for the relay or the sweep.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The dispatcher has no client or sink for this kind of message.
    #[error("no {0} configured on the dispatcher")]
    NotConfigured(String),
    /// The destination refused or could not be reached.
    #[error("delivery failed: {0}")]
    Failed(#[source] BoxError),
}

/// Delivers outbox messages: SQS, HTTP webhooks and registered sinks.
#[derive(Clone, Default)]
pub struct Dispatcher {
    sqs: Option<aws_sdk_sqs::Client>,
    http: Option<HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>>,
    sinks: HashMap<String, Arc<dyn Sink>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("sqs", &self.sqs.is_some())
            .field("http", &self.http.is_some())
            .field("sinks", &self.sinks.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Dispatcher {
    /// A dispatcher that delivers nothing until given clients and sinks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Delivers [`OutboxMessage::Sqs`] with this client.
    pub fn with_sqs(mut self, client: aws_sdk_sqs::Client) -> Self {
        self.sqs = Some(client);
        self
    }

    /// Delivers [`OutboxMessage::Http`] (HTTPS with the system's root certificates).
    pub fn with_http(mut self) -> Result<Self, BoxError> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()?
            .https_or_http()
            .enable_http1()
            .build();
        self.http = Some(HyperClient::builder(TokioExecutor::new()).build(connector));
        Ok(self)
    }

    /// Delivers [`OutboxMessage::Custom`] messages addressed to `name`.
    pub fn with_sink(mut self, name: impl Into<String>, sink: impl Sink) -> Self {
        self.sinks.insert(name.into(), Arc::new(sink));
        self
    }

    /// Delivers one message with its derived key.
    pub async fn deliver(
        &self,
        message: &OutboxMessage,
        derived_key: &str,
    ) -> Result<(), DeliveryError> {
        match message {
            OutboxMessage::Sqs {
                queue_url,
                body,
                group_id,
            } => {
                let sqs = self
                    .sqs
                    .as_ref()
                    .ok_or_else(|| DeliveryError::NotConfigured("SQS client".into()))?;
                let attribute = MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(derived_key)
                    .build()
                    .map_err(|e| DeliveryError::Failed(e.into()))?;
                let mut request = sqs
                    .send_message()
                    .queue_url(queue_url)
                    .message_body(body)
                    .message_attributes("idempotency-key", attribute);
                if queue_url.ends_with(".fifo") {
                    let group = group_id.clone().unwrap_or_else(|| derived_key.to_owned());
                    request = request
                        .message_deduplication_id(derived_key)
                        .message_group_id(group);
                }
                request
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| DeliveryError::Failed(e.into()))
            }
            OutboxMessage::Http { url, body, headers } => {
                let http = self
                    .http
                    .as_ref()
                    .ok_or_else(|| DeliveryError::NotConfigured("HTTP client".into()))?;
                let mut request = Request::builder()
                    .method(Method::POST)
                    .uri(url)
                    .header("idempotency-key", derived_key)
                    .header("content-type", "application/json");
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                let request = request
                    .body(Full::new(Bytes::from(body.clone())))
                    .map_err(|e| DeliveryError::Failed(e.into()))?;
                let response = http
                    .request(request)
                    .await
                    .map_err(|e| DeliveryError::Failed(e.into()))?;
                let status = response.status();
                // Drain the body so the connection can be reused.
                let _ = response.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(DeliveryError::Failed(
                        format!("{url} answered {status}").into(),
                    ))
                }
            }
            OutboxMessage::Custom { sink, payload } => {
                let target = self
                    .sinks
                    .get(sink)
                    .ok_or_else(|| DeliveryError::NotConfigured(format!("sink {sink:?}")))?;
                target
                    .deliver(payload, derived_key)
                    .await
                    .map_err(DeliveryError::Failed)
            }
        }
    }
}

/// Delivers outbox messages that were committed but not delivered (the process
/// died between commit and dispatch, or the destination was down): as a Lambda
/// handler on the table's DynamoDB Stream, or as a sweep run by an operator.
pub struct Relay<S> {
    idempotency: Idempotency<S>,
    dispatcher: Dispatcher,
}

/// What a sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Messages delivered and marked.
    pub delivered: usize,
    /// Messages whose delivery failed; still pending.
    pub failed: usize,
}

impl<S: IdempotencyStore> Idempotency<S> {
    /// A relay delivering this store's pending outbox messages with `dispatcher`.
    pub fn relay(&self, dispatcher: Dispatcher) -> Relay<S> {
        Relay {
            idempotency: self.clone(),
            dispatcher,
        }
    }
}

impl<S: IdempotencyStore> Relay<S> {
    /// Handles a batch of the idempotency table's stream (`NEW_IMAGE` or
    /// `NEW_AND_OLD_IMAGES`): each inserted outbox record still pending is
    /// delivered and marked. At the first failure, that record and the later ones
    /// are reported so the shard resumes there.
    pub async fn process_dynamodb(
        &self,
        event: LambdaEvent<DynamoDbEvent>,
    ) -> Result<DynamoDbEventResponse, IdempotencyError> {
        let mut response = DynamoDbEventResponse::default();
        let mut failing = false;
        for record in event.payload.records {
            if !failing {
                let key = (record.event_name == "INSERT")
                    .then(|| outbox_key(&record.change.keys))
                    .flatten();
                let outcome = match key {
                    Some(key) => self.deliver_pending(&key).await,
                    None => Ok(false),
                };
                if let Err(err) = outcome {
                    tracing::error!(error = %err, event_id = %record.event_id, "outbox relay failed; the shard resumes here");
                    failing = true;
                }
            }
            if failing {
                let mut failure = DynamoDbBatchItemFailure::default();
                failure.item_identifier =
                    Some(record.change.sequence_number.clone().ok_or_else(|| {
                        IdempotencyError::InvalidEvent(
                            "a stream record has no sequence number".into(),
                        )
                    })?);
                response.batch_item_failures.push(failure);
            }
        }
        Ok(response)
    }

    /// Delivers every pending outbox message of the store (a full scan on
    /// DynamoDB: for operators, after an outage).
    pub async fn sweep(&self) -> Result<SweepReport, IdempotencyError> {
        let pending = self.idempotency.store().pending_outbox().await?;
        let mut report = SweepReport::default();
        for record in pending {
            match self.deliver(&record).await {
                Ok(()) => report.delivered += 1,
                Err(err) => {
                    tracing::warn!(key = %record.key, error = %err, "sweep could not deliver an outbox message");
                    report.failed += 1;
                }
            }
        }
        Ok(report)
    }

    /// Delivers the record under `key` if it is still pending; returns whether it did.
    async fn deliver_pending(&self, key: &str) -> Result<bool, IdempotencyError> {
        match self.idempotency.store().get_outbox(key).await? {
            Some(record) if !record.delivered => self.deliver(&record).await.map(|()| true),
            _ => Ok(false),
        }
    }

    async fn deliver(&self, record: &OutboxRecord) -> Result<(), IdempotencyError> {
        deliver_and_mark(self.idempotency.store(), &self.dispatcher, record).await
    }
}

/// Delivers one committed message and marks it delivered.
pub(crate) async fn deliver_and_mark<S: IdempotencyStore>(
    store: &S,
    dispatcher: &Dispatcher,
    record: &OutboxRecord,
) -> Result<(), IdempotencyError> {
    let message: OutboxMessage = serde_json::from_str(&record.message).map_err(|source| {
        IdempotencyError::Serialization {
            key: record.key.clone(),
            source,
        }
    })?;
    dispatcher
        .deliver(&message, &record.derived_key)
        .await
        .map_err(|e| IdempotencyError::Delivery(Box::new(e)))?;
    Ok(store.mark_delivered(&record.key).await?)
}

/// The outbox record key among a stream record's keys, if it is one.
fn outbox_key<K: Serialize>(keys: &K) -> Option<String> {
    let keys = serde_json::to_value(keys).ok()?;
    keys.as_object()?.values().find_map(|value| {
        let key = value.get("S").or(Some(value))?.as_str()?;
        key.contains("#outbox#").then(|| key.to_owned())
    })
}
