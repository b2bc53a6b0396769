"""The stock Python client as a peer of the Rust client (tests/client.rs).

    client_peer.py call URL SERVICE_ID   call a Rust service (kwargs, callback), print results
    client_peer.py serve URL             register `py-svc`, print service_id=..., serve until stdin closes
"""
import asyncio
import json
import sys

from hypha_rpc import connect_to_server


async def call(url, service_id):
    server = await connect_to_server({"server_url": url})
    svc = await server.get_service(service_id)
    out = {
        "hello_kw": await svc.hello(name="py"),
        "add_kw": await svc.add(1, b=2),
        "add_all_kw": await svc.add(a=5, b=6),
        "apply": await svc.apply(lambda x: x * 3, 4),
        "schema": svc.add.__schema__,
    }
    try:
        await svc.fail()
        out["fail"] = None
    except Exception as e:  # the Rust handler's error text arrives as the remote error
        out["fail"] = str(e)
    print("RESULT " + json.dumps(out), flush=True)
    await server.disconnect()


async def serve(url):
    server = await connect_to_server({"server_url": url})

    def add(a, b=0):
        return a + b

    def greet(name, greeting="Hello"):
        return f"{greeting}, {name}!"

    def fail():
        raise ValueError("py boom")

    async def call_back(f, x):
        return await f(x)

    info = await server.register_service(
        {
            "id": "py-svc",
            "config": {"visibility": "public"},
            "add": add,
            "greet": greet,
            "fail": fail,
            "call_back": call_back,
        }
    )
    print("service_id=" + info["id"], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.disconnect()


if __name__ == "__main__":
    if sys.argv[1] == "call":
        asyncio.run(call(sys.argv[2], sys.argv[3]))
    else:
        asyncio.run(serve(sys.argv[2]))
