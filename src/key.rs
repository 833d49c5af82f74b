//! Key derivation: select key material from the event, canonicalize it, hash it.
//!
//! A key expression is compiled once, with the config: the JMESPath subset of
//! [`syntax`] into the in-place evaluator of [`direct`], and, with the `jmespath`
//! feature, anything else by the jmespath crate ([`full`]).

use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
#[cfg(feature = "gzip")]
use std::io::Read as _;
use std::sync::Arc;

mod direct;
#[cfg(feature = "jmespath")]
mod full;
mod number;
#[cfg(feature = "powertools-compat")]
pub(crate) mod powertools;
mod syntax;

/// Default bound on the text `powertools_base64_gzip` may inflate: 6 MiB, Lambda's
/// limit for a synchronous payload. Gzip compresses up to about 1000:1, so without
/// a bound a 339 KiB event inflated to 256 MiB (20 s, 800 MB of memory); nothing
/// an idempotency key needs comes near 6 MiB (a CloudWatch Logs batch, the usual
/// gzipped payload, is at most 1 MiB inflated).
pub(crate) const DEFAULT_MAX_INFLATED_BYTES: usize = 6 * 1024 * 1024;

/// The fields `paths` read from embedded documents, all together: what
/// [`share_parses`] parses them with (computed once, with the config).
pub(crate) fn embedded_fields(paths: &[&JsonPath]) -> Arc<[String]> {
    let mut lists = Vec::new();
    for path in paths {
        path.embedded_fields(&mut lists);
    }
    sorted(lists.concat()).into()
}

/// Runs `f`, searches of one event with paths that read `fields` from embedded
/// documents ([`embedded_fields`]), parsing each document once between them
/// (the key and the validation expressions usually both read
/// `powertools_json(body)`). Each document is parsed with all the `fields`: a
/// search that reads only some finds what it would in a document of just those.
pub(crate) fn share_parses<R>(fields: &Arc<[String]>, f: impl FnOnce() -> R) -> R {
    struct Forget;
    impl Drop for Forget {
        fn drop(&mut self) {
            direct::share(None);
        }
    }
    if fields.is_empty() {
        return f();
    }
    direct::share(Some(fields));
    let _forget = Forget;
    f()
}

/// `powertools_base64`: `text` decoded from base64, as UTF-8.
fn base64_text(text: &str) -> Result<String, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| invalid_text(POWERTOOLS_BASE64, "a base64 string", text))?;
    String::from_utf8(bytes)
        .map_err(|_| invalid_text(POWERTOOLS_BASE64, "base64 of UTF-8 text", text))
}

/// `powertools_base64_gzip`: `text` decoded from base64 and gunzipped, as UTF-8 of
/// at most `limit` bytes. Inflates one byte past the limit, to tell "exactly at
/// the limit" from "over it" without inflating more.
#[cfg(feature = "gzip")]
fn gunzip_base64_text(text: &str, limit: usize) -> Result<String, String> {
    let invalid = || invalid_text(POWERTOOLS_BASE64_GZIP, "base64 of gzipped UTF-8 text", text);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| invalid_text(POWERTOOLS_BASE64_GZIP, "a base64 string", text))?;
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::GzDecoder::new(bytes.as_slice())
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|_| invalid())?;
    if out.len() > limit {
        return Err(format!(
            "{POWERTOOLS_BASE64_GZIP}: the data inflates to more than {limit} bytes, \
             the limit set by IdempotencyConfigBuilder::max_inflated_bytes"
        ));
    }
    String::from_utf8(out).map_err(|_| invalid())
}

/// A Powertools function's error for an argument that is not what it expected.
fn invalid_text(function: &str, expected: &str, actual: &str) -> String {
    let preview: String = actual.chars().take(40).collect();
    format!("{function}(): expected {expected}, given {preview:?}")
}

/// A compiled key or validation expression.
#[derive(Clone)]
pub(crate) struct JsonPath {
    text: String,
    max_inflated_bytes: usize,
    /// The top-level fields the expression can read: only those are checked for
    /// depth (and, by jmespath, converted), not the whole event.
    root_fields: Option<Vec<String>>,
    eval: Eval,
}

/// How an expression is evaluated.
#[derive(Clone)]
enum Eval {
    /// On the event in place.
    Direct(direct::Direct),
    /// By the jmespath crate.
    #[cfg(feature = "jmespath")]
    Jmespath(full::Compiled),
}

impl std::fmt::Debug for JsonPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl JsonPath {
    /// Compiles `expression`, rejecting syntax errors, expressions too long or too
    /// deeply nested to evaluate safely, and function calls that can never work.
    /// JMESPath beyond [`syntax`]'s subset needs the `jmespath` feature.
    pub(crate) fn compile(expression: &str) -> Result<Self, String> {
        if expression.len() > MAX_EXPRESSION_BYTES {
            return Err(format!(
                "the expression is {} bytes long, more than the {MAX_EXPRESSION_BYTES} bytes allowed",
                expression.len()
            ));
        }
        let (eval, root_fields) = match syntax::parse(expression) {
            Ok(direct) if direct.depth() > MAX_EXPRESSION_DEPTH => return Err(too_deep()),
            Ok(direct) => {
                let root_fields = direct.root_fields().map(sorted);
                (Eval::Direct(direct), root_fields)
            }
            // jmespath decides, with its own message for what is not JMESPath.
            #[cfg(feature = "jmespath")]
            Err(_) => {
                let (compiled, root_fields) = full::compile(expression)?;
                (Eval::Jmespath(compiled), root_fields)
            }
            #[cfg(not(feature = "jmespath"))]
            Err(syntax::ParseError::Syntax(reason) | syntax::ParseError::Unsupported(reason)) => {
                return Err(reason)
            }
        };
        Ok(Self {
            text: expression.to_owned(),
            max_inflated_bytes: DEFAULT_MAX_INFLATED_BYTES,
            root_fields,
            eval,
        })
    }

    /// Bounds what `powertools_base64_gzip` may inflate during this expression's
    /// searches.
    pub(crate) fn with_max_inflated_bytes(mut self, limit: usize) -> Self {
        self.max_inflated_bytes = limit;
        self
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    pub(crate) fn search(&self, data: &Value) -> Result<Value, String> {
        self.check_depth(data)?;
        match &self.eval {
            Eval::Direct(direct) => direct.search(data, self.max_inflated_bytes),
            #[cfg(feature = "jmespath")]
            Eval::Jmespath(compiled) => {
                compiled.search(data, self.root_fields.as_deref(), self.max_inflated_bytes)
            }
        }
    }

    /// The fields each `powertools_json` call reads from its document, where known.
    fn embedded_fields<'a>(&'a self, out: &mut Vec<&'a [String]>) {
        match &self.eval {
            Eval::Direct(direct) => direct.embedded_fields(out),
            #[cfg(feature = "jmespath")]
            Eval::Jmespath(compiled) => out.extend(
                compiled
                    .json_fields
                    .iter()
                    .map(|(_, fields)| fields.as_slice()),
            ),
        }
    }

    /// Refuses an event nested deeper than [`MAX_DATA_DEPTH`] where the expression
    /// reads it (conversion and cloning recurse).
    fn check_depth(&self, data: &Value) -> Result<(), String> {
        let too_deep = match (&self.root_fields, data) {
            (Some(fields), Value::Object(map)) => fields
                .iter()
                .filter_map(|field| map.get(field))
                .any(|value| depth_exceeds(value, MAX_DATA_DEPTH - 1)),
            _ => depth_exceeds(data, MAX_DATA_DEPTH),
        };
        match too_deep {
            true => Err(format!(
                "the event is nested more than {MAX_DATA_DEPTH} levels deep"
            )),
            false => Ok(()),
        }
    }
}

/// Longest expression accepted. The parsers and the jmespath interpreter recurse
/// once or more per nesting level (parentheses, `!`, projections), so the length bounds
/// their stack use before parsing: 255 nested parentheses or 511 `!` overflow a
/// 2 MiB thread in a debug build, 127 and 255 do not. Key expressions are a few
/// dozen bytes.
const MAX_EXPRESSION_BYTES: usize = 256;
/// Deepest expression tree accepted, which bounds the interpreter's recursion when
/// the expression is evaluated (and when it is cloned or dropped).
const MAX_EXPRESSION_DEPTH: usize = 64;

fn too_deep() -> String {
    format!("the expression is nested more than {MAX_EXPRESSION_DEPTH} levels deep")
}

fn sorted(mut fields: Vec<String>) -> Vec<String> {
    fields.sort_unstable();
    fields.dedup();
    fields
}

const POWERTOOLS_JSON: &str = "powertools_json";
const POWERTOOLS_BASE64: &str = "powertools_base64";
const POWERTOOLS_BASE64_GZIP: &str = "powertools_base64_gzip";

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

/// JSON with object keys sorted at every level, no whitespace and numbers in
/// their canonical text (see [`number`]), so that equal values hash equally
/// whatever their field order and spelling. Hand-written because `serde_json`
/// only sorts keys while its `preserve_order` feature is off, and any crate in a
/// user's tree can turn that feature on.
pub(crate) fn canonical_json(value: &Value) -> String {
    sorted_json(
        value,
        &JsonStyle {
            item_separator: ",",
            key_separator: ":",
            string: push_json_string,
            number: push_canonical_number,
        },
    )
}

/// `s` as serde_json writes a string; most need no escape and are copied as they are.
fn push_json_string(out: &mut String, s: &str) {
    if needs_escape(s) {
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    } else {
        out.push('"');
        out.push_str(s);
        out.push('"');
    }
}

/// Whether serde_json escapes a character of `s`: `"`, `\\` and controls.
fn needs_escape(s: &str) -> bool {
    s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

/// The number's exact canonical text (see [`number`]), written to `out`. An
/// integer of 64 bits is its own canonical text (at most 20 digits, written
/// plainly; `-0` reads as 0). serde_json only holds valid JSON numbers, so the
/// fallback to its own text never runs in practice.
fn push_canonical_number(out: &mut String, n: &serde_json::Number) {
    use std::fmt::Write;
    // Writing to a `String` cannot fail.
    let _ = match (n.as_i64(), n.as_u64()) {
        (Some(i), _) => write!(out, "{i}"),
        (_, Some(u)) => write!(out, "{u}"),
        _ => {
            let text = n.to_string();
            out.push_str(&number::canonical_number(&text).unwrap_or(text));
            Ok(())
        }
    };
}

/// What two hashed renderings of JSON spell differently: separators, strings and
/// numbers. Object keys are sorted in both; `true`, `false` and `null` are alike.
pub(crate) struct JsonStyle {
    pub(crate) item_separator: &'static str,
    pub(crate) key_separator: &'static str,
    pub(crate) string: fn(&mut String, &str),
    pub(crate) number: fn(&mut String, &serde_json::Number),
}

/// `value` as JSON in `style`, object keys sorted by code point (UTF-8 byte
/// order) at every level. Iterative, with an explicit stack: a `Value` built in
/// code can be nested far deeper than the thread's stack allows recursion.
pub(crate) fn sorted_json(value: &Value, style: &JsonStyle) -> String {
    enum Work<'a> {
        Value(&'a Value),
        Key(&'a str),
        Text(&'static str),
    }
    let mut out = String::with_capacity(64);
    // Key material is most often a string or a number, and validated fields a
    // list of them: no stack for those.
    let scalar = |out: &mut String, value: &Value| match value {
        Value::String(s) => (style.string)(out, s),
        Value::Number(n) => (style.number)(out, n),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Null => out.push_str("null"),
        Value::Array(_) | Value::Object(_) => {}
    };
    match value {
        Value::Array(items) if items.iter().all(|v| !v.is_array() && !v.is_object()) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(style.item_separator);
                }
                scalar(&mut out, item);
            }
            out.push(']');
            return out;
        }
        Value::Array(_) | Value::Object(_) => {}
        scalar_value => {
            scalar(&mut out, scalar_value);
            return out;
        }
    }
    let mut stack = vec![Work::Value(value)];
    while let Some(work) = stack.pop() {
        match work {
            Work::Text(text) => out.push_str(text),
            Work::Key(key) => {
                (style.string)(&mut out, key);
                out.push_str(style.key_separator);
            }
            Work::Value(Value::Object(map)) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                stack.push(Work::Text("}"));
                for (i, (k, v)) in entries.into_iter().enumerate().rev() {
                    stack.push(Work::Value(v));
                    stack.push(Work::Key(k));
                    if i > 0 {
                        stack.push(Work::Text(style.item_separator));
                    }
                }
            }
            Work::Value(Value::Array(items)) => {
                out.push('[');
                stack.push(Work::Text("]"));
                for (i, v) in items.iter().enumerate().rev() {
                    stack.push(Work::Value(v));
                    if i > 0 {
                        stack.push(Work::Text(style.item_separator));
                    }
                }
            }
            Work::Value(value) => scalar(&mut out, value),
        }
    }
    out
}

/// Deepest data [`JsonPath::search`] evaluates; deeper data is an error. The
/// conversion to JMESPath variables, the jmespath crate's comparisons and
/// `to_string`, and dropping the variables all recurse once per level. Twice
/// serde_json's parser limit (128), so any event Lambda parsed fits.
const MAX_DATA_DEPTH: usize = 256;

/// How deeply `value` nests, counted without recursion, stopping past `limit`.
fn depth_exceeds(value: &Value, limit: usize) -> bool {
    if !matches!(value, Value::Array(_) | Value::Object(_)) {
        return limit == 0;
    }
    let mut stack = vec![(value, 1usize)];
    while let Some((value, depth)) = stack.pop() {
        if depth > limit {
            return true;
        }
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            Value::Object(map) => stack.extend(map.values().map(|v| (v, depth + 1))),
            _ => {}
        }
    }
    false
}

/// Without `exact-numbers`, a number in `value` that serde_json may have rounded
/// so that two different integers read the same: an integral `f64` of magnitude
/// 2^63 or more (integers within 64 bits are read exactly, as `i64`/`u64`).
/// Decimals past `f64` precision cannot be told from exact ones and are not found.
pub(crate) fn rounded_integer(value: &Value) -> Option<&serde_json::Number> {
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if cfg!(feature = "exact-numbers") {
        return None;
    }
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Number(n)
                if n.is_f64()
                    && n.as_f64()
                        .is_some_and(|x| x.fract() == 0.0 && x.abs() >= TWO_POW_63) =>
            {
                return Some(n);
            }
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
    None
}

/// Lowercase hex SHA-256 of `data`.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lowercase hex, without a formatting call per byte (the hot path hashes twice
/// per invocation).
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]])
        .collect();
    // Hex digits are ASCII.
    String::from_utf8(digits).unwrap_or_default()
}

/// Hash of the canonical form of `value`. A string that needs no escape (most
/// keys) is hashed in place, without writing its canonical text first.
pub(crate) fn hash_value(value: &Value) -> String {
    match value {
        Value::String(s) if !needs_escape(s) => hex(&Sha256::new()
            .chain_update("\"")
            .chain_update(s)
            .chain_update("\"")
            .finalize()),
        _ => sha256_hex(canonical_json(value).as_bytes()),
    }
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
    }

    #[cfg(feature = "gzip")]
    #[test]
    fn powertools_base64_gzip_decodes() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, b"hello").expect("gzip");
        let zipped = base64::engine::general_purpose::STANDARD.encode(gz.finish().expect("gzip"));
        assert_eq!(
            eval("powertools_base64_gzip(d)", json!({"d": zipped})),
            json!("hello")
        );
    }

    #[cfg(feature = "gzip")]
    fn gzip_base64(data: &[u8]) -> String {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, data).expect("gzip");
        base64::engine::general_purpose::STANDARD.encode(gz.finish().expect("gzip"))
    }

    #[cfg(feature = "gzip")]
    #[test]
    fn gzip_inflation_stops_at_the_default_limit() {
        let bomb = gzip_base64(&vec![b'a'; DEFAULT_MAX_INFLATED_BYTES + 1]);
        let path = JsonPath::compile("powertools_base64_gzip(d)").expect("valid");
        let err = path
            .search(&json!({ "d": bomb }))
            .expect_err("over the limit");
        assert!(err.contains("6291456 bytes"), "{err}");
        let fits = gzip_base64(&vec![b'a'; DEFAULT_MAX_INFLATED_BYTES]);
        let found = path.search(&json!({ "d": fits })).expect("at the limit");
        assert_eq!(
            found.as_str().map(str::len),
            Some(DEFAULT_MAX_INFLATED_BYTES)
        );
    }

    #[cfg(feature = "gzip")]
    #[test]
    fn gzip_inflation_limit_is_per_expression() {
        let data = json!({ "d": gzip_base64(&[b'a'; 100]) });
        let small = JsonPath::compile("powertools_base64_gzip(d)")
            .expect("valid")
            .with_max_inflated_bytes(99);
        let err = small.search(&data).expect_err("over the limit");
        assert!(err.contains("99 bytes"), "{err}");
        let exact = small.clone().with_max_inflated_bytes(100);
        assert!(exact.search(&data).is_ok());
        // The limit does not leak to the next search on the thread.
        let default = JsonPath::compile("powertools_base64_gzip(d)").expect("valid");
        assert!(default.search(&data).is_ok());
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
        let err = JsonPath::compile("powertools_jsn(body).id").expect_err("unknown function");
        assert!(err.contains("powertools_jsn"), "{err}");
        #[cfg(feature = "jmespath")]
        {
            let err = JsonPath::compile("a && powertools_jsn(body).id").expect_err("unknown");
            assert!(err.contains("powertools_jsn"), "{err}");
        }
        #[cfg(not(feature = "jmespath"))]
        {
            let err = JsonPath::compile("a[*].b").expect_err("needs the feature");
            assert!(
                err.contains("projections") && err.contains("`jmespath`"),
                "{err}"
            );
        }
    }

    #[test]
    fn wrong_arity_and_literal_types_fail_compilation() {
        for (expression, mentions) in [
            ("a.powertools_base64()", "powertools_base64"),
            ("powertools_json(a, b)", "powertools_json"),
            #[cfg(feature = "jmespath")]
            ("length(@, @)", "length"),
            #[cfg(feature = "jmespath")]
            ("powertools_json(`1`)", "powertools_json"),
            #[cfg(feature = "jmespath")]
            ("abs('a')", "abs"),
            #[cfg(feature = "jmespath")]
            ("not_null()", "not_null"),
            #[cfg(feature = "jmespath")]
            ("sort_by(items, id)", "sort_by"),
            #[cfg(feature = "jmespath")]
            ("length(&a)", "length"),
            #[cfg(feature = "jmespath")]
            ("merge(`{}`, `[]`)", "merge"),
        ] {
            let err = JsonPath::compile(expression).expect_err(expression);
            assert!(err.contains(mentions), "{expression}: {err}");
        }
        #[cfg(not(feature = "jmespath-functions"))]
        {
            let err = JsonPath::compile("length(@)").expect_err("no standard functions");
            assert!(err.contains("`jmespath-functions`"), "{err}");
        }
        for expression in [
            #[cfg(feature = "jmespath-functions")]
            "length(@)",
            #[cfg(feature = "jmespath-functions")]
            "not_null(a, b, `1`, 'x')",
            #[cfg(feature = "jmespath-functions")]
            "merge(`{}`, a)",
            #[cfg(feature = "jmespath-functions")]
            "sort_by(items, &id)",
            #[cfg(feature = "jmespath-functions")]
            "contains('abc', 'b')",
            #[cfg(feature = "jmespath-functions")]
            "to_string(`1`)",
            #[cfg(feature = "gzip")]
            "powertools_json(powertools_base64_gzip(d)).id",
            "powertools_json(powertools_base64(d)).id",
            "[a, b.c]",
        ] {
            JsonPath::compile(expression).expect(expression);
        }
        #[cfg(not(feature = "gzip"))]
        {
            let err = JsonPath::compile("powertools_base64_gzip(d)").expect_err("no gzip");
            assert!(err.contains("`gzip`"), "{err}");
        }
    }

    #[test]
    fn deep_expressions_fail_compilation_without_overflowing() {
        let segments = vec!["a"; 10_000].join(".");
        let err = JsonPath::compile(&segments).expect_err("too long");
        assert!(err.contains("bytes"), "{err}");
        let n = MAX_EXPRESSION_BYTES;
        let half = (n - 1) / 2;
        for shape in [
            // The most nesting that fits in the length bound, for each recursive rule.
            format!("{}a{}", "(".repeat(half), ")".repeat(half)),
            format!("{}a", "!".repeat(n - 1)),
            format!("{}a{}", "[".repeat(half), "]".repeat(half)),
            format!("{}a{}", "{a:".repeat(n / 4 - 1), "}".repeat(n / 4 - 1)),
            vec!["a[*]"; n / 5].join("."),
            vec!["a"; n / 3].join("||"),
            vec!["a"; n / 2].join("."),
            vec!["a"; n / 2].join("|"),
        ] {
            assert!(shape.len() <= MAX_EXPRESSION_BYTES, "{}", shape.len());
            // Parses or fails, without overflowing; a deep tree fails.
            if let Err(err) = JsonPath::compile(&shape) {
                assert!(!err.is_empty());
            }
        }
        let deep = vec!["a"; MAX_EXPRESSION_DEPTH + 1].join(".");
        let err = JsonPath::compile(&deep).expect_err("too deep");
        assert!(err.contains("levels deep"), "{err}");
        let ok = vec!["a"; 30].join(".");
        JsonPath::compile(&ok).expect("30 segments");
    }

    /// Drops `value` without recursion: serde_json's `Drop` recurses per level.
    fn dismantle(value: Value) {
        let mut stack = vec![value];
        while let Some(value) = stack.pop() {
            match value {
                Value::Array(items) => stack.extend(items),
                Value::Object(map) => stack.extend(map.into_iter().map(|(_, v)| v)),
                _ => {}
            }
        }
    }

    /// `[[[...1...]]]` (arrays) or `{"a":{"a":...}}` (objects), `depth` levels deep,
    /// built in code: serde_json's parser would stop at 128.
    fn nested(depth: usize, objects: bool) -> Value {
        (0..depth).fold(json!(1), |inner, _| {
            if objects {
                // Not `json!`: it serializes an interpolated value, recursively.
                Value::Object(std::iter::once(("a".to_owned(), inner)).collect())
            } else {
                Value::Array(vec![inner])
            }
        })
    }

    #[test]
    fn deep_data_gives_a_key_or_a_search_error_without_overflowing() {
        for objects in [false, true] {
            let deep = nested(10_000, objects);
            let text = canonical_json(&deep);
            assert_eq!(text.len(), if objects { 60_001 } else { 20_001 });
            assert_eq!(hash_value(&deep).len(), 64);
            let err = JsonPath::compile("a").expect("valid").search(&deep);
            let err = err.expect_err("too deep to search");
            assert!(err.contains("levels deep"), "{err}");
            dismantle(deep);
        }
        let fine = nested(MAX_DATA_DEPTH - 1, true);
        JsonPath::compile("a")
            .expect("valid")
            .search(&fine)
            .expect("shallow enough");
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

    fn key_of(json: &str) -> String {
        hash_value(&serde_json::from_str(json).expect("valid JSON"))
    }

    #[test]
    #[cfg(feature = "exact-numbers")]
    fn numbers_beyond_64_bits_and_f64_precision_give_different_keys() {
        for (a, b) in [
            ("18446752753646647040", "18446752753646647041"),
            ("12345678901234567890123", "12345678901234567890124"),
            ("-9223372036854775809", "-9223372036854775810"),
            ("0.30000000000000000001", "0.30000000000000000002"),
            ("1.0000000000000000000000001", "1"),
            ("1e400", "1e401"),
            ("1e-400", "0"),
        ] {
            assert_ne!(key_of(a), key_of(b), "{a} vs {b}");
            let (a, b) = (format!("{{\"n\":[{a}]}}"), format!("{{\"n\":[{b}]}}"));
            assert_ne!(key_of(&a), key_of(&b), "{a} vs {b}");
        }
    }

    #[test]
    #[cfg(feature = "exact-numbers")]
    fn numbers_inside_embedded_json_stay_exact() {
        let path = JsonPath::compile("powertools_json(body).n").expect("valid");
        let key = |n: &str| {
            let event = json!({ "body": format!("{{\"n\":{n}}}") });
            hash_value(&path.search(&event).expect("search"))
        };
        assert_ne!(key("18446752753646647040"), key("18446752753646647041"));
        assert_ne!(key("0.12345678901234567890"), key("0.12345678901234567891"));
    }

    #[test]
    fn numerically_equal_numbers_give_one_key() {
        for same in [
            &[
                "1", "1.0", "1e0", "10e-1", "0.1e1", "1.000", "1E+0", "100e-2",
            ][..],
            &["0", "-0", "0.0", "-0.0", "0e5", "-0e-5", "0.000e10"],
            &["-12.5", "-125e-1", "-1.25E1", "-0.0125e3"],
            &["18446752753646647040", "1.844675275364664704e19"],
            &["123456789", "1.23456789e8", "123456789.000"],
        ] {
            let keys: Vec<_> = same.iter().map(|n| key_of(n)).collect();
            assert!(keys.iter().all(|k| *k == keys[0]), "{same:?}");
        }
    }

    #[test]
    #[cfg(feature = "exact-numbers")]
    fn numbers_are_written_with_all_their_digits() {
        for (text, canonical) in [
            ("18446752753646647040", "18446752753646647040"),
            ("0.12345678901234567890", "0.1234567890123456789"),
            ("1e400", "1e400"),
            ("-1.5e-400", "-1.5e-400"),
        ] {
            let value: Value = serde_json::from_str(text).expect("valid JSON");
            assert_eq!(canonical_json(&value), canonical, "{text}");
        }
    }

    #[test]
    fn plain_integers_and_decimals_keep_their_keys() {
        for (text, canonical) in [
            ("7", "7"),
            ("-3", "-3"),
            ("1.5", "1.5"),
            ("0.001", "0.001"),
            ("1.0", "1"),
            ("-0.0", "0"),
            ("18446744073709551615", "18446744073709551615"),
            ("-9223372036854775808", "-9223372036854775808"),
            ("1e21", "1e21"),
            ("0.0000001", "1e-7"),
        ] {
            let value: Value = serde_json::from_str(text).expect("valid JSON");
            assert_eq!(canonical_json(&value), canonical, "{text}");
        }
    }

    #[test]
    #[cfg(not(feature = "exact-numbers"))]
    fn without_exact_numbers_an_out_of_range_number_is_a_search_error() {
        let path = JsonPath::compile("powertools_json(body)").expect("valid");
        let err = path
            .search(&json!({"body": "[1e400]"}))
            .expect_err("f64 overflow");
        assert!(err.contains("JSON string"), "{err}");
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

/// Properties of keys over generated JSON: spelling never matters, value always does.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// JSON values with short keys (so objects share some) and numbers of any size.
    fn json_value() -> impl Strategy<Value = Value> {
        // Without `exact-numbers`, f64 parsing is not correctly rounded, so respelled
        // decimals may differ in the last bit: integers only.
        #[cfg(feature = "exact-numbers")]
        let number = (any::<bool>(), "[0-9]{1,30}", -500i32..500)
            .prop_map(|(neg, digits, exp)| number(neg, &digits, exp));
        #[cfg(not(feature = "exact-numbers"))]
        let number = any::<i64>().prop_map(|n| json!(n));
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            "[a-zA-Z0-9 é\"\\\\\u{1}]{0,8}".prop_map(Value::String),
            number,
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-d]{1,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// `digits`e`exp` parsed from text, so it is exact with `exact-numbers`; `None`
    /// for numbers serde_json's f64 parsing rejects without the feature.
    #[cfg(feature = "exact-numbers")]
    fn number(neg: bool, digits: &str, exp: i32) -> Value {
        let text = format!("{}{digits}e{exp}", if neg { "-" } else { "" });
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// `value` written with shuffled keys, whitespace, escaped strings and numbers
    /// respelled (extra zeros, exponent shifted into the mantissa).
    fn respell(value: &Value, seed: u64) -> String {
        match value {
            Value::String(text) => escaped(text),
            // Without `exact-numbers`, `1.0E+0` parses as f64, which rounds integers
            // past 2^53: the number spellings are only checked with the feature.
            Value::Number(n) if cfg!(feature = "exact-numbers") => {
                respell_number(&n.to_string(), seed)
            }
            Value::Array(_) | Value::Object(_) => respell_container(value, seed),
            scalar => scalar.to_string(),
        }
    }

    fn respell_container(value: &Value, seed: u64) -> String {
        match value {
            Value::Array(items) => {
                let parts: Vec<_> = items.iter().map(|v| respell(v, seed)).collect();
                format!("[ {} ]", parts.join(" ,\n"))
            }
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by_key(|(k, _)| sha256_hex(format!("{seed}{k}").as_bytes()));
                let parts: Vec<_> = entries
                    .iter()
                    .map(|(k, v)| format!("{} :\t{}", escaped(k), respell(v, seed)))
                    .collect();
                format!("{{{}}}", parts.join(", "))
            }
            _ => value.to_string(),
        }
    }

    /// Every character as a `\uXXXX` escape (surrogate pairs beyond the BMP).
    fn escaped(text: &str) -> String {
        let mut out = String::from("\"");
        for unit in text.encode_utf16() {
            out.push_str(&format!("\\u{unit:04x}"));
        }
        out.push('"');
        out
    }

    /// The same number as `text`, spelled `{mantissa}0000e{exponent}` or `0.000…`.
    fn respell_number(text: &str, seed: u64) -> String {
        let (mantissa, exp) = text.split_once(['e', 'E']).unwrap_or((text, "0"));
        let exp: i64 = exp.trim_start_matches('+').parse().unwrap_or(0);
        let extra = i64::try_from(seed % 5).unwrap_or(0);
        let zeros = "0".repeat(extra as usize);
        let mantissa = if mantissa.contains('.') {
            format!("{mantissa}{zeros}")
        } else {
            format!("{mantissa}.{zeros}0")
        };
        format!("{mantissa}E{exp:+}")
    }

    fn key(text: &str) -> String {
        hash_value(&serde_json::from_str::<Value>(text).expect("valid JSON"))
    }

    /// Expressions covering every kind of node at the event's level, and some
    /// that read the event as a whole (not pruned).
    const PRUNED_EXPRESSIONS: &[&str] = &[
        "a",
        "a.b",
        "a[0]",
        "[0]",
        #[cfg(feature = "jmespath")]
        "a[*].b",
        #[cfg(feature = "jmespath")]
        "a[].c",
        #[cfg(feature = "jmespath")]
        "a[?b == `1`]",
        "[a, b.c]",
        "{x: a, y: c.d}",
        "a || b",
        #[cfg(feature = "jmespath")]
        "a && !c",
        #[cfg(feature = "jmespath")]
        "a == b",
        #[cfg(feature = "jmespath")]
        "*",
        "@",
        #[cfg(feature = "jmespath")]
        "[*].a",
        #[cfg(feature = "jmespath")]
        "[?a == `1`]",
        #[cfg(feature = "jmespath")]
        "a.*",
        #[cfg(feature = "jmespath")]
        "c[1:2]",
        "\"a\"",
        "d.c || d",
        "a.[b, c]",
        "[[a, b], {x: c.d}]",
        "a.b.c.d",
        "powertools_json(a)",
        "powertools_json(a).b",
        "[a, powertools_json(b).c]",
        #[cfg(feature = "jmespath-functions")]
        "length(a) > `1`",
        #[cfg(feature = "jmespath-functions")]
        "not_null(a, b)",
        #[cfg(feature = "jmespath-functions")]
        "sort_by(a, &b)",
        #[cfg(feature = "jmespath-functions")]
        "max_by(a, &c)",
        #[cfg(feature = "jmespath-functions")]
        "keys(@)",
        #[cfg(feature = "jmespath-functions")]
        "to_string(a)",
        #[cfg(feature = "jmespath-functions")]
        "values(a)",
        #[cfg(feature = "jmespath-functions")]
        "type(b)",
    ];

    /// A search of the whole event and of whole embedded documents, the
    /// reference the pruned search must equal.
    fn unpruned(path: &JsonPath, data: &Value) -> Result<Value, String> {
        let eval = match &path.eval {
            Eval::Direct(direct) => Eval::Direct(direct.unpruned()),
            #[cfg(feature = "jmespath")]
            Eval::Jmespath(compiled) => Eval::Jmespath(compiled.unpruned()),
        };
        let whole = JsonPath {
            root_fields: None,
            eval,
            ..path.clone()
        };
        whole.search(data)
    }

    fn is_direct(path: &JsonPath) -> bool {
        matches!(path.eval, Eval::Direct(_))
    }

    #[test]
    fn the_subset_is_evaluated_in_place_and_the_rest_by_jmespath() {
        let event = json!({"body": "{\"order_id\": \"o-1\", \"amount\": 5, \"items\": [1, 2]}",
                           "a": {"b": 1}, "l": [10, 20, 30], "e": ""});
        for (expression, expected) in [
            ("powertools_json(body).order_id", json!("o-1")),
            (
                "powertools_json(body).[amount, order_id]",
                json!([5, "o-1"]),
            ),
            ("powertools_json(body).items[-1]", json!(2)),
            ("[a.b, missing]", json!([1, null])),
            ("{x: a.b}", json!({"x": 1})),
            ("missing.[a, b]", json!(null)),
            ("l[0]", json!(10)),
            ("l[-1]", json!(30)),
            ("l[3]", json!(null)),
            ("a[0]", json!(null)),
            ("@.a", json!({"b": 1})),
            ("e || missing || a.b", json!(1)),
            ("(missing || l)[1]", json!(20)),
        ] {
            let path = JsonPath::compile(expression).expect("valid");
            assert!(is_direct(&path), "{expression}");
            assert_eq!(path.search(&event), Ok(expected), "{expression}");
        }
        // Not JSON, or not a string: an error, as in JMESPath.
        for expression in [
            "powertools_json(a).b",
            "powertools_json(e)",
            "powertools_base64(l)",
        ] {
            let err = JsonPath::compile(expression).expect("valid").search(&event);
            assert!(err.is_err(), "{expression}: {err:?}");
        }
        let err = JsonPath::compile("powertools_base64(l)")
            .expect("valid")
            .search(&event);
        assert_eq!(
            err,
            Err("powertools_base64() needs a string, given an array".into())
        );
        for other in ["a[*].b", "a | b", "`1`"] {
            let compiled = JsonPath::compile(other);
            #[cfg(feature = "jmespath")]
            assert!(!is_direct(&compiled.expect("full JMESPath")), "{other}");
            #[cfg(not(feature = "jmespath"))]
            assert!(compiled.expect_err(other).contains("`jmespath`"), "{other}");
        }
    }

    #[test]
    fn pruning_is_applied_where_the_expression_reads_named_fields_only() {
        let fields = |e: &str| JsonPath::compile(e).expect("valid").root_fields;
        assert_eq!(
            fields("powertools_json(body).order_id"),
            Some(vec!["body".into()])
        );
        assert_eq!(fields("[b, a.x, b]"), Some(vec!["a".into(), "b".into()]));
        #[cfg(feature = "jmespath-functions")]
        assert_eq!(fields("sort_by(a, &b)"), Some(vec!["a".into()]));
        #[cfg(feature = "jmespath-functions")]
        assert_eq!(fields("keys(@)"), None);
        assert_eq!(fields("@"), None);
        assert_eq!(fields("[a, @.b]"), None);
        assert_eq!(fields("a || b[0]"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(fields("[0]"), Some(vec![]));
        #[cfg(feature = "jmespath")]
        assert_eq!(fields("*"), None);
        #[cfg(feature = "jmespath")]
        assert_eq!(fields("[?a == `1`]"), None);

        let calls = |e: &str| {
            let path = JsonPath::compile(e).expect("valid");
            let mut lists = Vec::new();
            path.embedded_fields(&mut lists);
            lists.iter().map(|f| f.to_vec()).collect::<Vec<_>>()
        };
        assert_eq!(
            calls("powertools_json(body).order_id"),
            [vec!["order_id".to_owned()]]
        );
        assert_eq!(
            calls("powertools_json(body).[b, a.c]"),
            [vec!["a".to_owned(), "b".to_owned()]]
        );
        assert!(calls("powertools_json(body)").is_empty());
        assert!(calls("powertools_json(body).powertools_json(@)").is_empty());
        #[cfg(feature = "jmespath")]
        assert!(calls("powertools_json(body).*").is_empty());
        // An index reads no field of an object (and an array is parsed whole).
        assert_eq!(calls("powertools_json(body)[0]"), [Vec::<String>::new()]);
    }

    /// Expressions over a document embedded as text in field `j`.
    const EMBEDDED_EXPRESSIONS: &[&str] = &[
        "powertools_json(j).a",
        "powertools_json(j).[a, b.c]",
        "powertools_json(j).{x: d}",
        "powertools_json(j)",
        #[cfg(feature = "jmespath")]
        "powertools_json(j).*",
        "powertools_json(j).a || powertools_json(j).b",
        "powertools_json(j).a.powertools_json(@)",
        "powertools_json(j).a[0]",
        "powertools_json(j)[0]",
        #[cfg(feature = "jmespath-functions")]
        "length(powertools_json(j))",
    ];

    /// Expressions of [`syntax`]'s subset: every kind of node, nested.
    #[cfg(feature = "jmespath")]
    fn subset_expression() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            "[a-d]".prop_map(String::from),
            "[a-d]".prop_map(|name| format!("\"{name}\"")),
            Just("@".to_owned()),
            (-3i32..3).prop_map(|i| format!("[{i}]")),
            Just("powertools_json(j)".to_owned()),
        ];
        leaf.prop_recursive(3, 16, 3, |inner| {
            prop_oneof![
                (inner.clone(), "[a-d]").prop_map(|(lhs, name)| format!("{lhs}.{name}")),
                (inner.clone(), -3i32..3).prop_map(|(lhs, i)| format!("{lhs}[{i}]")),
                (inner.clone(), prop::collection::vec(inner.clone(), 1..3))
                    .prop_map(|(lhs, items)| format!("{lhs}.[{}]", items.join(", "))),
                prop::collection::vec(inner.clone(), 1..3)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                ("[a-d]", inner.clone()).prop_map(|(key, value)| format!("{{{key}: {value}}}")),
                (inner.clone(), inner.clone()).prop_map(|(lhs, rhs)| format!("{lhs} || {rhs}")),
                inner.clone().prop_map(|e| format!("({e})")),
                inner.clone().prop_map(|e| format!("powertools_json({e})")),
                inner
                    .clone()
                    .prop_map(|e| format!("{e}.powertools_json(@)")),
            ]
        })
    }

    /// An event: any value, an object of mostly false or empty values (for `||`),
    /// or one with a JSON document embedded as text in field `j`.
    #[cfg(feature = "jmespath")]
    fn event_with_document() -> impl Strategy<Value = Value> {
        let falsy = prop_oneof![
            Just(json!("")),
            Just(json!([])),
            Just(json!({})),
            Just(json!(null)),
            Just(json!(false)),
            json_value(),
            prop::collection::vec(json_value(), 1..4).prop_map(Value::Array),
        ];
        prop_oneof![
            json_value(),
            prop::collection::vec(falsy.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-d]", falsy, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            (json_value(), json_value()).prop_map(|(document, other)| {
                json!({"j": document.to_string(), "a": other, "b": document})
            }),
        ]
    }

    fn canonical_number(n: &serde_json::Number) -> String {
        let mut out = String::new();
        push_canonical_number(&mut out, n);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn a_string_hashed_in_place_hashes_its_serde_json_text(s in any::<String>(), escaped in "[a-z\"\\\\\n\u{1}]{0,4}") {
            for s in [s, escaped] {
                let text = serde_json::to_string(&s).expect("a string");
                let value = Value::String(s);
                prop_assert_eq!(&canonical_json(&value), &text);
                prop_assert_eq!(hash_value(&value), sha256_hex(text.as_bytes()));
            }
        }

        #[test]
        fn a_list_of_scalars_is_written_as_serde_json_writes_it(
            items in prop::collection::vec(prop_oneof![
                any::<String>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
                Just(Value::Null),
            ], 0..5)
        ) {
            let value = Value::Array(items);
            prop_assert_eq!(canonical_json(&value), serde_json::to_string(&value).expect("JSON"));
            let nested = Value::Array(vec![value.clone(), json!({"b": value, "a": 1})]);
            prop_assert_eq!(canonical_json(&nested), serde_json::to_string(&nested).expect("JSON"));
        }

        #[test]
        fn integers_take_the_short_way_to_the_same_canonical_text(i in any::<i64>(), u in any::<u64>()) {
            for text in [i.to_string(), u.to_string()] {
                let n: serde_json::Number = serde_json::from_str(&text).expect("a number");
                prop_assert_eq!(Some(canonical_number(&n)), number::canonical_number(&text));
            }
            let zero: serde_json::Number = serde_json::from_str("-0").expect("a number");
            prop_assert_eq!(canonical_number(&zero), "0");
        }

        #[test]
        fn searches_sharing_parses_find_what_they_find_alone(
            document in json_value(), other in json_value(),
            a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()
        ) {
            // Two embedded documents, so that a shared parse must tell them apart.
            let event = json!({ "j": document.to_string(), "k": other.to_string() });
            let pick = |at: prop::sample::Index| EMBEDDED_EXPRESSIONS[at.index(EMBEDDED_EXPRESSIONS.len())];
            let first = JsonPath::compile(pick(a)).expect("valid");
            let second = JsonPath::compile(&pick(b).replace("(j)", "(k)")).expect("valid");
            let third = JsonPath::compile(pick(b)).expect("valid");
            let alone = [first.search(&event), second.search(&event), third.search(&event)];
            let fields = embedded_fields(&[&first, &second, &third]);
            let shared = share_parses(&fields, || {
                [first.search(&event), second.search(&event), third.search(&event)]
            });
            prop_assert_eq!(shared, alone);
            prop_assert!(direct::sharing_ended());
        }

        #[test]
        fn a_document_read_for_some_fields_gives_what_the_whole_document_gives(
            document in json_value(), at in any::<prop::sample::Index>(), spaced in any::<bool>()
        ) {
            let text = if spaced { format!(" \n{document:#}") } else { document.to_string() };
            let event = json!({ "j": text });
            let expression = EMBEDDED_EXPRESSIONS[at.index(EMBEDDED_EXPRESSIONS.len())];
            let path = JsonPath::compile(expression).expect("valid");
            prop_assert_eq!(path.search(&event), unpruned(&path, &event), "{}", expression);
        }

        #[test]
        // With `exact-numbers` the parse goes through a `Value` by construction.
        #[cfg(all(feature = "jmespath", not(feature = "exact-numbers")))]
        fn a_document_parses_to_the_variable_its_value_converts_to(value in json_value()) {
            let text = value.to_string();
            let parsed = full::parse_variable(&text).expect("valid JSON");
            prop_assert_eq!(parsed, full::to_variable(&value));
        }

        #[test]
        fn a_pruned_search_finds_what_a_search_of_the_whole_event_finds(
            event in json_value(), at in any::<prop::sample::Index>()
        ) {
            let expression = PRUNED_EXPRESSIONS[at.index(PRUNED_EXPRESSIONS.len())];
            let path = JsonPath::compile(expression).expect("valid");
            prop_assert_eq!(path.search(&event), unpruned(&path, &event), "{}", expression);
        }
    }

    proptest! {
        // Small expressions and events: many cases, in a fraction of a second.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        #[cfg(feature = "jmespath")]
        fn the_subset_evaluated_in_place_finds_what_jmespath_finds(
            expression in subset_expression(), event in event_with_document()
        ) {
            let path = JsonPath::compile(&expression).expect("valid");
            prop_assert!(is_direct(&path), "{}", expression);
            let (reference, _) = full::compile(&expression).expect("valid JMESPath");
            let found = path.search(&event);
            let expected = reference.search(&event, None, DEFAULT_MAX_INFLATED_BYTES);
            match (&found, &expected) {
                (Ok(_), Ok(_)) => prop_assert_eq!(found, expected, "{}", expression),
                _ => prop_assert_eq!(found.is_ok(), expected.is_ok(), "{}: {:?} {:?}", expression, found, expected),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn spelling_does_not_change_the_key(value in json_value(), seed in any::<u64>()) {
            let plain = hash_value(&value);
            prop_assert_eq!(key(&respell(&value, seed)), plain);
        }

        #[test]
        fn different_values_give_different_keys(a in json_value(), b in json_value()) {
            let same_text = canonical_json(&a) == canonical_json(&b);
            prop_assert_eq!(hash_value(&a) == hash_value(&b), same_text);
        }

        #[test]
        #[cfg(feature = "exact-numbers")]
        fn numbers_differing_in_one_digit_differ(
            digits in "[1-9][0-9]{15,40}", exp in -400i32..400, at in any::<prop::sample::Index>()
        ) {
            let mut other = digits.clone().into_bytes();
            let i = at.index(other.len());
            other[i] = if other[i] == b'9' { b'1' } else { other[i] + 1 };
            let other = String::from_utf8(other).expect("digits");
            prop_assert_ne!(key(&format!("{digits}e{exp}")), key(&format!("{other}e{exp}")));
            prop_assert_ne!(key(&format!("0.{digits}")), key(&format!("0.{other}")));
        }

        #[test]
        // Without the feature serde_json's f64 parsing is not correctly rounded,
        // so `1293e25` and `12930000000e18` can differ in the last bit.
        #[cfg(feature = "exact-numbers")]
        fn equal_numbers_share_a_key(int in 0u64..1_000_000, zeros in 0usize..30, exp in -30i32..30) {
            let tail = "0".repeat(zeros);
            let scaled = format!("{int}{tail}e{}", exp - i32::try_from(zeros).unwrap_or(0));
            prop_assert_eq!(key(&format!("{int}e{exp}")), key(&scaled));
            prop_assert_eq!(key(&format!("{int}.0{tail}e{exp}")), key(&format!("{int}e{exp}")));
            prop_assert_eq!(key("-0.0"), key("0"));
        }

        #[test]
        fn hostile_strings_under_powertools_functions_never_panic(text in ".{0,64}") {
            for f in [
                POWERTOOLS_JSON,
                POWERTOOLS_BASE64,
                #[cfg(feature = "gzip")]
                POWERTOOLS_BASE64_GZIP,
            ] {
                let path = JsonPath::compile(&format!("{f}(d)")).expect("valid");
                let _ = path.search(&json!({ "d": text }));
            }
        }
    }

    #[test]
    fn hostile_events_give_a_key_or_a_typed_error() {
        let huge = "x".repeat(5_000_000);
        assert_eq!(hash_value(&json!({ "s": huge })).len(), 64);
        let path = JsonPath::compile("powertools_json(s)").expect("valid");
        assert!(path.search(&json!({ "s": huge })).is_err());
        #[cfg(feature = "gzip")]
        {
            let gzip = JsonPath::compile("powertools_base64_gzip(s)").expect("valid");
            let not_gzip = base64::engine::general_purpose::STANDARD.encode("not gzip");
            assert!(gzip.search(&json!({ "s": not_gzip })).is_err());
            assert!(gzip.search(&json!({ "s": "%%%" })).is_err());
        }
        let big = JsonPath::compile("powertools_json(s)").expect("valid");
        let result = big.search(&json!({ "s": "[1e400]" }));
        #[cfg(feature = "exact-numbers")]
        assert_eq!(hash_value(&result.expect("exact")), key("[1e400]"));
        #[cfg(not(feature = "exact-numbers"))]
        assert!(result.is_err());
    }
}
