#!/usr/bin/env bash
# Lints template.yaml with cfn-lint (from PyPI, installed once into .cache/) and
# fails on errors. Idempotent.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.cache/cfn-lint/venv"
version="1.58.0"

if [[ "$("$venv/bin/cfn-lint" --version 2>/dev/null)" != "cfn-lint $version" ]]; then
  echo "[cfn-lint] installing cfn-lint $version into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "cfn-lint==$version"
fi
"$venv/bin/cfn-lint" "$root/template.yaml"
echo "[cfn-lint] template.yaml: no errors" >&2
