//! Chaos run against DynamoDB (LocalStack) or Redis: worker processes invoke one
//! idempotent handler on one table (on Redis, one key prefix) with keys drawn
//! from a small pool, short deadlines, random SIGKILLs and pauses past the
//! deadline; then every key is retried to completion and the run is checked.
//! Driven by `scripts/chaos.sh` (see docs/developing.md, "Chaos run").
//!
//! `CHAOS_STORE` chooses the store: `dynamodb` (the default), a fresh table on
//! the LocalStack at `AWS_ENDPOINT_URL`; or `redis`, `RedisStore` on the server
//! at `REDIS_URL` (`redis://127.0.0.1:6390`), under a key prefix of the run's
//! own (its records expire after an hour, as every record does).
//!
//! `chaos orchestrate` (the default) creates the table, serves the work queue and a
//! deduping payments API on 127.0.0.1, spawns `chaos worker` processes, kills and
//! respawns them, runs the final pass, reads every record back and checks:
//! overlapping executions within reservation windows, stuck keys, replies that
//! differ from the committed response (the waiting invocations' included),
//! charges per key, late overwrites, journaled steps run again, SQS batch
//! records acknowledged without a completed record holding the committed
//! response, waiting invocations whose reported outcome disagrees with what
//! they got, and waiting invocations refused while no call held their key.
//! Exits 1 when a check fails.
//!
//! A share of the invocations (`CHAOS_WAIT_PERMILLE`) go through a second
//! `Idempotency` of the worker, configured with `wait_for_in_progress`: a
//! duplicate of one in flight waits for it (on its flight in the same worker and
//! `Idempotency`, polling the record otherwise) instead of being refused. The
//! engine stops waiting 1 s before the deadline, so their deadline is 1 s
//! further out than the others'. The worker notes what the engine reported for
//! each (the `outcome` and `waited_ms` of its `idempotency` span).
//!
//! A share of the invocations (`CHAOS_BATCH_PERMILLE`) come as SQS batches of
//! 2-6 records (a key possibly twice in one), each under one deadline drawn as
//! any invocation's, processed by the worker's batch adapter
//! (`Idempotency::sqs_batch` over the same handler, prefix and function name,
//! keyed on `powertools_json(body).order_id`): the batch's keys are reserved in
//! one request and completed in one after its records ran (on DynamoDB; on
//! Redis the store's defaults, the single calls at once), so a kill may fall
//! between the two and leave records in progress until their deadline, for a
//! later call to take over and resume. A batch record's execution counts in
//! every check as any other's; it has no reply, so instead a record not in
//! `batchItemFailures` must have returned the committed response if it ran,
//! must be read back completed with it after the batch (under the key its
//! order's direct invocations use), and the committed execution must have run
//! before it was acknowledged.
//!
//! Parameters (environment): `CHAOS_INVOCATIONS` (10000), `CHAOS_KEYS` (1000),
//! `CHAOS_WORKERS` (4), `CHAOS_CONCURRENCY` (invocations in flight per worker, 4),
//! `CHAOS_DEADLINE_MIN_MS`/`CHAOS_DEADLINE_MAX_MS` (200/800),
//! `CHAOS_KILL_INTERVAL_MS` (mean time between kills, 1500), `CHAOS_MAX_KILLS`
//! (unbounded), `CHAOS_PAUSE_PERMILLE` (executions that sleep past their deadline, 100),
//! `CHAOS_WAIT_PERMILLE` (invocations that wait for one in flight, 333),
//! `CHAOS_BATCH_PERMILLE` (invocations that come in SQS batches, 250),
//! `CHAOS_LABEL`, `CHAOS_DIR` (logs), `CHAOS_MAX_SECONDS` (900), `CHAOS_STORE`,
//! `AWS_ENDPOINT_URL`, `REDIS_URL`.

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::{Credentials, Region};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;
use futures_util::StreamExt;
use lambda_idempotency::store::{OutboxStore, StepJournal, StoreError};
use lambda_idempotency::{
    effects, DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyError,
    IdempotencyRecord, IdempotencyStore, IdempotentFunction, RedisStore, SqsBatch, Status,
};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("worker") => worker(&args[1..]).await,
        None | Some("orchestrate") => orchestrate().await,
        Some(other) => Err(format!("unknown subcommand {other:?} (orchestrate | worker)").into()),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("chaos: {err}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------
// Parameters, clock, randomness, logging
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Params {
    invocations: u64,
    keys: u64,
    workers: usize,
    concurrency: usize,
    deadline_min_ms: i64,
    deadline_max_ms: i64,
    kill_interval_ms: u64,
    max_kills: u64,
    pause_permille: u64,
    wait_permille: u64,
    batch_permille: u64,
    label: String,
    max_seconds: u64,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T, BoxError> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a number").into()),
        _ => Ok(default),
    }
}

impl Params {
    fn from_env() -> Result<Self, BoxError> {
        let params = Self {
            invocations: env_num("CHAOS_INVOCATIONS", 10_000)?,
            keys: env_num("CHAOS_KEYS", 1_000)?,
            workers: env_num("CHAOS_WORKERS", 4)?,
            concurrency: env_num("CHAOS_CONCURRENCY", 4)?,
            deadline_min_ms: env_num("CHAOS_DEADLINE_MIN_MS", 200)?,
            deadline_max_ms: env_num("CHAOS_DEADLINE_MAX_MS", 800)?,
            kill_interval_ms: env_num("CHAOS_KILL_INTERVAL_MS", 1_500)?,
            max_kills: env_num("CHAOS_MAX_KILLS", u64::MAX)?,
            pause_permille: env_num("CHAOS_PAUSE_PERMILLE", 100)?,
            wait_permille: env_num("CHAOS_WAIT_PERMILLE", 333)?,
            batch_permille: env_num("CHAOS_BATCH_PERMILLE", 250)?,
            label: std::env::var("CHAOS_LABEL").unwrap_or_else(|_| "run".to_owned()),
            max_seconds: env_num("CHAOS_MAX_SECONDS", 900)?,
        };
        if params.keys == 0 || params.workers == 0 || params.concurrency == 0 {
            return Err("CHAOS_KEYS, CHAOS_WORKERS and CHAOS_CONCURRENCY must be positive".into());
        }
        if params.deadline_min_ms < 1 || params.deadline_max_ms < params.deadline_min_ms {
            return Err("need 1 <= CHAOS_DEADLINE_MIN_MS <= CHAOS_DEADLINE_MAX_MS".into());
        }
        if params.batch_permille > 1_000 {
            return Err("CHAOS_BATCH_PERMILLE is per mille: at most 1000".into());
        }
        Ok(params)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// xorshift64*, seeded from the OS-seeded `RandomState`: no `rand` dependency.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.write_i64(now_ms());
        Self(hasher.finish() | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn random(lo: u64, hi: u64) -> u64 {
    thread_local! { static RNG: std::cell::RefCell<Rng> = std::cell::RefCell::new(Rng::new()); }
    RNG.with(|rng| rng.borrow_mut().range(lo, hi))
}

/// JSON lines, one unbuffered `write` per event, so a SIGKILL loses no finished line.
#[derive(Clone)]
struct EventLog(Arc<Mutex<std::fs::File>>);

impl EventLog {
    fn create(path: &Path) -> Result<Self, BoxError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        Ok(Self(Arc::new(Mutex::new(file))))
    }
    fn write(&self, event: Value) {
        let mut line = event.to_string();
        line.push('\n');
        let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = file.write_all(line.as_bytes());
    }
}

fn order_name(index: u64) -> String {
    format!("order-{index}")
}

// ---------------------------------------------------------------------------
// Plain HTTP/1.1 over loopback: the orchestrator's work queue and payments API
// ---------------------------------------------------------------------------

#[path = "../tests/support/http1.rs"]
mod http1;
use http1::{post, read_request};

/// What the orchestrator's server holds: the work queue and the payments ledger.
struct Server {
    params: Params,
    queue: Mutex<Queue>,
    ledger: Mutex<Ledger>,
}

struct Queue {
    next: u64,
    rng: Rng,
}

#[derive(Default)]
struct Ledger {
    /// Derived key -> (requests, the response first given for it).
    by_key: HashMap<String, (u64, Value)>,
    /// Order -> the distinct derived keys charged for it.
    by_order: BTreeMap<String, HashSet<String>>,
    charges: u64,
    requests: u64,
}

impl Server {
    /// The next invocation of the storm, a batch of them, or `{"done": true}`.
    ///
    /// Keys are drawn near a point that sweeps the pool once over the run, so
    /// the invocations of one key cluster in time and collide. A share of the
    /// invocations (`batch_permille`) come in SQS batches of 2-6 records (4 on
    /// average), each record's key drawn as any other's (so a batch may hold a
    /// key twice), under one deadline drawn as any other's:
    /// `{"batch": first inv, "records": [{"inv", "order"}..], "budget_ms"}`.
    fn next_invocation(&self) -> Value {
        let p = &self.params;
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.next >= p.invocations {
            return json!({ "done": true });
        }
        let spread = (p.keys / 100).clamp(2, 8);
        let draw = |queue: &mut Queue| {
            let inv = queue.next;
            queue.next += 1;
            let base = inv * p.keys / p.invocations.max(1);
            let index = (base + p.keys * 4 + queue.rng.range(0, 2 * spread) - spread) % p.keys;
            (inv, order_name(index))
        };
        let budget = queue
            .rng
            .range(p.deadline_min_ms as u64, p.deadline_max_ms as u64);
        // A dispatch starts a batch with the chance that puts `share` of the
        // invocations in batches: c * 4 / (c * 4 + 1 - c) = share.
        let share = p.batch_permille as f64 / 1_000.0;
        let chance = share / (4.0 - 3.0 * share);
        if ((queue.rng.next() % 1_000_000) as f64) < chance * 1_000_000.0 {
            let size = queue.rng.range(2, 6).min(p.invocations - queue.next);
            let first = queue.next;
            let records: Vec<Value> = (0..size)
                .map(|_| {
                    let (inv, order) = draw(&mut queue);
                    json!({ "inv": inv, "order": order })
                })
                .collect();
            return json!({ "batch": first, "records": records, "budget_ms": budget });
        }
        let (inv, order) = draw(&mut queue);
        let waits = queue.rng.range(0, 999) < p.wait_permille;
        // A waiting call stops waiting 1 s before its deadline, to answer or
        // run: its deadline is that much further out, so that it may wait about
        // as long as the others may run.
        let budget = budget + if waits { WAIT_MARGIN_MS as u64 } else { 0 };
        json!({ "inv": inv, "order": order, "budget_ms": budget, "waits": waits, "chaos": true })
    }

    fn dispatched(&self) -> u64 {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).next
    }

    fn charge(&self, key: String, body: &Value) -> Value {
        let order = body["order_id"].as_str().unwrap_or("?").to_owned();
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        ledger.requests += 1;
        let next = ledger.charges + 1;
        let entry = ledger
            .by_key
            .entry(key.clone())
            .or_insert((0, json!({ "charge_id": format!("ch_{next}") })));
        entry.0 += 1;
        let (first, response) = (entry.0 == 1, entry.1.clone());
        if first {
            ledger.charges += 1;
            ledger.by_order.entry(order).or_default().insert(key);
        }
        response
    }

    async fn serve(self: Arc<Self>, mut stream: TcpStream) {
        let Some((path, headers, body)) = read_request(&mut stream).await else {
            return;
        };
        let response = match path.as_str() {
            "/next" => self.next_invocation(),
            "/charges" => {
                let key = headers.get("idempotency-key").cloned().unwrap_or_default();
                self.charge(key, &body)
            }
            _ => json!({ "error": "not found" }),
        };
        let body = response.to_string();
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(reply.as_bytes()).await;
    }
}

// ---------------------------------------------------------------------------
// The handler under test, shared by workers and the final pass
// ---------------------------------------------------------------------------

fn client(endpoint: &str) -> Client {
    let config = aws_sdk_dynamodb::config::Builder::new()
        .behavior_version_latest()
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "chaos"))
        .endpoint_url(endpoint)
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_secs(10))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        )
        .build();
    Client::from_conf(config)
}

fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".to_owned())
}

/// How long before its deadline the engine stops a call's wait
/// (`WAIT_MARGIN_MS` in `src/idempotency.rs`).
const WAIT_MARGIN_MS: i64 = 1_000;

type HandlerError = Error<std::io::Error>;
type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, HandlerError>> + Send>>;
type Handler = Box<dyn Fn(Value) -> HandlerFuture + Send + Sync>;
type Function = IdempotentFunction<Handler, Store>;

/// Where a run keeps its records (`CHAOS_STORE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// A table of the run's own on LocalStack.
    DynamoDb,
    /// A key prefix of the run's own on the Redis server at `REDIS_URL`.
    Redis,
}

impl Backend {
    fn from_env() -> Result<Self, BoxError> {
        match std::env::var("CHAOS_STORE").as_deref() {
            Err(_) | Ok("") | Ok("dynamodb") => Ok(Backend::DynamoDb),
            Ok("redis") => Ok(Backend::Redis),
            Ok(other) => Err(format!("CHAOS_STORE={other:?}: dynamodb or redis").into()),
        }
    }

    /// The store of a run named `run` (its table on DynamoDB), and the key
    /// prefix of its records (on Redis, the run's name: the server outlives it).
    async fn open(self, run: &str) -> Result<(Store, String), BoxError> {
        Ok(match self {
            Backend::DynamoDb => (
                Store::DynamoDb(Box::new(DynamoDbStore::new(client(&endpoint()), run))),
                "chaos".to_owned(),
            ),
            Backend::Redis => (
                Store::Redis(RedisStore::connect(&redis_url()).await?),
                run.to_owned(),
            ),
        })
    }
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390".to_owned())
}

/// The run's store, either one: the engine is generic over its store, and
/// this keeps the worker's and the final pass's code one.
#[derive(Clone)]
enum Store {
    // Boxed: the DynamoDB store is some 400 bytes, the Redis store 56.
    DynamoDb(Box<DynamoDbStore>),
    Redis(RedisStore),
}

impl IdempotencyStore for Store {
    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        match self {
            Store::DynamoDb(s) => s.get(key).await,
            Store::Redis(s) => s.get(key).await,
        }
    }
    async fn reserve(
        &self,
        record: &IdempotencyRecord,
        now_ms: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        match self {
            Store::DynamoDb(s) => s.reserve(record, now_ms).await,
            Store::Redis(s) => s.reserve(record, now_ms).await,
        }
    }
    async fn complete(&self, record: &IdempotencyRecord) -> Result<(), StoreError> {
        match self {
            Store::DynamoDb(s) => s.complete(record).await,
            Store::Redis(s) => s.complete(record).await,
        }
    }
    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        match self {
            Store::DynamoDb(s) => s.release(key, owner).await,
            Store::Redis(s) => s.release(key, owner).await,
        }
    }
    // The batched requests too: DynamoDB's own (one request for a batch's
    // reservations, one for its completions), Redis's the defaults.
    async fn reserve_batch(
        &self,
        records: &[IdempotencyRecord],
        now_ms: i64,
    ) -> Vec<Result<Option<IdempotencyRecord>, StoreError>> {
        match self {
            Store::DynamoDb(s) => s.reserve_batch(records, now_ms).await,
            Store::Redis(s) => s.reserve_batch(records, now_ms).await,
        }
    }
    async fn complete_batch(&self, records: &[IdempotencyRecord]) -> Vec<Result<(), StoreError>> {
        match self {
            Store::DynamoDb(s) => s.complete_batch(records).await,
            Store::Redis(s) => s.complete_batch(records).await,
        }
    }
    async fn release_batch(
        &self,
        reservations: &[(String, String)],
    ) -> Vec<Result<(), StoreError>> {
        match self {
            Store::DynamoDb(s) => s.release_batch(reservations).await,
            Store::Redis(s) => s.release_batch(reservations).await,
        }
    }
    fn location(&self) -> String {
        match self {
            Store::DynamoDb(s) => s.location(),
            Store::Redis(s) => s.location(),
        }
    }
    fn journal(&self) -> Option<&dyn StepJournal> {
        match self {
            Store::DynamoDb(s) => s.journal(),
            Store::Redis(s) => s.journal(),
        }
    }
    fn outbox(&self) -> Option<&dyn OutboxStore> {
        match self {
            Store::DynamoDb(s) => s.outbox(),
            Store::Redis(s) => s.outbox(),
        }
    }
}

/// The wrapped function's name: the batch adapter's too, so that both reach
/// the same records.
const FUNCTION_NAME: &str = "place_order";

/// The wrapped function: [`handler`] on an `Idempotency` keyed on `order_id`.
/// With `waits`, on an `Idempotency` whose calls wait for one in flight with
/// their key (for as long as their deadline lets them: the maximum is not what
/// ends a wait here).
fn function(
    store: Store,
    key_prefix: &str,
    payments: SocketAddr,
    log: EventLog,
    waits: bool,
) -> Result<Function, BoxError> {
    let config = IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix(key_prefix)
        .wait_for_in_progress(if waits {
            Duration::from_secs(60)
        } else {
            Duration::ZERO
        })
        .build()?;
    let idempotency = Idempotency::new(store, config);
    Ok(idempotency.function(FUNCTION_NAME, handler(payments, log)))
}

/// The handler under test: sleeps a few ms, charges the order in a step with its
/// derived key, sometimes sleeps past its deadline (before or after the step),
/// and answers with the order, the charge id and which execution produced it.
/// Logs `run` when it starts and `pause` when it oversleeps.
fn handler(payments: SocketAddr, log: EventLog) -> Handler {
    Box::new(move |payload: Value| {
        let log = log.clone();
        Box::pin(async move {
            let inv = payload["inv"].as_u64().unwrap_or(u64::MAX);
            let order = payload["order_id"].as_str().unwrap_or_default().to_owned();
            let deadline = payload["deadline"].as_i64().unwrap_or(i64::MAX);
            // During the storm a few executions oversleep their deadline, before or after the step.
            let pause = match payload["pause_permille"].as_u64() {
                Some(permille) if random(0, 999) < permille => {
                    if random(0, 1) == 0 {
                        "before_step"
                    } else {
                        "after_step"
                    }
                }
                _ => "",
            };
            let effects = effects()?;
            log.write(json!({
                "ev": "run", "inv": inv, "order": order, "key": effects.idempotency_key(),
                "t": now_ms(), "deadline": deadline,
            }));
            tokio::time::sleep(Duration::from_millis(random(1, 15))).await;
            let oversleep = |at: &str| {
                let log = log.clone();
                let at = at.to_owned();
                async move {
                    let until = deadline + random(50, 400) as i64;
                    log.write(json!({ "ev": "pause", "inv": inv, "at": at, "t": now_ms(), "until": until }));
                    let wait = (until - now_ms()).max(0) as u64;
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            };
            if pause == "before_step" {
                oversleep("before_step").await;
            }
            let body = json!({ "order_id": order });
            let step_log = log.clone();
            let charge = effects
                .step("charge", |derived_key| async move {
                    step_log.write(json!({ "ev": "charging", "inv": inv, "order": body["order_id"], "t": now_ms() }));
                    post(payments, "/charges", &derived_key, &body).await
                })
                .await?;
            // The step's result is journaled (or was replayed from the journal).
            log.write(json!({ "ev": "stepped", "inv": inv, "order": order, "t": now_ms() }));
            if pause == "after_step" {
                oversleep("after_step").await;
            }
            Ok(json!({ "order_id": order, "charge_id": charge["charge_id"], "execution": inv }))
        }) as HandlerFuture
    })
}

type BatchHandler = Box<dyn Fn(SqsMessage) -> HandlerFuture + Send + Sync>;

/// The worker's SQS batch adapter: [`handler`] behind `sqs_batch`, on an
/// `Idempotency` keyed on `powertools_json(body).order_id` under the same
/// prefix and function name as [`function`], so that a message's record is
/// the one its order's direct invocations use. The message body is the
/// payload a direct invocation gets. What the handler returned is kept by
/// invocation (`returned`), for the worker to log with the record's end.
struct BatchAdapter {
    idempotency: Idempotency<Store>,
    batch: SqsBatch<BatchHandler, Store>,
    returned: Arc<Mutex<HashMap<u64, String>>>,
}

impl BatchAdapter {
    fn new(
        store: Store,
        key_prefix: &str,
        payments: SocketAddr,
        log: EventLog,
    ) -> Result<Self, BoxError> {
        let config = IdempotencyConfig::builder()
            .key_expression("powertools_json(body).order_id")
            .key_prefix(key_prefix)
            .build()?;
        let idempotency = Idempotency::new(store, config);
        let handler = handler(payments, log);
        let returned: Arc<Mutex<HashMap<u64, String>>> = Arc::default();
        let kept = Arc::clone(&returned);
        let adapter: BatchHandler = Box::new(move |message: SqsMessage| {
            let payload: Value = message
                .body
                .as_deref()
                .and_then(|body| serde_json::from_str(body).ok())
                .unwrap_or_default();
            let inv = payload["inv"].as_u64().unwrap_or(u64::MAX);
            let run = handler(payload);
            let kept = Arc::clone(&kept);
            Box::pin(async move {
                let result = run.await;
                if let Ok(response) = &result {
                    let response = serde_json::to_string(response).unwrap_or_default();
                    kept.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(inv, response);
                }
                result
            })
        });
        Ok(Self {
            batch: idempotency.sqs_batch(FUNCTION_NAME, adapter),
            idempotency,
            returned,
        })
    }
}

/// One invocation with a `Context` whose deadline is `budget_ms` ahead; logs
/// `start` and `end` (with the outcome, on success the reply as sent, and what
/// the engine reported). `waits`: `function` is the waiting one.
async fn invoke(
    function: &Function,
    waits: bool,
    log: &EventLog,
    inv: u64,
    order: &str,
    budget_ms: i64,
    pause_permille: Option<u64>,
) -> Result<Value, Error<HandlerError>> {
    let start = now_ms();
    let deadline = start + budget_ms;
    log.write(json!({ "ev": "start", "inv": inv, "order": order, "t": start, "deadline": deadline, "waits": waits, "pid": std::process::id() }));
    let mut context = Context::default();
    context.deadline = deadline as u64;
    context.request_id = format!("chaos-{inv}");
    let payload = json!({ "order_id": order, "inv": inv, "deadline": deadline, "pause_permille": pause_permille });
    let (result, reported) = REPORTED
        .scope(std::cell::RefCell::default(), async {
            let result = function.call(payload, Some(&context)).await;
            (result, REPORTED.with(std::cell::RefCell::take))
        })
        .await;
    let (outcome, detail) = outcome(&result);
    let reply = result
        .as_ref()
        .ok()
        .map(|v| serde_json::to_string(v).unwrap_or_default());
    log.write(json!({
        "ev": "end", "inv": inv, "order": order, "t": now_ms(), "deadline": deadline,
        "outcome": outcome, "detail": detail, "reply": reply, "waits": waits,
        "engine": reported.outcome, "waited_ms": reported.waited_ms,
    }));
    result
}

/// One SQS batch of `records` (`{"inv", "order"}`) through the batch adapter,
/// with a `Context` whose deadline is `budget_ms` ahead: a message per record,
/// its body the payload a direct invocation gets. Logs `start` for each record
/// (with `batch`, the batch's first invocation), then `end` once the batch is
/// processed: `ok` for a record not in `batchItemFailures`, `batch_failed` for
/// one in them, `batch_error` for all when the batch erred; with `returned`,
/// what its handler returned when it ran. Then reads back the record of each
/// acknowledged message (`acked`: its key, whether it is completed, its data).
async fn invoke_batch(
    adapter: &BatchAdapter,
    log: &EventLog,
    batch: u64,
    records: &[Value],
    budget_ms: i64,
    pause_permille: u64,
) {
    let start = now_ms();
    let deadline = start + budget_ms;
    let mut messages = Vec::new();
    for record in records {
        let (inv, order) = (&record["inv"], &record["order"]);
        log.write(json!({ "ev": "start", "inv": inv, "order": order, "t": start, "deadline": deadline, "waits": false, "batch": batch, "pid": std::process::id() }));
        let body = json!({ "order_id": order, "inv": inv, "deadline": deadline, "pause_permille": pause_permille });
        let message: SqsMessage = serde_json::from_value(json!({
            "messageId": format!("m-{inv}"), "body": body.to_string(), "eventSource": "aws:sqs",
        }))
        .unwrap_or_default();
        messages.push(message);
    }
    let mut event = SqsEvent::default();
    event.records = messages.clone();
    let mut context = Context::default();
    context.deadline = deadline as u64;
    context.request_id = format!("chaos-batch-{batch}");
    let result = adapter
        .batch
        .process(LambdaEvent::new(event, context))
        .await;
    let t = now_ms();
    let (failed, detail): (HashSet<String>, String) = match &result {
        Ok(response) => (
            response
                .batch_item_failures
                .iter()
                .map(|f| f.item_identifier.clone())
                .collect(),
            String::new(),
        ),
        Err(e) => (HashSet::new(), e.to_string()),
    };
    let mut acked = Vec::new();
    for (record, message) in records.iter().zip(messages) {
        let inv = record["inv"].as_u64().unwrap_or(u64::MAX);
        let outcome = match (&result, message.message_id.as_ref()) {
            (Err(_), _) => "batch_error",
            (Ok(_), Some(id)) if failed.contains(id) => "batch_failed",
            (Ok(_), _) => "ok",
        };
        let returned = adapter
            .returned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&inv);
        log.write(json!({
            "ev": "end", "inv": inv, "order": record["order"], "t": t, "deadline": deadline,
            "outcome": outcome, "detail": detail, "reply": null, "returned": returned,
            "waits": false, "batch": batch,
        }));
        if outcome == "ok" {
            acked.push((inv, record["order"].clone(), message));
        }
    }
    // An acknowledged message must have a completed record: read back.
    let reads = acked.iter().map(|(inv, order, message)| async move {
        let key = serde_json::to_value(message)
            .ok()
            .and_then(|m| adapter.idempotency.key_for(Some(FUNCTION_NAME), &m).ok())
            .flatten();
        let Some(key) = key else {
            return json!({ "ev": "acked", "inv": inv, "order": order, "error": "no key" });
        };
        let mut error = String::new();
        for attempt in 0..5u64 {
            match adapter.idempotency.store().get(&key).await {
                Ok(record) => {
                    return json!({
                        "ev": "acked", "inv": inv, "order": order, "key": key,
                        "completed": record.as_ref().is_some_and(|r| r.status == Status::Completed),
                        "data": record.and_then(|r| r.data),
                    })
                }
                Err(e) => error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
        }
        json!({ "ev": "acked", "inv": inv, "order": order, "key": key, "error": error })
    });
    for read in futures_util::future::join_all(reads).await {
        log.write(read);
    }
}

tokio::task_local! {
    /// What the engine reported on the `idempotency` span of the call this
    /// task is making.
    static REPORTED: std::cell::RefCell<Reported>;
}

/// The `outcome` and `waited_ms` fields of a call's `idempotency` span.
#[derive(Default)]
struct Reported {
    outcome: Option<String>,
    waited_ms: Option<i64>,
}

/// A tracing layer that copies the fields the engine records on its
/// `idempotency` span into the calling task's [`REPORTED`]: the engine records
/// them inside the call, on the task that awaits it.
struct Report;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Report {
    fn on_record(
        &self,
        _: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Fields<'a>(&'a mut Reported);
        impl tracing::field::Visit for Fields<'_> {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "outcome" {
                    self.0.outcome = Some(value.to_owned());
                }
            }
            fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
                if field.name() == "waited_ms" {
                    self.0.waited_ms = Some(value);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let _ =
            REPORTED.try_with(|reported| values.record(&mut Fields(&mut reported.borrow_mut())));
    }
}

/// A short name for how a call ended, and the error text.
fn outcome(result: &Result<Value, Error<HandlerError>>) -> (&'static str, String) {
    let engine = |e: &IdempotencyError| match e {
        IdempotencyError::AlreadyInProgress { .. } => "in_progress",
        IdempotencyError::LostOwnership { .. } => "lost_ownership",
        IdempotencyError::Store(_) => "store_error",
        _ => "engine_error",
    };
    match result {
        Ok(_) => ("ok", String::new()),
        Err(Error::Idempotency(e)) => (engine(e), e.to_string()),
        // Errors from inside the handler: its step's store calls, or the charge.
        Err(Error::Handler(Error::Idempotency(e))) => match engine(e) {
            "store_error" => ("step_store_error", e.to_string()),
            _ => ("step_engine_error", e.to_string()),
        },
        Err(Error::Handler(Error::Handler(e))) => ("charge_failed", e.to_string()),
        Err(other) => ("other_error", other.to_string()),
    }
}

// ---------------------------------------------------------------------------
// Worker process
// ---------------------------------------------------------------------------

/// Warnings and errors to stderr (`RUST_LOG` to change), and the engine's
/// report of each call for the event log ([`Report`]).
fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(
            Report.with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.is_span() && meta.name() == "idempotency"
            })),
        )
        .try_init();
}

async fn worker(args: &[String]) -> Result<bool, BoxError> {
    let [server, run, log_path] = args else {
        return Err("usage: chaos worker SERVER_ADDR RUN LOG_FILE".into());
    };
    init_tracing();
    let params = Params::from_env()?;
    let server: SocketAddr = server.parse()?;
    let log = EventLog::create(Path::new(log_path))?;
    // Two `Idempotency`s on the same store and key prefix, each with its own
    // flights and its own client: a waiting call waits on the flight of a
    // waiting call of this worker, and polls the record for any other.
    let backend = Backend::from_env()?;
    let (store, prefix) = backend.open(run).await?;
    let (other, _) = backend.open(run).await?;
    // The SQS batches, on the first one's store.
    let adapter = Arc::new(BatchAdapter::new(
        store.clone(),
        &prefix,
        server,
        log.clone(),
    )?);
    let functions = Arc::new([
        function(store, &prefix, server, log.clone(), false)?,
        function(other, &prefix, server, log.clone(), true)?,
    ]);
    let mut tasks = Vec::new();
    for _ in 0..params.concurrency {
        let (functions, log) = (Arc::clone(&functions), log.clone());
        let adapter = Arc::clone(&adapter);
        let pause_permille = params.pause_permille;
        tasks.push(tokio::spawn(async move {
            let mut failures = 0;
            loop {
                let next = match post(server, "/next", "", &Value::Null).await {
                    Ok(next) => next,
                    Err(_) if failures < 5 => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    Err(_) => return,
                };
                if next["done"] == true {
                    return;
                }
                if let Some(records) = next["records"].as_array() {
                    invoke_batch(
                        &adapter,
                        &log,
                        next["batch"].as_u64().unwrap_or(u64::MAX),
                        records,
                        next["budget_ms"].as_i64().unwrap_or(500),
                        pause_permille,
                    )
                    .await;
                    continue;
                }
                let waits = next["waits"] == true;
                let _ = invoke(
                    &functions[usize::from(waits)],
                    waits,
                    &log,
                    next["inv"].as_u64().unwrap_or(u64::MAX),
                    next["order"].as_str().unwrap_or_default(),
                    next["budget_ms"].as_i64().unwrap_or(500),
                    Some(pause_permille),
                )
                .await;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(true)
}

// ---------------------------------------------------------------------------
// Orchestrator
// ---------------------------------------------------------------------------

async fn create_table(client: &Client, name: &str) -> Result<(), BoxError> {
    let attribute = AttributeDefinition::builder()
        .attribute_name("id")
        .attribute_type(ScalarAttributeType::S)
        .build()?;
    let key = KeySchemaElement::builder()
        .attribute_name("id")
        .key_type(KeyType::Hash)
        .build()?;
    // The first DynamoDB call starts LocalStack's JVM (about 10 s); a fault-injecting
    // LocalStack may refuse a few: retry.
    let mut last = None;
    for _ in 0..20 {
        match client
            .create_table()
            .table_name(name)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute.clone())
            .key_schema(key.clone())
            .send()
            .await
        {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => {
                let text = format!("{e:?}");
                if text.contains("ResourceInUseException") {
                    last = None;
                    break;
                }
                last = Some(text);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    if let Some(err) = last {
        return Err(format!("create table {name}: {err}").into());
    }
    for _ in 0..200 {
        let status = client
            .describe_table()
            .table_name(name)
            .send()
            .await
            .ok()
            .and_then(|d| d.table().and_then(|t| t.table_status().cloned()));
        if status == Some(TableStatus::Active) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..20 {
        let ttl = client
            .update_time_to_live()
            .table_name(name)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name("expiration")
                    .build()?,
            )
            .send()
            .await;
        if ttl.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(format!("could not enable TTL on {name}").into())
}

struct Slot {
    child: Option<Child>,
    generation: u32,
}

fn spawn_worker(
    dir: &Path,
    server: SocketAddr,
    table: &str,
    slot: usize,
    generation: u32,
) -> Result<Child, BoxError> {
    let log = dir.join(format!("worker-{slot}-{generation}.jsonl"));
    let stderr = std::fs::File::create(dir.join(format!("worker-{slot}-{generation}.err")))?;
    Ok(Command::new(std::env::current_exe()?)
        .arg("worker")
        .arg(server.to_string())
        .arg(table)
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()?)
}

#[derive(Default)]
struct StormFigures {
    kills: u64,
    respawns: u64,
    crashes: u64,
    timed_out: bool,
}

/// Runs the workers until the queue is empty and all have exited, killing one at
/// random moments (mean `kill_interval_ms`) and respawning it.
async fn storm(
    params: &Params,
    dir: &Path,
    server: &Arc<Server>,
    addr: SocketAddr,
    table: &str,
) -> Result<StormFigures, BoxError> {
    let mut figures = StormFigures::default();
    let mut slots = Vec::new();
    for slot in 0..params.workers {
        slots.push(Slot {
            child: Some(spawn_worker(dir, addr, table, slot, 0)?),
            generation: 0,
        });
    }
    let mut rng = Rng::new();
    let started = Instant::now();
    let mut next_kill = started
        + Duration::from_millis(
            rng.range(params.kill_interval_ms / 2, params.kill_interval_ms * 3 / 2),
        );
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let queue_done = server.dispatched() >= params.invocations;
        // Exited workers: done when the queue is empty, otherwise a crash to respawn.
        for (index, slot) in slots.iter_mut().enumerate() {
            let Some(child) = slot.child.as_mut() else {
                continue;
            };
            if let Some(status) = child.try_wait()? {
                slot.child = None;
                if !status.success() || !queue_done {
                    figures.crashes += u64::from(!status.success());
                    if !queue_done {
                        slot.generation += 1;
                        figures.respawns += 1;
                        slot.child = Some(spawn_worker(dir, addr, table, index, slot.generation)?);
                    }
                }
            }
        }
        if slots.iter().all(|s| s.child.is_none()) && queue_done {
            return Ok(figures);
        }
        if started.elapsed() > Duration::from_secs(params.max_seconds) {
            for slot in &mut slots {
                if let Some(child) = slot.child.as_mut() {
                    let _ = child.kill().await;
                }
            }
            figures.timed_out = true;
            return Ok(figures);
        }
        if !queue_done && figures.kills < params.max_kills && Instant::now() >= next_kill {
            let index = rng.range(0, slots.len() as u64 - 1) as usize;
            let slot = &mut slots[index];
            if let Some(mut child) = slot.child.take() {
                child.kill().await?; // SIGKILL, then reaped
                figures.kills += 1;
                slot.generation += 1;
                figures.respawns += 1;
                slot.child = Some(spawn_worker(dir, addr, table, index, slot.generation)?);
            }
            next_kill = Instant::now()
                + Duration::from_millis(
                    rng.range(params.kill_interval_ms / 2, params.kill_interval_ms * 3 / 2),
                );
        }
    }
}

/// The final pass's deadline: long next to an execution (tens of ms, seconds with
/// the SDK's backoff under fault injection), short enough that a reservation left
/// `INPROGRESS` by a failed completion (the documented behaviour) is soon retried.
const FINAL_DEADLINE_MS: i64 = 10_000;
/// How long the final pass keeps calling one key.
const FINAL_BUDGET_S: u64 = 180;

/// Every key retried to completion: long deadline, no pauses; `AlreadyInProgress`
/// waits until the stored reservation's end (read back), store errors back off.
async fn final_pass(
    params: &Params,
    function: &Function,
    store: &Store,
    log: &EventLog,
) -> (u64, u64, u64, Vec<String>) {
    let next_inv = std::sync::atomic::AtomicU64::new(params.invocations + 1_000_000);
    let results: Vec<(u64, u64, u64, Option<String>)> = futures_util::stream::iter(0..params.keys)
        .map(|index| {
            let next_inv = &next_inv;
            async move {
                let order = order_name(index);
                let (mut calls, mut in_progress, mut errors) = (0u64, 0u64, 0u64);
                let deadline = Instant::now() + Duration::from_secs(FINAL_BUDGET_S);
                while Instant::now() < deadline {
                    calls += 1;
                    let inv = next_inv.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match invoke(function, false, log, inv, &order, FINAL_DEADLINE_MS, None).await {
                        Ok(_) => return (calls, in_progress, errors, None),
                        Err(Error::Idempotency(IdempotencyError::AlreadyInProgress { key })) => {
                            in_progress += 1;
                            let until = match store.get(&key).await {
                                Ok(Some(r)) if r.status == Status::InProgress => {
                                    r.in_progress_expiration.unwrap_or(0)
                                }
                                _ => 0,
                            };
                            let wait = (until - now_ms() + 5).clamp(5, 5_000) as u64;
                            tokio::time::sleep(Duration::from_millis(wait)).await;
                        }
                        Err(_) => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(50 * errors.min(20))).await;
                        }
                    }
                }
                (calls, in_progress, errors, Some(order))
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut totals = (0, 0, 0, Vec::new());
    for (calls, in_progress, errors, failed) in results {
        totals.0 += calls;
        totals.1 += in_progress;
        totals.2 += errors;
        totals.3.extend(failed);
    }
    totals
}

/// The events of every log file in `dir`, by kind.
fn read_events(dir: &Path) -> Result<Vec<Value>, BoxError> {
    let mut events = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        // A line cut by SIGKILL does not parse: skipped.
        events.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
    }
    Ok(events)
}

/// The storm's SQS batch records.
#[derive(Default)]
struct BatchFigures {
    /// The batches (by their first invocation).
    batches: HashSet<u64>,
    records: u64,
    /// Records whose handler ran (each a message's own execution).
    ran: u64,
    /// Records of a batch cut by a kill (no end), and of those the ones that
    /// ran: cut between the batch's reservation and its completion.
    cut: u64,
    ran_cut: u64,
    /// Records not in `batchItemFailures`, of which those that did not run.
    acknowledged: u64,
    replayed: u64,
    /// Records in `batchItemFailures`.
    failed: u64,
    /// Records of a batch whose processing erred.
    errors: u64,
    /// Acknowledged records read back after their batch.
    read_back: u64,
}

/// The waiting invocations that ended, and how those that waited ended.
#[derive(Default)]
struct WaitFigures {
    ended: u64,
    replayed: u64,
    ran: u64,
    timed_out: u64,
    /// Waited, then ran and did not complete (fenced, store error, ...).
    other: u64,
    /// Sorted.
    waited_ms: Vec<i64>,
}

impl WaitFigures {
    /// The `p`th percentile of the time waited, `-` with no waits.
    fn percentile(&self, p: usize) -> String {
        let n = self.waited_ms.len();
        match n {
            0 => "-".to_owned(),
            _ => self.waited_ms[((n - 1) * p / 100).min(n - 1)].to_string(),
        }
    }
}

#[path = "../tests/support/executions.rs"]
mod executions;
/// An execution, by its invocation.
type Execution = executions::Execution<u64>;

async fn orchestrate() -> Result<bool, BoxError> {
    let params = Params::from_env()?;
    let began = Instant::now();
    let endpoint = endpoint();
    let backend = Backend::from_env()?;
    // The table on DynamoDB, the key prefix on Redis.
    let table = format!("chaos-{}-{}", params.label, now_ms());
    let dir = match std::env::var("CHAOS_DIR") {
        Ok(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(".cache/chaos").join(&table),
    };
    std::fs::create_dir_all(&dir)?;
    let at = match backend {
        Backend::DynamoDb => format!("DynamoDB at {endpoint}, table {table}"),
        Backend::Redis => format!("Redis at {}, key prefix {table}", redis_url()),
    };
    println!(
        "chaos [{}]: {} invocations over {} keys ({} per mille in SQS batches), {} workers x {}, deadlines {}-{} ms, {at}, logs {}",
        params.label,
        params.invocations,
        params.keys,
        params.batch_permille,
        params.workers,
        params.concurrency,
        params.deadline_min_ms,
        params.deadline_max_ms,
        dir.display()
    );
    let sdk = client(&endpoint);
    if backend == Backend::DynamoDb {
        create_table(&sdk, &table).await?;
    }

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = Arc::new(Server {
        params: params.clone(),
        queue: Mutex::new(Queue {
            next: 0,
            rng: Rng::new(),
        }),
        ledger: Mutex::default(),
    });
    let accept = {
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(Arc::clone(&server).serve(stream));
            }
        })
    };

    // 1. The storm.
    let storm_began = Instant::now();
    let figures = storm(&params, &dir, &server, addr, &table).await?;
    let storm_elapsed = storm_began.elapsed();
    if figures.timed_out {
        println!(
            "chaos [{}]: the storm did not finish in {} s; workers killed",
            params.label, params.max_seconds
        );
    }

    // 2. Every key to completion.
    let final_began = Instant::now();
    let storm_events = read_events(&dir)?;
    let mut keys_by_order: HashMap<String, String> = HashMap::new();
    for e in storm_events.iter().filter(|e| e["ev"] == "run") {
        if let (Some(order), Some(key)) = (e["order"].as_str(), e["key"].as_str()) {
            keys_by_order.insert(order.to_owned(), key.to_owned());
        }
    }
    let final_log = EventLog::create(&dir.join("final.jsonl"))?;
    let (store, prefix) = backend.open(&table).await?;
    let function = function(store.clone(), &prefix, addr, final_log.clone(), false)?;
    let (final_calls, final_in_progress, final_errors, unfinished) =
        final_pass(&params, &function, &store, &final_log).await;
    let final_elapsed = final_began.elapsed();

    // 3. Read back every record.
    let events = read_events(&dir)?;
    for e in events.iter().filter(|e| e["ev"] == "run") {
        if let (Some(order), Some(key)) = (e["order"].as_str(), e["key"].as_str()) {
            keys_by_order.insert(order.to_owned(), key.to_owned());
        }
    }
    let read: Vec<(
        String,
        Result<Option<lambda_idempotency::IdempotencyRecord>, String>,
    )> = futures_util::stream::iter(0..params.keys)
        .map(|index| {
            let (store, keys_by_order) = (&store, &keys_by_order);
            async move {
                let order = order_name(index);
                let Some(key) = keys_by_order.get(&order) else {
                    return (order, Err("never ran".to_owned()));
                };
                let mut record = Err(String::new());
                for attempt in 0..20u64 {
                    match store.get(key).await {
                        Ok(r) => return (order, Ok(r)),
                        Err(e) => record = Err(format!("unreadable: {e}")),
                    }
                    tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
                }
                (order, record)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut committed: HashMap<String, Option<String>> = HashMap::new();
    let mut stuck = Vec::new();
    for (order, record) in read {
        match record {
            Ok(Some(r)) if r.status == Status::Completed => {
                committed.insert(order, r.data);
            }
            Ok(Some(r)) => stuck.push(format!(
                "{order}: {:?}, in progress until {:?} (now {})",
                r.status,
                r.in_progress_expiration,
                now_ms()
            )),
            Ok(None) => stuck.push(format!("{order}: no record")),
            Err(e) => stuck.push(format!("{order}: {e}")),
        }
    }

    for order in &unfinished {
        let prefix = format!("{order}:");
        if !stuck.iter().any(|s| s.starts_with(&prefix)) {
            stuck.push(format!(
                "{order}: the final pass gave up after {FINAL_BUDGET_S} s"
            ));
        }
    }

    // 4. Checks.
    let mut executions: HashMap<String, Vec<Execution>> = HashMap::new();
    let mut ends: HashMap<u64, &Value> = HashMap::new();
    for e in events.iter().filter(|e| e["ev"] == "end") {
        if let Some(inv) = e["inv"].as_u64() {
            ends.insert(inv, e);
        }
    }
    for e in events.iter().filter(|e| e["ev"] == "run") {
        let inv = e["inv"].as_u64().unwrap_or(u64::MAX);
        executions
            .entry(e["order"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(Execution {
                who: inv,
                start: e["t"].as_i64().unwrap_or(0),
                deadline: e["deadline"].as_i64().unwrap_or(0),
                end: ends.get(&inv).and_then(|end| end["t"].as_i64()),
            });
    }
    let mut overlaps = Vec::new();
    for (order, runs) in &mut executions {
        runs.sort_by_key(|r| r.start);
        for (i, a) in runs.iter().enumerate() {
            for b in &runs[i + 1..] {
                if a.overlaps(b) {
                    overlaps.push(format!(
                        "{order}: execution {} [{}, {}] (deadline {}, end {:?}) overlaps execution {} [{}, {}] (deadline {}, end {:?})",
                        a.who, a.start, a.claim_end(), a.deadline, a.end,
                        b.who, b.start, b.claim_end(), b.deadline, b.end
                    ));
                }
            }
        }
    }
    let mut differing = Vec::new();
    let mut replies = 0u64;
    let mut ok_executions: HashMap<String, HashSet<u64>> = HashMap::new();
    let run_invs: HashSet<u64> = events
        .iter()
        .filter(|e| e["ev"] == "run")
        .filter_map(|e| e["inv"].as_u64())
        .collect();
    let mut replayed = 0u64;
    let mut waiting_replies = 0u64;
    // Every successful reply, the waiting invocations' included; and the
    // executions of acknowledged batch records (whose completion was written).
    for e in ends.values().filter(|e| e["outcome"] == "ok") {
        let order = e["order"].as_str().unwrap_or_default();
        let inv = e["inv"].as_u64().unwrap_or(u64::MAX);
        if run_invs.contains(&inv) {
            ok_executions
                .entry(order.to_owned())
                .or_default()
                .insert(inv);
        }
        // A batch record has no reply: checked below.
        if !e["batch"].is_null() {
            continue;
        }
        replies += 1;
        waiting_replies += u64::from(e["waits"] == true);
        replayed += u64::from(!run_invs.contains(&inv));
        let reply = e["reply"].as_str().unwrap_or_default();
        match committed.get(order) {
            Some(Some(data)) if data == reply => {}
            other => differing.push(format!(
                "{order}: invocation {inv} got {reply}, committed {:?}",
                other.cloned().flatten()
            )),
        }
    }
    // SQS batch records. One not in `batchItemFailures` (acknowledged) must
    // have a completed record with the committed response: read back by the
    // worker after the batch (`acked`: completed, with the committed data, under
    // the key its order's direct invocations use); one that ran must have
    // returned the committed response (its completion was written). Read back
    // or not (the worker killed first, the store failing), the committed
    // response's execution ran before the record was acknowledged.
    let acked: HashMap<u64, &Value> = events
        .iter()
        .filter(|e| e["ev"] == "acked")
        .filter_map(|e| Some((e["inv"].as_u64()?, e)))
        .collect();
    let run_of: HashMap<u64, (&str, i64)> = events
        .iter()
        .filter(|e| e["ev"] == "run")
        .filter_map(|e| Some((e["inv"].as_u64()?, (e["order"].as_str()?, e["t"].as_i64()?))))
        .collect();
    let mut batch = BatchFigures::default();
    let mut batch_uncommitted = Vec::new();
    for e in events
        .iter()
        .filter(|e| e["ev"] == "start" && !e["batch"].is_null())
    {
        batch.records += 1;
        batch
            .batches
            .insert(e["batch"].as_u64().unwrap_or(u64::MAX));
        let inv = e["inv"].as_u64().unwrap_or(u64::MAX);
        let ran = run_invs.contains(&inv);
        batch.ran += u64::from(ran);
        let Some(end) = ends.get(&inv) else {
            batch.cut += 1;
            batch.ran_cut += u64::from(ran);
            continue;
        };
        match end["outcome"].as_str().unwrap_or_default() {
            "ok" => {}
            "batch_failed" => {
                batch.failed += 1;
                continue;
            }
            _ => {
                batch.errors += 1;
                continue;
            }
        }
        batch.acknowledged += 1;
        batch.replayed += u64::from(!ran);
        let order = end["order"].as_str().unwrap_or_default();
        let data = committed.get(order).cloned().flatten();
        let mut wrong = Vec::new();
        if ran && end["returned"].as_str() != data.as_deref() {
            wrong.push(format!("returned {}", end["returned"]));
        }
        match acked.get(&inv) {
            Some(read) if read["error"].is_null() => {
                batch.read_back += 1;
                if read["completed"] != true {
                    wrong.push("its record read back not completed".to_owned());
                }
                if read["data"].as_str() != data.as_deref() {
                    wrong.push(format!("read back {}", read["data"]));
                }
                if read["key"].as_str() != keys_by_order.get(order).map(String::as_str) {
                    wrong.push(format!(
                        "key {} where its direct invocations use {:?}",
                        read["key"],
                        keys_by_order.get(order)
                    ));
                }
            }
            _ => {}
        }
        let execution = data
            .as_deref()
            .and_then(|d| serde_json::from_str::<Value>(d).ok())
            .and_then(|v| v["execution"].as_u64());
        let ran_before = execution
            .and_then(|x| run_of.get(&x))
            .is_some_and(|&(o, t)| o == order && end["t"].as_i64().is_some_and(|end| t <= end));
        if !ran_before {
            wrong.push(format!(
                "the committed execution {execution:?} did not run before it was acknowledged"
            ));
        }
        if !wrong.is_empty() {
            batch_uncommitted.push(format!(
                "{order}: batch record {inv} (batch {}) acknowledged: {}; committed {data:?}",
                end["batch"],
                wrong.join(", ")
            ));
        }
    }
    // Waiting invocations: what the engine reported against what the worker got.
    // One that waited has `waited_ms` on its span; its outcome says how it ended
    // (a run that then failed is named after the failure: "other").
    let mut waiting = WaitFigures::default();
    let mut waiters_disagreeing = Vec::new();
    for e in ends.values().filter(|e| e["waits"] == true) {
        waiting.ended += 1;
        let inv = e["inv"].as_u64().unwrap_or(u64::MAX);
        let (ok, refused, ran) = (
            e["outcome"] == "ok",
            e["outcome"] == "in_progress",
            run_invs.contains(&inv),
        );
        let reported = e["engine"].as_str().unwrap_or("(none)");
        let agrees = match reported {
            "waited_then_replayed" => ok && !ran,
            "waited_then_ran" => ok && ran,
            "wait_timed_out" => refused && !ran,
            "(none)" => false,
            _ => true,
        };
        if !agrees {
            waiters_disagreeing.push(format!(
                "invocation {inv} ({}): reported {reported}, got {}, {}",
                e["order"].as_str().unwrap_or_default(),
                e["outcome"],
                if ran {
                    "ran the handler"
                } else {
                    "ran no handler"
                }
            ));
        }
        let Some(waited_ms) = e["waited_ms"].as_i64() else {
            continue;
        };
        waiting.waited_ms.push(waited_ms);
        match reported {
            "waited_then_replayed" => waiting.replayed += 1,
            "waited_then_ran" => waiting.ran += 1,
            "wait_timed_out" => waiting.timed_out += 1,
            _ => waiting.other += 1,
        }
    }
    waiting.waited_ms.sort_unstable();
    // A waiter is refused only while a call holds its key: one that ran the
    // handler, or was killed after it started (it may have reserved), whose
    // reservation lasted into the wait (its deadline is later than the waiter's
    // start) and which had not committed by then. Not "past the end of its
    // wait": a throttled store can make a waiter's last read answer after the
    // holder's deadline.
    let mut starts_by_order: HashMap<&str, Vec<&Value>> = HashMap::new();
    for e in events.iter().filter(|e| e["ev"] == "start") {
        starts_by_order
            .entry(e["order"].as_str().unwrap_or_default())
            .or_default()
            .push(e);
    }
    let mut refused_unheld = Vec::new();
    for e in ends.values().filter(|e| e["engine"] == "wait_timed_out") {
        let inv = e["inv"].as_u64().unwrap_or(u64::MAX);
        let order = e["order"].as_str().unwrap_or_default();
        let gave_up = e["t"].as_i64().unwrap_or(0);
        let starts = starts_by_order.get(order).map_or(&[][..], Vec::as_slice);
        let began = starts
            .iter()
            .find(|s| s["inv"].as_u64() == Some(inv))
            .and_then(|s| s["t"].as_i64())
            .unwrap_or(gave_up);
        let held = starts.iter().any(|s| {
            let other = s["inv"].as_u64().unwrap_or(u64::MAX);
            let end = ends.get(&other);
            let committed_before = end.is_some_and(|end| {
                end["outcome"] == "ok" && end["t"].as_i64().is_some_and(|t| t < began)
            });
            other != inv
                && s["t"].as_i64() <= Some(gave_up)
                && (run_invs.contains(&other) || end.is_none())
                && s["deadline"].as_i64() > Some(began)
                && !committed_before
        });
        if !held {
            refused_unheld.push(format!(
                "{order}: invocation {inv} waited from {began} and was refused at {gave_up}; no call held the key meanwhile"
            ));
        }
    }

    // Late overwrites: a key whose committed response came from two executions
    // (two completions succeeded), or whose final record is not the execution whose
    // completion was first replied.
    let late_overwrites: Vec<String> = ok_executions
        .iter()
        .filter(|(_, invs)| invs.len() > 1)
        .map(|(order, invs)| format!("{order}: executions {invs:?} all completed"))
        .collect();
    // Journal lost: an execution that started after another execution of its key
    // had journaled the step still ran the step (sent the charge again) instead
    // of replaying it. Deduped by the payments API, so invisible in the charges.
    let mut journaled_at: HashMap<&str, (i64, u64)> = HashMap::new();
    for e in events.iter().filter(|e| e["ev"] == "stepped") {
        let (order, t) = (
            e["order"].as_str().unwrap_or_default(),
            e["t"].as_i64().unwrap_or(0),
        );
        let inv = e["inv"].as_u64().unwrap_or(u64::MAX);
        let entry = journaled_at.entry(order).or_insert((t, inv));
        if t < entry.0 {
            *entry = (t, inv);
        }
    }
    let run_start: HashMap<u64, i64> = events
        .iter()
        .filter(|e| e["ev"] == "run")
        .filter_map(|e| Some((e["inv"].as_u64()?, e["t"].as_i64()?)))
        .collect();
    let mut journal_lost = Vec::new();
    for e in events.iter().filter(|e| e["ev"] == "charging") {
        let order = e["order"].as_str().unwrap_or_default();
        let inv = e["inv"].as_u64().unwrap_or(u64::MAX);
        if let (Some(&(at, by)), Some(&start)) = (journaled_at.get(order), run_start.get(&inv)) {
            if by != inv && start > at {
                journal_lost.push(format!(
                    "{order}: execution {inv} (started {start}) sent the charge again; execution {by} journaled it at {at}"
                ));
            }
        }
    }
    let (wrong_charges, charge_requests, charges) = {
        let ledger = server.ledger.lock().unwrap_or_else(|e| e.into_inner());
        let mut wrong_charges = Vec::new();
        for index in 0..params.keys {
            let order = order_name(index);
            let charged = ledger.by_order.get(&order).map_or(0, HashSet::len);
            if charged != 1 {
                wrong_charges.push(format!("{order}: {charged} distinct charges"));
            }
        }
        // The committed charge id is the one the payments API gave for that order.
        for (order, data) in &committed {
            let charge_id = data
                .as_deref()
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
                .map(|v| v["charge_id"].clone());
            let expected = ledger
                .by_order
                .get(order)
                .and_then(|keys| keys.iter().next())
                .and_then(|key| ledger.by_key.get(key))
                .map(|(_, response)| response["charge_id"].clone());
            if charge_id.is_none() || charge_id != expected {
                wrong_charges.push(format!(
                    "{order}: committed charge {charge_id:?}, payments API charged {expected:?}"
                ));
            }
        }

        (wrong_charges, ledger.requests, ledger.charges)
    };

    // 5. Figures.
    let count = |pred: &dyn Fn(&Value) -> bool| events.iter().filter(|e| pred(e)).count() as u64;
    // Of the direct invocations (a batch record's outcomes are its own).
    let storm_outcome = |name: &str| {
        ends.iter()
            .filter(|(inv, e)| {
                **inv < params.invocations && e["batch"].is_null() && e["outcome"] == name
            })
            .count() as u64
    };
    let storm_starts =
        count(&|e| e["ev"] == "start" && e["inv"].as_u64() < Some(params.invocations));
    let storm_ends = ends.keys().filter(|inv| **inv < params.invocations).count() as u64;
    let total_runs: u64 = executions.values().map(|v| v.len() as u64).sum();
    let cut = executions
        .values()
        .flatten()
        .filter(|x| x.end.is_none())
        .count() as u64;
    let orders_run = executions.len() as u64;
    let pauses = count(&|e| e["ev"] == "pause");
    let late_pauses: u64 = events
        .iter()
        .filter(|e| e["ev"] == "pause")
        .filter(|p| {
            ends.get(&p["inv"].as_u64().unwrap_or(u64::MAX))
                .is_some_and(|end| end["t"].as_i64() > end["deadline"].as_i64())
        })
        .count() as u64;
    let other_errors: u64 = [
        "engine_error",
        "step_engine_error",
        "charge_failed",
        "other_error",
    ]
    .iter()
    .map(|o| storm_outcome(o))
    .sum();
    let rows: Vec<(&str, String)> = vec![
        ("invocations dispatched", server.dispatched().to_string()),
        (
            "invocations started / ended (storm)",
            format!("{storm_starts} / {storm_ends}"),
        ),
        ("keys", params.keys.to_string()),
        (
            "workers x concurrency",
            format!("{} x {}", params.workers, params.concurrency),
        ),
        (
            "SIGKILLs / respawns / crashes",
            format!(
                "{} / {} / {}",
                figures.kills, figures.respawns, figures.crashes
            ),
        ),
        ("executions (handler runs, all)", total_runs.to_string()),
        ("  cut by a kill (no end)", cut.to_string()),
        (
            "  re-executions (takeovers of a key)",
            total_runs.saturating_sub(orders_run).to_string(),
        ),
        (
            "pauses past the deadline (ended late)",
            format!("{pauses} ({late_pauses})"),
        ),
        (
            "lost ownership (late attempts fenced)",
            storm_outcome("lost_ownership").to_string(),
        ),
        (
            "AlreadyInProgress refusals (storm)",
            storm_outcome("in_progress").to_string(),
        ),
        (
            "store errors reserving/completing (storm)",
            storm_outcome("store_error").to_string(),
        ),
        (
            "store errors in steps (storm)",
            storm_outcome("step_store_error").to_string(),
        ),
        ("other errors (storm)", other_errors.to_string()),
        ("replies ok (storm)", storm_outcome("ok").to_string()),
        (
            "SQS batches / records in them",
            format!("{} / {}", batch.batches.len(), batch.records),
        ),
        (
            "  records ran (of which cut by a kill after)",
            format!("{} ({})", batch.ran, batch.ran_cut),
        ),
        (
            "  records cut by a kill / in erring batches",
            format!("{} / {}", batch.cut, batch.errors),
        ),
        (
            "  acknowledged / replayed / failed (reported)",
            format!(
                "{} / {} / {}",
                batch.acknowledged, batch.replayed, batch.failed
            ),
        ),
        (
            "  acknowledged records read back",
            batch.read_back.to_string(),
        ),
        (
            "replies ok: all / replayed / of waiters",
            format!("{replies} / {replayed} / {waiting_replies}"),
        ),
        (
            "waiting invocations started / ended",
            format!(
                "{} / {}",
                count(&|e| e["ev"] == "start" && e["waits"] == true),
                waiting.ended
            ),
        ),
        (
            "  waited for a call in flight",
            waiting.waited_ms.len().to_string(),
        ),
        (
            "    replayed / ran / timed out / other",
            format!(
                "{} / {} / {} / {}",
                waiting.replayed, waiting.ran, waiting.timed_out, waiting.other
            ),
        ),
        (
            "    waited ms, median / 99th percentile / max",
            format!(
                "{} / {} / {}",
                waiting.percentile(50),
                waiting.percentile(99),
                waiting.percentile(100)
            ),
        ),
        (
            "final pass calls / in-progress waits / errors",
            format!("{final_calls} / {final_in_progress} / {final_errors}"),
        ),
        (
            "charge requests / distinct charges",
            format!("{charge_requests} / {charges}"),
        ),
        (
            "storm / final pass / total elapsed",
            format!(
                "{:.1} s / {:.1} s / {:.1} s",
                storm_elapsed.as_secs_f64(),
                final_elapsed.as_secs_f64(),
                began.elapsed().as_secs_f64()
            ),
        ),
    ];
    let checks: Vec<(&str, usize, &Vec<String>)> = vec![
        (
            "overlapping executions within a reservation",
            overlaps.len(),
            &overlaps,
        ),
        ("keys stuck or never completed", stuck.len(), &stuck),
        (
            "replies differing from the committed response",
            differing.len(),
            &differing,
        ),
        (
            "keys not charged exactly once",
            wrong_charges.len(),
            &wrong_charges,
        ),
        (
            "late overwrites (two completions of a key)",
            late_overwrites.len(),
            &late_overwrites,
        ),
        (
            "journaled steps run again (journal lost)",
            journal_lost.len(),
            &journal_lost,
        ),
        (
            "batch records acked, response not committed",
            batch_uncommitted.len(),
            &batch_uncommitted,
        ),
        (
            "waiters whose reported outcome disagrees",
            waiters_disagreeing.len(),
            &waiters_disagreeing,
        ),
        (
            "waiters refused while no call held their key",
            refused_unheld.len(),
            &refused_unheld,
        ),
    ];
    println!("\nchaos [{}] figures", params.label);
    for (name, value) in &rows {
        println!("  {name:<48} {value}");
    }
    println!("\nchaos [{}] checks (all must be 0)", params.label);
    let mut ok = !figures.timed_out;
    for (name, n, examples) in &checks {
        println!("  {name:<48} {n}{}", if *n == 0 { "" } else { "   FAIL" });
        for example in examples.iter().take(5) {
            println!("      {example}");
        }
        ok &= *n == 0;
    }
    println!(
        "\nchaos [{}]: {} (logs in {})",
        params.label,
        if ok { "PASS" } else { "FAIL" },
        dir.display()
    );
    accept.abort();
    if backend == Backend::DynamoDb && std::env::var("CHAOS_KEEP_TABLE").is_err() {
        let _ = sdk.delete_table().table_name(&table).send().await;
    }
    Ok(ok)
}
