"""Shared plumbing for the black-box interop scenarios (not a scenario itself).

Each scenario script is run as

    python SCENARIO.py --server-url http://127.0.0.1:PORT [--root-token TOKEN]

with the interpreter of the project's test venv (stock `hypha-rpc` Python client, numpy,
msgpack; no server, no httpx). It prints one line per check, `PASS name` or
`FAIL name: detail`, then a final JSON line
`{"scenario": NAME, "passed": n, "failed": m}` and exits 0 iff nothing failed.

Rules every scenario follows (the helpers below enforce most of them):
- a check that cannot be carried out (missing root token, a client that cannot connect, an
  exception in the middle of the script) is a FAIL, never a skip;
- the whole script is bounded by a watchdog (default 28 s, `--deadline`); running out of time
  is a FAIL;
- every client opened through `Scenario.connect` is disconnected at the end;
- HTTP goes through `urllib.request` run in a worker thread, so that providers living in the
  same event loop keep answering while the request is in flight.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.request

from hypha_rpc import connect_to_server


VERBOSE = bool(os.environ.get("SCENARIO_VERBOSE"))


def short(text, limit=300):
    """One-line, bounded rendering of an error or value for FAIL details."""
    s = str(text).replace("\n", " | ")
    return s if len(s) <= limit else s[:limit] + "..."


class CheckFailed(Exception):
    """Raised by `Scenario.require` to abort the rest of a scenario after a failed
    precondition (the failure itself has already been recorded)."""


class Scenario:
    def __init__(self, name, needs_root=False, deadline=28.0):
        p = argparse.ArgumentParser(description=f"interop scenario {name}")
        p.add_argument("--server-url", required=True, help="http://host:port of the server")
        p.add_argument("--root-token", default=os.environ.get("HYPHA_ROOT_TOKEN"),
                       help="root token of the server (needed by some scenarios)")
        p.add_argument("--deadline", type=float, default=deadline,
                       help="seconds before the watchdog fails the scenario")
        self.args = p.parse_args()
        self.name = name
        self.url = self.args.server_url.rstrip("/")
        self.root_token = self.args.root_token
        self.needs_root = needs_root
        self.deadline = self.args.deadline
        self.passed = 0
        self.failed = 0
        self.clients = []
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ checks
    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"PASS {name}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name}: {short(detail) if detail != '' else 'check failed'}", flush=True)
        return bool(ok)

    def require(self, name, ok, detail=""):
        """Like check, but abort the scenario when it fails."""
        if not self.check(name, ok, detail):
            raise CheckFailed(name)

    def eq(self, name, got, want):
        return self.check(name, got == want, f"got {short(repr(got))}, want {short(repr(want))}")

    async def expect_error(self, name, awaitable, substrings, timeout=15.0, max_seconds=None):
        """The awaitable must raise, within `timeout` (and within `max_seconds` if given),
        with an error text containing at least one of `substrings` (case-insensitive)."""
        if isinstance(substrings, str):
            substrings = [substrings]
        t = time.monotonic()
        try:
            r = await asyncio.wait_for(awaitable, timeout)
        except asyncio.TimeoutError:
            return self.check(name, False, f"no error within {timeout}s (timed out)")
        except Exception as e:  # noqa: BLE001 - any error type is accepted, the text decides
            dt = time.monotonic() - t
            text = f"{type(e).__name__}: {e}"
            ok = any(s.lower() in text.lower() for s in substrings)
            if VERBOSE:
                hit = [ln for ln in text.splitlines()
                       if any(x.lower() in ln.lower() for x in substrings)]
                print(f"  .. {name}: {short(hit[0] if hit else text, 400)}", flush=True)
            if ok and max_seconds is not None and dt > max_seconds:
                return self.check(name, False, f"error came after {dt:.2f}s (> {max_seconds}s): {short(text)}")
            return self.check(name, ok, f"error {short(text)!r} lacks any of {substrings}")
        return self.check(name, False, f"no error, returned {short(repr(r))}")

    async def attempt(self, name, awaitable, timeout=15.0):
        """Await; on error record FAIL and return None (the caller decides what follows)."""
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except Exception as e:  # noqa: BLE001
            self.check(name, False, f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__}")
            return None

    # ----------------------------------------------------------------- clients
    async def connect(self, label="client", timeout=15.0, **config):
        """Connect a stock Python client; failure to connect aborts the scenario."""
        cfg = {"server_url": self.url}
        cfg.update(config)
        try:
            c = await asyncio.wait_for(connect_to_server(cfg), timeout)
        except Exception as e:  # noqa: BLE001
            self.check(f"connect {label}", False, f"{type(e).__name__}: {e}")
            raise CheckFailed(f"connect {label}") from e
        self.clients.append(c)
        return c

    async def try_connect(self, **config):
        """Connect without catching errors (for expected refusals); a client that does
        connect is still tracked for cleanup."""
        cfg = {"server_url": self.url}
        cfg.update(config)
        c = await connect_to_server(cfg)
        self.clients.append(c)
        return c

    async def disconnect(self, client):
        if client in self.clients:
            self.clients.remove(client)
        try:
            await asyncio.wait_for(client.disconnect(), 5)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass

    async def cleanup(self):
        for c in list(reversed(self.clients)):
            await self.disconnect(c)

    def need_root(self):
        if not self.root_token:
            self.check("root token available", False,
                       "this scenario needs --root-token (the server must be started with one)")
            raise CheckFailed("root token")

    # -------------------------------------------------------------------- http
    def _http_sync(self, method, path, body=None, headers=None, timeout=20.0):
        url = path if path.startswith("http") else self.url + path
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
        except urllib.error.HTTPError as e:
            data = e.read() if e.fp is not None else b""
            return e.code, {k.lower(): v for k, v in (e.headers or {}).items()}, data

    async def http(self, method, path, body=None, headers=None, timeout=20.0):
        """(status, lower-cased headers, body bytes); never raises for HTTP error statuses."""
        return await asyncio.to_thread(self._http_sync, method, path, body, headers, timeout)

    async def http_json(self, method, path, obj=None, headers=None, timeout=20.0):
        """Send obj as JSON (if given); return (status, headers, parsed JSON or raw text)."""
        h = dict(headers or {})
        body = None
        if obj is not None:
            body = json.dumps(obj).encode()
            h.setdefault("Content-Type", "application/json")
        status, hdrs, data = await self.http(method, path, body, h, timeout)
        try:
            return status, hdrs, json.loads(data.decode() or "null")
        except Exception:  # noqa: BLE001
            return status, hdrs, data.decode("utf-8", "replace")

    # --------------------------------------------------------------------- run
    def run(self, main):
        """Run `main(self)` under the watchdog, disconnect every client, print the summary
        line and exit with 0 iff every check passed."""

        async def runner():
            try:
                await asyncio.wait_for(main(self), self.deadline)
            except CheckFailed:
                pass
            except asyncio.TimeoutError:
                self.check("scenario finished in time", False,
                           f"watchdog: still running after {self.deadline}s")
            except Exception as e:  # noqa: BLE001
                tb = traceback.format_exc().strip().splitlines()
                self.check("scenario ran without unexpected exception", False,
                           f"{type(e).__name__}: {e} at {tb[-3] if len(tb) >= 3 else ''}")
            finally:
                try:
                    await asyncio.wait_for(self.cleanup(), 8)
                except Exception:  # noqa: BLE001
                    pass

        try:
            asyncio.run(runner())
        except KeyboardInterrupt:
            self.check("scenario not interrupted", False, "KeyboardInterrupt")
        if self.passed + self.failed == 0:
            self.check("scenario ran at least one check", False, "no check was executed")
        print(json.dumps({"scenario": self.name, "passed": self.passed, "failed": self.failed,
                          "seconds": round(time.monotonic() - self.t0, 2)}), flush=True)
        # os._exit: stock clients may leave background tasks/threads; do not hang on them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if self.failed == 0 else 1)


def plain(v):
    """ObjectProxy / dict-like values -> plain Python data (for comparisons)."""
    if hasattr(v, "toDict"):
        v = v.toDict()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


async def wait_until(predicate, timeout=5.0, interval=0.05):
    """Poll predicate() (sync or async) until truthy or timeout; return its last value."""
    end = time.monotonic() + timeout
    while True:
        v = predicate()
        if asyncio.iscoroutine(v):
            v = await v
        if v or time.monotonic() >= end:
            return v
        await asyncio.sleep(interval)
