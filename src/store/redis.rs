//! A store on Redis or Valkey (feature `redis`): one server, or a cluster.
//!
//! Every write is one Lua script, so that each decision and its write happen
//! in one step on the server and one round trip from the client (EVALSHA; the
//! first call on a server that does not know the script yet loads it once).
//! Scripts rather than functions (`FCALL`): they need no deployment step,
//! work from Redis 6.2 and on every Valkey, and a cluster loads them on the
//! node that needs them.
//!
//! The layout, with `K` a record key (`{prefix}#{hash}`):
//! - `K`: the record, a JSON string (`status`, `expiration`,
//!   `in_progress_expiration`, `data`, `validation`, `owner`, `execution`,
//!   `error`), the layout Powertools for Python's Redis layer writes, under the
//!   same key, expiring at its `expiration` (`EXAT`);
//! - `{K}#{execution}#step#{n}`: a journal entry, a hash (`name`, `data`,
//!   `expiration`);
//! - `{K}#{execution}#outbox#{n}`: an outbox message, a hash (`key`,
//!   `derived_key`, `message`, `status`, `expiration`).
//!
//! The braces are a hash tag: the journal and the outbox of a record hash to
//! its slot, so that on a cluster the script that completes a record and
//! writes its outbox touches one slot. (A key that already holds a hash tag
//! keeps it, and its companions share it.)

use super::{
    BoxFuture, IdempotencyStore, OutboxRecord, OutboxStore, StepJournal, StepRecord, StoreError,
};
use crate::record::{IdempotencyRecord, Status};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind};
use serde::Serialize;
use serde_json::Value;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("redis/reserve.lua")));
static COMPLETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("redis/complete.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("redis/release.lua")));
static PUT_STEP: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("redis/put_step.lua")));
static MARK_DELIVERED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("redis/mark_delivered.lua")));

/// A connection attempt gives up after this long: a Lambda function's
/// invocation should fail with a store error, not time out.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A request without an answer after this long fails (and is retried: see
/// [`RETRIES`]).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// A request that fails on the connection (dropped, refused, timed out) is
/// sent again this many times. Every script is safe to repeat: a repeated
/// write finds its own result (the reservation its owner token, the journal
/// entry itself), as the AWS SDK's retries do for `DynamoDbStore`.
const RETRIES: u32 = 2;

/// Idempotency records, journal and outbox on Redis or Valkey (feature
/// `redis`): a standalone server ([`connect`](Self::connect)) or a cluster
/// ([`connect_cluster`](Self::connect_cluster)), such as ElastiCache or
/// MemoryDB.
///
/// Same semantics as [`DynamoDbStore`](super::DynamoDbStore): a reservation is
/// made only if the key is absent or its record may be replaced (expired, or
/// abandoned under the takeover rule), and the replaced or blocking record
/// comes back in the same round trip; completing and releasing are
/// conditional on the owner token; outbox messages are written in the same
/// script as the completed record; a journal's first entry wins. The server
/// expires records, entries and messages at their `expiration`, and a record
/// expired but not yet evicted counts as absent all the same.
///
/// Redis replicates asynchronously: a write acknowledged by a primary that
/// fails before its replicas have it is lost, and a retry may then run beside
/// the first call. [`with_replica_acks`](Self::with_replica_acks) waits for
/// replicas to acknowledge each write, which makes such a loss less likely but
/// not impossible ([the guide's chapter on the Redis
/// store](crate::guide::redis#durability-said-plainly) compares the guarantees
/// with DynamoDB's, MemoryDB's and ElastiCache's).
///
/// ```no_run
/// use lambda_idempotency::{Idempotency, IdempotencyConfig, RedisStore};
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let idempotency = Idempotency::new(store, IdempotencyConfig::builder().build()?);
/// # let _ = idempotency; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    location: Arc<str>,
    acks: Option<ReplicaAcks>,
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

#[derive(Debug, Clone, Copy)]
struct ReplicaAcks {
    replicas: u32,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("location", &self.location)
            .field("replica_acks", &self.acks)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on one server: `redis://host:port/db` (`rediss://` for TLS needs
    /// the `redis` crate's TLS features in your build). Connects now, and
    /// reconnects by itself when the connection drops.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(backend)?;
        let info = client.get_connection_info();
        let location = format!("redis://{}/{}", info.addr(), info.redis_settings().db());
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2);
        let manager = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(backend)?;
        Ok(Self {
            connection: Connection::Single(manager),
            location: location.into(),
            acks: None,
        })
    }

    /// A store on a cluster (Redis Cluster, ElastiCache or MemoryDB in cluster
    /// mode), given the URLs of one or more of its nodes: the others are found
    /// from them.
    pub async fn connect_cluster<I>(urls: I) -> Result<Self, StoreError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let urls: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        let mut seeds: Vec<String> = urls
            .iter()
            .map(|url| {
                redis::Client::open(url.as_str())
                    .map(|c| c.get_connection_info().addr().to_string())
                    .map_err(backend)
            })
            .collect::<Result<_, _>>()?;
        seeds.sort();
        let client = redis::cluster::ClusterClientBuilder::new(urls)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .build()
            .map_err(backend)?;
        let connection = client.get_async_connection().await.map_err(backend)?;
        Ok(Self {
            connection: Connection::Cluster(connection),
            location: format!("redis-cluster://{}", seeds.join(",")).into(),
            acks: None,
        })
    }

    /// Waits after every write until `replicas` replicas have acknowledged it
    /// (`WAIT`), at most `timeout`. Fewer in time fail the write with a store
    /// error saying how many replicas acknowledged it, without sending it
    /// again: the write itself stays on the primary (a reservation made so
    /// holds the key until its deadline, then a retry resumes it; a completion
    /// made so is replayed).
    ///
    /// A failover then usually promotes a replica that has every acknowledged
    /// write, but Redis promotes replicas on a best-effort basis (`WAIT` is not
    /// a consensus protocol), so this makes a lost reservation less likely, not
    /// impossible. It costs the replicas' acknowledgement on every write
    /// (pipelined with the script on one server; a second request to the key's
    /// primary on a cluster), and `WAIT` holds the connection, which concurrent
    /// calls of this store share, until the replicas answer. A deployment
    /// without replicas fails every write.
    pub fn with_replica_acks(mut self, replicas: u32, timeout: Duration) -> Self {
        self.acks = (replicas > 0).then_some(ReplicaAcks { replicas, timeout });
        self
    }

    /// Runs `script` with `keys` (all in one hash slot) and `args`: retried on
    /// connection failures, loaded once when the server does not know it, and
    /// followed by `WAIT` for writes when replica acknowledgements are on.
    async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
        write: bool,
    ) -> Result<T, StoreError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        let acks = self.acks.filter(|_| write);
        let (mut attempt, mut loaded) = (0, false);
        loop {
            let result = match self.send::<T>(&cmd, keys.first().copied(), acks).await {
                // Not sent again: the write is on the primary, and the caller gave the
                // replicas this long.
                Err(Failure::Unacknowledged(short)) => {
                    return Err(StoreError::Backend(Box::new(short)))
                }
                Err(Failure::Redis(err)) => Err(err),
                Ok(value) => Ok(value),
            };
            match result {
                Err(err)
                    if !loaded && err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
                {
                    loaded = true;
                    let mut connection = self.connection.clone();
                    let loading = match &mut connection {
                        Connection::Single(c) => script.load_async(c).await,
                        Connection::Cluster(c) => script.load_async(c).await,
                    };
                    loading.map_err(backend)?;
                }
                Err(err) if retryable(&err) && attempt < RETRIES => {
                    attempt += 1;
                    tracing::debug!(error = %err, attempt, "Redis request failed on the connection; sending it again");
                    tokio::time::sleep(Duration::from_millis(25 << (2 * attempt))).await;
                }
                Err(err) => return Err(backend(err)),
                Ok(value) => return Ok(value),
            }
        }
    }

    /// Sends `cmd` once, with `WAIT` after it when `acks` asks for it.
    async fn send<T: FromRedisValue>(
        &self,
        cmd: &Cmd,
        key: Option<&str>,
        acks: Option<ReplicaAcks>,
    ) -> Result<T, Failure> {
        let mut connection = self.connection.clone();
        let Some(acks) = acks else {
            return Ok(match &mut connection {
                Connection::Single(c) => cmd.query_async(c).await?,
                Connection::Cluster(c) => cmd.query_async(c).await?,
            });
        };
        let timeout_ms = u64::try_from(acks.timeout.as_millis()).unwrap_or(u64::MAX);
        let mut wait = redis::cmd("WAIT");
        wait.arg(acks.replicas).arg(timeout_ms);
        let (value, acked): (T, u32) = match &mut connection {
            // One round trip: the script, then WAIT, on the same connection.
            Connection::Single(c) => {
                redis::pipe()
                    .add_command(cmd.clone())
                    .add_command(wait)
                    .query_async(c)
                    .await?
            }
            // WAIT on its own would go to every primary: send it to the one that
            // holds the key's slot, after the script.
            Connection::Cluster(c) => {
                let value: T = cmd.query_async(c).await?;
                let route = Route::with_key(key.unwrap_or_default(), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let acked = c.route_command(wait, routing).await?;
                (
                    value,
                    u32::from_redis_value(acked).map_err(RedisError::from)?,
                )
            }
        };
        if acked < acks.replicas {
            return Err(Failure::Unacknowledged(Unacknowledged { acked, acks }));
        }
        Ok(value)
    }

    /// A plain read (no script, never followed by `WAIT`), retried as writes are.
    async fn read<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            match self.send::<T>(cmd, None, None).await {
                Err(Failure::Redis(err)) if retryable(&err) && attempt < RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(25 << (2 * attempt))).await;
                }
                Err(Failure::Redis(err)) => return Err(backend(err)),
                Err(Failure::Unacknowledged(short)) => {
                    return Err(StoreError::Backend(Box::new(short)))
                }
                Ok(value) => return Ok(value),
            }
        }
    }

    /// The keys matching `pattern` on every primary: `SCAN` on each.
    async fn scan(&self, pattern: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        match &self.connection {
            Connection::Single(c) => {
                let mut c = c.clone();
                let mut cursor = 0u64;
                loop {
                    let mut cmd = redis::cmd("SCAN");
                    cmd.arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000);
                    let (next, batch): (u64, Vec<String>) =
                        cmd.query_async(&mut c).await.map_err(backend)?;
                    keys.extend(batch);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            Connection::Cluster(c) => {
                let mut c = c.clone();
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut c)
                    .await
                    .map_err(backend)?;
                for (host, port) in primaries(&nodes) {
                    let mut cursor = 0u64;
                    loop {
                        let mut cmd = redis::cmd("SCAN");
                        cmd.arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(1000);
                        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port,
                        });
                        let reply = c.route_command(cmd, routing).await.map_err(backend)?;
                        let (next, batch): (u64, Vec<String>) =
                            FromRedisValue::from_redis_value(reply)
                                .map_err(|e| StoreError::Backend(Box::new(e)))?;
                        keys.extend(batch);
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
            }
        }
        Ok(keys)
    }
}

/// Why a request of [`RedisStore::send`] failed.
enum Failure {
    Redis(RedisError),
    Unacknowledged(Unacknowledged),
}

impl From<RedisError> for Failure {
    fn from(err: RedisError) -> Self {
        Self::Redis(err)
    }
}

/// A write applied on the primary that fewer replicas than asked for
/// acknowledged within the timeout of
/// [`with_replica_acks`](RedisStore::with_replica_acks).
#[derive(Debug)]
struct Unacknowledged {
    acked: u32,
    acks: ReplicaAcks,
}

impl std::fmt::Display for Unacknowledged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "written on the Redis primary, but acknowledged by {} of {} replicas within {:?} \
             (WAIT): missing replicas, so a failover could lose the write",
            self.acked, self.acks.replicas, self.acks.timeout
        )
    }
}

impl std::error::Error for Unacknowledged {}

/// Whether a request may be sent again: it failed on the connection, so it may
/// or may not have been applied (the scripts are safe to repeat either way).
fn retryable(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_timeout()
        || err.is_connection_refusal()
}

fn backend(err: RedisError) -> StoreError {
    StoreError::Backend(Box::new(err))
}

/// `host`, `port` of every primary in `CLUSTER NODES` output.
fn primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?;
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                return None;
            }
            // `host:port@cport`, possibly `,hostname` after it.
            let address = fields.get(1)?.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// The Redis key of a journal entry or outbox message, whose engine key is
/// `{record key}#{execution}#{step|outbox}#{n}`: in its record's hash slot.
fn companion_key(engine_key: &str) -> Result<String, StoreError> {
    let mut parts = engine_key.rsplitn(4, '#');
    let (Some(n), Some(kind), Some(execution), Some(record)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(StoreError::Backend(
            format!("{engine_key:?} is not a journal or outbox key").into(),
        ));
    };
    let suffix = &engine_key[record.len()..];
    debug_assert_eq!(suffix, format!("#{execution}#{kind}#{n}"));
    if hash_tag(record).is_some() {
        // Its own tag decides the slot, and the companion keeps it.
        return Ok(engine_key.to_owned());
    }
    if record.contains('}') {
        return Err(StoreError::Backend(
            format!("the record key {record:?} cannot be given a hash tag: it holds a '}}'").into(),
        ));
    }
    Ok(format!("{{{record}}}{suffix}"))
}

/// The hash tag of `key` as Redis Cluster reads it: what is between the first
/// `{` and the first `}` after it, if not empty.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

/// A record as stored: Powertools for Python's field names, and ours.
#[derive(Serialize)]
struct Stored<'a> {
    status: &'a str,
    expiration: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    in_progress_expiration: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    validation: Option<&'a str>,
    owner: &'a str,
    execution: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    error: bool,
}

fn encode(record: &IdempotencyRecord) -> String {
    let stored = Stored {
        status: record.status.as_str(),
        expiration: record.expiration,
        in_progress_expiration: record.in_progress_expiration,
        data: record.data.as_deref(),
        validation: record.validation.as_deref(),
        owner: &record.owner,
        execution: &record.execution,
        error: record.is_error,
    };
    // A struct of strings, numbers and a bool always serializes.
    serde_json::to_string(&stored).unwrap_or_default()
}

/// Reads a stored record strictly: a value that is not a JSON object, a field
/// of the wrong type, a missing status or expiration is
/// [`StoreError::Malformed`] naming the key and the field, never a guess.
fn decode(key: &str, text: &str) -> Result<IdempotencyRecord, StoreError> {
    let malformed = |attribute: &str, problem: &str| StoreError::Malformed {
        key: key.to_owned(),
        attribute: attribute.to_owned(),
        problem: problem.to_owned(),
    };
    let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(text) else {
        return Err(malformed("(value)", "is not a JSON object"));
    };
    let string = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(malformed(name, "is not a string")),
    };
    let number = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| malformed(name, "is not an integer")),
        Some(_) => Err(malformed(name, "is not a number")),
    };
    let status = string("status")?.ok_or_else(|| malformed("status", "is missing"))?;
    let status = Status::parse(&status)
        .ok_or_else(|| malformed("status", "is not INPROGRESS or COMPLETED"))?;
    let data = string("data")?;
    if status == Status::Completed && data.is_none() {
        return Err(malformed("data", "is missing from a completed record"));
    }
    Ok(IdempotencyRecord {
        key: key.to_owned(),
        status,
        expiration: number("expiration")?.ok_or_else(|| malformed("expiration", "is missing"))?,
        in_progress_expiration: number("in_progress_expiration")?,
        data,
        validation: string("validation")?,
        // Records written by other tools (Powertools) have no owner and no
        // execution.
        owner: string("owner")?.unwrap_or_default(),
        execution: string("execution")?.unwrap_or_default(),
        is_error: match fields.get("error") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(malformed("error", "is not a boolean")),
        },
    })
}

impl IdempotencyStore for RedisStore {
    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let text: Option<String> = self.read(redis::cmd("GET").arg(key)).await?;
        text.map(|text| decode(key, &text)).transpose()
    }

    async fn reserve(
        &self,
        record: &IdempotencyRecord,
        now_ms: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let (value, now_ms, expiration) = (
            encode(record),
            now_ms.to_string(),
            record.expiration.to_string(),
        );
        let (written, old): (i64, Option<String>) = self
            .eval(
                &RESERVE,
                &[&record.key],
                &[&value, &now_ms, &expiration, &record.execution],
                true,
            )
            .await?;
        match (written, old) {
            // Read for the counts only: a replaced record that cannot be read must
            // not undo a reservation already made.
            (1, old) => Ok(old.and_then(|text| decode(&record.key, &text).ok())),
            (_, Some(text)) => Err(StoreError::Exists {
                existing: Some(Box::new(decode(&record.key, &text)?)),
            }),
            (_, None) => Err(StoreError::Exists { existing: None }),
        }
    }

    async fn complete(&self, record: &IdempotencyRecord) -> Result<(), StoreError> {
        self.commit_now(record, &[]).await
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        let released: i64 = self.eval(&RELEASE, &[key], &[owner], true).await?;
        match released {
            1 => Ok(()),
            _ => Err(StoreError::NotOwner),
        }
    }

    fn location(&self) -> String {
        self.location.to_string()
    }

    fn journal(&self) -> Option<&dyn StepJournal> {
        Some(self)
    }

    fn outbox(&self) -> Option<&dyn OutboxStore> {
        Some(self)
    }
}

impl RedisStore {
    /// The completed `record` and its `outbox`, in one script conditional on
    /// the record's owner.
    async fn commit_now(
        &self,
        record: &IdempotencyRecord,
        outbox: &[OutboxRecord],
    ) -> Result<(), StoreError> {
        let value = encode(record);
        let companions = outbox
            .iter()
            .map(|message| companion_key(&message.key))
            .collect::<Result<Vec<_>, _>>()?;
        let mut keys: Vec<&str> = vec![&record.key];
        keys.extend(companions.iter().map(String::as_str));
        let expiration = record.expiration.to_string();
        let mut args: Vec<&str> = vec![&record.owner, &value, &expiration];
        for message in outbox {
            args.extend([message.key.as_str(), &message.derived_key, &message.message]);
        }
        let written: i64 = self.eval(&COMPLETE, &keys, &args, true).await?;
        match written {
            1 => Ok(()),
            _ => Err(StoreError::NotOwner),
        }
    }
}

impl StepJournal for RedisStore {
    fn put_step<'a>(
        &'a self,
        step: &'a StepRecord,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>> {
        Box::pin(async move {
            let key = companion_key(&step.key)?;
            let expiration = step.expiration.to_string();
            let stored: Option<(String, String, i64)> = self
                .eval(
                    &PUT_STEP,
                    &[&key],
                    &[&step.name, &step.data, &expiration],
                    true,
                )
                .await?;
            Ok(stored
                .map(|(name, data, expiration)| StepRecord {
                    key: step.key.clone(),
                    name,
                    data,
                    expiration,
                })
                // Our own entry, found by a repeated request: written.
                .filter(|stored| stored != step))
        })
    }

    fn get_step<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>> {
        Box::pin(async move {
            let redis_key = companion_key(key)?;
            let (name, data, expiration): (Option<String>, Option<String>, Option<i64>) = self
                .read(
                    redis::cmd("HMGET")
                        .arg(&redis_key)
                        .arg("name")
                        .arg("data")
                        .arg("expiration"),
                )
                .await?;
            match (name, data, expiration) {
                (None, _, _) => Ok(None),
                (Some(name), Some(data), Some(expiration)) => Ok(Some(StepRecord {
                    key: key.to_owned(),
                    name,
                    data,
                    expiration,
                })),
                _ => Err(StoreError::Malformed {
                    key: key.to_owned(),
                    attribute: "data".into(),
                    problem: "is missing from a journal entry".into(),
                }),
            }
        })
    }
}

impl OutboxStore for RedisStore {
    fn commit<'a>(
        &'a self,
        record: &'a IdempotencyRecord,
        outbox: &'a [OutboxRecord],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.commit_now(record, outbox))
    }

    fn get_outbox<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<OutboxRecord>, StoreError>> {
        Box::pin(async move { self.outbox_record(&companion_key(key)?).await })
    }

    fn mark_delivered<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let redis_key = companion_key(key)?;
            let _marked: i64 = self.eval(&MARK_DELIVERED, &[&redis_key], &[], true).await?;
            Ok(())
        })
    }

    fn pending_outbox(&self) -> BoxFuture<'_, Result<Vec<OutboxRecord>, StoreError>> {
        Box::pin(async move {
            let mut pending = Vec::new();
            let keys = self.scan("*#outbox#*").await?;
            // A hundred reads at a time on the multiplexed connection, not a
            // round trip each. (Not one pipeline: on a cluster a pipeline must
            // stay in one slot.)
            for chunk in keys.chunks(100) {
                let reads = chunk.iter().map(|key| self.outbox_record(key));
                for message in futures_util::future::try_join_all(reads)
                    .await?
                    .into_iter()
                    .flatten()
                {
                    if !message.delivered {
                        pending.push(message);
                    }
                }
            }
            pending.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(pending)
        })
    }
}

impl RedisStore {
    /// The outbox message at `redis_key`, if it is there.
    async fn outbox_record(&self, redis_key: &str) -> Result<Option<OutboxRecord>, StoreError> {
        let fields = self.read(&outbox_fields(redis_key)).await?;
        outbox_from_fields(redis_key, fields)
    }
}

/// The read of an outbox message's fields.
fn outbox_fields(redis_key: &str) -> Cmd {
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(redis_key)
        .arg("key")
        .arg("derived_key")
        .arg("message")
        .arg("status")
        .arg("expiration");
    cmd
}

/// The outbox message those fields hold (`None`: no message there).
fn outbox_from_fields(
    redis_key: &str,
    fields: Vec<Option<String>>,
) -> Result<Option<OutboxRecord>, StoreError> {
    let malformed = |attribute: &str| StoreError::Malformed {
        key: redis_key.to_owned(),
        attribute: attribute.to_owned(),
        problem: "is missing or invalid in an outbox message".into(),
    };
    let mut fields = fields.into_iter();
    let mut next = || fields.next().flatten();
    let Some(key) = next() else {
        return Ok(None);
    };
    let derived_key = next().ok_or_else(|| malformed("derived_key"))?;
    let message = next().ok_or_else(|| malformed("message"))?;
    let delivered = match next().as_deref() {
        Some("PENDING") => false,
        Some("DELIVERED") => true,
        _ => return Err(malformed("status")),
    };
    let expiration = next()
        .and_then(|e| e.parse().ok())
        .ok_or_else(|| malformed("expiration"))?;
    Ok(Some(OutboxRecord {
        key,
        derived_key,
        message,
        delivered,
        expiration,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn companions_share_their_record_s_slot() {
        let key = "orders#2e00fdc3";
        let step = companion_key(&format!("{key}#a148e7#step#0")).expect("a step key");
        assert_eq!(step, "{orders#2e00fdc3}#a148e7#step#0");
        assert_eq!(hash_tag(&step), Some(key));
        // A record key with a tag of its own keeps it.
        let tagged = "{tenant-1}orders#2e00";
        let outbox = companion_key(&format!("{tagged}#e1#outbox#3")).expect("an outbox key");
        assert_eq!(hash_tag(&outbox), hash_tag(tagged));
        assert!(
            companion_key("orders}#2e#e1#step#0").is_err(),
            "no tag can be given"
        );
        assert!(companion_key("not-a-step").is_err());
    }

    #[test]
    fn records_read_back_as_written_and_foreign_ones_are_read_strictly() {
        let record = IdempotencyRecord {
            key: "orders#1".into(),
            status: Status::Completed,
            expiration: 1_900_000_000,
            in_progress_expiration: Some(1_900_000_000_123),
            data: Some(r#"{"ok":true}"#.into()),
            validation: Some("abc".into()),
            owner: "o".into(),
            execution: "e".into(),
            is_error: true,
        };
        assert_eq!(
            decode("orders#1", &encode(&record)).expect("decodes"),
            record
        );
        // As Powertools for Python writes a completed record.
        let python = r#"{"data": "{\"ok\": 1}", "status": "COMPLETED", "expiration": 1900000000}"#;
        let foreign = decode("orders#2", python).expect("a foreign record");
        assert_eq!(
            (foreign.owner.as_str(), foreign.execution.as_str()),
            ("", "")
        );
        for (text, attribute) in [
            ("not json", "(value)"),
            (r#"{"status": "INPROGRESS"}"#, "expiration"),
            (
                r#"{"status": "INPROGRESS", "expiration": "soon"}"#,
                "expiration",
            ),
            (r#"{"status": "DONE", "expiration": 1}"#, "status"),
            (r#"{"status": "COMPLETED", "expiration": 1}"#, "data"),
        ] {
            match decode("k", text) {
                Err(StoreError::Malformed { attribute: a, .. }) => {
                    assert_eq!(a, attribute, "{text}")
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn primaries_are_read_from_cluster_nodes() {
        let nodes = "\
07c3 127.0.0.1:7102@17102 master - 0 1 2 connected 5461-10922
67ed 127.0.0.1:7101@17101 myself,master - 0 0 1 connected 0-5460
2928 127.0.0.1:7104@17104 slave 67ed 0 1 1 connected
9bd0 127.0.0.1:7103@17103 master,fail - 0 1 3 disconnected";
        assert_eq!(
            primaries(nodes),
            [
                ("127.0.0.1".to_owned(), 7102),
                ("127.0.0.1".to_owned(), 7101)
            ]
        );
    }
}
