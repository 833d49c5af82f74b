//! Set-up shared by the Lambda examples.

use aws_config::SdkConfig;
use lambda_idempotency::DynamoDbStore;
use lambda_runtime::Error;

/// Logging, and the AWS configuration from the environment.
pub async fn init() -> SdkConfig {
    lambda_runtime::tracing::init_default_subscriber();
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}

/// The DynamoDB store on the table named by `IDEMPOTENCY_TABLE`.
pub fn store_from_env(sdk: &SdkConfig) -> Result<DynamoDbStore, Error> {
    let table = env("IDEMPOTENCY_TABLE")?;
    Ok(DynamoDbStore::new(
        aws_sdk_dynamodb::Client::new(sdk),
        table,
    ))
}

/// A required environment variable.
pub fn env(name: &str) -> Result<String, Error> {
    std::env::var(name).map_err(|_| format!("{name} is not set").into())
}
