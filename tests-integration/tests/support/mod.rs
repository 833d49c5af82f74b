//! Shared test helpers. Each test binary uses a part of them.
#![allow(dead_code)]

pub mod counts;
pub mod events;
pub mod executions;
pub mod faults;
pub mod http1;
pub mod localstack;
pub mod payments;
pub mod proxy;
pub mod redis;
pub mod resp_proxy;
pub mod stores;

use lambda_idempotency::{Idempotency, IdempotencyError, IdempotencyStore};
use lambda_runtime::{service_fn, Context, LambdaEvent};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tower::{Service, ServiceExt};

tokio::task_local! {
    /// Who is calling, in a test where several callers share a store (the first
    /// attempt, a duplicate that waits, the retries): the request recorder and
    /// the fault store note it beside what each caller did.
    pub static CALLER: &'static str;
}

/// The caller of the running task ([`CALLER`]); empty outside one.
pub fn caller() -> &'static str {
    CALLER.try_with(|caller| *caller).unwrap_or("")
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A Lambda context whose deadline is `ms_from_now` away (negative: already past).
pub fn context(ms_from_now: i64) -> Context {
    let mut ctx = Context::default();
    ctx.deadline = (now_ms() + ms_from_now) as u64;
    ctx.request_id = format!("req-{}", now_ms());
    ctx
}

pub type BoxError = lambda_runtime::Error;
/// The error of a wrapped service whose handler fails with a `lambda_runtime::Error`.
pub type ServiceError = lambda_idempotency::Error<BoxError>;

/// A wrapped handler that counts its runs and echoes the order id.
pub fn counting_service<S: IdempotencyStore>(
    idempotency: &Idempotency<S>,
    runs: &Counter,
) -> impl Service<LambdaEvent<Value>, Response = Value, Error = ServiceError> + Clone + Send + 'static
{
    let runs = runs.clone();
    idempotency.wrap(service_fn(move |event: LambdaEvent<Value>| {
        let run = runs.hit();
        async move { Ok::<_, BoxError>(json!({"order": event.payload["order_id"], "run": run})) }
    }))
        .expect("one handler per key prefix")
}

/// One invocation with a minute left before the deadline.
pub async fn invoke<Svc>(service: &mut Svc, payload: Value) -> Result<Value, Svc::Error>
where
    Svc: Service<LambdaEvent<Value>, Response = Value>,
{
    service
        .ready()
        .await?
        .call(LambdaEvent::new(payload, context(60_000)))
        .await
}

/// Invokes a clone of `service` on its own task, as `run_concurrent` does.
pub fn spawn_call<Svc>(
    service: &Svc,
    payload: Value,
) -> tokio::task::JoinHandle<Result<Value, String>>
where
    Svc: Service<LambdaEvent<Value>, Response = Value> + Clone + Send + 'static,
    Svc::Error: std::fmt::Display,
    Svc::Future: Send + 'static,
{
    let mut service = service.clone();
    tokio::spawn(async move {
        let future = match service.ready().await {
            Ok(ready) => ready.call(LambdaEvent::new(payload, context(60_000))),
            Err(e) => return Err(e.to_string()),
        };
        future.await.map_err(|e| e.to_string())
    })
}

pub fn idempotency_error<E: std::fmt::Debug>(
    err: &lambda_idempotency::Error<E>,
) -> &IdempotencyError {
    match err {
        lambda_idempotency::Error::Idempotency(e) => e,
        other => panic!("not an IdempotencyError: {other:?}"),
    }
}

/// The key the engine stores for a string key material `order_id` under `prefix`.
pub fn key_for(prefix: &str, order_id: &str) -> String {
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(format!("\"{order_id}\""))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{prefix}#{hash}")
}

/// `len` characters of base64 text over pseudo-random bytes (splitmix64 from
/// `seed`): gzip takes it down to about 76 %, so a response of 600 KiB of it
/// stays over DynamoDB's 400 KB item limit compressed too.
pub fn incompressible(len: usize, seed: u64) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut state = seed;
    let mut text = String::with_capacity(len);
    while text.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Ten 6-bit characters from each 64-bit value.
        for i in 0..10 {
            if text.len() == len {
                break;
            }
            text.push(ALPHABET[((z >> (6 * i)) & 63) as usize] as char);
        }
    }
    text
}

/// Counts handler executions.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    pub fn reset(&self) {
        self.0.store(0, Ordering::SeqCst);
    }
}

/// Runs `attempt` until `again` says its result is final, polling every 20 ms
/// for at most 10 s: for a reservation whose deadline has to pass.
pub async fn poll<R, F, Fut>(mut attempt: F, again: impl Fn(&R) -> bool) -> R
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = R>,
{
    let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let result = attempt().await;
        if !again(&result) || tokio::time::Instant::now() > give_up {
            return result;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Whether a wrapped function's call was refused as already in progress.
pub fn in_progress<R, E>(result: &Result<R, lambda_idempotency::Error<E>>) -> bool {
    matches!(
        result,
        Err(lambda_idempotency::Error::Idempotency(
            IdempotencyError::AlreadyInProgress { .. }
        ))
    )
}

/// A user-defined outbox sink that records what it receives: (payload, derived key).
#[derive(Clone, Default)]
pub struct Audit(pub Arc<std::sync::Mutex<Vec<(Value, String)>>>);

impl Audit {
    pub fn delivered(&self) -> Vec<(Value, String)> {
        self.0.lock().expect("lock").clone()
    }
}

impl lambda_idempotency::Sink for Audit {
    fn deliver<'a>(
        &'a self,
        payload: &'a Value,
        derived_key: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<(), Box<dyn std::error::Error + Send + Sync>>>
    {
        self.0
            .lock()
            .expect("lock")
            .push((payload.clone(), derived_key.to_owned()));
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Makes the record under `key` expired but still stored, as DynamoDB's TTL
/// leaves it (items are deleted up to days late).
pub async fn expire_in_place(store: &lambda_idempotency::MemoryStore, key: &str) {
    let mut stale = store.get(key).await.expect("get").expect("record");
    stale.expiration = now_ms() / 1000 - 60;
    stale.owner = "previous".into();
    // Reserving "a day later" lets the store replace the live record with the stale one.
    store
        .reserve(&stale, now_ms() + 86_400_000)
        .await
        .expect("overwrite with a stale record");
}

/// The permanent error a wrapped service failed with: the handler's own (boxed)
/// or a stored one replayed.
pub fn permanent(err: &ServiceError) -> Option<&lambda_idempotency::PermanentError> {
    match err {
        lambda_idempotency::Error::Handler(e) => e.downcast_ref(),
        lambda_idempotency::Error::Replayed(p) => Some(p),
        _ => None,
    }
}

/// Holds a handler until the test lets it go.
#[derive(Clone)]
pub struct Gate(Arc<tokio::sync::Semaphore>);

impl Gate {
    pub fn closed() -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(0)))
    }
    pub async fn pass(&self) {
        self.0
            .acquire()
            .await
            .expect("the gate is never closed")
            .forget();
    }
    pub fn open(&self, calls: usize) {
        self.0.add_permits(calls);
    }
}

/// Polls until `requests` has seen `n` requests: a waiter in another
/// environment has made its refused reservation and started reading.
pub async fn until_requests(requests: &localstack::Requests, n: usize) {
    poll(|| async { requests.count() }, |count| *count < n).await;
    assert!(requests.count() >= n, "the waiter did not start waiting");
}
