// Shared plumbing for the JS-client interop scenarios (not a scenario itself).
//
//   node [--experimental-websocket] SCENARIO.mjs --server-url http://127.0.0.1:PORT [--python PY]
//
// Same output convention as tests/interop/scenarios: one `PASS name` / `FAIL name: detail`
// line per check, then `{"scenario": NAME, "passed": n, "failed": m}`; exit 0 iff no FAIL.
// Node 20 needs --experimental-websocket (the stock client uses the global WebSocket);
// Node >= 22 has it built in. A missing WebSocket is a FAIL, not a skip.
import { connectToServer } from "hypha-rpc";

export function parseArgs() {
  const out = { serverUrl: null, python: process.env.HYPHA_INTEROP_PYTHON || "python3", deadline: 28 };
  const a = process.argv.slice(2);
  for (let i = 0; i < a.length; i++) {
    if (a[i] === "--server-url") out.serverUrl = a[++i];
    else if (a[i] === "--python") out.python = a[++i];
    else if (a[i] === "--deadline") out.deadline = Number(a[++i]);
    else if (a[i] === "--root-token") i++; // accepted for symmetry, unused
  }
  if (!out.serverUrl) {
    console.error("usage: node SCENARIO.mjs --server-url URL [--python PY]");
    process.exit(2);
  }
  out.serverUrl = out.serverUrl.replace(/\/+$/, "");
  return out;
}

function short(x, n = 300) {
  let s;
  if (x instanceof Error) s = `${x.name}: ${x.message}`;
  else if (typeof x === "string") s = x;
  else {
    try { s = JSON.stringify(x); } catch { s = String(x); }
  }
  s = String(s).replace(/\n/g, " | ");
  return s.length > n ? s.slice(0, n) + "..." : s;
}

export class Scenario {
  constructor(name) {
    this.name = name;
    this.args = parseArgs();
    this.url = this.args.serverUrl;
    this.passed = 0;
    this.failed = 0;
    this.clients = [];
    this.t0 = Date.now();
  }

  check(name, ok, detail = "") {
    if (ok) {
      this.passed++;
      console.log(`PASS ${name}`);
    } else {
      this.failed++;
      console.log(`FAIL ${name}: ${detail === "" ? "check failed" : short(detail)}`);
    }
    return !!ok;
  }

  eq(name, got, want) {
    const g = JSON.stringify(got);
    const w = JSON.stringify(want);
    return this.check(name, g === w, `got ${short(g)}, want ${short(w)}`);
  }

  async expectError(name, promise, substrings, timeoutMs = 15000) {
    if (typeof substrings === "string") substrings = [substrings];
    let timer;
    const to = new Promise((_, rej) => { timer = setTimeout(() => rej(new Error("__timeout__")), timeoutMs); });
    try {
      const r = await Promise.race([promise, to]);
      return this.check(name, false, `no error, returned ${short(r)}`);
    } catch (e) {
      const text = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
      if (text.includes("__timeout__")) return this.check(name, false, `no error within ${timeoutMs} ms`);
      const ok = substrings.some((s) => text.toLowerCase().includes(s.toLowerCase()));
      return this.check(name, ok, `error ${short(text)} lacks any of ${JSON.stringify(substrings)}`);
    } finally {
      clearTimeout(timer);
    }
  }

  async connect(label, config = {}) {
    try {
      const c = await connectToServer({ server_url: this.url, ...config });
      this.clients.push(c);
      return c;
    } catch (e) {
      this.check(`connect ${label}`, false, e);
      throw new Abort(`connect ${label}`);
    }
  }

  async cleanup() {
    for (const c of this.clients.reverse()) {
      try {
        await Promise.race([c.disconnect(), new Promise((r) => setTimeout(r, 3000))]);
      } catch { /* already gone */ }
    }
    this.clients = [];
  }

  run(main) {
    const finish = () => {
      if (this.passed + this.failed === 0) this.check("scenario ran at least one check", false, "no check was executed");
      console.log(JSON.stringify({ scenario: this.name, passed: this.passed, failed: this.failed,
                                   seconds: Math.round((Date.now() - this.t0) / 10) / 100 }));
      process.exit(this.failed === 0 ? 0 : 1);
    };
    const watchdog = setTimeout(async () => {
      this.check("scenario finished in time", false, `watchdog: still running after ${this.args.deadline}s`);
      await this.cleanup();
      finish();
    }, this.args.deadline * 1000);
    (async () => {
      try {
        if (typeof globalThis.WebSocket === "undefined") {
          this.check("global WebSocket available", false,
                     "run node with --experimental-websocket (Node 20) or use Node >= 22");
          return;
        }
        await main(this);
      } catch (e) {
        if (!(e instanceof Abort)) this.check("scenario ran without unexpected exception", false, e && e.stack ? e.stack : e);
      } finally {
        await this.cleanup();
        clearTimeout(watchdog);
        finish();
      }
    })();
  }
}

export class Abort extends Error {}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

export async function waitUntil(pred, timeoutMs = 5000, intervalMs = 50) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await pred();
    if (v || Date.now() >= end) return v;
    await sleep(intervalMs);
  }
}
