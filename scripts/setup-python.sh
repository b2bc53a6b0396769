#!/usr/bin/env bash
# Creates (or refreshes) the project's two Python venvs:
#   .venv         the pinned stock hypha-rpc client (tests/python/requirements.txt), the peer
#                 that drives our server and calls our client's services;
#   .venv-server  the pinned stock hypha server (tests/python/server-requirements.txt), the
#                 server our Rust client is tested against.
# They are separate so that the server's many pins never move the client's.
# Idempotent and cheap when nothing changed: a stamp file in each venv holds the hash of
# the requirements it was built from.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
command -v "$py" >/dev/null || { echo "setup-python: $py not found; install Python 3.9+ with venv" >&2; exit 1; }

# make_venv DIR REQUIREMENTS CHECK-IMPORTS
make_venv() {
  local venv="$1" req="$2" check="$3"
  local stamp="$venv/.requirements.sha256"
  local want
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  "$venv/bin/python" -c "$check"
  echo "$want" > "$stamp"
}

make_venv "${HYPHA_VENV:-$root/.venv}" "$root/tests/python/requirements.txt" \
  "import hypha_rpc, numpy, msgpack; print('python client peer ready')"
make_venv "${HYPHA_SERVER_VENV:-$root/.venv-server}" "$root/tests/python/server-requirements.txt" \
  "import importlib.metadata as m; print('python server peer ready: hypha', m.version('hypha'))"
