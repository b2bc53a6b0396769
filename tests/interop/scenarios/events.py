"""events: client events and server-generated system events (server spec §3.2, §3.4, §4.3).

Custom events: `emit({"type": T, "to": "*"})` reaches only the clients of the workspace
that subscribed to T (including the sender when subscribed), not unsubscribed clients and
not other workspaces; unsubscribe stops delivery; point-to-point events reach their target
without a subscription; `from`/`ws` are stamped by the server; a read-only client's
broadcast is dropped while its point-to-point events are delivered; subscriptions to
another workspace's events are refused. System events: service_added / service_removed
(also on overwrite), client_connected (full id) and client_disconnected (bare id)."""

import asyncio

from _common import Scenario, plain, wait_until


class Inbox:
    def __init__(self, client, types):
        self.items = {t: [] for t in types}
        for t in types:
            client.on(t, (lambda tt: (lambda msg: self.items[tt].append(plain(msg))))(t))

    def data(self, t):
        return [m.get("data") for m in self.items[t]]

    def clear(self):
        for v in self.items.values():
            v.clear()


TYPES = ["my-event", "other-event", "service_added", "service_removed",
         "client_connected", "client_disconnected"]


async def main(sc):
    a = await sc.connect("client a", client_id="ev-a")
    ws = a.config.workspace
    tok = await a.generate_token()
    rtok = await a.generate_token({"permission": "read"})
    b = await sc.connect("client b", client_id="ev-b", workspace=ws, token=tok)
    c = await sc.connect("client c", client_id="ev-c", workspace=ws, token=tok)
    x = await sc.connect("client x (other workspace)", client_id="ev-x")
    ia, ib, ic, ix = (Inbox(cl, TYPES) for cl in (a, b, c, x))
    await asyncio.sleep(0.3)  # let the connect-time events of b and c pass

    sc.eq("subscribe(list) returns True", await a.subscribe(["my-event", "service_added", "service_removed",
                                                             "client_connected", "client_disconnected"]), True)
    sc.eq("subscribe(str) returns True", await b.subscribe("my-event"), True)
    sc.eq("other-workspace client subscribes too", await x.subscribe("my-event"), True)

    await a.emit({"type": "my-event", "to": "*", "data": {"n": 1}})
    await wait_until(lambda: ia.data("my-event") and ib.data("my-event"), timeout=3)
    await asyncio.sleep(0.3)
    sc.eq("broadcast reaches subscriber b", ib.data("my-event"), [{"n": 1}])
    sc.eq("broadcast reaches the subscribed sender a", ia.data("my-event"), [{"n": 1}])
    sc.eq("broadcast does not reach unsubscribed c", ic.data("my-event"), [])
    sc.eq("broadcast does not reach another workspace", ix.data("my-event"), [])
    m = ib.items["my-event"][0] if ib.items["my-event"] else {}
    sc.eq("broadcast is stamped with from = sender", m.get("from"), f"{ws}/ev-a")
    sc.eq("broadcast is stamped with ws = sender's workspace", m.get("ws"), ws)

    await b.emit({"type": "other-event", "to": "*", "data": 2})
    await asyncio.sleep(0.4)
    sc.check("an event type nobody subscribed reaches nobody",
             not any(i.data("other-event") for i in (ia, ib, ic, ix)), "")

    sc.eq("unsubscribe returns True", await b.unsubscribe("my-event"), True)
    await a.emit({"type": "my-event", "to": "*", "data": {"n": 2}})
    await wait_until(lambda: len(ia.data("my-event")) >= 2, timeout=3)
    await asyncio.sleep(0.3)
    sc.eq("after unsubscribe b gets nothing more", ib.data("my-event"), [{"n": 1}])
    sc.eq("a still subscribed", ia.data("my-event"), [{"n": 1}, {"n": 2}])

    await b.emit({"type": "my-event", "to": "ev-c", "data": "p2p-bare"})
    await b.emit({"type": "my-event", "to": f"{ws}/ev-c", "data": "p2p-full"})
    await wait_until(lambda: len(ic.data("my-event")) >= 2, timeout=3)
    sc.eq("point-to-point events reach unsubscribed c (bare and full id)",
          sorted(ic.data("my-event")), ["p2p-bare", "p2p-full"])
    m = ic.items["my-event"][0] if ic.items["my-event"] else {}
    sc.eq("point-to-point event stamped from", m.get("from"), f"{ws}/ev-b")

    # read-only client: broadcast dropped, point-to-point delivered
    ro = await sc.connect("read-only client", client_id="ev-ro", workspace=ws, token=rtok)
    ia.clear()
    ic.clear()
    await ro.emit({"type": "my-event", "to": "*", "data": "ro-broadcast"})
    await ro.emit({"type": "my-event", "to": "ev-c", "data": "ro-p2p"})
    await wait_until(lambda: ic.data("my-event"), timeout=3)
    await asyncio.sleep(0.3)
    sc.eq("read-only client's broadcast is dropped", ia.data("my-event"), [])
    sc.eq("read-only client's point-to-point event is delivered", ic.data("my-event"), ["ro-p2p"])
    sc.eq("read-only connection still works after the dropped broadcast",
          len(await ro.list_services()) > 0, True)
    await sc.disconnect(ro)
    await asyncio.sleep(0.3)

    # subscription validation
    await sc.expect_error("subscribing to another workspace's events is forbidden",
                          a.subscribe("ws-other-x/service_added"), ["forbidden", "does not match"])
    sc.eq("subscribing to '{own ws}/custom' is allowed", await a.subscribe(f"{ws}/custom"), True)

    # service_added / service_removed
    ia.clear()
    ic.clear()
    await b.register_service({"id": "ev-svc", "config": {"visibility": "public"}, "f": lambda: 1})
    await wait_until(lambda: ia.data("service_added"), timeout=3)
    added = ia.data("service_added")
    sc.check("service_added with the full service id",
             any((d or {}).get("id") == f"{ws}/ev-b:ev-svc" for d in added), added)
    d = next((d for d in added if (d or {}).get("id") == f"{ws}/ev-b:ev-svc"), {}) or {}
    sc.eq("service_added data carries the config.visibility", (d.get("config") or {}).get("visibility"), "public")
    await b.register_service({"id": "ev-svc", "config": {"visibility": "public"}, "f": lambda: 2}, overwrite=True)
    await wait_until(lambda: len(ia.data("service_added")) >= 2, timeout=3)
    sc.check("overwrite emits service_removed then service_added",
             len(ia.data("service_added")) >= 2
             and any((d or {}).get("id") == f"{ws}/ev-b:ev-svc" for d in ia.data("service_removed")),
             {"added": len(ia.data("service_added")), "removed": ia.data("service_removed")})
    ia.clear()
    await b.unregister_service("ev-svc")
    await wait_until(lambda: ia.data("service_removed"), timeout=3)
    sc.check("unregister_service emits service_removed with the full id",
             any((d or {}).get("id") == f"{ws}/ev-b:ev-svc" for d in ia.data("service_removed")),
             ia.data("service_removed"))
    sc.eq("unsubscribed c got no service events", ic.data("service_added") + ic.data("service_removed"), [])

    # client_connected / client_disconnected
    ia.clear()
    ic.clear()
    d_cl = await sc.connect("client d", client_id="ev-d", workspace=ws, token=tok)
    await wait_until(lambda: ia.data("client_connected"), timeout=3)
    sc.check("client_connected carries the full client id",
             {"id": f"{ws}/ev-d", "workspace": ws} in ia.data("client_connected"), ia.data("client_connected"))
    await sc.disconnect(d_cl)
    await wait_until(lambda: ia.data("client_disconnected") and ic.data("client_disconnected"), timeout=3)
    sc.check("client_disconnected carries the bare client id",
             {"id": "ev-d", "workspace": ws} in ia.data("client_disconnected"), ia.data("client_disconnected"))
    sc.check("client_disconnected reaches clients that subscribed nothing (automatic subscription)",
             {"id": "ev-d", "workspace": ws} in ic.data("client_disconnected"), ic.data("client_disconnected"))
    sc.eq("no client events leak to another workspace",
          ix.data("client_connected") + [e for e in ix.data("client_disconnected")
                                         if (e or {}).get("workspace") == ws], [])
    m = ia.items["client_disconnected"][0] if ia.items["client_disconnected"] else {}
    sc.check("system events have no 'from'", "from" not in m, m)


if __name__ == "__main__":
    Scenario("events").run(main)
