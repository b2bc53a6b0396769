"""disconnect_cleanup: what happens when a provider goes away (server spec §8, §3.2 rule 6;
rpc-protocol §12 #52 of the server list, test_immediate_error_for_disconnected_peer).

Twice, once with a normal disconnect() and once with a provider process killed with SIGKILL
(TCP gone, no close frame). Each time: its services and its client record vanish from
list_services / list_clients, subscribers see client_disconnected, a call in flight from a
same-workspace consumer fails fast ("Client disconnected" / "not connected"), and new calls
through an old proxy fail fast too, from the same and from another workspace ("Target peer
... is not connected"); get_service then reports "Service not found". In between
(#59): a caller that disconnects while its call is in flight gets the call rejected, and
the provider, whose late result is dropped by the server, keeps serving others."""

import asyncio
import os
import signal
import subprocess
import sys
import time

from _common import Scenario, plain, wait_until

CHILD = r"""
import asyncio, sys
from hypha_rpc import connect_to_server
async def main():
    c = await connect_to_server({"server_url": sys.argv[1], "client_id": "dc-child",
                                 "workspace": sys.argv[2], "token": sys.argv[3]})
    async def slow(t):
        await asyncio.sleep(t)
        return "slow-done"
    await c.register_service({"id": "child-svc", "config": {"visibility": "public"},
                              "slow": slow, "quick": lambda: "quick"})
    print("ready", flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""


async def slow(t):
    await asyncio.sleep(t)
    return "slow-done"


async def exercise(sc, label, consumer, outsider, ws, cid, svc_id, kill):
    """Common checks around one provider going away; kill() makes it go."""
    events = []
    consumer.on("client_disconnected", lambda m: events.append(plain(m).get("data")))
    svc = await consumer.get_service(f"{cid}:{svc_id}")
    osvc = await outsider.get_service(f"{ws}/{cid}:{svc_id}")
    sc.eq(f"{label}: provider answers before", await svc.quick(), "quick")
    sc.eq(f"{label}: provider answers the other workspace before", await osvc.quick(), "quick")
    ids = [s["id"] for s in await consumer.list_services()]
    sc.check(f"{label}: provider's services listed before", f"{ws}/{cid}:{svc_id}" in ids, ids)

    pending = asyncio.ensure_future(svc.slow(20))
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    await kill()
    try:
        await asyncio.wait_for(pending, 10)
        sc.check(f"{label}: call in flight fails when the provider goes", False, "it returned")
    except asyncio.TimeoutError:
        sc.check(f"{label}: call in flight fails when the provider goes", False, "still pending after 10 s")
    except Exception as e:  # noqa: BLE001
        dt = time.monotonic() - t0
        text = str(e)
        sc.check(f"{label}: call in flight fails with 'Client disconnected'/'not connected'",
                 "Client disconnected" in text or "not connected" in text, text[:200])
        sc.check(f"{label}: call in flight fails fast (< 5 s)", dt < 5, f"{dt:.2f}s")

    gone = await wait_until(lambda: _not_listed(consumer, f"{ws}/{cid}:"), timeout=5)
    sc.check(f"{label}: its services vanish from list_services", gone, "still listed after 5 s")
    clients = [c["id"] for c in await consumer.list_clients()]
    sc.check(f"{label}: it vanishes from list_clients", f"{ws}/{cid}" not in clients, clients)
    await wait_until(lambda: any((e or {}).get("id") == cid for e in events), timeout=3)
    sc.check(f"{label}: client_disconnected with the bare id",
             {"id": cid, "workspace": ws} in events, events)

    await asyncio.sleep(0.5)
    for who, proxy in (("same workspace", svc), ("other workspace", osvc)):
        t0 = time.monotonic()
        await sc.expect_error(f"{label}: new call from the {who} fails fast", proxy.quick(),
                              ["not connected", "Client disconnected"], timeout=10, max_seconds=5)
    await sc.expect_error(f"{label}: get_service afterwards says Service not found",
                          consumer.get_service(f"{cid}:{svc_id}"), ["Service not found"])


async def _not_listed(client, prefix):
    return not any(s["id"].startswith(prefix) for s in await client.list_services())


async def main(sc):
    consumer = await sc.connect("consumer", client_id="dc-consumer")
    outsider = await sc.connect("consumer in another workspace", client_id="dc-outsider")
    ws = consumer.config.workspace
    tok = await consumer.generate_token()

    # 1. normal disconnect
    prov = await sc.connect("provider", client_id="dc-provider", workspace=ws, token=tok)
    await prov.register_service({"id": "prov-svc", "config": {"visibility": "public"},
                                 "slow": slow, "quick": lambda: "quick"})

    async def disconnect():
        await sc.disconnect(prov)

    await exercise(sc, "disconnect()", consumer, outsider, ws, "dc-provider", "prov-svc", disconnect)

    # 2. the *caller* disconnects while its call is in flight (#59): the call is rejected
    #    locally, the provider's late result to the gone caller is dropped by the server,
    #    and the provider keeps serving others
    prov2 = await sc.connect("provider 2", client_id="dc-provider2", workspace=ws, token=tok)
    await prov2.register_service({"id": "prov2-svc", "config": {"visibility": "public"},
                                  "slow": slow, "quick": lambda: "quick"})
    leaving = await sc.connect("caller that leaves", client_id="dc-leaving", workspace=ws, token=tok)
    lsvc = await leaving.get_service("dc-provider2:prov2-svc")
    pending = asyncio.ensure_future(lsvc.slow(1.5))
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    await sc.disconnect(leaving)
    try:
        await asyncio.wait_for(pending, 10)
        sc.check("caller disconnect rejects its pending call", False, "it returned")
    except asyncio.TimeoutError:
        sc.check("caller disconnect rejects its pending call", False, "still pending after 10 s")
    except BaseException as e:  # noqa: BLE001 - CancelledError is acceptable too
        sc.check("caller disconnect rejects its pending call", time.monotonic() - t0 < 5,
                 f"after {time.monotonic() - t0:.2f}s: {type(e).__name__}: {e}")
    await asyncio.sleep(1.7)  # the provider's result for the gone caller is sent meanwhile
    s2 = await consumer.get_service("dc-provider2:prov2-svc")
    sc.eq("provider still serves others after answering a gone caller", await s2.quick(), "quick")
    await sc.disconnect(prov2)

    # 3. SIGKILL of a provider process
    child = subprocess.Popen([sys.executable, "-c", CHILD, sc.url, ws, tok],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 15)
        sc.require("child provider process started", line.strip() == "ready", line)

        async def kill():
            os.kill(child.pid, signal.SIGKILL)
            await asyncio.to_thread(child.wait)

        await exercise(sc, "SIGKILL", consumer, outsider, ws, "dc-child", "child-svc", kill)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


if __name__ == "__main__":
    Scenario("disconnect_cleanup").run(main)
