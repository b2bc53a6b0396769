#!/usr/bin/env bash
# The one command that runs every check of the project, on a fresh checkout:
# it installs what the tests need (the Python venvs with the pinned stock client and the
# pinned stock server, and the pinned stock JS client under tests/js),
# then runs format, lint, docs and the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)
step() { printf '\n==> %s\n' "$*"; }

step "python peers (tests/python/requirements.txt)"
scripts/setup-python.sh
export HYPHA_PYTHON="${HYPHA_VENV:-$root/.venv}/bin/python"
export HYPHA_SERVER_PYTHON="${HYPHA_SERVER_VENV:-$root/.venv-server}/bin/python"

step "js peers (tests/js/package-lock.json)"
# The stock JS client for the interop scenarios; reinstalled only when the lock changed.
if [ ! -d tests/js/node_modules/hypha-rpc ] || [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; then
  command -v npm >/dev/null || { echo "test.sh: npm not found; install Node >= 20.10 with npm" >&2; exit 1; }
  (cd tests/js && npm ci --no-audit --no-fund)
fi

step "headless chromium (Debian chromium + chromium-driver) for the login-page test"
# tests/server_accounts.rs drives the served login page in a real browser over WebDriver.
if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null || [ -n "${HYPHA_CHROMIUM:-}" ]; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
  else
    echo "test.sh: chromium and chromedriver are missing; install them as root:" \
         "apt-get install -y chromium chromium-driver (or set HYPHA_CHROMEDRIVER/HYPHA_CHROMIUM)" >&2
    exit 1
  fi
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

step "cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"

# One closing line for the whole run (cargo prints one per test binary, the last of
# which is often an empty doc-test crate).
secs=$(( $(date +%s) - start ))
awk -v secs="$secs" '
  /^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
  END { printf "\nscripts/test.sh: all checks passed in %ss\n%d passed, %d failed\n", secs, p, f }' "$log"
