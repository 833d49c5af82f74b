//! The Redis store's own contract on real servers (`redis/ensure.sh`): a
//! standalone one and a cluster of three primaries. What the engine does with
//! it is tested by the suites parameterised over the stores.

mod support;

use lambda_idempotency::store::{StepRecord, StoreError};
use lambda_idempotency::{
    Idempotency, IdempotencyConfig, IdempotencyRecord, IdempotencyStore, OutboxStore, RedisStore,
    Status, StepJournal,
};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use support::redis::{cluster_store, prefix, store, url};
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

async fn raw(command: &str, args: &[&str]) -> Option<String> {
    let client = redis::Client::open(url()).expect("url");
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
    let idempotency = Idempotency::new(
        store.clone(),
        IdempotencyConfig::builder()
            .key_expression("order_id")
            .key_prefix(&prefix)
            .build()
            .expect("config"),
    );
    let runs = Counter::default();
    let charge = {
        let runs = runs.clone();
        idempotency.function("charge", move |order: Value| {
            let run = runs.hit();
            async move {
                let effects = lambda_idempotency::effects().map_err(|e| e.to_string())?;
                let receipt = effects
                    .step(
                        "pay",
                        |key| async move { Ok::<_, std::io::Error>(json!(key)) },
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                effects
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
