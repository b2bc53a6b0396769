// js_generator: a JS provider returns sync and async generators; the JS consumer (another
// workspace) consumes them fully and partially (break -> close sent, the provider's
// finally runs), and an error thrown mid-stream reaches the consumer.
import { Scenario, waitUntil } from "./_common.mjs";

const sc = new Scenario("js_generator");
sc.run(async (sc) => {
  const provider = await sc.connect("JS provider", { client_id: "js-gen-provider" });
  const consumer = await sc.connect("JS consumer", { client_id: "js-gen-consumer" });
  const ev = { finally: 0 };
  const info = await provider.registerService({
    id: "gen-svc",
    config: { visibility: "public" },
    syncGen: function* (n) { for (let i = 0; i < n; i++) yield i; },
    asyncGen: async function* (n) { for (let i = 0; i < n; i++) { await new Promise((r) => setTimeout(r, 1)); yield { i }; } },
    infinite: async function* () {
      let i = 0;
      try { for (;;) { yield i++; await new Promise((r) => setTimeout(r, 5)); } } finally { ev.finally++; }
    },
    broken: async function* () { yield 0; yield 1; throw new Error("js stream broke"); },
  });
  const svc = await consumer.getService(info.id);
  const collect = async (g) => { const out = []; for await (const x of g) out.push(x); return out; };
  sc.eq("sync generator fully consumed", await collect(await svc.syncGen(5)), [0, 1, 2, 3, 4]);
  sc.eq("async generator fully consumed", (await collect(await svc.asyncGen(3))).map((x) => x.i), [0, 1, 2]);
  sc.eq("empty generator", await collect(await svc.syncGen(0)), []);
  const g = await svc.infinite();
  const part = [];
  for await (const x of g) { part.push(x); if (part.length === 3) break; }
  sc.eq("partial consumption yields the first 3 items", part, [0, 1, 2]);
  sc.check("breaking out closes the remote generator (its finally ran)",
           await waitUntil(() => ev.finally >= 1, 5000), ev);
  const got = [];
  await sc.expectError("error thrown mid-stream reaches the consumer",
                       (async () => { for await (const x of await svc.broken()) got.push(x); })(), ["js stream broke"]);
  sc.check("items before the error arrived", JSON.stringify(got) === JSON.stringify([0, 1].slice(0, got.length)), got);
});
