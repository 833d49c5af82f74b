#!/usr/bin/env bash
# What the crate adds to a minimal Lambda function (issue 9's targets): builds the
# same function with and without the idempotency wrapper (default features), and
# a third that writes one DynamoDB item itself (`put`: any function that uses
# DynamoDB already links the SDK's request pipeline and a PutItem),
# each from a clean target dir in release with `strip = true`, and prints CPU
# time (user + sys: steadier than wall time on a shared machine), the stripped
# binary's size and the number of crates in `cargo tree -e normal`.
# Takes about 3 x 6 minutes of CPU on 2 cores. Not part of the test command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

manifest() {
  cat <<TOML
[package]
name = "minimal"
version = "0.1.0"
edition = "2021"

[dependencies]
lambda_runtime = "1.5"
aws-config = { version = "1.13", features = ["behavior-version-latest"] }
aws-sdk-dynamodb = "1.136"
tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
serde_json = "1"
$1

[profile.release]
strip = true
TOML
}

mkdir -p "$work/without/src" "$work/with/src" "$work/put/src"
manifest "" >"$work/without/Cargo.toml"
manifest "" >"$work/put/Cargo.toml"
manifest "lambda-idempotency = { path = \"$root\" }" >"$work/with/Cargo.toml"
cat >"$work/without/src/main.rs" <<'RS'
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    Ok(json!({ "order": event.payload["order_id"] }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let sdk = aws_config::load_from_env().await;
    let _client = aws_sdk_dynamodb::Client::new(&sdk);
    lambda_runtime::run(service_fn(handler)).await
}
RS
cat >"$work/with/src/main.rs" <<'RS'
use lambda_idempotency::{DynamoDbStore, Idempotency, IdempotencyConfig};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    Ok(json!({ "order": event.payload["order_id"] }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let sdk = aws_config::load_from_env().await;
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let config = IdempotencyConfig::builder().key_expression("order_id").build()?;
    let idempotency = Idempotency::new(DynamoDbStore::new(client, "idempotency"), config);
    lambda_runtime::run(idempotency.wrap(service_fn(handler))?).await
}
RS

cat >"$work/put/src/main.rs" <<'RS'
use aws_sdk_dynamodb::types::AttributeValue;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let sdk = aws_config::load_from_env().await;
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| {
        let client = client.clone();
        async move {
            let order = event.payload["order_id"].as_str().unwrap_or_default().to_owned();
            client
                .put_item()
                .table_name("orders")
                .item("id", AttributeValue::S(order.clone()))
                .send()
                .await?;
            Ok::<_, Error>(json!({ "order": order }))
        }
    }))
    .await
}
RS

for variant in without put with; do
  cd "$work/$variant"
  /usr/bin/time -f "$variant: build CPU %U s user + %S s sys, wall %e s" \
    env -u CARGO_TARGET_DIR cargo build --release --quiet 2>&1 | tail -n 1
  echo "$variant: stripped binary $(stat -c %s target/release/minimal) bytes"
  echo "$variant: $(cargo tree -e normal --prefix none | sed 's/ (\*)//' | sort -u | wc -l) crates"
done
