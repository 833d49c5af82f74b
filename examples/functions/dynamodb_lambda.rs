//! A Lambda function whose order handler runs once per order id, with records in
//! DynamoDB. Deployed by `template.yaml` (`sam build && sam deploy --guided`).
//!
//! Environment: `IDEMPOTENCY_TABLE` (the table name). Locally, against LocalStack
//! (docs/developing.md, "A function under cargo-lambda"; `scripts/dev-loop.sh` runs it all):
//! the function is the `dynamodb_lambda` binary of the `deploy/` package, so watch
//! that package (`cargo lambda watch --example dynamodb_lambda` fails: cargo-lambda
//! asks cargo for a binary of that name in the root package, which has none), then
//! invoke the same event twice; the second response carries the first one's
//! `charge_id`:
//!
//! ```text
//! cargo lambda watch --package lambda-idempotency-functions --invoke-port 9000 \
//!   --env-var IDEMPOTENCY_TABLE=idempotency-dev,AWS_ENDPOINT_URL=http://127.0.0.1:4566,AWS_REGION=us-east-1,AWS_ACCESS_KEY_ID=test,AWS_SECRET_ACCESS_KEY=test
//! cargo lambda invoke dynamodb_lambda --invoke-port 9000 --data-file examples/events/order.json
//! ```

use lambda_idempotency::emf::{self, EmfLayer};
use lambda_idempotency::{DynamoDbStore, Idempotency, IdempotencyConfig};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tower::Layer;

#[derive(Deserialize, Serialize)]
struct Order {
    order_id: String,
    customer_id: String,
    amount_cents: u64,
}

#[derive(Deserialize, Serialize)]
struct Receipt {
    order_id: String,
    charged_cents: u64,
    /// The request id of the invocation that charged: a replay carries the first one's.
    charge_id: String,
}

/// The side effect to protect. Replace with a real payment call.
async fn handle(event: LambdaEvent<Order>) -> Result<Receipt, Error> {
    let (order, context) = event.into_parts();
    tracing::info!(order_id = %order.order_id, "charging");
    Ok(Receipt {
        order_id: order.order_id,
        charged_cents: order.amount_cents,
        charge_id: context.request_id,
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();

    let table = std::env::var("IDEMPOTENCY_TABLE").map_err(|_| "IDEMPOTENCY_TABLE is not set")?;
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let store = DynamoDbStore::new(aws_sdk_dynamodb::Client::new(&sdk), table);

    let config = IdempotencyConfig::builder()
        .key_expression("[customer_id, order_id]")
        .payload_validation("amount_cents")
        .expires_after(Duration::from_secs(24 * 3600))
        // Warm invocations replay without a DynamoDB request.
        .local_cache(1024)
        .build()?;
    let idempotency = Idempotency::new(store, config);

    // Dedup metrics as CloudWatch EMF lines, one document per invocation
    // (namespace `Idempotency`: the dashboard and alarms of template.yaml).
    let collector = emf::install("Idempotency")?;
    let service = EmfLayer::new(collector).layer(idempotency.wrap(service_fn(handle))?);
    lambda_runtime::run(service).await
}
