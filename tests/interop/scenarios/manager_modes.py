"""manager_modes: how the manager picks among several providers of one service id
(server spec §5.3) with stock clients: no mode / exact (error), first, last, random,
native:random, min_load, select:{min|max|first_success}:{function} (the manager calls
`function()` on every candidate), a function nobody has, upstream's error texts; the same
modes through get_service (the consumer then calls the chosen provider); a `default`
service's setup() run by the manager on registration (§4.5 step 11); cleanup() of a
healthy workspace (§4.3)."""

import asyncio

from _common import Scenario, wait_until

MULTI = "Multiple services found for"
INVALID = ("Invalid mode: bogus. Mode must be 'random', 'first', 'last', 'exact', 'min_load', "
           "'native:random', or 'select:criteria:function' format (e.g., 'select:min:get_load')")


async def main(sc):
    a = await sc.connect("provider mode-a", client_id="mode-a")
    ws = a.config.workspace
    token = await a.generate_token()
    b = await sc.connect("provider mode-b", client_id="mode-b", workspace=ws, token=token)
    c = await sc.connect("consumer", client_id="mode-c", workspace=ws, token=token)

    await a.register_service({"id": "m", "load": lambda: 5, "who": lambda: "a"})
    await b.register_service({"id": "m", "load": lambda: 2, "who": lambda: "b"})
    ida, idb = f"{ws}/mode-a:m", f"{ws}/mode-b:m"

    async def pick(mode):
        info = await c.get_service_info("m", {"mode": mode})
        return info["id"]

    await sc.expect_error("no mode: several providers -> error", c.get_service_info("m"), [MULTI])
    await sc.expect_error("exact: several providers -> error", c.get_service_info("m", {"mode": "exact"}), [MULTI])
    sc.eq("first -> mode-a", await pick("first"), ida)
    sc.eq("last -> mode-b", await pick("last"), idb)
    sc.eq("min_load without __rlb clients -> first", await pick("min_load"), ida)
    for mode in ("random", "native:random"):
        seen = {await pick(mode) for _ in range(30)}
        sc.eq(f"{mode} picks both over 30 lookups", seen, {ida, idb})
    sc.eq("select:min:load -> mode-b", await pick("select:min:load"), idb)
    sc.eq("select:max:load -> mode-a", await pick("select:max:load"), ida)
    sc.eq("select:first_success:load -> mode-a", await pick("select:first_success:load"), ida)
    got = await pick("select:min:nonexistent")
    sc.check("select with a function nobody has -> one of them", got in (ida, idb), got)
    await sc.expect_error("select:bogus:load -> unknown criteria",
                          c.get_service_info("m", {"mode": "select:bogus:load"}),
                          ["Unknown selection criteria: bogus"])
    await sc.expect_error("bogus mode -> invalid mode", c.get_service_info("m", {"mode": "bogus"}), [INVALID])

    # get_service with a mode: the consumer calls the chosen provider.
    svc = await c.get_service("m", {"mode": "select:min:load"})
    sc.eq("get_service select:min:load calls mode-b", await svc.who(), "b")
    svc = await c.get_service("m", {"mode": "last"})
    sc.eq("get_service last calls mode-b", await svc.who(), "b")
    svc = await c.get_service("m", {"mode": "select:max:load", "select_timeout": 1})
    sc.eq("get_service select:max:load calls mode-a", await svc.who(), "a")

    # A `default` service with setup(): the manager calls it after registration.
    called = []

    async def setup():
        called.append(True)

    await a.register_service({"id": "default", "setup": setup, "hello": lambda: "hi"})
    await wait_until(lambda: called, timeout=5)
    sc.eq("setup() of a default service is run once by the manager", len(called), 1)

    # cleanup of a healthy workspace removes nothing.
    sc.eq("cleanup of a healthy workspace -> {}", await a.cleanup(), {})
    sc.eq("cleanup(timeout=1) -> {}", await a.cleanup(ws, 1), {})


if __name__ == "__main__":
    Scenario("manager_modes").run(main)
