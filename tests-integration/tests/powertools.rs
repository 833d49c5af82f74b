//! A Python function on AWS Lambda Powertools for Python and its Rust port share a
//! table (docs/migrating_from_powertools.md): each replays the other's
//! records, for a scalar key, compound keys and a non-ASCII key.
//!
//! The Python side is the real Powertools package (version pinned in
//! `scripts/powertools-venv.sh`, which this test runs to get the venv's python
//! unless `POWERTOOLS_PYTHON` names one) running `tests/powertools/run.py`
//! against the same LocalStack table (this package builds the crate with
//! `powertools-compat`): `cargo test -p lambda-idempotency-tests --test powertools`.

mod support;

use lambda_idempotency::{DynamoDbStore, Idempotency, IdempotencyConfig, PowertoolsHash};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use support::localstack::{client, create_table, endpoint, table_name};
use support::{invoke, now_ms, BoxError, Counter};

/// The Python function's name; its handler is `app.lambda_handler`.
const FUNCTION: &str = "orders-py";
/// Powertools' record id prefix for that handler: `{function}.{module}.{qualname}`.
const PREFIX: &str = "orders-py.app.lambda_handler";

/// One key configuration, the same on both sides, and the events it sees.
struct Case {
    key_expression: &'static str,
    validation: Option<&'static str>,
    events: Vec<Value>,
}

/// Order ids unique to this run, so that the two tests and reruns never meet.
fn cases(run: &str) -> Vec<Case> {
    let order = |n: u32| format!("o-{run}-{n}");
    vec![
        // A scalar key.
        Case {
            key_expression: "order_id",
            validation: None,
            events: vec![
                json!({ "order_id": order(1), "amount": 10 }),
                json!({ "order_id": order(2), "amount": 20 }),
            ],
        },
        // A compound key (a multi-select list), with payload validation on a float.
        Case {
            key_expression: "[order_id, customer]",
            validation: Some("amount"),
            events: vec![json!({ "order_id": order(3), "customer": "c-1", "amount": 12.5 })],
        },
        // A compound key as a JMESPath object (sorted keys), numbers of both kinds,
        // taken from a JSON body.
        Case {
            key_expression: "powertools_json(body).{id: order_id, total: amount, qty: qty}",
            validation: None,
            events: vec![json!({
                "body": format!(r#"{{"order_id": "{}", "amount": 1e16, "qty": 3}}"#, order(4)),
            })],
        },
        // A non-ASCII key: ensure_ascii escapes, a surrogate pair for the rocket.
        Case {
            key_expression: "customer",
            validation: None,
            events: vec![json!({ "order_id": order(5), "customer": format!("Zoë 🚀 {run}") })],
        },
    ]
}

fn python() -> String {
    if let Ok(python) = std::env::var("POWERTOOLS_PYTHON") {
        return python;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/powertools-venv.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/powertools-venv.sh");
    assert!(out.status.success(), "scripts/powertools-venv.sh failed");
    String::from_utf8(out.stdout)
        .expect("a path")
        .trim()
        .to_owned()
}

/// Runs the cases through Powertools' `@idempotent` handler; per case, per event:
/// whether the Python function ran, and the response Python returned.
fn run_python(table: &str, cases: &[Case]) -> Vec<Vec<(bool, Value)>> {
    let job = json!({
        "table": table,
        "function_name": FUNCTION,
        "hash_function": "md5",
        "cases": cases.iter().map(|c| json!({
            "key_expression": c.key_expression,
            "validation": c.validation,
            "events": c.events,
        })).collect::<Vec<_>>(),
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/powertools/run.py");
    let mut child = Command::new(python())
        .arg(script)
        .env("AWS_ENDPOINT_URL", endpoint())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(job.to_string().as_bytes())
        .expect("write the job");
    let out = child.wait_with_output().expect("python finished");
    assert!(out.status.success(), "tests/powertools/run.py failed");
    let results: Vec<Vec<Value>> = serde_json::from_slice(&out.stdout).expect("JSON results");
    results
        .into_iter()
        .map(|case| {
            case.into_iter()
                .map(|r| (r["ran"] == json!(true), r["response"].clone()))
                .collect()
        })
        .collect()
}

/// The Rust port of the handler, wrapped with the Powertools-compatible config of
/// `case`; counts its runs.
fn rust_service(
    table: &str,
    case: &Case,
    runs: &Counter,
) -> impl tower::Service<LambdaEvent<Value>, Response = Value, Error = lambda_idempotency::Error<BoxError>>
{
    let mut builder = IdempotencyConfig::builder()
        .key_expression(case.key_expression)
        .key_prefix(PREFIX)
        .powertools_python_keys(PowertoolsHash::Md5)
        .strict(true);
    if let Some(validation) = case.validation {
        builder = builder.payload_validation(validation);
    }
    let config = builder.build().expect("valid config");
    let store = DynamoDbStore::new(client(), table);
    let runs = runs.clone();
    Idempotency::new(store, config)
        .wrap(service_fn(move |event: LambdaEvent<Value>| {
            runs.hit();
            let e = event.payload;
            async move {
                Ok::<_, BoxError>(json!({
                    "handled_by": "rust",
                    "order_id": e["order_id"],
                    "customer": e["customer"],
                    "amount": e["amount"],
                }))
            }
        }))
        .expect("one handler")
}

async fn table() -> String {
    let name = table_name("powertools");
    create_table(&client(), &name, "id", None, "expiration").await;
    name
}

async fn record_ids(table: &str) -> Vec<String> {
    let items = client()
        .scan()
        .table_name(table)
        .send()
        .await
        .expect("scan")
        .items
        .unwrap_or_default();
    let mut ids: Vec<String> = items
        .iter()
        .filter_map(|item| item.get("id")?.as_s().ok().cloned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn rust_replays_records_written_by_powertools_python() {
    let table = table().await;
    let cases = cases(&format!("py{}", now_ms()));
    let python = run_python(&table, &cases);
    for (case, outcomes) in cases.iter().zip(&python) {
        for (event, (ran, response)) in case.events.iter().zip(outcomes) {
            assert!(ran, "{}: Python ran for {event}", case.key_expression);
            assert_eq!(response["handled_by"], "python");
        }
    }
    let written = record_ids(&table).await;
    assert!(written
        .iter()
        .all(|id| id.starts_with(&format!("{PREFIX}#"))));

    for (case, outcomes) in cases.iter().zip(&python) {
        let runs = Counter::default();
        let mut service = rust_service(&table, case, &runs);
        for (event, (_, python_response)) in case.events.iter().zip(outcomes) {
            let response = invoke(&mut service, event.clone())
                .await
                .unwrap_or_else(|e| panic!("{}: {event}: {e}", case.key_expression));
            assert_eq!(
                &response, python_response,
                "{}: Rust replays Python's response for {event}",
                case.key_expression
            );
        }
        assert_eq!(
            runs.get(),
            0,
            "{}: the Rust handler never ran",
            case.key_expression
        );
    }
    assert_eq!(record_ids(&table).await, written, "no new records");
}

#[tokio::test]
async fn powertools_python_replays_records_written_by_rust() {
    let table = table().await;
    let cases = cases(&format!("rs{}", now_ms()));
    let mut rust_responses = Vec::new();
    for case in &cases {
        let runs = Counter::default();
        let mut service = rust_service(&table, case, &runs);
        let mut responses = Vec::new();
        for event in &case.events {
            let response = invoke(&mut service, event.clone())
                .await
                .expect("Rust handles the event");
            assert_eq!(response["handled_by"], "rust");
            responses.push(response);
        }
        assert_eq!(runs.get(), case.events.len(), "{}", case.key_expression);
        rust_responses.push(responses);
    }
    let written = record_ids(&table).await;
    let events: usize = cases.iter().map(|c| c.events.len()).sum();
    assert_eq!(written.len(), events, "one record per event: {written:?}");

    let python = run_python(&table, &cases);
    for ((case, outcomes), responses) in cases.iter().zip(&python).zip(&rust_responses) {
        for ((event, (ran, response)), rust_response) in
            case.events.iter().zip(outcomes).zip(responses)
        {
            assert!(
                !ran,
                "{}: Powertools replayed instead of running for {event}",
                case.key_expression
            );
            assert_eq!(response, rust_response, "{}", case.key_expression);
        }
    }
    assert_eq!(record_ids(&table).await, written, "no new records");
}
