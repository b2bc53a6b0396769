"""The stock client's `hypha_rpc.login()` completed by a real browser (driven by the test).

Usage: browser_login.py SERVER_URL

Protocol on stdout/stdin, one line each, so the Rust test can play its part:
  -> `LOGIN_URL <url>`   from login_callback: the test opens it in Chromium and signs up;
  -> `TOKEN <token>`     what login() returned once the page reported;
  <- `<service id>`      a protected service the test registered in the user's workspace;
  -> `RESULT <json>`     what calling its `whoami()` with a client connected by the token gave.
Exits non-zero on failure.
"""

import asyncio
import json
import sys

from hypha_rpc import connect_to_server, login


def say(line):
    print(line, flush=True)


async def main(server_url):
    async def callback(context):
        say(f"LOGIN_URL {context['login_url']}")

    token = await login({"server_url": server_url, "login_callback": callback, "login_timeout": 60})
    say(f"TOKEN {token}")
    service_id = (await asyncio.to_thread(sys.stdin.readline)).strip()
    server = await connect_to_server({"server_url": server_url, "token": token})
    try:
        svc = await server.get_service(service_id)
        say(f"RESULT {await svc.whoami()}")
    finally:
        await server.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
