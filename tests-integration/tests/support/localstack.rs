//! The LocalStack side of the integration tests: a real SDK client pointed at the
//! endpoint that `scripts/test.sh` ensured, a request recorder, and fresh tables.

#![allow(dead_code)] // each test binary and bench uses a part

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Credentials, Intercept, Region, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".to_owned())
}

/// The DynamoDB operations a client sent, in order (one entry per HTTP request),
/// each with the [`CALLER`](super::CALLER) that sent it.
#[derive(Clone, Default, Debug)]
pub struct Requests(Arc<Mutex<Vec<(&'static str, String)>>>);

impl Requests {
    pub fn take(&self) -> Vec<String> {
        self.take_all().into_iter().map(|(_, op)| op).collect()
    }
    /// Takes every request, and returns those `caller` sent.
    pub fn take_of(&self, caller: &str) -> Vec<String> {
        self.take_all()
            .into_iter()
            .filter(|(by, _)| *by == caller)
            .map(|(_, op)| op)
            .collect()
    }
    fn take_all(&self) -> Vec<(&'static str, String)> {
        std::mem::take(&mut *self.0.lock().expect("requests lock"))
    }
    pub fn count(&self) -> usize {
        self.0.lock().expect("requests lock").len()
    }
}

#[derive(Debug)]
struct Recorder(Requests);

impl Intercept for Recorder {
    fn name(&self) -> &'static str {
        "Recorder"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let target = context
            .request()
            .headers()
            .get("x-amz-target")
            .unwrap_or("unknown");
        let operation = target.rsplit('.').next().unwrap_or(target).to_owned();
        // The SDK runs interceptors in the future that sends the request, so
        // the sending task's caller is the one in scope here.
        let caller = super::caller();
        self.0
             .0
            .lock()
            .expect("requests lock")
            .push((caller, operation));
        Ok(())
    }
}

fn config() -> aws_sdk_dynamodb::config::Builder {
    aws_sdk_dynamodb::config::Builder::new()
        .behavior_version_latest()
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(endpoint())
}

/// A plain client, for setting up and reading tables back.
pub fn client() -> Client {
    Client::from_conf(config().build())
}

/// A client whose requests are recorded.
pub fn recorded_client() -> (Client, Requests) {
    let requests = Requests::default();
    let client = Client::from_conf(config().interceptor(Recorder(requests.clone())).build());
    (client, requests)
}

/// Another client (another execution environment's) whose requests are
/// recorded in `requests` too.
pub fn client_recorded_in(requests: &Requests) -> Client {
    Client::from_conf(config().interceptor(Recorder(requests.clone())).build())
}

/// A client whose requests are recorded, with one more interceptor after the
/// recorder (e.g. one that fails a chosen operation).
pub fn recorded_client_with(extra: impl Intercept + 'static) -> (Client, Requests) {
    let requests = Requests::default();
    let client = Client::from_conf(
        config()
            .interceptor(Recorder(requests.clone()))
            .interceptor(extra)
            .build(),
    );
    (client, requests)
}

/// A unique table name for one test.
pub fn table_name(test: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "idem-{test}-{}-{}",
        super::now_ms(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates a table keyed on `hash` (and `range`, if given), TTL on `ttl`, and
/// waits until it is active.
pub async fn create_table(client: &Client, name: &str, hash: &str, range: Option<&str>, ttl: &str) {
    let mut request = client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attribute(hash))
        .key_schema(key(hash, KeyType::Hash));
    if let Some(range) = range {
        request = request
            .attribute_definitions(attribute(range))
            .key_schema(key(range, KeyType::Range));
    }
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("create table {name} at {}: {e:?}", endpoint()));
    for _ in 0..100 {
        let described = client
            .describe_table()
            .table_name(name)
            .send()
            .await
            .expect("describe table");
        if described.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    client
        .update_time_to_live()
        .table_name(name)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name(ttl)
                .build()
                .expect("ttl spec"),
        )
        .send()
        .await
        .expect("enable TTL");
}

/// A table with the default layout: partition key `id`.
pub async fn default_table(test: &str) -> String {
    let name = table_name(test);
    create_table(&client(), &name, "id", None, "expiration").await;
    name
}

fn attribute(name: &str) -> AttributeDefinition {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .expect("attribute definition")
}

fn key(name: &str, key_type: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(key_type)
        .build()
        .expect("key schema")
}

/// Every item of `table` (a consistent scan of one page: tests' tables are small).
pub async fn scan(table: &str) -> Vec<std::collections::HashMap<String, AttributeValue>> {
    client()
        .scan()
        .table_name(table)
        .consistent_read(true)
        .send()
        .await
        .expect("scan")
        .items()
        .to_vec()
}

/// The `S` attribute `name` of `item`.
pub fn s<'a>(item: &'a std::collections::HashMap<String, AttributeValue>, name: &str) -> &'a str {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .unwrap_or_else(|| panic!("{name} is not an S attribute in {item:?}"))
}
