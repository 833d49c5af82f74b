//! A Python function on AWS Lambda Powertools for Python and its Rust port share
//! a store (docs/migrating_from_powertools.md): each replays the other's
//! records, for a scalar key, compound keys and a non-ASCII key, and refuses
//! the other's live reservation. The same round trip runs on each store both
//! sides offer: DynamoDB (LocalStack), and Redis, on one server and on a
//! cluster (`redis/ensure.sh`), where the record is a JSON string under the
//! idempotency key itself.
//!
//! The Python side is the real Powertools package (version pinned in
//! `scripts/powertools-venv.sh`, with its `redis` extra; the script is run to
//! get the venv's python unless `POWERTOOLS_PYTHON` names one) running
//! `tests/powertools/run.py` against the same table or server (this package
//! builds the crate with `powertools-compat`):
//! `cargo test -p lambda-idempotency-tests --test powertools`.

mod support;

use lambda_idempotency::{
    DynamoDbStore, Idempotency, IdempotencyConfig, IdempotencyError, IdempotencyStore, MemoryStore,
    PowertoolsHash,
};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use support::localstack::{client, create_table, endpoint, table_name};
use support::{invoke, now_ms, spawn_call, BoxError, Counter};
use tokio::sync::Notify;
use tower::util::BoxCloneService;

/// Where both sides keep their records.
enum Backend {
    /// A table of its own (LocalStack).
    DynamoDb { table: String },
    /// The standalone server, or the cluster, of `redis/ensure.sh`.
    Redis { cluster: bool },
}

impl Backend {
    async fn dynamodb() -> Self {
        let table = table_name("powertools");
        create_table(&client(), &table, "id", None, "expiration").await;
        Backend::DynamoDb { table }
    }

    /// The store as `run.py` reads it.
    fn python(&self) -> Value {
        match self {
            Backend::DynamoDb { table } => json!({ "kind": "dynamodb", "table": table }),
            Backend::Redis { cluster: false } => {
                json!({ "kind": "redis", "url": support::redis::url(), "cluster": false })
            }
            Backend::Redis { cluster: true } => json!({
                "kind": "redis",
                "url": support::redis::cluster_urls()[0],
                "cluster": true,
            }),
        }
    }

    /// The ids of the records under `prefix`, sorted.
    async fn record_ids(&self, prefix: &str) -> Vec<String> {
        let mut ids: Vec<String> = match self {
            Backend::DynamoDb { table } => client()
                .scan()
                .table_name(table)
                .send()
                .await
                .expect("scan")
                .items
                .unwrap_or_default()
                .iter()
                .filter_map(|item| item.get("id")?.as_s().ok().cloned())
                .collect(),
            Backend::Redis { cluster } => {
                let nodes = match cluster {
                    false => vec![support::redis::url()],
                    true => support::redis::cluster_urls(),
                };
                let mut keys = Vec::new();
                for node in nodes {
                    let client = redis::Client::open(node).expect("a node's url");
                    let mut connection = client
                        .get_multiplexed_async_connection()
                        .await
                        .expect("connect");
                    let mut cursor = 0u64;
                    loop {
                        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(format!("{prefix}#*"))
                            .query_async(&mut connection)
                            .await
                            .expect("scan");
                        keys.extend(batch);
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
                keys
            }
        };
        ids.retain(|id| id.starts_with(&format!("{prefix}#")));
        ids.sort();
        ids
    }

    /// On Redis, the record under `key` as stored (JSON) and the second at
    /// which the server expires it.
    async fn redis_record(&self, key: &str) -> Option<(Value, i64)> {
        let cluster = match self {
            Backend::DynamoDb { .. } => return None,
            Backend::Redis { cluster } => *cluster,
        };
        let mut get = redis::pipe();
        get.cmd("GET").arg(key).cmd("EXPIRETIME").arg(key);
        let (text, expires_at): (String, i64) = if cluster {
            let client = redis::cluster::ClusterClient::new(support::redis::cluster_urls())
                .expect("cluster urls");
            let mut connection = client.get_async_connection().await.expect("connect");
            get.query_async(&mut connection).await.expect("GET")
        } else {
            let client = redis::Client::open(support::redis::url()).expect("url");
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            get.query_async(&mut connection).await.expect("GET")
        };
        Some((
            serde_json::from_str(&text).expect("a JSON record"),
            expires_at,
        ))
    }
}

/// One run: a Python function's name of its own (so that runs never meet on a
/// shared server), its cases, and the store.
struct Run {
    backend: Backend,
    function: String,
    cases: Vec<Case>,
}

impl Run {
    fn new(backend: Backend, tag: &str) -> Self {
        let run = format!("{tag}{}", now_ms());
        Run {
            backend,
            function: format!("orders-py-{run}"),
            cases: cases(&run),
        }
    }

    /// Powertools' record id prefix for the handler: `{function}.{module}.{qualname}`.
    fn prefix(&self) -> String {
        format!("{}.app.lambda_handler", self.function)
    }

    /// The key this crate derives for `event` under `case`'s config.
    fn rust_key(&self, case: &Case, event: &Value) -> String {
        Idempotency::new(MemoryStore::new(), self.config(case))
            .key_for(None, event)
            .expect("a key")
            .expect("key material")
    }

    /// The Powertools-compatible config of `case`.
    fn config(&self, case: &Case) -> IdempotencyConfig {
        let mut builder = IdempotencyConfig::builder()
            .key_expression(case.key_expression)
            .key_prefix(self.prefix())
            .powertools_python_keys(PowertoolsHash::Md5)
            .strict(true);
        if let Some(validation) = case.validation {
            builder = builder.payload_validation(validation);
        }
        builder.build().expect("valid config")
    }

    /// The Rust port of the handler, wrapped with `case`'s config; counts its
    /// runs. With `gate`, each run signals `gate.0` and waits for `gate.1`.
    async fn rust_service(&self, case: &Case, runs: &Counter, gate: Option<Gate>) -> RustService {
        let config = self.config(case);
        match &self.backend {
            Backend::DynamoDb { table } => {
                wrapped(DynamoDbStore::new(client(), table), config, runs, gate)
            }
            Backend::Redis { cluster: false } => {
                wrapped(support::redis::store().await, config, runs, gate)
            }
            Backend::Redis { cluster: true } => {
                wrapped(support::redis::cluster_store().await, config, runs, gate)
            }
        }
    }

    /// Runs `cases` through Powertools (`mode`: `handle` or `reserve`, see
    /// `run.py`).
    async fn python(&self, cases: &[Case], mode: &str) -> Vec<Vec<Outcome>> {
        let job = json!({
            "store": self.backend.python(),
            "function_name": self.function,
            "hash_function": "md5",
            "cases": cases.iter().map(|c| json!({
                "key_expression": c.key_expression,
                "validation": c.validation,
                "events": c.events,
                "mode": mode,
            })).collect::<Vec<_>>(),
        });
        // Off the runtime: a Rust handler may be waiting on it meanwhile.
        tokio::task::spawn_blocking(move || run_python(&job))
            .await
            .expect("the Python run")
    }
}

/// A handler run's signal that it started, and the signal it waits for.
type Gate = (Arc<Notify>, Arc<Notify>);

type RustService = BoxCloneService<LambdaEvent<Value>, Value, lambda_idempotency::Error<BoxError>>;

fn wrapped<S: IdempotencyStore>(
    store: S,
    config: IdempotencyConfig,
    runs: &Counter,
    gate: Option<Gate>,
) -> RustService {
    let runs = runs.clone();
    let service = Idempotency::new(store, config)
        .wrap(service_fn(move |event: LambdaEvent<Value>| {
            runs.hit();
            let gate = gate.clone();
            let e = event.payload;
            async move {
                if let Some((entered, open)) = gate {
                    entered.notify_one();
                    open.notified().await;
                }
                Ok::<_, BoxError>(json!({
                    "handled_by": "rust",
                    "order_id": e["order_id"],
                    "customer": e["customer"],
                    "amount": e["amount"],
                }))
            }
        }))
        .expect("one handler");
    BoxCloneService::new(service)
}

/// One key configuration, the same on both sides, and the events it sees.
#[derive(Clone)]
struct Case {
    key_expression: &'static str,
    validation: Option<&'static str>,
    events: Vec<Value>,
}

/// Order ids unique to this run, so that the tests and reruns never meet.
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

/// What Powertools did with one event (see `run.py`).
struct Outcome {
    ran: bool,
    response: Value,
    error: Option<String>,
    key: String,
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

fn run_python(job: &Value) -> Vec<Vec<Outcome>> {
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
                .map(|r| Outcome {
                    ran: r["ran"] == json!(true),
                    response: r["response"].clone(),
                    error: r["error"].as_str().map(str::to_owned),
                    key: r["key"].as_str().expect("a key").to_owned(),
                })
                .collect()
        })
        .collect()
}

/// Both sides name every record alike: Powertools' key for each event is the
/// key this crate derives, and the store holds exactly those, under those
/// exact strings (on Redis, the key itself: no hash tag added).
async fn same_keys(run: &Run, outcomes: &[Vec<Outcome>]) -> Vec<String> {
    let mut keys = Vec::new();
    for (case, outcomes) in run.cases.iter().zip(outcomes) {
        for (event, outcome) in case.events.iter().zip(outcomes) {
            assert_eq!(outcome.key, run.rust_key(case, event), "{event}");
            keys.push(outcome.key.clone());
        }
    }
    keys.sort();
    assert_eq!(
        run.backend.record_ids(&run.prefix()).await,
        keys,
        "one record per event"
    );
    keys
}

async fn rust_replays_records_written_by_powertools_python(backend: Backend) {
    let run = Run::new(backend, "py");
    let python = run.python(&run.cases, "handle").await;
    for (case, outcomes) in run.cases.iter().zip(&python) {
        for (event, outcome) in case.events.iter().zip(outcomes) {
            assert_eq!(outcome.error, None, "{}: {event}", case.key_expression);
            assert!(
                outcome.ran,
                "{}: Python ran for {event}",
                case.key_expression
            );
            assert_eq!(outcome.response["handled_by"], "python");
        }
    }
    let written = same_keys(&run, &python).await;
    // On Redis, Python's completed record is the JSON of `data`, `status` and
    // `expiration` alone (its completion replaces the value whole, dropping the
    // validation hash of the reservation), expiring at `expiration`.
    for key in &written {
        if let Some((record, expires_at)) = run.backend.redis_record(key).await {
            let mut fields: Vec<&str> = record
                .as_object()
                .expect("an object")
                .keys()
                .map(String::as_str)
                .collect();
            fields.sort();
            assert_eq!(fields, ["data", "expiration", "status"], "{record}");
            assert_eq!(record["status"], "COMPLETED");
            let expiration = record["expiration"].as_i64().expect("seconds");
            // Python sets a TTL (`EX`) computed from its own clock's second.
            assert!(
                (expiration..=expiration + 1).contains(&expires_at),
                "expires at {expires_at}, expiration {expiration}"
            );
        }
    }

    for (case, outcomes) in run.cases.iter().zip(&python) {
        let runs = Counter::default();
        let mut service = run.rust_service(case, &runs, None).await;
        for (event, outcome) in case.events.iter().zip(outcomes) {
            let response = invoke(&mut service, event.clone())
                .await
                .unwrap_or_else(|e| panic!("{}: {event}: {e}", case.key_expression));
            assert_eq!(
                response, outcome.response,
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
    assert_eq!(
        run.backend.record_ids(&run.prefix()).await,
        written,
        "no new records"
    );
}

async fn powertools_python_replays_records_written_by_rust(backend: Backend) {
    let run = Run::new(backend, "rs");
    let mut rust_responses = Vec::new();
    for case in &run.cases {
        let runs = Counter::default();
        let mut service = run.rust_service(case, &runs, None).await;
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

    let python = run.python(&run.cases, "handle").await;
    let written = same_keys(&run, &python).await;
    for key in &written {
        // On Redis, the server expires our record at its `expiration` (EXAT).
        if let Some((record, expires_at)) = run.backend.redis_record(key).await {
            assert_eq!(json!(expires_at), record["expiration"], "{record}");
        }
    }
    for ((case, outcomes), responses) in run.cases.iter().zip(&python).zip(&rust_responses) {
        for ((event, outcome), rust_response) in case.events.iter().zip(outcomes).zip(responses) {
            assert_eq!(outcome.error, None, "{}: {event}", case.key_expression);
            assert!(
                !outcome.ran,
                "{}: Powertools replayed instead of running for {event}",
                case.key_expression
            );
            assert_eq!(&outcome.response, rust_response, "{}", case.key_expression);
        }
    }
    assert_eq!(
        run.backend.record_ids(&run.prefix()).await,
        written,
        "no new records"
    );
}

async fn each_side_refuses_the_other_s_live_reservation(backend: Backend) {
    let run = Run::new(backend, "live");
    let case = &run.cases[0];
    let (by_python, by_rust) = (&case.events[0], &case.events[1]);
    let only = |event: &Value| Case {
        events: vec![event.clone()],
        ..case.clone()
    };

    // Python reserves, as @idempotent does before running its handler: Rust
    // refuses the key as in progress, without running.
    let reserved = run.python(&[only(by_python)], "reserve").await;
    assert_eq!(reserved[0][0].error, None);
    let runs = Counter::default();
    let mut service = run.rust_service(case, &runs, None).await;
    match invoke(&mut service, by_python.clone()).await {
        Err(lambda_idempotency::Error::Idempotency(IdempotencyError::AlreadyInProgress {
            key,
        })) => assert_eq!(key, reserved[0][0].key),
        other => panic!("refused as in progress, not {other:?}"),
    }
    assert_eq!(runs.get(), 0, "the Rust handler did not run");

    // Rust's handler runs, its reservation live: Python refuses the key as in
    // progress; once Rust completes, Python replays its response.
    let gate: Gate = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let gated = run.rust_service(case, &runs, Some(gate.clone())).await;
    let call = spawn_call(&gated, by_rust.clone());
    gate.0.notified().await;
    let refused = run.python(&[only(by_rust)], "handle").await;
    let refused = &refused[0][0];
    assert_eq!(
        refused.error.as_deref(),
        Some("IdempotencyAlreadyInProgressError")
    );
    assert!(!refused.ran, "the Python handler did not run");
    gate.1.notify_one();
    let response = call.await.expect("joined").expect("Rust completes");
    assert_eq!(runs.get(), 1);
    let replayed = run.python(&[only(by_rust)], "handle").await;
    let replayed = &replayed[0][0];
    assert_eq!((replayed.ran, &replayed.error), (false, &None));
    assert_eq!(replayed.response, response);
}

/// The three round trips on one backend, as a module of tests.
macro_rules! on_backend {
    ($name:ident, $backend:expr) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn rust_replays_records_written_by_powertools_python() {
                super::rust_replays_records_written_by_powertools_python($backend).await
            }

            #[tokio::test]
            async fn powertools_python_replays_records_written_by_rust() {
                super::powertools_python_replays_records_written_by_rust($backend).await
            }

            #[tokio::test]
            async fn each_side_refuses_the_other_s_live_reservation() {
                super::each_side_refuses_the_other_s_live_reservation($backend).await
            }
        }
    };
}

on_backend!(dynamodb, Backend::dynamodb().await);
on_backend!(redis_standalone, Backend::Redis { cluster: false });
on_backend!(redis_cluster, Backend::Redis { cluster: true });
