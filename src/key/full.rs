//! Full JMESPath (feature `jmespath`): expressions beyond the subset that
//! [`super::syntax`] parses, compiled and evaluated by the jmespath crate, with
//! the Powertools functions registered on its runtime. Calls are checked when
//! the expression is compiled (the crate checks them only when evaluated), and a
//! search converts only the top-level fields the expression can read.

use super::direct;
#[cfg(feature = "gzip")]
use super::gunzip_base64_text;
use super::{
    base64_text, invalid_text, sorted, too_deep, DEFAULT_MAX_INFLATED_BYTES, MAX_EXPRESSION_DEPTH,
    POWERTOOLS_BASE64, POWERTOOLS_BASE64_GZIP, POWERTOOLS_JSON,
};
use jmespath::ast::Ast;
use jmespath::functions::{ArgumentType, CustomFunction, Signature};
use jmespath::{Context, ErrorReason, JmespathError, Rcvar, Runtime, Variable};
use serde_json::Value;
use std::cell::Cell;
use std::sync::{Arc, LazyLock};

/// The JMESPath runtime: the standard functions plus the three Powertools ones, so
/// expressions written for Powertools work unchanged.
static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    let mut runtime = Runtime::new();
    #[cfg(feature = "jmespath-functions")]
    runtime.register_builtin_functions();
    let string_arg = || signature(POWERTOOLS_JSON).unwrap_or_else(|| Signature::new(vec![], None));
    runtime.register_function(
        POWERTOOLS_JSON,
        Box::new(CustomFunction::new(
            string_arg(),
            Box::new(|args: &[Rcvar], ctx: &mut Context<'_>| {
                let text = first_string(args);
                let offset = ctx.offset;
                JSON_FIELDS
                    .with_borrow(|calls| {
                        let fields = calls
                            .as_deref()
                            .and_then(|calls| calls.iter().find(|(at, _)| *at == offset))
                            .map(|(_, fields)| fields.as_slice());
                        match fields {
                            // Only the fields the call's result is read for, shared
                            // with the other searches of the event.
                            Some(fields) => direct::parse(text, Some(fields), false)
                                .map(|document| to_variable(&document)),
                            None => parse_variable(text).ok(),
                        }
                    })
                    .ok_or_else(|| fail(ctx, invalid_text(POWERTOOLS_JSON, "a JSON string", text)))
            }),
        )),
    );
    runtime.register_function(
        POWERTOOLS_BASE64,
        Box::new(CustomFunction::new(
            string_arg(),
            Box::new(|args: &[Rcvar], ctx: &mut Context<'_>| {
                base64_text(first_string(args))
                    .map(|decoded| Rcvar::new(Variable::String(decoded)))
                    .map_err(|reason| fail(ctx, reason))
            }),
        )),
    );
    #[cfg(feature = "gzip")]
    runtime.register_function(
        POWERTOOLS_BASE64_GZIP,
        Box::new(CustomFunction::new(
            string_arg(),
            Box::new(|args: &[Rcvar], ctx: &mut Context<'_>| {
                gunzip_base64_text(first_string(args), MAX_INFLATED_BYTES.get())
                    .map(|decoded| Rcvar::new(Variable::String(decoded)))
                    .map_err(|reason| fail(ctx, reason))
            }),
        )),
    );
    runtime
});

thread_local! {
    /// The inflation bound of the search running on this thread. The JMESPath
    /// runtime is a global static and its functions only get their arguments and a
    /// `Context` without user data, so the bound of the expression being evaluated
    /// reaches `powertools_base64_gzip` through here: [`Compiled::search`] sets it
    /// around a search, which is synchronous, so it cannot leak to another
    /// expression on the same thread (a per-configuration runtime would need to be
    /// leaked for the `'static` expressions).
    static MAX_INFLATED_BYTES: Cell<usize> = const { Cell::new(DEFAULT_MAX_INFLATED_BYTES) };
    /// Why the current search failed, when a Powertools function knows better than
    /// the JMESPath error it has to return.
    static FAILURE: Cell<Option<String>> = const { Cell::new(None) };
    /// The fields each `powertools_json` call of the current search reads from
    /// the document it parses, by the call's offset in the expression.
    static JSON_FIELDS: std::cell::RefCell<Option<CallFields>> =
        const { std::cell::RefCell::new(None) };
}

/// The fields `powertools_json` call sites read, by the call's offset in the
/// expression ([`json_fields`]).
type CallFields = Arc<[(usize, Vec<String>)]>;

/// An expression compiled by the jmespath crate.
#[derive(Clone)]
pub(super) struct Compiled {
    expression: jmespath::Expression<'static>,
    /// The fields each `powertools_json` call site reads ([`json_fields`]).
    pub(super) json_fields: CallFields,
}

/// Compiles `expression`, rejecting syntax errors, expressions too deeply nested
/// to evaluate safely, and function calls that can never work: unknown
/// functions, wrong argument counts, literal arguments of the wrong type. Also
/// gives the top-level fields the expression can read ([`root_fields`]).
pub(super) fn compile(expression: &str) -> Result<(Compiled, Option<Vec<String>>), String> {
    let compiled = RUNTIME.compile(expression).map_err(|e| e.to_string())?;
    check_ast(compiled.as_ast())?;
    let root_fields = root_fields(compiled.as_ast()).map(sorted);
    let json_fields = json_fields(compiled.as_ast()).into();
    Ok((
        Compiled {
            expression: compiled,
            json_fields,
        },
        root_fields,
    ))
}

impl Compiled {
    /// The same expression parsing whole documents (the tests' reference).
    #[cfg(test)]
    pub(super) fn unpruned(&self) -> Self {
        Self {
            json_fields: Arc::new([]),
            ..self.clone()
        }
    }

    /// Searches `data`, of which the expression reads only `root_fields` (all of
    /// it when `None`); the caller has bounded the depth of what it reads.
    pub(super) fn search(
        &self,
        data: &Value,
        root_fields: Option<&[String]>,
        max_inflated_bytes: usize,
    ) -> Result<Value, String> {
        let root = root_variable(data, root_fields);
        let scope = SearchScope::enter(max_inflated_bytes, &self.json_fields);
        let mut ctx = Context::new(self.expression.as_str(), &RUNTIME);
        let found = jmespath::interpret(&root, self.expression.as_ast(), &mut ctx)
            .map_err(|e| scope.failure().unwrap_or_else(|| e.to_string()))?;
        serde_json::to_value(&*found).map_err(|e| e.to_string())
    }
}

/// The event as a JMESPath variable: of an object, only the fields the
/// expression can read (the same result, without copying the rest).
fn root_variable(data: &Value, root_fields: Option<&[String]>) -> Rcvar {
    match (root_fields, data) {
        (Some(fields), Value::Object(map)) => Rcvar::new(Variable::Object(
            fields
                .iter()
                .filter_map(|field| Some((field.clone(), to_variable(map.get(field)?))))
                .collect(),
        )),
        _ => to_variable(data),
    }
}

/// A JSON document as a JMESPath variable, parsed straight into it. serde_json's
/// parser stops at 128 levels, so the result is bounded. With `exact-numbers`,
/// serde_json hands numbers to a deserializer as a private one-field map, which
/// jmespath's `Variable` would keep as an object: values go through a `Value`.
pub(super) fn parse_variable(text: &str) -> Result<Rcvar, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let variable = variable(&mut deserializer)?;
    deserializer.end()?;
    Ok(variable)
}

fn variable<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Rcvar, D::Error> {
    #[cfg(not(feature = "exact-numbers"))]
    return serde::Deserialize::deserialize(deserializer).map(Rcvar::new);
    #[cfg(feature = "exact-numbers")]
    return <Value as serde::Deserialize>::deserialize(deserializer).map(|v| to_variable(&v));
}

/// Sets this thread's inflation bound and `powertools_json` fields for one search;
/// restores the previous ones when dropped, also on unwinding.
struct SearchScope {
    previous: usize,
    previous_fields: Option<CallFields>,
}

impl SearchScope {
    fn enter(max_inflated_bytes: usize, json_fields: &CallFields) -> Self {
        FAILURE.set(None);
        Self {
            previous: MAX_INFLATED_BYTES.replace(max_inflated_bytes),
            previous_fields: JSON_FIELDS.replace(Some(Arc::clone(json_fields))),
        }
    }

    /// The failure a Powertools function recorded during the search, if any.
    fn failure(&self) -> Option<String> {
        FAILURE.take()
    }
}

impl Drop for SearchScope {
    fn drop(&mut self) {
        MAX_INFLATED_BYTES.set(self.previous);
        JSON_FIELDS.set(self.previous_fields.take());
    }
}

/// Records `reason` for [`Compiled::search`] and returns the error JMESPath needs.
fn fail(ctx: &Context<'_>, reason: String) -> JmespathError {
    let err = JmespathError::from_ctx(ctx, ErrorReason::Parse(reason.clone()));
    FAILURE.set(Some(reason));
    err
}

/// The signature check has already run, so the first argument is a string.
fn first_string(args: &[Rcvar]) -> &str {
    args.first()
        .and_then(|a| a.as_string())
        .map_or("", String::as_str)
}

/// `value` as a JMESPath variable. Not `Variable::try_from` nor `search(&Value)`:
/// without jmespath's nightly-only `specialized` feature both go through serde, and
/// with serde_json's `arbitrary_precision` a number serializes as a private
/// one-field object, so numbers would turn into objects. Recursive: callers bound
/// the depth first ([`MAX_DATA_DEPTH`], serde_json's parser limit).
pub(super) fn to_variable(value: &Value) -> Rcvar {
    Rcvar::new(match value {
        Value::Null => Variable::Null,
        Value::Bool(b) => Variable::Bool(*b),
        Value::Number(n) => Variable::Number(n.clone()),
        Value::String(s) => Variable::String(s.clone()),
        Value::Array(items) => Variable::Array(items.iter().map(to_variable).collect()),
        Value::Object(map) => Variable::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), to_variable(v)))
                .collect(),
        ),
    })
}

/// Walks the tree with an explicit stack (a 10,000-segment `a.a.a...` is a tree
/// 10,000 deep) and checks its depth and every function call.
fn check_ast(root: &Ast) -> Result<(), String> {
    let mut stack = vec![(root, 1usize)];
    while let Some((ast, depth)) = stack.pop() {
        if depth > MAX_EXPRESSION_DEPTH {
            return Err(too_deep());
        }
        if let Ast::Function { name, args, .. } = ast {
            check_call(name, args)?;
        }
        stack.extend(children(ast).into_iter().map(|child| (child, depth + 1)));
    }
    Ok(())
}

/// The top-level fields an expression can read from the event, or `None` when it
/// may read the event as a whole (`@`, `*`, `keys(@)`...). Follows where JMESPath
/// evaluates each node: the left side of `a.b` and of a projection, a function's
/// arguments, the items of a multi-select and the operands of comparisons and
/// logic all see the event itself; everything else sees a value selected from it.
/// Indexes and slices read the event as an array, and read nothing from an object.
/// Called after [`check_ast`], which bounds the depth.
fn root_fields(ast: &Ast) -> Option<Vec<String>> {
    fn union<'a>(nodes: impl IntoIterator<Item = &'a Ast>) -> Option<Vec<String>> {
        nodes.into_iter().try_fold(Vec::new(), |mut fields, node| {
            fields.extend(root_fields(node)?);
            Some(fields)
        })
    }
    match ast {
        Ast::Field { name, .. } => Some(vec![name.clone()]),
        Ast::Subexpr { lhs, .. } | Ast::Projection { lhs, .. } => root_fields(lhs),
        Ast::Flatten { node, .. } | Ast::Not { node, .. } | Ast::ObjectValues { node, .. } => {
            root_fields(node)
        }
        Ast::Comparison { lhs, rhs, .. } | Ast::And { lhs, rhs, .. } | Ast::Or { lhs, rhs, .. } => {
            union([&**lhs, &**rhs])
        }
        Ast::Condition {
            predicate, then, ..
        } => union([&**predicate, &**then]),
        Ast::Function { args, .. } => union(args),
        Ast::MultiList { elements, .. } => union(elements),
        Ast::MultiHash { elements, .. } => union(elements.iter().map(|kv| &kv.value)),
        // A function applies `&expr` to the values of its other arguments.
        Ast::Expref { .. } | Ast::Literal { .. } | Ast::Index { .. } | Ast::Slice { .. } => {
            Some(Vec::new())
        }
        Ast::Identity { .. } => None,
    }
}

/// The fields each `powertools_json(...)` call site reads from its document: the
/// call followed by `.rest` reads what `rest` reads from its top level
/// ([`root_fields`]); a call used any other way reads the whole document and is
/// not listed.
fn json_fields(root: &Ast) -> Vec<(usize, Vec<String>)> {
    let mut calls = Vec::new();
    let mut stack = vec![root];
    while let Some(ast) = stack.pop() {
        if let Ast::Subexpr { lhs, rhs, .. } = ast
            && let Ast::Function { name, offset, .. } = &**lhs
            && let (POWERTOOLS_JSON, Some(fields)) = (name.as_str(), root_fields(rhs))
        {
            calls.push((*offset, sorted(fields)));
        }
        stack.extend(children(ast));
    }
    calls
}

fn children(ast: &Ast) -> Vec<&Ast> {
    match ast {
        Ast::Function { args, .. } => args.iter().collect(),
        Ast::Comparison { lhs, rhs, .. }
        | Ast::Projection { lhs, rhs, .. }
        | Ast::And { lhs, rhs, .. }
        | Ast::Or { lhs, rhs, .. }
        | Ast::Subexpr { lhs, rhs, .. } => vec![lhs, rhs],
        Ast::Condition {
            predicate, then, ..
        } => vec![predicate, then],
        Ast::Expref { ast, .. } => vec![ast],
        Ast::Flatten { node, .. } | Ast::Not { node, .. } | Ast::ObjectValues { node, .. } => {
            vec![node]
        }
        Ast::MultiList { elements, .. } => elements.iter().collect(),
        Ast::MultiHash { elements, .. } => elements.iter().map(|kv| &kv.value).collect(),
        Ast::Identity { .. }
        | Ast::Field { .. }
        | Ast::Index { .. }
        | Ast::Literal { .. }
        | Ast::Slice { .. } => vec![],
    }
}

/// A call to `name` with `args` that can never succeed: unknown function, wrong
/// argument count, or an argument whose type is known now (a literal, or `&expr`)
/// and does not fit the signature.
fn check_call(name: &str, args: &[Ast]) -> Result<(), String> {
    #[cfg(not(feature = "gzip"))]
    if name == POWERTOOLS_BASE64_GZIP {
        return Err(format!(
            "{name}() needs the lambda-idempotency feature `gzip`"
        ));
    }
    #[cfg(not(feature = "jmespath-functions"))]
    if !matches!(
        name,
        POWERTOOLS_JSON | POWERTOOLS_BASE64 | POWERTOOLS_BASE64_GZIP
    ) && signature(name).is_some()
    {
        return Err(format!(
            "{name}() is a JMESPath standard function: it needs the lambda-idempotency feature `jmespath-functions`"
        ));
    }
    let signature = signature(name).ok_or_else(|| format!("unknown function {name}()"))?;
    let (fixed, variadic) = (signature.inputs.len(), signature.variadic.is_some());
    if args.len() < fixed || (!variadic && args.len() > fixed) {
        let expected = if variadic {
            format!("at least {fixed}")
        } else {
            fixed.to_string()
        };
        return Err(format!(
            "{name}() takes {expected} argument(s), given {}",
            args.len()
        ));
    }
    for (position, arg) in args.iter().enumerate() {
        let expected = signature
            .inputs
            .get(position)
            .or(signature.variadic.as_ref())
            .unwrap_or(&ArgumentType::Any);
        if let Some(given) = impossible_argument(arg, expected) {
            return Err(format!(
                "{name}() argument {} must be {expected}, given {given}",
                position + 1
            ));
        }
    }
    Ok(())
}

/// What `arg` is, when it can never be of type `expected`: a literal of another
/// type, an `&expr` where a value is expected, or a value where `&expr` is.
fn impossible_argument(arg: &Ast, expected: &ArgumentType) -> Option<String> {
    match (arg, expected) {
        (_, ArgumentType::Any) => None,
        (Ast::Expref { .. }, ArgumentType::Expref) => None,
        (Ast::Expref { .. }, _) => Some("an &expression".to_owned()),
        (_, ArgumentType::Expref) => Some("a value (write &expression)".to_owned()),
        (Ast::Literal { value, .. }, _) if !expected.is_valid(value) => {
            Some(format!("the {} literal {value}", value.get_type()))
        }
        _ => None,
    }
}

/// The signatures of jmespath 0.5's built-in functions, which it does not expose
/// (`Runtime::get_function` gives a `dyn Function` without its signature), and of
/// the Powertools ones. A test checks that this table and the runtime name the same
/// functions.
fn signature(name: &str) -> Option<Signature> {
    use ArgumentType::{Any, Array, Bool, Expref, Null, Number, Object, String};
    let typed = |t: ArgumentType| ArgumentType::TypedArray(Box::new(t));
    let numbers_or_strings = || ArgumentType::Union(vec![typed(Number), typed(String)]);
    let fixed = |inputs: Vec<ArgumentType>| Some(Signature::new(inputs, None));
    match name {
        "abs" | "ceil" | "floor" => fixed(vec![Number]),
        "avg" | "sum" => fixed(vec![typed(Number)]),
        "contains" => fixed(vec![ArgumentType::Union(vec![String, Array]), Any]),
        "ends_with" | "starts_with" => fixed(vec![String, String]),
        "join" => fixed(vec![String, typed(String)]),
        "keys" | "values" => fixed(vec![Object]),
        "length" => fixed(vec![ArgumentType::Union(vec![Array, Object, String])]),
        "map" => fixed(vec![Expref, Array]),
        "max" | "min" | "sort" => fixed(vec![numbers_or_strings()]),
        "max_by" | "min_by" | "sort_by" => fixed(vec![Array, Expref]),
        "merge" => Some(Signature::new(vec![Object], Some(Object))),
        "not_null" => Some(Signature::new(vec![Any], Some(Any))),
        "reverse" => fixed(vec![ArgumentType::Union(vec![Array, String])]),
        "to_array" | "to_number" | "type" => fixed(vec![Any]),
        "to_string" => fixed(vec![ArgumentType::Union(vec![
            Object, Array, Bool, Number, String, Null,
        ])]),
        POWERTOOLS_JSON | POWERTOOLS_BASE64 => fixed(vec![String]),
        #[cfg(feature = "gzip")]
        POWERTOOLS_BASE64_GZIP => fixed(vec![String]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::syntax::STANDARD_FUNCTIONS;
    use super::*;

    #[test]
    fn the_signature_table_names_the_runtime_functions() {
        let powertools = [
            POWERTOOLS_JSON,
            POWERTOOLS_BASE64,
            #[cfg(feature = "gzip")]
            POWERTOOLS_BASE64_GZIP,
        ];
        for name in STANDARD_FUNCTIONS.iter().chain(&powertools) {
            assert!(signature(name).is_some(), "{name}");
            if cfg!(feature = "jmespath-functions") || powertools.contains(name) {
                assert!(RUNTIME.get_function(name).is_some(), "{name}");
            }
        }
    }
}
