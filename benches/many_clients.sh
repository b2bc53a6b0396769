#!/usr/bin/env bash
# Server memory per connected client with many concurrent Rust clients (issue 4's target:
# 10,000 clients each registering a service, under 50 KB of server memory per client).
#
#   benches/many_clients.sh [OUTDIR]          # results/*.json, summary.md, summary.json there
#
# For each N in $CLIENTS, on a freshly started `hypha-server` (127.0.0.1, a free port):
# a warm-up run of two clients, the server's VmRSS as baseline (max of 3 samples), then
# examples/bench_clients.rs with N clients (each connects and registers a public service;
# one more client calls a random sample of them). Once it prints `ready`, the server's
# VmRSS is sampled 5 times (the max counts) and (rss_connected - rss_baseline) / N is the
# memory per client. Then the clients disconnect and the server stops. The same is done
# against the stock Python server (hypha 0.21.137 from $VENV) with $PY_CLIENTS clients.
#
# Env: CARGO_TARGET_DIR, CLIENTS ("1000 10000"), PY_CLIENTS (1000; 0 skips the Python
# server), VENV (~/.cache/hypha-interop/venv), ARBITERS (client threads; default: cores),
# READY_TIMEOUT (seconds to wait for all clients, 900).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-/tmp/hypha-many-clients}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
CLIENTS="${CLIENTS:-1000 10000}"
PY_CLIENTS="${PY_CLIENTS:-1000}"
VENV="${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hypha-interop/venv}"
READY_TIMEOUT="${READY_TIMEOUT:-900}"
mkdir -p "$OUT/results" "$OUT/logs"

die() { echo "ERROR: $*" >&2; exit 1; }

# --- limits: every client needs a socket in the bench process, and the server one per client.
most=$PY_CLIENTS
for n in $CLIENTS; do [ "$n" -gt "$most" ] && most=$n; done
need_fds=$((most + 1024))
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$need_fds" ]; then
  die "$most clients need ~$need_fds file descriptors per process; the hard limit is $hard (raise it, e.g. in /etc/security/limits.conf, or lower CLIENTS)"
fi
if [ "$hard" = unlimited ]; then ulimit -n "$need_fds"; else ulimit -n "$hard"; fi
read -r port_lo port_hi < /proc/sys/net/ipv4/ip_local_port_range
ports=$((port_hi - port_lo + 1))
[ "$ports" -gt $((most + 1000)) ] || die "$most clients need $most local ports; the ephemeral range $port_lo-$port_hi has $ports (widen net.ipv4.ip_local_port_range)"
echo "fd limit $(ulimit -n), ephemeral ports $port_lo-$port_hi" >&2

(cd "$ROOT" && CARGO_TARGET_DIR="$TARGET" cargo build --release --example bench_clients --bin hypha-server)
BENCH="$TARGET/release/examples/bench_clients"
OUR_SERVER="$TARGET/release/hypha-server"

# --- processes we started (the trap ends only these, by pid)
SERVER_PID="" BENCH_PID="" SERVER_CWD="" HOLD=""
cleanup() {
  exec 3>&-   # (closing a closed descriptor is fine)
  for pid in $BENCH_PID $SERVER_PID; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  BENCH_PID="" SERVER_PID=""
  [ -n "$SERVER_CWD" ] && rm -rf "$SERVER_CWD"
  [ -n "$HOLD" ] && rm -f "$HOLD"
  SERVER_CWD="" HOLD=""
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
rss_kb() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }
max_rss_kb() {  # max_rss_kb PID SAMPLES: the largest VmRSS of SAMPLES readings 1 s apart
  local best=0 v
  for _ in $(seq 1 "$2"); do
    v=$(rss_kb "$1" VmRSS); [ "$v" -gt "$best" ] && best=$v
    sleep 1
  done
  echo "$best"
}
cpu_s() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }

start_server() {  # start_server LABEL CMD...; sets SERVER_PID and URL
  local label="$1"; shift
  SERVER_CWD="$(mktemp -d /tmp/hypha-many-XXXXXX)"
  (cd "$SERVER_CWD" && exec "$@") >"$OUT/logs/$label-server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    curl -sf -m 1 "$URL/health/liveness" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -20 "$OUT/logs/$label-server.log" >&2; die "$label: the server exited"; }
    sleep 0.1
  done
  die "$label: the server did not start within 60 s"
}

run() {  # run LABEL N SERVER_KIND(ours|python)
  local label="$1" n="$2" kind="$3" port
  port=$(free_port)
  URL="http://127.0.0.1:$port"
  echo "=== $label: $n clients, $kind server on $URL" >&2
  if [ "$kind" = ours ]; then
    start_server "$label" "$OUR_SERVER" --host 127.0.0.1 --port "$port"
  else
    start_server "$label" "$VENV/bin/python" -m hypha.server --host=127.0.0.1 --port="$port"
  fi
  # Warm-up: the first clients create what every later one shares.
  "$BENCH" --server-url "$URL" --clients 2 --check 2 --no-hold >"$OUT/logs/$label-warmup.log" 2>&1 \
    || die "$label: the warm-up clients failed (see $OUT/logs/$label-warmup.log)"
  sleep 2
  local before cpu0 t0
  before=$(max_rss_kb "$SERVER_PID" 3)
  cpu0=$(cpu_s "$SERVER_PID")
  HOLD="$OUT/hold.fifo"; rm -f "$HOLD"; mkfifo "$HOLD"
  "$BENCH" --server-url "$URL" --clients "$n" --server-pid "$SERVER_PID" --json "$OUT/results/$label-clients.json" \
    ${ARBITERS:+--arbiters "$ARBITERS"} <"$HOLD" >"$OUT/logs/$label-bench.out" 2>"$OUT/logs/$label-bench.err" &
  BENCH_PID=$!
  exec 3>"$HOLD"   # the bench holds its clients until this closes
  t0=$(date +%s)
  until grep -q '^ready$' "$OUT/logs/$label-bench.out" 2>/dev/null; do
    kill -0 "$BENCH_PID" 2>/dev/null || { tail -20 "$OUT/logs/$label-bench.err" >&2; die "$label: bench_clients exited before all clients were ready"; }
    [ $(( $(date +%s) - t0 )) -lt "$READY_TIMEOUT" ] || die "$label: clients not ready after $READY_TIMEOUT s"
    sleep 1
  done
  local connected hwm cpu1 fds after_disc
  connected=$(max_rss_kb "$SERVER_PID" 5)
  hwm=$(rss_kb "$SERVER_PID" VmHWM)
  cpu1=$(cpu_s "$SERVER_PID")
  fds=$(ls "/proc/$SERVER_PID/fd" | wc -l)
  exec 3>&-
  local status=0
  wait "$BENCH_PID" || status=$?
  BENCH_PID=""
  sleep 3
  after_disc=$(rss_kb "$SERVER_PID" VmRSS)
  cleanup
  python3 - "$OUT/results/$label-clients.json" "$OUT/results/$label.json" <<PYEOF
import json, sys
r = json.load(open(sys.argv[1]))
n = $n
r.update({
    "label": "$label", "server": "$kind", "bench_exit_status": $status,
    "server_rss_baseline_KB": $before, "server_rss_connected_KB": $connected,
    "server_rss_peak_KB": $hwm, "server_rss_after_disconnect_KB": $after_disc,
    "server_fds_connected": $fds,
    "server_cpu_s_whole_run": round($cpu1 - $cpu0, 2),
    "server_KB_per_client": round(($connected - $before) / n, 1),
})
json.dump(r, open(sys.argv[2], "w"), indent=2)
print(f"$label: {r['server_KB_per_client']} KB per client on the server, "
      f"{r.get('registered')}/{n} registered in {r.get('all_registered_wall_s')} s, check {r.get('check', {}).get('ok')}/{r.get('check', {}).get('sampled')}",
      file=sys.stderr)
PYEOF
  [ "$status" = 0 ] || echo "WARNING: $label: bench_clients exited with $status (see $OUT/logs/$label-bench.err)" >&2
}

LABELS=()
for n in $CLIENTS; do run "ours-$n" "$n" ours; LABELS+=("ours-$n"); done
if [ "$PY_CLIENTS" -gt 0 ]; then
  if [ -x "$VENV/bin/python" ]; then
    run "python-$PY_CLIENTS" "$PY_CLIENTS" python; LABELS+=("python-$PY_CLIENTS")
  else
    echo "no Python server at $VENV: skipped" >&2
  fi
fi

python3 - "$OUT" "${LABELS[@]}" <<'PYEOF'
import json, os, sys, datetime
out, labels = sys.argv[1], sys.argv[2:]
R = [json.load(open(os.path.join(out, "results", l + ".json"))) for l in labels]
def f(v, d=1):
    return "n/a" if v is None else (f"{v:,.{d}f}" if isinstance(v, float) else f"{v:,}")
rows = [
    ("clients registered", lambda r: f"{f(r.get('registered'))} / {f(r.get('clients'))}"),
    ("connect retries (server busy, ...)", lambda r: f(r.get("connect_retries"))),
    ("all registered after, s", lambda r: f(r.get("all_registered_wall_s"))),
    ("connect+register per client p50 / p99, s", lambda r: f"{f(r.get('connect_register_p50_s'), 2)} / {f(r.get('connect_register_p99_s'), 2)}"),
    ("random services called OK", lambda r: f"{f(r.get('check', {}).get('ok'))} / {f(r.get('check', {}).get('sampled'))}"),
    ("server RSS baseline, MB", lambda r: f(r["server_rss_baseline_KB"] / 1024)),
    ("server RSS connected, MB", lambda r: f(r["server_rss_connected_KB"] / 1024)),
    ("**server memory per client, KB**", lambda r: f"**{f(r['server_KB_per_client'])}**"),
    ("server CPU for the run, s", lambda r: f(r.get("server_cpu_s_whole_run"), 2)),
    ("server RSS after disconnect, MB", lambda r: f(r["server_rss_after_disconnect_KB"] / 1024)),
    ("bench process RSS per client, KB", lambda r: f(r.get("client_rss_per_client_KB"))),
    ("disconnect all, s", lambda r: f(r.get("disconnect_all_wall_s"), 2)),
]
lines = [f"Run of {datetime.date.today()} ({os.cpu_count()} CPUs)", "",
         "| | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
for name, get in rows:
    lines.append(f"| {name} | " + " | ".join(get(r) for r in R) + " |")
text = "\n".join(lines)
open(os.path.join(out, "summary.md"), "w").write(text + "\n")
json.dump({l: r for l, r in zip(labels, R)}, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(text)
PYEOF
