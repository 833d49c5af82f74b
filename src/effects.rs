//! What a running handler does to the outside world: steps with derived keys,
//! journaled so a retry does not redo them, and outbox messages committed with
//! the response.

use crate::error::{Error, IdempotencyError};
use crate::idempotency::Idempotency;
use crate::key::hash_value;
use crate::outbox::OutboxMessage;
use crate::store::{IdempotencyStore, StepRecord, StoreError};
use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

tokio::task_local! {
    static CURRENT: Effects;
}

/// The effects of the idempotent invocation running on this task: call it from
/// inside a wrapped handler (on the handler's own task, not a spawned one).
///
/// ```
/// use lambda_idempotency::{effects, Idempotency, IdempotencyConfig, MemoryStore};
/// use serde_json::{json, Value};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
/// let place_order = idempotency.function("place_order", |order: Value| async move {
///     let effects = effects()?;
///     // The key is the same on every retry of this order: send it to the payment API.
///     let charge = effects
///         .step("charge", |key| async move { Ok::<_, std::io::Error>(json!({ "charge": key })) })
///         .await?;
///     Ok::<_, lambda_idempotency::Error<std::io::Error>>(json!({ "order": order["id"], "charge": charge }))
/// });
/// let first = place_order.call(json!({ "id": 7 }), None).await?;
/// assert_eq!(first, place_order.call(json!({ "id": 7 }), None).await?);
/// # Ok(()) }
/// ```
pub fn effects() -> Result<Effects, IdempotencyError> {
    CURRENT
        .try_with(Effects::clone)
        .map_err(|_| IdempotencyError::NoEffects)
}

/// Steps and outbox of one idempotent invocation; see [`effects`].
#[derive(Clone)]
pub struct Effects {
    inner: Arc<Inner>,
}

struct Inner {
    key: String,
    journal: Arc<dyn Journal>,
    /// Only a retry (the reservation replaced an earlier record) can find journaled
    /// steps; a first execution skips the reads.
    retry: bool,
    expiration: i64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    position: usize,
    occurrences: HashMap<String, usize>,
    journaled: usize,
    staged: Vec<(String, OutboxMessage)>,
}

impl Effects {
    pub(crate) fn new<S: IdempotencyStore>(
        idempotency: &Idempotency<S>,
        key: &str,
        retry: bool,
        expiration: i64,
    ) -> Self {
        let inner = Inner {
            key: key.to_owned(),
            journal: Arc::new(idempotency.clone()),
            retry,
            expiration,
            state: Mutex::default(),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Runs `future` with these effects reachable through [`effects`].
    pub(crate) async fn scope<F: Future>(&self, future: F) -> F::Output {
        CURRENT.scope(self.clone(), future).await
    }

    /// The invocation's idempotency key.
    pub fn idempotency_key(&self) -> &str {
        &self.inner.key
    }

    /// Runs `f` once per invocation at this point of the handler, passing it a key
    /// derived from the invocation's key, the step's name and how many steps of
    /// that name came before: the same on every retry. Send it with the call
    /// (an `Idempotency-Key` header, a `ClientRequestToken`) so the receiver
    /// dedupes a call re-issued after a crash.
    ///
    /// The result is journaled before the handler goes on; a retry gets it back
    /// without calling `f`. A failed step is not journaled. A retry that calls a
    /// different step at a journaled position gets
    /// [`IdempotencyError::NonDeterministic`].
    pub async fn step<T, E, F, Fut>(&self, name: &str, f: F) -> Result<T, Error<E>>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        T: Serialize + DeserializeOwned,
    {
        let (position, derived) = {
            let mut state = self.state();
            let position = state.position;
            state.position += 1;
            let occurrence = state.occurrences.entry(name.to_owned()).or_default();
            let derived = derive_key(&self.inner.key, name, *occurrence);
            *occurrence += 1;
            (position, derived)
        };
        let journal_key = format!("{}#step#{position}", self.inner.key);

        if self.inner.retry {
            let journaled = self
                .inner
                .journal
                .get_step(&journal_key)
                .await
                .map_err(IdempotencyError::from)?;
            if let Some(step) = journaled {
                if step.name != name {
                    return Err(IdempotencyError::NonDeterministic {
                        key: self.inner.key.clone(),
                        position,
                        journaled: step.name,
                        called: name.to_owned(),
                    }
                    .into());
                }
                tracing::info!(step = name, position, "replaying a journaled step");
                self.state().journaled += 1;
                return serde_json::from_str(&step.data).map_err(|source| {
                    IdempotencyError::Serialization {
                        key: journal_key,
                        source,
                    }
                    .into()
                });
            }
        }

        let result = f(derived).await.map_err(Error::Handler)?;
        let data =
            serde_json::to_string(&result).map_err(|source| IdempotencyError::Serialization {
                key: journal_key.clone(),
                source,
            })?;
        let step = StepRecord {
            key: journal_key,
            name: name.to_owned(),
            data,
            expiration: self.inner.expiration,
        };
        self.inner
            .journal
            .put_step(&step)
            .await
            .map_err(IdempotencyError::from)?;
        self.state().journaled += 1;
        Ok(result)
    }

    /// The invocation's outbox: messages delivered after the response is committed.
    pub fn outbox(&self) -> Outbox<'_> {
        Outbox { effects: self }
    }

    /// Whether any step is journaled (then releasing must keep the journal).
    pub(crate) fn journaled_any(&self) -> bool {
        self.state().journaled > 0
    }

    /// The staged messages with their derived keys, emptying the outbox.
    pub(crate) fn take_staged(&self) -> Vec<(String, OutboxMessage)> {
        std::mem::take(&mut self.state().staged)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Stages messages for delivery after commit; see [`Effects::outbox`].
pub struct Outbox<'a> {
    effects: &'a Effects,
}

impl Outbox<'_> {
    /// Stages `message`. It is written with the completed record, in one
    /// transaction, and delivered after that with its derived key (returned here),
    /// at least once. Messages staged by a handler that fails are dropped.
    pub fn push(&self, mut message: OutboxMessage) -> String {
        // One FIFO group per invocation keeps its messages in order.
        if let OutboxMessage::Sqs {
            group_id: group @ None,
            ..
        } = &mut message
        {
            *group = Some(hash_value(&json!(self.effects.inner.key)));
        }
        let mut state = self.effects.state();
        let key = derive_key(&self.effects.inner.key, "outbox", state.staged.len());
        state.staged.push((key.clone(), message));
        key
    }
}

/// SHA-256 over (invocation key, name, occurrence), hex: 64 characters of
/// `[0-9a-f]`, valid as an `Idempotency-Key` header and as the `ClientRequestToken`
/// of AWS APIs (at most 64 characters).
fn derive_key(key: &str, name: &str, occurrence: usize) -> String {
    hash_value(&json!([key, name, occurrence]))
}

/// The `Idempotency-Key` header for an outgoing HTTP request.
pub fn idempotency_key_header(
    derived_key: &str,
) -> Result<
    (
        aws_lambda_events::http::HeaderName,
        aws_lambda_events::http::HeaderValue,
    ),
    aws_lambda_events::http::header::InvalidHeaderValue,
> {
    Ok((
        aws_lambda_events::http::HeaderName::from_static("idempotency-key"),
        aws_lambda_events::http::HeaderValue::from_str(derived_key)?,
    ))
}

/// A derived key as the `ClientRequestToken` of AWS APIs that take one (at most
/// 64 characters of `[a-zA-Z0-9-]`; a derived key always fits).
pub fn client_request_token(derived_key: &str) -> String {
    derived_key
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect()
}

/// The journal operations of a store, object-safe so that [`Effects`] is one type
/// whatever the store.
trait Journal: Send + Sync {
    fn get_step<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>>;
    fn put_step<'a>(&'a self, step: &'a StepRecord) -> BoxFuture<'a, Result<(), StoreError>>;
}

impl<S: IdempotencyStore> Journal for Idempotency<S> {
    fn get_step<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>> {
        Box::pin(self.store().get_step(key))
    }
    fn put_step<'a>(&'a self, step: &'a StepRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.store().put_step(step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_stable_distinct_and_fit_a_client_request_token() {
        let a = derive_key("fn#abc", "charge", 0);
        assert_eq!(a, derive_key("fn#abc", "charge", 0));
        assert_ne!(a, derive_key("fn#abc", "charge", 1));
        assert_ne!(a, derive_key("fn#abc", "refund", 0));
        assert_ne!(a, derive_key("fn#abd", "charge", 0));
        assert_eq!(a.len(), 64);
        assert_eq!(client_request_token(&a), a);
        assert_eq!(client_request_token("a_b!c"), "abc");
        let (name, value) =
            idempotency_key_header(&a).expect("a derived key is a valid header value");
        assert_eq!(
            (name.as_str(), value.to_str().ok()),
            ("idempotency-key", Some(a.as_str()))
        );
    }
}
