//! The AWS SDK's configuration and the store on the table.

use crate::args::AwsArgs;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use lambda_idempotency::DynamoDbStore;

/// The SDK's usual configuration (environment, profile, region, `AWS_ENDPOINT_URL`),
/// with the command line's overrides.
pub async fn load(args: &AwsArgs) -> SdkConfig {
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
    loader.load().await
}

/// The store on `table`, with the default attribute names and key layout.
pub fn store(sdk: &SdkConfig, table: &str) -> DynamoDbStore {
    DynamoDbStore::new(aws_sdk_dynamodb::Client::new(sdk), table)
}
