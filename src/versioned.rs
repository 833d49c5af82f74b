//! Version-checked (absolute-state) writes (feature `atomic-writes`): write an
//! entity only if the stored version is older than the event's, and take "already
//! at this version or newer" as a harmless retry, not an error.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use aws_sdk_dynamodb::Client;
use std::collections::HashMap;

type Item = HashMap<String, AttributeValue>;

/// The version attribute unless [`VersionedWrite::version_attribute`] names another.
pub const DEFAULT_VERSION_ATTRIBUTE: &str = "version";

/// A write of an entity at `version`, applied only if the stored entity is absent,
/// has no version, or has an older one: the condition
/// `attribute_not_exists(#v) OR #v < :v`. Deliveries in order, duplicated or out
/// of order leave the entity at the highest version, written once per version.
///
/// Use it on its own with [`write`](Self::write), or staged in a wrapped handler
/// with [`Writes::versioned`](crate::Writes::versioned), committed with the record.
///
/// ```no_run
/// use aws_sdk_dynamodb::types::AttributeValue;
/// use lambda_idempotency::{Versioned, VersionedWrite};
///
/// # async fn f(client: aws_sdk_dynamodb::Client) -> Result<(), lambda_idempotency::VersionedWriteError> {
/// // An absolute-state event: account a-1 is "frozen" as of version 7.
/// let write = VersionedWrite::update("accounts", 7)
///     .key("id", AttributeValue::S("a-1".into()))
///     .set("state", AttributeValue::S("frozen".into()));
/// match write.write(&client).await? {
///     Versioned::Written => {}
///     // A duplicate, or an older event arriving late: nothing to do.
///     Versioned::AlreadyCurrent => {}
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct VersionedWrite {
    table: String,
    version: u64,
    version_attribute: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// The whole item replaced (the version attribute set on it).
    Put { item: Item },
    /// Attributes set and numbers added on the item under `key`.
    Update {
        key: Item,
        set: Vec<(String, AttributeValue)>,
        add: Vec<(String, AttributeValue)>,
    },
}

/// What a version-checked write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versioned {
    /// The entity was older (or absent): it is now at the write's version.
    Written,
    /// The entity was already at this version or newer: nothing was written.
    AlreadyCurrent,
}

/// A version-checked write that DynamoDB refused for another reason than the
/// version (network, throttling, permissions, a missing table).
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB {operation} (versioned write) failed: {detail}")]
pub struct VersionedWriteError {
    operation: &'static str,
    detail: String,
    #[source]
    source: aws_sdk_dynamodb::error::BoxError,
}

impl VersionedWriteError {
    fn new<E, R>(operation: &'static str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        Self {
            operation,
            detail: crate::store::sdk_detail(&err),
            source: err.into(),
        }
    }
}

const CONDITION: &str = "attribute_not_exists(#v) OR #v < :v";

impl VersionedWrite {
    /// Replaces the whole `item` in `table` with it at `version` (the version
    /// attribute is set on it).
    pub fn put(
        table: impl Into<String>,
        item: HashMap<String, AttributeValue>,
        version: u64,
    ) -> Self {
        Self {
            table: table.into(),
            version,
            version_attribute: DEFAULT_VERSION_ATTRIBUTE.to_owned(),
            kind: Kind::Put { item },
        }
    }

    /// Updates the item of `table` (under the [`key`](Self::key) attributes) to
    /// `version`, setting the attributes given with [`set`](Self::set); the other
    /// attributes stay. Creates the item if it is absent.
    pub fn update(table: impl Into<String>, version: u64) -> Self {
        Self {
            table: table.into(),
            version,
            version_attribute: DEFAULT_VERSION_ATTRIBUTE.to_owned(),
            kind: Kind::Update {
                key: Item::new(),
                set: Vec::new(),
                add: Vec::new(),
            },
        }
    }

    /// A key attribute of the item to update (call once per key attribute). On
    /// a put, sets the attribute on the item.
    pub fn key(mut self, name: impl Into<String>, value: AttributeValue) -> Self {
        match &mut self.kind {
            Kind::Put { item } => {
                item.insert(name.into(), value);
            }
            Kind::Update { key, .. } => {
                key.insert(name.into(), value);
            }
        }
        self
    }

    /// Sets an attribute (`SET #a = :a` on an update; on a put, on the item).
    pub fn set(mut self, name: impl Into<String>, value: AttributeValue) -> Self {
        match &mut self.kind {
            Kind::Put { item } => {
                item.insert(name.into(), value);
            }
            Kind::Update { set, .. } => set.push((name.into(), value)),
        }
        self
    }

    /// Adds a number to an attribute (`ADD #a :a`), on an update only; a put
    /// ignores it. Applied once per version, like the rest of the write (a
    /// write counter: `.add("writes", AttributeValue::N("1".into()))`).
    pub fn add(mut self, name: impl Into<String>, value: AttributeValue) -> Self {
        if let Kind::Update { add, .. } = &mut self.kind {
            add.push((name.into(), value));
        }
        self
    }

    /// The attribute holding the version (a number); [`DEFAULT_VERSION_ATTRIBUTE`]
    /// unless set.
    pub fn version_attribute(mut self, name: impl Into<String>) -> Self {
        self.version_attribute = name.into();
        self
    }

    /// The table written to.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The version written.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Writes it now with `client`: [`Versioned::Written`], or
    /// [`Versioned::AlreadyCurrent`] when the condition failed (the stored entity is
    /// at this version or newer). One `PutItem` or `UpdateItem` either way.
    pub async fn write(&self, client: &Client) -> Result<Versioned, VersionedWriteError> {
        let parts = self.parts();
        let result = match parts.update {
            None => client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(parts.item))
                .condition_expression(CONDITION)
                .set_expression_attribute_names(Some(parts.names))
                .set_expression_attribute_values(Some(parts.values))
                .send()
                .await
                .map(|_| Versioned::Written)
                .or_else(|e| match e.as_service_error() {
                    Some(s) if s.is_conditional_check_failed_exception() => {
                        Ok(Versioned::AlreadyCurrent)
                    }
                    _ => Err(VersionedWriteError::new("PutItem", e)),
                }),
            Some(expression) => client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(parts.item))
                .update_expression(expression)
                .condition_expression(CONDITION)
                .set_expression_attribute_names(Some(parts.names))
                .set_expression_attribute_values(Some(parts.values))
                .send()
                .await
                .map(|_| Versioned::Written)
                .or_else(|e| match e.as_service_error() {
                    Some(s) if s.is_conditional_check_failed_exception() => {
                        Ok(Versioned::AlreadyCurrent)
                    }
                    _ => Err(VersionedWriteError::new("UpdateItem", e)),
                }),
        };
        if let Ok(outcome) = &result {
            tracing::debug!(table = %self.table, version = self.version, ?outcome, "versioned write");
        }
        result
    }

    /// The write as a transaction item, condition included.
    pub fn to_transact_item(&self) -> TransactWriteItem {
        let parts = self.parts();
        let builder = TransactWriteItem::builder();
        // The builders fail only without a table, a key/item or an expression,
        // all of which are set here.
        match parts.update {
            None => builder.set_put(
                Put::builder()
                    .table_name(&self.table)
                    .set_item(Some(parts.item))
                    .condition_expression(CONDITION)
                    .set_expression_attribute_names(Some(parts.names))
                    .set_expression_attribute_values(Some(parts.values))
                    .build()
                    .ok(),
            ),
            Some(expression) => builder.set_update(
                Update::builder()
                    .table_name(&self.table)
                    .set_key(Some(parts.item))
                    .update_expression(expression)
                    .condition_expression(CONDITION)
                    .set_expression_attribute_names(Some(parts.names))
                    .set_expression_attribute_values(Some(parts.values))
                    .build()
                    .ok(),
            ),
        }
        .build()
    }

    /// The item (put) or key (update), the update expression, and the names and
    /// values of the expressions.
    fn parts(&self) -> Parts {
        let version = AttributeValue::N(self.version.to_string());
        let mut names = HashMap::from([("#v".to_owned(), self.version_attribute.clone())]);
        let mut values = HashMap::from([(":v".to_owned(), version.clone())]);
        match &self.kind {
            Kind::Put { item } => {
                let mut item = item.clone();
                item.insert(self.version_attribute.clone(), version);
                Parts {
                    item,
                    update: None,
                    names,
                    values,
                }
            }
            Kind::Update { key, set, add } => {
                let mut sets = vec!["#v = :v".to_owned()];
                for (i, (name, value)) in set.iter().enumerate() {
                    names.insert(format!("#s{i}"), name.clone());
                    values.insert(format!(":s{i}"), value.clone());
                    sets.push(format!("#s{i} = :s{i}"));
                }
                let mut expression = format!("SET {}", sets.join(", "));
                if !add.is_empty() {
                    let adds: Vec<String> = add
                        .iter()
                        .enumerate()
                        .map(|(i, (name, value))| {
                            names.insert(format!("#a{i}"), name.clone());
                            values.insert(format!(":a{i}"), value.clone());
                            format!("#a{i} :a{i}")
                        })
                        .collect();
                    expression.push_str(&format!(" ADD {}", adds.join(", ")));
                }
                Parts {
                    item: key.clone(),
                    update: Some(expression),
                    names,
                    values,
                }
            }
        }
    }
}

struct Parts {
    item: Item,
    update: Option<String>,
    names: HashMap<String, String>,
    values: Item,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_sets_the_version_and_adds_under_the_condition() {
        let item = VersionedWrite::update("t", 3)
            .key("id", AttributeValue::S("e".into()))
            .set("state", AttributeValue::S("on".into()))
            .add("writes", AttributeValue::N("1".into()))
            .to_transact_item();
        let update = item.update().expect("an update");
        assert_eq!(
            update.update_expression(),
            "SET #v = :v, #s0 = :s0 ADD #a0 :a0"
        );
        assert_eq!(update.condition_expression(), Some(CONDITION));
        assert_eq!(
            update
                .expression_attribute_values()
                .and_then(|v| v.get(":v")),
            Some(&AttributeValue::N("3".into()))
        );
        assert_eq!(update.key().len(), 1);
    }

    #[test]
    fn a_put_carries_its_version_on_the_item() {
        let item = VersionedWrite::put("t", HashMap::new(), 9)
            .key("id", AttributeValue::S("e".into()))
            .version_attribute("rev")
            .to_transact_item();
        let put = item.put().expect("a put");
        assert_eq!(put.item().get("rev"), Some(&AttributeValue::N("9".into())));
        assert_eq!(
            put.expression_attribute_names().and_then(|n| n.get("#v")),
            Some(&"rev".to_owned())
        );
    }
}
