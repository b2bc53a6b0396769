"""The stock Python client as a slow or dying peer of the Rust client (tests/client_lifecycle.rs).

    lifecycle_peer.py serve URL [TOKEN WORKSPACE]
                                   register `lifecycle` (public): sleep(seconds) -> "slept <seconds>",
                                   echo(x) -> x; print service_id=..., serve until stdin closes
"""
import asyncio
import sys

from hypha_rpc import connect_to_server


async def serve(url, token=None, workspace=None):
    config = {"server_url": url}
    if token:
        config.update({"token": token, "workspace": workspace})
    server = await connect_to_server(config)

    async def sleep(seconds):
        await asyncio.sleep(seconds)
        return f"slept {seconds}"

    def echo(x):
        return x

    info = await server.register_service(
        {"id": "lifecycle", "config": {"visibility": "public"}, "sleep": sleep, "echo": echo}
    )
    print("service_id=" + info["id"], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.disconnect()


if __name__ == "__main__":
    asyncio.run(serve(*sys.argv[2:5]))
