#!/usr/bin/env bash
# Makes Redis servers available for the Redis store's tests, on loopback, and
# prints their addresses as shell assignments (logs on stderr):
#
#   REDIS_URL=redis://127.0.0.1:6390                 a standalone server
#   REDIS_REPLICA_URL=redis://127.0.0.1:6391         a replica of it (for WAIT)
#   REDIS_CLUSTER_URLS=redis://127.0.0.1:7101,...    a cluster of three primaries
#
# - Installs Debian's `redis-server` package when `redis-server` is missing
#   (apt-get; the package lists are refreshed only if the install fails).
# - Reuses a server that already answers on a port; otherwise starts one, with
#   no persistence, its files under .cache/redis/PORT/. The cluster is created
#   with `redis-cli --cluster create` once its three nodes are up.
# - Idempotent: a second run finds the servers and starts nothing.
#
# Ports: REDIS_PORT (6390), REDIS_REPLICA_PORT (6391), REDIS_CLUSTER_PORTS
# ("7101 7102 7103").
#
# Usage: redis/ensure.sh        -> prints the assignments on stdout
#        redis/ensure.sh stop   -> stops the servers this script started
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache/redis"
port="${REDIS_PORT:-6390}"
replica_port="${REDIS_REPLICA_PORT:-6391}"
read -r -a cluster_ports <<<"${REDIS_CLUSTER_PORTS:-7101 7102 7103}"
log() { echo "[redis] $*" >&2; }

answers() { redis-cli -p "$1" ping 2>/dev/null | grep -q PONG; }

if [[ "${1:-}" == "stop" ]]; then
  for pidfile in "$cache"/*/redis.pid; do
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping pid $pid ($(basename "$(dirname "$pidfile")"))"
      kill "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  exit 0
fi

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  log "installing Debian's redis-server package (first run only)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q redis-server >&2; then
    apt-get update -q >&2
    apt-get install -y -q redis-server >&2
  fi
fi

# start PORT [ARGS...]: a server on PORT unless one answers there already.
start() {
  local p="$1"
  shift
  if answers "$p"; then
    log "reusing the server on port $p"
    return 1
  fi
  local dir="$cache/$p"
  rm -rf "$dir"
  mkdir -p "$dir"
  redis-server --port "$p" --bind 127.0.0.1 --daemonize yes --dir "$dir" \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    --save "" --appendonly no "$@" >&2
  for _ in $(seq 1 100); do
    answers "$p" && return 0
    sleep 0.05
  done
  log "the server on port $p did not start; its log:"
  tail -n 20 "$dir/redis.log" >&2
  exit 1
}

start "$port" || true
start "$replica_port" --replicaof 127.0.0.1 "$port" || true

fresh_cluster=false
for p in "${cluster_ports[@]}"; do
  if start "$p" --cluster-enabled yes --cluster-config-file nodes.conf \
    --cluster-node-timeout 5000; then
    fresh_cluster=true
  fi
done
if [[ "$fresh_cluster" == true ]]; then
  log "creating the cluster on ports ${cluster_ports[*]}"
  nodes=()
  for p in "${cluster_ports[@]}"; do nodes+=("127.0.0.1:$p"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >&2
fi
for _ in $(seq 1 100); do
  ok=true
  for p in "${cluster_ports[@]}"; do
    redis-cli -p "$p" cluster info 2>/dev/null | grep -q 'cluster_state:ok' || ok=false
  done
  [[ "$ok" == true ]] && break
  sleep 0.1
done
[[ "$ok" == true ]] || { log "the cluster did not reach cluster_state:ok"; exit 1; }
# The replica is in sync before a test counts on its acknowledgements.
for _ in $(seq 1 100); do
  redis-cli -p "$replica_port" info replication 2>/dev/null | grep -q 'master_link_status:up' && break
  sleep 0.05
done

urls=()
for p in "${cluster_ports[@]}"; do urls+=("redis://127.0.0.1:$p"); done
log "ready"
echo "REDIS_URL=redis://127.0.0.1:$port"
echo "REDIS_REPLICA_URL=redis://127.0.0.1:$replica_port"
echo "REDIS_CLUSTER_URLS=$(IFS=,; echo "${urls[*]}")"
