//! The stores a suite runs on, behind one face, so that a rule is written once
//! and runs on each: a fresh [`MemoryStore`], or a [`RedisStore`] on the shared
//! standalone server or cluster (`redis/ensure.sh`) under a key prefix of the
//! test's own.

use super::now_ms;
use lambda_idempotency::{
    IdempotencyConfig, IdempotencyConfigBuilder, IdempotencyStore, MemoryStore, RedisStore,
};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A store under test and the key prefix the test's configs give it.
#[derive(Clone)]
pub struct Harness<S> {
    pub store: S,
    /// `test` on a store of the test's own; unique to the test on a shared server.
    pub prefix: String,
    /// On Redis, the nodes that hold the test's keys: the server, or every
    /// primary of the cluster.
    nodes: Vec<String>,
    cluster: bool,
}

/// What a suite needs of a store beyond its contracts, done the store's way.
pub trait Store: IdempotencyStore + Clone {
    /// Another store as empty as `h`'s was: a new memory store, or the same
    /// server under a new prefix (for a test that starts over in a loop).
    fn another(h: &Harness<Self>) -> Harness<Self>;

    /// The number of idempotency records under `h`'s prefix (journal entries
    /// and outbox messages not counted), expired ones included where the store
    /// keeps them.
    fn records(h: &Harness<Self>) -> impl Future<Output = usize> + Send;

    /// Makes the record under `key` expired but still stored, owned by someone
    /// else.
    fn expire_in_place(h: &Harness<Self>, key: &str) -> impl Future<Output = ()> + Send;
}

impl Harness<MemoryStore> {
    pub fn memory() -> Self {
        Self {
            store: MemoryStore::new(),
            prefix: "test".into(),
            nodes: Vec::new(),
            cluster: false,
        }
    }
}

impl Harness<RedisStore> {
    /// The standalone server (the database of the rules: see
    /// [`super::redis::url_of_database`]), under a prefix for `test`.
    pub async fn redis(test: &str) -> Self {
        let url = super::redis::url_of_database(super::redis::RULES_DATABASE);
        Self {
            store: RedisStore::connect(&url)
                .await
                .expect("Redis answers (redis/ensure.sh starts it)"),
            prefix: super::redis::prefix(test),
            nodes: vec![url],
            cluster: false,
        }
    }

    /// The cluster, under a prefix for `test`.
    pub async fn cluster(test: &str) -> Self {
        Self {
            store: super::redis::cluster_store().await,
            prefix: super::redis::prefix(test),
            nodes: super::redis::cluster_urls(),
            cluster: true,
        }
    }
}

impl<S: Store> Harness<S> {
    /// A config builder with the test's key prefix and nothing else.
    pub fn builder(&self) -> IdempotencyConfigBuilder {
        IdempotencyConfig::builder().key_prefix(&self.prefix)
    }

    /// The key of string key material `order_id` for a handler wrapped without
    /// a name (`function` `None`) or for the function of that name.
    pub fn key(&self, function: Option<&str>, order_id: &str) -> String {
        match function {
            None => super::key_for(&self.prefix, order_id),
            Some(name) => super::key_for(&format!("{}.{name}", self.prefix), order_id),
        }
    }

    /// See [`Store::another`].
    pub fn another(&self) -> Self {
        S::another(self)
    }

    /// See [`Store::records`].
    pub async fn records(&self) -> usize {
        S::records(self).await
    }

    /// See [`Store::expire_in_place`].
    pub async fn expire_in_place(&self, key: &str) {
        S::expire_in_place(self, key).await
    }
}

impl Store for MemoryStore {
    fn another(_: &Harness<Self>) -> Harness<Self> {
        Harness::memory()
    }

    async fn records(h: &Harness<Self>) -> usize {
        h.store.len()
    }

    /// As DynamoDB's TTL leaves it: items are deleted up to days late.
    async fn expire_in_place(h: &Harness<Self>, key: &str) {
        super::expire_in_place(&h.store, key).await
    }
}

impl Store for RedisStore {
    fn another(h: &Harness<Self>) -> Harness<Self> {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        Harness {
            prefix: format!("{}-{}", h.prefix, COUNT.fetch_add(1, Ordering::Relaxed)),
            ..h.clone()
        }
    }

    async fn records(h: &Harness<Self>) -> usize {
        // A record's key is the prefix, then `#` and the hash or `.` and a
        // function's name (the prefix alone would also match the prefixes
        // `another` makes of it); a journal entry's or an outbox message's
        // starts with `{`, its record's hash tag. The prefixes are test names
        // and digits: no glob characters of their own.
        let pattern = format!("{}[#.]*", h.prefix);
        let mut count = 0;
        for node in &h.nodes {
            count += super::redis::scan(node, &pattern).await.len();
        }
        count
    }

    /// A record whose `expiration` has passed while its key lives on (a
    /// record written without a TTL, or a clock ahead of the server's): the
    /// server's own expiry never shows an expired record, so this is how the
    /// reservation script's check of `expiration` is reached.
    async fn expire_in_place(h: &Harness<Self>, key: &str) {
        let text: Option<String> =
            super::redis::query(&h.nodes, h.cluster, redis::cmd("GET").arg(key)).await;
        let text = text.expect("a stored record");
        let mut record: serde_json::Value = serde_json::from_str(&text).expect("a JSON record");
        record["expiration"] = (now_ms() / 1000 - 60).into();
        record["owner"] = "previous".into();
        let _: Option<String> = super::redis::query(
            &h.nodes,
            h.cluster,
            redis::cmd("SET")
                .arg(key)
                .arg(record.to_string())
                .arg("KEEPTTL"),
        )
        .await;
    }
}
