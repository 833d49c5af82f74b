//! One exact text per JSON number value, for hashing.
//!
//! JSON numbers denote decimal values and producers write the same value in
//! different ways (`1`, `1.0`, `1e0`, `10e-1`), so a key must depend on the value,
//! not on the spelling: numerically equal numbers give the same text, different
//! numbers never do. Zero has no sign (`-0`, `-0.0`, `0.0` are `0`), because JSON
//! producers disagree about writing negative zero and no order id depends on it.
//!
//! The text is computed from the number's digits (serde_json keeps them with its
//! `arbitrary_precision` feature), never through `f64`, so integers beyond 64 bits
//! and decimals past `f64` precision keep all their digits, and exponents of any
//! size (`1e400`, `1e99999999999999999999999999999999`) are kept exactly.
//! Hand-written: the crates that compare decimal numbers exactly (`bigdecimal`,
//! `rust_decimal`) either pull a bignum dependency or cap the exponent and digits,
//! and all that is needed here is stripping zeros and shifting an exponent.
//!
//! The layout keeps the keys that serde_json's own output already gave: integers
//! of up to 21 digits are written plainly (`18446744073709551615`), like serde_json
//! writes `u64`/`i64`; other values follow the shortest-float layout serde_json
//! uses for `f64` (`1.5`, `0.001`, `1e-7`, `1.5e300`).

/// Integers with at most this many digits are written without an exponent.
const PLAIN_INTEGER_DIGITS: i128 = 21;
/// Non-integers whose decimal point sits within these bounds (relative to the first
/// significant digit) are written without an exponent, as serde_json writes `f64`.
const PLAIN_POINT: std::ops::RangeInclusive<i128> = -4..=16;
/// Exponents with more digits than this are handled as decimal text.
const SMALL_EXPONENT_DIGITS: usize = 30;

/// The canonical text of the JSON number `text`; `None` if `text` is not a JSON
/// number (serde_json never produces one, but the caller decides what to do).
pub(crate) fn canonical_number(text: &str) -> Option<String> {
    let parts = Parts::parse(text)?;
    let (lead, significant) = strip_zeros(parts.integer, parts.fraction);
    if significant.is_empty() {
        return Some("0".to_owned());
    }
    // The value is 0.{significant} x 10^point.
    let shift = i128::try_from(parts.integer.len()).ok()? - i128::try_from(lead).ok()?;
    let point = parts.exponent.plus(shift);
    let mut out = String::with_capacity(significant.len() + 8);
    if parts.negative {
        out.push('-');
    }
    write_digits(&mut out, significant, &point);
    Some(out)
}

/// The pieces of a JSON number's text.
struct Parts<'a> {
    negative: bool,
    integer: &'a str,
    fraction: &'a str,
    exponent: Exponent,
}

impl<'a> Parts<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
            Some(at) => (&unsigned[..at], Exponent::parse(&unsigned[at + 1..])?),
            None => (unsigned, Exponent::Small(0)),
        };
        let (integer, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        (!integer.is_empty() && all_digits(integer) && all_digits(fraction)).then_some(Self {
            negative,
            integer,
            fraction,
            exponent,
        })
    }
}

/// The significant digits of `integer` followed by `fraction`, without leading or
/// trailing zeros, and how many leading zeros were dropped.
fn strip_zeros<'a>(integer: &'a str, fraction: &'a str) -> (usize, String) {
    let digits: String = [integer, fraction].concat();
    let lead = digits.len() - digits.trim_start_matches('0').len();
    (lead, digits.trim_matches('0').to_owned())
}

/// A decimal exponent of any size: an `i128` when it fits comfortably, its digits
/// otherwise. Shifts added to it are bounded by the length of the number's text.
#[derive(Debug, Clone, PartialEq)]
enum Exponent {
    Small(i128),
    Big { negative: bool, digits: String },
}

impl Exponent {
    fn parse(text: &str) -> Option<Self> {
        let (negative, digits) = match text.as_bytes().first()? {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = digits.trim_start_matches('0');
        if digits.len() <= SMALL_EXPONENT_DIGITS {
            let magnitude: i128 = if digits.is_empty() {
                0
            } else {
                digits.parse().ok()?
            };
            return Some(Self::Small(if negative { -magnitude } else { magnitude }));
        }
        Some(Self::Big {
            negative,
            digits: digits.to_owned(),
        })
    }

    /// `self + shift`. A big exponent exceeds 10^30 in magnitude and `shift` is at
    /// most a text length, so the sum keeps the big exponent's sign.
    fn plus(&self, shift: i128) -> Self {
        match self {
            Self::Small(e) => Self::Small(e + shift),
            Self::Big { negative, digits } => {
                let magnitude = if (shift < 0) == *negative {
                    add_decimal(digits, shift.unsigned_abs())
                } else {
                    sub_decimal(digits, shift.unsigned_abs())
                };
                Self::Big {
                    negative: *negative,
                    digits: magnitude,
                }
            }
        }
    }

    fn small(&self) -> Option<i128> {
        match self {
            Self::Small(e) => Some(*e),
            Self::Big { .. } => None,
        }
    }
}

/// `digits + n`, both non-negative, in decimal.
fn add_decimal(digits: &str, mut n: u128) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(digits.len() + 1);
    for d in digits.bytes().rev() {
        let sum = u128::from(d - b'0') + n % 10;
        n = n / 10 + sum / 10;
        out.push(b'0' + (sum % 10) as u8);
    }
    while n > 0 {
        out.push(b'0' + (n % 10) as u8);
        n /= 10;
    }
    finish_decimal(out)
}

/// `digits - n`, where `digits` is the larger (see [`Exponent::plus`]).
fn sub_decimal(digits: &str, mut n: u128) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(digits.len());
    for d in digits.bytes().rev() {
        let (want, digit) = (n % 10, u128::from(d - b'0'));
        n /= 10;
        let value = if digit >= want {
            digit - want
        } else {
            n += 1; // borrow
            digit + 10 - want
        };
        out.push(b'0' + value as u8);
    }
    finish_decimal(out)
}

/// Reversed decimal digits back in order, without leading zeros.
fn finish_decimal(mut reversed: Vec<u8>) -> String {
    while reversed.len() > 1 && reversed.last() == Some(&b'0') {
        reversed.pop();
    }
    reversed.iter().rev().map(|&b| char::from(b)).collect()
}

/// Writes 0.{digits} x 10^point (digits non-empty, without leading or trailing zeros).
fn write_digits(out: &mut String, digits: String, point: &Exponent) {
    let count = i128::try_from(digits.len()).unwrap_or(i128::MAX);
    match point.small() {
        // An integer: the digits and their trailing zeros.
        Some(p) if count <= p && p <= PLAIN_INTEGER_DIGITS => {
            out.push_str(&digits);
            out.extend(std::iter::repeat_n('0', (p - count) as usize));
        }
        // A non-integer with the point among the digits.
        Some(p) if 0 < p && p < count && PLAIN_POINT.contains(&p) => {
            let (whole, fraction) = digits.split_at(p as usize);
            out.push_str(whole);
            out.push('.');
            out.push_str(fraction);
        }
        // A non-integer below one.
        Some(p) if p <= 0 && PLAIN_POINT.contains(&p) => {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', p.unsigned_abs() as usize));
            out.push_str(&digits);
        }
        _ => write_scientific(out, &digits, point),
    }
}

/// d[.ddd]e{point - 1}
fn write_scientific(out: &mut String, digits: &str, point: &Exponent) {
    let (first, rest) = digits.split_at(1);
    out.push_str(first);
    if !rest.is_empty() {
        out.push('.');
        out.push_str(rest);
    }
    out.push('e');
    match point.plus(-1) {
        Exponent::Small(e) => out.push_str(&e.to_string()),
        Exponent::Big { negative, digits } => {
            if negative {
                out.push('-');
            }
            out.push_str(&digits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(text: &str) -> String {
        canonical_number(text).expect("a JSON number")
    }

    #[test]
    fn layout() {
        for (text, want) in [
            ("0", "0"),
            ("-0.0e-7", "0"),
            ("100", "100"),
            ("1e20", "100000000000000000000"),
            ("1e21", "1e21"),
            ("123456789012345678901234", "1.23456789012345678901234e23"),
            ("12.50", "12.5"),
            ("1234567890123456.5", "1234567890123456.5"),
            ("12345678901234567.5", "1.23456789012345675e16"),
            ("0.00001", "0.00001"),
            ("0.000001", "1e-6"),
            ("-0.000123", "-0.000123"),
            ("5E-324", "5e-324"),
        ] {
            assert_eq!(canon(text), want, "{text}");
        }
    }

    #[test]
    fn huge_exponents_are_exact() {
        let big = "1".repeat(40);
        assert_eq!(canon(&format!("1e{big}")), format!("1e{big}"));
        assert_eq!(canon(&format!("1e-{big}")), format!("1e-{big}"));
        // 123e{big} = 1.23e{big + 2}; 0.00123e{big} = 1.23e{big - 3}.
        let plus2 = format!("{}3", "1".repeat(39));
        assert_eq!(canon(&format!("123e{big}")), format!("1.23e{plus2}"));
        let minus3 = format!("{}08", "1".repeat(38));
        assert_eq!(canon(&format!("0.00123e{big}")), format!("1.23e{minus3}"));
        assert_eq!(
            canon(&format!("-0.00123e-{big}")),
            format!("-1.23e-{}4", "1".repeat(39))
        );
        let carry = "9".repeat(40);
        assert_eq!(
            canon(&format!("10e{carry}")),
            format!("1e1{}", "0".repeat(40))
        );
        let borrow = format!("1{}", "0".repeat(40));
        assert_eq!(
            canon(&format!("0.1e{borrow}")),
            format!("1e{}", "9".repeat(40))
        );
        assert_eq!(
            canon("1e000000000000000000000000000000000000000400"),
            "1e400"
        );
    }

    #[test]
    fn not_a_number() {
        for text in ["", "-", "1e", "1.2.3", "a", "1e+", ".5", "NaN"] {
            assert_eq!(canonical_number(text), None, "{text}");
        }
    }
}
