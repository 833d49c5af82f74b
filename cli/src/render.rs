//! Records as JSON documents and as text.

use crate::time::{relative, rfc3339_ms, rfc3339_s};
use lambda_idempotency::store::{OutboxRecord, StepRecord};
use lambda_idempotency::{IdempotencyRecord, Status};
use serde_json::{json, Value};
use std::fmt::Write;

/// Where a record stands, as a retry of its key would find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Past its TTL: counts as absent.
    Expired,
    /// Finished: replayed.
    Completed,
    /// Reserved, deadline ahead: a duplicate gets `AlreadyInProgress`.
    Running,
    /// Reserved, deadline passed: the next call resumes the execution.
    Abandoned,
    /// Opened for takeover (`in_progress_expiration` 0): the next call resumes.
    Open,
    /// Reserved without a deadline (another tool): blocked until it expires.
    NoDeadline,
}

impl State {
    /// The state of `record` at `now_ms`.
    pub fn of(record: &IdempotencyRecord, now_ms: i64) -> Self {
        if record.is_expired(now_ms) {
            return State::Expired;
        }
        match (record.status, record.in_progress_expiration) {
            (Status::Completed, _) => State::Completed,
            (_, None) => State::NoDeadline,
            (_, Some(0)) => State::Open,
            (_, Some(deadline)) if deadline < now_ms => State::Abandoned,
            _ => State::Running,
        }
    }

    /// The name in the output.
    pub fn name(self) -> &'static str {
        match self {
            State::Expired => "expired",
            State::Completed => "completed",
            State::Running => "running",
            State::Abandoned => "abandoned",
            State::Open => "open",
            State::NoDeadline => "no_deadline",
        }
    }

    /// What the next call with this key does.
    pub fn explain(self, record: &IdempotencyRecord, now_ms: i64) -> String {
        let expires = relative(record.expiration.saturating_mul(1000) - now_ms);
        let deadline = record.in_progress_expiration.unwrap_or_default();
        match self {
            State::Expired => format!(
                "expired {expires}: it counts as absent, the next call runs the handler as a new execution"
            ),
            State::Completed if record.is_error => format!(
                "completed with a stored permanent error: calls with this key replay the error (the handler does not run) until it expires {expires}"
            ),
            State::Completed => format!(
                "completed: calls with this key replay the stored response (the handler does not run) until it expires {expires}"
            ),
            State::Running => format!(
                "in progress, deadline {}: a call with this key now gets AlreadyInProgress",
                relative(deadline - now_ms)
            ),
            State::Abandoned => format!(
                "in progress, but its deadline passed {}: the attempt died or timed out; the next call with this key resumes its execution (journaled steps replay)",
                relative(deadline - now_ms)
            ),
            State::Open => "open for takeover (released after a failed attempt that ran steps, or by an operator): the next call resumes the execution".to_owned(),
            State::NoDeadline => format!(
                "in progress without a deadline (written by another tool): calls get AlreadyInProgress until it expires {expires}"
            ),
        }
    }
}

/// A record as a JSON object.
pub fn record_json(record: &IdempotencyRecord, now_ms: i64) -> Value {
    let state = State::of(record, now_ms);
    json!({
        "key": record.key,
        "status": record.status.as_str(),
        "state": state.name(),
        "explanation": state.explain(record, now_ms),
        "owner": record.owner,
        "execution": record.execution,
        "in_progress_expiration": record.in_progress_expiration,
        "deadline": record.in_progress_expiration.map(rfc3339_ms),
        "expiration": record.expiration,
        "expires": rfc3339_s(record.expiration),
        "expired": record.is_expired(now_ms),
        "data": record.data,
        "is_error": record.is_error,
        "validation": record.validation,
    })
}

/// A record as text, one `name: value` line per attribute.
pub fn record_text(record: &IdempotencyRecord, now_ms: i64) -> String {
    let state = State::of(record, now_ms);
    let mut out = String::new();
    let mut line = |name: &str, value: &str| {
        let _ = writeln!(out, "{name:<12} {value}");
    };
    line("key", &record.key);
    line(
        "status",
        &format!("{} ({})", record.status.as_str(), state.name()),
    );
    line("owner", or_none(&record.owner));
    line("execution", or_none(&record.execution));
    // A completed record keeps its last reservation's deadline: it means nothing.
    if record.status == Status::InProgress {
        line("deadline", &deadline_text(record, now_ms));
    }
    line(
        "expires",
        &format!(
            "{} ({}, {})",
            rfc3339_s(record.expiration),
            relative(record.expiration.saturating_mul(1000) - now_ms),
            record.expiration
        ),
    );
    if let Some(data) = &record.data {
        line(if record.is_error { "error" } else { "data" }, data);
    }
    if let Some(validation) = &record.validation {
        line("validation", validation);
    }
    line("meaning", &state.explain(record, now_ms));
    out
}

/// A reservation's deadline as text: the instant and how far it is, `0` for a
/// record opened for takeover.
pub fn deadline_text(record: &IdempotencyRecord, now_ms: i64) -> String {
    match record.in_progress_expiration {
        Some(0) => "0 (open for takeover)".to_owned(),
        Some(at) => format!("{} ({}, {at})", rfc3339_ms(at), relative(at - now_ms)),
        None => "(none)".to_owned(),
    }
}

fn or_none(text: &str) -> &str {
    if text.is_empty() {
        "(none)"
    } else {
        text
    }
}

/// A journaled step as JSON.
pub fn step_json(position: usize, step: &StepRecord) -> Value {
    json!({ "position": position, "name": step.name, "key": step.key, "data": step.data })
}

/// An outbox message as JSON: its stored message parsed when it is JSON.
pub fn outbox_json(record: &OutboxRecord, now_ms: i64) -> Value {
    let message = serde_json::from_str::<Value>(&record.message)
        .unwrap_or_else(|_| Value::String(record.message.clone()));
    json!({
        "key": record.key,
        "derived_key": record.derived_key,
        "delivered": record.delivered,
        "expiration": record.expiration,
        "expires": rfc3339_s(record.expiration),
        "expired": record.expiration < now_ms.div_euclid(1000),
        "message": message,
    })
}

/// An outbox message in one line: its key, kind and destination.
pub fn outbox_line(record: &OutboxRecord) -> String {
    let message = serde_json::from_str::<Value>(&record.message).unwrap_or(Value::Null);
    let kind = message["kind"].as_str().unwrap_or("?");
    let destination = match kind {
        "sqs" => message["queue_url"].as_str(),
        "http" => message["url"].as_str(),
        "custom" => message["sink"].as_str(),
        _ => None,
    }
    .unwrap_or("?");
    format!(
        "{}  {}  {kind} {destination}  derived key {}",
        record.key,
        if record.delivered {
            "DELIVERED"
        } else {
            "PENDING"
        },
        record.derived_key
    )
}
