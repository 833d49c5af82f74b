//! An HTTP API (payload v2) route `POST /orders` that honours `Idempotency-Key`:
//! a client retrying after a timeout gets the original 201, not a second order.

#[path = "common/mod.rs"]
mod common;

use aws_lambda_events::apigw::{ApiGatewayV2httpRequest, ApiGatewayV2httpResponse};
use aws_lambda_events::encodings::Body;
use aws_lambda_events::http::HeaderValue;
use lambda_idempotency::{Idempotency, IdempotencyConfig};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::json;

async fn create_order(request: ApiGatewayV2httpRequest) -> Result<ApiGatewayV2httpResponse, Error> {
    let order_id = request.request_context.request_id.unwrap_or_default();
    let mut response = ApiGatewayV2httpResponse::default();
    response.status_code = 201;
    response
        .headers
        .insert("content-type", HeaderValue::from_static("application/json"));
    response.body = Some(Body::Text(
        json!({ "order_id": order_id, "request": request.body }).to_string(),
    ));
    Ok(response)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let idempotency = Idempotency::new(
        common::store_from_env(&common::init().await)?,
        IdempotencyConfig::default(),
    );
    let http = idempotency.http("create_order", create_order);
    lambda_runtime::run(service_fn(|event: LambdaEvent<ApiGatewayV2httpRequest>| {
        http.handle_v2(event)
    }))
    .await
}
