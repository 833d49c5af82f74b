//! Key expressions evaluated straight on the event's `serde_json::Value`: field
//! paths, indexes, multi-selects, `||` and the Powertools functions, the shapes
//! nearly every key and validation expression has ([`super::syntax`] parses
//! them).
//!
//! The jmespath crate evaluates over its own `Variable` tree, so each search
//! converts what it reads and converts the result back; on the hot path that was
//! most of the wrapper's cost. Here the event is read in place and only the
//! result is copied. Results and errors follow JMESPath's rules (a field of a
//! non-object, an index of a non-array and a multi-select of `null` are `null`;
//! a function given the wrong type fails); property tests in `key.rs` check them
//! against the jmespath crate.

use super::{sorted, POWERTOOLS_BASE64, POWERTOOLS_JSON};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// An expression of the shapes evaluated here.
#[derive(Debug, Clone)]
pub(super) enum Direct {
    /// `name`: the member of an object, `null` for anything else.
    Field(String),
    /// `[i]`: the item of an array (from the end when negative), `null` for
    /// anything else.
    Index(i32),
    /// `@`: the value itself.
    Current,
    /// `lhs.rhs` (and `lhs[i]`): `rhs` on what `lhs` selects.
    Sub(Box<Direct>, Box<Direct>),
    /// `[a, b]`: `null` on `null`.
    List(Vec<Direct>),
    /// `{x: a}`: `null` on `null`.
    Hash(Vec<(String, Direct)>),
    /// `a || b`: `a` unless it is false, `null` or empty, then `b`.
    Or(Box<Direct>, Box<Direct>),
    /// `powertools_json(arg)`, keeping only `fields` when what follows reads
    /// only those ([`Direct::root_fields`]).
    Json {
        arg: Box<Direct>,
        fields: Option<Vec<String>>,
    },
    /// `powertools_base64(arg)`.
    Base64(Box<Direct>),
    /// `powertools_base64_gzip(arg)`.
    #[cfg(feature = "gzip")]
    Base64Gzip(Box<Direct>),
}

static NULL: Value = Value::Null;

/// During a shared search, the fields read from embedded documents; and the
/// documents parsed so far (the list is kept between searches, emptied).
type Shared = (Option<Arc<[String]>>, Vec<(Text, Rc<Value>)>);

/// Which text a shared document was parsed from.
#[derive(PartialEq)]
enum Text {
    /// A string of the event, by address and length: the event is borrowed for
    /// the whole sharing scope, so the address names the text (no copy).
    InEvent(usize, usize),
    /// A string computed during a search, which may be freed and its address
    /// reused: compared by content.
    Computed(String),
}

thread_local! {
    /// Parses shared by the searches of one event ([`share`]).
    static PARSED: RefCell<Shared> = const { RefCell::new((None, Vec::new())) };
}

/// Starts (`Some`) or ends (`None`) sharing parses between searches.
pub(super) fn share(fields: Option<&Arc<[String]>>) {
    PARSED.with_borrow_mut(|(shared, parsed)| {
        *shared = fields.map(Arc::clone);
        parsed.clear();
    });
}

#[cfg(test)]
pub(super) fn sharing_ended() -> bool {
    PARSED.with_borrow(|(fields, parsed)| fields.is_none() && parsed.is_empty())
}

impl Direct {
    /// `lhs.rhs`. A `powertools_json` call followed by `.rest` parses only the
    /// fields `rest` reads.
    pub(super) fn sub(mut lhs: Self, rhs: Self) -> Self {
        if let Self::Json { fields, .. } = &mut lhs
            && fields.is_none()
        {
            *fields = rhs.root_fields().map(sorted);
        }
        Self::Sub(Box::new(lhs), Box::new(rhs))
    }

    /// A call of the Powertools function `name` (checked by the parser).
    pub(super) fn call(name: &str, arg: Self) -> Self {
        let arg = Box::new(arg);
        match name {
            POWERTOOLS_JSON => Self::Json { arg, fields: None },
            #[cfg(feature = "gzip")]
            super::POWERTOOLS_BASE64_GZIP => Self::Base64Gzip(arg),
            _ => Self::Base64(arg),
        }
    }

    /// The top-level fields the expression can read from the event, or `None`
    /// when it may read the event as a whole (`@`). The left side of `a.b`, a
    /// function's argument, the items of a multi-select and both sides of `||`
    /// see the event itself; the right side of `a.b` sees a value selected from
    /// it. An index reads the event as an array, so no field of an object.
    pub(super) fn root_fields(&self) -> Option<Vec<String>> {
        fn union<'a>(nodes: impl IntoIterator<Item = &'a Direct>) -> Option<Vec<String>> {
            nodes.into_iter().try_fold(Vec::new(), |mut fields, node| {
                fields.extend(node.root_fields()?);
                Some(fields)
            })
        }
        match self {
            Self::Field(name) => Some(vec![name.clone()]),
            Self::Index(_) => Some(Vec::new()),
            Self::Current => None,
            Self::Sub(lhs, _) => lhs.root_fields(),
            Self::Or(lhs, rhs) => union([&**lhs, &**rhs]),
            Self::List(items) => union(items),
            Self::Hash(entries) => union(entries.iter().map(|(_, v)| v)),
            Self::Json { arg, .. } | Self::Base64(arg) => arg.root_fields(),
            #[cfg(feature = "gzip")]
            Self::Base64Gzip(arg) => arg.root_fields(),
        }
    }

    /// The same expression parsing whole documents (the tests' reference).
    #[cfg(test)]
    pub(super) fn unpruned(&self) -> Self {
        let boxed = |d: &Self| Box::new(d.unpruned());
        match self {
            Self::Field(_) | Self::Index(_) | Self::Current => self.clone(),
            Self::Sub(lhs, rhs) => Self::Sub(boxed(lhs), boxed(rhs)),
            Self::Or(lhs, rhs) => Self::Or(boxed(lhs), boxed(rhs)),
            Self::List(items) => Self::List(items.iter().map(Self::unpruned).collect()),
            Self::Hash(entries) => Self::Hash(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.unpruned()))
                    .collect(),
            ),
            Self::Json { arg, .. } => Self::Json {
                arg: boxed(arg),
                fields: None,
            },
            Self::Base64(arg) => Self::Base64(boxed(arg)),
            #[cfg(feature = "gzip")]
            Self::Base64Gzip(arg) => Self::Base64Gzip(boxed(arg)),
        }
    }

    /// Levels of the tree, which bound the evaluator's recursion.
    pub(super) fn depth(&self) -> usize {
        1 + match self {
            Self::Field(_) | Self::Index(_) | Self::Current => 0,
            Self::Sub(lhs, rhs) | Self::Or(lhs, rhs) => lhs.depth().max(rhs.depth()),
            Self::List(items) => items.iter().map(Self::depth).max().unwrap_or(0),
            Self::Hash(entries) => entries.iter().map(|(_, v)| v.depth()).max().unwrap_or(0),
            Self::Json { arg, .. } | Self::Base64(arg) => arg.depth(),
            #[cfg(feature = "gzip")]
            Self::Base64Gzip(arg) => arg.depth(),
        }
    }

    /// The fields each `powertools_json` call reads from its document, when
    /// known ([`Direct::sub`]).
    pub(super) fn embedded_fields<'a>(&'a self, out: &mut Vec<&'a [String]>) {
        match self {
            Self::Field(_) | Self::Index(_) | Self::Current => {}
            Self::Sub(lhs, rhs) | Self::Or(lhs, rhs) => {
                lhs.embedded_fields(out);
                rhs.embedded_fields(out);
            }
            Self::List(items) => items.iter().for_each(|item| item.embedded_fields(out)),
            Self::Hash(entries) => entries.iter().for_each(|(_, v)| v.embedded_fields(out)),
            Self::Json { arg, fields } => {
                out.extend(fields.as_deref());
                arg.embedded_fields(out);
            }
            Self::Base64(arg) => arg.embedded_fields(out),
            #[cfg(feature = "gzip")]
            Self::Base64Gzip(arg) => arg.embedded_fields(out),
        }
    }

    /// What the expression selects from `data`. The caller has bounded the depth
    /// of what the expression reads (`MAX_DATA_DEPTH`); embedded documents are
    /// bounded by serde_json's parser. `limit` bounds what
    /// `powertools_base64_gzip` may inflate.
    pub(super) fn search(&self, data: &Value, limit: usize) -> Result<Value, String> {
        match self {
            // Selected in place; only what is found is copied.
            Self::Field(_) | Self::Index(_) | Self::Current => {
                Ok(self.select(data).map_or(Value::Null, Value::clone))
            }
            Self::Sub(lhs, rhs) => match (&**lhs, lhs.select(data)) {
                (_, Some(selected)) => rhs.search(selected, limit),
                (Self::Json { arg, fields }, None) => {
                    rhs.search(&*json(arg, fields, data, limit)?, limit)
                }
                (lhs, None) => rhs.search(&lhs.search(data, limit)?, limit),
            },
            Self::List(_) | Self::Hash(_) if data.is_null() => Ok(Value::Null),
            Self::List(items) => items.iter().map(|item| item.search(data, limit)).collect(),
            Self::Hash(entries) => entries
                .iter()
                .map(|(key, value)| Ok((key.clone(), value.search(data, limit)?)))
                .collect::<Result<Map<_, _>, String>>()
                .map(Value::Object),
            Self::Or(lhs, rhs) => match lhs.search(data, limit)? {
                found if truthy(&found) => Ok(found),
                _ => rhs.search(data, limit),
            },
            Self::Json { arg, fields } => Ok(Value::clone(&*json(arg, fields, data, limit)?)),
            Self::Base64(arg) => with_text(POWERTOOLS_BASE64, arg, data, limit, |text, _| {
                super::base64_text(text).map(Value::String)
            }),
            #[cfg(feature = "gzip")]
            Self::Base64Gzip(arg) => with_text(
                super::POWERTOOLS_BASE64_GZIP,
                arg,
                data,
                limit,
                |text, _| super::gunzip_base64_text(text, limit).map(Value::String),
            ),
        }
    }

    /// The value a path of fields, indexes and `||` leads to, borrowed (`null`
    /// when absent); `None` for other shapes, which build their result.
    fn select<'a>(&self, data: &'a Value) -> Option<&'a Value> {
        match self {
            Self::Field(name) => Some(data.get(name.as_str()).unwrap_or(&NULL)),
            Self::Index(index) => Some(item(data, *index).unwrap_or(&NULL)),
            Self::Current => Some(data),
            Self::Sub(lhs, rhs) => rhs.select(lhs.select(data)?),
            Self::Or(lhs, rhs) => match lhs.select(data)? {
                found if truthy(found) => Some(found),
                _ => rhs.select(data),
            },
            _ => None,
        }
    }
}

/// JMESPath's truth: everything but `false`, `null` and empty strings, arrays
/// and objects.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(_) => true,
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
    }
}

fn item(data: &Value, index: i32) -> Option<&Value> {
    let items = data.as_array()?;
    let at = match usize::try_from(index) {
        Ok(at) => at,
        Err(_) => items
            .len()
            .checked_sub(usize::try_from(index.unsigned_abs()).ok()?)?,
    };
    items.get(at)
}

/// `f` on the string `arg` selects or computes (`true`: borrowed from the event);
/// a function given anything but a string fails, as in JMESPath.
fn with_text<T>(
    function: &str,
    arg: &Direct,
    data: &Value,
    limit: usize,
    f: impl FnOnce(&str, bool) -> Result<T, String>,
) -> Result<T, String> {
    fn string<'v>(function: &str, value: &'v Value) -> Result<&'v str, String> {
        match value {
            Value::String(text) => Ok(text),
            other => Err(format!(
                "{function}() needs a string, given {}",
                type_name(other)
            )),
        }
    }
    match arg.select(data) {
        Some(selected) => f(string(function, selected)?, true),
        None => f(string(function, &arg.search(data, limit)?)?, false),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `powertools_json(arg)` on `data`.
fn json(
    arg: &Direct,
    fields: &Option<Vec<String>>,
    data: &Value,
    limit: usize,
) -> Result<Rc<Value>, String> {
    with_text(POWERTOOLS_JSON, arg, data, limit, |text, in_event| {
        parse(text, fields.as_deref(), in_event)
            .ok_or_else(|| super::invalid_text(POWERTOOLS_JSON, "a JSON string", text))
    })
}

/// An embedded document, with only `fields` when it is an object and they are
/// given; shared between the searches of a [`share`] scope. `None`: not JSON.
/// `in_event`: `text` is borrowed from the searched event. (With the `jmespath`
/// feature, the interpreter's `powertools_json` parses through here too.)
pub(super) fn parse(text: &str, fields: Option<&[String]>, in_event: bool) -> Option<Rc<Value>> {
    PARSED.with_borrow_mut(|(shared, parsed)| {
        let object = text.trim_start().starts_with('{');
        match (shared, fields) {
            (Some(all), Some(_)) if object => {
                let seen = match in_event {
                    true => Text::InEvent(text.as_ptr() as usize, text.len()),
                    false => Text::Computed(text.to_owned()),
                };
                if let Some((_, value)) = parsed.iter().find(|(parsed, _)| *parsed == seen) {
                    return Some(Rc::clone(value));
                }
                let value = Rc::new(parse_fields(text, all)?);
                parsed.push((seen, Rc::clone(&value)));
                Some(value)
            }
            (_, Some(fields)) if object => parse_fields(text, fields).map(Rc::new),
            _ => serde_json::from_str(text).ok().map(Rc::new),
        }
    })
}

/// A JSON object with only `fields`: the other members are checked and skipped.
fn parse_fields(text: &str, fields: &[String]) -> Option<Value> {
    struct Fields<'a>(&'a [String]);
    impl<'de> serde::de::Visitor<'de> for Fields<'_> {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut object = Map::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if self.0.iter().any(|field| *field == key) {
                    object.insert(key.into_owned(), map.next_value()?);
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(Value::Object(object))
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = serde::Deserializer::deserialize_map(&mut deserializer, Fields(fields)).ok()?;
    deserializer.end().ok()?;
    Some(value)
}
