//! A store wrapper that fails, crashes or pauses an invocation at a chosen store
//! call, for the crash-at-every-phase matrix.
#![allow(dead_code)]

use super::{caller, Counter};
use lambda_idempotency::store::{BoxFuture, OutboxRecord, StepRecord, StoreError};
use lambda_idempotency::{IdempotencyRecord, IdempotencyStore, OutboxStore, StepJournal};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// A store call (or the external effect a step makes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Reserve,
    GetStep,
    PutStep,
    /// The step's external call has been made, its result not yet journaled.
    Effect,
    /// Completing, and releasing while keeping the journal (both write the record).
    Complete,
    /// Releasing by delete.
    Release,
    MarkDelivered,
    Get,
    GetOutbox,
    PendingOutbox,
}

/// What happens at the chosen call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The call fails with a store error; the invocation goes on handling it.
    Fail,
    /// The process dies before the call reaches the store.
    CrashBefore,
    /// The call is applied, then the process dies before seeing the response.
    CrashAfter,
    /// The call is applied, then the invocation stalls (past its deadline) until
    /// the test resumes it: a late attempt.
    PauseAfter,
}

#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub op: Op,
    /// 1-based: the nth call of `op` since the plan was set.
    pub nth: usize,
    pub mode: Mode,
}

/// A planned fault that fired, and the [`CALLER`](super::CALLER) it hit.
#[derive(Debug, Clone, Copy)]
pub struct Fired {
    pub caller: &'static str,
    pub op: Op,
    pub mode: Mode,
}

#[derive(Default)]
struct Plan {
    faults: Vec<Fault>,
    seen: Vec<(Op, usize)>,
    fired: Vec<Fired>,
}

/// Shared between the store wrapper, the handler (for [`Op::Effect`]) and the test.
#[derive(Clone, Default)]
pub struct Faults {
    plan: Arc<Mutex<Plan>>,
    /// Notified when an invocation crashes: the test drops its future.
    pub crashed: Arc<Notify>,
    /// Notified when an invocation pauses; the test resumes it with `resume`.
    pub paused: Arc<Notify>,
    resume: Arc<Notify>,
    /// Set by `hold_next`: the next invocation to reach a planned failure stops there.
    hold: Arc<AtomicBool>,
    /// Notified when an invocation stops at a hold; the test lets it go with `go`.
    pub held: Arc<Notify>,
    go: Arc<Notify>,
}

impl Faults {
    pub fn set(&self, faults: &[Fault]) {
        let mut plan = self.plan.lock().expect("plan");
        plan.faults = faults.to_vec();
        plan.seen.clear();
        plan.fired.clear();
    }

    /// The next planned fault (or [`hold`](Self::hold) point) that an invocation
    /// reaches holds it there until `go`: a failure is returned only then (a
    /// crash or a pause holds it anyway). One hold, for the first attempt: the
    /// test makes a duplicate arrive while that attempt is in flight at its cut.
    pub fn hold_next(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// A point where the invocation holds if `hold_next` is due (a handler's
    /// planned failure, which is no store call).
    pub async fn hold(&self) {
        if self.hold.swap(false, Ordering::SeqCst) {
            self.held.notify_one();
            self.go.notified().await;
        }
    }

    /// Lets a held invocation go on.
    pub fn go(&self) {
        self.go.notify_one();
    }

    /// The planned faults that fired, in order.
    pub fn fired(&self) -> Vec<Fired> {
        self.plan.lock().expect("plan").fired.clone()
    }

    /// Lets a paused invocation go on.
    pub fn resume(&self) {
        self.resume.notify_one();
    }

    /// The mode due at this call of `op`, if any (each fault fires once).
    fn due(&self, op: Op) -> Option<Mode> {
        let mut plan = self.plan.lock().expect("plan");
        let count = match plan.seen.iter_mut().find(|(o, _)| *o == op) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                plan.seen.push((op, 1));
                1
            }
        };
        let index = plan
            .faults
            .iter()
            .position(|f| f.op == op && f.nth == count)?;
        let mode = plan.faults.remove(index).mode;
        plan.fired.push(Fired {
            caller: caller(),
            op,
            mode,
        });
        Some(mode)
    }

    /// Runs `call` under the plan for `op`.
    pub async fn around<T>(
        &self,
        op: Op,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.due(op) {
            None => call.await,
            Some(Mode::Fail) => {
                self.hold().await;
                Err(StoreError::Backend(
                    format!("injected failure at {op:?}").into(),
                ))
            }
            Some(Mode::CrashBefore) => self.crash().await,
            Some(Mode::CrashAfter) => {
                let _ = call.await;
                self.crash().await
            }
            Some(Mode::PauseAfter) => {
                let result = call.await;
                self.pause().await;
                result
            }
        }
    }

    /// The external effect of a step has happened: crash here if planned.
    pub async fn after_effect(&self) {
        if let Some(mode) = self.due(Op::Effect) {
            match mode {
                Mode::PauseAfter => self.pause().await,
                _ => self.crash().await,
            }
        }
    }

    /// Stalls until the test resumes the invocation.
    async fn pause(&self) {
        // A pause holds the invocation anyway: the hold, if due, is spent.
        self.hold.store(false, Ordering::SeqCst);
        self.paused.notify_one();
        self.resume.notified().await;
    }

    /// Never returns: the test drops the invocation, as a killed process would.
    async fn crash<T>(&self) -> T {
        // A crash holds the invocation anyway: the hold, if due, is spent.
        self.hold.store(false, Ordering::SeqCst);
        self.crashed.notify_one();
        std::future::pending().await
    }
}

/// A reservation the store granted: who asked, the record reserved, and the
/// record it replaced (abandoned, released open, or expired), if any.
#[derive(Debug, Clone)]
pub struct Granted {
    pub caller: &'static str,
    pub record: IdempotencyRecord,
    pub replaced: Option<IdempotencyRecord>,
}

/// `inner` behind a test's hands: it counts calls, fails the operations named
/// in `failing`, injects the planned faults, can send every write twice (as the
/// SDK does when a response is lost) and can answer refused reservations late.
/// It logs the reservations it grants.
#[derive(Clone)]
pub struct FaultStore<S> {
    pub inner: S,
    pub faults: Faults,
    /// Store calls made, of every kind.
    pub calls: Counter,
    /// The reservations the store granted, in order.
    pub granted: Arc<Mutex<Vec<Granted>>>,
    failing: &'static [Op],
    repeat_writes: bool,
    slow_refusals: Option<Duration>,
    records_only: bool,
    outbox_scope: Option<String>,
}

impl<S> FaultStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            faults: Faults::default(),
            calls: Counter::default(),
            granted: Arc::default(),
            failing: &[],
            repeat_writes: false,
            slow_refusals: None,
            records_only: false,
            outbox_scope: None,
        }
    }

    /// Another execution environment's store on `inner` (the same table): under
    /// the same fault plan (the nth call of an operation counts the calls of
    /// both) and the same log of grants, with its own call counter.
    pub fn beside(&self, inner: S) -> Self {
        Self {
            inner,
            faults: self.faults.clone(),
            calls: Counter::default(),
            granted: Arc::clone(&self.granted),
            failing: self.failing,
            repeat_writes: self.repeat_writes,
            slow_refusals: self.slow_refusals,
            records_only: self.records_only,
            outbox_scope: self.outbox_scope.clone(),
        }
    }

    /// Every call of these operations fails with a store error.
    pub fn failing(inner: S, failing: &'static [Op]) -> Self {
        Self {
            failing,
            ..Self::new(inner)
        }
    }

    /// Each write is applied, then sent again and the repeat's answer returned:
    /// a write whose first response was lost.
    pub fn repeating_writes(self) -> Self {
        Self {
            repeat_writes: true,
            ..self
        }
    }

    /// Offers only the record contract: no step journal, no outbox (a backend
    /// that implements [`IdempotencyStore`] alone).
    pub fn records_only(self) -> Self {
        Self {
            records_only: true,
            ..self
        }
    }

    /// `pending_outbox` (hence the relay's sweep) sees only the messages whose
    /// key starts with `prefix`: a test's own, on a server other tests share.
    pub fn with_outbox_scope(self, prefix: &str) -> Self {
        Self {
            outbox_scope: Some(prefix.to_owned()),
            ..self
        }
    }

    /// A refused reservation reaches the caller `delay` late (a slow network).
    pub fn with_slow_refusals(self, delay: Duration) -> Self {
        Self {
            slow_refusals: Some(delay),
            ..self
        }
    }

    async fn call<T, Fut>(&self, op: Op, send: impl Fn() -> Fut) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.calls.hit();
        if self.failing.contains(&op) {
            return Err(StoreError::Backend(
                format!("injected store failure in {op:?}").into(),
            ));
        }
        let once = async {
            let first = send().await;
            match (self.repeat_writes && op.is_write(), first) {
                (true, Ok(_)) => send().await,
                (_, first) => first,
            }
        };
        let result = self.faults.around(op, once).await;
        if let (Some(delay), Err(StoreError::Exists { .. })) = (self.slow_refusals, &result) {
            tokio::time::sleep(delay).await;
        }
        result
    }
}

impl Op {
    fn is_write(self) -> bool {
        !matches!(
            self,
            Op::Get | Op::GetStep | Op::GetOutbox | Op::PendingOutbox | Op::Effect
        )
    }
}

impl<S: IdempotencyStore> IdempotencyStore for FaultStore<S> {
    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.call(Op::Get, || self.inner.get(key)).await
    }
    async fn reserve(
        &self,
        record: &IdempotencyRecord,
        now_ms: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let replaced = self
            .call(Op::Reserve, || self.inner.reserve(record, now_ms))
            .await?;
        self.granted.lock().expect("granted").push(Granted {
            caller: caller(),
            record: record.clone(),
            replaced: replaced.clone(),
        });
        Ok(replaced)
    }
    async fn complete(&self, record: &IdempotencyRecord) -> Result<(), StoreError> {
        self.call(Op::Complete, || self.inner.complete(record))
            .await
    }
    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        self.call(Op::Release, || self.inner.release(key, owner))
            .await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
    fn journal(&self) -> Option<&dyn StepJournal> {
        self.inner
            .journal()
            .filter(|_| !self.records_only)
            .map(|_| self as &dyn StepJournal)
    }
    fn outbox(&self) -> Option<&dyn OutboxStore> {
        self.inner
            .outbox()
            .filter(|_| !self.records_only)
            .map(|_| self as &dyn OutboxStore)
    }
}

impl<S: IdempotencyStore> FaultStore<S> {
    fn inner_journal(&self) -> &dyn StepJournal {
        self.inner
            .journal()
            .expect("offered only when the inner store has one")
    }
    fn inner_outbox(&self) -> &dyn OutboxStore {
        self.inner
            .outbox()
            .expect("offered only when the inner store has one")
    }
}

impl<S: IdempotencyStore> StepJournal for FaultStore<S> {
    fn put_step<'a>(
        &'a self,
        step: &'a StepRecord,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>> {
        Box::pin(self.call(Op::PutStep, move || self.inner_journal().put_step(step)))
    }
    fn get_step<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>> {
        Box::pin(self.call(Op::GetStep, move || self.inner_journal().get_step(key)))
    }
}

impl<S: IdempotencyStore> OutboxStore for FaultStore<S> {
    fn commit<'a>(
        &'a self,
        record: &'a IdempotencyRecord,
        outbox: &'a [OutboxRecord],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.call(Op::Complete, move || {
            self.inner_outbox().commit(record, outbox)
        }))
    }
    fn get_outbox<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<OutboxRecord>, StoreError>> {
        Box::pin(self.call(Op::GetOutbox, move || self.inner_outbox().get_outbox(key)))
    }
    fn mark_delivered<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.call(Op::MarkDelivered, move || {
            self.inner_outbox().mark_delivered(key)
        }))
    }
    fn pending_outbox(&self) -> BoxFuture<'_, Result<Vec<OutboxRecord>, StoreError>> {
        Box::pin(async move {
            let mut pending = self
                .call(Op::PendingOutbox, move || {
                    self.inner_outbox().pending_outbox()
                })
                .await?;
            if let Some(scope) = &self.outbox_scope {
                pending.retain(|message| message.key.starts_with(scope.as_str()));
            }
            Ok(pending)
        })
    }
}
