//! Set-up shared by the Lambda examples.

use lambda_idempotency::DynamoDbStore;
use lambda_runtime::Error;

/// The DynamoDB store on the table named by `IDEMPOTENCY_TABLE`.
pub async fn store_from_env() -> Result<DynamoDbStore, Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let table = std::env::var("IDEMPOTENCY_TABLE").map_err(|_| "IDEMPOTENCY_TABLE is not set")?;
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    Ok(DynamoDbStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        table,
    ))
}
