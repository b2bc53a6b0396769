"""reconnection: a provider's socket is force-closed from its own side (close code 1011 as
in rpc-protocol §12 #17/#18, then an abrupt TCP abort, i.e. 1006 on the server). The stock
client reconnects with its reconnection token, keeps its workspace and client id,
re-registers all its services (`services_registered` with registered == total), and the
services are callable again, from the same and from another workspace, with their state
preserved; observers see client_disconnected followed by client_connected."""

import asyncio

from _common import Scenario, plain, wait_until


async def main(sc):
    observer = await sc.connect("observer", client_id="rc-observer")
    ws = observer.config.workspace
    tok = await observer.generate_token()
    prov = await sc.connect("provider", client_id="rc-provider", workspace=ws, token=tok)
    outsider = await sc.connect("consumer in another workspace", client_id="rc-outsider")

    state = {"n": 0}

    def incr():
        state["n"] += 1
        return state["n"]

    await prov.register_service({"id": "counter", "config": {"visibility": "public"}, "incr": incr})
    await prov.register_service({"id": "echo", "config": {"visibility": "public"}, "echo": lambda x: x})
    svc = await observer.get_service("rc-provider:counter")
    osvc = await outsider.get_service(f"{ws}/rc-provider:counter")
    sc.eq("counter works before", await svc.incr(), 1)

    seen = []
    await observer.subscribe(["client_connected", "client_disconnected"])
    observer.on("client_connected", lambda m: seen.append(("connected", plain(m).get("data", {}).get("id"))))
    observer.on("client_disconnected", lambda m: seen.append(("disconnected", plain(m).get("data", {}).get("id"))))

    for label, close in [
        ("close(1011)", lambda: prov.rpc._connection._websocket.close(1011)),
        ("transport abort", _abort(prov)),
    ]:
        regs = []
        conns = []
        prov.rpc.on("services_registered", lambda d: regs.append(plain(d)))
        prov.rpc.on("connected", lambda d: conns.append(plain(d)))
        seen.clear()
        old_ws = prov.rpc._connection._websocket
        r = close()
        if asyncio.iscoroutine(r):
            await r
        ok = await wait_until(lambda: regs and conns, timeout=10)
        sc.check(f"{label}: client reconnected and re-registered within 10 s", ok,
                 {"services_registered": regs, "connected": len(conns)})
        if not ok:
            continue
        sc.check(f"{label}: a new websocket was opened", prov.rpc._connection._websocket is not old_ws, "")
        info = conns[-1]
        sc.eq(f"{label}: same workspace after reconnect", info.get("workspace"), ws)
        sc.eq(f"{label}: same client id after reconnect", info.get("client_id"), "rc-provider")
        sc.check(f"{label}: all services re-registered (built-in, counter, echo)",
                 regs[-1].get("registered") == regs[-1].get("total") and regs[-1].get("total", 0) >= 3,
                 regs[-1])
        ids = [s["id"] for s in await observer.list_services()]
        sc.check(f"{label}: services listed again",
                 {f"{ws}/rc-provider:counter", f"{ws}/rc-provider:echo"} <= set(ids), ids)
        before = state["n"]
        s2 = await observer.get_service("rc-provider:counter")
        sc.eq(f"{label}: fresh proxy call works, state preserved", await s2.incr(), before + 1)
        sc.eq(f"{label}: the old proxy works again", await svc.incr(), before + 2)
        sc.eq(f"{label}: another workspace can call it again (old proxy)", await osvc.incr(), before + 3)
        e = await observer.get_service("rc-provider:echo")
        sc.eq(f"{label}: second service callable", await e.echo([1, "x"]), [1, "x"])
        sc.eq(f"{label}: provider can use the manager again", await prov.echo("m"), "m")
        await wait_until(lambda: ("connected", f"{ws}/rc-provider") in seen, timeout=3)
        sc.check(f"{label}: observer saw client_disconnected then client_connected",
                 ("disconnected", "rc-provider") in seen and ("connected", f"{ws}/rc-provider") in seen
                 and seen.index(("disconnected", "rc-provider")) < seen.index(("connected", f"{ws}/rc-provider")),
                 seen)
        await asyncio.sleep(1.0)  # stay connected a moment (the client's flap detection)


def _abort(prov):
    def go():
        prov.rpc._connection._websocket.transport.abort()
    return go


if __name__ == "__main__":
    Scenario("reconnection").run(main)
