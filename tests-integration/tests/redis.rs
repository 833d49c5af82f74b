//! The Redis store's own contract on real servers (`redis/ensure.sh`): a
//! standalone one with its replica (replica acknowledgements) and a cluster of
//! three primaries. What the engine does with it is tested by the suites
//! parameterised over the stores.

mod support;

use lambda_idempotency::store::{StepRecord, StoreError};
use lambda_idempotency::{
    Idempotency, IdempotencyConfig, IdempotencyError, IdempotencyRecord, IdempotencyStore,
    OutboxStore, RedisStore, Status, StepJournal,
};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;
use support::redis::{cluster_store, prefix, replica_url, store, url};
use support::{now_ms, Counter};

fn reservation(key: &str, owner: &str, deadline_ms: i64) -> IdempotencyRecord {
    IdempotencyRecord {
        key: key.to_owned(),
        status: Status::InProgress,
        expiration: now_ms() / 1000 + 3600,
        in_progress_expiration: Some(deadline_ms),
        data: None,
        validation: None,
        owner: owner.to_owned(),
        execution: owner.to_owned(),
        is_error: false,
    }
}

/// The handlers' step: a payment whose receipt is its derived key.
async fn pay() -> Result<Value, String> {
    lambda_idempotency::effects()
        .map_err(|e| e.to_string())?
        .step("pay", |key| async move { Ok::<_, String>(json!(key)) })
        .await
        .map_err(|e| e.to_string())
}

/// Calls keyed by `order_id` under `prefix`, on `store`.
fn orders(store: RedisStore, prefix: &str) -> Idempotency<RedisStore> {
    Idempotency::new(
        store,
        IdempotencyConfig::builder()
            .key_expression("order_id")
            .key_prefix(prefix)
            .build()
            .expect("config"),
    )
}

async fn raw(command: &str, args: &[&str]) -> Option<String> {
    raw_at(&url(), command, args).await
}

/// `command` on the server at `url`, on a connection of its own.
async fn raw_at(url: &str, command: &str, args: &[&str]) -> Option<String> {
    let client = redis::Client::open(url).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    redis::cmd(command)
        .arg(args)
        .query_async(&mut connection)
        .await
        .expect("command")
}

#[tokio::test]
async fn reserve_complete_release_are_conditional_and_return_the_record_in_one_request() {
    let store = store().await;
    let key = format!("{}#k", prefix("contract"));
    let now = now_ms();
    assert_eq!(
        store
            .reserve(&reservation(&key, "a", now + 60_000), now)
            .await
            .expect("reserved"),
        None
    );
    // A live reservation blocks, and comes back with the refusal.
    match store
        .reserve(&reservation(&key, "b", now + 60_000), now)
        .await
    {
        Err(StoreError::Exists {
            existing: Some(existing),
        }) => assert_eq!(existing.owner, "a"),
        other => panic!("{other:?}"),
    }
    // Only the owner completes or releases.
    let mut completed = reservation(&key, "b", 0);
    completed.status = Status::Completed;
    completed.data = Some("{}".into());
    assert!(matches!(
        store.complete(&completed).await,
        Err(StoreError::NotOwner)
    ));
    assert!(matches!(
        store.release(&key, "b").await,
        Err(StoreError::NotOwner)
    ));
    completed.owner = "a".into();
    store
        .complete(&completed)
        .await
        .expect("the owner completes");
    let stored = store.get(&key).await.expect("get").expect("a record");
    assert_eq!(
        (stored.status, stored.data.as_deref()),
        (Status::Completed, Some("{}"))
    );
    // The server expires the record at its expiration.
    let ttl: i64 = raw("TTL", &[&key])
        .await
        .map_or(-2, |t| t.parse().unwrap_or(-2));
    assert!((3500..=3600).contains(&ttl), "TTL {ttl}");
    store.release(&key, "a").await.expect("the owner releases");
    store
        .release(&key, "a")
        .await
        .expect("a repeated release is not an error");
    assert_eq!(store.get(&key).await.expect("get"), None);
}

#[tokio::test]
async fn an_abandoned_reservation_is_taken_over_only_by_its_own_execution() {
    let store = store().await;
    let key = format!("{}#k", prefix("takeover"));
    let now = now_ms();
    store
        .reserve(&reservation(&key, "a", now - 1), now - 10)
        .await
        .expect("reserved");
    let mut other = reservation(&key, "b", now + 60_000);
    assert!(matches!(
        store.reserve(&other, now).await,
        Err(StoreError::Exists { .. })
    ));
    other.execution = "a".into();
    let replaced = store
        .reserve(&other, now)
        .await
        .expect("resumed")
        .expect("the abandoned record");
    assert_eq!(replaced.owner, "a");
}

#[tokio::test]
async fn items_that_are_not_records_are_malformed_and_left_alone() {
    let store = store().await;
    let now = now_ms();
    for (i, text) in [
        "not json",
        r#"{"status": "INPROGRESS", "in_progress_expiration": 1}"#,
        r#"{"status": "INPROGRESS", "expiration": "soon", "in_progress_expiration": 1}"#,
    ]
    .iter()
    .enumerate()
    {
        let key = format!("{}#{i}", prefix("malformed"));
        raw("SET", &[&key, text]).await;
        match store
            .reserve(&reservation(&key, "a", now + 60_000), now)
            .await
        {
            Err(StoreError::Malformed { .. }) => {}
            other => panic!("{text}: {other:?}"),
        }
        assert_eq!(
            raw("GET", &[&key]).await.as_deref(),
            Some(*text),
            "left alone"
        );
    }
}

#[tokio::test]
async fn the_journal_keeps_its_first_entry() {
    let store = store().await;
    let key = format!("{}#k#e1#step#0", prefix("journal"));
    let step = StepRecord {
        key: key.clone(),
        name: "charge".into(),
        data: "1".into(),
        expiration: now_ms() / 1000 + 60,
    };
    assert_eq!(store.put_step(&step).await.expect("put"), None);
    assert_eq!(
        store.put_step(&step).await.expect("repeated"),
        None,
        "its own entry"
    );
    let late = StepRecord {
        data: "2".into(),
        ..step.clone()
    };
    assert_eq!(
        store.put_step(&late).await.expect("late"),
        Some(step.clone())
    );
    assert_eq!(store.get_step(&key).await.expect("get"), Some(step));
}

#[tokio::test]
async fn a_wrapped_function_runs_once_on_a_cluster_whose_three_primaries_hold_keys() {
    let store = cluster_store().await;
    let prefix = prefix("cluster");
    let idempotency = orders(store.clone(), &prefix);
    let runs = Counter::default();
    let charge = {
        let runs = runs.clone();
        idempotency.function("charge", move |order: Value| {
            let run = runs.hit();
            async move {
                let receipt = pay().await?;
                lambda_idempotency::effects()
                    .map_err(|e| e.to_string())?
                    .outbox()
                    .push(lambda_idempotency::OutboxMessage::Custom {
                        sink: "events".into(),
                        payload: json!({ "order": order["order_id"] }),
                    });
                Ok::<_, String>(
                    json!({ "order": order["order_id"], "run": run, "receipt": receipt }),
                )
            }
        })
    };
    let mut primaries = BTreeSet::new();
    for i in 0..30 {
        let order = json!({ "order_id": format!("o-{i}") });
        let first = charge.call(order.clone(), None).await.expect("first");
        let replay = charge.call(order.clone(), None).await.expect("replay");
        assert_eq!(first, replay);
        let key = idempotency
            .key_for(Some("charge"), &order)
            .expect("key")
            .expect("key material");
        primaries.insert(primary_of(&key).await);
    }
    assert_eq!(runs.get(), 30);
    assert_eq!(primaries.len(), 3, "keys on every primary: {primaries:?}");
    // The outbox messages were committed with their records, in their slots.
    let pending = store.pending_outbox().await.expect("pending");
    let ours = pending
        .iter()
        .filter(|m| m.key.starts_with(&prefix))
        .count();
    assert_eq!(ours, 30);
}

/// The address of the cluster's primary that holds `key`'s slot.
async fn primary_of(key: &str) -> String {
    let client = redis::Client::open(support::redis::cluster_urls()[0].as_str()).expect("url");
    let mut node = client
        .get_multiplexed_async_connection()
        .await
        .expect("a cluster node");
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut node)
        .await
        .expect("keyslot");
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut node)
        .await
        .expect("nodes");
    nodes
        .lines()
        .filter(|line| line.contains("master"))
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields[8..].iter().find_map(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                let (start, end): (u16, u16) = (start.parse().ok()?, end.parse().ok()?);
                (start..=end)
                    .contains(&slot)
                    .then(|| fields[1].split('@').next().unwrap_or_default().to_owned())
            })
        })
        .expect("a primary holds every slot")
}

#[tokio::test]
async fn location_tells_servers_apart() {
    let (single, cluster): (RedisStore, RedisStore) = (store().await, cluster_store().await);
    assert_ne!(single.location(), cluster.location());
    assert_eq!(single.location(), store().await.location());
}

/// Stops the standalone server's replica from applying and acknowledging the
/// replication stream for `duration` (`CLIENT PAUSE ... ALL` on it). The pause
/// ends by itself, even if the test fails: other tests share the replica, and
/// on Redis 7.0 even `CLIENT UNPAUSE` waits for the pause to end.
async fn pause_replica(duration: Duration) {
    let millis = duration.as_millis().to_string();
    raw_at(&replica_url(), "CLIENT", &["PAUSE", &millis, "ALL"]).await;
}

/// Polls until a write on the standalone server is acknowledged by its replica
/// (`SET` then `WAIT` on one connection: WAIT counts that connection's writes).
async fn wait_for_replica_acks() {
    let client = redis::Client::open(url()).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, acked): ((), u32) = redis::pipe()
            .cmd("SET")
            .arg("replica-acks-probe")
            .arg(now_ms())
            .arg("EX")
            .arg(60)
            .cmd("WAIT")
            .arg(1)
            .arg(200)
            .query_async(&mut connection)
            .await
            .expect("SET and WAIT");
        if acked >= 1 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica ({}) does not acknowledge writes",
            replica_url()
        );
    }
}

/// The record at `key` on the server at `url`, as JSON, if there.
async fn stored_at(url: &str, key: &str) -> Option<Value> {
    raw_at(url, "GET", &[key])
        .await
        .map(|text| serde_json::from_str(&text).expect("a JSON record"))
}

fn is_unacknowledged(err: &dyn std::error::Error) -> bool {
    err.to_string().contains("replicas")
}

/// Each write waits for the replica's acknowledgement: when the replica is up,
/// reservations, journal entries and completions succeed and are on the
/// replica when the call returns; when it does not acknowledge in time, the
/// write fails with a store error within about the configured timeout, a
/// reservation so refused runs no handler, and what the primary holds is
/// documented state: the reservation blocks until its deadline and is then
/// resumed, a completion is replayed, and every key expires by the server.
#[tokio::test]
async fn replica_acknowledgements_gate_every_write_on_one_server() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    wait_for_replica_acks().await;
    let store = store().await.with_replica_acks(1, TIMEOUT);
    let prefix = prefix("acks");
    let idempotency = orders(store.clone(), &prefix);
    let runs = Counter::default();
    let charge = {
        let runs = runs.clone();
        idempotency.function("charge", move |order: Value| {
            let run = runs.hit();
            async move {
                let receipt = pay().await?;
                if order["pause_replica"] == json!(true) {
                    // The reservation and the step were acknowledged; the completion
                    // will not be.
                    pause_replica(Duration::from_secs(2)).await;
                }
                Ok::<_, String>(
                    json!({ "order": order["order_id"], "run": run, "receipt": receipt }),
                )
            }
        })
    };
    let key_of = |order: &Value| {
        idempotency
            .key_for(Some("charge"), order)
            .expect("key")
            .expect("key material")
    };

    // The replica acknowledges: every write succeeds, and is on the replica when
    // the call returns.
    let first = json!({ "order_id": "o-1" });
    let response = charge
        .call(first.clone(), None)
        .await
        .expect("acknowledged");
    assert_eq!(
        charge.call(first.clone(), None).await.expect("replayed"),
        response
    );
    assert_eq!(runs.get(), 1);
    let key = key_of(&first);
    let on_replica = stored_at(&replica_url(), &key)
        .await
        .expect("the record on the replica");
    assert_eq!(on_replica["status"], "COMPLETED");
    let step_key = format!(
        "{{{key}}}#{}#step#0",
        on_replica["execution"].as_str().expect("execution")
    );
    assert_eq!(
        raw_at(&replica_url(), "HGET", &[&step_key, "name"])
            .await
            .as_deref(),
        Some("pay"),
        "the journal entry on the replica"
    );
    let held = format!("{prefix}#held");
    let now = now_ms();
    store
        .reserve(&reservation(&held, "h", now + 60_000), now)
        .await
        .expect("a reservation, acknowledged");

    // The replica stops acknowledging, long enough for three writes to fail.
    pause_replica(Duration::from_secs(4)).await;
    // A reservation: the call fails with a store error, the handler does not run.
    let second = json!({ "order_id": "o-2" });
    let started = std::time::Instant::now();
    // A deadline past the pause, so that a retry after it still finds the
    // reservation holding the key.
    let deadline_ms = now_ms() + 7_000;
    let refused = charge
        .call(second.clone(), Some(&support::context(7_000)))
        .await;
    let took = started.elapsed();
    match &refused {
        Err(lambda_idempotency::Error::Idempotency(IdempotencyError::Store(err))) => {
            assert!(is_unacknowledged(err.as_ref()), "{err}")
        }
        other => panic!("a store error, not {other:?}"),
    }
    assert_eq!(runs.get(), 1, "the handler did not run");
    assert!(
        took < TIMEOUT * 3,
        "failed after {took:?}: about the timeout, not once per retry"
    );
    // A journal entry and a completion fail alike.
    let step = StepRecord {
        key: format!("{prefix}#held#h#step#0"),
        name: "charge".into(),
        data: "1".into(),
        expiration: now_ms() / 1000 + 60,
    };
    match store.put_step(&step).await {
        Err(StoreError::Backend(err)) => assert!(is_unacknowledged(err.as_ref()), "{err}"),
        other => panic!("a store error, not {other:?}"),
    }
    let mut completed = reservation(&held, "h", 0);
    completed.status = Status::Completed;
    completed.data = Some("{}".into());
    match store.complete(&completed).await {
        Err(StoreError::Backend(err)) => assert!(is_unacknowledged(err.as_ref()), "{err}"),
        other => panic!("a store error, not {other:?}"),
    }
    wait_for_replica_acks().await;

    // What the primary holds: each write was applied there, only not
    // acknowledged. The unacknowledged reservation is an ordinary one: the
    // server expires the key at the record's expiration (never a stuck key),
    // and it holds the key until its deadline, the invocation's, after which a
    // retry resumes it.
    let key = key_of(&second);
    let reserved = stored_at(&url(), &key)
        .await
        .expect("the reservation on the primary");
    assert_eq!(reserved["status"], "INPROGRESS");
    let holds_until = reserved["in_progress_expiration"]
        .as_i64()
        .expect("a deadline");
    assert!(holds_until <= deadline_ms, "{holds_until} > {deadline_ms}");
    let expires_at: i64 = raw("EXPIRETIME", &[&key])
        .await
        .and_then(|t| t.parse().ok())
        .expect("an expiry");
    assert_eq!(json!(expires_at), reserved["expiration"]);
    let mut refusals = 0;
    let retried = loop {
        match charge.call(second.clone(), None).await {
            Ok(response) => break response,
            Err(lambda_idempotency::Error::Idempotency(IdempotencyError::AlreadyInProgress {
                ..
            })) => {
                refusals += 1;
                assert!(
                    now_ms() <= holds_until + 1_000,
                    "still refused long after its deadline"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("{other}"),
        }
    };
    assert!(now_ms() >= holds_until, "resumed only after the deadline");
    assert!(refusals > 0, "a retry before the deadline was refused");
    assert_eq!(runs.get(), 2, "the retry ran the handler, once");
    assert_eq!(retried["order"], "o-2");
    let stored = store.get(&held).await.expect("get").expect("a record");
    assert_eq!(
        stored.status,
        Status::Completed,
        "the unacknowledged completion"
    );

    // A completion the replica does not acknowledge: the call fails with a store
    // error after the handler ran; the primary holds the response, so a retry
    // replays it (were the primary lost, the replica's reservation would be
    // resumed at its deadline instead).
    let third = json!({ "order_id": "o-3", "pause_replica": true });
    match charge.call(third.clone(), None).await {
        Err(lambda_idempotency::Error::Idempotency(IdempotencyError::Store(err))) => {
            assert!(is_unacknowledged(err.as_ref()), "{err}")
        }
        other => panic!("a store error, not {other:?}"),
    }
    wait_for_replica_acks().await;
    assert_eq!(runs.get(), 3);
    let replayed = charge.call(third.clone(), None).await.expect("replayed");
    assert_eq!(replayed["run"], 3);
    assert_eq!(runs.get(), 3, "replayed, not run again");
}

/// The test cluster's primaries have no replicas: with acknowledgements asked
/// for, every write fails with a store error saying so, and no handler runs.
#[tokio::test]
async fn replica_acknowledgements_on_a_cluster_without_replicas_fail_writes_clearly() {
    let store = cluster_store()
        .await
        .with_replica_acks(1, Duration::from_millis(200));
    let prefix = prefix("cluster-acks");
    let now = now_ms();
    match store
        .reserve(&reservation(&format!("{prefix}#k"), "a", now + 60_000), now)
        .await
    {
        Err(StoreError::Backend(err)) => {
            assert!(err.to_string().contains("0 of 1 replicas"), "{err}")
        }
        other => panic!("a store error, not {other:?}"),
    }
    let idempotency = orders(store, &prefix);
    let runs = Counter::default();
    let mut service = support::counting_service(&idempotency, &runs);
    match support::invoke(&mut service, json!({ "order_id": "o-1" })).await {
        Err(lambda_idempotency::Error::Idempotency(IdempotencyError::Store(err))) => {
            assert!(err.to_string().contains("replicas"), "{err}")
        }
        other => panic!("a store error, not {other:?}"),
    }
    assert_eq!(runs.get(), 0, "the handler did not run");
}

#[tokio::test]
async fn an_sqs_batch_on_a_cluster_runs_each_key_once_and_replays_when_redelivered() {
    use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
    let store = cluster_store().await;
    let prefix = prefix("batch");
    let idempotency = Idempotency::new(
        store.clone(),
        IdempotencyConfig::builder()
            .key_expression("powertools_json(body).order_id")
            .key_prefix(&prefix)
            .build()
            .expect("config"),
    );
    let runs = Counter::default();
    let batch = {
        let runs = runs.clone();
        idempotency.sqs_batch("ship", move |message: SqsMessage| {
            let run = runs.hit();
            async move { Ok::<_, String>(json!({ "shipped": message.body, "run": run })) }
        })
    };
    // Twelve keys, over the three primaries, and a duplicate of the first.
    let mut event = SqsEvent::default();
    event.records = (0..12)
        .chain([0])
        .map(|i| {
            support::events::sqs_message(
                &json!({ "order_id": format!("o-{i}") }).to_string(),
                &format!("m-{i}"),
            )
        })
        .collect();
    let context = support::context(30_000);
    let first = batch
        .process(lambda_runtime::LambdaEvent::new(
            event.clone(),
            context.clone(),
        ))
        .await
        .expect("batch");
    assert!(first.batch_item_failures.is_empty());
    assert_eq!(runs.get(), 12, "each key once; the duplicate replays");
    let again = batch
        .process(lambda_runtime::LambdaEvent::new(event.clone(), context))
        .await
        .expect("batch");
    assert!(again.batch_item_failures.is_empty());
    assert_eq!(runs.get(), 12, "redelivered: every record replays");
    for message in &event.records[..12] {
        let key = idempotency
            .key_for(Some("ship"), &serde_json::to_value(message).expect("json"))
            .expect("key")
            .expect("key material");
        let record = store.get(&key).await.expect("get").expect("a record");
        assert_eq!(record.status, Status::Completed);
    }
}
