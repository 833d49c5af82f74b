//! A wrapped handler under the real `lambda_runtime` loop, against a local
//! Lambda Runtime API: every failure reaches Lambda with its own `errorType`, and
//! the handler's own errors keep theirs. One test in this binary: the runtime
//! reads its endpoint from the process environment.

mod support;

use lambda_idempotency::{Idempotency, IdempotencyConfig, IdempotencyRecord, IdempotencyStore};
use lambda_idempotency::{MemoryStore, Status};
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use support::faults::{Fault, FaultStore, Mode, Op};
use support::http1::read_request;
use support::{key_for, now_ms};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// The handler's own error, with its own `errorType`.
#[derive(Debug)]
struct OrderDeclined;

impl From<OrderDeclined> for Diagnostic {
    fn from(_: OrderDeclined) -> Self {
        Diagnostic {
            error_type: "OrderDeclined".into(),
            error_message: "the card was declined".into(),
        }
    }
}

/// What the runtime posted for one invocation: `response` or `error`, and the body.
type Posted = (String, Value);

/// A Runtime API serving `events` in turn, recording what the runtime posts.
struct RuntimeApi {
    events: Mutex<VecDeque<Value>>,
    posted: Mutex<Vec<Posted>>,
    changed: Notify,
}

impl RuntimeApi {
    async fn start(events: Vec<Value>) -> (Arc<Self>, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let api = Arc::new(Self {
            events: Mutex::new(events.into()),
            posted: Mutex::default(),
            changed: Notify::new(),
        });
        let server = api.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(server.clone().serve(stream));
            }
        });
        (api, address)
    }

    async fn serve(self: Arc<Self>, mut stream: tokio::net::TcpStream) {
        let Some((path, _, body)) = read_request(&mut stream).await else {
            return;
        };
        let (headers, reply) = if path.ends_with("/invocation/next") {
            let next = self.events.lock().expect("events").pop_front();
            let Some(event) = next else {
                // No more events: the runtime waits here until the test ends it.
                return std::future::pending().await;
            };
            let id = format!("req-{}", self.posted.lock().expect("posted").len());
            let headers = format!(
                "lambda-runtime-aws-request-id: {id}\r\nlambda-runtime-deadline-ms: {}\r\n\
                 lambda-runtime-invoked-function-arn: arn:aws:lambda:us-east-1:123456789012:function:runtime-test\r\n",
                now_ms() + 60_000
            );
            (headers, event.to_string())
        } else {
            let kind = path.rsplit('/').next().unwrap_or_default().to_owned();
            self.posted.lock().expect("posted").push((kind, body));
            self.changed.notify_one();
            (String::new(), String::new())
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\n{headers}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
            reply.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
    }

    async fn wait_for(&self, count: usize) -> Vec<Posted> {
        loop {
            let notified = self.changed.notified();
            let posted = self.posted.lock().expect("posted").clone();
            if posted.len() >= count {
                return posted;
            }
            notified.await;
        }
    }
}

#[tokio::test]
async fn every_failure_reaches_lambda_with_its_own_error_type() {
    let scripted = [
        (json!({"order_id": "a", "amount": 1}), "response", ""),
        (json!({"order_id": "a", "amount": 1}), "response", ""),
        (
            json!({"order_id": "d", "amount": 1, "decline": true}),
            "error",
            "OrderDeclined",
        ),
        (
            json!({"order_id": "busy", "amount": 1}),
            "error",
            "IdempotencyAlreadyInProgressError",
        ),
        (
            json!({"order_id": "a", "amount": 2}),
            "error",
            "IdempotencyValidationError",
        ),
        (json!({"amount": 1}), "error", "IdempotencyKeyError"),
        (
            json!({"order_id": "s", "amount": 1}),
            "error",
            "IdempotencyPersistenceLayerError",
        ),
    ];
    let (api, address) =
        RuntimeApi::start(scripted.iter().map(|(e, _, _)| e.clone()).collect()).await;
    // SAFETY of the test: this binary has one test, so nothing reads the
    // environment concurrently.
    for (name, value) in [
        ("AWS_LAMBDA_RUNTIME_API", address.as_str()),
        ("AWS_LAMBDA_FUNCTION_NAME", "runtime-test"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "1"),
    ] {
        std::env::set_var(name, value);
    }

    // Another invocation holds "busy"; the sixth reservation meets a store failure.
    let memory = MemoryStore::new();
    memory
        .reserve(
            &IdempotencyRecord {
                key: key_for("runtime-test", "busy"),
                status: Status::InProgress,
                expiration: now_ms() / 1000 + 3600,
                in_progress_expiration: Some(now_ms() + 600_000),
                data: None,
                validation: None,
                owner: "another invocation".into(),
                is_error: false,
                execution: "another execution".into(),
            },
            now_ms(),
        )
        .await
        .expect("hold busy");
    let store = FaultStore::new(memory);
    store.faults.set(&[Fault {
        op: Op::Reserve,
        nth: 6,
        mode: Mode::Fail,
    }]);
    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .payload_validation("amount")
        .strict(true)
        .build()
        .expect("config");
    let service = Idempotency::new(store, config)
        .wrap(service_fn(|event: LambdaEvent<Value>| async move {
            match event.payload["decline"].as_bool() {
                Some(true) => Err(OrderDeclined),
                _ => Ok(json!({ "order": event.payload["order_id"] })),
            }
        }))
        .expect("one handler");
    let runtime = tokio::spawn(lambda_runtime::run(service));

    let posted = api.wait_for(scripted.len()).await;
    runtime.abort();
    for ((event, kind, error_type), (posted_kind, body)) in scripted.iter().zip(&posted) {
        assert_eq!(posted_kind, kind, "{event}: {body}");
        if *kind == "error" {
            assert_eq!(body["errorType"], *error_type, "{event}: {body}");
            assert!(
                body["errorMessage"].as_str().is_some_and(|m| !m.is_empty()),
                "{event}: a clear message: {body}"
            );
        }
    }
    assert_eq!(posted[0].1, json!({ "order": "a" }));
    assert_eq!(posted[1].1, posted[0].1, "the replay");
}
