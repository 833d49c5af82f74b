//! `outbox pending` and `outbox deliver`.

use crate::args::AwsArgs;
use crate::aws;
use crate::error::{exit, CliError, Outcome};
use crate::render::{outbox_json, outbox_line};
use crate::time::now_ms;
use lambda_idempotency::{Dispatcher, OutboxStore, Relay};
use serde_json::json;
use std::fmt::Write;

/// Lists the outbox messages still `PENDING` (a consistent scan).
pub async fn pending(aws_args: &AwsArgs, table: &str) -> Result<Outcome, CliError> {
    let sdk = aws::load(aws_args).await?;
    let store = aws::store(&sdk, table);
    let now = now_ms();
    let pending = store.pending_outbox().await?;
    let mut human = String::new();
    if pending.is_empty() {
        let _ = writeln!(human, "no pending outbox messages");
    }
    for message in &pending {
        let _ = writeln!(human, "{}", outbox_line(message));
    }
    let document = json!({
        "table": table,
        "count": pending.len(),
        "messages": pending.iter().map(|m| outbox_json(m, now)).collect::<Vec<_>>(),
    });
    Ok(Outcome::ok(document, human))
}

/// Delivers every pending message and marks it delivered: the relay's sweep,
/// with SQS (the SDK's configuration) and HTTP sinks.
pub async fn deliver(aws_args: &AwsArgs, table: &str) -> Result<Outcome, CliError> {
    let sdk = aws::load(aws_args).await?;
    let store = aws::store(&sdk, table);
    let dispatcher = Dispatcher::new()
        .with_sqs(aws_sdk_sqs::Client::new(&sdk))
        .with_http()
        .map_err(|e| CliError::Setup(format!("cannot set up the HTTP client: {e}")))?;
    let report = Relay::new(store, dispatcher).sweep().await?;
    let document = json!({
        "table": table,
        "delivered": report.delivered,
        "failed": report.failed,
    });
    let human = format!("delivered {}, failed {}\n", report.delivered, report.failed);
    if report.failed > 0 {
        return Ok(Outcome::with(
            document,
            human,
            exit::AWS,
            format!(
                "{} message(s) not delivered; they stay PENDING (the warnings above say why)",
                report.failed
            ),
        ));
    }
    Ok(Outcome::ok(document, human))
}
