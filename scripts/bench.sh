#!/usr/bin/env bash
# Benchmarks: the wrapper's own cost (in-memory store), then DynamoDB requests per
# invocation and latency against LocalStack (started when none answers). The
# benches live in tests-integration/benches/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
AWS_ENDPOINT_URL="$(bash localstack/ensure.sh)"
export AWS_ENDPOINT_URL
cargo bench --locked -p lambda-idempotency-tests --bench idempotency
cargo bench --locked -p lambda-idempotency-tests --bench dynamodb
