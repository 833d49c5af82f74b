#!/usr/bin/env bash
# Chaos run of the idempotency engine against DynamoDB on LocalStack or Redis
# (docs/developing.md, "Chaos run").
#
#   scripts/chaos.sh            full size: 10,000 invocations over 1,000 keys, 4 workers,
#                               on DynamoDB, then the same again on a second LocalStack with
#                               DynamoDB fault injection (DYNAMODB_ERROR_PROBABILITY=0.2)
#   scripts/chaos.sh --short    2 workers, 300 invocations over 30 keys, a few kills,
#                               no fault injection, on DynamoDB then on Redis (part of
#                               scripts/test.sh)
#   --store dynamodb|redis|all  the stores to run on, in that order (CHAOS_STORE gives the
#                               default: dynamodb for a full run, all with --short). Redis:
#                               RedisStore on the server at REDIS_URL, under a key prefix of
#                               the run's own; started with redis/ensure.sh (and stopped
#                               afterwards) when nothing answers there
#   --no-faults                 skip the fault-injected run
#   --faults-only               only the fault-injected run (DynamoDB's)
#
# A share of the invocations come as SQS batches of 2-6 records through the
# worker's sqs_batch adapter (reserved in one request, completed in one after
# the records ran), so kills also cut batches between the two.
#
# Sizes and knobs come from CHAOS_INVOCATIONS, CHAOS_KEYS, CHAOS_WORKERS,
# CHAOS_CONCURRENCY, CHAOS_KILL_INTERVAL_MS, CHAOS_MAX_KILLS, CHAOS_PAUSE_PERMILLE,
# CHAOS_WAIT_PERMILLE (the share of invocations, per mille, that wait for one in
# flight with wait_for_in_progress: 333), CHAOS_BATCH_PERMILLE (the share, per
# mille, that come in SQS batches: 250), CHAOS_DEADLINE_MIN_MS, CHAOS_DEADLINE_MAX_MS
# (see tests-integration/examples/chaos.rs); the fault instance from
# CHAOS_FAULTS_PORT (4567) and CHAOS_ERROR_PROBABILITY (0.2).
# Exits non-zero if any check of any run fails.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

usage() {
  echo "usage: scripts/chaos.sh [--short] [--store dynamodb|redis|all] [--no-faults] [--faults-only]" >&2
  exit 2
}
short=false
normal=true
faults=true
store="${CHAOS_STORE:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --short) short=true; faults=false ;;
    --no-faults) faults=false ;;
    --faults-only) normal=false; faults=true ;;
    --store) [[ $# -ge 2 ]] || usage; store="$2"; shift ;;
    --store=*) store="${1#--store=}" ;;
    *) usage ;;
  esac
  shift
done
if [[ -z "$store" ]]; then
  if [[ "$short" == true ]]; then store=all; else store=dynamodb; fi
fi
case "$store" in
  dynamodb) stores=(dynamodb) ;;
  redis) stores=(redis); faults=false ;;
  all) stores=(dynamodb redis) ;;
  *) usage ;;
esac

if [[ "$short" == true ]]; then
  export CHAOS_INVOCATIONS="${CHAOS_INVOCATIONS:-300}" CHAOS_KEYS="${CHAOS_KEYS:-30}"
  export CHAOS_WORKERS="${CHAOS_WORKERS:-2}" CHAOS_KILL_INTERVAL_MS="${CHAOS_KILL_INTERVAL_MS:-500}"
  export CHAOS_MAX_KILLS="${CHAOS_MAX_KILLS:-4}" CHAOS_MAX_SECONDS="${CHAOS_MAX_SECONDS:-120}"
  export CHAOS_PAUSE_PERMILLE="${CHAOS_PAUSE_PERMILLE:-200}"
else
  export CHAOS_INVOCATIONS="${CHAOS_INVOCATIONS:-10000}" CHAOS_KEYS="${CHAOS_KEYS:-1000}"
  export CHAOS_WORKERS="${CHAOS_WORKERS:-4}"
fi

started=()
redis_started=false
cleanup() {
  for name in "${started[@]}"; do
    LOCALSTACK_INSTANCE="$name" bash localstack/ensure.sh stop
  done
  if [[ "$redis_started" == true ]]; then bash redis/ensure.sh stop; fi
}
trap cleanup EXIT

healthy() { curl -fsS --max-time 3 "$1/_localstack/health" >/dev/null 2>&1; }

cargo build --locked --quiet -p lambda-idempotency-tests --example chaos
bin="${CARGO_TARGET_DIR:-$root/target}/debug/examples/chaos"

status=0
for name in "${stores[@]}"; do
  [[ "$normal" == true ]] || break
  case "$name" in
    dynamodb)
      was_up=false
      for candidate in "${AWS_ENDPOINT_URL:-}" "http://127.0.0.1:${LOCALSTACK_PORT:-4566}"; do
        if [[ -n "$candidate" ]] && healthy "$candidate"; then was_up=true; fi
      done
      endpoint="$(bash localstack/ensure.sh)"
      [[ "$was_up" == false ]] && started+=("")
      CHAOS_STORE=dynamodb CHAOS_LABEL=normal AWS_ENDPOINT_URL="$endpoint" "$bin" orchestrate || status=1
      ;;
    redis)
      if [[ -z "${REDIS_URL:-}" ]] || ! redis-cli -u "$REDIS_URL" ping 2>/dev/null | grep -q PONG; then
        if ! redis-cli -p "${REDIS_PORT:-6390}" ping 2>/dev/null | grep -q PONG; then
          redis_started=true
        fi
        REDIS_URL="$(bash redis/ensure.sh | sed -n 's/^REDIS_URL=//p')"
      fi
      CHAOS_STORE=redis CHAOS_LABEL=redis REDIS_URL="$REDIS_URL" "$bin" orchestrate || status=1
      ;;
  esac
done

if [[ "$faults" == true ]]; then
  port="${CHAOS_FAULTS_PORT:-4567}"
  if healthy "http://127.0.0.1:$port"; then
    echo "chaos: a LocalStack already answers on port $port; stop it or set CHAOS_FAULTS_PORT" >&2
    exit 2
  fi
  started+=("chaos-faults")
  endpoint="$(LOCALSTACK_INSTANCE=chaos-faults LOCALSTACK_PORT="$port" \
    DYNAMODB_ERROR_PROBABILITY="${CHAOS_ERROR_PROBABILITY:-0.2}" bash localstack/ensure.sh)"
  CHAOS_STORE=dynamodb CHAOS_LABEL=faults AWS_ENDPOINT_URL="$endpoint" "$bin" orchestrate || status=1
fi

exit "$status"
