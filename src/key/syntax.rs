//! Key expressions without the jmespath crate: the part of JMESPath that nearly
//! every key and validation expression is written in, parsed straight into the
//! in-place evaluator's tree ([`Direct`]).
//!
//! Accepted: fields (`order_id`, `"quoted name"`), sub-expressions (`a.b`),
//! indexes (`a[0]`, `[-1]`), multi-selects (`[a, b]`, `{x: a}`), `@`, `||`,
//! parentheses and the Powertools functions. Anything else of JMESPath
//! (projections, filters, pipes, literals, comparisons, the standard functions)
//! is [`ParseError::Unsupported`]: it compiles with the jmespath crate under the
//! `jmespath` feature. Hand-written because the crate's parser, interpreter and
//! value tree are most of what the wrapper adds to a function's binary (some
//! 150 KB of 0.8 MiB), for expressions few keys need; a property test checks that
//! what this accepts, jmespath evaluates to the same result.

use super::direct::Direct;
use super::{POWERTOOLS_BASE64, POWERTOOLS_BASE64_GZIP, POWERTOOLS_JSON};

/// Why an expression did not parse.
#[derive(Debug, PartialEq)]
pub(super) enum ParseError {
    /// Not JMESPath, or a function call that cannot work.
    Syntax(String),
    /// JMESPath beyond this subset: what it uses.
    Unsupported(String),
}

/// JMESPath's standard functions (jmespath 0.5's built-ins).
pub(super) const STANDARD_FUNCTIONS: &[&str] = &[
    "abs",
    "avg",
    "ceil",
    "contains",
    "ends_with",
    "floor",
    "join",
    "keys",
    "length",
    "map",
    "max",
    "max_by",
    "merge",
    "min",
    "min_by",
    "not_null",
    "reverse",
    "sort",
    "sort_by",
    "starts_with",
    "sum",
    "to_array",
    "to_number",
    "to_string",
    "type",
    "values",
];

type Parsed = Result<Direct, ParseError>;

/// `text` as an expression of the subset. Recursive descent: the caller bounds the
/// length (`MAX_EXPRESSION_BYTES`), which bounds the recursion.
pub(super) fn parse(text: &str) -> Parsed {
    let mut parser = Parser { text, pos: 0 };
    let expression = parser.or()?;
    parser.skip_whitespace();
    match parser.peek() {
        None => Ok(expression),
        Some(_) => Err(parser.unexpected("the end of the expression")),
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    /// `a || b || ...`: the loosest binding of the subset.
    fn or(&mut self) -> Parsed {
        let mut lhs = self.postfix()?;
        loop {
            self.skip_whitespace();
            if !self.rest().starts_with("||") {
                return Ok(lhs);
            }
            self.pos += 2;
            lhs = Direct::Or(Box::new(lhs), Box::new(self.postfix()?));
        }
    }

    /// A value followed by any number of `.rhs` and `[index]`.
    fn postfix(&mut self) -> Parsed {
        let mut expression = self.primary()?;
        loop {
            self.skip_whitespace();
            let rhs = match self.peek() {
                Some(b'.') => {
                    self.pos += 1;
                    self.after_dot()?
                }
                Some(b'[') => match self.bracket_index()? {
                    Some(index) => Direct::Index(index),
                    None => return Err(self.unexpected("an index")),
                },
                _ => return Ok(expression),
            };
            expression = Direct::sub(expression, rhs);
        }
    }

    fn primary(&mut self) -> Parsed {
        self.skip_whitespace();
        match self.peek() {
            Some(b'@') => {
                self.pos += 1;
                Ok(Direct::Current)
            }
            Some(b'(') => {
                self.pos += 1;
                let inner = self.or()?;
                self.expect(b')')?;
                Ok(inner)
            }
            Some(b'[') => match self.bracket_index()? {
                Some(index) => Ok(Direct::Index(index)),
                None => self.list(),
            },
            Some(b'{') => self.hash(),
            _ => self.name_or_call(),
        }
    }

    /// What may follow a `.`: a field, a function call or a multi-select.
    fn after_dot(&mut self) -> Parsed {
        self.skip_whitespace();
        match self.peek() {
            Some(b'[') => self.list(),
            Some(b'{') => self.hash(),
            _ => self.name_or_call(),
        }
    }

    fn name_or_call(&mut self) -> Parsed {
        if self.peek() == Some(b'"') {
            return Ok(Direct::Field(self.quoted()?));
        }
        let start = self.pos;
        let name = self.identifier()?;
        self.skip_whitespace();
        if self.peek() != Some(b'(') {
            return Ok(Direct::Field(name.to_owned()));
        }
        self.pos += 1;
        let function = match name {
            POWERTOOLS_JSON | POWERTOOLS_BASE64 => name,
            #[cfg(feature = "gzip")]
            POWERTOOLS_BASE64_GZIP => name,
            #[cfg(not(feature = "gzip"))]
            POWERTOOLS_BASE64_GZIP => {
                return Err(ParseError::Syntax(format!(
                    "{name}() needs the lambda-idempotency feature `gzip`"
                )))
            }
            standard if STANDARD_FUNCTIONS.contains(&standard) => {
                return Err(ParseError::Unsupported(format!(
                    "{name}() is a JMESPath standard function: it needs the lambda-idempotency feature `jmespath-functions`"
                )))
            }
            _ => {
                self.pos = start;
                return Err(ParseError::Syntax(format!("unknown function {name}()")));
            }
        };
        self.skip_whitespace();
        let mut args = match self.peek() {
            Some(b')') => Vec::new(),
            _ => self.expressions()?,
        };
        self.expect(b')')?;
        let given = args.len();
        match (args.pop(), given) {
            (Some(arg), 1) => Ok(Direct::call(function, arg)),
            _ => Err(ParseError::Syntax(format!(
                "{function}() takes 1 argument(s), given {given}"
            ))),
        }
    }

    /// `[a, b, ...]`, at a `[` that does not open an index.
    fn list(&mut self) -> Parsed {
        self.expect(b'[')?;
        let elements = self.expressions()?;
        self.expect(b']')?;
        Ok(Direct::List(elements))
    }

    /// One or more expressions separated by `,`.
    fn expressions(&mut self) -> Result<Vec<Direct>, ParseError> {
        let mut items = vec![self.or()?];
        self.skip_whitespace();
        while self.peek() == Some(b',') {
            self.pos += 1;
            items.push(self.or()?);
            self.skip_whitespace();
        }
        Ok(items)
    }

    /// `{key: value, ...}`.
    fn hash(&mut self) -> Parsed {
        self.expect(b'{')?;
        let mut entries = Vec::new();
        loop {
            self.skip_whitespace();
            let key = match self.peek() {
                Some(b'"') => self.quoted()?,
                _ => self.identifier()?.to_owned(),
            };
            self.expect(b':')?;
            entries.push((key, self.or()?));
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                _ => break,
            }
        }
        self.expect(b'}')?;
        Ok(Direct::Hash(entries))
    }

    /// At a `[`: `Some(index)` for `[n]` (consumed), `None` when the bracket opens
    /// something else (not consumed); projections, filters, flattens and slices
    /// are unsupported.
    fn bracket_index(&mut self) -> Result<Option<i32>, ParseError> {
        let open = self.pos;
        self.pos += 1;
        self.skip_whitespace();
        let found = match self.peek() {
            Some(b'-' | b'0'..=b'9') => {
                let start = self.pos;
                self.pos += 1;
                while matches!(self.peek(), Some(b'0'..=b'9')) {
                    self.pos += 1;
                }
                let digits = &self.text[start..self.pos];
                let index = digits.parse::<i32>().map_err(|_| {
                    ParseError::Syntax(format!("{digits} is not an index (at byte {start})"))
                })?;
                self.skip_whitespace();
                match self.peek() {
                    Some(b':') => return Err(unsupported("slices (`[a:b]`)")),
                    _ => self.expect(b']')?,
                }
                Some(index)
            }
            Some(b'*') => return Err(unsupported("projections (`[*]`)")),
            Some(b']') => return Err(unsupported("flattening (`[]`)")),
            Some(b'?') => return Err(unsupported("filters (`[?...]`)")),
            Some(b':') => return Err(unsupported("slices (`[a:b]`)")),
            _ => None,
        };
        if found.is_none() {
            self.pos = open;
        }
        Ok(found)
    }

    /// An unquoted identifier: `[A-Za-z_][A-Za-z0-9_]*`.
    fn identifier(&mut self) -> Result<&'a str, ParseError> {
        let start = self.pos;
        if matches!(self.peek(), Some(b'A'..=b'Z' | b'a'..=b'z' | b'_')) {
            self.pos += 1;
            while matches!(
                self.peek(),
                Some(b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_')
            ) {
                self.pos += 1;
            }
            let text: &'a str = self.text;
            return Ok(&text[start..self.pos]);
        }
        Err(self.unexpected("a field name"))
    }

    /// A quoted identifier: a JSON string, escapes and all.
    fn quoted(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        let bytes = self.text.as_bytes();
        let mut at = start + 1;
        while let Some(&byte) = bytes.get(at) {
            match byte {
                b'\\' => at += 2,
                b'"' => {
                    self.pos = at + 1;
                    return serde_json::from_str(&self.text[start..self.pos]).map_err(|e| {
                        ParseError::Syntax(format!("invalid quoted name at byte {start}: {e}"))
                    });
                }
                _ => at += 1,
            }
        }
        Err(ParseError::Syntax(format!(
            "the quoted name at byte {start} is not closed"
        )))
    }

    fn expect(&mut self, byte: u8) -> Result<(), ParseError> {
        self.skip_whitespace();
        if self.peek() == Some(byte) {
            self.pos += 1;
            return Ok(());
        }
        Err(self.unexpected(&format!("`{}`", char::from(byte))))
    }

    /// The error at the current position, where `expected` was expected: JMESPath
    /// this subset leaves out is named as such.
    fn unexpected(&self, expected: &str) -> ParseError {
        let rest = self.rest();
        let construct = match rest.as_bytes().first() {
            None => {
                return ParseError::Syntax(format!(
                    "the expression ends where {expected} is expected"
                ))
            }
            Some(b'*') => "wildcards (`*`)",
            Some(b'|') if rest.starts_with("||") => "",
            Some(b'|') => "pipes (`|`)",
            Some(b'&') if rest.starts_with("&&") => "`&&`",
            Some(b'&') => "expression references (`&expr`)",
            Some(b'!') if !rest.starts_with("!=") => "`!`",
            Some(b'<' | b'>' | b'=' | b'!') => "comparisons",
            Some(b'`') => "literals (`` `...` ``)",
            Some(b'\'') => "raw strings (`'...'`)",
            _ => "",
        };
        if construct.is_empty() {
            let found: String = rest.chars().take(12).collect();
            return ParseError::Syntax(format!(
                "expected {expected} at byte {}, found `{found}`",
                self.pos
            ));
        }
        unsupported(construct)
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn rest(&self) -> &str {
        self.text.get(self.pos..).unwrap_or("")
    }
}

fn unsupported(construct: &str) -> ParseError {
    ParseError::Unsupported(format!(
        "{construct} need the lambda-idempotency feature `jmespath` (without it an \
         expression is made of fields, `a.b`, indexes, multi-selects, `@`, `||` and \
         the Powertools functions)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax(text: &str) -> String {
        match parse(text) {
            Err(ParseError::Syntax(message)) => message,
            other => panic!("{text}: {other:?}"),
        }
    }

    fn unsupported(text: &str) -> String {
        match parse(text) {
            Err(ParseError::Unsupported(message)) => message,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn the_subset_parses() {
        for text in [
            "order_id",
            "\"quoted \\\" name\".b",
            " a . b [ 0 ] ",
            "[-1]",
            "a[0][1].c",
            "[a, b.c]",
            "a.[b, c]",
            "{x: a, \"y z\": b[0]}",
            "a.{x: b}",
            "@",
            "@.a",
            "a || b.c || [d]",
            "(a || b).c",
            "powertools_json(body).order_id",
            "powertools_json(powertools_base64(kinesis.data)).[a, b]",
            "a.powertools_json(@).b",
            "[a, powertools_json(b).c]",
        ] {
            assert!(parse(text).is_ok(), "{text}: {:?}", parse(text));
        }
    }

    #[test]
    fn the_rest_of_jmespath_is_named_as_needing_the_feature() {
        for (text, construct) in [
            ("a[*].b", "projections"),
            ("a[]", "flattening"),
            ("a[?b == `1`]", "filters"),
            ("a[1:2]", "slices"),
            ("a[:2]", "slices"),
            ("a.*", "wildcards"),
            ("*", "wildcards"),
            ("a | b", "pipes"),
            ("a && b", "`&&`"),
            ("!a", "`!`"),
            ("a == b", "comparisons"),
            ("a != b", "comparisons"),
            ("a < b", "comparisons"),
            ("`1`", "literals"),
            ("'x'", "raw strings"),
            ("powertools_json(`1`)", "literals"),
        ] {
            let message = unsupported(text);
            assert!(message.contains(construct), "{text}: {message}");
            assert!(message.contains("`jmespath`"), "{text}: {message}");
        }
        let message = unsupported("length(@)");
        assert!(message.contains("`jmespath-functions`"), "{message}");
    }

    #[test]
    fn syntax_errors_say_where() {
        assert!(syntax("body.[").contains("ends"));
        assert!(syntax("a.").contains("field name"));
        assert!(syntax("a[b]").contains("index"));
        assert!(syntax("a b").contains("byte 2"));
        assert!(syntax("{}").contains("field name"));
        assert!(syntax("\"open").contains("not closed"));
        assert!(syntax("nope(a)").contains("unknown function nope()"));
        assert!(syntax("a.powertools_base64()").contains("takes 1 argument(s), given 0"));
        assert!(syntax("powertools_json(a, b)").contains("given 2"));
        assert!(syntax("[99999999999]").contains("not an index"));
        #[cfg(not(feature = "gzip"))]
        assert!(syntax("powertools_base64_gzip(d)").contains("`gzip`"));
    }
}
