//! A batch's records in a few requests: reservations as PartiQL `INSERT`s,
//! completions as conditional `UPDATE`s and releases as conditional `DELETE`s,
//! up to 25 per `BatchExecuteStatement`, each statement answering for itself.
//!
//! Why these statements: `BatchWriteItem` has no conditions, and
//! `TransactWriteItems` fails every write when one condition fails (a batch with
//! one completed record would reserve nothing). A PartiQL batch applies each
//! statement on its own and reports each failure apart.
//!
//! What a statement cannot say is left to the single-record operations, whose
//! SDK calls retry as usual:
//!
//! - `INSERT` writes only where no item is, so it cannot take over an expired or
//!   abandoned record; and a refused `INSERT` (`DuplicateItem`) does not bring
//!   back the item in the way, whatever `ReturnValuesOnConditionCheckFailure`
//!   says (DynamoDB Local, which LocalStack runs, answers so too). The refused
//!   records are read in one consistent `BatchGetItem`; the engine then
//!   replays, waits, refuses or reserves each alone, as the record read says.
//! - A statement that failed for another reason (throttled, a conflict, an
//!   internal error) is sent again as its single-record operation.
//! - A completion whose item is over the limit of an item goes alone, so that
//!   it is compressed or moved to S3 as usual.

use super::{backend, item_bytes, DynamoDbStore, Item};
use crate::record::IdempotencyRecord;
use crate::store::{check_limits, IdempotencyStore, StoreError};
use aws_sdk_dynamodb::types::{
    AttributeValue, BatchStatementErrorCodeEnum, BatchStatementRequest, BatchStatementResponse,
    KeysAndAttributes, ReturnValuesOnConditionCheckFailure,
};
use futures_util::future::join_all;

/// Statements in one `BatchExecuteStatement` (DynamoDB's limit).
const STATEMENTS: usize = 25;
/// Keys in one `BatchGetItem` (DynamoDB's limit).
const READS: usize = 100;

/// How one statement of a batch ended.
enum Answer {
    Applied,
    /// Its condition failed; the item in the way when DynamoDB returned it.
    Refused(Option<Item>),
    /// Anything else: the statement goes again alone.
    Failed,
}

impl Answer {
    fn of(response: &BatchStatementResponse) -> Self {
        let Some(error) = response.error() else {
            return Self::Applied;
        };
        match error.code() {
            Some(BatchStatementErrorCodeEnum::ConditionalCheckFailed)
            | Some(BatchStatementErrorCodeEnum::DuplicateItem) => {
                Self::Refused(error.item().filter(|item| !item.is_empty()).cloned())
            }
            _ => Self::Failed,
        }
    }
}

/// A PartiQL identifier: the table's or an attribute's name, double-quoted.
fn identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A PartiQL string literal: an attribute's name in an `INSERT`'s tuple.
fn literal(name: &str) -> String {
    format!("'{}'", name.replace('\'', "''"))
}

impl DynamoDbStore {
    /// The table as PartiQL names it: by name. A store made with a table's ARN
    /// writes one record at a time.
    fn partiql_table(&self) -> Option<String> {
        (!self.table.contains(':')).then(|| identifier(&self.table))
    }

    /// Sends `statements` in batches of 25, at once; one answer per statement,
    /// in order. A batch that failed as a whole (after the SDK's retries) fails
    /// each of its statements with the error's text.
    async fn execute_batches(
        &self,
        operation: &'static str,
        statements: Vec<BatchStatementRequest>,
    ) -> Vec<Result<Answer, StoreError>> {
        let chunks = statements.chunks(STATEMENTS).map(|chunk| async move {
            let sent = self
                .client
                .batch_execute_statement()
                .set_statements(Some(chunk.to_vec()))
                .send()
                .await;
            match sent {
                Ok(output) if output.responses().len() == chunk.len() => output
                    .responses()
                    .iter()
                    .map(|r| Ok(Answer::of(r)))
                    .collect(),
                Ok(_) => chunk.iter().map(|_| Ok(Answer::Failed)).collect(),
                Err(err) => {
                    let err = backend(operation, err);
                    let text = err.to_string();
                    std::iter::once(Err(err))
                        .chain(
                            (1..chunk.len()).map(|_| Err(StoreError::Backend(text.clone().into()))),
                        )
                        .collect::<Vec<_>>()
                }
            }
        });
        join_all(chunks).await.into_iter().flatten().collect()
    }

    fn statement(text: String, parameters: Vec<AttributeValue>) -> BatchStatementRequest {
        BatchStatementRequest::builder()
            .statement(text)
            .set_parameters(Some(parameters))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .expect("the statement is set")
    }

    /// `WHERE` on the record's primary key and its owner token.
    fn owned_by(&self, key: &str, owner: &str, parameters: &mut Vec<AttributeValue>) -> String {
        let mut clause = Vec::new();
        for (name, value) in self.primary_key(key) {
            clause.push(format!("{} = ?", identifier(&name)));
            parameters.push(value);
        }
        clause.push(format!("{} = ?", identifier(&self.names.owner)));
        parameters.push(AttributeValue::S(owner.to_owned()));
        format!(" WHERE {}", clause.join(" AND "))
    }

    pub(super) async fn reserve_statements(
        &self,
        records: &[IdempotencyRecord],
        now_ms: i64,
    ) -> Vec<Result<Option<IdempotencyRecord>, StoreError>> {
        let Some(table) = self.partiql_table().filter(|_| records.len() > 1) else {
            return self.one_by_one_reserve(records, now_ms).await;
        };
        let statements = records
            .iter()
            .map(|record| {
                let (names, values): (Vec<_>, Vec<_>) = self
                    .to_item(record)
                    .into_iter()
                    .map(|(name, value)| (format!("{}: ?", literal(&name)), value))
                    .unzip();
                let text = format!("INSERT INTO {table} VALUE {{{}}}", names.join(", "));
                Self::statement(text, values)
            })
            .collect();
        let answers = self
            .execute_batches("BatchExecuteStatement (reserve)", statements)
            .await;

        let mut results: Vec<Option<Result<Option<IdempotencyRecord>, StoreError>>> =
            Vec::with_capacity(records.len());
        let mut unread = Vec::new();
        let mut again = Vec::new();
        for (index, (record, answer)) in records.iter().zip(answers).enumerate() {
            results.push(match answer {
                Ok(Answer::Applied) => Some(Ok(None)),
                Ok(Answer::Refused(Some(item))) => Some(self.in_the_way(&record.key, &item).await),
                Ok(Answer::Refused(None)) => {
                    unread.push(index);
                    None
                }
                Ok(Answer::Failed) => {
                    again.push(index);
                    None
                }
                Err(err) => Some(Err(err)),
            });
        }
        let keys: Vec<&str> = unread.iter().map(|&i| records[i].key.as_str()).collect();
        let mut read = self.read_batch(&keys).await;
        for index in unread {
            results[index] = Some(match read.remove(&records[index].key) {
                Some(Ok(item)) => self.in_the_way(&records[index].key, &item).await,
                Some(Err(err)) => Err(err),
                // Gone since: the engine reads it again, then reserves it alone.
                None => Err(StoreError::Exists { existing: None }),
            });
        }
        for index in again {
            results[index] = Some(self.reserve(&records[index], now_ms).await);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(StoreError::Exists { existing: None })))
            .collect()
    }

    async fn one_by_one_reserve(
        &self,
        records: &[IdempotencyRecord],
        now_ms: i64,
    ) -> Vec<Result<Option<IdempotencyRecord>, StoreError>> {
        let mut answers = Vec::with_capacity(records.len());
        for record in records {
            answers.push(self.reserve(record, now_ms).await);
        }
        answers
    }

    /// The refusal of a reservation by the record in the way.
    async fn in_the_way(
        &self,
        key: &str,
        item: &Item,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let existing = self.resolve(self.parse_item(key, item)?).await?;
        Err(StoreError::Exists {
            existing: Some(Box::new(existing)),
        })
    }

    /// The items under `keys`, by key, read consistently; an item absent is
    /// absent from the map. Keys DynamoDB left unprocessed are asked for again
    /// (three times at most), then read one by one.
    async fn read_batch(
        &self,
        keys: &[&str],
    ) -> std::collections::HashMap<String, Result<Item, StoreError>> {
        let mut found = std::collections::HashMap::new();
        for chunk in keys.chunks(READS) {
            let mut pending: Vec<Item> = chunk.iter().map(|key| self.primary_key(key)).collect();
            for _ in 0..3 {
                if pending.is_empty() {
                    break;
                }
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(std::mem::take(&mut pending)))
                    .consistent_read(true)
                    .build()
                    .expect("keys are set");
                let output = match self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, request.clone())
                    .send()
                    .await
                {
                    Ok(output) => output,
                    Err(err) => {
                        let text = backend("BatchGetItem", err).to_string();
                        for key in request.keys() {
                            found.insert(
                                self.key_of(key),
                                Err(StoreError::Backend(text.clone().into())),
                            );
                        }
                        break;
                    }
                };
                for item in output
                    .responses()
                    .and_then(|r| r.get(&self.table))
                    .into_iter()
                    .flatten()
                {
                    found.insert(self.key_of(item), Ok(item.clone()));
                }
                pending = output
                    .unprocessed_keys()
                    .and_then(|u| u.get(&self.table))
                    .map(|k| k.keys().to_vec())
                    .unwrap_or_default();
            }
            for key in pending {
                let key = self.key_of(&key);
                if let Ok(Some(item)) = self.get_item(&key).await {
                    found.insert(key, Ok(item));
                }
            }
        }
        found
    }

    /// The record key an item or a primary key holds.
    fn key_of(&self, item: &Item) -> String {
        match item.get(&self.names.key) {
            Some(AttributeValue::S(key)) => key.clone(),
            _ => String::new(),
        }
    }

    pub(super) async fn complete_statements(
        &self,
        records: &[IdempotencyRecord],
    ) -> Vec<Result<(), StoreError>> {
        let table = self.partiql_table().filter(|_| records.len() > 1);
        let mut statements = Vec::new();
        let mut batched = Vec::new();
        for (index, record) in records.iter().enumerate() {
            let item = self.to_item(record);
            let (Some(table), Ok(())) = (&table, check_limits(item_bytes(&item), [])) else {
                continue;
            };
            statements.push(self.update_statement(table, record, item));
            batched.push(index);
        }
        let answers = self
            .execute_batches("BatchExecuteStatement (complete)", statements)
            .await;
        let mut results: Vec<Option<Result<(), StoreError>>> =
            records.iter().map(|_| None).collect();
        for (index, answer) in batched.into_iter().zip(answers) {
            results[index] = match answer {
                Ok(Answer::Applied) => Some(Ok(())),
                // Not ours, or gone: as `complete`'s condition says.
                Ok(Answer::Refused(_)) => Some(Err(StoreError::NotOwner)),
                Ok(Answer::Failed) => None,
                Err(err) => Some(Err(err)),
            };
        }
        let mut answers = Vec::with_capacity(records.len());
        for (record, result) in records.iter().zip(results) {
            answers.push(match result {
                Some(result) => result,
                None => self.complete(record).await,
            });
        }
        answers
    }

    /// The `UPDATE` that makes the stored item `item` (as `complete`'s `PutItem`
    /// would) if `record.owner` owns it: every attribute of the record set, every
    /// other one a record may have removed.
    fn update_statement(
        &self,
        table: &str,
        record: &IdempotencyRecord,
        item: Item,
    ) -> BatchStatementRequest {
        let n = &self.names;
        let mut text = format!("UPDATE {table}");
        for name in [
            &n.in_progress_expiration,
            &n.data,
            &n.validation,
            &n.error,
            &n.execution,
            &n.data_encoding,
        ] {
            if !item.contains_key(name) {
                text.push_str(&format!(" REMOVE {}", identifier(name)));
            }
        }
        let key = self.primary_key(&record.key);
        let mut parameters = Vec::new();
        for (name, value) in item {
            if !key.contains_key(&name) {
                text.push_str(&format!(" SET {} = ?", identifier(&name)));
                parameters.push(value);
            }
        }
        text.push_str(&self.owned_by(&record.key, &record.owner, &mut parameters));
        Self::statement(text, parameters)
    }

    pub(super) async fn release_statements(
        &self,
        reservations: &[(String, String)],
    ) -> Vec<Result<(), StoreError>> {
        let Some(table) = self.partiql_table().filter(|_| reservations.len() > 1) else {
            let mut answers = Vec::with_capacity(reservations.len());
            for (key, owner) in reservations {
                answers.push(self.release(key, owner).await);
            }
            return answers;
        };
        let statements = reservations
            .iter()
            .map(|(key, owner)| {
                let mut parameters = Vec::new();
                let text = format!(
                    "DELETE FROM {table}{}",
                    self.owned_by(key, owner, &mut parameters)
                );
                Self::statement(text, parameters)
            })
            .collect();
        let answers = self
            .execute_batches("BatchExecuteStatement (release)", statements)
            .await;
        let mut results = Vec::with_capacity(reservations.len());
        for ((key, owner), answer) in reservations.iter().zip(answers) {
            results.push(match answer {
                Ok(Answer::Applied) => Ok(()),
                Ok(Answer::Refused(Some(_))) => Err(StoreError::NotOwner),
                // Refused without the item: gone, or another's; `release` tells.
                Ok(Answer::Refused(None)) | Ok(Answer::Failed) => self.release(key, owner).await,
                Err(err) => Err(err),
            });
        }
        results
    }
}
