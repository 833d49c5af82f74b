//! What an [`Idempotency`](crate::Idempotency) does: key selection, validation,
//! expiry, caching. Built once, checked when built.

use crate::key::{JsonPath, DEFAULT_MAX_INFLATED_BYTES};
use crate::record::IdempotencyRecord;
use serde::Serialize;
use serde_json::Value;
use std::any::Any;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

/// A configuration that cannot work, found when it is built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A JMESPath expression does not compile, calls an unknown function, or
    /// needs a feature that is off (named in `reason`).
    #[error("invalid {role} expression {expression:?}: {reason}")]
    InvalidExpression {
        /// `key` or `payload validation`.
        role: &'static str,
        /// The expression as given.
        expression: String,
        /// The parser's message.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// A second, different handler was wrapped with a key prefix another handler
    /// already has: the two would share every record, and one would replay the
    /// other's responses. Under the default prefix (no `key_prefix`) the other
    /// handler may have been wrapped by any `Idempotency` of the process over the
    /// same store location. Name them apart with `wrap_as`, or give each its own
    /// `key_prefix`.
    #[error("key prefix {prefix:?} is already used by another wrapped handler; name each handler with `wrap_as(name, ..)` or give it its own `key_prefix`")]
    SharedKeyPrefix {
        /// The prefix both handlers would use.
        prefix: String,
    },
}

pub(crate) type KeyClosure = dyn Fn(&dyn Any) -> Option<Result<Value, String>> + Send + Sync;
type ReplayHook = dyn Fn(&Value, &IdempotencyRecord) + Send + Sync;

/// How key material is taken from the event.
#[derive(Clone)]
pub(crate) enum KeySource {
    /// The whole event.
    Event,
    Expression(JsonPath),
    /// A typed closure; `None` when called with another event type.
    Closure {
        f: Arc<KeyClosure>,
        event_type: &'static str,
    },
}

impl KeySource {
    pub(crate) fn describe(&self) -> &str {
        match self {
            KeySource::Event => "@",
            KeySource::Expression(path) => path.as_str(),
            KeySource::Closure { .. } => "closure",
        }
    }
}

/// How key material and validation fields become the hashes in a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum KeyHash {
    /// SHA-256 of this crate's canonical JSON (the guide's [keys](crate::guide::keys) chapter).
    #[default]
    Canonical,
    /// Powertools for Python's hash of `json.dumps(material, sort_keys=True)`.
    #[cfg(feature = "powertools-compat")]
    PowertoolsPython(crate::PowertoolsHash),
}

impl KeyHash {
    /// Key material that cannot identify an event.
    pub(crate) fn is_missing(self, material: &Value) -> bool {
        match self {
            KeyHash::Canonical => crate::key::is_missing(material),
            #[cfg(feature = "powertools-compat")]
            KeyHash::PowertoolsPython(_) => crate::key::powertools::is_missing(material),
        }
    }

    /// The hash stored in a record's key (after `{prefix}#`) or validation.
    pub(crate) fn hash(self, value: &Value) -> String {
        match self {
            KeyHash::Canonical => crate::key::hash_value(value),
            #[cfg(feature = "powertools-compat")]
            KeyHash::PowertoolsPython(function) => function.hash_value(value),
        }
    }
}

/// Settings of an [`Idempotency`](crate::Idempotency). Build one with
/// [`IdempotencyConfig::builder`].
#[derive(Clone)]
pub struct IdempotencyConfig {
    pub(crate) key: KeySource,
    pub(crate) validation: Option<JsonPath>,
    pub(crate) strict: bool,
    pub(crate) expires_after: Duration,
    pub(crate) in_progress_timeout: Duration,
    /// How long a call that finds its key in progress waits for the first call;
    /// `None`: it is refused at once.
    pub(crate) wait_for_in_progress: Option<Duration>,
    pub(crate) key_prefix: Option<String>,
    pub(crate) local_cache: Option<NonZeroUsize>,
    pub(crate) replay_permanent_errors: bool,
    pub(crate) disabled: bool,
    pub(crate) observe_only: bool,
    /// Whether SQS and stream batches reserve and complete their records in
    /// batched requests.
    pub(crate) batch_requests: bool,
    pub(crate) metrics: bool,
    pub(crate) on_replay: Option<Arc<ReplayHook>>,
    pub(crate) max_inflated_bytes: usize,
    pub(crate) key_hash: KeyHash,
    /// What the key and validation expressions read from embedded documents.
    pub(crate) embedded_fields: Arc<[String]>,
}

impl std::fmt::Debug for IdempotencyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyConfig")
            .field("key", &self.key.describe())
            .field("validation", &self.validation)
            .field("strict", &self.strict)
            .field("expires_after", &self.expires_after)
            .field("in_progress_timeout", &self.in_progress_timeout)
            .field("wait_for_in_progress", &self.wait_for_in_progress)
            .field("key_prefix", &self.key_prefix)
            .field("local_cache", &self.local_cache)
            .field("replay_permanent_errors", &self.replay_permanent_errors)
            .field("disabled", &self.disabled)
            .field("observe_only", &self.observe_only)
            .field("batch_requests", &self.batch_requests)
            .field("metrics", &self.metrics)
            .field("max_inflated_bytes", &self.max_inflated_bytes)
            .field("key_hash", &self.key_hash)
            .finish_non_exhaustive()
    }
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            key: KeySource::Event,
            validation: None,
            strict: false,
            expires_after: Duration::from_secs(3600),
            in_progress_timeout: Duration::from_secs(900),
            wait_for_in_progress: None,
            key_prefix: None,
            local_cache: None,
            replay_permanent_errors: false,
            disabled: disabled_by(|name| std::env::var(name).ok()),
            observe_only: env_flag("IDEMPOTENCY_OBSERVE_ONLY"),
            batch_requests: true,
            metrics: !env_flag("IDEMPOTENCY_METRICS_DISABLED"),
            on_replay: None,
            max_inflated_bytes: DEFAULT_MAX_INFLATED_BYTES,
            key_hash: KeyHash::Canonical,
            embedded_fields: Arc::new([]),
        }
    }
}

/// `IDEMPOTENCY_DISABLED` (or Powertools' `POWERTOOLS_IDEMPOTENCY_DISABLED`) set to
/// `true`/`1` turns the layer off, for local runs and tests of handler logic.
pub(crate) fn disabled_by(env: impl Fn(&str) -> Option<String>) -> bool {
    ["IDEMPOTENCY_DISABLED", "POWERTOOLS_IDEMPOTENCY_DISABLED"]
        .iter()
        .filter_map(|name| env(name))
        .any(|v| truthy(&v))
}

fn truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "true" | "1" | "yes"
    )
}

/// Whether the environment variable `name` is set to `true`, `1` or `yes`.
fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| truthy(&v))
}

impl IdempotencyConfig {
    /// A builder with the defaults: the whole event is the key, records last one
    /// hour, no validation, no local cache, lenient about missing keys.
    pub fn builder() -> IdempotencyConfigBuilder {
        IdempotencyConfigBuilder {
            config: IdempotencyConfig::default(),
            key_expression: None,
            validation_expression: None,
        }
    }
}

/// Builds an [`IdempotencyConfig`]; [`build`](Self::build) compiles the expressions.
///
/// ```
/// use lambda_idempotency::IdempotencyConfig;
/// use std::time::Duration;
///
/// let config = IdempotencyConfig::builder()
///     .key_expression("powertools_json(body).order_id")
///     .payload_validation("powertools_json(body).amount")
///     .expires_after(Duration::from_secs(24 * 3600))
///     .local_cache(1024)
///     .build()
///     .expect("valid config");
/// # let _ = config;
/// assert!(IdempotencyConfig::builder().key_expression("body.[").build().is_err());
/// ```
#[must_use]
pub struct IdempotencyConfigBuilder {
    config: IdempotencyConfig,
    key_expression: Option<String>,
    validation_expression: Option<String>,
}

impl std::fmt::Debug for IdempotencyConfigBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyConfigBuilder")
            .field("config", &self.config)
            .field("key_expression", &self.key_expression)
            .field("validation_expression", &self.validation_expression)
            .finish()
    }
}

impl IdempotencyConfigBuilder {
    /// Selects the key material with a JMESPath expression over the event's JSON.
    /// The Powertools functions `powertools_json`, `powertools_base64` and
    /// `powertools_base64_gzip` (feature `gzip`) are available. By default an
    /// expression is made of fields, sub-expressions (`a.b`), indexes,
    /// multi-selects (`[a, b]`, `{x: a}`), `@`, `||` and parentheses; the rest of
    /// JMESPath needs the feature `jmespath`, its standard functions
    /// `jmespath-functions`. An expression that needs a feature is refused by
    /// [`build`](Self::build), which names it.
    pub fn key_expression(mut self, expression: impl Into<String>) -> Self {
        self.key_expression = Some(expression.into());
        self
    }

    /// Selects the key material with a typed closure over the event. The wrapped
    /// handler's event type must be `T`; a call with another type fails with
    /// [`IdempotencyError::InvalidEvent`](crate::IdempotencyError::InvalidEvent).
    pub fn key_fn<T, K, F>(mut self, f: F) -> Self
    where
        T: 'static,
        K: Serialize,
        F: Fn(&T) -> K + Send + Sync + 'static,
    {
        self.key_expression = None;
        self.config.key = KeySource::Closure {
            f: Arc::new(move |event: &dyn Any| {
                event
                    .downcast_ref::<T>()
                    .map(|e| serde_json::to_value(f(e)).map_err(|err| err.to_string()))
            }),
            event_type: std::any::type_name::<T>(),
        };
        self
    }

    /// Fields (a JMESPath expression) that must be equal when a key is seen again;
    /// otherwise the call fails with
    /// [`PayloadMismatch`](crate::IdempotencyError::PayloadMismatch).
    pub fn payload_validation(mut self, expression: impl Into<String>) -> Self {
        self.validation_expression = Some(expression.into());
        self
    }

    /// Fail with [`MissingKey`](crate::IdempotencyError::MissingKey) when the key
    /// material is empty, instead of running the handler unprotected with a warning
    /// (steps run every time with keys unique to the call, outbox messages go
    /// straight to the dispatcher, duplicates run twice).
    pub fn strict(mut self, strict: bool) -> Self {
        self.config.strict = strict;
        self
    }

    /// How long a completed record is replayed. Default one hour.
    pub fn expires_after(mut self, ttl: Duration) -> Self {
        self.config.expires_after = ttl;
        self
    }

    /// How long a reservation lasts when there is no Lambda `Context` to take the
    /// deadline from. Default 900 s, Lambda's longest timeout.
    pub fn in_progress_timeout(mut self, timeout: Duration) -> Self {
        self.config.in_progress_timeout = timeout;
        self
    }

    /// What a call does when it finds its key in progress (a duplicate arriving
    /// while the first call still runs): by default it is refused at once with
    /// [`IdempotencyError::AlreadyInProgress`](crate::IdempotencyError::AlreadyInProgress);
    /// with a maximum, it waits for the first call to finish, then
    ///
    /// - replays the first call's response (or stored permanent error), as any
    ///   replay, if it completed;
    /// - reserves and runs, as a first call would, if the first released the key
    ///   (its handler failed);
    /// - takes over, resuming the first call's execution, if the first passed its
    ///   deadline (it crashed or timed out);
    /// - is refused with `AlreadyInProgress` as before if `max` passes first.
    ///
    /// It never waits past its own Lambda deadline minus one second. A duplicate in
    /// this execution environment (a clone of the service under `run_concurrent`,
    /// a call of the same [`Idempotency`](crate::Idempotency)) is woken when the
    /// first call lands, with no store request, or at the first call's deadline
    /// if it is still running then (stalled: taken over as above); if its own
    /// wait ends first, one reservation attempt decides, as without waiting (the
    /// call it waited for may be a duplicate too, slow in the store). One in
    /// another execution environment polls the store with consistent reads,
    /// 50 ms after its refused reservation and then twice as long each time up
    /// to one second (the guide's getting started chapter, "Duplicates that
    /// wait").
    /// `Duration::ZERO` refuses at once, the default.
    pub fn wait_for_in_progress(mut self, max: Duration) -> Self {
        self.config.wait_for_in_progress = (!max.is_zero()).then_some(max);
        self
    }

    /// The key prefix, in place of the function's name (`AWS_LAMBDA_FUNCTION_NAME`,
    /// or `local`). Set it to keep keys when the function is renamed, or to share
    /// records between functions on purpose.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.key_prefix = Some(prefix.into());
        self
    }

    /// Keep up to `capacity` completed records in this execution environment, so
    /// that a replay served from it costs no request. Off by default.
    pub fn local_cache(mut self, capacity: usize) -> Self {
        self.config.local_cache = NonZeroUsize::new(capacity);
        self
    }

    /// Store [`PermanentError`](crate::PermanentError)s returned by the handler and
    /// replay them like responses. Off by default.
    pub fn replay_permanent_errors(mut self, on: bool) -> Self {
        self.config.replay_permanent_errors = on;
        self
    }

    /// Bypass the store entirely: every call runs the handler. Steps still run (not
    /// journaled, with keys unique to the call) and outbox messages are delivered
    /// by the dispatcher after the handler succeeds (lost without one). Defaults to
    /// the `IDEMPOTENCY_DISABLED` / `POWERTOOLS_IDEMPOTENCY_DISABLED` environment
    /// variables.
    pub fn disabled(mut self, disabled: bool) -> Self {
        self.config.disabled = disabled;
        self
    }

    /// Observe only: reserve and record exactly as when enforcing, but always run
    /// the handler and return its own result. What enforcing would have done
    /// instead (replay, refuse a duplicate in progress or a different payload,
    /// fail on a store error) is counted and logged at INFO, never acted on. A
    /// duplicate runs unprotected: its steps run directly and its outbox goes to
    /// the dispatcher. Switching to enforcing later uses the records written while
    /// observing. Defaults to the `IDEMPOTENCY_OBSERVE_ONLY` environment variable,
    /// so a deployed function changes mode with its configuration.
    pub fn observe_only(mut self, observe: bool) -> Self {
        self.config.observe_only = observe;
        self
    }

    /// Batched store requests for SQS and stream batches (on by default): the
    /// records of a batch are reserved in one request before they run and their
    /// completions written in one request after (on DynamoDB, 25 records to a
    /// request), so that a batch of 10 new records costs 2 requests, not 20.
    /// Off, each record reserves and completes alone, as a single invocation
    /// does. Observe-only mode never batches. See the guide's
    /// [event sources](crate::guide::event_sources) chapter for what a crash
    /// between the two requests costs.
    pub fn batch_requests(mut self, on: bool) -> Self {
        self.config.batch_requests = on;
        self
    }

    /// Count outcomes through the `metrics` facade (with the `metrics` feature).
    /// On by default; off when the `IDEMPOTENCY_METRICS_DISABLED` environment
    /// variable is `true`.
    pub fn metrics(mut self, on: bool) -> Self {
        self.config.metrics = on;
        self
    }

    /// Called with the response and the record whenever a stored response is replayed.
    pub fn on_replay(
        mut self,
        hook: impl Fn(&Value, &IdempotencyRecord) + Send + Sync + 'static,
    ) -> Self {
        self.config.on_replay = Some(Arc::new(hook));
        self
    }

    /// The most bytes `powertools_base64_gzip` may inflate a value to, in the key
    /// and payload validation expressions. Default 6 MiB (6,291,456 bytes), Lambda's
    /// synchronous payload limit. An event over it fails with
    /// [`InvalidEvent`](crate::IdempotencyError::InvalidEvent) naming the limit,
    /// before inflating more than one byte past it: gzip inflates up to about
    /// 1000:1, so an unbounded 339 KiB event costs 256 MiB and seconds of CPU.
    pub fn max_inflated_bytes(mut self, limit: usize) -> Self {
        self.config.max_inflated_bytes = limit;
        self
    }

    /// Derive record ids and validation hashes exactly as AWS Lambda Powertools for
    /// Python does, so that a Python function and its Rust port can share one
    /// table while both run, each replaying the other's records: the hash is
    /// `hash` (Powertools' `hash_function`, `md5` by default) of Python's
    /// `json.dumps(material, sort_keys=True)`, and key material counts as missing
    /// when Powertools says so (also a list or object of nulls only).
    ///
    /// The record id is `{prefix}#{hash}`, and Powertools' prefix is
    /// `{function name}.{module}.{qualname}` of the decorated Python function
    /// (or its own `key_prefix`): give that text with [`key_prefix`](Self::key_prefix)
    /// and wrap with `wrap` (not `wrap_as`, which appends the name). See the guide's
    /// [migrating from Powertools](crate::guide::migrating_from_powertools) chapter.
    ///
    /// ```
    /// use lambda_idempotency::{IdempotencyConfig, PowertoolsHash};
    ///
    /// // Python: @idempotent(config=IdempotencyConfig(event_key_jmespath="order_id"), ...)
    /// //         def lambda_handler(event, context) in app.py of the function orders-py
    /// let config = IdempotencyConfig::builder()
    ///     .key_expression("order_id")
    ///     .key_prefix("orders-py.app.lambda_handler")
    ///     .powertools_python_keys(PowertoolsHash::Md5)
    ///     .build()
    ///     .expect("valid config");
    /// # let _ = config;
    /// ```
    #[cfg(feature = "powertools-compat")]
    pub fn powertools_python_keys(mut self, hash: crate::PowertoolsHash) -> Self {
        self.config.key_hash = KeyHash::PowertoolsPython(hash);
        self
    }

    /// Checks and compiles the configuration.
    pub fn build(mut self) -> Result<IdempotencyConfig, ConfigError> {
        if self.config.max_inflated_bytes == 0 {
            return Err(ConfigError::InvalidSetting(
                "max_inflated_bytes must be positive".into(),
            ));
        }
        let max_inflated_bytes = self.config.max_inflated_bytes;
        let compile = |role, expression: String| {
            JsonPath::compile(&expression)
                .map(|path| path.with_max_inflated_bytes(max_inflated_bytes))
                .map_err(|reason| ConfigError::InvalidExpression {
                    role,
                    expression,
                    reason,
                })
        };
        if let Some(expression) = self.key_expression {
            self.config.key = KeySource::Expression(compile("key", expression)?);
        }
        if let Some(expression) = self.validation_expression {
            self.config.validation = Some(compile("payload validation", expression)?);
        }
        if self.config.expires_after.is_zero() {
            return Err(ConfigError::InvalidSetting(
                "expires_after must be positive".into(),
            ));
        }
        if self.config.in_progress_timeout.is_zero() {
            return Err(ConfigError::InvalidSetting(
                "in_progress_timeout must be positive".into(),
            ));
        }
        let key_path = match &self.config.key {
            KeySource::Expression(path) => Some(path),
            _ => None,
        };
        let paths: Vec<&JsonPath> = key_path
            .into_iter()
            .chain(&self.config.validation)
            .collect();
        self.config.embedded_fields = crate::key::embedded_fields(&paths);
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_expressions_are_rejected_at_build() {
        let err = IdempotencyConfig::builder()
            .key_expression("a.[")
            .build()
            .expect_err("syntax");
        assert!(
            matches!(err, ConfigError::InvalidExpression { role: "key", .. }),
            "{err}"
        );
        let err = IdempotencyConfig::builder()
            .payload_validation("nope(a)")
            .build()
            .expect_err("function");
        assert!(
            matches!(
                err,
                ConfigError::InvalidExpression {
                    role: "payload validation",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn an_expression_needing_a_feature_names_it_at_build() {
        let built = IdempotencyConfig::builder()
            .key_expression("orders[*].id")
            .build();
        #[cfg(not(feature = "jmespath"))]
        {
            let err = built.expect_err("projections need the feature");
            assert!(err.to_string().contains("`jmespath`"), "{err}");
        }
        #[cfg(feature = "jmespath")]
        built.expect("full JMESPath");
        let err = IdempotencyConfig::builder()
            .payload_validation("length(items)")
            .build()
            .map(|_| ())
            .err()
            .map(|err| err.to_string());
        match cfg!(feature = "jmespath-functions") {
            true => assert_eq!(err, None),
            false => assert!(err.is_some_and(|e| e.contains("`jmespath-functions`"))),
        }
    }

    #[test]
    fn zero_durations_are_rejected() {
        assert!(IdempotencyConfig::builder()
            .expires_after(Duration::ZERO)
            .build()
            .is_err());
        assert!(IdempotencyConfig::builder()
            .in_progress_timeout(Duration::ZERO)
            .build()
            .is_err());
    }

    #[test]
    fn the_inflation_limit_is_positive_and_shown() {
        let err = IdempotencyConfig::builder()
            .max_inflated_bytes(0)
            .build()
            .expect_err("zero");
        assert!(matches!(err, ConfigError::InvalidSetting(_)), "{err}");
        let config = IdempotencyConfig::builder()
            .max_inflated_bytes(1024)
            .build()
            .expect("valid");
        assert!(format!("{config:?}").contains("max_inflated_bytes: 1024"));
    }

    #[test]
    fn disable_switch_reads_both_variable_names() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(disabled_by(env(&[("IDEMPOTENCY_DISABLED", "true")])));
        assert!(disabled_by(env(&[(
            "POWERTOOLS_IDEMPOTENCY_DISABLED",
            "1"
        )])));
        assert!(!disabled_by(env(&[("IDEMPOTENCY_DISABLED", "false")])));
        assert!(!disabled_by(env(&[])));
    }
}
