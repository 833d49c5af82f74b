use super::large::{Encoding, ObjectRef};
#[cfg(feature = "atomic-writes")]
use super::TransactionStore;
use super::{
    check_limits, sdk_detail, BoxFuture, IdempotencyStore, StepJournal, StepRecord, StoreError,
};
#[cfg(feature = "outbox")]
use super::{OutboxRecord, OutboxStore};
use crate::record::{IdempotencyRecord, Status};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
#[cfg(feature = "outbox")]
use aws_sdk_dynamodb::types::{Put, TransactWriteItem};
use aws_sdk_dynamodb::Client;
use std::collections::HashMap;

mod batch;

type Item = HashMap<String, AttributeValue>;

/// Attribute names of the idempotency table. The defaults match the AWS Lambda
/// Powertools table layout, plus `owner` (the fencing token) and `error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeNames {
    /// The idempotency key (partition key in [`KeyLayout::Simple`]). Default `id`.
    pub key: String,
    /// The TTL attribute, epoch seconds. Default `expiration`.
    pub expiration: String,
    /// In-progress expiry, epoch milliseconds. Default `in_progress_expiration`.
    pub in_progress_expiration: String,
    /// `INPROGRESS` or `COMPLETED`. Default `status`.
    pub status: String,
    /// The JSON response. Default `data`.
    pub data: String,
    /// The payload validation hash. Default `validation`.
    pub validation: String,
    /// The reservation's owner token. Default `owner`.
    pub owner: String,
    /// Present (`true`) when `data` holds a stored permanent error. Default `error`.
    pub error: String,
    /// A journaled step's name. Default `step`.
    pub step: String,
    /// An outbox message's derived idempotency key. Default `derived_key`.
    pub derived_key: String,
    /// The execution a record, step or message belongs to. Default `execution`.
    pub execution: String,
    /// How `data` holds a response too large for the item as JSON text: `gzip`
    /// (`data` is binary), `s3` or `s3+gzip` (`data` is an `s3://bucket/key`
    /// pointer); absent on every record that fits. Default `data_encoding`. See
    /// the guide's [large responses](crate::guide::large_responses) chapter.
    pub data_encoding: String,
}

impl Default for AttributeNames {
    fn default() -> Self {
        Self {
            key: "id".into(),
            expiration: "expiration".into(),
            in_progress_expiration: "in_progress_expiration".into(),
            status: "status".into(),
            data: "data".into(),
            validation: "validation".into(),
            owner: "owner".into(),
            error: "error".into(),
            step: "step".into(),
            derived_key: "derived_key".into(),
            execution: "execution".into(),
            data_encoding: "data_encoding".into(),
        }
    }
}

/// How the idempotency key maps onto the table's primary key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KeyLayout {
    /// The table's partition key is `AttributeNames::key` and holds the idempotency key.
    #[default]
    Simple,
    /// A shared table: a static partition value, the idempotency key in the sort key
    /// (`AttributeNames::key` names the sort key).
    Composite {
        /// Partition key attribute name.
        partition_key: String,
        /// The value every record of this store puts in the partition key.
        partition_value: String,
    },
}

/// Records in a DynamoDB table: one conditional `PutItem` to reserve, one to complete,
/// one conditional `DeleteItem` to release.
///
/// The table needs only its key schema; turn TTL on for the `expiration` attribute
/// so that DynamoDB deletes old records (expired records count as absent anyway).
///
/// A response whose record would exceed DynamoDB's 400 KB item limit is refused
/// ([`StoreError::TooLarge`]) unless the crate's `compress-responses` feature
/// stores it gzip-compressed (when that fits) or `s3-responses` with
/// `DynamoDbStore::with_response_bucket` stores it in S3; records
/// that fit are written the same way with or without them. Reads restore the
/// response's JSON text whatever its stored form (see the guide's
/// [large responses](crate::guide::large_responses) chapter).
///
/// ```
/// use lambda_idempotency::DynamoDbStore;
/// # fn f(client: aws_sdk_dynamodb::Client) {
/// // client: aws_sdk_dynamodb::Client::new(&aws_config::load_defaults(BehaviorVersion::latest()).await)
/// let store = DynamoDbStore::new(client, "idempotency");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct DynamoDbStore {
    client: Client,
    table: String,
    names: AttributeNames,
    layout: KeyLayout,
    #[cfg(feature = "s3-responses")]
    responses: Option<super::large::ResponseBucket>,
}

impl DynamoDbStore {
    /// A store on `table` with the default attribute names and a simple key.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            names: AttributeNames::default(),
            layout: KeyLayout::Simple,
            #[cfg(feature = "s3-responses")]
            responses: None,
        }
    }

    /// Stores responses too large for a record item, even compressed, in `bucket`
    /// (a claim check): the object is written first (one `PutObject`, under a key
    /// unique to the attempt: `{hash part of the record key}/{owner token}.json`,
    /// or `.json.gz` when compressing made it smaller), then the record, pointing
    /// at it (`data` = `s3://{bucket}/{key}`, `data_encoding` = `s3` or `s3+gzip`).
    /// A replay reads it back with one `GetObject`.
    ///
    /// Opt-in: without a bucket such a response is refused with
    /// [`StoreError::TooLarge`] (`IdempotencyError::ResponseTooLarge`). The
    /// function needs `s3:PutObject` and `s3:GetObject` on the bucket's objects
    /// (and `s3:ListBucket` on the bucket, so that a missing object answers
    /// `NoSuchKey` rather than `AccessDenied`). Give the bucket a lifecycle rule
    /// that expires objects no sooner than the records (`expires_after`, rounded
    /// up to whole days): objects of attempts that crashed before completing are
    /// referenced by no record and are left to it.
    /// A record whose object is gone before the record expired is read as
    /// [`StoreError::Malformed`] (the handler does not run; see the guide's
    /// [large responses](crate::guide::large_responses) chapter).
    ///
    /// ```
    /// use lambda_idempotency::DynamoDbStore;
    /// # fn f(dynamodb: aws_sdk_dynamodb::Client, s3: aws_sdk_s3::Client) {
    /// // Both clients from one aws_config::SdkConfig: Client::new(&sdk).
    /// let store = DynamoDbStore::new(dynamodb, "idempotency")
    ///     .with_response_bucket(s3, "my-idempotency-responses");
    /// # }
    /// ```
    #[cfg(feature = "s3-responses")]
    #[cfg_attr(docsrs, doc(cfg(feature = "s3-responses")))]
    pub fn with_response_bucket(
        mut self,
        client: aws_sdk_s3::Client,
        bucket: impl Into<String>,
    ) -> Self {
        self.responses = Some(super::large::ResponseBucket {
            client,
            bucket: bucket.into(),
        });
        self
    }

    /// Uses other attribute names.
    pub fn with_attribute_names(mut self, names: AttributeNames) -> Self {
        self.names = names;
        self
    }

    /// Uses another key layout (e.g. a composite key in a shared table).
    pub fn with_key_layout(mut self, layout: KeyLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The primary key of the record for `key`.
    fn primary_key(&self, key: &str) -> Item {
        let mut item = Item::new();
        item.insert(self.names.key.clone(), AttributeValue::S(key.to_owned()));
        if let KeyLayout::Composite {
            partition_key,
            partition_value,
        } = &self.layout
        {
            item.insert(
                partition_key.clone(),
                AttributeValue::S(partition_value.clone()),
            );
        }
        item
    }

    fn to_item(&self, record: &IdempotencyRecord) -> Item {
        let n = &self.names;
        let mut item = self.primary_key(&record.key);
        item.insert(
            n.status.clone(),
            AttributeValue::S(record.status.as_str().into()),
        );
        item.insert(
            n.expiration.clone(),
            AttributeValue::N(record.expiration.to_string()),
        );
        item.insert(n.owner.clone(), AttributeValue::S(record.owner.clone()));
        if let Some(at) = record.in_progress_expiration {
            item.insert(
                n.in_progress_expiration.clone(),
                AttributeValue::N(at.to_string()),
            );
        }
        if let Some(data) = &record.data {
            item.insert(n.data.clone(), AttributeValue::S(data.clone()));
        }
        if let Some(hash) = &record.validation {
            item.insert(n.validation.clone(), AttributeValue::S(hash.clone()));
        }
        if record.is_error {
            item.insert(n.error.clone(), AttributeValue::Bool(true));
        }
        if !record.execution.is_empty() {
            item.insert(
                n.execution.clone(),
                AttributeValue::S(record.execution.clone()),
            );
        }
        item
    }

    /// Reads a stored record strictly: a wrong type or a missing attribute is a
    /// [`StoreError::Malformed`] naming the key and the attribute, never a guess.
    /// A response stored in S3 comes back as its pointer, with `data` unset:
    /// [`resolve`](Self::resolve) reads it.
    fn parse_item(
        &self,
        key: &str,
        item: &Item,
    ) -> Result<(IdempotencyRecord, Option<ObjectRef>), StoreError> {
        let n = &self.names;
        let read = Attributes { key, item };
        let status = read.string(&n.status)?;
        let status = Status::parse(&status).ok_or_else(|| {
            read.malformed(
                &n.status,
                format!("is {status:?}, not INPROGRESS or COMPLETED"),
            )
        })?;
        let (data, object) = self.parse_data(&read)?;
        if status == Status::Completed && data.is_none() && object.is_none() {
            return Err(read.malformed(&n.data, "is missing from a completed record".into()));
        }
        let record = IdempotencyRecord {
            key: read.string(&n.key)?,
            status,
            expiration: read.number(&n.expiration)?,
            in_progress_expiration: read.optional_number(&n.in_progress_expiration)?,
            data,
            validation: read.optional_string(&n.validation)?,
            // Records written by other tools (e.g. Powertools) have no owner token
            // and no execution id.
            owner: read.optional_string(&n.owner)?.unwrap_or_default(),
            is_error: match item.get(&n.error) {
                None => false,
                Some(AttributeValue::Bool(b)) => *b,
                Some(_) => return Err(read.malformed(&n.error, "is not a boolean".into())),
            },
            execution: read.optional_string(&n.execution)?.unwrap_or_default(),
        };
        Ok((record, object))
    }

    /// The response as stored: JSON text (as Powertools writes it), or in one of
    /// the forms of a response too large for the item (`data_encoding`).
    fn parse_data(
        &self,
        read: &Attributes<'_>,
    ) -> Result<(Option<String>, Option<ObjectRef>), StoreError> {
        let n = &self.names;
        let Some(encoding) = read.optional_string(&n.data_encoding)? else {
            return Ok((read.optional_string(&n.data)?, None));
        };
        let encoding = Encoding::parse(&encoding).ok_or_else(|| {
            read.malformed(
                &n.data_encoding,
                format!("is {encoding:?}, not gzip, s3 or s3+gzip"),
            )
        })?;
        let stored = read.item.get(&n.data).ok_or_else(|| {
            read.malformed(
                &n.data,
                format!("is missing, but data_encoding is {}", encoding.as_str()),
            )
        })?;
        let unsupported = || {
            read.malformed(
                &n.data_encoding,
                format!(
                    "is {}, which this build reads only with the crate's {} feature",
                    encoding.as_str(),
                    encoding.feature()
                ),
            )
        };
        match (encoding, stored) {
            (Encoding::Gzip, AttributeValue::B(compressed)) => {
                #[cfg(feature = "compress-responses")]
                return super::large::gunzip(compressed.as_ref())
                    .map(|text| (Some(text), None))
                    .map_err(|problem| read.malformed(&n.data, problem.into()));
                #[cfg(not(feature = "compress-responses"))]
                {
                    let _ = compressed;
                    Err(unsupported())
                }
            }
            (Encoding::Gzip, _) => {
                Err(read.malformed(&n.data, "is not binary, but data_encoding is gzip".into()))
            }
            (Encoding::S3 | Encoding::S3Gzip, AttributeValue::S(pointer)) => {
                let object =
                    ObjectRef::parse(pointer, encoding == Encoding::S3Gzip).ok_or_else(|| {
                        read.malformed(
                            &n.data,
                            format!("is {pointer:?}, not an s3://bucket/key pointer"),
                        )
                    })?;
                if cfg!(feature = "s3-responses") {
                    Ok((None, Some(object)))
                } else {
                    Err(unsupported())
                }
            }
            (Encoding::S3 | Encoding::S3Gzip, _) => Err(read.malformed(
                &n.data,
                format!(
                    "is not a string, but data_encoding is {}",
                    encoding.as_str()
                ),
            )),
        }
    }

    /// A parsed record with its response in place: read from S3 when the record
    /// points there (one `GetObject`).
    async fn resolve(
        &self,
        (record, object): (IdempotencyRecord, Option<ObjectRef>),
    ) -> Result<IdempotencyRecord, StoreError> {
        let Some(object) = object else {
            return Ok(record);
        };
        #[cfg(feature = "s3-responses")]
        return self.read_object(record, object).await;
        #[cfg(not(feature = "s3-responses"))]
        {
            // parse_data refuses S3 pointers without the feature.
            let _ = object;
            Ok(record)
        }
    }

    /// The response of a record that points at S3 (one `GetObject`).
    #[cfg(feature = "s3-responses")]
    async fn read_object(
        &self,
        mut record: IdempotencyRecord,
        object: ObjectRef,
    ) -> Result<IdempotencyRecord, StoreError> {
        let bucket = self
            .responses
            .as_ref()
            .ok_or_else(|| super::large::no_bucket(&object))?;
        let malformed = |problem: String| StoreError::Malformed {
            key: record.key.clone(),
            attribute: self.names.data.clone(),
            problem,
        };
        match bucket.get(&object).await? {
            Some(body) if object.gzip => {
                let text = super::large::gunzip(&body).map_err(|problem| {
                    malformed(format!("points to {}, which {problem}", object.pointer()))
                })?;
                record.data = Some(text);
            }
            Some(body) => {
                let text = String::from_utf8(body).map_err(|_| {
                    malformed(format!(
                        "points to {}, which does not hold UTF-8 text",
                        object.pointer()
                    ))
                })?;
                record.data = Some(text);
            }
            // Gone with the bucket's lifecycle: no matter once the record has
            // expired too, as an expired record counts as absent.
            None if record.is_expired(crate::idempotency::now_ms()) => {}
            None => {
                return Err(malformed(format!(
                    "points to {}, which does not exist (deleted, or expired by the \
                     bucket's lifecycle rule before the record expired)",
                    object.pointer()
                )))
            }
        }
        Ok(record)
    }
}

/// Typed reads of one stored item, naming the item's key in every error.
struct Attributes<'a> {
    key: &'a str,
    item: &'a Item,
}

impl Attributes<'_> {
    fn malformed(&self, attribute: &str, problem: String) -> StoreError {
        StoreError::Malformed {
            key: self.key.to_owned(),
            attribute: attribute.to_owned(),
            problem,
        }
    }

    fn optional_string(&self, name: &str) -> Result<Option<String>, StoreError> {
        match self.item.get(name) {
            None => Ok(None),
            Some(AttributeValue::S(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.malformed(name, "is not a string".into())),
        }
    }

    fn optional_number(&self, name: &str) -> Result<Option<i64>, StoreError> {
        match self.item.get(name) {
            None => Ok(None),
            Some(AttributeValue::N(n)) => n
                .parse()
                .map(Some)
                .map_err(|_| self.malformed(name, format!("is {n}, not an integer"))),
            Some(_) => Err(self.malformed(name, "is not a number".into())),
        }
    }

    fn string(&self, name: &str) -> Result<String, StoreError> {
        self.optional_string(name)?
            .ok_or_else(|| self.malformed(name, "is missing".into()))
    }

    fn number(&self, name: &str) -> Result<i64, StoreError> {
        self.optional_number(name)?
            .ok_or_else(|| self.malformed(name, "is missing".into()))
    }
}

/// A failed DynamoDB request, with the service's error code and message in its
/// text (the SDK's own `Display` says only "service error").
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB {operation} failed: {detail}")]
struct DynamoDbError {
    operation: &'static str,
    detail: String,
    #[source]
    source: aws_sdk_dynamodb::error::BoxError,
}

fn backend<E, R>(operation: &'static str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    StoreError::Backend(Box::new(DynamoDbError {
        operation,
        detail: sdk_detail(&err),
        source: err.into(),
    }))
}

/// Turns an SDK error into a store error, keeping the conditional failure apart:
/// `Ok(old item)` when the condition failed (the item, when DynamoDB returned it).
fn classify<E, R>(
    operation: &'static str,
    err: SdkError<E, R>,
    conditional_failure: impl FnOnce(&E) -> Option<Option<&Item>>,
) -> Result<Option<Item>, StoreError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    if let Some(old) = err.as_service_error().and_then(conditional_failure) {
        return Ok(old.cloned());
    }
    Err(backend(operation, err))
}

impl IdempotencyStore for DynamoDbStore {
    async fn reserve(
        &self,
        record: &IdempotencyRecord,
        now_ms: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let n = &self.names;
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(self.to_item(record)))
            // IdempotencyRecord::may_be_replaced_by, as a condition. Only an item
            // with a numeric `expiration` is ever replaced: one without (written by
            // something else) never expires, as TTL never deletes it, and is no
            // record to take over; refused, it comes back and is reported malformed.
            .condition_expression(
                "attribute_not_exists(#id) OR (attribute_type(#exp, :number) AND (#exp < :now \
                 OR (#status = :inprogress AND #ipexp < :now_ms \
                 AND (attribute_not_exists(#exec) OR #exec = :exec))))",
            )
            .expression_attribute_names("#id", &n.key)
            .expression_attribute_names("#exec", &n.execution)
            .expression_attribute_values(":exec", AttributeValue::S(record.execution.clone()))
            .expression_attribute_names("#exp", &n.expiration)
            .expression_attribute_values(":number", AttributeValue::S("N".into()))
            .expression_attribute_names("#status", &n.status)
            .expression_attribute_names("#ipexp", &n.in_progress_expiration)
            .expression_attribute_values(
                ":now",
                AttributeValue::N(now_ms.div_euclid(1000).to_string()),
            )
            .expression_attribute_values(":now_ms", AttributeValue::N(now_ms.to_string()))
            .expression_attribute_values(
                ":inprogress",
                AttributeValue::S(Status::InProgress.as_str().into()),
            )
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            // The record replaced (expired, or abandoned), if any: the same request.
            .return_values(ReturnValue::AllOld)
            .send()
            .await;
        match result {
            // Read for the counts only: a replaced record we cannot parse must not
            // undo a reservation already made.
            Ok(output) => Ok(output
                .attributes
                .filter(|item| !item.is_empty())
                .and_then(|item| self.parse_item(&record.key, &item).ok())
                // Its response is not needed: an S3 one is not fetched.
                .map(|(replaced, _)| replaced)),
            Err(err) => {
                let old = classify("PutItem (reserve)", err, |e| {
                    e.is_conditional_check_failed_exception().then(|| match e {
                        aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c) => c.item(),
                        _ => None,
                    })
                })?;
                let existing = match old {
                    Some(item) => Some(Box::new(
                        self.resolve(self.parse_item(&record.key, &item)?).await?,
                    )),
                    None => None,
                };
                Err(StoreError::Exists { existing })
            }
        }
    }

    async fn complete(&self, record: &IdempotencyRecord) -> Result<(), StoreError> {
        let item = self.record_item(record, &[]).await?;
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#owner", &self.names.owner)
            .expression_attribute_values(":owner", AttributeValue::S(record.owner.clone()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) => {
                classify("PutItem (complete)", err, |e| {
                    e.is_conditional_check_failed_exception().then_some(None)
                })?;
                Err(StoreError::NotOwner)
            }
        }
    }

    async fn release(&self, key: &str, owner: &str) -> Result<(), StoreError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(self.primary_key(key)))
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#owner", &self.names.owner)
            .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) => {
                let old = classify("DeleteItem (release)", err, |e| {
                    match e {
                    aws_sdk_dynamodb::operation::delete_item::DeleteItemError::ConditionalCheckFailedException(c) => Some(c.item()),
                    _ => None,
                }
                })?;
                // No item: already deleted (a retried delete whose first response was lost).
                match old {
                    Some(item) if !item.is_empty() => Err(StoreError::NotOwner),
                    _ => Ok(()),
                }
            }
        }
    }

    /// `INSERT`s, 25 to a `BatchExecuteStatement`; the records in the way read
    /// in one `BatchGetItem` (see the module `batch`).
    async fn reserve_batch(
        &self,
        records: &[IdempotencyRecord],
        now_ms: i64,
    ) -> Vec<Result<Option<IdempotencyRecord>, StoreError>> {
        self.reserve_statements(records, now_ms).await
    }

    /// Conditional `UPDATE`s, 25 to a `BatchExecuteStatement`.
    async fn complete_batch(&self, records: &[IdempotencyRecord]) -> Vec<Result<(), StoreError>> {
        self.complete_statements(records).await
    }

    /// Conditional `DELETE`s, 25 to a `BatchExecuteStatement`.
    async fn release_batch(
        &self,
        reservations: &[(String, String)],
    ) -> Vec<Result<(), StoreError>> {
        self.release_statements(reservations).await
    }

    async fn get(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        match self.get_item(key).await? {
            Some(item) => self.resolve(self.parse_item(key, &item)?).await.map(Some),
            None => Ok(None),
        }
    }

    /// The table (by name: a table's ARN names the same records) and, in a
    /// shared table, the partition.
    fn location(&self) -> String {
        let table = self
            .table
            .rsplit_once(":table/")
            .map_or(self.table.as_str(), |(_, name)| name);
        match &self.layout {
            KeyLayout::Simple => format!("dynamodb:{table}"),
            KeyLayout::Composite {
                partition_key,
                partition_value,
            } => format!("dynamodb:{table}:{partition_key}={partition_value}"),
        }
    }

    // `#[inline]` on the methods below that box an SDK future, and on the
    // coercions to `dyn`: a non-generic function boxing the future instantiates the
    // SDK's orchestrator (its futures are only instantiated where polled) in this
    // crate, a second copy next to the one the application's crate instantiates for
    // `IdempotencyStore`'s futures (some 250 KB). Inline, they are instantiated
    // where they are used: in the application's crate, with the rest.
    #[inline]
    fn journal(&self) -> Option<&dyn StepJournal> {
        Some(self)
    }

    #[cfg(feature = "outbox")]
    #[inline]
    fn outbox(&self) -> Option<&dyn OutboxStore> {
        Some(self)
    }

    #[cfg(feature = "atomic-writes")]
    #[inline]
    fn transactions(&self) -> Option<&dyn TransactionStore> {
        Some(self)
    }
}

impl StepJournal for DynamoDbStore {
    #[inline]
    fn put_step<'a>(
        &'a self,
        step: &'a StepRecord,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>> {
        Box::pin(self.put_step_item(step))
    }

    #[inline]
    fn get_step<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<StepRecord>, StoreError>> {
        Box::pin(async move {
            match self.get_item(key).await? {
                Some(item) => self.parse_step(key, &item).map(Some),
                None => Ok(None),
            }
        })
    }
}

#[cfg(feature = "outbox")]
impl OutboxStore for DynamoDbStore {
    #[inline]
    fn commit<'a>(
        &'a self,
        record: &'a IdempotencyRecord,
        outbox: &'a [OutboxRecord],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.commit_with_outbox(record, outbox, &[]))
    }

    #[inline]
    fn get_outbox<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<OutboxRecord>, StoreError>> {
        Box::pin(async move {
            match self.get_item(key).await? {
                Some(item) => self.parse_outbox(key, &item).map(Some),
                None => Ok(None),
            }
        })
    }

    #[inline]
    fn mark_delivered<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.mark_delivered_item(key))
    }

    #[inline]
    fn pending_outbox(&self) -> BoxFuture<'_, Result<Vec<OutboxRecord>, StoreError>> {
        Box::pin(self.scan_pending_outbox())
    }
}

#[cfg(feature = "atomic-writes")]
impl TransactionStore for DynamoDbStore {
    #[inline]
    fn commit_transaction<'a>(
        &'a self,
        record: &'a IdempotencyRecord,
        outbox: &'a [OutboxRecord],
        writes: &'a [TransactWriteItem],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.commit_with_outbox(record, outbox, writes))
    }

    #[inline]
    fn commit_writes<'a>(
        &'a self,
        writes: &'a [TransactWriteItem],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.transact_writes(writes))
    }
}

/// The size DynamoDB counts for an item: attribute names and values in UTF-8
/// bytes, binary values in bytes; a number takes at most 21 bytes and a boolean 1.
fn item_bytes(item: &Item) -> usize {
    item.iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    AttributeValue::S(s) => s.len(),
                    AttributeValue::B(b) => b.as_ref().len(),
                    AttributeValue::N(_) => 21,
                    _ => 1,
                }
        })
        .sum()
}

/// The indexes of the items whose conditions failed, when DynamoDB cancelled the
/// transaction for them.
#[cfg(feature = "outbox")]
fn failed_conditions<R>(
    err: &SdkError<aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError, R>,
) -> Vec<usize> {
    use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
    match err.as_service_error() {
        Some(TransactWriteItemsError::TransactionCanceledException(c)) => c
            .cancellation_reasons()
            .iter()
            .enumerate()
            .filter(|(_, r)| r.code() == Some("ConditionalCheckFailed"))
            .map(|(i, _)| i)
            .collect(),
        _ => Vec::new(),
    }
}

/// An upper bound of the size a staged write adds to a transaction: its item
/// (or key), its expressions and their names and values.
#[cfg(feature = "outbox")]
fn write_bytes(write: &TransactWriteItem) -> usize {
    let expressions =
        |names: Option<&HashMap<String, String>>, values: Option<&Item>, texts: &[Option<&str>]| {
            names.map_or(0, |n| n.iter().map(|(k, v)| k.len() + v.len()).sum())
                + values.map_or(0, item_bytes)
                + texts.iter().flatten().map(|t| t.len()).sum::<usize>()
        };
    let put = write.put().map_or(0, |p| {
        item_bytes(p.item())
            + expressions(
                p.expression_attribute_names(),
                p.expression_attribute_values(),
                &[p.condition_expression()],
            )
    });
    let update = write.update().map_or(0, |u| {
        item_bytes(u.key())
            + expressions(
                u.expression_attribute_names(),
                u.expression_attribute_values(),
                &[Some(u.update_expression()), u.condition_expression()],
            )
    });
    let delete = write.delete().map_or(0, |d| {
        item_bytes(d.key())
            + expressions(
                d.expression_attribute_names(),
                d.expression_attribute_values(),
                &[d.condition_expression()],
            )
    });
    let check = write.condition_check().map_or(0, |c| {
        item_bytes(c.key())
            + expressions(
                c.expression_attribute_names(),
                c.expression_attribute_values(),
                &[Some(c.condition_expression())],
            )
    });
    put + update + delete + check
}

impl DynamoDbStore {
    /// The item a completing write stores for `record`, next to outbox items of
    /// `outbox_sizes` bytes in the same transaction: the record as JSON text when
    /// the write fits DynamoDB's limits (as without the features), else its
    /// response gzip-compressed (`compress-responses`), else in S3
    /// (`s3-responses` and a bucket; the object is written here, before the
    /// record). When no form fits: the [`StoreError::TooLarge`] of the record as
    /// text, so the error reports the response's own size.
    async fn record_item(
        &self,
        record: &IdempotencyRecord,
        outbox_sizes: &[usize],
    ) -> Result<Item, StoreError> {
        #[cfg_attr(not(feature = "compress-responses"), allow(unused_mut))]
        let mut item = self.to_item(record);
        let too_large = match check_limits(item_bytes(&item), outbox_sizes.iter().copied()) {
            Ok(()) => return Ok(item),
            Err(err) => err,
        };
        #[cfg(feature = "compress-responses")]
        if let Some(text) = &record.data {
            let n = &self.names;
            let compressed = super::large::gzip(text.as_bytes());
            item.insert(
                n.data_encoding.clone(),
                AttributeValue::S(Encoding::Gzip.as_str().into()),
            );
            item.insert(
                n.data.clone(),
                AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(compressed)),
            );
            if check_limits(item_bytes(&item), outbox_sizes.iter().copied()).is_ok() {
                return Ok(item);
            }
            #[cfg(feature = "s3-responses")]
            if let Some(bucket) = &self.responses {
                let compressed = match item.remove(&n.data) {
                    Some(AttributeValue::B(blob)) => blob.into_inner(),
                    _ => Vec::new(),
                };
                let gzip = compressed.len() < text.len();
                let object = ObjectRef {
                    bucket: bucket.bucket.clone(),
                    key: super::large::object_key(&record.key, &record.owner, gzip),
                    gzip,
                };
                let encoding = if gzip { Encoding::S3Gzip } else { Encoding::S3 };
                item.insert(
                    n.data_encoding.clone(),
                    AttributeValue::S(encoding.as_str().into()),
                );
                item.insert(n.data.clone(), AttributeValue::S(object.pointer()));
                // Checked before the object is written: a write refused anyway
                // leaves nothing behind.
                if check_limits(item_bytes(&item), outbox_sizes.iter().copied()).is_ok() {
                    let body = if gzip {
                        compressed
                    } else {
                        text.as_bytes().to_vec()
                    };
                    bucket.put(&object, body).await?;
                    return Ok(item);
                }
            }
        }
        Err(too_large)
    }
}

/// `status` values of journal and outbox items (records use `INPROGRESS`/`COMPLETED`).
const STEP: &str = "STEP";
#[cfg(feature = "outbox")]
const PENDING: &str = "PENDING";
#[cfg(feature = "outbox")]
const DELIVERED: &str = "DELIVERED";

impl DynamoDbStore {
    async fn put_step_item(&self, step: &StepRecord) -> Result<Option<StepRecord>, StoreError> {
        let n = &self.names;
        let mut item = self.primary_key(&step.key);
        item.insert(n.status.clone(), AttributeValue::S(STEP.into()));
        item.insert(n.step.clone(), AttributeValue::S(step.name.clone()));
        item.insert(n.data.clone(), AttributeValue::S(step.data.clone()));
        item.insert(
            n.expiration.clone(),
            AttributeValue::N(step.expiration.to_string()),
        );
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#id)")
            .expression_attribute_names("#id", &n.key)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(None),
            // Journaled already: by a late attempt of this execution, or by this very
            // write when its first response was lost. The first entry wins.
            Err(err) => {
                let old = classify("PutItem (journal step)", err, |e| {
                    match e {
                    aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c) => Some(c.item()),
                    _ => None,
                }
                })?;
                let journaled = match old {
                    Some(item) => self.parse_step(&step.key, &item)?,
                    None => return Ok(None),
                };
                Ok((&journaled != step).then_some(journaled))
            }
        }
    }

    fn parse_step(&self, key: &str, item: &Item) -> Result<StepRecord, StoreError> {
        let n = &self.names;
        let read = Attributes { key, item };
        Ok(StepRecord {
            key: key.to_owned(),
            name: read.string(&n.step)?,
            data: read.string(&n.data)?,
            expiration: read.number(&n.expiration)?,
        })
    }

    async fn get_item(&self, key: &str) -> Result<Option<Item>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.primary_key(key)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| backend("GetItem", e))?;
        Ok(output.item().cloned())
    }
}

#[cfg(feature = "outbox")]
impl DynamoDbStore {
    async fn mark_delivered_item(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.primary_key(key)))
            .update_expression("SET #status = :delivered")
            .condition_expression("attribute_exists(#status)")
            .expression_attribute_names("#status", &self.names.status)
            .expression_attribute_values(":delivered", AttributeValue::S(DELIVERED.into()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| backend("UpdateItem (mark delivered)", e))
    }

    async fn scan_pending_outbox(&self) -> Result<Vec<OutboxRecord>, StoreError> {
        let mut pending = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .filter_expression("#status = :pending")
                .expression_attribute_names("#status", &self.names.status)
                .expression_attribute_values(":pending", AttributeValue::S(PENDING.into()))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| backend("Scan (pending outbox)", e))?;
            for item in page.items() {
                if self.is_own(item) {
                    let key = Attributes { key: "", item }.string(&self.names.key)?;
                    pending.push(self.parse_outbox(&key, item)?);
                }
            }
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        pending.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(pending)
    }

    /// The completed record, the outbox messages and the staged `writes` (feature
    /// `atomic-writes`; empty otherwise) in one transaction, the record
    /// conditional on our ownership: all written or none.
    async fn commit_with_outbox(
        &self,
        record: &IdempotencyRecord,
        outbox: &[OutboxRecord],
        writes: &[TransactWriteItem],
    ) -> Result<(), StoreError> {
        if outbox.is_empty() && writes.is_empty() {
            return self.complete(record).await;
        }
        let outbox_items: Vec<Item> = outbox.iter().map(|m| self.outbox_item(m)).collect();
        let mut sizes: Vec<usize> = outbox_items.iter().map(item_bytes).collect();
        sizes.extend(writes.iter().map(write_bytes));
        let record_item = self.record_item(record, &sizes).await?;
        let put = |item: Item| Put::builder().table_name(&self.table).set_item(Some(item));
        let owned = put(record_item)
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#owner", &self.names.owner)
            .expression_attribute_values(":owner", AttributeValue::S(record.owner.clone()));
        let mut items = vec![owned];
        items.extend(outbox_items.into_iter().map(put));
        let mut items = items
            .into_iter()
            .map(|put| {
                put.build()
                    .map(|p| TransactWriteItem::builder().put(p).build())
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Backend(e.into()))?;
        items.extend(writes.iter().cloned());
        // Business writes need not be idempotent (`ADD stock :minus_one`): an SDK
        // retry of a transaction whose response was lost must not apply them
        // again. DynamoDB answers a repeated token (for 10 minutes) without
        // writing. One token per attempt and number of writes: the commit
        // retried without already-current versioned writes gets its own.
        let token = (!writes.is_empty()).then(|| {
            let material = serde_json::json!([record.key, record.owner, writes.len()]);
            crate::key::hash_value(&material)[..36].to_owned()
        });
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .set_client_request_token(token)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) => {
                // Which conditions failed, by index: the record's (the first item)
                // means another owner holds the key; the staged writes' come after
                // the record and the outbox (whose puts have no condition).
                let failed = failed_conditions(&err);
                let first_write = 1 + outbox.len();
                match failed.first() {
                    Some(0) => Err(StoreError::NotOwner),
                    #[cfg(feature = "atomic-writes")]
                    Some(_) if failed.iter().all(|&i| i >= first_write) => {
                        Err(StoreError::WriteConditionFailed {
                            indexes: failed.iter().map(|i| i - first_write).collect(),
                        })
                    }
                    _ => {
                        let _ = first_write;
                        Err(backend("TransactWriteItems (complete with outbox)", err))
                    }
                }
            }
        }
    }

    /// Staged writes alone in one transaction (an unprotected call).
    #[cfg(feature = "atomic-writes")]
    async fn transact_writes(&self, writes: &[TransactWriteItem]) -> Result<(), StoreError> {
        let mut sizes = writes.iter().map(write_bytes);
        check_limits(sizes.next().unwrap_or_default(), sizes)?;
        if writes.is_empty() {
            return Ok(());
        }
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(writes.to_vec()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) => match failed_conditions(&err) {
                indexes if !indexes.is_empty() => Err(StoreError::WriteConditionFailed { indexes }),
                _ => Err(backend("TransactWriteItems (staged writes)", err)),
            },
        }
    }

    fn outbox_item(&self, record: &OutboxRecord) -> Item {
        let n = &self.names;
        let mut item = self.primary_key(&record.key);
        let status = if record.delivered { DELIVERED } else { PENDING };
        item.insert(n.status.clone(), AttributeValue::S(status.into()));
        item.insert(
            n.derived_key.clone(),
            AttributeValue::S(record.derived_key.clone()),
        );
        item.insert(n.data.clone(), AttributeValue::S(record.message.clone()));
        item.insert(
            n.expiration.clone(),
            AttributeValue::N(record.expiration.to_string()),
        );
        item
    }

    fn parse_outbox(&self, key: &str, item: &Item) -> Result<OutboxRecord, StoreError> {
        let n = &self.names;
        let read = Attributes { key, item };
        Ok(OutboxRecord {
            key: key.to_owned(),
            derived_key: read.string(&n.derived_key)?,
            message: read.string(&n.data)?,
            delivered: read.string(&n.status)? == DELIVERED,
            expiration: read.number(&n.expiration)?,
        })
    }

    /// Whether a scanned item belongs to this store (composite layout: its partition).
    fn is_own(&self, item: &Item) -> bool {
        match &self.layout {
            KeyLayout::Simple => true,
            KeyLayout::Composite {
                partition_key,
                partition_value,
            } => item.get(partition_key).and_then(|v| v.as_s().ok()) == Some(partition_value),
        }
    }
}

/// Listing records, for operators (the `idempotency` command-line tool).
impl DynamoDbStore {
    /// Every idempotency record of the store, or only those with `status`: a
    /// consistent `Scan` of the whole table, page by page (it reads every item,
    /// so it is for operators, not for handlers; IAM action `Scan`). Records are
    /// returned in key order, expired ones included (check
    /// [`IdempotencyRecord::is_expired`]).
    ///
    /// Journal steps and outbox messages share the table but are not records:
    /// they are told apart by their `status` (`STEP`, `PENDING`, `DELIVERED`) and
    /// skipped. Every other item is read as strictly as [`get`](IdempotencyStore::get)
    /// reads one, so an item that is not a valid record (unknown or missing status,
    /// a wrong attribute type) fails the listing with [`StoreError::Malformed`]
    /// naming its key, rather than being left out unseen. In a
    /// [`KeyLayout::Composite`] table only this store's partition is listed.
    ///
    /// ```no_run
    /// # async fn f(store: lambda_idempotency::DynamoDbStore) -> Result<(), lambda_idempotency::store::StoreError> {
    /// use lambda_idempotency::Status;
    /// for record in store.scan_records(Some(Status::InProgress)).await? {
    ///     println!("{} reserved by {}", record.key, record.owner);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn scan_records(
        &self,
        status: Option<Status>,
    ) -> Result<Vec<IdempotencyRecord>, StoreError> {
        let n = &self.names;
        let mut records = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let request = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .expression_attribute_names("#status", &n.status)
                .set_exclusive_start_key(start);
            let request = match status {
                Some(status) => request
                    .filter_expression("#status = :status")
                    .expression_attribute_values(
                        ":status",
                        AttributeValue::S(status.as_str().into()),
                    ),
                // Journal and outbox items (`STEP`; the outbox's `PENDING` and
                // `DELIVERED`, whose constants exist only with `outbox`) are not
                // records. An item without a status passes (`IN` is false on a
                // missing attribute) and is reported malformed below.
                None => request
                    .filter_expression("NOT (#status IN (:step, :pending, :delivered))")
                    .expression_attribute_values(":step", AttributeValue::S(STEP.into()))
                    .expression_attribute_values(":pending", AttributeValue::S("PENDING".into()))
                    .expression_attribute_values(
                        ":delivered",
                        AttributeValue::S("DELIVERED".into()),
                    ),
            };
            let page = request
                .send()
                .await
                .map_err(|e| backend("Scan (records)", e))?;
            for item in page.items() {
                let own = match &self.layout {
                    KeyLayout::Simple => true,
                    KeyLayout::Composite {
                        partition_key,
                        partition_value,
                    } => {
                        item.get(partition_key).and_then(|v| v.as_s().ok()) == Some(partition_value)
                    }
                };
                if own {
                    let key = Attributes { key: "", item }.string(&n.key)?;
                    records.push(self.resolve(self.parse_item(&key, item)?).await?);
                }
            }
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        records.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(records)
    }
}

// The feature-off reading is all there is to test here without DynamoDB; the
// store's requests are tested against LocalStack (tests-integration).
#[cfg(all(test, not(feature = "compress-responses")))]
mod tests {
    use super::*;

    /// A store whose client is never called: these tests read items only.
    fn offline_store() -> DynamoDbStore {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            // No async sleep without the SDK's runtime features: nothing that waits.
            .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
            .timeout_config(aws_sdk_dynamodb::config::timeout::TimeoutConfig::disabled())
            .stalled_stream_protection(
                aws_sdk_dynamodb::config::StalledStreamProtectionConfig::disabled(),
            )
            .identity_cache(aws_sdk_dynamodb::config::IdentityCache::no_cache())
            .build();
        DynamoDbStore::new(Client::from_conf(config), "idempotency")
    }

    /// A build without `compress-responses` meets a record another function
    /// stored compressed: a malformed record naming the feature, never a guess
    /// (the engine then neither runs the handler nor touches the item).
    #[test]
    fn a_compressed_record_needs_the_feature_to_be_read() {
        let item: Item = HashMap::from([
            ("id".into(), AttributeValue::S("orders#gz-1".into())),
            ("status".into(), AttributeValue::S("COMPLETED".into())),
            ("expiration".into(), AttributeValue::N("4102444800".into())),
            ("data_encoding".into(), AttributeValue::S("gzip".into())),
            (
                "data".into(),
                AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(
                    b"\x1f\x8b".to_vec(),
                )),
            ),
        ]);
        match offline_store().parse_item("orders#gz-1", &item) {
            Err(StoreError::Malformed {
                key,
                attribute,
                problem,
            }) => {
                assert_eq!(key, "orders#gz-1");
                assert_eq!(attribute, "data_encoding");
                assert!(problem.contains("compress-responses"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
    }
}
