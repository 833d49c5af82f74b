//! Key expressions evaluated straight on the event's `serde_json::Value`: field
//! paths, multi-selects of them and `powertools_json(...)`, the shapes nearly
//! every key and validation expression has.
//!
//! The jmespath crate evaluates over its own `Variable` tree, so each search
//! converts what it reads and converts the result back; on the hot path that was
//! most of the wrapper's cost. Here the event is read in place and only the
//! result is copied. Anything unusual (a type error, invalid embedded JSON, a
//! result nested too deep) is not decided here: the caller runs the jmespath
//! interpreter, so errors and edge cases are exactly jmespath's. Property tests
//! in `key.rs` check both give the same result.

use super::{root_fields, sorted, POWERTOOLS_JSON};
use jmespath::ast::Ast;
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// An expression of the shapes evaluated here.
#[derive(Debug, Clone)]
pub(super) enum Direct {
    /// `name`: the member of an object, `null` for anything else.
    Field(String),
    /// `lhs.rhs`: `rhs` on what `lhs` selects.
    Sub(Box<Direct>, Box<Direct>),
    /// `[a, b]`: `null` on `null`.
    List(Vec<Direct>),
    /// `{x: a}`: `null` on `null`.
    Hash(Vec<(String, Direct)>),
    /// `powertools_json(arg)`, keeping only `fields` when what follows reads
    /// only those ([`root_fields`]).
    Json {
        arg: Box<Direct>,
        fields: Option<Vec<String>>,
    },
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
    /// `ast` as a direct expression, if it has one of the shapes.
    pub(super) fn compile(ast: &Ast) -> Option<Self> {
        Some(match ast {
            Ast::Field { name, .. } => Self::Field(name.clone()),
            Ast::Subexpr { lhs, rhs, .. } => {
                let lhs = match &**lhs {
                    Ast::Function { name, args, .. } if name == POWERTOOLS_JSON => {
                        Self::json(args, root_fields(rhs).map(sorted))?
                    }
                    lhs => Self::compile(lhs)?,
                };
                Self::Sub(Box::new(lhs), Box::new(Self::compile(rhs)?))
            }
            Ast::MultiList { elements, .. } => {
                Self::List(elements.iter().map(Self::compile).collect::<Option<_>>()?)
            }
            Ast::MultiHash { elements, .. } => Self::Hash(
                elements
                    .iter()
                    .map(|kv| Some((kv.key.clone(), Self::compile(&kv.value)?)))
                    .collect::<Option<_>>()?,
            ),
            Ast::Function { name, args, .. } if name == POWERTOOLS_JSON => Self::json(args, None)?,
            _ => return None,
        })
    }

    fn json(args: &[Ast], fields: Option<Vec<String>>) -> Option<Self> {
        let [arg] = args else { return None };
        Some(Self::Json {
            arg: Box::new(Self::compile(arg)?),
            fields,
        })
    }

    /// What the expression selects from `data`; `None` when the jmespath
    /// interpreter has to decide. The caller has bounded the depth of what the
    /// expression reads (`MAX_DATA_DEPTH`); embedded documents are bounded by
    /// serde_json's parser.
    pub(super) fn search(&self, data: &Value) -> Option<Value> {
        self.eval(data)
    }

    fn eval(&self, data: &Value) -> Option<Value> {
        match self {
            Self::Sub(lhs, rhs) => match (&**lhs, lhs.select(data)) {
                (_, Some(selected)) => rhs.eval(selected),
                (Self::Json { arg, fields }, None) => rhs.eval(&*json(arg, fields, data)?),
                (lhs, None) => rhs.eval(&lhs.eval(data)?),
            },
            Self::List(_) if data.is_null() => Some(Value::Null),
            Self::List(items) => items.iter().map(|item| item.eval(data)).collect(),
            Self::Hash(_) if data.is_null() => Some(Value::Null),
            Self::Hash(entries) => entries
                .iter()
                .map(|(key, value)| Some((key.clone(), value.eval(data)?)))
                .collect::<Option<Map<_, _>>>()
                .map(Value::Object),
            Self::Json { arg, fields } => Some(Value::clone(&*json(arg, fields, data)?)),
            Self::Field(_) => self.select(data).cloned(),
        }
    }

    /// A field path's target, borrowed (`null` when absent); `None` for other
    /// shapes, which build their result.
    fn select<'a>(&self, data: &'a Value) -> Option<&'a Value> {
        match self {
            Self::Field(name) => Some(data.get(name.as_str()).unwrap_or(&NULL)),
            Self::Sub(lhs, rhs) => rhs.select(lhs.select(data)?),
            _ => None,
        }
    }
}

/// `powertools_json(arg)` on `data`; `None` when `arg` is not a string of JSON.
fn json(arg: &Direct, fields: &Option<Vec<String>>, data: &Value) -> Option<Rc<Value>> {
    match arg.select(data) {
        Some(selected) => parse(selected.as_str()?, fields.as_deref(), true),
        None => parse(arg.eval(data)?.as_str()?, fields.as_deref(), false),
    }
}

/// An embedded document, with only `fields` when it is an object and they are
/// given; shared between the searches of a [`share`] scope. `None`: not JSON.
/// `in_event`: `text` is borrowed from the searched event. (The jmespath
/// interpreter's `powertools_json` parses through here too.)
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
