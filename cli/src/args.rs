//! The command line.

use crate::time::parse_duration;
use clap::builder::NonEmptyStringValueParser;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

const EXIT_CODES: &str = "\
Exit codes:
  0  success: the record was found, the listing ran (even when empty), the
     reservation was released, every pending message was delivered
  1  nothing found: no record under the key (show, release), or the event holds
     no key material (show --event)
  2  usage error: bad arguments, an unreadable event file, an invalid key expression
  3  refused: not the owner, a live reservation without --force, a completed record
  4  AWS or store error (the message carries DynamoDB's error code), no AWS
     credentials (checked before the command runs; the message names the sources
     tried), or messages left undelivered by `outbox deliver`
  5  malformed record: an item under the key (or in a listing) is not a valid record

With --json, stdout carries exactly one JSON document, also on errors
({\"error\": {\"kind\", \"message\"}}); messages go to stderr.";

/// The operator's tool for lambda-idempotency tables: why an event was not
/// executed, stuck reservations, the outbox.
///
/// The global options (`--table`, `--json` and the AWS options) go before or
/// after the command: `idempotency --json --table T in-progress` and
/// `idempotency in-progress --table T --json` are the same.
#[derive(Debug, Parser)]
#[command(name = "idempotency", version, after_long_help = EXIT_CODES, after_help = "Exit codes: 0 ok, 1 not found, 2 usage, 3 refused, 4 AWS error, 5 malformed record (--help for details).")]
pub struct Cli {
    #[command(flatten)]
    pub globals: Globals,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options of every command, before or after its name.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options (before or after the command)")]
pub struct Globals {
    /// The idempotency table (required by every command).
    // Optional here because clap cannot require a global argument: main checks it.
    #[arg(long, global = true, value_name = "TABLE", value_parser = NonEmptyStringValueParser::new())]
    pub table: Option<String>,
    /// One JSON document on stdout instead of text, also on errors.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Where AWS is: the SDK's usual configuration unless given here.
#[derive(Debug, Args)]
#[command(next_help_heading = "AWS options (global)")]
pub struct AwsArgs {
    /// A named profile (default: `AWS_PROFILE`, else `default`).
    #[arg(long, global = true)]
    pub profile: Option<String>,
    /// The region (default: `AWS_REGION`, else the profile's).
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// Another endpoint, e.g. LocalStack (default: `AWS_ENDPOINT_URL`).
    #[arg(long, global = true)]
    pub endpoint_url: Option<String>,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the record behind a key, or behind an event (why was it not executed?).
    #[command(after_long_help = EXIT_CODES)]
    Show(ShowArgs),
    /// List INPROGRESS reservations whose deadline passed (attempts that died
    /// and that no retry took over); with --live also those still running.
    #[command(after_long_help = EXIT_CODES)]
    InProgress(InProgressArgs),
    /// Release a reservation, conditional on its owner token: open it for
    /// takeover when its execution journaled steps, else delete it.
    #[command(after_long_help = EXIT_CODES)]
    Release(ReleaseArgs),
    /// The outbox: messages committed but not delivered.
    #[command(subcommand)]
    Outbox(OutboxCommand),
}

/// `show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The record's key, `{prefix}#{hash}` (from a log line or an error).
    #[arg(long, required_unless_present = "event", conflicts_with = "event")]
    pub key: Option<String>,
    /// A file holding the event as the function received it (JSON).
    #[arg(long, requires = "key_expression")]
    pub event: Option<PathBuf>,
    /// The function's `key_expression` (JMESPath); `@` for the whole event.
    #[arg(long, requires = "event")]
    pub key_expression: Option<String>,
    /// The key prefix: the function's `key_prefix` if it sets one, else its
    /// Lambda function name (default: `AWS_LAMBDA_FUNCTION_NAME`, else `local`,
    /// as the engine).
    #[arg(long, requires = "event")]
    pub function: Option<String>,
    /// The handler's name given to `wrap_as`, `function` or a batch/HTTP adapter
    /// (none for `wrap`/`layer`).
    #[arg(long, requires = "event")]
    pub handler: Option<String>,
    /// Keys as Powertools for Python derives them (`powertools_python_keys`):
    /// md5 (the Powertools default), sha224, sha256, sha384 or sha512. Needs the
    /// tool built with the `powertools` feature.
    #[arg(
        long,
        requires = "event",
        num_args = 0..=1,
        default_missing_value = "md5",
        value_name = "HASH"
    )]
    pub powertools_keys: Option<String>,
}

/// `in-progress`.
#[derive(Debug, Args)]
pub struct InProgressArgs {
    /// Only reservations whose deadline passed at least this long ago
    /// (`90s`, `10m`, `2h`, `1d`, `1h30m`).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub older_than: Duration,
    /// Also list reservations whose deadline is still ahead (possibly running).
    #[arg(long)]
    pub live: bool,
    /// Also list expired records (they count as absent: the next call runs).
    #[arg(long)]
    pub include_expired: bool,
}

/// `release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The record's key.
    #[arg(long)]
    pub key: String,
    /// The reservation's owner token (from `show` or `in-progress`).
    #[arg(long)]
    pub owner: String,
    /// Release even though the deadline is still ahead (or there is none): the
    /// attempt may still be running, and a retry would then run beside it.
    #[arg(long)]
    pub force: bool,
    /// Delete the record instead of opening it for takeover: the next call then
    /// starts a new execution, with new derived keys, so a step call the attempt
    /// made without journaling its result (it timed out waiting for the payment
    /// API) would be sent again under another key. Only for an attempt known to
    /// have called nothing; refused when the execution journaled steps.
    #[arg(long)]
    pub delete: bool,
}

/// `outbox pending` and `outbox deliver`.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// List outbox messages still PENDING.
    #[command(after_long_help = EXIT_CODES)]
    Pending,
    /// Deliver every PENDING message and mark it DELIVERED (the relay's sweep):
    /// SQS messages with the SDK's configuration, HTTP webhooks.
    #[command(after_long_help = EXIT_CODES)]
    Deliver,
}
