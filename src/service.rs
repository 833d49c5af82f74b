//! Lambda integration: a `tower` [`Service`] and [`Layer`] over `lambda_runtime`
//! handlers, and [`IdempotentFunction`] for any async function.

use crate::error::Error;
use crate::idempotency::{Call, CallKey, Idempotency};
use crate::store::IdempotencyStore;
use lambda_runtime::{Context, LambdaEvent};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use tower::{Layer, Service};

impl<S: IdempotencyStore> Idempotency<S> {
    /// Wraps a Lambda handler service (e.g. `lambda_runtime::service_fn(handler)`)
    /// into one that runs it at most once per idempotency key. The key prefix is the
    /// configured one, or `{function name}.{handler name}`: for `service_fn(handle)`
    /// the path of `handle`; for a closure, the function that defines it. Set
    /// [`key_prefix`](crate::IdempotencyConfigBuilder::key_prefix) to keep keys
    /// stable across refactoring.
    pub fn wrap<Svc>(&self, service: Svc) -> IdempotentService<Svc, S> {
        let scope = self.scope_for(&handler_name(std::any::type_name::<Svc>()));
        IdempotentService {
            inner: service,
            idempotency: self.clone(),
            scope: scope.into(),
        }
    }

    /// The same as [`wrap`](Self::wrap), as a `tower` layer for `ServiceBuilder`.
    pub fn layer(&self) -> IdempotencyLayer<S> {
        IdempotencyLayer {
            idempotency: self.clone(),
        }
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

/// A readable handler name from a service's type name: `ServiceFn<app::handle>`
/// gives `app::handle`, `ServiceFn<app::main::{{closure}}>` gives `app::main`.
fn handler_name(type_name: &str) -> String {
    let inner = match (type_name.find('<'), type_name.strip_suffix('>')) {
        (Some(start), Some(without_end)) => &without_end[start + 1..],
        _ => type_name,
    };
    inner
        .split("::")
        .filter(|segment| *segment != "{{closure}}")
        .collect::<Vec<_>>()
        .join("::")
}

/// A `tower::Layer` that makes the services it wraps idempotent.
pub struct IdempotencyLayer<S> {
    idempotency: Idempotency<S>,
}

impl<S> Clone for IdempotencyLayer<S> {
    fn clone(&self) -> Self {
        Self {
            idempotency: self.idempotency.clone(),
        }
    }
}

impl<S: IdempotencyStore, Svc> Layer<Svc> for IdempotencyLayer<S> {
    type Service = IdempotentService<Svc, S>;

    fn layer(&self, inner: Svc) -> Self::Service {
        self.idempotency.wrap(inner)
    }
}

/// A Lambda handler service that runs its inner service at most once per key.
///
/// Its error is a `lambda_runtime::Error`: the handler's own error, unchanged, or
/// a boxed [`IdempotencyError`](crate::IdempotencyError) /
/// [`PermanentError`](crate::PermanentError) (find them with `downcast_ref`).
pub struct IdempotentService<Svc, S> {
    inner: Svc,
    idempotency: Idempotency<S>,
    scope: Arc<str>,
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
    Svc::Error: Into<lambda_runtime::Error> + Send + 'static,
    T: Serialize + Send + 'static,
    R: Serialize + DeserializeOwned + Send + 'static,
{
    type Response = R;
    type Error = lambda_runtime::Error;
    type Future = Pin<Box<dyn Future<Output = Result<R, lambda_runtime::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
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
            };
            let result = idempotency
                .execute(call, payload, |payload| {
                    inner.call(LambdaEvent::new(payload, context))
                })
                .await;
            result
                .map(|executed| executed.response)
                .map_err(|err| match err {
                    Error::Handler(e) => e.into(),
                    Error::Replayed(e) => e.into(),
                    Error::Idempotency(e) => e.into(),
                })
        })
    }
}

/// An async function made idempotent by [`Idempotency::function`].
pub struct IdempotentFunction<F, S> {
    f: F,
    idempotency: Idempotency<S>,
    scope: Arc<str>,
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
        };
        let executed = self.idempotency.execute(call, payload, &self.f).await?;
        Ok(executed.response)
    }
}

#[cfg(test)]
mod tests {
    use super::handler_name;

    #[test]
    fn handler_names_come_from_the_wrapped_function() {
        assert_eq!(
            handler_name("tower::util::service_fn::ServiceFn<app::handle>"),
            "app::handle"
        );
        assert_eq!(
            handler_name("tower::util::service_fn::ServiceFn<app::main::{{closure}}::{{closure}}>"),
            "app::main"
        );
        assert_eq!(handler_name("app::OrderService"), "app::OrderService");
    }
}
