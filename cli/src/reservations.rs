//! `in-progress` and `release`: stuck reservations.

use crate::args::{AwsArgs, InProgressArgs, ReleaseArgs};
use crate::error::{exit, CliError, Outcome};
use crate::render::{deadline_text, record_json, State};
use crate::time::{now_ms, relative, rfc3339_ms, rfc3339_s};
use crate::{aws, journal};
use lambda_idempotency::store::StoreError;
use lambda_idempotency::{IdempotencyRecord, IdempotencyStore, Status};
use serde_json::json;
use std::fmt::Write;

/// Lists `INPROGRESS` reservations whose deadline passed at least `--older-than`
/// ago (with `--live`, also those whose deadline is ahead), oldest deadline first.
pub async fn list(
    aws_args: &AwsArgs,
    table: &str,
    args: InProgressArgs,
) -> Result<Outcome, CliError> {
    let sdk = aws::load(aws_args).await?;
    let store = aws::store(&sdk, table);
    let now = now_ms();
    let older_than = i64::try_from(args.older_than.as_millis()).unwrap_or(i64::MAX);
    let mut listed: Vec<IdempotencyRecord> = store
        .scan_records(Some(Status::InProgress))
        .await?
        .into_iter()
        .filter(|record| args.include_expired || !record.is_expired(now))
        .filter(|record| match record.in_progress_expiration {
            // No deadline (another tool's record): it can never be taken over.
            None => true,
            Some(deadline) if deadline >= now => args.live,
            Some(deadline) => now - deadline >= older_than,
        })
        .collect();
    listed.sort_by_key(|r| (r.in_progress_expiration.unwrap_or(i64::MIN), r.key.clone()));

    let mut human = String::new();
    if listed.is_empty() {
        let _ = writeln!(human, "no reservations listed");
    }
    for record in &listed {
        let deadline = format!("deadline {}", deadline_text(record, now));
        let _ = writeln!(
            human,
            "{}\n  {} {deadline}, expires {} ({})\n  owner {}  execution {}",
            record.key,
            State::of(record, now).name(),
            rfc3339_s(record.expiration),
            relative(record.expiration.saturating_mul(1000) - now),
            record.owner,
            record.execution,
        );
    }
    let document = json!({
        "table": table,
        "now": now,
        "older_than_ms": older_than,
        "count": listed.len(),
        "reservations": listed.iter().map(|r| record_json(r, now)).collect::<Vec<_>>(),
    });
    Ok(Outcome::ok(document, human))
}

/// Releases a reservation if `--owner` owns it: opens it for takeover, so the
/// retry resumes its execution (same derived keys, journaled steps replayed);
/// deletes it only when it has no execution (written by another tool) or with
/// `--delete` and nothing journaled.
pub async fn release(
    aws_args: &AwsArgs,
    table: &str,
    args: ReleaseArgs,
) -> Result<Outcome, CliError> {
    let sdk = aws::load(aws_args).await?;
    let store = aws::store(&sdk, table);
    let now = now_ms();
    let Some(record) = store.get(&args.key).await? else {
        let reason = format!("no record under {}: nothing to release", args.key);
        return Ok(Outcome::with(
            json!({ "key": args.key, "outcome": "not_found", "reason": reason }),
            String::new(),
            exit::NOT_FOUND,
            reason,
        ));
    };
    let refuse = |reason: &str, message: String| {
        Outcome::with(
            json!({
                "key": args.key,
                "outcome": "refused",
                "reason": reason,
                "message": message,
                "record": record_json(&record, now),
            }),
            String::new(),
            exit::REFUSED,
            format!("refused: {message}"),
        )
    };
    if record.owner != args.owner {
        return Ok(refuse(
            "not_owner",
            format!(
                "{} is not the owner of {} (the stored owner is {:?}; the reservation may have been taken over)",
                args.owner, args.key, record.owner
            ),
        ));
    }
    if record.status != Status::InProgress {
        return Ok(refuse(
            "not_in_progress",
            format!(
                "{} is {}: only reservations are released",
                args.key,
                record.status.as_str()
            ),
        ));
    }
    let live = match record.in_progress_expiration {
        Some(deadline) => deadline >= now,
        None => true,
    };
    if live && !args.force {
        let when = match record.in_progress_expiration {
            Some(at) => format!(
                "its deadline is {} ({})",
                rfc3339_ms(at),
                relative(at - now)
            ),
            None => "it has no deadline".to_owned(),
        };
        return Ok(refuse(
            "live",
            format!("{when}: the attempt may still be running and a retry would run beside it; wait, or pass --force"),
        ));
    }

    let steps = journal::steps(&store, &record).await?;
    if args.delete && !steps.is_empty() {
        return Ok(refuse(
            "journaled",
            format!(
                "execution {} journaled {} step(s): deleting the record would run them again under new keys; release without --delete to open it",
                record.execution,
                steps.len()
            ),
        ));
    }
    // Opening is the default: nothing shows whether the attempt called a step
    // it never journaled, and only the same execution re-sends its derived key.
    let open = !args.delete && !record.execution.is_empty();
    let result = if open {
        // What the engine does after a failed attempt that ran steps: the record
        // stays, open to takeover at once, so the retry resumes the execution.
        let opened = IdempotencyRecord {
            status: Status::InProgress,
            in_progress_expiration: Some(0),
            data: None,
            ..record.clone()
        };
        store.complete(&opened).await
    } else {
        store.release(&record.key, &record.owner).await
    };
    match result {
        Ok(()) => {}
        Err(StoreError::NotOwner) => {
            return Ok(refuse(
                "not_owner",
                format!(
                    "{} was taken over while releasing it; the new owner's record was left alone",
                    args.key
                ),
            ))
        }
        Err(err) => return Err(err.into()),
    }
    let (outcome, meaning) = if open {
        (
            "opened",
            format!(
                "opened for takeover ({} journaled step(s)): the next call with this key resumes execution {} and replays its steps",
                steps.len(),
                record.execution
            ),
        )
    } else {
        (
            "deleted",
            "deleted: the next call with this key runs the handler as a new execution".to_owned(),
        )
    };
    let human = format!("{}: {meaning}\n", args.key);
    let document = json!({
        "key": args.key,
        "outcome": outcome,
        "journaled_steps": steps.len(),
        "forced": live,
        "message": meaning,
        "previous": record_json(&record, now),
    });
    Ok(Outcome::ok(document, human))
}
