//! Record ids as AWS Lambda Powertools for Python derives them, so that a Python
//! function and its Rust port can share an idempotency table while both run.
//!
//! Powertools (`BasePersistenceLayer._generate_hash`) hashes
//! `json.dumps(material, sort_keys=True)`: Python's default separators `", "` and
//! `": "`, `ensure_ascii=True` (everything outside printable ASCII as `\uXXXX`,
//! astral characters as surrogate pairs), integers as their digits and floats as
//! Python's `repr` (`1.0`, `1e+16`, `1e-05`), with `hash_function` (`md5` by
//! default) as lowercase hex. [`python_json`] writes that text for a
//! `serde_json::Value` parsed from the same event, and [`PowertoolsHash`] names
//! the `hashlib` function.

use md5::Md5;
use serde_json::Value;
use sha2::digest::Digest;
use sha2::{Sha224, Sha256, Sha384, Sha512};

/// The `hash_function` of the Python `IdempotencyConfig` whose records are shared
/// (a `hashlib` name). Powertools' default is `md5`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PowertoolsHash {
    /// `hash_function="md5"`, the Powertools default.
    #[default]
    Md5,
    /// `hash_function="sha224"`.
    Sha224,
    /// `hash_function="sha256"`.
    Sha256,
    /// `hash_function="sha384"`.
    Sha384,
    /// `hash_function="sha512"`.
    Sha512,
}

impl PowertoolsHash {
    /// Lowercase hex digest of `data`, like Python's `hexdigest()`.
    pub(crate) fn hex(self, data: &[u8]) -> String {
        match self {
            Self::Md5 => hex::<Md5>(data),
            Self::Sha224 => hex::<Sha224>(data),
            Self::Sha256 => hex::<Sha256>(data),
            Self::Sha384 => hex::<Sha384>(data),
            Self::Sha512 => hex::<Sha512>(data),
        }
    }

    /// The hash Powertools stores for key material or validation fields.
    pub(crate) fn hash_value(self, value: &Value) -> String {
        self.hex(python_json(value).as_bytes())
    }
}

fn hex<D: Digest>(data: &[u8]) -> String {
    D::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Key material Powertools treats as missing (`is_missing_idempotency_key`): a
/// list or an object whose elements or values are all `null` (so also `[]` and
/// `{}`: a multi-select of absent fields keeps its keys), `null`, `""`. Numbers
/// and booleans never are, not even `0` and `false`.
pub(crate) fn is_missing(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(items) => items.iter().all(Value::is_null),
        Value::Object(map) => map.values().all(Value::is_null),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

/// `json.dumps(value, sort_keys=True)` of Python's `json` module, for the value
/// Python's `json.loads` makes of the same JSON text (Python sorts `str` keys by
/// code point, as [`sorted_json`](super::sorted_json) does).
pub(crate) fn python_json(value: &Value) -> String {
    super::sorted_json(
        value,
        &super::JsonStyle {
            item_separator: ", ",
            key_separator: ": ",
            string: push_string,
            number: |out, n| out.push_str(&python_number(n)),
        },
    )
}

/// A string as `json.dumps` writes it with `ensure_ascii=True`: `"` and `\`
/// escaped, `\n \r \t \b \f` by name, every other character outside `' '..='~'`
/// as `\uXXXX` (lowercase hex), astral characters as a surrogate pair.
fn push_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// A JSON number as Python renders what `json.loads` made of it: a number written
/// without `.`, `e` or `E` is an `int` (its digits; `-0` is `0`, but without
/// `exact-numbers` serde_json reads `-0` as the float `-0.0`), any other is a
/// `float`, written as `repr` writes it (`Infinity` when it overflows, as
/// `json.dumps` writes `float('inf')`).
///
/// Works from serde_json's text of the number: with `exact-numbers` that is the
/// event's own text; without, integers are `i64`/`u64` digits and floats are
/// `f64`s that serde_json writes with a `.` or an exponent and that read back
/// as the same `f64`. Integers beyond 64 bits are only exact with
/// `exact-numbers` (without it, key material holding one is refused earlier).
fn python_number(n: &serde_json::Number) -> String {
    let text = n.to_string();
    if !text.contains(['.', 'e', 'E']) {
        return match text.strip_prefix('-') {
            Some(digits) if digits.bytes().all(|b| b == b'0') => "0".to_owned(),
            _ => text,
        };
    }
    // Rust's parsing is correctly rounded, like Python's `float()`.
    let x: f64 = text.parse().unwrap_or(f64::NAN);
    python_float_repr(x)
}

/// Python's `repr(float)`: the shortest digits that read back as `x`, laid out
/// plainly when the decimal point falls within `-4 < point <= 16`, else as
/// `d.ddde±XX`.
fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if x == 0.0 {
        return format!("{sign}0.0");
    }
    let (digits, exponent) = shortest_digits(x.abs());
    // The value is 0.{digits} x 10^point.
    let point = exponent + 1;
    let count = i32::try_from(digits.len()).unwrap_or(i32::MAX);
    let body = if -4 < point && point <= 16 {
        if point <= 0 {
            format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
        } else if point >= count {
            format!("{digits}{}.0", "0".repeat((point - count) as usize))
        } else {
            let (whole, fraction) = digits.split_at(point as usize);
            format!("{whole}.{fraction}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let dot = if rest.is_empty() { "" } else { "." };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!(
            "{first}{dot}{rest}e{exp_sign}{:02}",
            exponent.unsigned_abs()
        )
    };
    format!("{sign}{body}")
}

/// The shortest decimal digits that read back as `x` (positive, finite) and the
/// exponent of the first: `x ~ d.ddd x 10^exponent`, as Python's `repr` picks
/// them. Rust's `{:e}` gives the same shortest digits except when `x` lies
/// exactly halfway between two candidates: Rust rounds the last digit up,
/// Python (David Gay's `dtoa`) to even (`1054958628518721.25` is
/// `1054958628518721.2` in Python, `...721.3` from `{:e}`). Such an `x` has
/// exactly one more significant digit than the candidates, a final `5`.
fn shortest_digits(x: f64) -> (String, i32) {
    let split = |sci: &str| -> (String, i32) {
        let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci, "0"));
        let digits = mantissa.chars().filter(char::is_ascii_digit).collect();
        (digits, exponent.parse().unwrap_or(0))
    };
    let (digits, exponent) = split(&format!("{x:e}"));
    // Every f64 is exact in at most 767 significant digits.
    let (exact, exact_exponent) = split(&format!("{x:.800e}"));
    let exact = exact.trim_end_matches('0');
    let tie = exact_exponent == exponent
        && exact.len() == digits.len() + 1
        && exact.ends_with('5')
        && digits.len() > 1;
    if !tie {
        return (digits, exponent);
    }
    // The two candidates, `below` and `below + 1` in the last place; Python keeps
    // the one with an even last digit, when it reads back as x.
    let below = exact[..digits.len()].to_owned();
    let Some(above) = increment(&below) else {
        return (digits, exponent);
    };
    let even = if below.ends_with(['0', '2', '4', '6', '8']) {
        below
    } else {
        above
    };
    let (first, rest) = even.split_at(1);
    if format!("{first}.{rest}e{exponent}").parse::<f64>() == Ok(x) {
        return (even, exponent);
    }
    (digits, exponent)
}

/// `digits + 1` in the last place, `None` when it carries out of the first digit.
fn increment(digits: &str) -> Option<String> {
    let mut bytes = digits.as_bytes().to_vec();
    for b in bytes.iter_mut().rev() {
        if *b == b'9' {
            *b = b'0';
        } else {
            *b += 1;
            return String::from_utf8(bytes).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).expect("valid JSON")
    }

    /// Expected texts and md5 digests printed by CPython 3.11's `json` module
    /// (the fourth case: floats exactly halfway between two shortest candidates):
    ///
    /// ```text
    /// python3 -c 'import json, hashlib, sys
    /// for c in [...]: s = json.dumps(c, sort_keys=True); print(json.dumps(s)); print(hashlib.md5(s.encode()).hexdigest())'
    /// ```
    ///
    /// with each case below given to Python as the same literal (`True`/`None`
    /// for `true`/`null`).
    #[test]
    fn renders_like_python_json_dumps_sort_keys() {
        let cases = [
            (
                json!("Zoë 🚀"),
                "\"Zo\\u00eb \\ud83d\\ude80\"",
                "1f63a8ff44f886f3782d4ae9607744be",
            ),
            (
                parse(r#"{"order_id": "o-1", "customer": "Zoë 🚀", "amount": 12.5, "n": 3, "ok": true, "none": null, "b": [1, 2.0]}"#),
                "{\"amount\": 12.5, \"b\": [1, 2.0], \"customer\": \"Zo\\u00eb \\ud83d\\ude80\", \"n\": 3, \"none\": null, \"ok\": true, \"order_id\": \"o-1\"}",
                "edc583ebc03a08d802146bc4f729ff63",
            ),
            (
                parse("[1.0, 1e16, 1e15, 0.0001, 0.00001, 1.5e-7, 123456789012345678.0, 5e-324, 1.7976931348623157e308, -0.0, 0.1, 2.5, 100.0, 1e22]"),
                "[1.0, 1e+16, 1000000000000000.0, 0.0001, 1e-05, 1.5e-07, 1.2345678901234568e+17, 5e-324, 1.7976931348623157e+308, -0.0, 0.1, 2.5, 100.0, 1e+22]",
                "f6ba05919f6ea7a546d660f285d8bf04",
            ),
            (
                json!("quote\" back\\ nl\n tab\t cr\r bs\u{8} ff\u{c} nul\u{0} us\u{1f} del\u{7f} é \u{ffff} 𝄞"),
                "\"quote\\\" back\\\\ nl\\n tab\\t cr\\r bs\\b ff\\f nul\\u0000 us\\u001f del\\u007f \\u00e9 \\uffff \\ud834\\udd1e\"",
                "7f3630d449fb6330004799d57f5921d8",
            ),
            (
                parse(r#"{"b": {"z": 1, "a": [], "m": {}}, "a": "x", "é": 1, "Z": 2, "_": 3}"#),
                "{\"Z\": 2, \"_\": 3, \"a\": \"x\", \"b\": {\"a\": [], \"m\": {}, \"z\": 1}, \"\\u00e9\": 1}",
                "718ba2473defbaaffa3bfd2b841f903f",
            ),
            (
                parse("[1054958628518721.25, 34900697272382.8125, 0.5, 2.5, 1.25e-10]"),
                "[1054958628518721.2, 34900697272382.812, 0.5, 2.5, 1.25e-10]",
                "3d3933ff949fb3f831c1a688f9cddf4e",
            ),
            (
                parse("[18446744073709551615, -9223372036854775808, 0, -1]"),
                "[18446744073709551615, -9223372036854775808, 0, -1]",
                "4125109019af5e257519524f5adddbd4",
            ),
        ];
        for (value, text, md5) in cases {
            assert_eq!(python_json(&value), text, "{value}");
            assert_eq!(PowertoolsHash::Md5.hash_value(&value), md5, "{value}");
        }
    }

    /// `python3 -c 'import json; print(json.dumps(json.loads("[1E2, 10e-1, 7]"), sort_keys=True))'`
    /// prints `[100.0, 1.0, 7]`. With `exact-numbers` the spelling is known
    /// exactly: Python writes `-0` as `0`, `1e400` as `Infinity`, and big integers
    /// with all their digits. Without it serde_json reads `-0` as the float `-0.0`
    /// (Python: `-0.0`), a difference only an event holding `-0` would see.
    #[test]
    fn numbers_are_python_ints_or_floats_by_their_spelling() {
        assert_eq!(python_json(&parse("[1E2, 10e-1, 7]")), "[100.0, 1.0, 7]");
        #[cfg(feature = "exact-numbers")]
        assert_eq!(
            python_json(&parse(
                "[-0, 1e400, -1e400, 123456789012345678901234567890, -0.0]"
            )),
            "[0, Infinity, -Infinity, 123456789012345678901234567890, -0.0]"
        );
    }

    /// `python3 -c 'import hashlib; print(hashlib.NAME(b"\\"o-1\\"").hexdigest())'`
    /// for each name: the hash of the key material `"o-1"`.
    #[test]
    fn hash_functions_match_hashlib() {
        let value = json!("o-1");
        for (hash, want) in [
            (PowertoolsHash::Md5, "cbcbdb948de16bfe7e49a81f91500ab1"),
            (PowertoolsHash::Sha224, "178f6a05b2bba1246c61c8921fc88993a575810e98d66c637dda9e1b"),
            (PowertoolsHash::Sha256, "00d5c8b71f851bbe47626a189b20fb19c11753e244bb658095c370ba3798f85c"),
            (PowertoolsHash::Sha384, "5afb56f3efdf7a768a70c1ec3b5570068bb1bbec6d76821e60a813bd6754a8a453f1753e43ebbe2322a61f2fc87890de"),
            (PowertoolsHash::Sha512, "416a83477f08384397913e2bbfd35fe6e46715566578b73400250947e62002fab518f23624667ed1836f5792e7b06236170e64153f65618277d63a0a63494709"),
        ] {
            assert_eq!(hash.hash_value(&value), want, "{hash:?}");
        }
    }

    #[test]
    fn missing_material_follows_powertools() {
        for missing in [
            json!(null),
            json!(""),
            json!([]),
            json!([null, null]),
            json!({}),
            json!({"a": null}),
        ] {
            assert!(is_missing(&missing), "{missing}");
        }
        for present in [
            json!(0),
            json!(false),
            json!("x"),
            json!([null, 1]),
            json!({"a": 0}),
        ] {
            assert!(!is_missing(&present), "{present}");
        }
    }
}
