"""kwargs: keyword arguments across workspaces (`with_kwargs`), to a client's service and to
the server's own manager service (echo, list_services, get_service_info with keywords)."""

from _common import Scenario, plain


async def main(sc):
    provider = await sc.connect("provider", client_id="kw-provider")
    consumer = await sc.connect("consumer", client_id="kw-consumer")

    def add(a, b=10, c=100):
        return a + b + c

    def describe(*args, **kwargs):
        return {"args": list(args), "kwargs": kwargs}

    def apply(fn=None, value=0):
        return fn(value)

    async def apply_async(fn=None, value=0):
        return await fn(value=value)

    info = await provider.register_service({
        "id": "kw-svc", "config": {"visibility": "public"},
        "add": add, "describe": describe, "apply": apply, "apply_async": apply_async,
    })
    svc = await consumer.get_service(info.id)

    sc.eq("all keyword arguments", await svc.add(a=1, b=2, c=3), 6)
    sc.eq("keyword arguments use defaults", await svc.add(a=1), 111)
    sc.eq("positional + keyword", await svc.add(1, c=3), 14)
    sc.eq("keywords in another order", await svc.add(c=0, b=0, a=5), 5)
    r = plain(await svc.describe(1, 2, x="y", nested={"k": [1, {"z": None}]}))
    sc.eq("**kwargs receives arbitrary keys incl. nested values",
          r, {"args": [1, 2], "kwargs": {"x": "y", "nested": {"k": [1, {"z": None}]}}})
    r = plain(await svc.describe())
    sc.eq("no arguments at all", r, {"args": [], "kwargs": {}})
    r = plain(await svc.describe(**{"with space": 1, "ünï": 2}))
    sc.eq("keyword names with spaces / non-ASCII", r, {"args": [], "kwargs": {"with space": 1, "ünï": 2}})
    sc.eq("a callable passed as a keyword argument", await svc.apply(fn=lambda v: v * 3, value=5), 15)

    def cb(value=None):
        return value + 1

    sc.eq("service calls our callback with keywords", await svc.apply_async(fn=cb, value=41), 42)
    await sc.expect_error("unknown keyword raises TypeError", svc.add(a=1, nope=2),
                          ["unexpected keyword argument"])
    await sc.expect_error("missing required argument raises TypeError", svc.add(b=1),
                          ["missing 1 required"])

    # Keyword calls to the server's manager service.
    sc.eq("manager echo(data=...) with a keyword", plain(await consumer.echo(data={"k": [1, 2]})),
          {"k": [1, 2]})
    lst = await consumer.list_services(query={"workspace": provider.config.workspace})
    sc.check("manager list_services(query=...) with a keyword",
             any(s["id"] == info.id for s in lst), [s["id"] for s in lst])
    si = await consumer.get_service_info(info.id, config={"mode": "exact"})
    sc.eq("manager get_service_info(id, config=...) with a keyword", si["id"], info.id)


if __name__ == "__main__":
    Scenario("kwargs").run(main)
