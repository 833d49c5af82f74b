//! Calls in flight in this execution environment, by key. A duplicate that
//! arrives while the first call of its key runs here (a clone of the service
//! under `run_concurrent`, another message of the same batch) waits for that
//! call to land instead of asking the store, and replays what it stored: no
//! request at all.
//!
//! Two registries use it: the engine's own, for every call of one
//! [`Idempotency`](crate::Idempotency) that may wait, whose flights leave when
//! they land; and one per SQS or stream batch, whose flights stay until the
//! batch is done, so that a later message of the batch with the same key finds
//! the landed record too.

use crate::idempotency::Cached;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Where a flight is.
#[derive(Clone)]
pub(crate) enum Landing {
    /// The first call is still at it.
    Flying,
    /// It completed, or found the key completed: the record to replay.
    Completed(Arc<Cached>),
    /// It ended without a completed record (its handler failed and released the
    /// key, it was refused, its store failed, or it was dropped mid-call): the
    /// waiter goes to the store itself, as a first call.
    Open,
}

/// One call's flight, that waiters subscribe to.
pub(crate) struct Flight {
    landing: watch::Sender<Landing>,
}

impl Flight {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            landing: watch::Sender::new(Landing::Flying),
        })
    }

    /// Waits for the flight to land, or for `until` (a Tokio instant) to pass:
    /// `None` then.
    pub(crate) async fn landed(&self, until: tokio::time::Instant) -> Option<Landing> {
        let mut receiver = self.landing.subscribe();
        let landed = async move {
            match receiver
                .wait_for(|landing| !matches!(landing, Landing::Flying))
                .await
            {
                Ok(landing) => landing.clone(),
                // The sender is owned by `self`, which outlives this call.
                Err(_) => Landing::Open,
            }
        };
        tokio::time::timeout_at(until, landed).await.ok()
    }

    /// Whether it has landed already (a later message of a batch meeting an
    /// earlier one's landed flight did not wait).
    pub(crate) fn has_landed(&self) -> bool {
        !matches!(*self.landing.borrow(), Landing::Flying)
    }
}

/// Flights by record key.
#[derive(Default)]
pub(crate) struct Flights {
    /// Whether landed flights stay (a batch's) or leave (the engine's).
    keep_landed: bool,
    flights: Mutex<HashMap<String, Arc<Flight>>>,
}

impl std::fmt::Debug for Flights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights")
            .field("keep_landed", &self.keep_landed)
            .finish_non_exhaustive()
    }
}

/// What [`Flights::board`] found.
pub(crate) enum Boarded<'a> {
    /// Another call of the key is in flight (or, in a batch, has landed): wait for it.
    Joined(Arc<Flight>),
    /// This call flies the key now: land it when done.
    Pilot(Pilot<'a>),
}

impl Flights {
    /// The registry of one batch: landed flights stay for later messages.
    #[cfg_attr(not(any(feature = "sqs", feature = "streams")), allow(dead_code))]
    pub(crate) fn for_batch() -> Self {
        Self {
            keep_landed: true,
            flights: Mutex::default(),
        }
    }

    /// Joins the flight of `key`, or starts one, atomically: of two calls that
    /// board at once, one flies and the other waits.
    pub(crate) fn board(&self, key: &str) -> Boarded<'_> {
        let mut flights = self.lock();
        match flights.get(key) {
            // The engine's registry drops a flight when it lands; one still
            // here has not landed yet, or landed in a batch and is kept.
            Some(flight) => Boarded::Joined(Arc::clone(flight)),
            None => {
                let flight = Flight::new();
                flights.insert(key.to_owned(), Arc::clone(&flight));
                Boarded::Pilot(Pilot {
                    flights: self,
                    key: key.to_owned(),
                    flight,
                    landed: false,
                })
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Flight>>> {
        // Every critical section inserts or removes whole entries: a panic while
        // holding the lock cannot leave one half-made.
        self.flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The call flying a key. Dropped without landing (the call's future dropped
/// mid-call, an early return), it lands [`Landing::Open`], so no waiter waits
/// for a call that is gone.
pub(crate) struct Pilot<'a> {
    flights: &'a Flights,
    key: String,
    flight: Arc<Flight>,
    landed: bool,
}

impl Pilot<'_> {
    /// Lands the flight: every waiter gets `landing`.
    pub(crate) fn land(mut self, landing: Landing) {
        self.touch_down(landing);
    }

    fn touch_down(&mut self, landing: Landing) {
        if self.landed {
            return;
        }
        self.landed = true;
        // An open flight leaves even a batch's registry: a later message of the
        // key goes to the store as a first call would.
        if !self.flights.keep_landed || matches!(landing, Landing::Open) {
            let mut flights = self.flights.lock();
            if flights
                .get(&self.key)
                .is_some_and(|flight| Arc::ptr_eq(flight, &self.flight))
            {
                flights.remove(&self.key);
            }
        }
        self.flight.landing.send_replace(landing);
    }
}

impl Drop for Pilot<'_> {
    fn drop(&mut self) {
        self.touch_down(Landing::Open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn a_waiter_gets_what_the_pilot_lands_and_the_key_is_free_again() {
        let flights = Flights::default();
        let Boarded::Pilot(pilot) = flights.board("k") else {
            panic!("the first call flies")
        };
        let Boarded::Joined(flight) = flights.board("k") else {
            panic!("the second call waits")
        };
        let waiter = async { flight.landed(soon()).await };
        let (landing, ()) = tokio::join!(waiter, async { pilot.land(Landing::Open) });
        assert!(matches!(landing, Some(Landing::Open)));
        assert!(
            matches!(flights.board("k"), Boarded::Pilot(_)),
            "the engine's registry forgets landed flights"
        );
    }

    #[tokio::test]
    async fn a_dropped_pilot_lands_open() {
        let flights = Flights::default();
        let Boarded::Pilot(pilot) = flights.board("k") else {
            panic!("flies")
        };
        let Boarded::Joined(flight) = flights.board("k") else {
            panic!("waits")
        };
        drop(pilot);
        assert!(matches!(flight.landed(soon()).await, Some(Landing::Open)));
    }

    #[tokio::test]
    async fn a_waiter_gives_up_at_its_instant() {
        let flights = Flights::default();
        let Boarded::Pilot(_pilot) = flights.board("k") else {
            panic!("flies")
        };
        let Boarded::Joined(flight) = flights.board("k") else {
            panic!("waits")
        };
        let until = tokio::time::Instant::now() + Duration::from_millis(20);
        assert!(flight.landed(until).await.is_none());
        assert!(!flight.has_landed());
    }

    #[test]
    fn a_batch_keeps_landed_flights_but_not_open_ones() {
        let batch = Flights::for_batch();
        let Boarded::Pilot(pilot) = batch.board("k") else {
            panic!("flies")
        };
        let record = crate::IdempotencyRecord {
            key: "k".into(),
            status: crate::Status::Completed,
            expiration: i64::MAX,
            in_progress_expiration: None,
            data: Some("{}".into()),
            validation: None,
            owner: "o".into(),
            is_error: false,
            execution: "o".into(),
        };
        pilot.land(Landing::Completed(Arc::new(Cached::new(record))));
        match batch.board("k") {
            Boarded::Joined(flight) => assert!(flight.has_landed()),
            Boarded::Pilot(_) => panic!("a later message of the batch finds the landed flight"),
        }
        let Boarded::Pilot(open) = batch.board("other") else {
            panic!("flies")
        };
        open.land(Landing::Open);
        assert!(
            matches!(batch.board("other"), Boarded::Pilot(_)),
            "an open flight leaves"
        );
    }
}
