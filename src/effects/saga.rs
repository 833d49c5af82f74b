//! Sagas: steps declared with their compensation, undone in reverse order when
//! the handler fails permanently. The engine calls [`Effects::compensate`] from
//! its handler-error branch; everything else is here.

use super::{derive_key, Effects};
use crate::error::{BoxError, Error, IdempotencyError, PermanentError};
use crate::outcome::Event;
use crate::store::{BoxFuture, StepRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::sync::MutexGuard;

/// A registered compensation: called with its derived key, it undoes its step
/// and gives its own result as JSON (journaled).
pub(super) type Undo =
    Box<dyn FnOnce(String) -> BoxFuture<'static, Result<String, BoxError>> + Send>;

/// What the saga of one attempt holds.
#[derive(Default)]
pub(crate) struct Saga {
    /// The compensations of the steps that completed (or replayed), in the
    /// order they did.
    registered: Vec<Compensation>,
    /// The permanent error given to [`Effects::abort`].
    aborted: Option<PermanentError>,
}

struct Compensation {
    /// The step's position: the compensation's journal entry is
    /// `{key}#{execution}#compensation#{position}`.
    position: usize,
    /// The step's name.
    step: String,
    /// `derive_key(scope, "compensate:{name}", occurrence)`.
    derived: String,
    undo: Undo,
}

impl Effects {
    /// [`step`](Self::step), declared with the compensation that undoes it: a
    /// saga step.
    ///
    /// `f` runs once per execution exactly as with `step`. Once it completes (or
    /// replays from the journal), `compensation` is registered with the step's
    /// result. If the handler then fails permanently (it returns a
    /// [`PermanentError`], directly, boxed as a `lambda_runtime::Error`, or as a
    /// step's failure passed on with `?`, or it
    /// called [`abort`](Self::abort)), the engine runs the registered
    /// compensations before the call returns, the latest step's first, each
    /// once per execution:
    ///
    /// - each gets the step's result and its own derived key, SHA-256 over (the
    ///   execution, `compensate:{name}`, the step's occurrence): send it to the
    ///   receiver (`Idempotency-Key`) so a compensation re-sent after a crash is
    ///   deduped;
    /// - each is journaled like a step when it succeeds
    ///   (`{key}#{execution}#compensation#{n}`, `n` the step's position, with
    ///   the compensation's result); a retry skips the journaled ones;
    /// - when one fails (or the attempt crashes while compensating) the call
    ///   fails with [`IdempotencyError::CompensationFailed`] (or not at all) and
    ///   the record stays open: the retry resumes the execution, its steps replay
    ///   and register their compensations again, the handler fails the same way,
    ///   and the compensations not yet journaled run;
    /// - when all are done, the permanent error is stored as the record's
    ///   outcome, whatever [`replay_permanent_errors`](crate::IdempotencyConfigBuilder::replay_permanent_errors)
    ///   says: later retries get it back ([`Error::Replayed`]) and nothing runs again.
    ///
    /// Any other handler error (a transient failure) compensates nothing: the
    /// record stays open for the retry, which resumes the execution.
    ///
    /// The handler must be deterministic about failing: a retry of an execution
    /// that was compensating must fail permanently again. If it succeeds instead,
    /// its response is stored, and the compensations journaled so far stay done
    /// (nothing undoes a compensation). Compensations run outside the handler's
    /// task scope: [`effects()`](fn@crate::effects) is not available in them. An
    /// unprotected invocation (see [`Effects`]) does not compensate.
    ///
    /// ```
    /// use lambda_idempotency::{effects, Error, Idempotency, IdempotencyConfig, MemoryStore, PermanentError};
    /// use serde_json::{json, Value};
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let refunds = Arc::new(AtomicUsize::new(0));
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    /// let place_order = idempotency.function("place_order", |order: Value| {
    ///     let refunds = refunds.clone();
    ///     async move {
    ///         let effects = effects()?;
    ///         // A real handler sends `key` to the payment API, and `refund_key` with the refund.
    ///         let charge = effects
    ///             .step_with_compensation(
    ///                 "charge",
    ///                 |key| async move { Ok::<_, std::io::Error>(json!({ "charge": key })) },
    ///                 move |charge: Value, refund_key| async move {
    ///                     refunds.fetch_add(1, Ordering::SeqCst);
    ///                     Ok::<_, std::io::Error>(json!({ "refunded": charge["charge"], "key": refund_key }))
    ///                 },
    ///             )
    ///             .await?;
    ///         if order["address"].is_null() {
    ///             // Permanent: the refund runs before the call returns.
    ///             return Err(PermanentError::new("no shipping address").into());
    ///         }
    ///         Ok::<_, lambda_runtime::Error>(charge)
    ///     }
    /// });
    /// assert!(place_order.call(json!({ "id": 7 }), None).await.is_err());
    /// assert_eq!(refunds.load(Ordering::SeqCst), 1);
    /// // The stored failure is replayed; nothing runs again.
    /// let retry = place_order.call(json!({ "id": 7 }), None).await;
    /// assert!(matches!(retry, Err(Error::Replayed(e)) if e.message == "no shipping address"));
    /// assert_eq!(refunds.load(Ordering::SeqCst), 1);
    /// # Ok(()) }
    /// ```
    pub async fn step_with_compensation<T, E, F, Fut, C, CFut, U, CE>(
        &self,
        name: &str,
        f: F,
        compensation: C,
    ) -> Result<T, Error<E>>
    where
        F: FnOnce(String) -> Fut + Send,
        Fut: Future<Output = Result<T, E>> + Send,
        E: Send,
        T: Serialize + DeserializeOwned + Clone + Send + 'static,
        C: FnOnce(T, String) -> CFut + Send + 'static,
        CFut: Future<Output = Result<U, CE>> + Send + 'static,
        U: Serialize,
        CE: Into<BoxError>,
    {
        self.step(name, f).compensate(compensation).await
    }

    /// Registers the compensation of the step at `position` (the `occurrence`th
    /// of its name), made from the step's result.
    pub(super) fn register<T>(
        &self,
        compensation: Option<super::step::Register<T>>,
        result: &T,
        position: usize,
        name: &str,
        occurrence: usize,
    ) {
        let Some(compensation) = compensation else {
            return;
        };
        let derived = derive_key(&self.inner.scope, &format!("compensate:{name}"), occurrence);
        self.saga().registered.push(Compensation {
            position,
            step: name.to_owned(),
            derived,
            undo: compensation(result),
        });
    }

    /// Aborts the saga: the execution counts as failed permanently with `error`
    /// whatever error the handler then returns, so the compensations of its
    /// completed steps run (see [`step_with_compensation`](Self::step_with_compensation))
    /// and `error` is stored as its outcome. Returns `error`, for the handler to
    /// return (`return Err(effects.abort(PermanentError::new("out of stock")).into())`).
    ///
    /// Returning a [`PermanentError`] (directly, boxed as a `lambda_runtime::Error`,
    /// or a step's passed on with `?`) is the same abort; `abort` is for handlers whose error type cannot hold one.
    /// Without compensations registered, an abort is a permanent error like any
    /// other: stored only with `replay_permanent_errors`.
    ///
    /// ```
    /// use lambda_idempotency::{Effects, PermanentError};
    ///
    /// #[derive(Debug)]
    /// enum OrderError { OutOfStock(String) }
    /// # async fn in_stock(_: &str) -> bool { false }
    ///
    /// async fn check_stock(fx: &Effects, sku: &str) -> Result<(), OrderError> {
    ///     if !in_stock(sku).await {
    ///         // `OrderError` has no room for a `PermanentError`: without the abort the
    ///         // engine sees a transient failure and undoes none of the completed steps.
    ///         let error = fx.abort(PermanentError::new(format!("{sku} is out of stock")));
    ///         return Err(OrderError::OutOfStock(error.message));
    ///     }
    ///     Ok(())
    /// }
    /// ```
    pub fn abort(&self, error: PermanentError) -> PermanentError {
        self.saga().aborted = Some(error.clone());
        error
    }

    /// The permanent error given to [`abort`](Self::abort), if any.
    pub(crate) fn aborted(&self) -> Option<PermanentError> {
        self.saga().aborted.clone()
    }

    /// Whether a step with a compensation completed in this attempt.
    pub(crate) fn has_compensations(&self) -> bool {
        !self.saga().registered.is_empty()
    }

    /// Runs the registered compensations, the latest step's first, each once per
    /// execution: the ones an earlier attempt journaled are skipped, each one
    /// that runs is journaled. Stops at the first failure.
    pub(crate) async fn compensate(
        &self,
        failure: &PermanentError,
    ) -> Result<(), IdempotencyError> {
        let mut registered = std::mem::take(&mut self.saga().registered);
        registered.sort_by_key(|c| std::cmp::Reverse(c.position));
        let journal = match &self.inner.store {
            Some(store) => Some(store.journal().ok_or(IdempotencyError::Unsupported {
                missing: "step journal",
            })?),
            None => None,
        };
        let key = self.inner.key.clone().unwrap_or_default();
        for compensation in registered {
            let entry = format!(
                "{}#compensation#{}",
                self.inner.scope, compensation.position
            );
            let name = format!("compensate:{}", compensation.step);
            if let (Some(journal), true) = (journal, self.inner.resumed)
                && let Some(done) = journal.get_step(&entry).await?
            {
                if done.name != name {
                    let detail = format!("the saga now compensates with {name:?}");
                    return Err(IdempotencyError::NonDeterministic {
                        key,
                        position: compensation.position,
                        journaled: done.name,
                        called: name,
                        detail,
                    });
                }
                self.inner.meter.event(Event::CompensationReplayed, 1);
                tracing::debug!(
                    step = compensation.step,
                    "compensation journaled already; not run again"
                );
                continue;
            }
            tracing::info!(step = compensation.step, "compensating");
            self.inner.meter.event(Event::CompensationRun, 1);
            let data = (compensation.undo)(compensation.derived)
                .await
                .map_err(|source| IdempotencyError::CompensationFailed {
                    key: key.clone(),
                    step: compensation.step.clone(),
                    failure: failure.message.clone(),
                    source,
                })?;
            if let Some(journal) = journal {
                let record = StepRecord {
                    key: entry,
                    name,
                    data,
                    expiration: self.inner.expiration,
                };
                // `Some`: a late attempt of the execution journaled it first; done either way.
                journal.put_step(&record).await?;
            }
        }
        Ok(())
    }

    fn saga(&self) -> MutexGuard<'_, Saga> {
        self.inner
            .saga
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
