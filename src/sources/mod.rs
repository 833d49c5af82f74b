//! Event sources: batches whose records are each run through the engine, and
//! HTTP requests with `Idempotency-Key` semantics.

mod http;
mod sqs;
mod stream;

pub use http::{HttpIdempotency, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
pub use sqs::SqsBatch;
pub use stream::StreamBatch;

use crate::idempotency::{Call, CallKey, Idempotency};
use crate::key::JsonPath;
use crate::store::IdempotencyStore;
use crate::Error;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;

/// A built-in expression (a source's default key or caller). Called only with
/// constants, which compile: a panic here is a bug in this crate, not bad input.
fn field(expression: &'static str) -> JsonPath {
    JsonPath::compile(expression).expect("a built-in expression is valid")
}

/// Runs one record through the engine; the error, as text, for the logs.
async fn run_record<S, T, R, E, F, Fut>(
    idempotency: &Idempotency<S>,
    scope: &str,
    deadline_ms: i64,
    default_key: &JsonPath,
    record: T,
    handler: F,
) -> Result<(), String>
where
    S: IdempotencyStore,
    T: Serialize + 'static,
    R: Serialize + DeserializeOwned,
    E: std::fmt::Display + 'static,
    F: FnOnce(T) -> Fut,
    Fut: Future<Output = Result<R, E>>,
{
    let call = Call {
        scope,
        deadline_ms: Some(deadline_ms),
        key: CallKey::SourceDefault(default_key),
    };
    match idempotency.execute(call, record, handler).await {
        Ok(_) => Ok(()),
        Err(Error::Handler(e)) => Err(e.to_string()),
        Err(Error::Replayed(e)) => Err(e.to_string()),
        Err(Error::Idempotency(e)) => Err(e.to_string()),
    }
}
