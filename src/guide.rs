//! The guide: how to use this crate, chapter by chapter, in the order you learn it.
//!
//! Each chapter is a Markdown file of the repository's `docs/` folder, rendered
//! here by rustdoc (and readable on GitHub as it is). Every Rust block in it is
//! compiled as a doc test, so the guide cannot drift from the code.
//!
//! 1. [Getting started](getting_started): a wrapped handler, the Cargo features,
//!    what a wrapped call does in each situation, the rules.
//! 2. [Keys](keys): what a record's key is made of, key expressions, numbers,
//!    limits.
//! 3. [Event sources](event_sources): SQS batches, DynamoDB Streams and Kinesis,
//!    API Gateway's `Idempotency-Key`.
//! 4. [Steps and the outbox](steps_and_outbox): calls to other systems with
//!    derived keys, messages sent after the commit, running unprotected, the
//!    crash matrix.
//! 5. [Patterns](patterns): which pattern for which effect; atomic business
//!    writes, version-checked writes, sagas with compensation.
//! 6. [Durable functions and other engines](durable_functions): SQS in front
//!    of a Lambda durable function, the two-phase gate for work that spans
//!    invocations.
//! 7. [Testing your handler](testing_your_handler): the `testing` kit runs your
//!    handler twice, concurrently and crashed at every phase.
//! 8. [Production](production): metrics, the observe-only rollout, the runbook,
//!    the operator's CLI.
//! 9. [The table and IAM](table_and_iam): the items, the attribute names, the
//!    actions each function needs.
//! 10. [The Redis store](redis): Redis, Valkey, ElastiCache and MemoryDB; the
//!     layout, scripts, expiry, retries, durability next to DynamoDB's, TLS.
//! 11. [Large responses](large_responses): responses over DynamoDB's 400 KB,
//!     compressed or in S3.
//! 12. [Multi-Region use](multi_region): global tables, MREC and MRSC.
//! 13. [Migrating from Powertools](migrating_from_powertools): one table (or
//!     Redis) shared with Powertools for Python.
//! 14. [Developing locally](developing): cargo-lambda, LocalStack, the chaos run,
//!     benchmarks, the repository's layout, deploying with SAM.
//! 15. [Reference](mod@reference): every `errorType`, limits, environment variables,
//!     the store contracts, writes whose response is lost.

#[doc = include_str!("../docs/getting_started.md")]
pub mod getting_started {}

#[doc = include_str!("../docs/keys.md")]
pub mod keys {}

#[doc = include_str!("../docs/event_sources.md")]
pub mod event_sources {}

#[doc = include_str!("../docs/steps_and_outbox.md")]
pub mod steps_and_outbox {}

#[doc = include_str!("../docs/patterns.md")]
pub mod patterns {}

#[doc = include_str!("../docs/durable_functions.md")]
pub mod durable_functions {}

#[doc = include_str!("../docs/testing_your_handler.md")]
pub mod testing_your_handler {}

#[doc = include_str!("../docs/production.md")]
pub mod production {}

#[doc = include_str!("../docs/table_and_iam.md")]
pub mod table_and_iam {}

#[doc = include_str!("../docs/redis.md")]
pub mod redis {}

#[doc = include_str!("../docs/large_responses.md")]
pub mod large_responses {}

#[doc = include_str!("../docs/multi_region.md")]
pub mod multi_region {}

#[doc = include_str!("../docs/migrating_from_powertools.md")]
pub mod migrating_from_powertools {}

#[doc = include_str!("../docs/developing.md")]
pub mod developing {}

#[doc = include_str!("../docs/reference.md")]
pub mod reference {}
