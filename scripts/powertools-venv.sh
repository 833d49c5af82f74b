#!/usr/bin/env bash
# Makes a Python venv with AWS Lambda Powertools for Python (with its redis extra, and boto3) for the
# Powertools compatibility tests (tests-integration/tests/powertools.rs), and prints its python.
#
# Idempotent and cached: .cache/powertools/venv is built once (uv from PyPI, the
# versions pinned below, their dependencies resolved as of --exclude-newer so that
# a later release cannot change the set), later runs only check the marker.
#
# Usage: scripts/powertools-venv.sh   -> prints the venv's python on stdout (logs on stderr)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache/powertools"
venv="$cache/venv"
# Bump these together; the marker records them so that a change rebuilds the venv.
requirements=("aws-lambda-powertools[redis]==3.37.0" "boto3==1.44.5")
exclude_newer="2026-11-20"
marker="$venv/.installed"
want="${requirements[*]} --exclude-newer $exclude_newer"
log() { echo "[powertools-venv] $*" >&2; }

if [[ -f "$marker" && "$(cat "$marker")" == "$want" && -x "$venv/bin/python" ]]; then
  echo "$venv/bin/python"
  exit 0
fi

log "building $venv: $want (first run only)"
mkdir -p "$cache"
# uv: reuse LocalStack's copy when localstack/ensure.sh already installed it.
uv="$root/.cache/localstack/uv-venv/bin/uv"
if [[ ! -x "$uv" ]]; then
  uv="$cache/uv-venv/bin/uv"
  if [[ ! -x "$uv" ]]; then
    python3 -m venv "$cache/uv-venv"
    "$cache/uv-venv/bin/pip" install -q uv
  fi
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$uv" pip install -q --python "$venv/bin/python" --exclude-newer "$exclude_newer" "${requirements[@]}"
printf '%s' "$want" >"$marker"
log "ready"
echo "$venv/bin/python"
