//! An order handler whose every external effect is retry-safe: the card is charged
//! over HTTP in a step, with a derived `Idempotency-Key` the payment API dedupes
//! on, and `OrderPlaced` goes to SQS through the outbox, delivered after the order
//! is committed. `examples/outbox_relay.rs` delivers what a crash leaves behind.
//!
//! Environment: `IDEMPOTENCY_TABLE`, `PAYMENTS_URL`, `EVENTS_QUEUE_URL`.

#[path = "common/mod.rs"]
mod common;
#[path = "common/order.rs"]
mod order;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use lambda_idempotency::{Dispatcher, Idempotency, IdempotencyConfig, OutboxMessage};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use order::{Order, Payments};
use serde_json::Value;
use std::sync::Arc;

type Https = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What the handler needs, shared by every invocation.
struct Shop {
    http: Https,
    payments_url: String,
    queue_url: String,
}

impl Payments for Shop {
    /// `POST {payments_url}` with the step's derived key.
    async fn charge(&self, key: &str, order: &Order) -> Result<Value, std::io::Error> {
        let request = Request::post(&self.payments_url)
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(order)?)))
            .map_err(std::io::Error::other)?;
        let response = self
            .http
            .request(request)
            .await
            .map_err(std::io::Error::other)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        if !status.is_success() {
            return Err(std::io::Error::other(format!(
                "payment API answered {status}"
            )));
        }
        Ok(serde_json::from_slice(&body)?)
    }
}

/// The shared order logic, with `OrderPlaced` sent to the events queue.
async fn place_order(event: LambdaEvent<Order>, shop: Arc<Shop>) -> Result<Value, Error> {
    let queue_url = shop.queue_url.clone();
    order::place_order(event.payload, &*shop, |placed| OutboxMessage::Sqs {
        queue_url,
        body: placed.to_string(),
        group_id: None,
    })
    .await
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let sdk = common::init().await;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .build();
    let shop = Arc::new(Shop {
        http: Client::builder(TokioExecutor::new()).build(connector),
        payments_url: common::env("PAYMENTS_URL")?,
        queue_url: common::env("EVENTS_QUEUE_URL")?,
    });

    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .payload_validation("amount_cents")
        .build()?;
    let idempotency = Idempotency::new(common::store_from_env(&sdk)?, config)
        .with_dispatcher(Dispatcher::new().with_sqs(aws_sdk_sqs::Client::new(&sdk)));
    let handler = service_fn(move |event| place_order(event, shop.clone()));
    lambda_runtime::run(idempotency.wrap(handler)?).await
}
