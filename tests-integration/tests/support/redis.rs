//! Redis servers of the test command (`redis/ensure.sh`): a standalone one, a
//! replica of it, and a cluster of three primaries, at the addresses the
//! environment gives (the script's defaults otherwise).

use lambda_idempotency::RedisStore;

/// `redis://127.0.0.1:6390` unless `REDIS_URL` says otherwise.
pub fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390".into())
}

/// The standalone server's replica: `redis://127.0.0.1:6391` unless
/// `REDIS_REPLICA_URL` says otherwise.
pub fn replica_url() -> String {
    std::env::var("REDIS_REPLICA_URL").unwrap_or_else(|_| "redis://127.0.0.1:6391".into())
}

/// The cluster's nodes: `REDIS_CLUSTER_URLS`, comma-separated.
pub fn cluster_urls() -> Vec<String> {
    std::env::var("REDIS_CLUSTER_URLS")
        .unwrap_or_else(|_| {
            "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103".into()
        })
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// A store on the standalone server.
pub async fn store() -> RedisStore {
    RedisStore::connect(&url())
        .await
        .expect("Redis answers (redis/ensure.sh starts it)")
}

/// A store on the cluster.
pub async fn cluster_store() -> RedisStore {
    RedisStore::connect_cluster(cluster_urls())
        .await
        .expect("the Redis cluster answers (redis/ensure.sh starts it)")
}

/// A key prefix no other test uses, on a server the tests share.
pub fn prefix(test: &str) -> String {
    format!("{test}-{}", super::now_ms())
}
