//! The AWS SDK's configuration, its credentials resolved up front, and the store
//! on the table.
//!
//! Credentials are resolved once before the command runs, through the SDK's
//! default chain (environment, profile with SSO, assume role and
//! `credential_process`, web identity token, ECS container, EC2 instance
//! metadata), so that a machine without any ends with one clear error (exit 4)
//! instead of the SDK's warnings and a failed call. The instance metadata
//! service is still asked, last, so the tool works on EC2 with the instance's
//! role: the SDK's client for it gives up after a one-second connect or read
//! timeout and does not retry timeouts, which is what a laptop without a route
//! to it costs.

use crate::args::AwsArgs;
use crate::error::{one_line, CliError};
use aws_config::imds::client::error::ImdsError;
use aws_config::meta::ProviderChainError;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{future, ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use lambda_idempotency::DynamoDbStore;
use std::error::Error;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// How long resolving credentials may take before the tool gives up. Each
/// source has its own timeouts (one second for the instance metadata service);
/// this only bounds a source that hangs, e.g. a `credential_process` that never
/// ends, and leaves time for one that asks for an MFA code.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(60);

/// The sources of the SDK's default credential chain, in its order and under
/// its names (what `ProviderChainError` reports when it tried them all).
const DEFAULT_CHAIN: [&str; 5] = [
    "Environment",
    "Profile",
    "WebIdentityToken",
    "EcsContainer",
    "Ec2InstanceMetadata",
];

/// The SDK's usual configuration (environment, profile, region, `AWS_ENDPOINT_URL`),
/// with the command line's overrides, and credentials resolved: no credentials,
/// or a source that fails, is an error here, before any call.
pub async fn load(args: &AwsArgs) -> Result<SdkConfig, CliError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(profile) = &args.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(region) = &args.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &args.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    let sdk = loader.load().await;
    let Some(chain) = sdk.credentials_provider() else {
        // Only a loader told `no_credentials()` has none; not this one.
        return Ok(sdk);
    };
    let resolved = tokio::time::timeout(CREDENTIALS_TIMEOUT, chain.provide_credentials()).await;
    let credentials = match resolved {
        Ok(Ok(credentials)) => credentials,
        Ok(Err(err)) => return Err(credentials_error(&err, args)),
        Err(_) => {
            return Err(CliError::Credentials(format!(
                "no answer from the credential sources after {}s (a `credential_process` or an SSO or STS call that hangs?)",
                CREDENTIALS_TIMEOUT.as_secs()
            )))
        }
    };
    let provider = Resolved {
        first: Mutex::new(Some(credentials)),
        chain,
    };
    Ok(sdk
        .into_builder()
        .credentials_provider(SharedCredentialsProvider::new(provider))
        .build())
}

/// The store on `table`, with the default attribute names and key layout.
pub fn store(sdk: &SdkConfig, table: &str) -> DynamoDbStore {
    DynamoDbStore::new(aws_sdk_dynamodb::Client::new(sdk), table)
}

/// Credentials resolved up front, handed to the SDK's identity cache on its
/// first call, then the chain for refreshes: the chain runs once per command,
/// not again for the first request (a `credential_process` would prompt twice,
/// an SSO or assume-role source would call AWS twice).
#[derive(Debug)]
struct Resolved {
    first: Mutex<Option<Credentials>>,
    chain: SharedCredentialsProvider,
}

impl ProvideCredentials for Resolved {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        // A poisoned lock only loses the head start: the chain answers instead.
        let first = self.first.lock().ok().and_then(|mut first| first.take());
        match first {
            Some(credentials) => future::ProvideCredentials::ready(Ok(credentials)),
            None => self.chain.provide_credentials(),
        }
    }

    fn fallback_on_interrupt(&self) -> Option<Credentials> {
        self.chain.fallback_on_interrupt()
    }
}

/// The chain's failure as one line. No source having credentials (each said it
/// was not configured, or the instance metadata service could not give a
/// session token: not on EC2, or IMDS disabled) is `NoCredentials`, naming what
/// was tried; a source that failed (an expired SSO session, a role that cannot
/// be assumed) says why.
fn credentials_error(err: &CredentialsError, args: &AwsArgs) -> CliError {
    match err {
        CredentialsError::CredentialsNotLoaded(_) => {
            let chain = err
                .source()
                .and_then(|source| source.downcast_ref::<ProviderChainError<CredentialsError>>());
            let tried: Vec<&str> = match chain {
                Some(chain) => chain.attempts().iter().map(|a| a.name()).collect(),
                None => DEFAULT_CHAIN.to_vec(),
            };
            no_credentials(&tried, None, args)
        }
        CredentialsError::ProviderError(_) => match err.source() {
            // Only the instance metadata source, last in the chain, is reached
            // after every other source said it had nothing.
            Some(source) if token_refused(source) => {
                no_credentials(&DEFAULT_CHAIN, Some(innermost(source)), args)
            }
            Some(source) => CliError::Credentials(one_line(source)),
            None => CliError::Credentials(one_line(err)),
        },
        _ => CliError::Credentials(one_line(err)),
    }
}

/// Whether `source` is the instance metadata service refusing a session token
/// (403: IMDS disabled, or not EC2's); a failure to reach it at all is already
/// "not loaded" in the SDK.
fn token_refused(source: &(dyn Error + 'static)) -> bool {
    matches!(
        source.downcast_ref::<ImdsError>(),
        Some(ImdsError::FailedToLoadToken(_))
    )
}

/// The `NoCredentials` error for the sources `tried` (the chain's names), with
/// what the instance metadata service answered, if it answered.
fn no_credentials(tried: &[&str], imds: Option<String>, args: &AwsArgs) -> CliError {
    let tried: Vec<String> = tried
        .iter()
        .map(|name| match *name {
            "Environment" => "environment variables".to_owned(),
            "Profile" => profile_source(args),
            "WebIdentityToken" => "web identity token".to_owned(),
            "EcsContainer" => "ECS container".to_owned(),
            "Ec2InstanceMetadata" => match &imds {
                Some(answer) => format!("EC2 instance metadata ({answer})"),
                None if imds_disabled() => {
                    "EC2 instance metadata (disabled by AWS_EC2_METADATA_DISABLED)".to_owned()
                }
                None => "EC2 instance metadata".to_owned(),
            },
            other => other.to_owned(),
        })
        .collect();
    CliError::NoCredentials {
        tried: tried.join(", "),
    }
}

/// Whether `AWS_EC2_METADATA_DISABLED` turns the instance metadata source off,
/// as the SDK reads it.
fn imds_disabled() -> bool {
    std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|value| value.eq_ignore_ascii_case("true"))
}

/// The profile source as tried: its name, and the shared files that do not
/// exist (the SDK's warning about a missing overridden file is not shown).
fn profile_source(args: &AwsArgs) -> String {
    let name = args
        .profile
        .clone()
        .or_else(|| std::env::var("AWS_PROFILE").ok())
        .unwrap_or_else(|| "default".to_owned());
    let missing: Vec<String> = [
        ("AWS_CONFIG_FILE", "~/.aws/config"),
        ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
    ]
    .into_iter()
    .filter_map(|(variable, default)| {
        let path = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
        let expanded = match path.strip_prefix("~/") {
            Some(rest) => std::env::home_dir()?.join(rest),
            None => PathBuf::from(&path),
        };
        (!expanded.exists()).then(|| format!("no {path}"))
    })
    .collect();
    if missing.is_empty() {
        format!("profile `{name}`")
    } else {
        format!("profile `{name}` ({})", missing.join(", "))
    }
}

/// The most specific message of an error chain: its last source's.
fn innermost(err: &(dyn Error + 'static)) -> String {
    let mut last = err;
    while let Some(source) = last.source() {
        last = source;
    }
    one_line(last).trim_end_matches('.').to_owned()
}
