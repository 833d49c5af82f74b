//! `idempotency`: the operator's tool for a lambda-idempotency table.
//!
//! Shows the record behind a key or an event, lists and releases stuck
//! reservations, lists and delivers the outbox. It reaches AWS through the SDK's
//! usual configuration (profile, region, `AWS_ENDPOINT_URL`), or the global
//! `--profile`, `--region` and `--endpoint-url` options.

mod args;
mod aws;
mod error;
mod journal;
mod outbox;
mod render;
mod reservations;
mod show;
mod time;

use clap::Parser as _;
use error::{CliError, Outcome};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let json = cli.command.json();
    let result = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(err) => Err(CliError::Runtime(err)),
    };
    let outcome = result.unwrap_or_else(Outcome::from_error);
    outcome.print(json);
    ExitCode::from(outcome.code as u8)
}

/// The argument parser's errors exit 2; with `--json` on the line, stdout still
/// carries one document. `--help` and `--version` print and exit 0.
fn usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let code = err.exit_code();
    let help = matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if !help && std::env::args().any(|arg| arg == "--json") {
        let message = err.kind().as_str().unwrap_or("invalid arguments");
        let rendered = err.render().to_string();
        let detail = rendered.lines().next().unwrap_or(message);
        let document = serde_json::json!({ "error": { "kind": "usage", "message": detail.trim_start_matches("error: ") } });
        println!("{document:#}");
    }
    let _ = err.print();
    ExitCode::from(u8::try_from(code).unwrap_or(2))
}

async fn run(cli: args::Cli) -> Result<Outcome, CliError> {
    let sdk = aws::load(&cli.aws).await;
    match cli.command {
        args::Command::Show(show) => show::run(&sdk, show).await,
        args::Command::InProgress(list) => reservations::list(&sdk, list).await,
        args::Command::Release(release) => reservations::release(&sdk, release).await,
        args::Command::Outbox(args::OutboxCommand::Pending(pending)) => {
            outbox::pending(&sdk, pending).await
        }
        args::Command::Outbox(args::OutboxCommand::Deliver(deliver)) => {
            outbox::deliver(&sdk, deliver).await
        }
    }
}
