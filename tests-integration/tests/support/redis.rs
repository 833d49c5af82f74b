//! Redis servers of the test command (`redis/ensure.sh`): a standalone one, a
//! replica of it, and a cluster of three primaries, at the addresses the
//! environment gives (the script's defaults otherwise).

use lambda_idempotency::RedisStore;

/// `redis://127.0.0.1:6390` unless `REDIS_URL` says otherwise.
pub fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6390".into())
}

/// The standalone server's database `n` (`REDIS_URL` names the server; a
/// database it names is replaced).
pub fn url_of_database(n: usize) -> String {
    let url = url();
    let server = match url.rsplit_once('/') {
        Some((server, db)) if !server.ends_with('/') && db.chars().all(|c| c.is_ascii_digit()) => {
            server.to_owned()
        }
        _ => url.trim_end_matches('/').to_owned(),
    };
    format!("{server}/{n}")
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

/// The keys matching `pattern` on the server at `url` (one node of a cluster
/// holds only its own slots' keys).
pub async fn scan(url: &str, pattern: &str) -> Vec<String> {
    let client = redis::Client::open(url).expect("a Redis URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers");
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut connection)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// `cmd` on the server at `nodes[0]`, or with `cluster` on the cluster of
/// `nodes` (routed by its key), past any store.
pub async fn query<T: redis::FromRedisValue>(
    nodes: &[String],
    cluster: bool,
    cmd: &redis::Cmd,
) -> T {
    if cluster {
        let client = redis::cluster::ClusterClient::new(nodes.to_vec()).expect("cluster URLs");
        let mut connection = client
            .get_async_connection()
            .await
            .expect("the cluster answers");
        cmd.query_async(&mut connection).await.expect("a command")
    } else {
        let client = redis::Client::open(nodes[0].as_str()).expect("a Redis URL");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis answers");
        cmd.query_async(&mut connection).await.expect("a command")
    }
}
