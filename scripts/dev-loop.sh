#!/usr/bin/env bash
# The cargo-lambda loop of docs/developing.md, end to end, as a check:
#
# 1. cargo-lambda 1.9.2 from PyPI into .cache/cargo-lambda/ (once). Installed
#    without its `ziglang` dependency: watch and invoke build for the host with
#    plain cargo; zig is only for `cargo lambda build`'s cross-compilation.
# 2. LocalStack: $AWS_ENDPOINT_URL when it answers, else localstack/ensure.sh
#    starts one (stopped again at the end).
# 3. The table $IDEMPOTENCY_TABLE (default idempotency-dev), partition key `id`,
#    TTL on `expiration`: recreated on every run, so the first invoke runs the
#    handler. Sent with curl: LocalStack does not check request signatures, so the
#    AWS CLI is not needed (docs/developing.md shows the same with `aws dynamodb`).
# 4. `cargo lambda watch` on the deploy package, on a free port, with the
#    function's environment (table, endpoint, region, credentials). The binary is
#    built first with the command watch runs, so the first invoke does not wait on
#    a compile; it shares $CARGO_TARGET_DIR with the rest of the test command.
# 5. `cargo lambda invoke dynamodb_lambda --data-file examples/events/order.json`
#    twice. Checks: the second response is byte for byte the first (same
#    `charge_id`, the request id of the invocation that charged); the function's
#    log shows one `charging` and one `replayed=true ... replaying the stored
#    response`; the record in DynamoDB is COMPLETED with that response as `data`.
# 6. Stops watch (and the function it started).
#
# Idempotent; a second run takes seconds. Exits non-zero when a check fails.
# `scripts/dev-loop.sh install` only installs cargo-lambda (step 1).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log() { echo "[dev-loop] $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
started=$(date +%s)

cache="$root/.cache/cargo-lambda"
version="1.9.2"
table="${IDEMPOTENCY_TABLE:-idempotency-dev}"
event="examples/events/order.json"
function_name="dynamodb_lambda"
package="lambda-idempotency-functions"
region="${AWS_REGION:-us-east-1}"
work="$root/.cache/dev-loop"
mkdir -p "$work"

# 1. cargo-lambda (`dev-loop.sh install` stops here: the test command installs it
#    in the background while it compiles).
if [[ "$("$cache/venv/bin/cargo-lambda" lambda --version 2>/dev/null)" != "cargo-lambda $version "* ]]; then
  log "installing cargo-lambda $version into $cache (first run only)"
  rm -rf "$cache/venv"
  python3 -m venv "$cache/venv"
  "$cache/venv/bin/pip" install -q --no-deps "cargo-lambda==$version"
fi
[[ "${1:-}" == install ]] && exit 0
export PATH="$cache/venv/bin:$PATH"

# 2. LocalStack
cleanup=()
on_exit() {
  local i
  for ((i = ${#cleanup[@]} - 1; i >= 0; i--)); do eval "${cleanup[i]}" || true; done
}
trap on_exit EXIT
endpoint_was_up=false
if [[ -n "${AWS_ENDPOINT_URL:-}" ]] && curl -fsS --max-time 3 "$AWS_ENDPOINT_URL/_localstack/health" >/dev/null 2>&1; then
  endpoint_was_up=true
elif curl -fsS --max-time 3 "http://127.0.0.1:${LOCALSTACK_PORT:-4566}/_localstack/health" >/dev/null 2>&1; then
  endpoint_was_up=true
fi
AWS_ENDPOINT_URL="$(bash localstack/ensure.sh)"
export AWS_ENDPOINT_URL
[[ "$endpoint_was_up" == true ]] || cleanup+=("bash localstack/ensure.sh stop")
log "LocalStack at $AWS_ENDPOINT_URL"

# 3. The table, with TTL. DynamoDB's JSON API over curl (any signature passes LocalStack).
ddb() {
  curl -sS --max-time 60 -X POST "$AWS_ENDPOINT_URL/" \
    -H "Content-Type: application/x-amz-json-1.0" \
    -H "X-Amz-Target: DynamoDB_20120810.$1" \
    -H "Authorization: AWS4-HMAC-SHA256 Credential=test/20250101/$region/dynamodb/aws4_request, SignedHeaders=host, Signature=0" \
    -d "$2"
}
expect() { # expect WHAT OUTPUT: fails unless OUTPUT is a success (no __type)
  if [[ "$2" == *'"__type"'* ]]; then fail "$1: $2"; fi
}
out="$(ddb DeleteTable "{\"TableName\":\"$table\"}")"
[[ "$out" != *'"__type"'* || "$out" == *ResourceNotFoundException* ]] || fail "DeleteTable: $out"
out="$(ddb CreateTable "{\"TableName\":\"$table\",\"BillingMode\":\"PAY_PER_REQUEST\",
  \"AttributeDefinitions\":[{\"AttributeName\":\"id\",\"AttributeType\":\"S\"}],
  \"KeySchema\":[{\"AttributeName\":\"id\",\"KeyType\":\"HASH\"}]}")"
expect CreateTable "$out"
out="$(ddb UpdateTimeToLive "{\"TableName\":\"$table\",
  \"TimeToLiveSpecification\":{\"AttributeName\":\"expiration\",\"Enabled\":true}}")"
expect UpdateTimeToLive "$out"
log "table $table created, TTL on expiration"

# 4. cargo lambda watch on the deploy package.
log "building $package --bin $function_name (what watch runs on the first invoke)"
cargo build --quiet --locked --package "$package" --bin "$function_name" >&2
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
watch_log="$work/watch.log"
env_vars="IDEMPOTENCY_TABLE=$table,AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL,AWS_REGION=$region"
env_vars+=",AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test},AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}"
# Replays log at DEBUG (Lambda's own log-level control; --env-var splits on commas).
env_vars+=",AWS_LAMBDA_LOG_LEVEL=debug"
log "cargo lambda watch --package $package on 127.0.0.1:$port (log: $watch_log)"
setsid cargo lambda watch --package "$package" --ignore-changes \
  --invoke-address 127.0.0.1 --invoke-port "$port" --env-var "$env_vars" >"$watch_log" 2>&1 &
watch_pid=$!
cleanup+=("kill -- -$watch_pid 2>/dev/null; wait $watch_pid 2>/dev/null")
for _ in $(seq 1 60); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  kill -0 "$watch_pid" 2>/dev/null || { tail -n 30 "$watch_log" >&2; fail "cargo lambda watch exited"; }
  sleep 0.5
done

# 5. The same event, twice.
invoke() {
  cargo lambda invoke "$function_name" --invoke-address 127.0.0.1 --invoke-port "$port" \
    --data-file "$event" >"$1" 2>"$1.err" || {
    cat "$1.err" >&2
    tail -n 30 "$watch_log" >&2
    fail "cargo lambda invoke failed"
  }
}
invoke "$work/first.json"
invoke "$work/second.json"
log "first:  $(cat "$work/first.json")"
log "second: $(cat "$work/second.json")"
cmp -s "$work/first.json" "$work/second.json" || fail "the second response differs from the first"
grep -q '"charge_id":"[^"]\+"' "$work/first.json" || fail "no charge_id in the response"

# The function's log: the handler ran once, the second invoke replayed.
sleep 0.5 # the log line of the second invoke may trail its response
charges="$(grep -c 'charging' "$watch_log" || true)"
[[ "$charges" == 1 ]] || fail "the handler ran $charges times (log: $watch_log)"
grep -q 'replayed=true.*replaying the stored response' "$watch_log" ||
  fail "no replay in the function's log ($watch_log)"
key="$(grep -o 'idempotency{[^}]*key=[^ }]*' "$watch_log" | head -n 1 | sed 's/.*key=//' || true)"
[[ -n "$key" ]] || fail "no idempotency key in the function's log"

# The record in DynamoDB.
item="$(ddb GetItem "{\"TableName\":\"$table\",\"Key\":{\"id\":{\"S\":\"$key\"}},\"ConsistentRead\":true}")"
expect GetItem "$item"
python3 - "$work/first.json" "$item" <<'PY' || fail "the record in DynamoDB is not the completed response"
import json, sys
response = json.load(open(sys.argv[1]))
item = json.loads(sys.argv[2])["Item"]
assert item["status"]["S"] == "COMPLETED", item["status"]
assert json.loads(item["data"]["S"]) == response, item["data"]
assert "expiration" in item
PY
log "record $key: COMPLETED, data = the response"
log "ok: the second invoke replayed the first (charge_id $(grep -o '"charge_id":"[^"]*"' "$work/first.json" | cut -d'"' -f4)), $(($(date +%s) - started)) s"
