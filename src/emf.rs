//! CloudWatch Embedded Metric Format (EMF) for Lambda: the layer's counts as JSON
//! lines on stdout, which CloudWatch Logs turns into metrics with no API call and
//! no agent.
//!
//! [`install`] makes [`metrics_cloudwatch_embedded`]'s recorder the global
//! `metrics` recorder; [`EmfLayer`] writes what was counted after each
//! invocation (a frozen execution environment never flushes on a timer). Each
//! handler gets one EMF document per invocation, with the dimensions `function`,
//! `handler` and `mode`:
//!
//! ```
//! use lambda_idempotency::emf::{self, EmfLayer};
//! use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
//! use lambda_runtime::{service_fn, Error, LambdaEvent};
//! use serde_json::Value;
//! use tower::ServiceBuilder;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let collector = emf::install("Orders")?;
//! let config = IdempotencyConfig::builder().key_expression("order_id").build()?;
//! let idempotency = Idempotency::new(MemoryStore::new(), config);
//! let service = ServiceBuilder::new()
//!     .layer(EmfLayer::new(collector))
//!     .layer(idempotency.layer()?)
//!     .service(service_fn(|event: LambdaEvent<Value>| async move {
//!         Ok::<_, Error>(event.payload)
//!     }));
//! // lambda_runtime::run(service).await
//! # let _ = service;
//! # Ok(()) }
//! ```
#![cfg(feature = "emf")]

use crate::error::BoxError;
use metrics_cloudwatch_embedded::Builder;
/// The EMF recorder [`install`] returns: [`flush`](Collector::flush) it yourself
/// where no [`EmfLayer`] does (batches, functions), set properties on it.
pub use metrics_cloudwatch_embedded::Collector;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Installs the EMF recorder as the process's global `metrics` recorder, with
/// CloudWatch namespace `namespace`. Once per process, before the first
/// invocation (counters are bound to the recorder on a handler's first call); a
/// second call fails.
pub fn install(namespace: &str) -> Result<&'static Collector, BoxError> {
    Builder::new()
        .cloudwatch_namespace(namespace.to_owned())
        .init()
}

type MakeWriter = Arc<dyn Fn() -> Box<dyn Write + Send> + Send + Sync>;

/// A `tower` layer that writes the EMF documents of what was counted during each
/// call once the call ends (success or error): for the Lambda service, around the
/// idempotent handler. Around a batch or an [`IdempotentFunction`](crate::IdempotentFunction),
/// flush the collector yourself: `collector.flush(std::io::stdout())`.
#[derive(Clone)]
pub struct EmfLayer {
    collector: &'static Collector,
    writer: MakeWriter,
}

impl std::fmt::Debug for EmfLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmfLayer")
            .field("namespace", &self.collector.config.cloudwatch_namespace)
            .finish_non_exhaustive()
    }
}

impl EmfLayer {
    /// Writes to stdout (where Lambda's log agent picks EMF up).
    pub fn new(collector: &'static Collector) -> Self {
        Self::with_writer(collector, || Box::new(std::io::stdout()))
    }

    /// Writes each call's documents to a writer `make_writer` returns.
    pub fn with_writer(
        collector: &'static Collector,
        make_writer: impl Fn() -> Box<dyn Write + Send> + Send + Sync + 'static,
    ) -> Self {
        Self {
            collector,
            writer: Arc::new(make_writer),
        }
    }
}

impl<S> tower::Layer<S> for EmfLayer {
    type Service = EmfService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EmfService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`EmfLayer`] makes.
#[derive(Clone)]
pub struct EmfService<S> {
    inner: S,
    layer: EmfLayer,
}

impl<S> std::fmt::Debug for EmfService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmfService")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

impl<S, Request> tower::Service<Request> for EmfService<S>
where
    S: tower::Service<Request>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let call = self.inner.call(request);
        let layer = self.layer.clone();
        Box::pin(async move {
            let result = call.await;
            // Metrics must never fail an invocation: a lost flush is logged.
            if let Err(err) = layer.collector.flush((layer.writer)()) {
                tracing::warn!(error = %err, "could not write the EMF metrics");
            }
            result
        })
    }
}
