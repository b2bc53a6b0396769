"""Python side of the JS cross-language scenario (tests/js/scenarios/js_py_interop.mjs);
not a scenario itself.

  python _py_peer.py provide --server-url URL
      registers public service `py-svc`, prints {"service_id": ...} and serves until stdin
      closes (or 60 s).
  python _py_peer.py consume --server-url URL --service-id ID
      calls the JS provider's service, prints one JSON object with the results.
"""

import argparse
import asyncio
import json
import os
import sys

import numpy as np
from hypha_rpc import connect_to_server


async def provide(url):
    c = await connect_to_server({"server_url": url, "client_id": "py-provider"})

    async def count(n, cb):
        for i in range(n):
            await cb(i)
        return n

    def gen(n):
        for i in range(n):
            yield {"i": i}

    def array():
        return np.arange(6, dtype=np.int32).reshape(2, 3)

    info = await c.register_service({
        "id": "py-svc", "config": {"visibility": "public"},
        "hello": lambda name: "Hello " + name + " from Python",
        "add": lambda a, b=1: a + b,
        "echo": lambda x: x,
        "count": count, "gen": gen, "array": array,
        "fail": lambda: (_ for _ in ()).throw(ValueError("python says no")),
    })
    print(json.dumps({"service_id": info.id}), flush=True)
    try:
        await asyncio.wait_for(asyncio.to_thread(sys.stdin.read), 60)
    except asyncio.TimeoutError:
        pass
    await c.disconnect()


async def consume(url, service_id):
    c = await connect_to_server({"server_url": url, "client_id": "py-consumer"})
    out = {}
    try:
        svc = await c.get_service(service_id)
        out["hello"] = await svc.hello("Py")
        out["add"] = await svc.add(2, 3)
        out["echo"] = await svc.echo({"k": [1, "2", None, True, 1.5]})
        b = await svc.echo(b"\x00\x01\xff")
        out["echo_bytes"] = list(b) if isinstance(b, (bytes, bytearray)) else repr(b)
        seen = []
        out["count"] = await svc.count(4, lambda i: seen.append(i))
        out["count_seen"] = seen
        out["gen"] = [x async for x in await svc.gen(3)]
        try:
            await svc.fail()
            out["fail"] = "no error"
        except Exception as e:  # noqa: BLE001
            out["fail"] = str(e)[:300]
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    print(json.dumps(out), flush=True)
    await c.disconnect()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["provide", "consume"])
    p.add_argument("--server-url", required=True)
    p.add_argument("--service-id")
    a = p.parse_args()
    asyncio.run(provide(a.server_url) if a.mode == "provide" else consume(a.server_url, a.service_id))
    sys.stdout.flush()
    os._exit(0)
