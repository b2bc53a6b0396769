"""login: the server's `public/hypha-login` service (server spec §6.5; rpc-protocol §12 #4,
#9, #15). `hypha_rpc.login()` with a login_callback that reports a token through
`report_url` returns that token (and the profile record with profile=True);
get_remote_service(".../public/services/hypha-login") works awaited and as a context
manager and `start()` returns a key; check/report error texts; a long `check` survives a
short caller method_timeout thanks to the login peer's heartbeats; the HTTP routes
`/public/services/hypha-login/start` and the login page `/public/apps/hypha-login/`."""

import asyncio
import urllib.parse

from hypha_rpc import get_remote_service, login

from _common import Scenario, plain


async def main(sc):
    helper = await sc.connect("token source", client_id="login-helper")
    token = await helper.generate_token()
    svc_url = f"{sc.url}/public/services/hypha-login"

    # #15 get_remote_service, awaited and as a context manager; #9 start() returns a key
    remote = get_remote_service(svc_url)
    svc = await sc.attempt("get_remote_service(public/services/hypha-login) awaited", remote)
    if svc is not None:
        ctx = plain(await svc.start())
        sc.check("start() returns key, login_url, report_url, check_url",
                 isinstance(ctx.get("key"), str) and len(ctx["key"]) >= 16
                 and ctx.get("key") in str(ctx.get("login_url"))
                 and str(ctx.get("report_url", "")).endswith("/public/services/hypha-login/report")
                 and str(ctx.get("check_url", "")).endswith("/public/services/hypha-login/check"), ctx)
        sc.eq("check(key, timeout=0) before report -> None", await svc.check(ctx["key"], timeout=0), None)
        await sc.expect_error("check of an unknown key", svc.check("no-such-key", timeout=0),
                              ["Invalid key, key does not exist"])
        await sc.expect_error("report with a non-JWT token", svc.report(ctx["key"], "garbage"),
                              ["Invalid token provided to report_login"])
        await sc.expect_error("report with an unknown key", svc.report("no-such-key", token),
                              ["Invalid key, key does not exist or expired"])
        if remote.wm is not None:
            sc.clients.append(remote.wm)  # disconnected at the end
    # heartbeats of the login peer keep a long check alive (client method_timeout=3)
    try:
        async with get_remote_service(svc_url, method_timeout=3) as svc2:
            ctx = plain(await svc2.start())
            sc.check("get_remote_service as async context manager: start() works", bool(ctx.get("key")), ctx)

            async def report_later():
                await asyncio.sleep(4.5)
                return await sc.http("GET", f"{ctx['report_url']}?key={ctx['key']}&token={urllib.parse.quote(token)}")

            rep = asyncio.ensure_future(report_later())
            got = await sc.attempt("check(key, timeout=8) with method_timeout=3, report after 4.5 s",
                                   svc2.check(ctx["key"], timeout=8), timeout=12)
            st, _, _ = await rep
            sc.eq("report over HTTP GET -> 200", st, 200)
            sc.eq("long check returns the reported token (heartbeats kept it alive)", got, token)
    except Exception as e:  # noqa: BLE001
        sc.check("get_remote_service as async context manager", False, f"{type(e).__name__}: {e}")

    # #4 login() end to end
    async def callback(context):
        q = urllib.parse.urlencode({"key": context["key"], "token": token, "email": "interop@example.com"})
        st, _, body = await sc.http("GET", f"{context['report_url']}?{q}")
        if st != 200:
            raise RuntimeError(f"report failed: {st} {body[:200]!r}")

    got = await sc.attempt("login() with a login_callback", login({"server_url": sc.url, "login_callback": callback,
                                                                   "login_timeout": 10}), timeout=20)
    sc.eq("login() returns the reported token", got, token)
    prof = await sc.attempt("login(profile=True)", login({"server_url": sc.url, "login_callback": callback,
                                                          "login_timeout": 10, "profile": True}), timeout=20)
    prof = plain(prof) if prof is not None else {}
    sc.check("login(profile=True) returns the record with token and email",
             prof.get("token") == token and prof.get("email") == "interop@example.com", prof)

    # HTTP
    st, _, body = await sc.http_json("GET", "/public/services/hypha-login/start")
    sc.check("GET /public/services/hypha-login/start -> 200 with a key",
             st == 200 and isinstance(body, dict) and isinstance(body.get("key"), str), f"{st} {body}")
    st, h, raw = await sc.http("GET", "/public/apps/hypha-login/")
    text = raw.decode("utf-8", "replace")
    sc.check("login page /public/apps/hypha-login/ -> 200 HTML",
             st == 200 and "text/html" in h.get("content-type", ""), f"{st} {h.get('content-type')}")
    sc.check("login page mentions 'Hypha Account' and has no unrendered {{ report_url }}",
             "Hypha Account" in text and "{{ report_url }}" not in text, text[:200])


if __name__ == "__main__":
    Scenario("login").run(main)
