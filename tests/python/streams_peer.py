"""The stock Python client as a peer of the Rust client for generators, `_rintf` objects
and events (tests/client_streams.rs).

    streams_peer.py serve URL [WS TOKEN]   register `py-streams` (in WS if given), print service_id=..., serve until stdin closes
    streams_peer.py consume URL SERVICE_ID iterate the Rust service's generators, print RESULT {json}
    streams_peer.py give URL SERVICE_ID    pass a `_rintf` object to the Rust service's `keep`, print GIVEN,
                                           serve until stdin closes, then print CALLS {json}
    streams_peer.py emit URL WS TOKEN TARGET TYPE   emit a custom event to TARGET, print EMITTED
"""
import asyncio
import json
import sys

from hypha_rpc import connect_to_server


async def serve(url, workspace=None, token=None):
    config = {"server_url": url}
    if workspace:
        config.update({"workspace": workspace, "token": token})
    server = await connect_to_server(config)
    state = {"closed": 0, "stored": None}

    async def count(n):
        for i in range(n):
            yield i

    def count_sync(n):
        for i in range(n):
            yield i * 10

    async def fail_after(n):
        for i in range(n):
            yield i
        raise ValueError("py generator failed")

    async def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            state["closed"] += 1

    def closed_count():
        return state["closed"]

    def store(obj):
        state["stored"] = obj
        return sorted(k for k in obj.keys())

    async def use_stored(x):
        return await state["stored"]["getItem"](x)

    async def dispose_stored():
        await state["stored"]["_dispose"]()
        return True

    async def consume(gen):
        return [item async for item in gen]

    info = await server.register_service(
        {
            "id": "py-streams",
            "config": {"visibility": "public"},
            "count": count,
            "count_sync": count_sync,
            "fail_after": fail_after,
            "endless": endless,
            "closed_count": closed_count,
            "store": store,
            "use_stored": use_stored,
            "dispose_stored": dispose_stored,
            "consume": consume,
        }
    )
    print("service_id=" + info["id"], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.disconnect()


async def consume(url, service_id):
    server = await connect_to_server({"server_url": url})
    svc = await server.get_service(service_id)
    out = {"count": [i async for i in await svc.count(5)]}
    got = []
    try:
        async for item in await svc.fail_after(3):
            got.append(item)
        out["fail"] = None
    except Exception as e:  # the Rust stream's Err item
        out["fail"] = str(e)
    out["fail_items"] = got
    gen = await svc.endless()
    first = []
    async for item in gen:
        first.append(item)
        if len(first) == 3:
            break
    await gen.aclose()
    out["endless_first"] = first
    out["words"] = [w async for w in await svc.words("a b c")]
    print("RESULT " + json.dumps(out), flush=True)
    await server.disconnect()


async def give(url, service_id):
    server = await connect_to_server({"server_url": url})
    svc = await server.get_service(service_id)
    calls = []

    def get_item(key):
        calls.append(key)
        return "py:" + key

    counter = {"n": 0}

    def inc(by=1):
        counter["n"] += by
        return counter["n"]

    obj = {"_rintf": True, "getItem": get_item, "inc": inc, "label": "py-object"}
    await svc.keep(obj)
    print("GIVEN " + json.dumps({"service_id": obj.get("_rintf_service_id")}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print("CALLS " + json.dumps({"calls": calls, "n": counter["n"]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.disconnect()


async def emit(url, workspace, token, target, event_type):
    server = await connect_to_server({"server_url": url, "workspace": workspace, "token": token})
    await server.emit({"type": event_type, "to": target, "data": {"from": "python"}})
    # Give the frame time to leave before disconnecting.
    await asyncio.sleep(0.3)
    print("EMITTED", flush=True)
    await server.disconnect()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "serve":
        asyncio.run(serve(*sys.argv[2:5]))
    elif mode == "consume":
        asyncio.run(consume(sys.argv[2], sys.argv[3]))
    elif mode == "give":
        asyncio.run(give(sys.argv[2], sys.argv[3]))
    elif mode == "emit":
        asyncio.run(emit(*sys.argv[2:7]))
    else:
        raise SystemExit("unknown mode " + mode)
