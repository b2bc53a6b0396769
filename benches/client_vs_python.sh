#!/usr/bin/env bash
# The whole client comparison in one run: the RPC scenarios of interop/bench_rpc.py (a-e)
#   1. Rust client + Rust provider (examples/bench_rpc.rs)          against our server,
#   2. stock Python client + provider (interop/bench_rpc.py)        against our server,
#   3. Rust client + Rust provider                                  against the Python server,
#   4. stock Python client + provider                               against the Python server,
# each on a freshly started server, then a table of the figures and the ratios.
#
#   benches/client_vs_python.sh [OUTDIR] [extra args for both benches, e.g. --duration 5]
#
# Env: INTEROP (../shared/interop), VENV (the interop venv with hypha + hypha-rpc + numpy),
# CARGO_TARGET_DIR, BENCH_PORT (9611), BENCH_WORKERS (our server's worker threads, 1).
# The Python server's per-socket message rate limit is lifted as interop/run_bench.sh does
# (sequential echo alone exceeds it within seconds).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INTEROP="${INTEROP:-$ROOT/../../shared/interop}"
[ -d "$INTEROP" ] || INTEROP=/work/shared/interop
OUT="${1:-/tmp/hypha-client-bench}"; shift || true
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
export HYPHA_WS_MSG_RATE_LIMIT="${HYPHA_WS_MSG_RATE_LIMIT:-1000000}"
export HYPHA_WS_MSG_BURST_LIMIT="${HYPHA_WS_MSG_BURST_LIMIT:-1000000}"
export HYPHA_PORT="${BENCH_PORT:-9611}"
export INTEROP_OUT="$OUT"
# shellcheck source=/dev/null
source "$INTEROP/lib_server.sh"
mkdir -p "$OUT/results"

(cd "$ROOT" && CARGO_TARGET_DIR="$TARGET" cargo build --release --example bench_rpc --bin hypha-server)
RUST_BENCH="$TARGET/release/examples/bench_rpc"
# One worker thread, like the Python server's one event loop: on this 2-vCPU machine the
# clients need the other core, and a frame routed between connections on two workers pays
# a cross-thread wake-up (README, Performance). BENCH_WORKERS=2 shows the difference.
OUR_SERVER="$TARGET/release/hypha-server --host 127.0.0.1 --port {port} --workers ${BENCH_WORKERS:-1}"
PY_SERVER="$PY -m hypha.server --host=127.0.0.1 --port={port}"

run() {  # run LABEL SERVER_CMD CLIENT(rust|python)
  local label="$1" cmd="$2" client="$3"
  HYPHA_SERVER_CMD="$cmd" start_server
  trap stop_server EXIT
  echo "=== $label (server pid $SERVER_PID)" >&2
  if [ "$client" = rust ]; then
    "$RUST_BENCH" --server-url "$SERVER_URL" --server-pid "$SERVER_PID" --json "$OUT/results/$label.json" "${EXTRA[@]}"
  else
    "$PY" "$INTEROP/bench_rpc.py" "$SERVER_URL" --server-pid "$SERVER_PID" --json "$OUT/results/$label.json" "${EXTRA[@]}"
  fi
  stop_server
  trap - EXIT
}
EXTRA=("$@")

run rust-client-ours-server "$OUR_SERVER" rust
run python-client-ours-server "$OUR_SERVER" python
run rust-client-python-server "$PY_SERVER" rust
run python-client-python-server "$PY_SERVER" python

"$PY" - "$OUT/results" <<'PYEOF'
import json, sys, os
d = sys.argv[1]
runs = ["rust-client-ours-server", "python-client-ours-server", "rust-client-python-server", "python-client-python-server"]
R = {r: json.load(open(os.path.join(d, r + ".json"))) for r in runs}
def get(r, *path):
    v = R[r]
    for p in path:
        if not isinstance(v, dict) or p not in v:
            return None
        v = v[p]
    return v
rows = [
    ("a) sequential echo, calls/s", ("a_sequential_echo", "calls_per_s"), True),
    ("a) sequential echo, p50 ms", ("a_sequential_echo", "p50_ms"), False),
    ("b) 32 in flight, calls/s", ("b_concurrent_echo", "calls_per_s"), True),
    ("c) bytes 1 MB echo, MB/s", ("c_payload_echo", "bytes_1MB", "MB_per_s"), True),
    ("c) bytes 32 MB echo, MB/s", ("c_payload_echo", "bytes_32MB", "MB_per_s"), True),
    ("c) float32 64 MB echo, MB/s", ("c_payload_echo", "f32_16M_64MB", "MB_per_s"), True),
    ("d) generator 10k, items/s", ("d_generator_10k", "items_per_s"), True),
    ("e) 200 clients connect+register, wall s", ("e_many_clients", "all_connected_wall_s"), False),
    ("e) server RSS per client, KB", ("e_many_clients", "server_rss_per_client_KB"), False),
]
def fmt(v):
    return "n/a" if v is None else (f"{v:,.1f}" if isinstance(v, float) else f"{v:,}")
def ratio(a, b, higher_better):
    if a is None or b is None or a == 0 or b == 0:
        return "n/a"
    return f"{(a / b) if higher_better else (b / a):.1f}x"
print("| scenario | Rust client, our server | Python client, our server | Rust client, Python server | Python client, Python server | Rust+ours vs Python+Python |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for name, path, hb in rows:
    vals = [get(r, *path) for r in runs]
    print(f"| {name} | " + " | ".join(fmt(v) for v in vals) + f" | {ratio(vals[0], vals[3], hb)} |")
PYEOF
