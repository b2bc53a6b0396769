// js_py_interop: cross-language calls through the server.
// 1. a Python provider (tests/interop/scenarios/_py_peer.py, started by this script with
//    --python, default $HYPHA_INTEROP_PYTHON or python3) is called by a JS consumer:
//    plain call, positional args, nested values, bytes, a JS callback invoked by Python, a
//    Python generator consumed in JS, a numpy array (arrives as an _rtype ndarray object),
//    and a Python exception;
// 2. a JS provider is called by a Python consumer (same helper in `consume` mode).
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { Scenario } from "./_common.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const peer = path.resolve(here, "../../interop/scenarios/_py_peer.py");

function firstJsonLine(child, timeoutMs) {
  return new Promise((resolve, reject) => {
    const rl = createInterface({ input: child.stdout });
    const timer = setTimeout(() => reject(new Error(`no JSON line from the Python peer in ${timeoutMs} ms`)), timeoutMs);
    rl.on("line", (line) => {
      if (line.startsWith("{")) {
        clearTimeout(timer);
        rl.close();
        try { resolve(JSON.parse(line)); } catch (e) { reject(e); }
      }
    });
    child.on("exit", (code) => { clearTimeout(timer); reject(new Error(`Python peer exited with ${code}`)); });
  });
}

const sc = new Scenario("js_py_interop");
sc.run(async (sc) => {
  // 1. JS consumer of a Python provider
  const prov = spawn(sc.args.python, [peer, "provide", "--server-url", sc.url], { stdio: ["pipe", "pipe", "ignore"] });
  try {
    let ready;
    try {
      ready = await firstJsonLine(prov, 15000);
    } catch (e) {
      sc.check("Python provider started", false, e);
      return;
    }
    sc.check("Python provider started", !!ready.service_id, ready);
    const consumer = await sc.connect("JS consumer", { client_id: "js-py-consumer" });
    const svc = await consumer.getService(ready.service_id);
    sc.eq("JS -> Python hello", await svc.hello("JS"), "Hello JS from Python");
    sc.eq("JS -> Python add(2, 40)", await svc.add(2, 40), 42);
    sc.eq("JS -> Python echo nested", await svc.echo({ a: [1, "x", null, true, { b: 2.5 }] }),
          { a: [1, "x", null, true, { b: 2.5 }] });
    const b = await svc.echo(new Uint8Array([0, 1, 255]));
    sc.check("JS -> Python echo bytes", b instanceof Uint8Array && b.length === 3 && b[2] === 255, b);
    const seen = [];
    sc.eq("Python calls a JS callback 5 times", await svc.count(5, (i) => { seen.push(i); }), 5);
    sc.eq("JS callback saw 0..4 in order", seen, [0, 1, 2, 3, 4]);
    const items = [];
    for await (const x of await svc.gen(4)) items.push(x.i);
    sc.eq("Python generator consumed in JS", items, [0, 1, 2, 3]);
    const arr = await svc.array();
    sc.check("numpy array arrives as an ndarray object (int32, shape [2,3])",
             arr && arr._rtype === "ndarray" && arr._rdtype === "int32" && JSON.stringify(arr._rshape) === "[2,3]",
             arr && { _rtype: arr._rtype, _rdtype: arr._rdtype, _rshape: arr._rshape });
    await sc.expectError("Python exception reaches JS", svc.fail(), ["python says no"]);
  } finally {
    prov.stdin.end();
    setTimeout(() => prov.kill("SIGKILL"), 3000).unref();
  }

  // 2. Python consumer of a JS provider
  const provider = await sc.connect("JS provider", { client_id: "js-provider" });
  const info = await provider.registerService({
    id: "js-svc",
    config: { visibility: "public" },
    hello: (name) => `Hello ${name} from JS`,
    add: (a, b) => a + b,
    echo: (x) => x,
    count: async (n, cb) => { for (let i = 0; i < n; i++) await cb(i); return n; },
    gen: async function* (n) { for (let i = 0; i < n; i++) yield i * 10; },
    fail: () => { throw new Error("js says no"); },
  });
  const cons = spawn(sc.args.python, [peer, "consume", "--server-url", sc.url, "--service-id", info.id],
                     { stdio: ["ignore", "pipe", "ignore"] });
  let r;
  try {
    r = await firstJsonLine(cons, 20000);
  } catch (e) {
    sc.check("Python consumer reported", false, e);
    return;
  } finally {
    setTimeout(() => cons.kill("SIGKILL"), 3000).unref();
  }
  sc.check("Python consumer ran without error", !r.error, r.error);
  sc.eq("Python -> JS hello", r.hello, "Hello Py from JS");
  sc.eq("Python -> JS add", r.add, 5);
  sc.eq("Python -> JS echo nested", r.echo, { k: [1, "2", null, true, 1.5] });
  sc.eq("Python -> JS echo bytes", r.echo_bytes, [0, 1, 255]);
  sc.eq("JS calls a Python callback 4 times", [r.count, r.count_seen], [4, [0, 1, 2, 3]]);
  sc.eq("JS generator consumed in Python", r.gen, [0, 10, 20]);
  sc.check("JS exception reaches Python", typeof r.fail === "string" && r.fail.includes("js says no"), r.fail);
});
