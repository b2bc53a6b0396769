"""The stock client's `hypha_rpc.login()` against hypha-server's local accounts.

Usage: login_flow.py SERVER_URL EMAIL PASSWORD

The login_callback plays the browser: in the background (so the client's `check` really
waits, kept alive by heartbeats) it opens the login page, signs up through the page's
endpoints (`POST /public/services/hypha-login/signup`), logs in (`.../login`) and reports
the token to `report_url` with the query the page sends. A second `login(profile=True)`
logs the same account in again. Then the token connects a client, which must land in the
user's own workspace. Prints one JSON line with what it saw; exits non-zero on failure.
"""

import asyncio
import json
import sys
import urllib.parse
import urllib.request

from hypha_rpc import connect_to_server, login


def http(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
        return json.loads(raw) if raw else None


def browser(context, server_url, email, password, signup):
    page = urllib.request.urlopen(context["login_url"], timeout=30).read().decode()
    assert "Hypha Account" in page, "login page served"
    base = f"{server_url}/public/services/hypha-login"
    if signup:
        made = http("POST", f"{base}/signup", {"name": "Py User", "email": email, "password": password})
        assert made["success"] and made["email"] == email.lower(), made
    res = http("POST", f"{base}/login", {"email": email, "password": password})
    query = urllib.parse.urlencode({
        "key": context["key"], "token": res["token"], "workspace": "", "expires_in": "",
        "email": res["email"], "email_verified": "", "name": res["name"], "nickname": res["name"],
        "user_id": res["user_id"], "picture": "",
    })
    assert http("GET", f"{context['report_url']}?{query}") is None
    return res


async def main(server_url, email, password):
    tasks = []
    seen = {}

    def callback_for(signup):
        async def callback(context):
            seen["login_url"] = context["login_url"]

            async def later():
                await asyncio.sleep(1.5)
                seen["login"] = await asyncio.to_thread(browser, context, server_url, email, password, signup)

            tasks.append(asyncio.ensure_future(later()))
        return callback

    token = await login({"server_url": server_url, "login_callback": callback_for(True), "login_timeout": 30})
    await asyncio.gather(*tasks)
    profile = await login({"server_url": server_url, "login_callback": callback_for(False),
                           "login_timeout": 30, "profile": True})
    await asyncio.gather(*tasks)
    server = await connect_to_server({"server_url": server_url, "token": token})
    try:
        workspace = server.config.workspace
    finally:
        await server.disconnect()
    print(json.dumps({
        "token": token,
        "profile": {k: profile[k] for k in ("token", "email", "name", "user_id")},
        "user_id": seen["login"]["user_id"],
        "login_url": seen["login_url"],
        "workspace": workspace,
    }, default=str))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
