//! Event sources: batches whose records are each run through the engine, and
//! HTTP requests with `Idempotency-Key` semantics.

//!
//! Each source is a cargo feature: `sqs`, `streams`, `apigw` (and `lambda-http`).
#![cfg(any(feature = "sqs", feature = "streams", feature = "apigw"))]

#[cfg(feature = "apigw")]
mod http;
#[cfg(feature = "sqs")]
mod sqs;
#[cfg(feature = "streams")]
mod stream;

#[cfg(feature = "apigw")]
pub use http::{HttpIdempotency, IDEMPOTENT_REPLAYED};
#[cfg(feature = "sqs")]
pub use sqs::SqsBatch;
#[cfg(feature = "streams")]
pub use stream::StreamBatch;

use crate::key::JsonPath;

/// A built-in expression (a source's default key or caller). Called only with
/// constants, which compile: a panic here is a bug in this crate, not bad input.
fn field(expression: &'static str) -> JsonPath {
    JsonPath::compile(expression).expect("a built-in expression is valid")
}

/// Runs one record through the engine: the record at `index` of `batch`; the
/// error, as text, for the logs.
#[cfg(any(feature = "sqs", feature = "streams"))]
#[allow(clippy::too_many_arguments)] // a record's place in its batch, passed down
async fn run_record<S, T, R, E, F, Fut>(
    idempotency: &crate::Idempotency<S>,
    scope: &str,
    deadline_ms: i64,
    default_key: &JsonPath,
    batch: &crate::idempotency::Batch,
    index: usize,
    record: T,
    handler: F,
) -> Result<(), String>
where
    S: crate::store::IdempotencyStore,
    T: serde::Serialize + 'static,
    R: serde::Serialize + serde::de::DeserializeOwned,
    E: std::fmt::Display + 'static,
    F: FnOnce(T) -> Fut,
    Fut: std::future::Future<Output = Result<R, E>>,
{
    use crate::idempotency::Call;
    use crate::Error;
    let call = Call {
        scope,
        deadline_ms: Some(deadline_ms),
        key: batch.call_key(index, default_key),
        wait: idempotency.config().wait_for_in_progress,
        // Records of the batch with one key run once; the others replay it.
        batch: Some(batch),
    };
    match idempotency.execute(call, record, handler).await {
        Ok(_) => Ok(()),
        Err(Error::Handler(e)) => Err(e.to_string()),
        Err(Error::Replayed(e)) => Err(e.to_string()),
        Err(Error::Idempotency(e)) => Err(e.to_string()),
    }
}
