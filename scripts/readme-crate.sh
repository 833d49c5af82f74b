#!/usr/bin/env bash
# Proves the README's "Use it" section: compiles a throwaway crate from exactly its
# `[dependencies]` block and its Rust snippet, as a new user would paste them.
#
# The crate lives in $CARGO_TARGET_DIR/readme-crate/ (default target/), declares
# its own empty workspace, and starts from this workspace's Cargo.lock so that it
# resolves the same versions and shares compiled dependencies. The one addition
# to the README's block is a `[patch.crates-io]` pointing `lambda-idempotency`
# at this checkout, so that the snippet is checked against the code beside it
# rather than a published release.
#
# Usage: scripts/readme-crate.sh   (exits non-zero when the snippet does not build)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
crate="$target/readme-crate"
log() { echo "[readme-crate] $*" >&2; }

# The first ```toml block and the first ```rust block under "## Use it".
extract() { # extract LANG
  awk -v lang="$1" '
    /^## / { in_section = ($0 == "## Use it") }
    in_section && !done && $0 == "```" lang { inside = 1; next }
    inside && $0 == "```" { inside = 0; done = 1; next }
    inside { print }
  ' "$root/README.md"
}
toml="$(extract toml)"
rust="$(extract rust)"
[[ -n "$toml" ]] || { log "no \`\`\`toml block under '## Use it' in README.md"; exit 1; }
[[ -n "$rust" ]] || { log "no \`\`\`rust block under '## Use it' in README.md"; exit 1; }
grep -q '^\[dependencies\]' <<<"$toml" || { log "the toml block has no [dependencies] table"; exit 1; }

rm -rf "$crate"
mkdir -p "$crate/src"
{
  printf '[package]\nname = "readme-use-it"\nversion = "0.0.0"\nedition = "2021"\npublish = false\n\n'
  printf '%s\n\n' "$toml"
  printf '[patch.crates-io]\nlambda-idempotency = { path = "%s" }\n\n' "$root"
  printf '# Not a member of the workspace it sits under.\n[workspace]\n'
} >"$crate/Cargo.toml"
printf '%s\n' "$rust" >"$crate/src/main.rs"
cp "$root/Cargo.lock" "$crate/Cargo.lock"

log "cargo check of the README's block and snippet ($crate)"
# `check`: the snippet compiles against exactly these dependencies; linking it
# would add a full build of the AWS SDK's HTTP stack for no further proof.
# Warnings fail it (a snippet is copied as it is), read from cargo's output
# rather than RUSTFLAGS, which would rebuild every dependency.
out="$(cd "$crate" && CARGO_TARGET_DIR="$target" cargo check --color never 2>&1)" || {
  printf '%s\n' "$out" >&2
  exit 1
}
if grep -q '^warning' <<<"$out"; then
  printf '%s\n' "$out" >&2
  log "the snippet compiles with warnings"
  exit 1
fi
log "ok: the README's [dependencies] block and snippet compile as they are"
