//! `idempotency`: the operator's tool for a lambda-idempotency table.
//!
//! Shows the record behind a key or an event, lists and releases stuck
//! reservations, lists and delivers the outbox. It reaches AWS through the SDK's
//! usual configuration (profile, region, `AWS_ENDPOINT_URL`), or the
//! `--profile`, `--region` and `--endpoint-url` options.
//!
//! Those and `--table` and `--json` are global: they go before or after the
//! command (`idempotency --json --table T in-progress`). Every command needs
//! `--table`; clap cannot require a global option, so `main` checks it and
//! answers as the parser would (exit 2, with `--json` one error document).
//!
//! Credentials are resolved before the first AWS call (`aws::load`): without any,
//! the tool prints one line naming the sources the SDK's chain tried and exits
//! 4 (with `--json`, one error document of kind `aws`). The SDK's own warnings
//! about loading configuration and credentials are off unless `RUST_LOG` asks.

mod args;
mod aws;
mod error;
mod journal;
mod outbox;
mod render;
mod reservations;
mod show;
mod time;

use clap::{CommandFactory as _, FromArgMatches as _};
use error::{CliError, Outcome};
use std::process::ExitCode;

/// The log filter without `RUST_LOG`: warnings, but not the SDK's own about
/// loading its configuration and credentials (a missing profile file, each
/// credential source that failed): `aws::load` reports the outcome in one line,
/// and `RUST_LOG` (e.g. `aws_config=debug`) shows them all.
const DEFAULT_LOG: &str = "warn,aws_config=error,aws_runtime::env_config=error";

fn main() -> ExitCode {
    let matches = match args::Cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(err) => return usage_error(err),
    };
    let cli = match args::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let Some(table) = cli.globals.table.clone() else {
        return usage_error(missing_table(&matches));
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .init();
    let json = cli.globals.json;
    let result = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run(cli, &table)),
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
    // `--json` anywhere on the line, as it is global: the parse that failed
    // cannot say whether it saw it.
    if !help && std::env::args().any(|arg| arg == "--json") {
        let rendered = err.render().to_string();
        // The error's first paragraph on one line: it names what is missing or
        // wrong ("...not provided: --table <TABLE>"), without the usage and tips.
        let detail = rendered
            .split("\n\n")
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let message = detail.strip_prefix("error: ").unwrap_or(&detail);
        let message = match message {
            "" => err.kind().as_str().unwrap_or("invalid arguments"),
            message => message,
        };
        let document = serde_json::json!({ "error": { "kind": "usage", "message": message } });
        println!("{document:#}");
    }
    let _ = err.print();
    ExitCode::from(u8::try_from(code).unwrap_or(2))
}

/// The parser's own error for a missing `--table`, with the usage of the
/// command that was given: clap cannot require a global argument itself.
fn missing_table(matches: &clap::ArgMatches) -> clap::Error {
    let mut command = args::Cli::command();
    // Gives subcommands their full names ("idempotency outbox pending") for the usage line.
    command.build();
    let mut level = matches;
    while let Some((name, sub_matches)) = level.subcommand() {
        let Some(sub) = command.find_subcommand(name).cloned() else {
            break;
        };
        command = sub;
        level = sub_matches;
    }
    command.error(
        clap::error::ErrorKind::MissingRequiredArgument,
        "the following required arguments were not provided:\n  --table <TABLE>",
    )
}

/// Runs the command. Each loads the AWS configuration (and so checks the
/// credentials) only when it needs AWS: a bad event file or key expression is a
/// usage error even on a machine without credentials.
async fn run(cli: args::Cli, table: &str) -> Result<Outcome, CliError> {
    let aws = &cli.aws;
    match cli.command {
        args::Command::Show(show) => show::run(aws, table, show).await,
        args::Command::InProgress(list) => reservations::list(aws, table, list).await,
        args::Command::Release(release) => reservations::release(aws, table, release).await,
        args::Command::Outbox(args::OutboxCommand::Pending) => outbox::pending(aws, table).await,
        args::Command::Outbox(args::OutboxCommand::Deliver) => outbox::deliver(aws, table).await,
    }
}
