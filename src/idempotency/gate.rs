//! A two-phase gate for work that spans invocations: claim a key now, complete
//! or release it later with the ticket the claim gave, fenced like every other
//! write.

use super::{expiration_s, new_reservation, now_ms, Idempotency, Reserved};
use crate::error::{Error, IdempotencyError};
use crate::outcome::Outcome;
use crate::record::{IdempotencyRecord, Status};
use crate::store::{IdempotencyStore, StoreError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// A two-phase gate, made by [`Idempotency::gate`]: for work that one
/// invocation starts and another finishes (a durable execution, a Step
/// Functions task, a job on any engine). [`claim`](Gate::claim) a payload's key
/// and get [`Claim::Run`] with a [`Ticket`] (start the work), [`Claim::Replayed`]
/// with the response stored when the work finished, or [`Claim::InProgress`]
/// (someone holds it). When the work is done, [`complete`](Gate::complete) with
/// the ticket stores its response; [`release`](Gate::release) gives the key
/// back. Both are conditional on the ticket's owner token: after the claim's
/// hold passed and another claim took the key over, a late ticket writes
/// nothing ([`IdempotencyError::LostOwnership`]).
///
/// ```
/// use lambda_idempotency::{Claim, Idempotency, IdempotencyConfig, MemoryStore};
/// use serde_json::{json, Value};
/// use std::time::Duration;
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = IdempotencyConfig::builder().key_expression("order_id").build()?;
/// let gate = Idempotency::new(MemoryStore::new(), config)
///     .gate("fulfilment")
///     .holds_for(Duration::from_secs(24 * 3600));
/// let order = json!({ "order_id": "o-1" });
/// let Claim::Run(ticket) = gate.claim::<_, Value>(&order).await? else {
///     unreachable!("the first claim runs");
/// };
/// // Start the work, carrying the ticket (it serializes); a duplicate meanwhile:
/// assert!(matches!(gate.claim::<_, Value>(&order).await?, Claim::InProgress));
/// // Later, in the invocation that finishes the work:
/// gate.complete(ticket, &json!({ "shipped": true })).await?;
/// match gate.claim::<_, Value>(&order).await? {
///     Claim::Replayed(response) => assert_eq!(response, json!({ "shipped": true })),
///     _ => unreachable!("completed"),
/// }
/// # Ok(()) }
/// ```
pub struct Gate<S> {
    idempotency: Idempotency<S>,
    scope: Arc<str>,
    holds_for: Duration,
}

impl<S> std::fmt::Debug for Gate<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("scope", &self.scope)
            .field("holds_for", &self.holds_for)
            .finish_non_exhaustive()
    }
}

/// What [`Gate::claim`] found.
#[derive(Debug)]
#[non_exhaustive]
pub enum Claim<R> {
    /// The key is yours: start the work, and complete or release with the ticket.
    Run(Ticket),
    /// The work finished: its stored response.
    Replayed(R),
    /// Another claim holds the key, within its hold.
    InProgress,
}

/// The claim of a key, for [`Gate::complete`] and [`Gate::release`]: its key,
/// owner token and execution. It serializes (serde), so the work can carry it
/// to the invocation that finishes it.
///
/// ```
/// # use lambda_idempotency::{Claim, Idempotency, IdempotencyConfig, MemoryStore, Ticket};
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let gate = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default()).gate("jobs");
/// # let Claim::Run(ticket) = gate.claim::<_, serde_json::Value>(&"job-1").await? else { unreachable!() };
/// let carried = serde_json::to_string(&ticket)?;
/// let ticket: Ticket = serde_json::from_str(&carried)?;
/// println!("{} held until {}", ticket.key(), ticket.held_until_ms());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    key: String,
    owner: String,
    execution: String,
    validation: Option<String>,
    held_until_ms: i64,
    expiration: i64,
}

impl Ticket {
    /// The record key claimed.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Until when (epoch milliseconds) the claim holds the key: past it,
    /// another claim may take the key over (resuming this execution).
    pub fn held_until_ms(&self) -> i64 {
        self.held_until_ms
    }
}

impl<S: IdempotencyStore> Idempotency<S> {
    /// A two-phase [`Gate`] named `name` (part of its records' key prefix, as a
    /// function's name): its keys come from the config's key expression over
    /// the payload claimed, its payloads are checked as the config says, and a
    /// claim holds its key for the config's `in_progress_timeout` unless
    /// [`Gate::holds_for`] says otherwise.
    ///
    /// ```
    /// # use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
    /// let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    /// let gate = idempotency.gate("exports");
    /// # let _ = gate;
    /// ```
    pub fn gate(&self, name: &str) -> Gate<S> {
        Gate {
            idempotency: self.clone(),
            scope: self.function_scope(name).into(),
            holds_for: self.config().in_progress_timeout,
        }
    }
}

impl<S: IdempotencyStore> Gate<S> {
    /// How long a claim holds its key (default: the config's
    /// `in_progress_timeout`). Past it, another claim takes the key over, as a
    /// retry takes over a crashed invocation: set it beyond the longest the
    /// work may take. The record lasts at least as long.
    ///
    /// ```
    /// # use lambda_idempotency::{Idempotency, IdempotencyConfig, MemoryStore};
    /// # use std::time::Duration;
    /// # let idempotency = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default());
    /// let gate = idempotency.gate("exports").holds_for(Duration::from_secs(6 * 3600));
    /// # let _ = gate;
    /// ```
    pub fn holds_for(mut self, hold: Duration) -> Self {
        self.holds_for = hold;
        self
    }

    /// Claims the key of `payload`: one request. A different payload under a
    /// claimed or completed key is refused ([`IdempotencyError::PayloadMismatch`]);
    /// a claim whose hold passed is taken over, resuming its execution.
    ///
    /// ```
    /// # use lambda_idempotency::{Claim, Idempotency, IdempotencyConfig, MemoryStore};
    /// # #[tokio::main] async fn main() -> Result<(), lambda_idempotency::IdempotencyError> {
    /// # let gate = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default()).gate("jobs");
    /// match gate.claim::<_, String>(&serde_json::json!({ "job": 7 })).await? {
    ///     Claim::Run(ticket) => { /* start the work, carrying `ticket` */ }
    ///     Claim::Replayed(result) => println!("done already: {result}"),
    ///     Claim::InProgress => { /* running elsewhere: try later */ }
    ///     _ => {}
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn claim<P, R>(&self, payload: &P) -> Result<Claim<R>, IdempotencyError>
    where
        P: Serialize + 'static,
        R: DeserializeOwned,
    {
        let engine = &self.idempotency;
        let meter = engine.meter(&self.scope);
        let (material, validation) =
            engine
                .key_material(payload, None)?
                .ok_or_else(|| IdempotencyError::MissingKey {
                    expression: engine.config().key.describe().to_owned(),
                })?;
        let now = now_ms();
        let hold = i64::try_from(self.holds_for.as_millis()).unwrap_or(i64::MAX / 2);
        let held_until = now.saturating_add(hold);
        // The record lasts at least as long as the claim holds.
        let expiration = expiration_s(now, engine.config()).max(held_until.div_euclid(1000) + 1);
        let key = format!("{}#{material}", self.scope);
        let mut record = new_reservation(key, validation, expiration, held_until);
        let claimed = match engine.reserve(&mut record, None, &meter).await {
            Ok(Reserved::Ours { .. }) => Claim::Run(Ticket {
                key: record.key,
                owner: record.owner,
                execution: record.execution,
                validation: record.validation,
                held_until_ms: held_until,
                expiration: record.expiration,
            }),
            Ok(Reserved::Completed(existing)) => {
                match engine
                    .replay::<R, std::convert::Infallible>(&existing, record.validation.as_deref())
                {
                    Ok(response) => Claim::Replayed(response),
                    Err(Error::Idempotency(err)) => return Err(err),
                    // A gate stores responses only: a stored failure is not its record's.
                    Err(_) => {
                        return Err(IdempotencyError::MalformedRecord {
                            key: existing.key,
                            attribute: "error".into(),
                            problem: "holds a stored failure, which a gate never writes".into(),
                        })
                    }
                }
            }
            Err(IdempotencyError::AlreadyInProgress { .. }) => Claim::InProgress,
            Err(err) => return Err(err),
        };
        super::settle(
            &meter,
            match &claimed {
                Claim::Run(_) => Outcome::Executed,
                Claim::Replayed(_) => Outcome::ReplayedFromStore,
                Claim::InProgress => Outcome::InProgress,
            },
        );
        Ok(claimed)
    }

    /// Stores `response` as the outcome of the ticket's claim, if the claim
    /// still holds the key: later claims replay it. One request.
    ///
    /// ```
    /// # use lambda_idempotency::{Claim, Idempotency, IdempotencyConfig, MemoryStore};
    /// # #[tokio::main] async fn main() -> Result<(), lambda_idempotency::IdempotencyError> {
    /// # let gate = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default()).gate("jobs");
    /// # let Claim::Run(ticket) = gate.claim::<_, String>(&"job-1").await? else { unreachable!() };
    /// gate.complete(ticket, &"exported 1,024 rows").await?;
    /// # Ok(()) }
    /// ```
    pub async fn complete<R: Serialize>(
        &self,
        ticket: Ticket,
        response: &R,
    ) -> Result<(), IdempotencyError> {
        let data =
            serde_json::to_string(response).map_err(|source| IdempotencyError::Serialization {
                key: ticket.key.clone(),
                source,
            })?;
        let record = IdempotencyRecord {
            status: Status::Completed,
            expiration: expiration_s(now_ms(), self.idempotency.config()).max(ticket.expiration),
            in_progress_expiration: Some(ticket.held_until_ms),
            data: Some(data),
            validation: ticket.validation,
            owner: ticket.owner,
            execution: ticket.execution,
            is_error: false,
            key: ticket.key,
        };
        match self.idempotency.store().complete(&record).await {
            Ok(()) => Ok(()),
            Err(StoreError::NotOwner) => Err(IdempotencyError::LostOwnership { key: record.key }),
            Err(StoreError::TooLarge { bytes, .. }) => Err(IdempotencyError::ResponseTooLarge {
                key: record.key,
                size: bytes,
                limit: crate::MAX_ITEM_BYTES,
            }),
            Err(err) => Err(err.into()),
        }
    }

    /// Gives the ticket's key back, if its claim still holds it: the next claim
    /// runs. One request.
    ///
    /// ```
    /// # use lambda_idempotency::{Claim, Idempotency, IdempotencyConfig, MemoryStore};
    /// # #[tokio::main] async fn main() -> Result<(), lambda_idempotency::IdempotencyError> {
    /// # let gate = Idempotency::new(MemoryStore::new(), IdempotencyConfig::default()).gate("jobs");
    /// # let Claim::Run(ticket) = gate.claim::<_, String>(&"job-1").await? else { unreachable!() };
    /// // The work could not start: let the next delivery try.
    /// gate.release(ticket).await?;
    /// assert!(matches!(gate.claim::<_, String>(&"job-1").await?, Claim::Run(_)));
    /// # Ok(()) }
    /// ```
    pub async fn release(&self, ticket: Ticket) -> Result<(), IdempotencyError> {
        match self
            .idempotency
            .store()
            .release(&ticket.key, &ticket.owner)
            .await
        {
            Ok(()) => Ok(()),
            Err(StoreError::NotOwner) => Err(IdempotencyError::LostOwnership { key: ticket.key }),
            Err(err) => Err(err.into()),
        }
    }
}
