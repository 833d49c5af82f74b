//! Outbox messages, their delivery after commit, and the relay that delivers
//! what a crash left behind.

use crate::error::{BoxError, IdempotencyError};
use crate::store::{BoxFuture, IdempotencyStore, OutboxRecord, OutboxStore};
#[cfg(feature = "streams")]
use aws_lambda_events::event::{
    dynamodb::Event as DynamoDbEvent,
    streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse},
};
#[cfg(feature = "streams")]
use lambda_runtime::LambdaEvent;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// An effect staged with [`Outbox::push`](crate::Outbox::push).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
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
///
/// ```
/// use lambda_idempotency::{store::BoxFuture, BoxError, Dispatcher, Sink};
/// use serde_json::Value;
///
/// struct EventBus;
///
/// impl Sink for EventBus {
///     fn deliver<'a>(
///         &'a self,
///         payload: &'a Value,
///         derived_key: &'a str,
///     ) -> BoxFuture<'a, Result<(), BoxError>> {
///         Box::pin(async move {
///             // e.g. PutEvents with `derived_key` in the detail: a redelivery is a
///             // duplicate only the consumer can recognise.
///             let _ = (payload, derived_key);
///             Ok(())
///         })
///     }
/// }
///
/// let dispatcher = Dispatcher::new().with_sink("events", EventBus);
/// # let _ = dispatcher;
/// ```
pub trait Sink: Send + Sync + 'static {
    /// Delivers `payload`.
    ///
    /// ```
    /// # use lambda_idempotency::store::BoxFuture;
    /// # struct AuditLog;
    /// # impl Sink for AuditLog {
    /// #     fn deliver<'a>(&'a self, _: &'a serde_json::Value, _: &'a str) -> BoxFuture<'a, Result<(), BoxError>> {
    /// #         Box::pin(async { Ok(()) })
    /// #     }
    /// # }
    /// use lambda_idempotency::{BoxError, Sink};
    /// use serde_json::json;
    ///
    /// # #[tokio::main] async fn main() -> Result<(), BoxError> {
    /// // A sink is tested on its own, with a key like the ones the outbox derives.
    /// AuditLog.deliver(&json!({ "order": 7, "event": "refunded" }), "k-1").await?;
    /// # Ok(()) }
    /// ```
    fn deliver<'a>(
        &'a self,
        payload: &'a Value,
        derived_key: &'a str,
    ) -> BoxFuture<'a, Result<(), BoxError>>;
}

/// Why a delivery failed. The message stays pending for the relay or the sweep.
///
/// ```
/// use lambda_idempotency::{DeliveryError, Dispatcher, OutboxMessage};
///
/// # #[tokio::main] async fn main() {
/// let message = OutboxMessage::Sqs {
///     queue_url: "https://sqs.eu-west-1.amazonaws.com/123456789012/orders".into(),
///     body: r#"{"order":7}"#.into(),
///     group_id: None,
/// };
/// // Not configured is not lost: the message waits for a dispatcher that has a client.
/// let error = Dispatcher::new().deliver(&message, "k-1").await.unwrap_err();
/// assert!(matches!(error, DeliveryError::NotConfigured(_)));
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The dispatcher has no client or sink for this kind of message.
    #[error("no {0} configured on the dispatcher")]
    NotConfigured(String),
    /// The destination refused or could not be reached.
    #[error("delivery failed: {0}")]
    Failed(#[source] BoxError),
}

/// Delivers outbox messages: SQS (feature `outbox-sqs`), HTTP webhooks (feature
/// `outbox-http`) and registered sinks.
#[derive(Clone, Default)]
pub struct Dispatcher {
    #[cfg(feature = "outbox-sqs")]
    sqs: Option<aws_sdk_sqs::Client>,
    #[cfg(feature = "outbox-http")]
    http: Option<webhook::Client>,
    sinks: HashMap<String, Arc<dyn Sink>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut debug = f.debug_struct("Dispatcher");
        #[cfg(feature = "outbox-sqs")]
        debug.field("sqs", &self.sqs.is_some());
        #[cfg(feature = "outbox-http")]
        debug.field("http", &self.http.is_some());
        debug
            .field("sinks", &self.sinks.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Dispatcher {
    /// A dispatcher that delivers nothing until given clients and sinks.
    ///
    /// ```
    /// # use lambda_idempotency::{store::BoxFuture, BoxError, Sink};
    /// # struct AuditLog;
    /// # impl Sink for AuditLog {
    /// #     fn deliver<'a>(&'a self, _: &'a serde_json::Value, _: &'a str) -> BoxFuture<'a, Result<(), BoxError>> {
    /// #         Box::pin(async { Ok(()) })
    /// #     }
    /// # }
    /// use lambda_idempotency::{Dispatcher, Idempotency, IdempotencyConfig, MemoryStore};
    ///
    /// let dispatcher = Dispatcher::new().with_sink("audit", AuditLog);
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default())
    ///     .with_dispatcher(dispatcher);
    /// # let _ = idempotency;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Delivers [`OutboxMessage::Sqs`] with this client.
    ///
    /// ```no_run
    /// use lambda_idempotency::{Dispatcher, DynamoDbStore, Idempotency, IdempotencyConfig};
    ///
    /// # fn f(dynamodb: aws_sdk_dynamodb::Client, sqs: aws_sdk_sqs::Client) {
    /// let store = DynamoDbStore::new(dynamodb, "idempotency");
    /// let idempotency = Idempotency::new(store, IdempotencyConfig::default())
    ///     .with_dispatcher(Dispatcher::new().with_sqs(sqs));
    /// # let _ = idempotency;
    /// # }
    /// ```
    #[cfg(feature = "outbox-sqs")]
    #[cfg_attr(docsrs, doc(cfg(feature = "outbox-sqs")))]
    pub fn with_sqs(mut self, client: aws_sdk_sqs::Client) -> Self {
        self.sqs = Some(client);
        self
    }

    /// Delivers [`OutboxMessage::Http`] (HTTPS with the system's root certificates).
    ///
    /// ```
    /// use lambda_idempotency::{BoxError, Dispatcher, Idempotency, IdempotencyConfig, MemoryStore};
    ///
    /// # fn main() -> Result<(), BoxError> {
    /// // Fails when the system has no root certificates: better at start-up than at each webhook.
    /// let dispatcher = Dispatcher::new().with_http()?;
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default())
    ///     .with_dispatcher(dispatcher);
    /// # let _ = idempotency;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "outbox-http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "outbox-http")))]
    pub fn with_http(mut self) -> Result<Self, BoxError> {
        self.http = Some(webhook::client()?);
        Ok(self)
    }

    /// Delivers [`OutboxMessage::Custom`] messages addressed to `name`.
    ///
    /// ```
    /// # use lambda_idempotency::{store::BoxFuture, BoxError, Sink};
    /// # use std::sync::{Arc, Mutex};
    /// # #[derive(Clone, Default)]
    /// # struct AuditLog(Arc<Mutex<Vec<serde_json::Value>>>);
    /// # impl Sink for AuditLog {
    /// #     fn deliver<'a>(&'a self, payload: &'a serde_json::Value, _: &'a str) -> BoxFuture<'a, Result<(), BoxError>> {
    /// #         self.0.lock().unwrap().push(payload.clone());
    /// #         Box::pin(async { Ok(()) })
    /// #     }
    /// # }
    /// use lambda_idempotency::{effects, Dispatcher, Idempotency, IdempotencyConfig, MemoryStore, OutboxMessage};
    /// use serde_json::{json, Value};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let audit = AuditLog::default();
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default())
    ///     .with_dispatcher(Dispatcher::new().with_sink("audit", audit.clone()));
    /// let refund = idempotency.function("refund", |order: Value| async move {
    ///     let payload = json!({ "refunded": order["id"] });
    ///     effects()?.outbox().push(OutboxMessage::Custom { sink: "audit".into(), payload });
    ///     Ok::<_, lambda_idempotency::Error<std::io::Error>>(json!("refunded"))
    /// });
    /// refund.call(json!({ "id": 7 }), None).await?;
    /// // The retry replays the committed response: the audit entry is not sent again.
    /// refund.call(json!({ "id": 7 }), None).await?;
    /// assert_eq!(audit.0.lock().unwrap().len(), 1);
    /// # Ok(()) }
    /// ```
    pub fn with_sink(mut self, name: impl Into<String>, sink: impl Sink) -> Self {
        self.sinks.insert(name.into(), Arc::new(sink));
        self
    }

    /// Delivers one message with its derived key. A message whose kind has no
    /// client (or whose feature is off) fails with [`DeliveryError::NotConfigured`]
    /// and stays pending.
    ///
    /// ```
    /// # use lambda_idempotency::{store::BoxFuture, BoxError, Sink};
    /// # struct AuditLog;
    /// # impl Sink for AuditLog {
    /// #     fn deliver<'a>(&'a self, _: &'a serde_json::Value, _: &'a str) -> BoxFuture<'a, Result<(), BoxError>> {
    /// #         Box::pin(async { Ok(()) })
    /// #     }
    /// # }
    /// use lambda_idempotency::{DeliveryError, Dispatcher, OutboxMessage};
    /// use serde_json::json;
    ///
    /// # #[tokio::main] async fn main() -> Result<(), DeliveryError> {
    /// let dispatcher = Dispatcher::new().with_sink("audit", AuditLog);
    /// let message = OutboxMessage::Custom { sink: "audit".into(), payload: json!({ "order": 7 }) };
    /// // Redelivering by hand (from a dead-letter dump, say) with the message's own
    /// // derived key, so the receiver still dedupes it.
    /// dispatcher.deliver(&message, "9f2c5e0d").await?;
    /// # Ok(()) }
    /// ```
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
                #[cfg(feature = "outbox-sqs")]
                if let Some(sqs) = &self.sqs {
                    return deliver_sqs(sqs, queue_url, body, group_id.as_deref(), derived_key)
                        .await;
                }
                let _ = (queue_url, body, group_id);
                Err(DeliveryError::NotConfigured(
                    "SQS client (`with_sqs`, feature `outbox-sqs`)".into(),
                ))
            }
            OutboxMessage::Http { url, body, headers } => {
                #[cfg(feature = "outbox-http")]
                if let Some(http) = &self.http {
                    return webhook::post(http, url, body, headers, derived_key).await;
                }
                let _ = (url, body, headers);
                Err(DeliveryError::NotConfigured(
                    "HTTP client (`with_http`, feature `outbox-http`)".into(),
                ))
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

/// Sends one SQS message with the derived key as its `idempotency-key` attribute
/// and, on a FIFO queue, as its deduplication id.
#[cfg(feature = "outbox-sqs")]
async fn deliver_sqs(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    body: &str,
    group_id: Option<&str>,
    derived_key: &str,
) -> Result<(), DeliveryError> {
    let attribute = aws_sdk_sqs::types::MessageAttributeValue::builder()
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
        request = request
            .message_deduplication_id(derived_key)
            .message_group_id(group_id.unwrap_or(derived_key));
    }
    request
        .send()
        .await
        .map(|_| ())
        .map_err(|e| DeliveryError::Failed(e.into()))
}

/// Webhook delivery over the HTTP client stack the AWS SDK already brings.
#[cfg(feature = "outbox-http")]
mod webhook {
    use super::{BoxError, DeliveryError};
    use bytes::Bytes;
    use http::{Method, Request};
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    pub(super) type Client = hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<HttpConnector>,
        Full<Bytes>,
    >;

    /// HTTPS (system roots) or plain HTTP, HTTP/1.1.
    pub(super) fn client() -> Result<Client, BoxError> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector))
    }

    /// `POST`s `body` with the derived key as the `Idempotency-Key` header; a
    /// non-2xx answer is a failure.
    pub(super) async fn post(
        http: &Client,
        url: &str,
        body: &str,
        headers: &[(String, String)],
        derived_key: &str,
    ) -> Result<(), DeliveryError> {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header("idempotency-key", derived_key)
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
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
}

/// Delivers outbox messages that were committed but not delivered (the process
/// died between commit and dispatch, or the destination was down): as a Lambda
/// handler on the table's DynamoDB Stream, or as a sweep run by an operator.
pub struct Relay<S> {
    store: Arc<S>,
    dispatcher: Dispatcher,
}

impl<S> std::fmt::Debug for Relay<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("dispatcher", &self.dispatcher)
            .finish_non_exhaustive()
    }
}

/// What a sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Messages delivered and marked.
    pub delivered: usize,
    /// Messages whose delivery failed; still pending.
    pub failed: usize,
}

impl<S: IdempotencyStore> Relay<S> {
    /// A relay delivering `store`'s pending outbox messages with `dispatcher`
    /// (see also [`Idempotency::relay`](crate::Idempotency::relay)).
    ///
    /// ```no_run
    /// use lambda_idempotency::{Dispatcher, DynamoDbStore, Relay};
    ///
    /// # async fn f(dynamodb: aws_sdk_dynamodb::Client, dispatcher: Dispatcher) -> Result<(), lambda_idempotency::IdempotencyError> {
    /// // An operator's tool has no handlers, so no `Idempotency`: the table is enough.
    /// let relay = Relay::new(DynamoDbStore::new(dynamodb, "idempotency"), dispatcher);
    /// let report = relay.sweep().await?;
    /// println!("{} delivered, {} still pending", report.delivered, report.failed);
    /// # Ok(()) }
    /// ```
    pub fn new(store: S, dispatcher: Dispatcher) -> Self {
        Self::shared(Arc::new(store), dispatcher)
    }

    pub(crate) fn shared(store: Arc<S>, dispatcher: Dispatcher) -> Self {
        Self { store, dispatcher }
    }

    fn outbox(&self) -> Result<&dyn OutboxStore, IdempotencyError> {
        self.store
            .outbox()
            .ok_or(IdempotencyError::Unsupported { missing: "outbox" })
    }

    /// Handles a batch of the idempotency table's stream (`NEW_IMAGE` or
    /// `NEW_AND_OLD_IMAGES`): each inserted outbox record still pending is
    /// delivered and marked. At the first failure, that record and the later ones
    /// are reported so the shard resumes there.
    ///
    /// ```no_run
    /// use aws_lambda_events::event::dynamodb::Event;
    /// use lambda_idempotency::{Dispatcher, DynamoDbStore, Idempotency, IdempotencyConfig};
    /// use lambda_runtime::{service_fn, LambdaEvent};
    ///
    /// # async fn f(dynamodb: aws_sdk_dynamodb::Client, dispatcher: Dispatcher) -> Result<(), lambda_runtime::Error> {
    /// let store = DynamoDbStore::new(dynamodb, "idempotency");
    /// let relay = Idempotency::new(store, IdempotencyConfig::default()).relay(dispatcher);
    /// // The event source mapping needs `ReportBatchItemFailures`, or a failure
    /// // retries the whole batch and redelivers the messages before it.
    /// lambda_runtime::run(service_fn(|event: LambdaEvent<Event>| relay.process_dynamodb(event))).await
    /// # }
    /// ```
    #[cfg(feature = "streams")]
    #[cfg_attr(docsrs, doc(cfg(feature = "streams")))]
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
    ///
    /// ```
    /// # use lambda_idempotency::{store::BoxFuture, BoxError, Sink};
    /// # struct AuditLog;
    /// # impl Sink for AuditLog {
    /// #     fn deliver<'a>(&'a self, _: &'a serde_json::Value, _: &'a str) -> BoxFuture<'a, Result<(), BoxError>> {
    /// #         Box::pin(async { Ok(()) })
    /// #     }
    /// # }
    /// use lambda_idempotency::{effects, Dispatcher, Idempotency, IdempotencyConfig, MemoryStore, OutboxMessage, SweepReport};
    /// use serde_json::{json, Value};
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // No dispatcher: as if the function died between commit and delivery.
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    /// let ship = idempotency.function("ship", |order: Value| async move {
    ///     effects()?.outbox().push(OutboxMessage::Custom { sink: "audit".into(), payload: order });
    ///     Ok::<_, lambda_idempotency::Error<std::io::Error>>(json!("shipped"))
    /// });
    /// ship.call(json!({ "id": 7 }), None).await?;
    /// let relay = idempotency.relay(Dispatcher::new().with_sink("audit", AuditLog));
    /// assert_eq!(relay.sweep().await?, SweepReport { delivered: 1, failed: 0 });
    /// // Delivered messages are marked, so sweeping again sends nothing twice.
    /// assert_eq!(relay.sweep().await?.delivered, 0);
    /// # Ok(()) }
    /// ```
    pub async fn sweep(&self) -> Result<SweepReport, IdempotencyError> {
        let pending = self.outbox()?.pending_outbox().await?;
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
    #[cfg(feature = "streams")]
    async fn deliver_pending(&self, key: &str) -> Result<bool, IdempotencyError> {
        match self.outbox()?.get_outbox(key).await? {
            Some(record) if !record.delivered => self.deliver(&record).await.map(|()| true),
            _ => Ok(false),
        }
    }

    async fn deliver(&self, record: &OutboxRecord) -> Result<(), IdempotencyError> {
        deliver_and_mark(self.outbox()?, &self.dispatcher, record).await
    }
}

/// Delivers one committed message and marks it delivered.
pub(crate) async fn deliver_and_mark(
    store: &dyn OutboxStore,
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

/// The staged messages as outbox records expiring with their completed record.
pub(crate) fn records(
    expiration: i64,
    staged: Vec<(String, String, OutboxMessage)>,
) -> Result<Vec<OutboxRecord>, IdempotencyError> {
    staged
        .into_iter()
        .map(|(key, derived_key, message)| {
            let message = serde_json::to_string(&message).map_err(|source| {
                IdempotencyError::Serialization {
                    key: key.clone(),
                    source,
                }
            })?;
            Ok(OutboxRecord {
                key,
                derived_key,
                message,
                delivered: false,
                expiration,
            })
        })
        .collect()
}

/// The outbox record key among a stream record's keys, if it is one.
#[cfg(feature = "streams")]
fn outbox_key<K: Serialize>(keys: &K) -> Option<String> {
    let keys = serde_json::to_value(keys).ok()?;
    keys.as_object()?.values().find_map(|value| {
        let key = value.get("S").or(Some(value))?.as_str()?;
        key.contains("#outbox#").then(|| key.to_owned())
    })
}
