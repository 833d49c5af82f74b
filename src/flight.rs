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
    /// Until when (epoch milliseconds) its pilot may hold the key: the deadline
    /// of the reservation it makes. Past it, the store lets another call take
    /// the key over, so a flight still flying then (its call stalled past its
    /// deadline) is waited for no longer and is replaced by the next call to
    /// board: otherwise every call of the key here would wait on a call the
    /// store has given up on, until it wakes.
    deadline_ms: i64,
}

impl Flight {
    fn new(deadline_ms: i64) -> Arc<Self> {
        Arc::new(Self {
            landing: watch::Sender::new(Landing::Flying),
            deadline_ms,
        })
    }

    /// The first instant (epoch milliseconds) at which the pilot's reservation
    /// is abandoned (`IdempotencyRecord::is_abandoned`: its deadline has passed).
    pub(crate) fn overdue_at(&self) -> i64 {
        self.deadline_ms.saturating_add(1)
    }

    /// Still flying at `now_ms`, past its pilot's deadline.
    fn is_overdue(&self, now_ms: i64) -> bool {
        !self.has_landed() && now_ms >= self.overdue_at()
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
    /// board at once, one flies and the other waits. `deadline_ms` is this
    /// call's reservation deadline, should it fly; `now_ms` the time now.
    pub(crate) fn board(&self, key: &str, deadline_ms: i64, now_ms: i64) -> Boarded<'_> {
        let mut flights = self.lock();
        match flights.get(key) {
            // The engine's registry drops a flight when it lands; one still
            // here has not landed yet, or landed in a batch and is kept.
            Some(flight) if !flight.is_overdue(now_ms) => Boarded::Joined(Arc::clone(flight)),
            // None, or one overdue: this call flies the key now. The stalled
            // pilot's landing, if it comes, leaves the new flight in place.
            _ => {
                let flight = Flight::new(deadline_ms);
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

    /// A pilot's deadline that does not pass during a test.
    const FAR: i64 = i64::MAX / 2;

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn a_waiter_gets_what_the_pilot_lands_and_the_key_is_free_again() {
        let flights = Flights::default();
        let Boarded::Pilot(pilot) = flights.board("k", FAR, 0) else {
            panic!("the first call flies")
        };
        let Boarded::Joined(flight) = flights.board("k", FAR, 0) else {
            panic!("the second call waits")
        };
        let waiter = async { flight.landed(soon()).await };
        let (landing, ()) = tokio::join!(waiter, async { pilot.land(Landing::Open) });
        assert!(matches!(landing, Some(Landing::Open)));
        assert!(
            matches!(flights.board("k", FAR, 0), Boarded::Pilot(_)),
            "the engine's registry forgets landed flights"
        );
    }

    #[tokio::test]
    async fn a_dropped_pilot_lands_open() {
        let flights = Flights::default();
        let Boarded::Pilot(pilot) = flights.board("k", FAR, 0) else {
            panic!("flies")
        };
        let Boarded::Joined(flight) = flights.board("k", FAR, 0) else {
            panic!("waits")
        };
        drop(pilot);
        assert!(matches!(flight.landed(soon()).await, Some(Landing::Open)));
    }

    #[tokio::test]
    async fn a_waiter_gives_up_at_its_instant() {
        let flights = Flights::default();
        let Boarded::Pilot(_pilot) = flights.board("k", FAR, 0) else {
            panic!("flies")
        };
        let Boarded::Joined(flight) = flights.board("k", FAR, 0) else {
            panic!("waits")
        };
        let until = tokio::time::Instant::now() + Duration::from_millis(20);
        assert!(flight.landed(until).await.is_none());
        assert!(!flight.has_landed());
    }

    #[tokio::test]
    async fn a_flight_past_its_pilot_s_deadline_is_replaced_and_its_late_landing_leaves_the_new_one(
    ) {
        let flights = Flights::default();
        let Boarded::Pilot(stalled) = flights.board("k", 1_000, 0) else {
            panic!("flies")
        };
        let Boarded::Joined(_) = flights.board("k", 5_000, 1_000) else {
            panic!("until its deadline, a call waits for the pilot")
        };
        let Boarded::Pilot(pilot) = flights.board("k", 5_000, 1_001) else {
            panic!("past it, the next call flies the key")
        };
        let Boarded::Joined(flight) = flights.board("k", 9_000, 1_002) else {
            panic!("and later calls wait for that one")
        };
        drop(stalled);
        assert!(
            !flight.has_landed(),
            "the stalled pilot's landing is its own"
        );
        assert!(matches!(
            flights.board("k", 9_000, 1_003),
            Boarded::Joined(_)
        ));
        pilot.land(Landing::Open);
        assert!(matches!(flight.landed(soon()).await, Some(Landing::Open)));
    }

    #[test]
    fn a_batch_keeps_landed_flights_but_not_open_ones() {
        let batch = Flights::for_batch();
        let Boarded::Pilot(pilot) = batch.board("k", FAR, 0) else {
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
        match batch.board("k", FAR, 0) {
            Boarded::Joined(flight) => assert!(flight.has_landed()),
            Boarded::Pilot(_) => panic!("a later message of the batch finds the landed flight"),
        }
        let Boarded::Pilot(open) = batch.board("other", FAR, 0) else {
            panic!("flies")
        };
        open.land(Landing::Open);
        assert!(
            matches!(batch.board("other", FAR, 0), Boarded::Pilot(_)),
            "an open flight leaves"
        );
    }
}
