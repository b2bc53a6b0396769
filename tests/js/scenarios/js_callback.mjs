// js_callback: JS provider calls a JS consumer's callback several times during one call (in
// order), an async callback's return values travel back, an error thrown in a callback
// reaches the caller, and a callback stored by the provider fails after the call returned.
import { Scenario } from "./_common.mjs";

const sc = new Scenario("js_callback");
sc.run(async (sc) => {
  const provider = await sc.connect("JS provider", { client_id: "js-cb-provider" });
  const consumer = await sc.connect("JS consumer", { client_id: "js-cb-consumer" });
  const kept = {};
  const info = await provider.registerService({
    id: "cb-svc",
    config: { visibility: "public" },
    count: async (n, cb) => {
      for (let i = 0; i < n; i++) await cb(i, n);
      return n;
    },
    collect: async (n, cb) => {
      const out = [];
      for (let i = 0; i < n; i++) out.push(await cb(i));
      return out;
    },
    keep: async (cb) => { kept.cb = cb; await cb("during"); return "kept"; },
    callKept: async () => await kept.cb("after"),
    failing: async (cb) => await cb(),
  });
  const svc = await consumer.getService(info.id);
  const seen = [];
  sc.eq("count(10, cb) returns 10", await svc.count(10, (i, n) => { seen.push([i, n]); }), 10);
  sc.eq("callback invoked 10 times in order with (i, n)", seen, [...Array(10).keys()].map((i) => [i, 10]));
  sc.eq("async callback results travel back", await svc.collect(4, async (i) => i * i), [0, 1, 4, 9]);
  await sc.expectError("error thrown in a callback reaches the caller",
                       svc.failing(() => { throw new Error("js callback exploded"); }), ["js callback exploded"]);
  const during = [];
  sc.eq("stored callback works during the call", await svc.keep((v) => { during.push(v); }), "kept");
  await sc.expectError("stored callback invoked after the call returned fails", svc.callKept(),
                       ["not found", "Session"]);
  sc.eq("the late invocation did not reach the consumer", during, ["during"]);
});
