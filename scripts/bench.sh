#!/usr/bin/env bash
# Benchmarks: the wrapper's own cost (in-memory store), then store requests, latency
# and client CPU per invocation on DynamoDB (LocalStack) and on Redis, both on
# loopback (each started when none answers: localstack/ensure.sh,
# redis/ensure.sh). The benches live in tests-integration/benches/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
AWS_ENDPOINT_URL="$(bash localstack/ensure.sh)"
export AWS_ENDPOINT_URL
redis_servers="$(bash redis/ensure.sh)"
eval "$redis_servers"
export REDIS_URL
cargo bench --locked -p lambda-idempotency-tests --bench idempotency
cargo bench --locked -p lambda-idempotency-tests --bench dynamodb
