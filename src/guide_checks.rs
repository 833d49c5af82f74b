//! Checks that keep the README, the guide (`docs/`) and the CHANGELOG true to the
//! code: the dependency lines a user copies name this version, and the
//! reference's `errorType` table lists every error the crate can report.

use crate::{Error, IdempotencyError, PermanentError};
use std::collections::BTreeMap;

/// Every text a user copies a dependency line from. A chapter added to `docs/`
/// must be added here too: [`every_chapter_is_checked`] fails until it is.
const DOCS: &[(&str, &str)] = &[
    ("README.md", include_str!("../README.md")),
    ("CHANGELOG.md", include_str!("../CHANGELOG.md")),
    (
        "docs/getting_started.md",
        include_str!("../docs/getting_started.md"),
    ),
    ("docs/keys.md", include_str!("../docs/keys.md")),
    (
        "docs/event_sources.md",
        include_str!("../docs/event_sources.md"),
    ),
    (
        "docs/steps_and_outbox.md",
        include_str!("../docs/steps_and_outbox.md"),
    ),
    ("docs/patterns.md", include_str!("../docs/patterns.md")),
    (
        "docs/testing_your_handler.md",
        include_str!("../docs/testing_your_handler.md"),
    ),
    ("docs/production.md", include_str!("../docs/production.md")),
    (
        "docs/table_and_iam.md",
        include_str!("../docs/table_and_iam.md"),
    ),
    ("docs/redis.md", include_str!("../docs/redis.md")),
    (
        "docs/large_responses.md",
        include_str!("../docs/large_responses.md"),
    ),
    (
        "docs/multi_region.md",
        include_str!("../docs/multi_region.md"),
    ),
    (
        "docs/migrating_from_powertools.md",
        include_str!("../docs/migrating_from_powertools.md"),
    ),
    (
        "docs/durable_functions.md",
        include_str!("../docs/durable_functions.md"),
    ),
    ("docs/developing.md", include_str!("../docs/developing.md")),
    ("docs/reference.md", include_str!("../docs/reference.md")),
];

const REFERENCE: &str = include_str!("../docs/reference.md");

#[test]
fn every_chapter_is_checked() {
    let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");
    for entry in std::fs::read_dir(docs).expect("docs/ is readable") {
        let name = entry.expect("a directory entry").file_name();
        let path = format!("docs/{}", name.to_string_lossy());
        assert!(
            DOCS.iter().any(|(listed, _)| *listed == path),
            "{path} is not in guide_checks::DOCS"
        );
    }
}

/// The version requirement of a `lambda-idempotency = ...` dependency line:
/// `"0.1"`, or the `version` of an inline table. A `path` or `git` source is an
/// error: users depend on the published crate.
fn version_requirement(line: &str) -> Result<&str, String> {
    let spec = line
        .split_once("lambda-idempotency = ")
        .map(|(_, spec)| spec.trim())
        .ok_or("no dependency")?;
    if spec.contains("path =") || spec.contains("git =") {
        return Err("names a path or git source instead of a version".into());
    }
    let quoted = match spec.strip_prefix('{') {
        Some(table) => table
            .split_once("version = ")
            .map(|(_, rest)| rest)
            .ok_or("has no version")?,
        None => spec,
    };
    quoted
        .strip_prefix('"')
        .and_then(|rest| rest.split_once('"'))
        .map(|(version, _)| version)
        .ok_or_else(|| "has no quoted version".into())
}

#[test]
fn dependency_lines_name_this_version() {
    let package: Vec<&str> = env!("CARGO_PKG_VERSION").split('.').take(2).collect();
    let mut lines = 0;
    for (file, text) in DOCS {
        for (number, line) in text.lines().enumerate() {
            if !line.contains("lambda-idempotency = ") {
                continue;
            }
            lines += 1;
            let at = format!("{file}:{}: {line}", number + 1);
            let version = version_requirement(line).unwrap_or_else(|err| panic!("{at}: {err}"));
            let major_minor: Vec<&str> = version.split('.').take(2).collect();
            assert_eq!(
                major_minor,
                package,
                "{at}: not compatible with {} (same major.minor)",
                env!("CARGO_PKG_VERSION")
            );
        }
    }
    assert!(lines >= 3, "the README and the guide show dependency lines");
}

#[test]
fn version_requirements_are_read_from_both_forms() {
    let line = r#"lambda-idempotency = { version = "0.1", features = ["testing"] }"#;
    assert_eq!(version_requirement(line), Ok("0.1"));
    assert_eq!(
        version_requirement(r#"lambda-idempotency = "0.1""#),
        Ok("0.1")
    );
    assert!(version_requirement(r#"lambda-idempotency = { path = ".." }"#).is_err());
}

/// One error of each kind.
fn one_of_each() -> Vec<IdempotencyError> {
    let key = || "orders#k".to_owned();
    vec![
        IdempotencyError::AlreadyInProgress { key: key() },
        IdempotencyError::PayloadMismatch { key: key() },
        IdempotencyError::MissingKey {
            expression: "order_id".into(),
        },
        IdempotencyError::InvalidEvent("not JSON".into()),
        IdempotencyError::Serialization {
            key: key(),
            source: serde_json::from_str::<u8>("x").expect_err("not a number"),
        },
        IdempotencyError::ResponseTooLarge {
            key: key(),
            size: 500_000,
            limit: 409_600,
        },
        IdempotencyError::LostOwnership { key: key() },
        IdempotencyError::NonDeterministic {
            key: key(),
            position: 0,
            journaled: "charge".into(),
            called: "refund".into(),
            detail: "the handler now calls \"refund\"".into(),
        },
        IdempotencyError::Delivery("refused".into()),
        IdempotencyError::NoEffects,
        IdempotencyError::OutboxTooLarge {
            key: key(),
            items: 101,
            bytes: 1,
            limit: "100 items per transaction",
        },
        IdempotencyError::TransactionTooLarge {
            key: key(),
            items: 101,
            bytes: 1,
            limit: "100 items per transaction",
        },
        IdempotencyError::WriteConditionFailed {
            key: key(),
            table: "orders".into(),
            item: "{pk: \"o-1\"}".into(),
            index: 0,
        },
        IdempotencyError::MalformedRecord {
            key: key(),
            attribute: "status".into(),
            problem: "is missing".into(),
        },
        IdempotencyError::Unsupported {
            missing: "step journal",
        },
        IdempotencyError::CompensationFailed {
            key: key(),
            step: "charge".into(),
            failure: "address rejected".into(),
            source: "refund refused".into(),
        },
        IdempotencyError::Store("throttled".into()),
    ]
}

/// Each variant's name, and its place in [`one_of_each`]. No wildcard arm: a
/// variant added to `IdempotencyError` fails to compile here until it is named,
/// and the test below then fails until `one_of_each` builds it.
fn variant(err: &IdempotencyError) -> (usize, &'static str) {
    match err {
        IdempotencyError::AlreadyInProgress { .. } => (0, "AlreadyInProgress"),
        IdempotencyError::PayloadMismatch { .. } => (1, "PayloadMismatch"),
        IdempotencyError::MissingKey { .. } => (2, "MissingKey"),
        IdempotencyError::InvalidEvent(_) => (3, "InvalidEvent"),
        IdempotencyError::Serialization { .. } => (4, "Serialization"),
        IdempotencyError::ResponseTooLarge { .. } => (5, "ResponseTooLarge"),
        IdempotencyError::LostOwnership { .. } => (6, "LostOwnership"),
        IdempotencyError::NonDeterministic { .. } => (7, "NonDeterministic"),
        IdempotencyError::Delivery(_) => (8, "Delivery"),
        IdempotencyError::NoEffects => (9, "NoEffects"),
        IdempotencyError::OutboxTooLarge { .. } => (10, "OutboxTooLarge"),
        IdempotencyError::TransactionTooLarge { .. } => (11, "TransactionTooLarge"),
        IdempotencyError::WriteConditionFailed { .. } => (12, "WriteConditionFailed"),
        IdempotencyError::MalformedRecord { .. } => (13, "MalformedRecord"),
        IdempotencyError::Unsupported { .. } => (14, "Unsupported"),
        IdempotencyError::CompensationFailed { .. } => (15, "CompensationFailed"),
        IdempotencyError::Store(_) => (16, "Store"),
    }
}

/// The reference chapter's `errorType` table: each `errorType` named in the
/// first column, with the text of the second (where the error comes from).
fn error_type_table() -> BTreeMap<String, String> {
    let section = REFERENCE
        .split("\n## ")
        .find(|section| section.starts_with("Errors and their `errorType`"))
        .expect("the reference has a section on errorTypes");
    let mut table = BTreeMap::new();
    // The rows after the header and its `|---|` separator.
    let rows = section
        .lines()
        .filter(|line| line.starts_with('|'))
        .skip_while(|line| !line.starts_with("|---"))
        .skip(1);
    for row in rows {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let (first, from) = (cells[0], cells.get(1).copied().unwrap_or_default());
        // Names are quoted in the first column; the handler's own row quotes none.
        for name in first.split('`').skip(1).step_by(2) {
            let previous = table.insert(name.to_owned(), from.replace('`', ""));
            assert!(previous.is_none(), "{name} is listed twice");
        }
    }
    table
}

#[test]
fn the_reference_lists_every_error_type() {
    let errors = one_of_each();
    let mut places: Vec<usize> = errors.iter().map(|err| variant(err).0).collect();
    places.sort_unstable();
    assert_eq!(
        places,
        (0..errors.len()).collect::<Vec<_>>(),
        "one_of_each builds every variant once"
    );

    let mut table = error_type_table();
    for err in &errors {
        let (_, name) = variant(err);
        let from = table.remove(err.error_type()).unwrap_or_else(|| {
            panic!(
                "docs/reference.md: no row for {} ({name})",
                err.error_type()
            )
        });
        assert_eq!(from, name, "the row of {}", err.error_type());
        // What Lambda receives is the same name.
        let diagnostic = lambda_runtime::Diagnostic::from(err_again(err));
        assert_eq!(diagnostic.error_type, err.error_type());
    }

    // A replayed permanent error.
    let replayed = Error::<PermanentError>::Replayed(PermanentError::new("card declined"));
    let diagnostic = lambda_runtime::Diagnostic::from(replayed);
    assert_eq!(
        table.remove(&diagnostic.error_type).as_deref(),
        Some("Error::Replayed"),
        "docs/reference.md: the row of {}",
        diagnostic.error_type
    );

    assert!(
        table.is_empty(),
        "docs/reference.md lists errorTypes the crate never reports: {table:?}"
    );
}

/// The same kind of error again (the errors hold sources that do not clone).
fn err_again(err: &IdempotencyError) -> IdempotencyError {
    let (place, _) = variant(err);
    one_of_each()
        .into_iter()
        .find(|other| variant(other).0 == place)
        .expect("one_of_each builds every variant")
}
