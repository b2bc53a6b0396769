#!/usr/bin/env bash
# Creates (or refreshes) the project's Python venv with the pinned stock hypha-rpc client.
# Idempotent and cheap when nothing changed: a stamp file holds the hash of the
# requirements it was built from.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HYPHA_VENV:-$root/.venv}"
req="$root/tests/python/requirements.txt"
py="${PYTHON:-python3}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
command -v "$py" >/dev/null || { echo "setup-python: $py not found; install Python 3.9+ with venv" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
"$venv/bin/python" -c "import hypha_rpc, numpy, msgpack; print('python peers: hypha-rpc', hypha_rpc.__version__ if hasattr(hypha_rpc, '__version__') else '?')"
echo "$want" > "$stamp"
