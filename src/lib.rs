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
//! Steps with derived keys, an outbox, SQS, stream and API Gateway adapters,
//! sagas, metrics and a testing kit build on the same engine; each beyond the
//! wrapper is behind a Cargo feature, listed in
//! [the guide's feature table](guide::getting_started#cargo-features).
//!
//! **[The guide](guide)** explains the crate chapter by chapter, from a first
//! wrapped handler to running it in production; its
//! [reference](guide::reference) lists every `errorType`, limit and environment
//! variable.
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
mod flight;
// The guide (docs/*.md) is documentation only: rendered by every `cargo doc`,
// where links to items of features that are off become plain text, and compiled
// as doc tests only when every feature its code uses is on (the test command's
// doc-test run has them all). The macro names those features once for both.
macro_rules! guide_needs {
    ($($feature:literal),+) => {
        #[cfg(any(doc, all(doctest, $(feature = $feature),+)))]
        #[cfg_attr(
            not(all($(feature = $feature),+)),
            allow(rustdoc::broken_intra_doc_links)
        )]
        pub mod guide;
    };
}
guide_needs!(
    "sqs",
    "streams",
    "apigw",
    "lambda-http",
    "outbox-sqs",
    "outbox-http",
    "atomic-writes",
    "emf",
    "s3-responses",
    "testing",
    "powertools-compat",
    "redis"
);
#[cfg(test)]
mod guide_checks;
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
pub use effects::{client_request_token, effects, Effects, Retry, Step, IDEMPOTENCY_KEY};
pub use error::{BoxError, Error, IdempotencyError, PermanentError};
pub use idempotency::{Claim, Gate, Idempotency, Ticket};
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
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::RedisStore;
#[cfg(feature = "atomic-writes")]
#[cfg_attr(docsrs, doc(cfg(feature = "atomic-writes")))]
pub use store::TransactionStore;
pub use store::{DynamoDbStore, IdempotencyStore, MemoryStore, OutboxStore, StepJournal};
#[cfg(feature = "atomic-writes")]
#[cfg_attr(docsrs, doc(cfg(feature = "atomic-writes")))]
pub use versioned::{Versioned, VersionedWrite, VersionedWriteError, DEFAULT_VERSION_ATTRIBUTE};
