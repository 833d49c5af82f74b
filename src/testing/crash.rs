//! The kit's store wrapper: it counts every store call of a scenario, records the
//! steps a clean run journals (and the outbox messages it commits), and cuts an
//! attempt at a planned call as a killed process would: the call is applied (or
//! not), then the attempt never resumes and the kit drops its future.

use crate::record::IdempotencyRecord;
use crate::store::{BoxFuture, IdempotencyStore, StepJournal, StepRecord, StoreError};
#[cfg(feature = "outbox")]
use crate::store::{OutboxRecord, OutboxStore};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// A store call the kit can cut an attempt at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Reserve,
    PutStep,
    /// Completing (with or without an outbox), and keeping an open record after a
    /// failed attempt with steps: both replace the record under our owner token.
    Complete,
    Other,
}

/// Where the planned crash happens: before the nth call of `op` reaches the
/// store, or after it was applied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cut {
    pub(crate) op: Op,
    /// 1-based.
    pub(crate) nth: usize,
    pub(crate) applied: bool,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) cut: Option<Cut>,
    /// Calls of each op seen since the scenario began: (reserve, put_step, complete).
    seen: [usize; 3],
    /// Every store request of the scenario (the engine's and the kit's own).
    pub(crate) requests: usize,
    /// Handler entries.
    pub(crate) executions: usize,
    /// Names of the steps journaled, in order.
    pub(crate) steps: Vec<String>,
    /// Outbox records committed in the scenario.
    #[cfg(feature = "outbox")]
    pub(crate) committed: Vec<OutboxRecord>,
    /// Hold handler entries until this many reservations were answered.
    pub(crate) hold_until: Option<usize>,
}

/// Shared by the store wrapper, the handler wrapper and the kit.
#[derive(Debug, Default)]
pub(crate) struct Probe {
    state: Mutex<State>,
    /// An attempt reached its planned cut.
    pub(crate) crashed: Notify,
    /// A reservation was answered.
    reserved: Notify,
}

impl Probe {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A fresh scenario: counters at zero, the given cut planned.
    pub(crate) fn begin(&self, cut: Option<Cut>, hold_until: Option<usize>) {
        *self.state() = State {
            cut,
            hold_until,
            ..State::default()
        };
    }

    /// Counts a handler entry, then (concurrent runs) holds it until every
    /// duplicate has had its reservation answered, or for at most two seconds.
    pub(crate) async fn enter_handler(&self) {
        let target = {
            let mut state = self.state();
            state.executions += 1;
            state.hold_until
        };
        let Some(target) = target else { return };
        let wait = async {
            loop {
                let notified = self.reserved.notified();
                if self.state().seen[0] >= target {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), wait).await;
    }

    /// Whether this call of `op` is the planned cut, and if so whether it is applied first.
    fn due(&self, op: Op) -> Option<bool> {
        let mut state = self.state();
        state.requests += 1;
        let index = match op {
            Op::Reserve => 0,
            Op::PutStep => 1,
            Op::Complete => 2,
            Op::Other => return None,
        };
        state.seen[index] += 1;
        let nth = state.seen[index];
        match state.cut {
            Some(cut) if cut.op == op && cut.nth == nth => {
                state.cut = None;
                Some(cut.applied)
            }
            _ => None,
        }
    }

    /// Sends `call` under the plan for `op`. A closure, called only when the call
    /// is to reach the store: some stores apply a write when its future is made
    /// (the memory store's journal and outbox do).
    async fn around<T, Fut>(&self, op: Op, call: impl FnOnce() -> Fut) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let result = match self.due(op) {
            None => call().await,
            Some(applied) => {
                if applied {
                    let _ = call().await;
                }
                self.crashed.notify_one();
                // The process is gone: this attempt never goes on.
                return std::future::pending().await;
            }
        };
        if op == Op::Reserve {
            self.reserved.notify_waiters();
        }
        result
    }
}

/// The user's store behind the kit's [`Probe`].
#[derive(Debug, Clone)]
pub(crate) struct CrashStore<S> {
    pub(crate) inner: S,
    pub(crate) probe: Arc<Probe>,
}

impl<S: IdempotencyStore> IdempotencyStore for CrashStore<S> {
    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.probe.around(Op::Other, || self.inner.get(key)).await
    }

    async fn reserve(
        &self,
        record: &IdempotencyRecord,
        now_ms: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.probe
            .around(Op::Reserve, || self.inner.reserve(record, now_ms))
            .await
    }

    async fn complete(&self, record: &IdempotencyRecord) -> Result<(), StoreError> {
        self.probe
            .around(Op::Complete, || self.inner.complete(record))
            .await
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        self.probe
            .around(Op::Other, || self.inner.release(key, owner))
            .await
    }

    fn location(&self) -> String {
        self.inner.location()
    }

    fn journal(&self) -> Option<&dyn StepJournal> {
        self.inner.journal().map(|_| self as &dyn StepJournal)
    }

    #[cfg(feature = "outbox")]
    fn outbox(&self) -> Option<&dyn OutboxStore> {
        self.inner.outbox().map(|_| self as &dyn OutboxStore)
    }
}

impl<S: IdempotencyStore> StepJournal for CrashStore<S> {
    fn put_step<'a>(
        &'a self,
        step: &'a StepRecord,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>> {
        Box::pin(async move {
            let journal = self.inner.journal().ok_or_else(no_journal)?;
            let written = self
                .probe
                .around(Op::PutStep, || journal.put_step(step))
                .await;
            if written.is_ok() {
                self.probe.state().steps.push(step.name.clone());
            }
            written
        })
    }

    fn get_step<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>> {
        Box::pin(async move {
            let journal = self.inner.journal().ok_or_else(no_journal)?;
            self.probe.around(Op::Other, || journal.get_step(key)).await
        })
    }
}

fn no_journal() -> StoreError {
    StoreError::Backend("the store offers no step journal".into())
}

#[cfg(feature = "outbox")]
fn no_outbox() -> StoreError {
    StoreError::Backend("the store offers no outbox".into())
}

#[cfg(feature = "outbox")]
impl<S: IdempotencyStore> OutboxStore for CrashStore<S> {
    fn commit<'a>(
        &'a self,
        record: &'a IdempotencyRecord,
        outbox: &'a [OutboxRecord],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let store = self.inner.outbox().ok_or_else(no_outbox)?;
            // Recorded before the call: a commit applied and then cut counts.
            self.probe.state().committed.extend_from_slice(outbox);
            self.probe
                .around(Op::Complete, || store.commit(record, outbox))
                .await
        })
    }

    fn get_outbox<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<OutboxRecord>, StoreError>> {
        Box::pin(async move {
            let store = self.inner.outbox().ok_or_else(no_outbox)?;
            self.probe.around(Op::Other, || store.get_outbox(key)).await
        })
    }

    fn mark_delivered<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let store = self.inner.outbox().ok_or_else(no_outbox)?;
            self.probe
                .around(Op::Other, || store.mark_delivered(key))
                .await
        })
    }

    fn pending_outbox(&self) -> BoxFuture<'_, Result<Vec<OutboxRecord>, StoreError>> {
        Box::pin(async move {
            let store = self.inner.outbox().ok_or_else(no_outbox)?;
            self.probe
                .around(Op::Other, || store.pending_outbox())
                .await
        })
    }
}
