#!/usr/bin/env bash
# Runs the protocol-core benchmark for the Rust stack (criterion, benches/codec.rs) and the
# same packages through the stock Python client (benches/python_codec.py), back to back,
# and prints both with their ratio. This machine is shared and noisy: compare within one
# run, not across runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup-python.sh
rust="$(mktemp)"; py="$(mktemp)"
trap 'rm -f "$rust" "$py"' EXIT
# criterion's bencher format: "test NAME ... bench: N ns/iter (+/- M)"
cargo bench --bench codec -- --output-format bencher 2>/dev/null \
  | awk '/^test / { gsub(",", "", $5); print $2, $5 }' > "$rust"
"${HYPHA_VENV:-$root/.venv}/bin/python" benches/python_codec.py > "$py"
printf '%-40s %14s %14s %8s\n' case "rust" "python" "py/rust"
awk 'NR == FNR { py[$1] = $2; next }
     function fmt(ns) { return ns >= 1e6 ? sprintf("%.1f ms", ns / 1e6) : ns >= 1e3 ? sprintf("%.2f us", ns / 1e3) : sprintf("%d ns", ns) }
     { printf "%-40s %14s %14s %8s\n", $1, fmt($2), ($1 in py) ? fmt(py[$1]) : "-", ($1 in py) ? sprintf("%.1fx", py[$1] / $2) : "" }' "$py" "$rust"
