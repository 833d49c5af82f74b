//! Nothing to link: this package holds the integration tests (`tests/`), the
//! benches (`benches/`) and the chaos run (`examples/chaos.rs`) of
//! `lambda-idempotency`. See its guide's "Developing locally" chapter.
