//! Keys through the public API: what goes into a key, and hostile events.

use base64::Engine as _;
use lambda_idempotency::{Error, Idempotency, IdempotencyConfig, IdempotencyError, MemoryStore};
use lambda_runtime::{service_fn, Context, LambdaEvent};
use serde_json::{json, Value};
use std::io::Read as _;
use std::time::Instant;
use tower::{Service, ServiceExt};

type BoxError = lambda_runtime::Error;

/// Base64 of `len` gzipped `a`s, compressed as a stream so the test itself stays small.
fn gzip_bomb(len: u64) -> String {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::copy(&mut std::io::repeat(b'a').take(len), &mut gz).expect("gzip");
    base64::engine::general_purpose::STANDARD.encode(gz.finish().expect("gzip"))
}

/// One call of an echo handler wrapped with `config`.
async fn call(config: IdempotencyConfig, event: Value) -> Result<Value, Error<BoxError>> {
    let idempotency = Idempotency::new(MemoryStore::new(), config);
    let mut service = idempotency
        .wrap(service_fn(|event: LambdaEvent<Value>| async move {
            Ok::<_, BoxError>(event.payload)
        }))
        .expect("one handler");
    let context = Context::default();
    service
        .ready()
        .await?
        .call(LambdaEvent::new(event, context))
        .await
}

fn invalid_event(err: &Error<BoxError>) -> &str {
    match err {
        Error::Idempotency(IdempotencyError::InvalidEvent(reason)) => reason,
        other => panic!("not InvalidEvent: {other:?}"),
    }
}

/// The 256 MiB bomb of the report: run with
/// `/usr/bin/time -v cargo test --release --test keys gzip_bomb_of_256_mib -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement: builds a 256 MiB gzip bomb"]
async fn gzip_bomb_of_256_mib() {
    let bomb = gzip_bomb(256 << 20);
    eprintln!("event: {} KiB of base64", bomb.len() >> 10);
    let config = IdempotencyConfig::builder()
        .key_expression("powertools_base64_gzip(d)")
        .build()
        .expect("valid");
    let started = Instant::now();
    let result = call(config, json!({ "d": bomb })).await;
    eprintln!("call: {:?}, ok: {}", started.elapsed(), result.is_ok());
}

#[tokio::test]
async fn a_gzip_bomb_is_an_invalid_event_naming_the_limit() {
    let config = |limit| {
        IdempotencyConfig::builder()
            .key_expression("powertools_base64_gzip(d)")
            .max_inflated_bytes(limit)
            .build()
            .expect("valid")
    };
    let event = json!({ "d": gzip_bomb(64 << 10) });
    let err = call(config(4096), event.clone()).await.expect_err("bomb");
    assert!(invalid_event(&err).contains("4096 bytes"), "{err}");
    call(config(64 << 10), event).await.expect("at the limit");

    let default = IdempotencyConfig::builder()
        .payload_validation("powertools_base64_gzip(d)")
        .build()
        .expect("valid");
    let err = call(default, json!({ "d": gzip_bomb((6 << 20) + 1) }))
        .await
        .expect_err("over the default");
    assert!(invalid_event(&err).contains("6291456 bytes"), "{err}");
}
