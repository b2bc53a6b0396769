#!/usr/bin/env python
"""Run the black-box interop scenarios against a Hypha-compatible server.

    python tests/interop/run_scenarios.py --server-url http://127.0.0.1:9527 [--root-token T]
    python tests/interop/run_scenarios.py --server-cmd 'CMD ... --port={port} --root-token={root_token}'

With --server-cmd the runner picks a free loopback port, substitutes `{port}` (and
`{root_token}`, a fresh random 64-character token, if the command mentions it), starts the
command in its own process group, waits for `GET /health/liveness` to answer 200, runs the
scenarios and stops the server at the end (SIGTERM, then SIGKILL).

Python scenarios (tests/interop/scenarios/*.py) run with --python (default: this
interpreter, which must have the stock hypha-rpc client). JS scenarios
(tests/js/scenarios/*.mjs) run with node; `npm ci --no-audit --no-fund` is run in tests/js
first when node_modules is missing, and `--experimental-websocket` is added on Node
versions without a global WebSocket. Files whose names start with `_` are helpers.

Prints a summary table and a closing line `scenarios: N passed, M failed`; exits non-zero
if any scenario failed (a scenario that cannot run, e.g. no node, is a failure).
"""

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PY_DIR = os.path.join(HERE, "scenarios")
JS_ROOT = os.path.normpath(os.path.join(HERE, "..", "js"))
JS_DIR = os.path.join(JS_ROOT, "scenarios")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def liveness(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url + "/health/liveness", timeout=timeout) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


def discover():
    out = []
    for f in sorted(os.listdir(PY_DIR)):
        if f.endswith(".py") and not f.startswith("_"):
            out.append((f[:-3], "py", os.path.join(PY_DIR, f)))
    if os.path.isdir(JS_DIR):
        for f in sorted(os.listdir(JS_DIR)):
            if f.endswith(".mjs") and not f.startswith("_"):
                out.append((f[:-4], "js", os.path.join(JS_DIR, f)))
    return out


class Server:
    def __init__(self, cmd, log_path, startup_timeout):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root_token = None
        if "{root_token}" in cmd:
            alphabet = string.ascii_letters + string.digits
            self.root_token = "".join(secrets.choice(alphabet) for _ in range(64))
        self.cmd = cmd.replace("{port}", str(self.port)).replace("{root_token}", self.root_token or "")
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc = None

    def start(self):
        shown = self.cmd.replace(self.root_token, "<root-token>") if self.root_token else self.cmd
        print(f"starting server: {shown}", flush=True)
        self.log = open(self.log_path, "wb")
        # Whatever the server writes (our accounts database, upstream's SQLite event log in
        # the temp dir) goes under the log dir, so a green run leaves nothing behind.
        scratch = os.path.join(os.path.dirname(self.log_path), "server-data")
        os.makedirs(scratch, exist_ok=True)
        env = dict(os.environ, HYPHA_DATA_DIR=scratch, TMPDIR=scratch)
        self.proc = subprocess.Popen(self.cmd, shell=True, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was live")
            if liveness(self.url):
                print(f"server live at {self.url} after {time.monotonic() - t0:.1f}s", flush=True)
                return
            time.sleep(0.2)
        raise RuntimeError(f"server not live at {self.url}/health/liveness after {self.startup_timeout}s")

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self.log.close()

    def tail(self, n=30):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""


def node_command(node):
    """[node] or [node, --experimental-websocket], or None when node is unusable."""
    if not shutil.which(node):
        return None, f"{node} not found"
    probe = "process.exit(typeof WebSocket === 'undefined' ? 3 : 0)"
    for cmd in ([node], [node, "--experimental-websocket"]):
        r = subprocess.run(cmd + ["-e", probe], capture_output=True, timeout=30)
        if r.returncode == 0:
            return cmd, None
    return None, "this node has no global WebSocket, even with --experimental-websocket (need Node >= 20.10)"


def ensure_node_modules(npm):
    if os.path.isdir(os.path.join(JS_ROOT, "node_modules", "hypha-rpc")):
        return None
    if not shutil.which(npm):
        return f"{npm} not found (needed for npm ci in {JS_ROOT})"
    print(f"running npm ci in {JS_ROOT}", flush=True)
    r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_ROOT, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        return f"npm ci failed ({r.returncode}): {(r.stdout + r.stderr)[-800:]}"
    return None


LINE = re.compile(r"^(PASS|FAIL) ")


def run_one(name, kind, path, args, url, root_token, node_cmd, log_dir):
    if kind == "py":
        cmd = [args.python, path, "--server-url", url]
    else:
        cmd = node_cmd + [path, "--server-url", url, "--python", args.python]
    if root_token:
        cmd += ["--root-token", root_token]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                           cwd=os.path.dirname(path), stdin=subprocess.DEVNULL)
        rc, out, err = p.returncode, p.stdout, p.stderr
        timed_out = False
    except subprocess.TimeoutExpired as e:
        rc = None
        out = e.stdout.decode("utf-8", "replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        timed_out = True
    dt = time.monotonic() - t0
    if log_dir:
        with open(os.path.join(log_dir, f"{name}.log"), "w") as f:
            f.write(f"$ {' '.join(shlex.quote(c) for c in cmd).replace(root_token or '@@', '<root-token>')}\n")
            f.write(out)
            f.write("\n--- stderr ---\n")
            f.write(err)
    summary = None
    for line in out.splitlines():
        if line.startswith('{"scenario"'):
            try:
                summary = json.loads(line)
            except ValueError:
                pass
    fails = [ln for ln in out.splitlines() if ln.startswith("FAIL ")]
    passed = summary["passed"] if summary else sum(1 for ln in out.splitlines() if ln.startswith("PASS "))
    failed = summary["failed"] if summary else len(fails)
    problems = []
    if timed_out:
        problems.append(f"killed after {args.timeout}s")
    elif summary is None:
        problems.append(f"no summary line (exit code {rc})")
    elif rc != (1 if failed else 0):
        problems.append(f"exit code {rc} with {failed} failed checks")
    ok = not problems and failed == 0 and rc == 0
    return {"name": name, "kind": kind, "ok": ok, "passed": passed, "failed": failed, "seconds": dt,
            "fails": fails, "problems": problems, "stderr_tail": err.strip().splitlines()[-8:],
            "stdout": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--server-url", help="URL of a running server, e.g. http://127.0.0.1:9527")
    g.add_argument("--server-cmd", help="command starting a server; {port} and {root_token} are substituted")
    ap.add_argument("--root-token", default=os.environ.get("HYPHA_ROOT_TOKEN"),
                    help="root token of the server given by --server-url")
    ap.add_argument("--only", action="append", default=[],
                    help="run only this scenario (file name without extension); repeatable, comma lists ok")
    ap.add_argument("--skip-js", action="store_true", help="do not run the JS scenarios")
    ap.add_argument("--python", default=sys.executable, help="interpreter with the stock hypha-rpc client")
    ap.add_argument("--node", default="node")
    ap.add_argument("--npm", default="npm")
    ap.add_argument("--timeout", type=float, default=60, help="hard limit per scenario process (s)")
    ap.add_argument("--startup-timeout", type=float, default=90, help="server start limit (s)")
    ap.add_argument("--log-dir", help="keep each scenario's full output here (default: a temp dir)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every scenario's full output")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args()

    scenarios = discover()
    if args.list:
        for name, kind, _ in scenarios:
            print(f"{name}\t{kind}")
        return 0
    only = {x.strip() for o in args.only for x in o.split(",") if x.strip()}
    if only:
        unknown = only - {n for n, _, _ in scenarios}
        if unknown:
            print(f"unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        scenarios = [s for s in scenarios if s[0] in only]
    if args.skip_js:
        scenarios = [s for s in scenarios if s[1] != "js"]

    log_dir = args.log_dir or tempfile.mkdtemp(prefix="hypha-scenarios-")
    os.makedirs(log_dir, exist_ok=True)

    server = None
    t_start = time.monotonic()
    results = []
    try:
        if args.server_cmd:
            server = Server(args.server_cmd, os.path.join(log_dir, "server.log"), args.startup_timeout)
            try:
                server.start()
            except Exception as e:  # noqa: BLE001
                print(f"FAIL server start: {e}\n{server.tail()}", flush=True)
                print("scenarios: 0 passed, 1 failed")
                return 1
            url, root_token = server.url, server.root_token or args.root_token
            if not server.root_token:
                print("note: --server-cmd has no {root_token}; scenarios needing root will fail", flush=True)
        else:
            url, root_token = args.server_url.rstrip("/"), args.root_token
            if not liveness(url, timeout=5):
                print(f"warning: {url}/health/liveness does not answer 200", flush=True)

        node_cmd, node_problem = None, None
        if any(k == "js" for _, k, _ in scenarios):
            node_problem = ensure_node_modules(args.npm)
            if not node_problem:
                node_cmd, node_problem = node_command(args.node)

        for name, kind, path in scenarios:
            if kind == "js" and node_problem:
                r = {"name": name, "kind": kind, "ok": False, "passed": 0, "failed": 1, "seconds": 0.0,
                     "fails": [f"FAIL cannot run: {node_problem}"], "problems": ["not run"], "stderr_tail": [],
                     "stdout": ""}
            else:
                r = run_one(name, kind, path, args, url, root_token, node_cmd, log_dir)
            results.append(r)
            mark = "ok  " if r["ok"] else "FAIL"
            print(f"[{mark}] {name:<22} {r['passed']:>3} passed {r['failed']:>3} failed  {r['seconds']:6.1f}s"
                  + (f"  ({'; '.join(r['problems'])})" if r["problems"] else ""), flush=True)
            if args.verbose:
                print(r["stdout"])
            elif not r["ok"]:
                for ln in r["fails"][:20]:
                    print(f"       {ln}")
                if r["problems"]:
                    for ln in r["stderr_tail"]:
                        print(f"       stderr: {ln}")
    finally:
        if server is not None:
            server.stop()

    total = time.monotonic() - t_start
    n_ok = sum(1 for r in results if r["ok"])
    n_bad = len(results) - n_ok
    print()
    print(f"{'scenario':<22} {'kind':<4} {'result':<6} {'checks':>7} {'failed':>7} {'time':>7}")
    print("-" * 58)
    for r in results:
        print(f"{r['name']:<22} {r['kind']:<4} {'PASS' if r['ok'] else 'FAIL':<6} "
              f"{r['passed'] + r['failed']:>7} {r['failed']:>7} {r['seconds']:>6.1f}s")
    print("-" * 58)
    checks = sum(r["passed"] + r["failed"] for r in results)
    failed_checks = sum(r["failed"] for r in results)
    ok = n_bad == 0 and bool(results)
    if ok and not args.log_dir:
        # A green run leaves nothing behind; a red one keeps its logs for reading.
        shutil.rmtree(log_dir, ignore_errors=True)
        print(f"{len(results)} scenarios, {checks} checks ({failed_checks} failed), {total:.1f}s total")
    else:
        print(f"{len(results)} scenarios, {checks} checks ({failed_checks} failed), {total:.1f}s total; logs in {log_dir}")
    print(f"scenarios: {n_ok} passed, {n_bad} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
