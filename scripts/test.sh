#!/usr/bin/env bash
# The whole test suite, from a fresh machine. Stages, in order:
#
#   fmt         cargo fmt --check
#   features    the library alone, without dev-dependencies, for no feature,
#               each feature alone and all of them: clippy -D warnings (what
#               `cargo hack --each-feature --no-dev-deps` proves), then its docs
#               without broken links, with default and with all features
#   clippy      the workspace, all targets, all features: one clippy -D warnings
#   tests       every test of the workspace once, with every event source and
#               sink (the LocalStack tests, the CLI, the crash matrix, the
#               Powertools round trip, the benches run once), and the doc tests
#               (the guide's chapters included)
#   exact       the library's unit tests with `exact-numbers`
#   examples    the README's `cargo run --example` commands (the guide's
#               durable functions bridge, examples/durable_bridge.rs, runs as a
#               test in the tests stage)
#   readme      the README's "Use it" block and snippet as a crate of their own
#   package     cargo package: the published crate builds from its own files
#   cfn-lint    template.yaml
#   dev-loop    the cargo-lambda loop (scripts/dev-loop.sh)
#   chaos       a short chaos run on DynamoDB, then on Redis (scripts/chaos.sh --short)
#
# What needs the network rather than the CPU (LocalStack, the Redis servers,
# the Powertools venv, cfn-lint, cargo-lambda) installs in the background while
# the first stages compile. LocalStack is reused when one answers at
# $AWS_ENDPOINT_URL (or 127.0.0.1:$LOCALSTACK_PORT, default 4566), else started
# and stopped at the end; so are the Redis servers (redis/ensure.sh: ports
# REDIS_PORT, REDIS_REPLICA_PORT, REDIS_CLUSTER_PORTS). Prints the time of each
# stage at the end.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# Every build here starts from what the last one left: incremental compilation
# only adds its caches (2 GB of target/ over the stages below) and time.
export CARGO_INCREMENTAL=0
logs="$root/.cache/test"
mkdir -p "$logs"
started_at=$SECONDS

# --- stages and their times -------------------------------------------------
stage_names=()
stage_secs=()
current=""
stage() { # stage NAME: starts timing NAME (and ends the previous stage)
  end_stage
  current="$1"
  stage_started=$SECONDS
  echo "== $1" >&2
}
end_stage() {
  if [[ -n "$current" ]]; then
    stage_names+=("$current")
    stage_secs+=($((SECONDS - stage_started)))
    current=""
  fi
}
report() {
  end_stage
  local i
  echo "== stage times (s)" >&2
  for i in "${!stage_names[@]}"; do
    printf '%-10s %5d\n' "${stage_names[i]}" "${stage_secs[i]}" >&2
  done
  printf '%-10s %5d\n' total $((SECONDS - started_at)) >&2
  local size
  size="$(du -sh "${CARGO_TARGET_DIR:-$root/target}" 2>/dev/null | cut -f1 || true)"
  echo "target dir: ${size:-?}" >&2
}

# --- background installs -----------------------------------------------------
bg_pids=()
background() { # background NAME COMMAND...: runs it, stdout to $logs/NAME.out
  "${@:2}" >"$logs/$1.out" 2>"$logs/$1.err" &
  bg_pids+=($!)
  eval "bg_${1//-/_}=$!"
}
await() { # await NAME: waits for a background job, shows its log if it failed
  local pid_var="bg_${1//-/_}"
  if ! wait "${!pid_var}"; then
    echo "background job $1 failed:" >&2
    cat "$logs/$1.err" >&2
    exit 1
  fi
}

endpoint_was_up=false
for candidate in "${AWS_ENDPOINT_URL:-}" "http://127.0.0.1:${LOCALSTACK_PORT:-4566}"; do
  if [[ -n "$candidate" ]] && curl -fsS --max-time 3 "$candidate/_localstack/health" >/dev/null 2>&1; then
    endpoint_was_up=true
  fi
done
redis_was_up=false
if redis-cli -p "${REDIS_PORT:-6390}" ping 2>/dev/null | grep -q PONG; then
  redis_was_up=true
fi
on_exit() {
  local status=$?
  report
  for pid in "${bg_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [[ "$endpoint_was_up" == true ]] || bash localstack/ensure.sh stop
  [[ "$redis_was_up" == true ]] || bash redis/ensure.sh stop
  [[ $status == 0 ]] && echo "== all checks passed" >&2
  exit $status
}
trap on_exit EXIT

background localstack bash localstack/ensure.sh
background redis bash redis/ensure.sh
background powertools bash scripts/powertools-venv.sh
background cfn-lint bash scripts/lint-template.sh
background cargo-lambda bash scripts/dev-loop.sh install

# --- stages ------------------------------------------------------------------
stage fmt
cargo fmt --all --check

stage features
# The library's features, read from its manifest, so a new one is covered too.
features="$(cargo metadata --no-deps --format-version 1 --locked | python3 -c '
import json, sys
package = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "lambda-idempotency")
print(" ".join(sorted(f for f in package["features"] if f != "default")))')"
lint_lib() { # lint_lib ARGS...: the library alone, no dev-dependencies
  echo "   clippy -p lambda-idempotency --lib $*" >&2
  cargo clippy --quiet --locked -p lambda-idempotency --lib "$@" -- -D warnings
}
lint_lib --no-default-features
for feature in $features; do
  lint_lib --no-default-features --features "$feature"
done
lint_lib --all-features
echo "   doc -p lambda-idempotency, default and all features (no broken links)" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --locked -p lambda-idempotency --no-deps
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --locked -p lambda-idempotency --no-deps --all-features

stage clippy
cargo clippy --locked --workspace --all-targets --all-features -- -D warnings

stage tests
await localstack
AWS_ENDPOINT_URL="$(cat "$logs/localstack.out")"
export AWS_ENDPOINT_URL
await redis
set -a
# shellcheck disable=SC1091
source "$logs/redis.out"
set +a
await powertools
POWERTOOLS_PYTHON="$(cat "$logs/powertools.out")"
export POWERTOOLS_PYTHON
echo "   LocalStack at $AWS_ENDPOINT_URL, Redis at $REDIS_URL and $REDIS_CLUSTER_URLS, Powertools for Python at $POWERTOOLS_PYTHON" >&2
# The deploy package's functions are built by the dev-loop stage, in their own
# feature set; here they would only be linked once more.
cargo test --locked --workspace --exclude lambda-idempotency-functions --all-targets
cargo test --locked --workspace --exclude lambda-idempotency-functions --doc

stage exact
cargo test --locked -p lambda-idempotency --lib --features exact-numbers

stage examples
cargo run --locked --example quickstart >/dev/null
cargo run --locked --example run_twice --features testing >/dev/null
cargo run --locked --example saga >/dev/null
cargo run --locked --example metrics --features emf >/dev/null

stage readme
bash scripts/readme-crate.sh

stage package
cargo package --locked -p lambda-idempotency --allow-dirty

stage cfn-lint
await cfn-lint
cat "$logs/cfn-lint.err" >&2

stage dev-loop
await cargo-lambda
bash scripts/dev-loop.sh

stage chaos
bash scripts/chaos.sh --short
end_stage
