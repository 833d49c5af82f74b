//! A step as a value: [`Effects::step`] returns a [`Step`], which runs when
//! awaited, and may first be given the compensation that undoes it
//! ([`Step::compensate`]) and a retry policy for its call ([`Step::retry`]).

use super::saga::Undo;
use super::Effects;
use crate::error::{BoxError, Error, PermanentError};
use sealed::AfterFailure;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// One step of a handler, made by [`Effects::step`]: awaited, it runs its call
/// once per execution (or replays the journaled result) and gives back the
/// result, `Result<T, Error<E>>`. Before awaiting it, [`compensate`](Self::compensate)
/// declares what undoes it (a saga step) and [`retry`](Self::retry) retries its
/// call on failure.
///
/// ```
/// use lambda_idempotency::{effects, Error, Retry};
/// use std::time::Duration;
///
/// # async fn pay(key: &str) -> Result<String, std::io::Error> { Ok(key.to_owned()) }
/// # async fn refund(receipt: &str, key: &str) -> Result<(), std::io::Error> { Ok(()) }
/// # async fn handler() -> Result<String, Error<std::io::Error>> {
/// let receipt: String = effects()?
///     .step("charge", |key| async move { pay(&key).await })
///     .retry(Retry::exponential(4, Duration::from_millis(200)))
///     .compensate(|receipt: String, key| async move { refund(&receipt, &key).await })
///     .await?;
/// # Ok(receipt) }
/// ```
#[must_use = "a step runs when it is awaited"]
pub struct Step<'a, A, T, E> {
    effects: &'a Effects,
    name: String,
    calls: A,
    compensation: Option<Register<T>>,
    errors: PhantomData<fn() -> E>,
}

impl<A, T, E> std::fmt::Debug for Step<'_, A, T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("compensated", &self.compensation.is_some())
            .finish_non_exhaustive()
    }
}

/// Makes a step's compensation from its result.
pub(super) type Register<T> = Box<dyn FnOnce(&T) -> Undo + Send>;

impl<'a, A, T, E> Step<'a, A, T, E> {
    pub(super) fn new(effects: &'a Effects, name: &str, calls: A) -> Self {
        Self {
            effects,
            name: name.to_owned(),
            calls,
            compensation: None,
            errors: PhantomData,
        }
    }

    /// Declares what undoes this step: a saga step. Once the step completes (or
    /// replays), `compensation` is registered with its result; if the handler
    /// then fails permanently, the engine runs it, with its own derived key,
    /// once per execution (see [`Effects::step_with_compensation`], which this
    /// replaces).
    ///
    /// ```
    /// use lambda_idempotency::{effects, Error, PermanentError};
    ///
    /// # async fn handler() -> Result<(), lambda_runtime::Error> {
    /// let fx = effects()?;
    /// let hold: String = fx
    ///     .step("reserve_stock", |key| async move { Ok::<_, std::io::Error>(format!("hold-{key}")) })
    ///     .compensate(|hold: String, key| async move {
    ///         // Release `hold` at the warehouse, sending `key` as its idempotency key.
    ///         Ok::<_, std::io::Error>(format!("released {hold} with {key}"))
    ///     })
    ///     .await?;
    /// // Permanent: the hold is released before the call returns.
    /// Err(PermanentError::new(format!("cannot ship {hold}")).into())
    /// # }
    /// ```
    pub fn compensate<C, CFut, U, CE>(mut self, compensation: C) -> Self
    where
        T: Clone + Send + 'static,
        C: FnOnce(T, String) -> CFut + Send + 'static,
        CFut: Future<Output = Result<U, CE>> + Send + 'static,
        U: Serialize,
        CE: Into<BoxError>,
    {
        self.compensation = Some(Box::new(move |result: &T| -> Undo {
            let result = result.clone();
            Box::new(move |key| {
                Box::pin(async move {
                    let undone = compensation(result, key).await.map_err(Into::into)?;
                    Ok(serde_json::to_string(&undone)?)
                })
            })
        }));
        self
    }
}

impl<'a, F, Fut, T, E> Step<'a, Once<F>, T, E>
where
    F: FnOnce(String) -> Fut + Clone,
{
    /// Retries the step's call when it fails, as `policy` says, with the same
    /// derived key every time (the receiver dedupes an attempt that did reach
    /// it), never past the invocation's deadline less a second: the step then
    /// fails with its last error. A failed attempt is not journaled. Each
    /// attempt calls a clone of the closure, so it must be `Clone` (its
    /// captures are: references, clients, `Arc`s).
    ///
    /// ```
    /// use lambda_idempotency::{effects, Error, Retry};
    /// use std::time::Duration;
    ///
    /// # async fn handler() -> Result<(), Error<std::io::Error>> {
    /// let sent: String = effects()?
    ///     .step("notify", |key| async move { Ok::<_, std::io::Error>(key) })
    ///     .retry(Retry::exponential(3, Duration::from_millis(50)))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn retry(self, policy: Retry<E>) -> Step<'a, Retrying<F, E>, T, E> {
        // The call is taken only when the step runs, and `retry` consumes the
        // step before that: it is here.
        let call = self.calls.0.expect("a step's call is here until it runs");
        Step {
            effects: self.effects,
            name: self.name,
            calls: Retrying { call, policy },
            compensation: self.compensation,
            errors: PhantomData,
        }
    }
}

impl<'a, A, T, E> IntoFuture for Step<'a, A, T, E>
where
    A: sealed::Calls<T, E> + Send + 'a,
    T: Serialize + DeserializeOwned + Send + 'a,
    E: Send + 'a,
{
    type Output = Result<T, Error<E>>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(
            self.effects
                .run_step(self.name, self.calls, self.compensation),
        )
    }
}

/// A step's call, called once ([`Effects::step`]).
#[derive(Debug)]
pub struct Once<F>(Option<F>);

impl<F> Once<F> {
    pub(super) fn new(call: F) -> Self {
        Self(Some(call))
    }
}

/// A step's call with its retry policy ([`Step::retry`]).
pub struct Retrying<F, E> {
    call: F,
    policy: Retry<E>,
}

impl<F, E> std::fmt::Debug for Retrying<F, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retrying")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// When a failed step's call is tried again ([`Step::retry`]): up to a number
/// of attempts, after delays that double from a first one up to a maximum
/// (5 s by default), each a fifth longer or shorter at random, so that
/// executions failing together do not retry together; never past the
/// invocation's deadline less a second. Which errors are retried, and which
/// end the execution as a [`PermanentError`], is yours to say.
///
/// ```
/// use lambda_idempotency::{PermanentError, Retry};
/// use std::time::Duration;
///
/// #[derive(Debug)]
/// enum PaymentError { Unavailable, Declined(String) }
///
/// let policy = Retry::exponential(5, Duration::from_millis(100))
///     .max_delay(Duration::from_secs(2))
///     .retry_if(|e: &PaymentError| matches!(e, PaymentError::Unavailable))
///     .permanent_if(|e: &PaymentError| match e {
///         PaymentError::Declined(why) => Some(PermanentError::new(format!("declined: {why}"))),
///         PaymentError::Unavailable => None,
///     });
/// # let _ = policy;
/// ```
pub struct Retry<E> {
    attempts: u32,
    first_delay: Duration,
    max_delay: Duration,
    retry_if: Arc<dyn Fn(&E) -> bool + Send + Sync>,
    permanent_if: Option<Arc<Permanent<E>>>,
}

/// Says which errors end the execution permanently ([`Retry::permanent_if`]).
type Permanent<E> = dyn Fn(&E) -> Option<PermanentError> + Send + Sync;

impl<E> std::fmt::Debug for Retry<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retry")
            .field("attempts", &self.attempts)
            .field("first_delay", &self.first_delay)
            .field("max_delay", &self.max_delay)
            .finish_non_exhaustive()
    }
}

impl<E> Clone for Retry<E> {
    fn clone(&self) -> Self {
        Self {
            attempts: self.attempts,
            first_delay: self.first_delay,
            max_delay: self.max_delay,
            retry_if: Arc::clone(&self.retry_if),
            permanent_if: self.permanent_if.clone(),
        }
    }
}

impl<E> Retry<E> {
    /// At most `attempts` calls in all (the first included; 0 counts as 1),
    /// `first_delay` after the first failure, doubling; every error retried.
    ///
    /// ```
    /// # use lambda_idempotency::Retry;
    /// # use std::time::Duration;
    /// let policy: Retry<std::io::Error> = Retry::exponential(3, Duration::from_millis(100));
    /// # let _ = policy;
    /// ```
    pub fn exponential(attempts: u32, first_delay: Duration) -> Self {
        Self {
            attempts: attempts.max(1),
            first_delay,
            max_delay: Duration::from_secs(5),
            retry_if: Arc::new(|_| true),
            permanent_if: None,
        }
    }

    /// The longest delay between two attempts (default 5 s).
    ///
    /// ```
    /// # use lambda_idempotency::Retry;
    /// # use std::time::Duration;
    /// let policy: Retry<std::io::Error> =
    ///     Retry::exponential(10, Duration::from_millis(100)).max_delay(Duration::from_secs(1));
    /// # let _ = policy;
    /// ```
    pub fn max_delay(mut self, max: Duration) -> Self {
        self.max_delay = max;
        self
    }

    /// Retries only the errors for which `retryable` is true; the step fails at
    /// once with any other.
    ///
    /// ```
    /// # use lambda_idempotency::Retry;
    /// # use std::time::Duration;
    /// let policy = Retry::exponential(3, Duration::from_millis(100))
    ///     .retry_if(|e: &std::io::Error| e.kind() == std::io::ErrorKind::TimedOut);
    /// # let _ = policy;
    /// ```
    pub fn retry_if(mut self, retryable: impl Fn(&E) -> bool + Send + Sync + 'static) -> Self {
        self.retry_if = Arc::new(retryable);
        self
    }

    /// Gives up on the errors for which `permanent` returns a [`PermanentError`]:
    /// the step fails with the error at once, not retried, and the execution
    /// counts as failed permanently whatever the handler returns
    /// ([`Effects::abort`]): the saga's compensations run, and the permanent
    /// error is stored as its outcome.
    ///
    /// ```
    /// # use lambda_idempotency::{PermanentError, Retry};
    /// # use std::time::Duration;
    /// let policy = Retry::exponential(3, Duration::from_millis(100)).permanent_if(
    ///     |e: &std::io::Error| {
    ///         (e.kind() == std::io::ErrorKind::PermissionDenied)
    ///             .then(|| PermanentError::new("the payment API refused us"))
    ///     },
    /// );
    /// # let _ = policy;
    /// ```
    pub fn permanent_if(
        mut self,
        permanent: impl Fn(&E) -> Option<PermanentError> + Send + Sync + 'static,
    ) -> Self {
        self.permanent_if = Some(Arc::new(permanent));
        self
    }

    /// What to do after attempt `attempt` (from 1) failed with `error`.
    fn after(&self, attempt: u32, error: &E) -> AfterFailure {
        if let Some(permanent) = self.permanent_if.as_ref().and_then(|p| p(error)) {
            return AfterFailure::GiveUp(Some(permanent));
        }
        if attempt >= self.attempts || !(self.retry_if)(error) {
            return AfterFailure::GiveUp(None);
        }
        let doubled = self
            .first_delay
            .saturating_mul(1u32.checked_shl(attempt - 1).unwrap_or(u32::MAX));
        AfterFailure::Wait(jittered(doubled.min(self.max_delay)))
    }
}

/// `delay` give or take a fifth.
fn jittered(delay: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let fraction = 0.8 + (random % 401) as f64 / 1000.0;
    delay.mul_f64(fraction)
}

pub(super) mod sealed {
    use super::{Once, Retrying};
    use std::future::Future;

    /// What a failed attempt leads to.
    pub enum AfterFailure {
        /// Call again after this long.
        Wait(std::time::Duration),
        /// Fail with the error; permanently, if given.
        GiveUp(Option<crate::PermanentError>),
    }

    /// How a step calls its closure: once, or with retries.
    pub trait Calls<T, E> {
        /// The call's future.
        type Call: Future<Output = Result<T, E>> + Send;
        /// The call, with the step's derived key; `None` once the closure was
        /// used up (a closure called once).
        fn call(&mut self, key: String) -> Option<Self::Call>;
        /// What to do after attempt `attempt` (from 1) failed with `error`.
        fn after(&self, attempt: u32, error: &E) -> AfterFailure;
    }

    impl<F, Fut, T, E> Calls<T, E> for Once<F>
    where
        F: FnOnce(String) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send,
    {
        type Call = Fut;
        fn call(&mut self, key: String) -> Option<Fut> {
            self.0.take().map(|call| call(key))
        }
        fn after(&self, _: u32, _: &E) -> AfterFailure {
            AfterFailure::GiveUp(None)
        }
    }

    impl<F, Fut, T, E> Calls<T, E> for Retrying<F, E>
    where
        F: FnOnce(String) -> Fut + Clone,
        Fut: Future<Output = Result<T, E>> + Send,
    {
        type Call = Fut;
        fn call(&mut self, key: String) -> Option<Fut> {
            Some((self.call.clone())(key))
        }
        fn after(&self, attempt: u32, error: &E) -> AfterFailure {
            self.policy.after(attempt, error)
        }
    }
}
