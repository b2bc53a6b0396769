#!/usr/bin/env bash
# The one command that runs every check of the project, on a fresh checkout:
# it installs what the tests need (the Python venv with the pinned stock client),
# then runs format, lint, docs and the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)
step() { printf '\n==> %s\n' "$*"; }

step "python peers (tests/python/requirements.txt)"
scripts/setup-python.sh
export HYPHA_PYTHON="${HYPHA_VENV:-$root/.venv}/bin/python"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

step "cargo test"
cargo test --workspace --locked

echo "scripts/test.sh: all checks passed in $(( $(date +%s) - start ))s"
