#!/usr/bin/env bash
# The whole test suite, from a fresh machine: lint the SAM template, check format
# and clippy, then every test (unit, LocalStack integration, doc tests), the
# quickstart, the cargo-lambda dev loop and a short chaos run. Starts LocalStack
# when no endpoint answers and stops it afterwards.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

endpoint_was_up=false
for candidate in "${AWS_ENDPOINT_URL:-}" "http://127.0.0.1:${LOCALSTACK_PORT:-4566}"; do
  if [[ -n "$candidate" ]] && curl -fsS --max-time 3 "$candidate/_localstack/health" >/dev/null 2>&1; then
    endpoint_was_up=true
  fi
done
AWS_ENDPOINT_URL="$(bash localstack/ensure.sh)"
export AWS_ENDPOINT_URL
if [[ "$endpoint_was_up" == false ]]; then
  trap 'bash localstack/ensure.sh stop' EXIT
fi

step() { echo "== $*" >&2; }
step "cfn-lint template.yaml"
bash scripts/lint-template.sh
step "cargo fmt --check"
cargo fmt --check
# Every feature a user can pick: none, each alone, all together. Targets that
# need a feature are skipped without it (required-features in Cargo.toml).
sources_and_sinks="sqs,streams,apigw,lambda-http,outbox-sqs,outbox-http,atomic-writes,gzip,jmespath-functions,emf,compress-responses,s3-responses,testing"
for features in "" outbox atomic-writes sqs streams apigw lambda-http outbox-sqs outbox-http exact-numbers powertools-compat gzip jmespath jmespath-functions metrics emf compress-responses s3-responses testing; do
  step "cargo clippy --all-targets --features '$features' -- -D warnings"
  cargo clippy --all-targets --locked --features "$features" -- -D warnings
done
step "cargo clippy --workspace --all-targets --features $sources_and_sinks, and --all-features"
cargo clippy --workspace --all-targets --locked --features "$sources_and_sinks" -- -D warnings
cargo clippy --all-targets --locked --all-features -- -D warnings
step "cargo clippy -p lambda-idempotency-cli --features powertools (the operator's CLI with Powertools keys)"
cargo clippy -p lambda-idempotency-cli --all-targets --locked --features powertools -- -D warnings
step "cargo doc, default features and all: no broken links"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --locked --all-features
step "cargo test --features $sources_and_sinks (against LocalStack at $AWS_ENDPOINT_URL)"
cargo test --all-targets --locked --features "$sources_and_sinks"
cargo test --doc --locked --features "$sources_and_sinks"
step "cargo test -p lambda-idempotency-cli (the operator's CLI against LocalStack)"
cargo test --locked -p lambda-idempotency-cli
step "cargo test --lib --features exact-numbers (keys exact for any JSON number)"
cargo test --lib --locked --features exact-numbers
step "powertools-compat feature: its tests, and the round trip with Powertools for Python"
POWERTOOLS_PYTHON="$(bash scripts/powertools-venv.sh)"
export POWERTOOLS_PYTHON
cargo test --locked --features powertools-compat --lib --test powertools
cargo test --doc --locked --features "powertools-compat,$sources_and_sinks"
step "cargo run --example quickstart"
cargo run --locked --example quickstart >/dev/null
step "cargo run --example run_twice --features testing (the testing kit on a handler with two steps)"
cargo run --locked --features testing --example run_twice >/dev/null
step "cargo run --example saga (compensations on the memory store)"
cargo run --locked --example saga >/dev/null
step "the cargo-lambda dev loop (scripts/dev-loop.sh): watch, invoke twice, the second replays"
bash scripts/dev-loop.sh
step "chaos run, short (scripts/chaos.sh --short)"
bash scripts/chaos.sh --short
step "all checks passed"
