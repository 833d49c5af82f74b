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

/// The standalone server's database `n` (`REDIS_URL` names the server; a
/// database it names is replaced). Tests that scan (a relay's sweep reads the
/// whole database's outbox, `Harness::records` counts keys) run in databases
/// of their own, so that a scan stays short beside the keys of other tests
/// and of benches in database 0 (hundreds of thousands at times): the crash
/// matrix's rows in 1 to 5, the lost-response tests in
/// [`LOST_RESPONSES_DATABASE`], the engine's rules in [`RULES_DATABASE`].
/// Their key prefixes keep runs apart.
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

/// The database of the lost-response tests (`ambiguous.rs`).
pub const LOST_RESPONSES_DATABASE: usize = 6;
/// The database of the engine's rules (`engine.rs`, `support::stores`).
pub const RULES_DATABASE: usize = 7;

/// The standalone server's `host:port`.
pub fn address() -> String {
    let url = url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
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

/// `RedisStore`'s scripts by name, as it sends them: `EVALSHA` with the SHA1
/// of their text.
pub const SCRIPTS: [(&str, &str); 5] = [
    (
        "reserve",
        include_str!("../../../src/store/redis/reserve.lua"),
    ),
    (
        "complete",
        include_str!("../../../src/store/redis/complete.lua"),
    ),
    (
        "release",
        include_str!("../../../src/store/redis/release.lua"),
    ),
    (
        "put_step",
        include_str!("../../../src/store/redis/put_step.lua"),
    ),
    (
        "mark_delivered",
        include_str!("../../../src/store/redis/mark_delivered.lua"),
    ),
];

/// The SHA1 an `EVALSHA` of the script `name` carries.
pub fn script_sha(name: &str) -> String {
    let (_, text) = SCRIPTS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no script {name}"));
    redis::Script::new(text).get_hash().to_owned()
}

/// The name of the script whose SHA1 is `sha`.
pub fn script_name(sha: &str) -> Option<&'static str> {
    SCRIPTS
        .iter()
        .find(|(_, text)| redis::Script::new(text).get_hash() == sha)
        .map(|(name, _)| *name)
}

/// Loads every script on the server at `url`, so that no `EVALSHA` of a test
/// meets `NOSCRIPT` (and the store's load in between).
pub async fn load_scripts(url: &str) {
    for (_, text) in SCRIPTS {
        let _: String = query(
            &[url.to_owned()],
            false,
            redis::cmd("SCRIPT").arg("LOAD").arg(text),
        )
        .await;
    }
}
