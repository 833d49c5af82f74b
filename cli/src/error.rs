//! What a command ends with: an outcome (a document, a text and an exit code),
//! or an error mapped to its exit code.

use lambda_idempotency::store::StoreError;
use lambda_idempotency::IdempotencyError;
use serde_json::{json, Value};

/// Exit codes (documented in `--help` and docs/production.md).
pub mod exit {
    /// Success: found, listed, released, delivered.
    pub const OK: i32 = 0;
    /// Nothing found.
    pub const NOT_FOUND: i32 = 1;
    /// Usage error (clap uses 2 for its own).
    pub const USAGE: i32 = 2;
    /// Refused: not the owner, live without `--force`, not a reservation.
    pub const REFUSED: i32 = 3;
    /// AWS or store error; undelivered messages.
    pub const AWS: i32 = 4;
    /// A malformed record.
    pub const MALFORMED: i32 = 5;
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input from the operator.
    #[error("{0}")]
    Usage(String),
    /// The store failed, or an item is not a valid record.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine refused the operation (e.g. deriving a key).
    #[error(transparent)]
    Idempotency(#[from] IdempotencyError),
    /// No source of the SDK's credential chain has credentials; `tried` lists
    /// the sources in the chain's order.
    #[error("no AWS credentials found (tried {tried}); set AWS_PROFILE or --profile to a profile that has them, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (RUST_LOG=aws_config=debug shows what each source answered)")]
    NoCredentials {
        /// The sources tried, as a phrase.
        tried: String,
    },
    /// A credential source failed (an expired SSO session, a role that cannot
    /// be assumed, a source that hangs): its reason, on one line.
    #[error("cannot load AWS credentials: {0}")]
    Credentials(String),
    /// A client could not be set up (e.g. no root certificates for HTTPS).
    #[error("{0}")]
    Setup(String),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl CliError {
    fn code(&self) -> i32 {
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::Store(StoreError::Malformed { .. })
            | CliError::Idempotency(IdempotencyError::MalformedRecord { .. }) => exit::MALFORMED,
            CliError::Idempotency(IdempotencyError::InvalidEvent(_)) => exit::USAGE,
            CliError::Store(_)
            | CliError::Idempotency(_)
            | CliError::NoCredentials { .. }
            | CliError::Credentials(_)
            | CliError::Setup(_)
            | CliError::Runtime(_) => exit::AWS,
        }
    }

    fn kind(&self) -> &'static str {
        match self.code() {
            exit::USAGE => "usage",
            exit::MALFORMED => "malformed_record",
            _ => "aws",
        }
    }
}

/// What a command prints, and its exit code.
#[derive(Debug)]
pub struct Outcome {
    /// The `--json` document.
    pub json: Value,
    /// The text printed otherwise.
    pub human: String,
    /// Printed on stderr (both modes): refusals, warnings.
    pub message: Option<String>,
    /// The exit code.
    pub code: i32,
}

impl Outcome {
    /// A successful outcome.
    pub fn ok(json: Value, human: String) -> Self {
        Self {
            json,
            human,
            message: None,
            code: exit::OK,
        }
    }

    /// An outcome with another exit code and a message for stderr.
    pub fn with(json: Value, human: String, code: i32, message: String) -> Self {
        Self {
            json,
            human,
            message: Some(message),
            code,
        }
    }

    /// An error as an outcome: nothing on stdout but the `--json` error document.
    pub fn from_error(err: CliError) -> Self {
        let message = one_line(&err);
        Self {
            json: json!({ "error": { "kind": err.kind(), "message": message } }),
            human: String::new(),
            message: Some(format!("error: {message}")),
            code: err.code(),
        }
    }

    /// Prints the document or the text on stdout, the message on stderr.
    pub fn print(&self, json: bool) {
        if let Some(message) = &self.message {
            eprintln!("{message}");
        }
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&self.json).unwrap_or_default()
            );
        } else if !self.human.is_empty() {
            print!("{}", self.human);
        }
    }
}

/// An error and its sources on one line, each source's text once: the SDK's
/// errors nest the cause of a failed request several levels down.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}
