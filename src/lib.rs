//! Idempotent AWS Lambda handlers: retries and redeliveries never repeat a side effect.
//!
//! Wrap a handler with [`Idempotency::wrap`] (or [`Idempotency::layer`]); each
//! event's key is reserved with one conditional write, the handler runs once, its
//! response is stored, and duplicates get the stored response back.
//!
//! ```
//! use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
//! use lambda_runtime::{service_fn, Error, LambdaEvent};
//! use serde_json::{json, Value};
//! use tower::{Service, ServiceExt};
//!
//! # #[tokio::main] async fn main() -> Result<(), Error> {
//! let config = IdempotencyConfig::builder().key_expression("order_id").build()?;
//! let idempotency = Idempotency::new(MemoryStore::new(), config);
//! let mut service = idempotency.wrap(service_fn(|event: LambdaEvent<Value>| async move {
//!     Ok::<_, Error>(json!({ "order": event.payload["order_id"], "status": "charged" }))
//! }))?;
//!
//! let event = json!({ "order_id": "o-1" });
//! // Lambda sets the deadline; without one the in-progress timeout applies.
//! let context = lambda_runtime::Context::default();
//! let first = service.ready().await?.call(LambdaEvent::new(event.clone(), context.clone())).await?;
//! let replay = service.ready().await?.call(LambdaEvent::new(event, context)).await?;
//! assert_eq!(first, replay);
//! # Ok(()) }
//! ```
//!
//! In production use [`DynamoDbStore`]; [`MemoryStore`] is for tests and local runs.
//!
//! ## Cargo features
//!
//! The default build is the wrapper, the function wrapper, and the DynamoDB and
//! memory stores. Each event source and outbox sink is opt-in:
//!
//! | feature | adds |
//! |---|---|
//! | `outbox` | `Effects::outbox`, `OutboxMessage`, `Dispatcher`, custom `Sink`s, the `Relay` |
//! | `atomic-writes` | `outbox`, `Effects::writes` (DynamoDB writes committed with the record) and `VersionedWrite` |
//! | `sqs` | `SqsBatch`: SQS batches with partial batch failures |
//! | `streams` | `StreamBatch`: DynamoDB Streams and Kinesis; with `outbox`, `Relay::process_dynamodb` |
//! | `apigw` | `HttpIdempotency`: API Gateway `Idempotency-Key` semantics |
//! | `lambda-http` | `HttpIdempotency::handle_request` for `lambda_http` |
//! | `outbox-sqs` | `outbox`, and delivery of `OutboxMessage::Sqs` (`Dispatcher::with_sqs`) |
//! | `outbox-http` | `outbox`, and delivery of `OutboxMessage::Http` (`Dispatcher::with_http`) |
//! | `exact-numbers` | keys exact for any JSON number (serde_json `arbitrary_precision`) |
//! | `gzip` | `powertools_base64_gzip` in key expressions (flate2) |
//! | `jmespath` | full JMESPath in key expressions (projections, filters, pipes, literals, comparisons); without it, fields, `a.b`, indexes, multi-selects, `@`, `\|\|` and the Powertools functions |
//! | `jmespath-functions` | `jmespath`, and JMESPath's standard functions (`length`, `join`, ...) in key expressions |
//! | `powertools-compat` | record ids as Powertools for Python derives them |
//! | `metrics` | counts of every outcome through the `metrics` facade |
//! | `emf` | `metrics`, and CloudWatch Embedded Metric Format output (the `emf` module) |
//! | `testing` | the `testing` module: run your wrapped handler twice, concurrently, and crashed at every phase (for dev-dependencies) |
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "atomic-writes")]
mod atomic;
mod config;
mod effects;
#[cfg(feature = "emf")]
#[cfg_attr(docsrs, doc(cfg(feature = "emf")))]
pub mod emf;
mod error;
mod idempotency;
mod key;
#[cfg(feature = "outbox")]
mod outbox;
mod outcome;
mod record;
mod service;
mod sources;
pub mod store;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
#[cfg(feature = "atomic-writes")]
mod versioned;

#[cfg(feature = "atomic-writes")]
#[cfg_attr(docsrs, doc(cfg(feature = "atomic-writes")))]
pub use atomic::Writes;
pub use config::{ConfigError, IdempotencyConfig, IdempotencyConfigBuilder};
#[cfg(feature = "outbox")]
#[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
pub use effects::Outbox;
pub use effects::{client_request_token, effects, Effects, IDEMPOTENCY_KEY};
pub use error::{BoxError, Error, IdempotencyError, PermanentError};
pub use idempotency::Idempotency;
#[cfg(feature = "powertools-compat")]
pub use key::powertools::PowertoolsHash;
#[cfg(feature = "outbox")]
#[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
pub use outbox::{DeliveryError, Dispatcher, OutboxMessage, Relay, Sink, SweepReport};
pub use record::{IdempotencyRecord, Status, MAX_ITEM_BYTES};
pub use service::{IdempotencyLayer, IdempotentFunction, IdempotentService};
#[cfg(feature = "sqs")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqs")))]
pub use sources::SqsBatch;
#[cfg(feature = "streams")]
#[cfg_attr(docsrs, doc(cfg(feature = "streams")))]
pub use sources::StreamBatch;
#[cfg(feature = "apigw")]
#[cfg_attr(docsrs, doc(cfg(feature = "apigw")))]
pub use sources::{HttpIdempotency, IDEMPOTENT_REPLAYED};
#[cfg(feature = "atomic-writes")]
#[cfg_attr(docsrs, doc(cfg(feature = "atomic-writes")))]
pub use store::TransactionStore;
pub use store::{DynamoDbStore, IdempotencyStore, MemoryStore, OutboxStore, StepJournal};
#[cfg(feature = "atomic-writes")]
#[cfg_attr(docsrs, doc(cfg(feature = "atomic-writes")))]
pub use versioned::{Versioned, VersionedWrite, VersionedWriteError, DEFAULT_VERSION_ATTRIBUTE};
