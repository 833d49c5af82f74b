//! Lambda integration: a `tower` [`Service`] and [`Layer`] over `lambda_runtime`
//! handlers, and [`IdempotentFunction`] for any async function.

use crate::config::ConfigError;
use crate::error::Error;
use crate::idempotency::{Call, CallKey, Claimant, Idempotency};
use crate::store::IdempotencyStore;
use lambda_runtime::{Context, LambdaEvent};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::TypeId;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use tower::{Layer, Service};

impl<S: IdempotencyStore> Idempotency<S> {
    /// Wraps a Lambda handler service (e.g. `lambda_runtime::service_fn(handler)`)
    /// into one that runs it at most once per idempotency key.
    ///
    /// The key prefix is the configured [`key_prefix`](crate::IdempotencyConfigBuilder::key_prefix),
    /// or the function's name (`AWS_LAMBDA_FUNCTION_NAME`; `local` outside Lambda):
    /// never the handler's Rust path, which a rename or a compiler upgrade changes.
    /// A second, different handler under that prefix would replay the first one's
    /// responses, so it is refused with [`ConfigError::SharedKeyPrefix`]: name
    /// handlers apart with [`wrap_as`](Self::wrap_as). Without a `key_prefix` the
    /// claim holds for the whole process, per store
    /// [`location`](crate::IdempotencyStore::location): another `Idempotency` over
    /// the same records is refused too. Wrapping the same handler type again is
    /// fine.
    pub fn wrap<Svc: 'static>(
        &self,
        service: Svc,
    ) -> Result<IdempotentService<Svc, S>, ConfigError> {
        let scope = self.claim_default_scope(Claimant::Handler(TypeId::of::<Svc>()))?;
        Ok(self.service(scope, service))
    }

    /// Wraps a handler under the key prefix `{prefix}.{name}`, for several handlers
    /// in one function. `name` is the handler's identity: keep it when renaming the
    /// code; two handlers given the same name share their records.
    ///
    /// ```
    /// use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
    /// use lambda_runtime::{service_fn, Error, LambdaEvent};
    /// use serde_json::{json, Value};
    ///
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    /// let create = idempotency.wrap_as("create", service_fn(|e: LambdaEvent<Value>| async move {
    ///     Ok::<_, Error>(json!({ "created": e.payload["id"] }))
    /// }));
    /// let cancel = idempotency.wrap_as("cancel", service_fn(|e: LambdaEvent<Value>| async move {
    ///     Ok::<_, Error>(json!({ "cancelled": e.payload["id"] }))
    /// }));
    /// # let _ = (create, cancel);
    /// ```
    pub fn wrap_as<Svc>(&self, name: &str, service: Svc) -> IdempotentService<Svc, S> {
        self.service(self.function_scope(name), service)
    }

    fn service<Svc>(&self, scope: String, service: Svc) -> IdempotentService<Svc, S> {
        IdempotentService {
            inner: service,
            idempotency: self.clone(),
            scope: scope.into(),
        }
    }

    /// The same as [`wrap`](Self::wrap), as a `tower` layer for `ServiceBuilder`:
    /// the layer takes the default key prefix (refused if a handler or another
    /// layer has it, as for `wrap`: process-wide without a `key_prefix`), and
    /// every service it wraps uses that prefix.
    pub fn layer(&self) -> Result<IdempotencyLayer<S>, ConfigError> {
        static LAYERS: AtomicU64 = AtomicU64::new(0);
        let claimant = Claimant::Layer(LAYERS.fetch_add(1, Ordering::Relaxed));
        let scope = self.claim_default_scope(claimant)?;
        Ok(IdempotencyLayer {
            idempotency: self.clone(),
            scope: scope.into(),
        })
    }

    /// Makes an async function idempotent, for work inside a handler. `name` goes
    /// into the key, so two functions given the same payload get distinct keys.
    ///
    /// ```
    /// use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
    /// use serde_json::json;
    ///
    /// # #[tokio::main] async fn main() {
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    /// let charge = idempotency.function("charge", |order: serde_json::Value| async move {
    ///     Ok::<_, std::io::Error>(json!({ "charged": order["amount"] }))
    /// });
    /// let first = charge.call(json!({"amount": 5}), None).await.expect("runs");
    /// let again = charge.call(json!({"amount": 5}), None).await.expect("replays");
    /// assert_eq!(first, again);
    /// # }
    /// ```
    pub fn function<F>(&self, name: &str, f: F) -> IdempotentFunction<F, S> {
        IdempotentFunction {
            f,
            idempotency: self.clone(),
            scope: self.function_scope(name).into(),
        }
    }
}

/// A `tower::Layer` that makes the services it wraps idempotent.
pub struct IdempotencyLayer<S> {
    idempotency: Idempotency<S>,
    scope: Arc<str>,
}

impl<S> std::fmt::Debug for IdempotencyLayer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl<S: IdempotencyStore> IdempotencyLayer<S> {
    /// A layer over `idempotency`, as tower's layers are made: the same as
    /// [`Idempotency::layer`] (it takes the default key prefix).
    pub fn new(idempotency: &Idempotency<S>) -> Result<Self, ConfigError> {
        idempotency.layer()
    }
}

impl<S> Clone for IdempotencyLayer<S> {
    fn clone(&self) -> Self {
        Self {
            idempotency: self.idempotency.clone(),
            scope: Arc::clone(&self.scope),
        }
    }
}

impl<S: IdempotencyStore, Svc> Layer<Svc> for IdempotencyLayer<S> {
    type Service = IdempotentService<Svc, S>;

    fn layer(&self, inner: Svc) -> Self::Service {
        IdempotentService {
            inner,
            idempotency: self.idempotency.clone(),
            scope: Arc::clone(&self.scope),
        }
    }
}

/// A Lambda handler service that runs its inner service at most once per key.
///
/// Its error is an [`Error`]: the handler's own error, unchanged
/// ([`Error::Handler`]), an [`IdempotencyError`](crate::IdempotencyError), or a
/// replayed [`PermanentError`](crate::PermanentError). Under `lambda_runtime` each
/// reaches Lambda with its own `errorType`; the handler's keeps its own.
pub struct IdempotentService<Svc, S> {
    inner: Svc,
    idempotency: Idempotency<S>,
    scope: Arc<str>,
}

impl<Svc, S> std::fmt::Debug for IdempotentService<Svc, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotentService")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl<Svc: Clone, S> Clone for IdempotentService<Svc, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            idempotency: self.idempotency.clone(),
            scope: Arc::clone(&self.scope),
        }
    }
}

impl<Svc, S, T, R> Service<LambdaEvent<T>> for IdempotentService<Svc, S>
where
    S: IdempotencyStore,
    Svc: Service<LambdaEvent<T>, Response = R> + Clone + Send + 'static,
    Svc::Future: Send,
    Svc::Error: Send + 'static,
    T: Serialize + Send + 'static,
    R: Serialize + DeserializeOwned + Send + 'static,
{
    type Response = R;
    type Error = Error<Svc::Error>;
    type Future = Pin<Box<dyn Future<Output = Result<R, Error<Svc::Error>>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Error::Handler)
    }

    fn call(&mut self, event: LambdaEvent<T>) -> Self::Future {
        // The ready service goes into the future; a fresh clone waits for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let idempotency = self.idempotency.clone();
        let scope = Arc::clone(&self.scope);
        Box::pin(async move {
            let LambdaEvent { payload, context } = event;
            let call = Call {
                scope: &scope,
                deadline_ms: Some(context.deadline as i64),
                key: CallKey::Config,
                wait: idempotency.config().wait_for_in_progress,
                batch: None,
            };
            let result = idempotency
                .execute(call, payload, |payload| {
                    inner.call(LambdaEvent::new(payload, context))
                })
                .await;
            result.map(|executed| executed.response)
        })
    }
}

/// An async function made idempotent by [`Idempotency::function`].
pub struct IdempotentFunction<F, S> {
    f: F,
    idempotency: Idempotency<S>,
    scope: Arc<str>,
}

impl<F, S> std::fmt::Debug for IdempotentFunction<F, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotentFunction")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl<F: Clone, S> Clone for IdempotentFunction<F, S> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            idempotency: self.idempotency.clone(),
            scope: Arc::clone(&self.scope),
        }
    }
}

impl<F, S> IdempotentFunction<F, S>
where
    S: IdempotencyStore,
{
    /// Calls the function with `payload` unless a call with the same key completed.
    /// With a `Context`, the reservation lasts until the Lambda deadline; without,
    /// for the configured in-progress timeout.
    pub async fn call<P, R, E, Fut>(
        &self,
        payload: P,
        context: Option<&Context>,
    ) -> Result<R, Error<E>>
    where
        F: Fn(P) -> Fut,
        Fut: Future<Output = Result<R, E>>,
        P: Serialize + 'static,
        R: Serialize + DeserializeOwned,
        E: 'static,
    {
        let call = Call {
            scope: &self.scope,
            deadline_ms: context.map(|c| c.deadline as i64),
            key: CallKey::Config,
            wait: self.idempotency.config().wait_for_in_progress,
            batch: None,
        };
        let executed = self.idempotency.execute(call, payload, &self.f).await?;
        Ok(executed.response)
    }
}
