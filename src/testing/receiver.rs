//! A fake external service that dedupes on the derived key, as a payments API does.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

/// A fake receiver of a handler's external calls (a payments API, a mailer, a
/// queue), deduping on the key each call carries, as a real idempotent API does.
///
/// The handler sends each external call to it with the key it would send the
/// real service (for a call made in a step, the step's derived key):
/// [`call`](Self::call) answers the first call with a key with a new response
/// and every later call with that key with the same response (a deduped
/// re-issue: harmless), and records everything. The kit's reports read the
/// record: more distinct keys for an effect than a clean run makes means the
/// effect really happened twice.
///
/// Clones share the record. Give one receiver to one [`Kit`](super::Kit).
///
/// ```
/// use lambda_idempotency::testing::Receiver;
/// use serde_json::json;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let payments = Receiver::new();
/// let first = payments.call("charge", "key-1", json!({ "cents": 500 })).await;
/// let again = payments.call("charge", "key-1", json!({ "cents": 500 })).await;
/// assert_eq!(first, again); // deduped: charged once
/// assert_eq!(payments.distinct_keys("charge"), 1);
/// assert_eq!(payments.requests("charge"), 2);
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Receiver {
    ledger: Arc<Mutex<Ledger>>,
}

#[derive(Default)]
struct Ledger {
    /// (effect, key, payload), in arrival order.
    log: Vec<(String, String, Value)>,
    /// The first response given for each (effect, key).
    responses: HashMap<(String, String), Value>,
    /// Distinct keys seen per effect.
    performed: HashMap<String, usize>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ledger = self.ledger();
        f.debug_struct("Receiver")
            .field("requests", &ledger.log.len())
            .field("performed", &ledger.performed)
            .finish()
    }
}

impl Receiver {
    /// A receiver that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Receives the external call `effect` with `key`: the first call with a key
    /// performs the effect and answers `{"effect": .., "id": "{effect}-{n}",
    /// "payload": ..}` (`n` counts the effect's distinct keys); a later call with
    /// the same key is deduped and gets that first answer back.
    pub async fn call(&self, effect: &str, key: &str, payload: Value) -> Value {
        // One suspension point, as a network call has: duplicates running
        // concurrently interleave here.
        YieldOnce(false).await;
        let mut ledger = self.ledger();
        ledger
            .log
            .push((effect.to_owned(), key.to_owned(), payload.clone()));
        let id = (effect.to_owned(), key.to_owned());
        if let Some(first) = ledger.responses.get(&id) {
            return first.clone();
        }
        let n = {
            let performed = ledger.performed.entry(effect.to_owned()).or_default();
            *performed += 1;
            *performed
        };
        let response =
            json!({ "effect": effect, "id": format!("{effect}-{n}"), "payload": payload });
        ledger.responses.insert(id, response.clone());
        response
    }

    /// How many distinct keys reached `effect`: how many times it really happened.
    pub fn distinct_keys(&self, effect: &str) -> usize {
        self.ledger().performed.get(effect).copied().unwrap_or(0)
    }

    /// How many calls reached `effect`, deduped re-issues included.
    pub fn requests(&self, effect: &str) -> usize {
        self.ledger()
            .log
            .iter()
            .filter(|(e, ..)| e == effect)
            .count()
    }

    /// Every call received: (effect, key, payload), in arrival order.
    pub fn log(&self) -> Vec<(String, String, Value)> {
        self.ledger().log.clone()
    }

    /// A [`Sink`](crate::Sink) that delivers outbox messages to this receiver as
    /// calls of `effect` with their derived keys: register it on the kit's
    /// dispatcher (`Dispatcher::new().with_sink(name, receiver.sink(effect))`) to
    /// count the outbox's deliveries like the handler's own calls.
    #[cfg(feature = "outbox")]
    #[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
    pub fn sink(&self, effect: &str) -> impl crate::Sink {
        ReceiverSink {
            receiver: self.clone(),
            effect: effect.to_owned(),
        }
    }

    /// The calls received since the log had `from` entries.
    pub(crate) fn since(&self, from: usize) -> Vec<(String, String, Value)> {
        self.ledger().log.get(from..).unwrap_or_default().to_vec()
    }

    pub(crate) fn len(&self) -> usize {
        self.ledger().log.len()
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Per effect: distinct keys and requests, of a slice of the log.
pub(crate) fn tally(log: &[(String, String, Value)]) -> BTreeMap<String, (usize, usize)> {
    let mut keys: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
    let mut requests: BTreeMap<&str, usize> = BTreeMap::new();
    for (effect, key, _) in log {
        keys.entry(effect).or_default().insert(key);
        *requests.entry(effect).or_default() += 1;
    }
    keys.into_iter()
        .map(|(effect, keys)| {
            let n = requests.get(effect).copied().unwrap_or(0);
            (effect.to_owned(), (keys.len(), n))
        })
        .collect()
}

#[cfg(feature = "outbox")]
struct ReceiverSink {
    receiver: Receiver,
    effect: String,
}

#[cfg(feature = "outbox")]
impl crate::Sink for ReceiverSink {
    fn deliver<'a>(
        &'a self,
        payload: &'a Value,
        derived_key: &'a str,
    ) -> crate::store::BoxFuture<'a, Result<(), crate::BoxError>> {
        Box::pin(async move {
            self.receiver
                .call(&self.effect, derived_key, payload.clone())
                .await;
            Ok(())
        })
    }
}

/// Pending once, then ready: a yield without a runtime dependency.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
