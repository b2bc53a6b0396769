"""rintf: `_rintf` interface objects (rpc-protocol §12 #64, #65).

A consumer passes `{"_rintf": True, "on_event": fn}` to a provider in another workspace.
The stock client turns it into a local-only service `_rintf_*` (its id is written back into
the dict), so the provider can keep it and call it after the call returned (also 2 s later).
Only the provider may call it: a third client handed the same function is refused (the
check relies on the server-stamped `from`). The provider can dispose it (`_dispose()`),
after which calls fail. The consumer can unregister it itself. When the provider
disconnects, the consumer gets `client_disconnected` and drops the `_rintf` services that
only the provider could call (within about 1 s)."""

import asyncio

from _common import Scenario, wait_until


def rintf_ids(client):
    return sorted(k for k in client.rpc._services if str(k).startswith("_rintf_"))


async def main(sc):
    provider = await sc.connect("provider", client_id="rintf-provider")
    consumer = await sc.connect("consumer", client_id="rintf-consumer")
    third = await sc.connect("third", client_id="rintf-third")
    kept = {}

    async def subscribe(listener):
        kept["l"] = listener
        await listener.on_event("subscribed")
        return "ok"

    async def fire(value):
        return await kept["l"].on_event(value)

    async def dispose():
        await kept["l"]._dispose()
        return True

    async def hand_over():
        """Give the stored callback to another client (to test caller restriction)."""
        return kept["l"].on_event

    info = await provider.register_service({
        "id": "rintf-svc", "config": {"visibility": "public"},
        "subscribe": subscribe, "fire": fire, "dispose": dispose, "hand_over": hand_over,
    })
    svc = await consumer.get_service(info.id)

    received = []

    def on_event(v):
        received.append(v)
        return f"got {v}"

    listener = {"_rintf": True, "on_event": on_event}
    sc.eq("subscribe with an _rintf object", await svc.subscribe(listener), "ok")
    sid = listener.get("_rintf_service_id")
    sc.check("_rintf_service_id written back into the dict",
             isinstance(sid, str) and sid.startswith("_rintf_"), listener)
    sc.check("the _rintf service is registered locally (only)", sid in rintf_ids(consumer),
             rintf_ids(consumer))
    svcs = await consumer.list_services()
    sc.check("the _rintf service is not registered on the server",
             not any("_rintf_" in s["id"] for s in svcs), [s["id"] for s in svcs])
    sc.eq("callback invoked during the call", received, ["subscribed"])

    sc.eq("stored interface called after the call returned", await svc.fire("e1"), "got e1")
    await asyncio.sleep(2.0)
    sc.eq("stored interface still works 2 s later", await svc.fire("e2"), "got e2")
    sc.eq("consumer received every event", received, ["subscribed", "e1", "e2"])

    # Only the provider (the allowed caller) may use it.
    psvc = await third.get_service(info.id)
    handed = await sc.attempt("third client obtains the stored function", psvc.hand_over())
    if handed is not None:
        await sc.expect_error("a third client may not call the _rintf callback",
                              handed("intruder"), ["Permission denied", "not the allowed caller"],
                              timeout=15)
        sc.check("intruder call did not reach the consumer", "intruder" not in received, received)

    # Disposal by the provider.
    sc.eq("provider calls _dispose()", await svc.dispose(), True)
    ok = await wait_until(lambda: sid not in rintf_ids(consumer), timeout=3)
    sc.check("_dispose() removed the _rintf service on the consumer", ok, rintf_ids(consumer))
    await sc.expect_error("calling a disposed interface fails", svc.fire("e3"),
                          ["Method expired or not found", "not found"], timeout=15)

    # Unregistration by the consumer itself.
    listener2 = {"_rintf": True, "on_event": on_event}
    await svc.subscribe(listener2)
    sid2 = listener2["_rintf_service_id"]
    sc.eq("second interface works", await svc.fire("f1"), "got f1")
    await consumer.rpc.unregister_service(sid2)
    sc.check("consumer unregister_service(_rintf id) removes it", sid2 not in rintf_ids(consumer),
             rintf_ids(consumer))
    await sc.expect_error("calling an unregistered interface fails", svc.fire("f2"),
                          ["Method expired or not found", "not found"], timeout=15)

    # #65: the allowed caller disconnects -> the consumer drops the interface.
    # client_disconnected is broadcast in the provider's workspace only, so this provider
    # joins the consumer's workspace with a token.
    token = await consumer.generate_token()
    provider2 = await sc.connect("provider in the consumer's workspace", client_id="rintf-provider2",
                                 workspace=consumer.config.workspace, token=token)
    await provider2.register_service({
        "id": "rintf-svc2", "config": {"visibility": "public"},
        "subscribe": subscribe, "fire": fire,
    })
    svc2 = await consumer.get_service("rintf-provider2:rintf-svc2")
    listener3 = {"_rintf": True, "on_event": on_event}
    await svc2.subscribe(listener3)
    sid3 = listener3["_rintf_service_id"]
    sc.eq("interface held by a same-workspace provider works", await svc2.fire("g1"), "got g1")
    notified = []
    consumer.rpc.on("remote_client_disconnected", lambda d: notified.append(d))
    await sc.disconnect(provider2)
    ok = await wait_until(lambda: sid3 not in rintf_ids(consumer), timeout=1.5)
    sc.check("provider disconnect removes its _rintf service on the consumer within 1.5 s", ok,
             rintf_ids(consumer))
    sc.check("consumer's client handled client_disconnected of the provider (rintf_cleaned=1)",
             any(str(d.get("client_id", "")).endswith("/rintf-provider2")
                 and d.get("rintf_cleaned") == 1 for d in notified), notified)

if __name__ == "__main__":
    Scenario("rintf").run(main)
