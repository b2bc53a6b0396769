"""rpc_conformance: server-involving items of the hypha-rpc conformance list
(rpc-protocol §12): #1 manager schema names, #2 function keys that clash with dict
methods, #11 connect errors / export / overwrite / unregister, #13 case_conversion applied
by get_service, #14 register_probes reachable over HTTP, #47 data type round trip through
the manager's echo, #51 concurrent successes and failures do not cross-contaminate."""

import asyncio
import math


from _common import Scenario, plain


class Plugin:
    """A class-instance service (export)."""

    def __init__(self):
        self.n = 0

    def setup(self):
        return None

    def bump(self, k=1):
        """Increase the counter."""
        self.n += k
        return self.n


async def main(sc):
    a = await sc.connect("client a", client_id="conf-a")
    b = await sc.connect("client b", client_id="conf-b")
    ws = a.config.workspace

    # #1: every callable on the manager proxy carries a schema whose name equals its key
    bad = []
    count = 0
    for key, val in a.items():
        if callable(val) and hasattr(val, "__schema__"):
            count += 1
            sch = val.__schema__ or {}
            if sch.get("name") != key:
                bad.append((key, sch.get("name")))
    sc.check("manager proxy has schema'd methods", count >= 30, f"{count} found")
    sc.eq("#1 every manager method's __schema__.name equals its key", bad, [])
    missing = []
    for m in ["echo", "register_service", "unregister_service", "list_services", "get_service",
              "get_service_info", "generate_token", "revoke_token", "parse_token", "create_workspace",
              "delete_workspace", "get_workspace_info", "list_workspaces", "list_clients", "ping",
              "subscribe", "unsubscribe", "check_status", "set_env", "get_env", "log"]:
        if not callable(a.get(m)):
            missing.append(m)
    sc.eq("manager exposes the core methods", missing, [])
    sc.eq("check_status()", plain(await a.check_status()).get("status"), "ready")
    r = await a.ping(f"{b.config.workspace}/conf-b")
    sc.check("manager ping of a client in another workspace returns a 'Failed to ping' string",
             isinstance(r, str) and r.startswith("Failed to ping client"), r)
    sc.eq("ping own client id -> pong", await a.ping("conf-a"), "pong")

    # #2: function keys that clash with dict methods
    info = await a.register_service({
        "id": "builtin-keys", "config": {"visibility": "public"},
        "put": lambda k, v: [k, v], "get": lambda k: k, "pop": lambda: "popped",
        "keys": lambda: ["k1"], "values": lambda: ["v1"], "items": lambda: [("key1", "value1")],
    })
    sc.check("#2 returned id is absolute", "/" in info.id and ":" in info.id, info.id)
    s = await b.get_service(info.id)
    sc.eq("#2 put()", await s.put("a", 1), ["a", 1])
    sc.eq("#2 get()", await s.get("x"), "x")
    sc.eq("#2 pop()", await s.pop(), "popped")
    sc.eq("#2 keys()/values()", (await s.keys(), await s.values()), (["k1"], ["v1"]))
    sc.eq("#2 tuples come back as lists", await s.items(), [["key1", "value1"]])

    # #11
    await sc.expect_error("#11 connecting to a nonexistent workspace fails",
                          sc.try_connect(workspace="nonexistent-interop-ws", client_id="conf-x"),
                          ["does not exist or is not accessible"])
    plugin = Plugin()
    await a.export(plugin)
    app = await sc.attempt("#11 get_app of an exported class instance", a.get_app("conf-a"))
    if app is not None:
        sc.eq("#11 exported plugin callable", await app.bump(2), 2)
        sc.eq("#11 remote function keeps __doc__", (app.bump.__doc__ or "").strip(), "Increase the counter.")
        sc.eq("#11 remote function keeps __name__", app.bump.__name__, "bump")

    def hello(name, context=None):
        return f"Hello {name} from {context['from'] if context else None}"

    svc_info = await a.register_service({"id": "hello-svc", "config": {"visibility": "public"},
                                         "hello": lambda name: "v1 " + name})
    svc_info = await a.register_service({"id": "hello-svc", "config": {"visibility": "public",
                                                                       "require_context": True},
                                         "hello": hello}, overwrite=True)
    s = await b.get_service(svc_info.id)
    sc.eq("#11 overwrite + require_context takes effect", await s.hello("x"), f"Hello x from {b.config.workspace}/conf-b")
    recs = [r["id"] for r in await a.list_services() if r["id"].endswith(":hello-svc")]
    sc.eq("#11 overwrite keeps a single record", recs, [svc_info.id])
    await a.unregister_service(svc_info.id)
    await sc.expect_error("#11 get_service after unregister_service -> Service not found",
                          b.get_service(svc_info.id), ["Service not found"])

    # #13: case conversion is done by the server's get_service
    info = await a.register_service({"id": "case-svc", "config": {"visibility": "public"},
                                     "HelloWorld": lambda: "hw"})
    s = await b.get_service(info.id)
    sc.eq("#13 original key", await s.HelloWorld(), "hw")
    s = await b.get_service(info.id, {"case_conversion": "camel"})
    sc.eq("#13 case_conversion camel -> helloWorld", await s.helloWorld(), "hw")
    s = await b.get_service(info.id, {"case_conversion": "snake"})
    sc.eq("#13 case_conversion snake -> hello_world", await s.hello_world(), "hw")

    # #14: register_probes -> GET /{ws}/services/probes/readiness
    await a.register_probes({"readiness": lambda: True, "liveness": lambda: {"ok": 1}})
    st, _, body = await sc.http_json("GET", f"/{ws}/services/probes/readiness")
    sc.eq("#14 probes readiness over HTTP -> true", (st, body), (200, True))
    st, _, body = await sc.http_json("GET", f"/{ws}/services/probes/liveness")
    sc.eq("#14 probes liveness over HTTP", (st, body), (200, {"ok": 1}))

    # #47: data types through the manager echo
    nested = {}
    cur = nested
    for _ in range(50):
        cur["n"] = {}
        cur = cur["n"]
    cases = {
        "emoji": "héllo 👋🌍", "cjk": "漢字かなカナ", "rtl": "مرحبا שלום", "combining": "e\u0301a\u0308",
        "big int 2**63-1": 2 ** 63 - 1, "negative int": -(2 ** 63), "2**63": 2 ** 63,
        "empty map": {}, "empty list": [], "empty string": "", "empty bytes": b"",
        "bytes": b"\x00\x01\x02\xff", "nested 50": nested, "mixed list": [1, "string", True, None, {"nested": [1, 2, 3]}],
        "true": True, "false": False, "none": None, "float": 3.141592653589793, "inf": math.inf,
        "-inf": -math.inf,
    }
    for label, v in cases.items():
        r = await sc.attempt(f"#47 echo {label}", a.echo(v))
        sc.eq(f"#47 manager echo round-trips {label}", plain(r), v)
    r = await a.echo(math.nan)
    sc.check("#47 manager echo round-trips NaN", isinstance(r, float) and math.isnan(r), repr(r))

    # #51: concurrent calls, half failing, do not cross-contaminate
    async def work(i):
        await asyncio.sleep(0.01 * (i % 5))
        if i % 2:
            raise ValueError(f"Deliberate failure {i}")
        return 2 * i

    info = await a.register_service({"id": "conc", "config": {"visibility": "public"}, "work": work})
    s = await b.get_service(info.id)
    res = await asyncio.gather(*[s.work(i) for i in range(40)], return_exceptions=True)
    ok = all((isinstance(r, Exception) and f"Deliberate failure {i}" in str(r)) if i % 2 else r == 2 * i
             for i, r in enumerate(res))
    sc.check("#51 40 concurrent calls: each result/failure belongs to its own call", ok,
             [(i, str(r)[:40]) for i, r in enumerate(res)][:6])


if __name__ == "__main__":
    Scenario("rpc_conformance").run(main)
