"""An external service for `hypha-server --launch-external` and `launch_external_services`
(the getting-started guide's example_service_script, written for these tests).

    python external_service.py --server-url={server_url} --service-id=ID \
        --workspace={workspace} --token={token} [--pid-file F] [--crash-after S]

Registers `ID` (public, `echo(x)`, `add(a, b)`) as client `ID-client` in the workspace, then
serves until stopped. `--pid-file` appends this process's pid (so a test can count starts and
check that every process is gone); `--crash-after` exits with status 3 that many seconds after
registering (a crashing service for the restart tests).
"""

import argparse
import asyncio
import os
import sys

from hypha_rpc import connect_to_server


async def main(args):
    if args.pid_file:
        with open(args.pid_file, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
    server = await connect_to_server(
        {
            "server_url": args.server_url,
            "workspace": args.workspace,
            "token": args.token,
            "client_id": f"{args.service_id}-client",
        }
    )
    await server.register_service(
        {
            "id": args.service_id,
            "config": {"visibility": "public"},
            "echo": lambda x: x,
            "add": lambda a, b: a + b,
        }
    )
    print(f"registered {args.service_id} in {args.workspace}", flush=True)
    print(f"a line on stderr from {args.service_id}", file=sys.stderr, flush=True)
    if args.crash_after is not None:
        await asyncio.sleep(args.crash_after)
        print(f"{args.service_id} crashes on purpose", file=sys.stderr, flush=True)
        os._exit(3)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--server-url", required=True)
    parser.add_argument("--service-id", required=True)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--pid-file")
    parser.add_argument("--crash-after", type=float)
    asyncio.run(main(parser.parse_args()))
