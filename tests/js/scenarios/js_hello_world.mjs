// js_hello_world: JS provider in one workspace, JS consumer in another; full-id lookup and
// calls, the JS (camelCase) view of the manager, and a bare id not resolving across workspaces.
import { Scenario } from "./_common.mjs";

const sc = new Scenario("js_hello_world");
sc.run(async (sc) => {
  const provider = await sc.connect("JS provider", { client_id: "js-hello-provider" });
  const consumer = await sc.connect("JS consumer", { client_id: "js-hello-consumer" });
  const wa = provider.config.workspace;
  const wb = consumer.config.workspace;
  sc.check("two anonymous JS clients get two workspaces", wa && wb && wa !== wb, [wa, wb]);
  sc.eq("client_id in config", provider.config.client_id, "js-hello-provider");

  const info = await provider.registerService({
    id: "hello-world",
    name: "Hello World",
    description: "hello-world example",
    config: { visibility: "public" },
    hello: (name) => "Hello " + name,
    add: async (a, b) => a + b,
    echo: (x) => x,
  });
  sc.eq("registered id is {ws}/{cid}:hello-world", info.id, `${wa}/js-hello-provider:hello-world`);
  const svc = await consumer.getService(info.id);
  sc.eq("getService returns the full id", svc.id, info.id);
  sc.eq("call hello('John')", await svc.hello("John"), "Hello John");
  sc.eq("async function add(2, 3)", await svc.add(2, 3), 5);
  sc.eq("echo of a nested value", await svc.echo({ a: [1, "x", null, true, { b: 2.5 }] }),
        { a: [1, "x", null, true, { b: 2.5 }] });
  const bytes = new Uint8Array([0, 1, 2, 255]);
  const back = await svc.echo(bytes);
  sc.check("echo of bytes (Uint8Array)", back instanceof Uint8Array && back.length === 4 && back[3] === 255,
           back);
  const svc2 = await consumer.getService(`${wa}/hello-world`);
  sc.eq("lookup by '{ws}/hello-world'", await svc2.hello("Ann"), "Hello Ann");
  await sc.expectError("bare id from another workspace is not found", consumer.getService("hello-world"),
                       ["Service not found"]);
  const listed = await consumer.listServices(wa);
  sc.check("listServices(provider ws) from the consumer contains it", listed.some((s) => s.id === info.id),
           listed.map((s) => s.id));
  sc.eq("manager echo from JS", await consumer.echo({ k: [1, 2] }), { k: [1, 2] });
});
