//! Crash at every phase: for each store call of an invocation (and right after the
//! external effect of a step), the first attempt fails there, dies there, or
//! stalls there past its deadline; the retries then run to completion. Whatever
//! the point, the charge reaches the payments API with one derived key and is
//! charged once, one response is committed and replayed byte for byte, the outbox
//! message is delivered with one derived key, no key stays in progress, no two
//! executions of the key overlap, and a late attempt never overwrites the new
//! owner. On the memory store, on DynamoDB and on Redis.
//!
//! Each point again with a duplicate configured to wait (`wait_for_in_progress`)
//! that arrives while the first attempt is cut there: in this execution
//! environment (a call of the same `Idempotency`, waiting on the first call's
//! flight) and in another (a second `Idempotency` on the same store and key
//! prefix, polling the record). The same promises hold, the waiter's response
//! included, and the waiter ends as the rules say for the point: it replays the
//! committed response, runs once the first attempt gave the key back, takes over
//! at the first attempt's deadline resuming its execution, or, only when its
//! wait is shorter than that deadline, is refused as in progress.

mod support;

use futures_util::future::join_all;
use lambda_idempotency::{
    effects, Dispatcher, DynamoDbStore, Error, Idempotency, IdempotencyConfig, IdempotencyRecord,
    IdempotencyStore, IdempotentFunction, MemoryStore, OutboxMessage, RedisStore, Status,
};
use serde_json::{json, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::executions::Execution;
use support::faults::{Fault, FaultStore, Faults, Fired, Granted, Mode, Op};
use support::http1::post;
use support::localstack::{client_recorded_in, default_table, recorded_client, Requests};
use support::payments::Payments;
use support::{context, in_progress, key_for, now_ms, poll, Audit, Counter, CALLER};
use tokio::task::JoinHandle;

type Failure = Error<std::io::Error>;
type Handler = Box<
    dyn Fn(Value) -> Pin<Box<dyn Future<Output = Result<Value, Failure>> + Send>> + Send + Sync,
>;
type Order<S> = IdempotentFunction<Handler, FaultStore<S>>;
/// What a call of the order function returns.
type Reply = Result<Value, Error<Failure>>;

/// One row of the matrix: what the first attempt does and where it is cut, and
/// who else calls meanwhile.
#[derive(Clone)]
struct Case {
    name: &'static str,
    /// `ok`, `fail-before-step` or `fail-after-step`: the first attempt's handler.
    first: &'static str,
    faults: Vec<Fault>,
    /// How a duplicate that waits long enough ends when it arrives at the cut.
    ends: Ends,
    /// A duplicate that waits, arriving while the first attempt is cut.
    waiter: Option<(Env, Bound)>,
}

/// How a duplicate that waits long enough ends, given where the first attempt
/// was cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ends {
    /// The response was committed: replayed.
    Replays,
    /// The first attempt gave the key back (released it, or never reserved it):
    /// reserved and ran, resuming the execution if it had attempted a step.
    Runs,
    /// The first attempt holds the key until its deadline: taken over then,
    /// resuming its execution.
    TakesOver,
}

/// Where the waiter runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Env {
    /// This execution environment: the same `Idempotency` as the first attempt.
    Here,
    /// Another: a second `Idempotency` on the same store, same key prefix.
    Elsewhere,
}

/// How long the waiter may wait: until its Lambda deadline minus 1 s (its
/// configured maximum, longer, is not what ends it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bound {
    /// Half a second past the first attempt's deadline: it sees the first
    /// attempt through.
    Long,
    /// Half the time the first attempt has left when the waiter arrives: it
    /// gives up first.
    Short,
}

/// The engine stops a wait this long before the caller's Lambda deadline.
const WAIT_MARGIN_MS: i64 = 1_000;
/// The waiters' configured maximum: longer than any of their deadlines allow.
const WAIT_MAX: Duration = Duration::from_secs(5);

impl Bound {
    /// The waiter's Lambda deadline, from now, when the first attempt's
    /// reservation holds until `first_ms` (epoch) and its deadline was
    /// `deadline_ms` away.
    fn waiter_deadline_ms(self, first_ms: Option<i64>, deadline_ms: i64) -> i64 {
        match (self, first_ms) {
            (Bound::Short, Some(first_ms)) => WAIT_MARGIN_MS + (first_ms - now_ms()) / 2,
            _ => WAIT_MARGIN_MS + deadline_ms + 500,
        }
    }
}

impl Case {
    fn with_waiter(&self, env: Env, bound: Bound) -> Case {
        Case {
            waiter: Some((env, bound)),
            ..self.clone()
        }
    }

    /// The row's name, and its order id (each row has its own key).
    fn label(&self) -> String {
        match self.waiter {
            None => self.name.to_owned(),
            Some((env, bound)) => format!("{}, {}", self.name, waiter_name(env, bound)),
        }
    }

    /// Whether the first attempt holds a record when cut: a duplicate elsewhere
    /// that finds none is a first call, not a waiter.
    fn reserves_before_cut(&self) -> bool {
        !self.faults.iter().any(|f| {
            f.nth == 1 && f.op == Op::Reserve && matches!(f.mode, Mode::Fail | Mode::CrashBefore)
        })
    }
}

fn waiter_name(env: Env, bound: Bound) -> &'static str {
    match (env, bound) {
        (Env::Here, Bound::Long) => "waiter here",
        (Env::Elsewhere, Bound::Long) => "waiter elsewhere",
        (Env::Here, Bound::Short) => "waiter here, short wait",
        (Env::Elsewhere, Bound::Short) => "waiter elsewhere, short wait",
    }
}

fn case(name: &'static str, first: &'static str, faults: &[(Op, usize, Mode)], ends: Ends) -> Case {
    Case {
        name,
        first,
        faults: faults
            .iter()
            .map(|&(op, nth, mode)| Fault { op, nth, mode })
            .collect(),
        ends,
        waiter: None,
    }
}

/// Points whose rows also get waiters with a short wait.
const SHORT_WAITS: [&str; 2] = ["crash after reserve", "stall after the charge"];

/// The rows, a group per crash point (a group runs at once, each row on its own
/// key): the point alone, with a waiter here, with one elsewhere (where it
/// applies), and for `SHORT_WAITS` with waiters that give up first.
fn matrix() -> Vec<Vec<Case>> {
    cases()
        .into_iter()
        .map(|base| {
            let mut group = vec![base.with_waiter(Env::Here, Bound::Long)];
            if base.reserves_before_cut() {
                group.push(base.with_waiter(Env::Elsewhere, Bound::Long));
            }
            if SHORT_WAITS.contains(&base.name) {
                group.push(base.with_waiter(Env::Here, Bound::Short));
                group.push(base.with_waiter(Env::Elsewhere, Bound::Short));
            }
            group.insert(0, base);
            group
        })
        .collect()
}

fn cases() -> Vec<Case> {
    use Ends::*;
    use Mode::*;
    use Op::*;
    vec![
        case("reserve fails", "ok", &[(Reserve, 1, Fail)], Runs),
        case(
            "crash before reserve",
            "ok",
            &[(Reserve, 1, CrashBefore)],
            Runs,
        ),
        case(
            "crash after reserve",
            "ok",
            &[(Reserve, 1, CrashAfter)],
            TakesOver,
        ),
        case(
            "stall after reserve",
            "ok",
            &[(Reserve, 1, PauseAfter)],
            TakesOver,
        ),
        case(
            "crash after the charge",
            "ok",
            &[(Effect, 1, CrashBefore)],
            TakesOver,
        ),
        case(
            "stall after the charge",
            "ok",
            &[(Effect, 1, PauseAfter)],
            TakesOver,
        ),
        // The step fails: the handler too, and the key is released open.
        case("journal write fails", "ok", &[(PutStep, 1, Fail)], Runs),
        case(
            "crash before journal write",
            "ok",
            &[(PutStep, 1, CrashBefore)],
            TakesOver,
        ),
        case(
            "crash after journal write",
            "ok",
            &[(PutStep, 1, CrashAfter)],
            TakesOver,
        ),
        case(
            "stall after journal write",
            "ok",
            &[(PutStep, 1, PauseAfter)],
            TakesOver,
        ),
        // The journal read is the resuming attempt's: a waiter's, in its rows.
        case(
            "journal read fails on resume",
            "ok",
            &[(PutStep, 1, CrashAfter), (GetStep, 1, Fail)],
            TakesOver,
        ),
        case(
            "crash at journal read on resume",
            "ok",
            &[(PutStep, 1, CrashAfter), (GetStep, 1, CrashBefore)],
            TakesOver,
        ),
        case("complete fails", "ok", &[(Complete, 1, Fail)], TakesOver),
        case(
            "crash before complete",
            "ok",
            &[(Complete, 1, CrashBefore)],
            TakesOver,
        ),
        case(
            "crash after complete",
            "ok",
            &[(Complete, 1, CrashAfter)],
            Replays,
        ),
        case(
            "stall after complete",
            "ok",
            &[(Complete, 1, PauseAfter)],
            Replays,
        ),
        case(
            "mark delivered fails",
            "ok",
            &[(MarkDelivered, 1, Fail)],
            Replays,
        ),
        case(
            "crash before mark delivered",
            "ok",
            &[(MarkDelivered, 1, CrashBefore)],
            Replays,
        ),
        case(
            "crash after mark delivered",
            "ok",
            &[(MarkDelivered, 1, CrashAfter)],
            Replays,
        ),
        case(
            "handler error after the charge",
            "fail-after-step",
            &[],
            Runs,
        ),
        case(
            "open release fails",
            "fail-after-step",
            &[(Complete, 1, Fail)],
            TakesOver,
        ),
        case(
            "crash before open release",
            "fail-after-step",
            &[(Complete, 1, CrashBefore)],
            TakesOver,
        ),
        case(
            "crash after open release",
            "fail-after-step",
            &[(Complete, 1, CrashAfter)],
            Runs,
        ),
        case(
            "handler error before the charge",
            "fail-before-step",
            &[],
            Runs,
        ),
        case(
            "release fails",
            "fail-before-step",
            &[(Release, 1, Fail)],
            TakesOver,
        ),
        case(
            "crash before release",
            "fail-before-step",
            &[(Release, 1, CrashBefore)],
            TakesOver,
        ),
        case(
            "crash after release",
            "fail-before-step",
            &[(Release, 1, CrashAfter)],
            Runs,
        ),
    ]
}

/// What a case ended with, for the table the DynamoDB run prints.
struct Row {
    attempts: usize,
    payment_calls: usize,
    deliveries: usize,
    /// The completing attempt's requests; in a row with a waiter, the waiter's.
    requests: Vec<String>,
    /// How the waiter ended, in a row with one.
    waiter: String,
}

/// The handler's runs in one row: who ran, when, and until when it could hold
/// the key.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<Vec<Run>>>);

/// A run of the handler, by its caller.
type Run = Execution<&'static str>;

/// A run under way: its end is noted when it is dropped, finished or cut.
struct Running {
    runs: Runs,
    index: usize,
}

impl Runs {
    fn start(&self, deadline: i64) -> Running {
        let mut runs = self.0.lock().expect("runs");
        runs.push(Run {
            who: support::caller(),
            start: now_ms(),
            deadline,
            end: None,
        });
        Running {
            runs: self.clone(),
            index: runs.len() - 1,
        }
    }

    fn all(&self) -> Vec<Run> {
        self.0.lock().expect("runs").clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(run) = self.runs.0.lock().expect("runs").get_mut(self.index) {
            run.end = Some(now_ms());
        }
    }
}

/// The order handler of one environment: one charge step to the payments API,
/// one outbox message. Its first run (of the row) does what the row says, later
/// runs succeed; a planned handler failure holds first when the test asked
/// (`Faults::hold_next`). Every run is logged, with the deadline the event
/// carries.
fn order<S: IdempotencyStore>(
    idempotency: &Idempotency<FaultStore<S>>,
    attempts: &Counter,
    faults: &Faults,
    payments: SocketAddr,
    runs: &Runs,
) -> Order<S> {
    let (attempts, faults, runs) = (attempts.clone(), faults.clone(), runs.clone());
    let handler: Handler = Box::new(move |event: Value| {
        let plan = match attempts.hit() {
            1 => event["first"].as_str().unwrap_or("ok").to_owned(),
            _ => "ok".to_owned(),
        };
        let run = runs.start(event["deadline"].as_i64().unwrap_or(i64::MAX));
        let faults = faults.clone();
        Box::pin(async move {
            // Dropped when the run ends, or with the future when it is cut.
            let _run = run;
            let fx = effects()?;
            if plan == "fail-before-step" {
                faults.hold().await;
                return Err(Error::Handler(std::io::Error::other("before the charge")));
            }
            let (id, effect) = (event["order_id"].clone(), faults.clone());
            let charge: Value = fx
                .step("charge", |key| async move {
                    let charged = post(payments, "/charges", &key, &json!({ "order": id })).await?;
                    effect.after_effect().await;
                    Ok::<_, std::io::Error>(charged)
                })
                .await?;
            if plan == "fail-after-step" {
                faults.hold().await;
                return Err(Error::Handler(std::io::Error::other("after the charge")));
            }
            fx.outbox().push(OutboxMessage::Custom {
                sink: "audit".into(),
                payload: json!({ "order": event["order_id"] }),
            });
            Ok::<_, Failure>(json!({ "order": event["order_id"], "charge": charge }))
        })
    });
    idempotency.function("order", handler)
}

fn config(prefix: &str, wait: Option<Duration>) -> IdempotencyConfig {
    IdempotencyConfig::builder()
        .key_expression("order_id")
        .key_prefix(prefix)
        .wait_for_in_progress(wait.unwrap_or_default())
        .build()
        .expect("config")
}

/// Calls `order` on a task of its own as `who`, with a Lambda deadline `ms`
/// away, which the event carries for the handler's log.
fn spawn_call<S: IdempotencyStore>(
    order: &Arc<Order<S>>,
    case: &Case,
    who: &'static str,
    ms: i64,
) -> JoinHandle<Reply> {
    let order = Arc::clone(order);
    let context = context(ms);
    let event =
        json!({ "order_id": case.label(), "first": case.first, "deadline": context.deadline });
    tokio::spawn(CALLER.scope(who, async move { order.call(event, Some(&context)).await }))
}

/// Where an attempt stopped.
enum Cut {
    Ended(Reply),
    /// Died at a fault: the test drops it, as Lambda's kill would.
    Crashed,
    /// Stalled at a fault past its deadline, until the test resumes it.
    Stalled,
    /// Held at its planned failure until the test lets it go (`Faults::hold_next`).
    Held,
}

async fn cut(attempt: &mut JoinHandle<Reply>, faults: &Faults) -> Cut {
    tokio::select! {
        joined = attempt => Cut::Ended(joined.expect("join")),
        _ = faults.crashed.notified() => Cut::Crashed,
        _ = faults.paused.notified() => Cut::Stalled,
        _ = faults.held.notified() => Cut::Held,
    }
}

/// One environment's store and order function.
struct Environment<S> {
    store: FaultStore<S>,
    order: Arc<Order<S>>,
}

/// Spawns the duplicate that waits, with a Lambda deadline `ms` away, while
/// the first attempt is cut, and returns it once it is known to wait (or,
/// elsewhere, to have found the response committed already), with the time
/// it was spawned.
async fn arrive<S: IdempotencyStore>(
    env: Env,
    waiter_env: &Environment<S>,
    case: &Case,
    ms: i64,
) -> (JoinHandle<Reply>, i64) {
    let label = case.label();
    let calls = waiter_env.store.calls.get();
    let spawned = now_ms();
    let waiter = spawn_call(&waiter_env.order, case, "waiter", ms);
    match env {
        Env::Here => {
            // A current-thread runtime: yielding lets the waiter run up to its
            // first await, the wait for the first attempt's flight (the first
            // attempt is stopped: any store call would be the waiter's).
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            assert!(
                !waiter.is_finished() && waiter_env.store.calls.get() == calls,
                "{label}: the waiter waits for the first attempt, asking the store nothing"
            );
        }
        Env::Elsewhere => {
            // Its reservation refused, then at least one read of the record.
            let waiting = || waiter.is_finished() || waiter_env.store.calls.get() >= calls + 2;
            poll(|| async { waiting() }, |waiting| !waiting).await;
            assert!(waiting(), "{label}: the waiter did not start waiting");
        }
    }
    (waiter, spawned)
}

/// What the waiter did.
struct Waited {
    /// `None`: it died at a fault of the row, and was dropped.
    reply: Option<Reply>,
    took_ms: i64,
    ended: i64,
}

/// Awaits the waiter once the first attempt is settled (ended, dropped or
/// stalled): a crash now is the waiter's own.
async fn finish(mut waiter: JoinHandle<Reply>, faults: &Faults, label: &str) -> Option<Reply> {
    let finished = async {
        tokio::select! {
            joined = &mut waiter => Some(joined.expect("join")),
            _ = faults.crashed.notified() => {
                waiter.abort();
                None
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), finished)
        .await
        .unwrap_or_else(|_| panic!("{label}: the waiter never ended"))
}

/// Checks that the waiter ended as the rules say for the row, and says how.
/// `first` is the first attempt's record when it was cut; `grant` the waiter's
/// reservation, `run` its run of the handler, `hit` the fault of the row that
/// hit the waiter itself (a later one, the resuming attempt's).
fn check_waiter(
    case: &Case,
    waited: &Waited,
    first: Option<&IdempotencyRecord>,
    grant: Option<&Granted>,
    run: Option<&Run>,
    hit: Option<&Fired>,
) -> String {
    let label = case.label();
    let Some((_, bound)) = case.waiter else {
        return String::new();
    };
    let first_deadline = first.and_then(|r| r.in_progress_expiration);
    let ok = matches!(waited.reply, Some(Ok(_)));
    let took = waited.took_ms;
    if bound == Bound::Short {
        let deadline = first_deadline.expect("the first attempt reserved");
        // The waiter's last reservation attempt, made as its wait ends, can
        // reach a loaded store after the first attempt's deadline: the store
        // then rightly lets it take the first attempt's reservation over (the
        // long rows' ending). Any other ending of a short wait is a defect.
        let took_over_late = ok
            && waited.ended >= deadline
            && grant.is_some_and(|g| {
                g.replaced
                    .as_ref()
                    .is_some_and(|r| r.in_progress_expiration == Some(deadline))
            });
        if took_over_late {
            return format!(
                "took over, its wait having ended after the first's deadline ({took} ms)"
            );
        }
        assert!(
            matches!(&waited.reply, Some(reply) if in_progress(reply))
                && grant.is_none()
                && run.is_none(),
            "{label}: a waiter with a short wait is refused as in progress: {:?}, {grant:?}",
            waited.reply
        );
        assert!(
            waited.ended < deadline,
            "{label}: refused at {}, after the first attempt's deadline {deadline}: it could have taken over",
            waited.ended
        );
        return format!("timed out ({took} ms)");
    }
    // A later fault of the row that hit the waiter may fail it; nothing else may.
    let failed = match (hit, &waited.reply) {
        (_, Some(Ok(_))) => String::new(),
        (Some(fault), None) => format!(", then died at {:?}", fault.op),
        (Some(fault), Some(Err(_))) => format!(", then failed at {:?}", fault.op),
        (None, reply) => panic!("{label}: the waiter failed ({reply:?}) with no fault of its own"),
    };
    match case.ends {
        Ends::Replays => {
            assert!(
                ok && grant.is_none() && run.is_none(),
                "{label}: the waiter replays: {:?}, {grant:?}, {run:?}",
                waited.reply
            );
            format!("replayed ({took} ms)")
        }
        Ends::Runs => {
            let grant =
                grant.unwrap_or_else(|| panic!("{label}: the waiter reserves: {:?}", waited.reply));
            assert!(run.is_some(), "{label}: the waiter runs the handler");
            match &grant.replaced {
                None => format!("ran, the key free ({took} ms){failed}"),
                Some(open) => {
                    assert_eq!(
                        open.in_progress_expiration,
                        Some(0),
                        "{label}: it replaced nothing but a record released open"
                    );
                    assert_eq!(
                        Some(&grant.record.execution),
                        first.map(|r| &r.execution),
                        "{label}: resuming the first attempt's execution"
                    );
                    format!("ran after the release, resumed ({took} ms){failed}")
                }
            }
        }
        Ends::TakesOver => {
            let grant = grant
                .unwrap_or_else(|| panic!("{label}: the waiter takes over: {:?}", waited.reply));
            let (first, replaced) = (
                first.expect("the first attempt reserved"),
                grant
                    .replaced
                    .as_ref()
                    .expect("it replaced the first attempt's reservation"),
            );
            assert_eq!(
                (
                    replaced.status,
                    &replaced.owner,
                    replaced.in_progress_expiration
                ),
                (Status::InProgress, &first.owner, first_deadline),
                "{label}: it took over the first attempt's reservation"
            );
            assert_eq!(
                grant.record.execution, first.execution,
                "{label}: resuming the first attempt's execution"
            );
            let run = run.unwrap_or_else(|| panic!("{label}: the waiter runs the handler"));
            assert!(
                Some(run.start) > first_deadline,
                "{label}: it ran at {} after the first attempt's deadline {first_deadline:?}",
                run.start
            );
            format!("took over at the deadline, resumed ({took} ms){failed}")
        }
    }
}

/// Runs `case` until an attempt succeeds, then checks every promise. `here` is
/// the first attempt's store, `elsewhere` another environment's on the same
/// table; `prefix` the key prefix (on a shared server, one of the run's own);
/// `requests` what `here`'s client sent (and `elsewhere`'s), on DynamoDB.
async fn run_case<S: IdempotencyStore + Clone>(
    here: S,
    elsewhere: S,
    prefix: &str,
    case: &Case,
    deadline_ms: i64,
    requests: Option<&Requests>,
) -> Row {
    let label = case.label();
    let key = key_for(&format!("{prefix}.order"), &label);
    // The row's outbox messages are keyed under its record: the relay sweeps
    // those alone, whoever else shares the store.
    let store = FaultStore::new(here.clone()).with_outbox_scope(&key);
    let faults = store.faults.clone();
    let (audit, payments) = (Audit::default(), Payments::start().await);
    let dispatcher = Dispatcher::new().with_sink("audit", audit.clone());
    let (attempts, runs) = (Counter::default(), Runs::default());
    let environment = |store: FaultStore<S>, wait: Option<Duration>| {
        let idempotency = Idempotency::new(store.clone(), config(prefix, wait))
            .with_dispatcher(dispatcher.clone());
        let order = order(&idempotency, &attempts, &faults, payments.addr, &runs);
        (
            idempotency,
            Environment {
                store,
                order: Arc::new(order),
            },
        )
    };
    // Waiting is its environment's config: the first attempt's in this
    // environment, another `Idempotency`'s elsewhere.
    let wait = case.waiter.map(|_| WAIT_MAX);
    let here_wait = wait.filter(|_| matches!(case.waiter, Some((Env::Here, _))));
    let (idempotency, first_env) = environment(store.clone(), here_wait);
    let (_, other_env) = environment(store.beside(elsewhere), wait);

    faults.set(&case.faults);
    if case.waiter.is_some() {
        faults.hold_next();
    }
    let mut late = None;
    let mut replies = Vec::new();
    let mut completing_requests = Vec::new();
    let mut waited = None;
    let mut first = None;
    for attempt in 0..200 {
        if let Some(requests) = requests {
            requests.take();
        }
        let who = if attempt == 0 { "first" } else { "retry" };
        let mut call = spawn_call(&first_env.order, case, who, deadline_ms);
        let mut stop = cut(&mut call, &faults).await;
        let mut waiter = None;
        let mut spawned = 0;
        if let (0, Some((env, bound))) = (attempt, case.waiter) {
            // The first attempt is stopped at its cut: the duplicate arrives now.
            first = here.get(&key).await.expect("get");
            let waiter_env = if env == Env::Here {
                &first_env
            } else {
                &other_env
            };
            let first_deadline = first.as_ref().and_then(|r| r.in_progress_expiration);
            let ms = bound.waiter_deadline_ms(first_deadline, deadline_ms);
            let (arrived, at) = arrive(env, waiter_env, case, ms).await;
            (waiter, spawned) = (Some(arrived), at);
            stop = match stop {
                Cut::Held => {
                    faults.go();
                    cut(&mut call, &faults).await
                }
                Cut::Ended(reply) => panic!("{label}: the first attempt was never cut: {reply:?}"),
                stop => stop,
            };
        }
        match stop {
            Cut::Ended(Ok(response)) => {
                if case.waiter.is_none() {
                    completing_requests = requests.map(Requests::take).unwrap_or_default();
                }
                replies.push(response);
            }
            Cut::Ended(reply) => {
                if in_progress(&reply) {
                    // The first attempt's reservation holds until its deadline.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Cut::Crashed => call.abort(),
            Cut::Stalled => late = Some(call),
            Cut::Held => unreachable!("one hold per row, for the first attempt"),
        }
        if let Some(waiter) = waiter {
            let reply = finish(waiter, &faults, &label).await;
            let ended = now_ms();
            completing_requests = requests.map(|r| r.take_of("waiter")).unwrap_or_default();
            if let Some(Ok(response)) = &reply {
                replies.push(response.clone());
            }
            waited = Some(Waited {
                reply,
                took_ms: ended - spawned,
                ended,
            });
        }
        if !replies.is_empty() {
            break;
        }
    }
    let committed = replies.first().cloned().unwrap_or_else(|| {
        let waiter = waited.as_ref().map(|w| (&w.reply, w.took_ms));
        panic!("{label}: never completed; the waiter got {waiter:?} (reply, ms)")
    });
    let record = store.get(&key).await.expect("get").expect("record");

    // A stalled attempt wakes up after the retry committed: it must not overwrite.
    if let Some(late) = late {
        faults.resume();
        let outcome = late.await.expect("join");
        assert!(
            outcome.as_ref().is_ok_and(|r| *r == committed) || outcome.is_err(),
            "{label}: late attempt {outcome:?}"
        );
        assert_eq!(
            store.get(&key).await.expect("get").as_ref(),
            Some(&record),
            "{label}: the late attempt left the committed record alone"
        );
    }

    assert_eq!(record.status, Status::Completed, "{label}");
    let data = record.data.as_deref().expect("a committed response");
    let replay = first_env
        .order
        .call(json!({ "order_id": label }), Some(&context(deadline_ms)))
        .await
        .expect("replay");
    // Every successful response: the first to succeed, the waiter's, a replay.
    for response in replies.iter().chain([&replay]) {
        assert_eq!(
            serde_json::to_string(response).expect("json"),
            data,
            "{label}: every response is the committed one, byte for byte"
        );
    }

    // No two executions of the key held it at once.
    let all_runs = runs.all();
    for (i, a) in all_runs.iter().enumerate() {
        for b in &all_runs[i + 1..] {
            assert!(
                !a.overlaps(b),
                "{label}: two executions overlap: {a:?} and {b:?}"
            );
        }
    }

    // The charge: one derived key, charged once, whatever was re-issued.
    let log = payments.request_log();
    let charge_keys: std::collections::BTreeSet<_> = log.iter().map(|(_, k, _)| k).collect();
    assert_eq!(charge_keys.len(), 1, "{label}: one derived key {log:?}");
    assert_eq!(payments.charges(), 1, "{label}: charged once");

    // The outbox: what a crash left pending, the relay delivers; one derived key.
    idempotency.relay(dispatcher).sweep().await.expect("sweep");
    assert!(
        store
            .outbox()
            .expect("an outbox")
            .pending_outbox()
            .await
            .expect("pending")
            .is_empty(),
        "{label}: nothing left pending"
    );
    let delivered = audit.delivered();
    let message_keys: std::collections::BTreeSet<_> = delivered.iter().map(|(_, k)| k).collect();
    assert!(
        !delivered.is_empty() && message_keys.len() == 1,
        "{label}: delivered at least once, with one key: {delivered:?}"
    );

    let waiter = match &waited {
        Some(waited) => {
            let grants = store.granted.lock().expect("granted").clone();
            let grant = grants.iter().find(|g| g.caller == "waiter");
            let run = all_runs.iter().find(|r| r.who == "waiter");
            let fired = faults.fired();
            let hit = fired.iter().find(|f| f.caller == "waiter");
            check_waiter(case, waited, first.as_ref(), grant, run, hit)
        }
        None => String::new(),
    };
    Row {
        attempts: attempts.get(),
        payment_calls: log.len(),
        deliveries: delivered.len(),
        requests: completing_requests,
        waiter,
    }
}

#[tokio::test]
async fn crash_matrix_on_the_memory_store() {
    for group in matrix() {
        join_all(group.iter().map(|case| {
            let store = MemoryStore::new();
            run_case(store.clone(), store, "crash", case, 150, None)
        }))
        .await;
    }
}

#[tokio::test]
async fn crash_matrix_on_dynamodb() {
    // The rows of a group run at once, each on a table of its own: the relay
    // sweeps a whole table's outbox.
    let widest = matrix().iter().map(Vec::len).max().unwrap_or(1);
    let tables = join_all((0..widest).map(|_| default_table("crashes"))).await;
    println!("| crash point | waiter | waiter ended | handler runs | payment calls | deliveries | requests of the completing attempt (the waiter's, in its rows) |");
    println!("|---|---|---|---|---|---|---|");
    for group in matrix() {
        // Each row with its own clients, recorder and table.
        let recorded: Vec<_> = group.iter().map(|_| recorded_client()).collect();
        let rows = join_all(group.iter().zip(&recorded).zip(&tables).map(
            |((case, (client, requests)), table)| {
                let here = DynamoDbStore::new(client.clone(), table);
                let elsewhere = DynamoDbStore::new(client_recorded_in(requests), table);
                run_case(here, elsewhere, "crash", case, 400, Some(requests))
            },
        ))
        .await;
        for (case, row) in group.iter().zip(rows) {
            let waiter = case
                .waiter
                .map_or("", |(env, bound)| waiter_name(env, bound));
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                case.name,
                waiter,
                row.waiter,
                row.attempts,
                row.payment_calls,
                row.deliveries,
                row.requests.join(", ")
            );
        }
    }
}

#[tokio::test]
async fn crash_matrix_on_redis() {
    // The rows of a group run at once, each in a database of its own (as each
    // DynamoDB row has a table): the relay's sweep scans its database's whole
    // outbox, and the shared server's database 0 may hold many messages. The
    // run's own key prefix keeps rows of other runs apart.
    let prefix = support::redis::prefix("crash");
    let widest = matrix().iter().map(Vec::len).max().unwrap_or(1);
    let databases: Vec<String> = (1..=widest).map(support::redis::url_of_database).collect();
    for group in matrix() {
        // Each environment with its own connection.
        join_all(group.iter().zip(&databases).map(|(case, url)| {
            let prefix = &prefix;
            async move {
                let here = RedisStore::connect(url).await.expect("Redis answers");
                let elsewhere = RedisStore::connect(url).await.expect("Redis answers");
                run_case(here, elsewhere, prefix, case, 150, None).await
            }
        }))
        .await;
    }
}
