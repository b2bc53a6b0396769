"""Runs one Hypha startup function for hypha-server.

The server starts this script (embedded in its binary) once per `--startup-functions`
entry, under the stock Python client, as `python -c <this script> <module or file.py>:<fn>`.
It connects to the server with the root-issued token for `public` the server passes in the
environment, awaits `fn(server)`, prints the ready marker, and keeps serving whatever the
function registered until the server stops it. Any error prints the traceback to stderr and
the error marker with the traceback's last line to stdout, then exits 1: the server aborts
its startup with that line, as upstream does when a startup function raises.
"""

import asyncio
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback

READY = "HYPHA_STARTUP_READY"
ERROR = "HYPHA_STARTUP_ERROR"


def load_function(spec):
    """`module:fn` or `path/to/file.py:fn` -> the function."""
    if ":" not in spec:
        raise ValueError(
            f"Invalid startup function {spec!r}: expected <python module or file.py>:<function name>"
        )
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Startup function file not found: {target}")
        stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        module_name = f"hypha_startup_{stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        # Let the file import its neighbours, as running it as a script would.
        sys.path.insert(0, os.path.dirname(path))
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    function = getattr(module, name, None)
    if function is None or not callable(function):
        raise AttributeError(f"{target} has no function {name!r}")
    return function


async def main(spec):
    function = load_function(spec)
    from hypha_rpc import connect_to_server

    # The token stays out of the environment of anything the function starts.
    token = os.environ.pop("HYPHA_STARTUP_TOKEN")
    server = await connect_to_server(
        {
            "server_url": os.environ["HYPHA_STARTUP_SERVER_URL"],
            "workspace": os.environ.get("HYPHA_STARTUP_WORKSPACE", "public"),
            "client_id": os.environ.get("HYPHA_STARTUP_CLIENT_ID"),
            "token": token,
        }
    )
    result = function(server)
    if inspect.isawaitable(result):
        await result
    print(READY, flush=True)
    # Serve the services the function registered until the server stops us.
    await asyncio.Event().wait()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(f"{ERROR} usage: launcher <module or file.py>:<function>", flush=True)
        sys.exit(2)
    try:
        asyncio.run(main(sys.argv[1]))
    except KeyboardInterrupt:
        sys.exit(0)
    except BaseException as exc:  # noqa: BLE001 - everything must reach the server
        traceback.print_exc()
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        print(f"{ERROR} {last}", flush=True)
        sys.exit(1)
