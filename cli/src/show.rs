//! `show`: the record behind a key or an event.

use crate::args::{AwsArgs, ShowArgs};
use crate::error::{exit, CliError, Outcome};
use crate::render::{outbox_json, outbox_line, record_json, record_text, step_json};
use crate::time::now_ms;
use crate::{aws, journal};
use lambda_idempotency::{Idempotency, IdempotencyConfig, IdempotencyStore, MemoryStore};
use serde_json::{json, Value};
use std::fmt::Write;

/// Shows the record (with its execution's steps and outbox) behind a key, or
/// behind the key an event gets.
pub async fn run(aws_args: &AwsArgs, table: &str, args: ShowArgs) -> Result<Outcome, CliError> {
    let (key, derived) = match (&args.key, &args.event) {
        (Some(key), _) => (key.clone(), false),
        (None, Some(_)) => match derive_key(&args)? {
            Some(key) => (key, true),
            None => {
                let reason = "the event holds no key material for this expression: the handler ran unprotected (or, with strict(true), was refused with MissingKey); no record is kept";
                return Ok(Outcome::with(
                    json!({ "key": null, "derived": true, "record": null, "reason": reason }),
                    String::new(),
                    exit::NOT_FOUND,
                    reason.to_owned(),
                ));
            }
        },
        (None, None) => return Err(CliError::Usage("give --key or --event".into())),
    };
    let sdk = aws::load(aws_args).await?;
    let store = aws::store(&sdk, table);
    let now = now_ms();
    let Some(record) = store.get(&key).await? else {
        let reason = format!("no record under {key}: no call with this key was recorded, or its record expired and was deleted (the next call runs the handler)");
        return Ok(Outcome::with(
            json!({ "key": key, "derived": derived, "record": null, "reason": reason }),
            String::new(),
            exit::NOT_FOUND,
            reason,
        ));
    };
    let steps = journal::steps(&store, &record).await?;
    let compensations = journal::compensations(&store, &record, steps.len()).await?;
    let outbox = journal::outbox(&store, &record).await?;

    let mut human = String::new();
    if derived {
        let _ = writeln!(human, "derived key  {key}");
    }
    human.push_str(&record_text(&record, now));
    for (position, step) in steps.iter().enumerate() {
        let _ = writeln!(human, "step {position:<7} {} = {}", step.name, step.data);
    }
    for (position, entry) in &compensations {
        let _ = writeln!(human, "undo {position:<7} {} = {}", entry.name, entry.data);
    }
    for message in &outbox {
        let _ = writeln!(human, "outbox       {}", outbox_line(message));
    }
    let document = json!({
        "key": key,
        "derived": derived,
        "record": record_json(&record, now),
        "steps": steps.iter().enumerate().map(|(i, s)| step_json(i, s)).collect::<Vec<_>>(),
        "compensations": compensations.iter().map(|(i, c)| step_json(*i, c)).collect::<Vec<_>>(),
        "outbox": outbox.iter().map(|m| outbox_json(m, now)).collect::<Vec<_>>(),
    });
    Ok(Outcome::ok(document, human))
}

/// The key a handler of the function gives the event file, as the engine
/// derives it (`Idempotency::key_for`).
fn derive_key(args: &ShowArgs) -> Result<Option<String>, CliError> {
    let (Some(path), Some(expression)) = (&args.event, &args.key_expression) else {
        return Err(CliError::Usage(
            "--event needs --key-expression (`@` for the whole event)".into(),
        ));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let event: Value = serde_json::from_str(&text)
        .map_err(|e| CliError::Usage(format!("{} is not JSON: {e}", path.display())))?;
    let mut config = IdempotencyConfig::builder();
    // `@` is the whole event: the engine's default without an expression.
    if expression.trim() != "@" {
        config = config.key_expression(expression);
    }
    if let Some(prefix) = &args.function {
        config = config.key_prefix(prefix);
    }
    if let Some(hash) = &args.powertools_keys {
        config = powertools_keys(config, hash)?;
    }
    let config = config.build().map_err(|e| CliError::Usage(e.to_string()))?;
    let idempotency = Idempotency::new(MemoryStore::new(), config);
    Ok(idempotency.key_for(args.handler.as_deref(), &event)?)
}

#[cfg(feature = "powertools")]
fn powertools_keys(
    config: lambda_idempotency::IdempotencyConfigBuilder,
    hash: &str,
) -> Result<lambda_idempotency::IdempotencyConfigBuilder, CliError> {
    use lambda_idempotency::PowertoolsHash;
    let hash = match hash {
        "md5" => PowertoolsHash::Md5,
        "sha224" => PowertoolsHash::Sha224,
        "sha256" => PowertoolsHash::Sha256,
        "sha384" => PowertoolsHash::Sha384,
        "sha512" => PowertoolsHash::Sha512,
        other => {
            return Err(CliError::Usage(format!(
                "--powertools-keys {other:?}: expected md5, sha224, sha256, sha384 or sha512"
            )))
        }
    };
    Ok(config.powertools_python_keys(hash))
}

#[cfg(not(feature = "powertools"))]
fn powertools_keys(
    _: lambda_idempotency::IdempotencyConfigBuilder,
    _: &str,
) -> Result<lambda_idempotency::IdempotencyConfigBuilder, CliError> {
    Err(CliError::Usage(
        "--powertools-keys needs the tool built with the `powertools` feature: cargo install --path cli --features powertools".into(),
    ))
}
