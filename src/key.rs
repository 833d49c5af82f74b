//! Key derivation: select key material from the event, canonicalize it, hash it.

use base64::Engine as _;
use jmespath::ast::Ast;
use jmespath::functions::{ArgumentType, CustomFunction, Signature};
use jmespath::{Context, ErrorReason, JmespathError, Rcvar, Runtime, RuntimeError, Variable};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::Read as _;
use std::sync::LazyLock;

/// The JMESPath runtime: the standard functions plus the three Powertools ones, so
/// expressions written for Powertools work unchanged.
static RUNTIME: LazyLock<Runtime> = LazyLock::new(|| {
    let mut runtime = Runtime::new();
    runtime.register_builtin_functions();
    let string_arg = || Signature::new(vec![ArgumentType::String], None);
    runtime.register_function(
        "powertools_json",
        Box::new(CustomFunction::new(
            string_arg(),
            Box::new(|args: &[Rcvar], ctx: &mut Context<'_>| {
                let text = first_string(args);
                let value: Value =
                    serde_json::from_str(text).map_err(|_| invalid(ctx, "a JSON string", text))?;
                to_variable(&value, ctx)
            }),
        )),
    );
    runtime.register_function(
        "powertools_base64",
        Box::new(CustomFunction::new(
            string_arg(),
            Box::new(|args: &[Rcvar], ctx: &mut Context<'_>| {
                let text = first_string(args);
                let bytes = decode_base64(text, ctx)?;
                let decoded = String::from_utf8(bytes)
                    .map_err(|_| invalid(ctx, "base64 of UTF-8 text", text))?;
                Ok(Rcvar::new(Variable::String(decoded)))
            }),
        )),
    );
    runtime.register_function(
        "powertools_base64_gzip",
        Box::new(CustomFunction::new(
            string_arg(),
            Box::new(|args: &[Rcvar], ctx: &mut Context<'_>| {
                let text = first_string(args);
                let bytes = decode_base64(text, ctx)?;
                let mut decoded = String::new();
                flate2::read::GzDecoder::new(bytes.as_slice())
                    .read_to_string(&mut decoded)
                    .map_err(|_| invalid(ctx, "base64 of gzipped UTF-8 text", text))?;
                Ok(Rcvar::new(Variable::String(decoded)))
            }),
        )),
    );
    runtime
});

/// The signature check has already run, so the first argument is a string.
fn first_string(args: &[Rcvar]) -> &str {
    args.first()
        .and_then(|a| a.as_string())
        .map_or("", String::as_str)
}

fn decode_base64(text: &str, ctx: &Context<'_>) -> Result<Vec<u8>, JmespathError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| invalid(ctx, "a base64 string", text))
}

fn invalid(ctx: &Context<'_>, expected: &str, actual: &str) -> JmespathError {
    let preview: String = actual.chars().take(40).collect();
    JmespathError::from_ctx(
        ctx,
        ErrorReason::Runtime(RuntimeError::InvalidType {
            expected: expected.to_owned(),
            actual: format!("{preview:?}"),
            position: 0,
        }),
    )
}

fn to_variable(value: &Value, ctx: &Context<'_>) -> Result<Rcvar, JmespathError> {
    Variable::try_from(value)
        .map(Rcvar::new)
        .map_err(|e| JmespathError::from_ctx(ctx, ErrorReason::Parse(e.to_string())))
}

/// A compiled JMESPath expression.
#[derive(Clone)]
pub(crate) struct JsonPath(jmespath::Expression<'static>);

impl std::fmt::Debug for JsonPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl JsonPath {
    /// Compiles `expression`, rejecting syntax errors and calls to unknown functions
    /// (which the jmespath crate only reports when a call is evaluated).
    pub(crate) fn compile(expression: &str) -> Result<Self, String> {
        let compiled = RUNTIME.compile(expression).map_err(|e| e.to_string())?;
        if let Some(name) = unknown_function(compiled.as_ast()) {
            return Err(format!("unknown function {name}()"));
        }
        Ok(Self(compiled))
    }

    pub(crate) fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub(crate) fn search(&self, data: &Value) -> Result<Value, String> {
        let found = self.0.search(data).map_err(|e| e.to_string())?;
        serde_json::to_value(&*found).map_err(|e| e.to_string())
    }
}

fn unknown_function(ast: &Ast) -> Option<String> {
    let children: Vec<&Ast> = match ast {
        Ast::Function { name, args, .. } => {
            if RUNTIME.get_function(name).is_none() {
                return Some(name.clone());
            }
            args.iter().collect()
        }
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
        | Ast::Slice { .. } => {
            vec![]
        }
    };
    children.into_iter().find_map(unknown_function)
}

/// Key material that cannot identify an event: `null`, `""`, `[]`, `{}`, or a list
/// of nulls (what a multi-select gives when no field exists). `0` and `false` are fine.
pub(crate) fn is_missing(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(items) => items.iter().all(Value::is_null),
        Value::Object(map) => map.is_empty(),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

/// JSON with object keys sorted at every level and no whitespace, so that equal
/// values hash equally whatever their field order. Hand-written because
/// `serde_json` only sorts keys while its `preserve_order` feature is off, and any
/// crate in a user's tree can turn that feature on.
pub(crate) fn canonical_json(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(v, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

/// Lowercase hex SHA-256 of `data`.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Hash of the canonical form of `value`.
pub(crate) fn hash_value(value: &Value) -> String {
    sha256_hex(canonical_json(value).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(expr: &str, data: Value) -> Value {
        JsonPath::compile(expr)
            .expect("valid")
            .search(&data)
            .expect("search")
    }

    #[test]
    fn powertools_json_parses_an_embedded_document() {
        let event = json!({"body": "{\"order\":{\"id\":7}}"});
        assert_eq!(eval("powertools_json(body).order.id", event), json!(7));
    }

    #[test]
    fn powertools_base64_and_gzip_decode() {
        let plain = base64::engine::general_purpose::STANDARD.encode("{\"a\":1}");
        assert_eq!(
            eval(
                "powertools_json(powertools_base64(d)).a",
                json!({"d": plain})
            ),
            json!(1)
        );

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, b"hello").expect("gzip");
        let zipped = base64::engine::general_purpose::STANDARD.encode(gz.finish().expect("gzip"));
        assert_eq!(
            eval("powertools_base64_gzip(d)", json!({"d": zipped})),
            json!("hello")
        );
    }

    #[test]
    fn bad_embedded_json_is_a_search_error_not_a_panic() {
        let path = JsonPath::compile("powertools_json(body)").expect("valid");
        let err = path
            .search(&json!({"body": "not json"}))
            .expect_err("must fail");
        assert!(err.contains("JSON string"), "{err}");
    }

    #[test]
    fn syntax_errors_and_unknown_functions_fail_compilation() {
        assert!(JsonPath::compile("body.[").is_err());
        let err = JsonPath::compile("a && powertools_jsn(body).id").expect_err("unknown function");
        assert!(err.contains("powertools_jsn"), "{err}");
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a = json!({"b": 1, "a": {"d": [1, {"y": 2, "x": 1}], "c": "é"}});
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"c":"é","d":[1,{"x":1,"y":2}]},"b":1}"#
        );
        assert_eq!(
            hash_value(&a),
            hash_value(&json!({"a": {"c": "é", "d": [1, {"x": 1, "y": 2}]}, "b": 1}))
        );
    }

    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn missing_key_material() {
        for missing in [
            json!(null),
            json!(""),
            json!([]),
            json!({}),
            json!([null, null]),
        ] {
            assert!(is_missing(&missing), "{missing}");
        }
        for present in [
            json!(0),
            json!(false),
            json!("x"),
            json!([null, 1]),
            json!({"a": null}),
        ] {
            assert!(!is_missing(&present), "{present}");
        }
    }
}
