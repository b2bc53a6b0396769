"""http_proxy: the service HTTP proxy (server spec §1.4), driven with urllib.

GET with query arguments (and their type normalisation), POST JSON, POST msgpack
(Content-Type application/msgpack: msgpack body and response, also gzip'd), dotted
function keys, non-callable values, the caller context seen over HTTP with and without
`Authorization: Bearer`, a protected service without token -> 403 and with a same-workspace
token -> 200, an unknown service / function / workspace -> 404 with the
`{"success": false, "detail": ...}` body, remote exception types -> 400/403/404/500, invalid
tokens -> 401, the service list `/{ws}/services/` (anonymous vs token), the service info
`/{ws}/services/{id}` and `~`, the `/{ws}/services` redirect, CORS origin echo, manager
methods through `/{ws}/services/ws/...`, and the SSE framing of a generator."""

import asyncio
import gzip
import urllib.request

import msgpack

from _common import Scenario


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


async def main(sc):
    prov = await sc.connect("provider", client_id="http-provider")
    ws = prov.config.workspace
    token = await prov.generate_token()
    auth = {"Authorization": f"Bearer {token}"}

    def echo(data=None):
        return data

    def add(a, b=0):
        return a + b

    def whoami(context=None):
        return {"ws": context["ws"], "from": context["from"], "user": context["user"]["id"]}

    def fail(kind="value"):
        exc = {"value": ValueError("bad value"), "key": KeyError("missing-key"),
               "perm": PermissionError("nope"), "runtime": RuntimeError("runtime"),
               "type": TypeError("wrong type")}[kind]
        raise exc

    def gen(n=3):
        for i in range(n):
            yield i

    await prov.register_service({
        "id": "pub", "config": {"visibility": "public"},
        "echo": echo, "add": add, "fail": fail, "gen": gen,
        "tools": {"mul": lambda a, b: a * b}, "const": 42,
    })
    await prov.register_service({"id": "ctx", "config": {"visibility": "public", "require_context": True},
                                 "whoami": whoami})
    await prov.register_service({"id": "prot", "config": {"visibility": "protected"}, "echo": echo})
    await prov.register_service({"id": "unl", "config": {"visibility": "unlisted"}, "echo": echo})
    base = f"/{ws}/services"

    # ---- GET with query arguments
    st, _, body = await sc.http_json("GET", f"{base}/pub/echo?data=3345")
    sc.eq("GET ?data=3345 -> 3345", (st, body), (200, 3345))
    st, _, body = await sc.http_json("GET", f"{base}/http-provider:pub/echo?data=3345")
    sc.eq("GET via '{cid}:{svc}' id", (st, body), (200, 3345))
    st, _, body = await sc.http_json("GET", f"{base}/pub/add?a=1&b=2")
    sc.eq("GET ?a=1&b=2 -> add = 3", (st, body), (200, 3))
    for q, want in [("007", 7), ("1.5", 1.5), ("-1", -1.0), ("true", "true"), ("hello", "hello"),
                    ("%7B%22a%22%3A1%7D", {"a": 1})]:
        st, _, body = await sc.http_json("GET", f"{base}/pub/echo?data={q}")
        sc.check(f"GET ?data={q} normalised to {want!r}", st == 200 and body == want and type(body) is type(want),
                 f"{st} {body!r}")
    st, _, body = await sc.http_json("GET", f"{base}/pub/echo")
    sc.eq("GET without arguments -> null", (st, body), (200, None))
    st, _, body = await sc.http_json("GET", f"{base}/pub/tools.mul?a=3&b=4")
    sc.eq("GET dotted key tools.mul", (st, body), (200, 12))
    st, _, body = await sc.http_json("GET", f"{base}/pub/const")
    sc.eq("GET a non-callable value returns it", (st, body), (200, 42))

    # ---- POST JSON
    st, h, body = await sc.http_json("POST", f"{base}/pub/add", {"a": 40, "b": 2})
    sc.eq("POST JSON kwargs", (st, body), (200, 42))
    sc.check("POST JSON answers application/json", h.get("content-type", "").startswith("application/json"),
             h.get("content-type"))
    st, _, body = await sc.http_json("POST", f"{base}/pub/echo", {"data": {"k": [1, "2", None, True]}})
    sc.eq("POST JSON nested value", (st, body), (200, {"k": [1, "2", None, True]}))
    st, _, body = await sc.http_json("POST", f"{base}/pub/echo", {"data": "123"})
    sc.eq("POST JSON string stays a string", (st, body), (200, "123"))
    st, _, body = await sc.http("POST", f"{base}/pub/echo", b'{"data": ', {"Content-Type": "application/json"})
    sc.eq("POST malformed JSON -> 400", st, 400)

    # ---- POST msgpack
    packed = msgpack.packb({"data": {"n": 123, "blob": b"\x00\x01\x02", "list": [1.5, "x"]}})
    st, h, raw = await sc.http("POST", f"{base}/pub/echo", packed, {"Content-Type": "application/msgpack"})
    sc.eq("POST msgpack -> 200", st, 200)
    sc.check("POST msgpack answers application/msgpack", "application/msgpack" in h.get("content-type", ""),
             h.get("content-type"))
    try:
        val = msgpack.unpackb(raw)
    except Exception as e:  # noqa: BLE001
        val = f"<not msgpack: {e}>"
    sc.eq("POST msgpack body round-trips (incl. bytes)", val, {"n": 123, "blob": b"\x00\x01\x02", "list": [1.5, "x"]})
    st, h, raw = await sc.http("POST", f"{base}/pub/add", msgpack.packb({"a": 100, "b": 23}),
                               {"Content-Type": "application/msgpack"})
    sc.check("POST msgpack kwargs -> msgpack 123", st == 200 and msgpack.unpackb(raw) == 123, f"{st} {raw[:60]!r}")
    st, h, raw = await sc.http("POST", f"{base}/pub/echo", gzip.compress(msgpack.packb({"data": list(range(50))})),
                               {"Content-Type": "application/msgpack", "Content-Encoding": "gzip"})
    sc.check("POST gzip'd msgpack is accepted", st == 200 and msgpack.unpackb(raw) == list(range(50)),
             f"{st} {raw[:80]!r}")

    # ---- caller context over HTTP
    st, _, body = await sc.http_json("GET", f"{base}/ctx/whoami")
    sc.check("anonymous HTTP caller: user anonymouz-http, ws ws-anonymous",
             st == 200 and body.get("user") == "anonymouz-http" and body.get("ws") == "ws-anonymous"
             and str(body.get("from", "")).startswith("ws-anonymous/"), f"{st} {body}")
    st, _, body = await sc.http_json("GET", f"{base}/ctx/whoami", headers=auth)
    tok_user = (await prov.parse_token(token))["id"]
    sc.check("Bearer HTTP caller: the token's user and workspace",
             st == 200 and body.get("user") == tok_user and body.get("ws") == ws
             and str(body.get("from", "")).startswith(ws + "/"), f"{st} {body}")

    # ---- protected / unlisted
    st, _, body = await sc.http_json("GET", f"{base}/prot/echo?data=1")
    sc.check("protected service without token -> 403 {success:false, detail}",
             st == 403 and isinstance(body, dict) and body.get("success") is False and "detail" in body,
             f"{st} {body}")
    sc.check("protected 403 detail names the permission problem", "Permission denied" in str(body), body)
    st, _, body = await sc.http_json("GET", f"{base}/prot/echo?data=1", headers=auth)
    sc.eq("protected service with a same-workspace Bearer token -> 200", (st, body), (200, 1))
    st, _, body = await sc.http_json("GET", f"{base}/unl/echo?data=5")
    sc.eq("unlisted service callable anonymously", (st, body), (200, 5))

    # ---- 404s and error mapping
    st, _, body = await sc.http_json("GET", f"{base}/nope/echo")
    sc.check("unknown service -> 404 {success:false, detail:'...Service not found...'}",
             st == 404 and isinstance(body, dict) and body.get("success") is False
             and "Service not found" in str(body.get("detail")), f"{st} {body}")
    st, _, body = await sc.http_json("GET", f"{base}/pub/missing")
    sc.eq("unknown function -> 404 'missing not found.'", (st, body),
          (404, {"success": False, "detail": "missing not found."}))
    st, _, body = await sc.http_json("GET", "/nonexistent-interop-ws/services/x/f", headers=auth)
    sc.check("unknown workspace -> 404 with success:false",
             st == 404 and isinstance(body, dict) and body.get("success") is False, f"{st} {body}")
    for kind, code, text in [("value", 400, "ValueError: bad value"), ("type", 400, "TypeError: wrong type"),
                             ("key", 404, "KeyError"), ("perm", 403, "PermissionError: nope"),
                             ("runtime", 500, "RuntimeError: runtime")]:
        st, _, body = await sc.http_json("GET", f"{base}/pub/fail?kind={kind}")
        sc.check(f"remote {kind} error -> {code} with '{text}'",
                 st == code and isinstance(body, dict) and body.get("success") is False
                 and text in str(body.get("detail")), f"{st} {body}")
    st, _, body = await sc.http_json("GET", f"{base}/pub/add?b=1")
    sc.check("missing required argument -> 400", st == 400 and "missing 1 required" in str(body), f"{st} {body}")
    st, _, body = await sc.http_json("GET", f"{base}/pub/echo?data=1", headers={"Authorization": "Bearer not-a-jwt"})
    sc.check("invalid Bearer token -> 401 {detail}", st == 401 and isinstance(body, dict) and "detail" in body,
             f"{st} {body}")

    # ---- listing and info
    st, _, body = await sc.http_json("GET", f"{base}/")
    ids = sorted(x.get("id") for x in body) if st == 200 and isinstance(body, list) else body
    sc.check("GET /{ws}/services/ anonymously lists public services with short ids",
             st == 200 and "http-provider:pub" in ids and "http-provider:ctx" in ids, f"{st} {ids}")
    sc.check("anonymous listing hides protected and unlisted services",
             st == 200 and "http-provider:prot" not in ids and "http-provider:unl" not in ids, ids)
    st, _, body = await sc.http_json("GET", f"{base}/", headers=auth)
    ids = sorted(x.get("id") for x in body) if st == 200 and isinstance(body, list) else body
    sc.check("listing with a same-workspace token shows protected services",
             st == 200 and "http-provider:prot" in ids and "http-provider:pub" in ids, f"{st} {ids}")
    st, _, body = await sc.http_json("GET", "/nonexistent-interop-ws/services/")
    sc.check("listing an unknown workspace -> 404 {success:false}",
             st == 404 and isinstance(body, dict) and body.get("success") is False, f"{st} {body}")
    st, _, body = await sc.http_json("GET", f"{base}/pub")
    sc.check("GET /{ws}/services/pub -> service info with the full id",
             st == 200 and body.get("id") == f"{ws}/http-provider:pub"
             and body.get("config", {}).get("visibility") == "public"
             and "echo" in (body.get("service_schema") or {}), f"{st} {str(body)[:300]}")
    st, _, body = await sc.http_json("GET", f"{base}/http-provider:pub")
    sc.check("service info by '{cid}:{svc}'", st == 200 and body.get("id") == f"{ws}/http-provider:pub",
             f"{st} {str(body)[:200]}")
    st, _, body = await sc.http_json("GET", f"{base}/nope")
    sc.check("service info of an unknown service -> 404 {success:false}",
             st == 404 and isinstance(body, dict) and body.get("success") is False, f"{st} {str(body)[:200]}")
    st, _, body = await sc.http_json("GET", f"{base}/prot")
    # upstream answers 404 (remote PermissionError text in detail); the spec recommends 403
    sc.check("service info of a protected service without token -> 403 or 404, not 200",
             st in (403, 404) and "Permission denied" in str(body), f"{st} {str(body)[:200]}")
    st, _, body = await sc.http_json("GET", f"{base}/~")
    sc.check("service info of '~' is the manager (id '~')", st == 200 and body.get("id") == "~",
             f"{st} {str(body)[:200]}")

    def no_redirect_get(path):
        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(sc.url + path, timeout=10) as r:
                return r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers)

    st, h = await asyncio.to_thread(no_redirect_get, base)
    sc.check("GET /{ws}/services redirects (307) to /{ws}/services/",
             st == 307 and h.get("location", h.get("Location", "")).endswith(f"/{ws}/services/"), f"{st} {h}")

    # ---- CORS
    st, h, _ = await sc.http("GET", f"{base}/pub/echo?data=1", headers={"Origin": "http://localhost:3000"})
    sc.eq("CORS: the request Origin is echoed", h.get("access-control-allow-origin"), "http://localhost:3000")

    # ---- manager through the proxy
    st, _, body = await sc.http_json("POST", "/public/services/ws/generate_token", {"config": {"expires_in": 60}})
    sc.check("anonymous POST /public/services/ws/generate_token -> 403 'Only admin can generate token'",
             st == 403 and "Only admin can generate token" in str(body), f"{st} {body}")
    st, _, body = await sc.http_json("POST", f"/{ws}/services/ws/echo", {"data": "via-manager"}, headers=auth)
    sc.eq("manager echo through /{ws}/services/ws/echo with a token", (st, body), (200, "via-manager"))

    # ---- generator framing (upstream streams only an error item here; see README)
    st, h, raw = await sc.http("GET", f"{base}/pub/gen?n=3")
    text = raw.decode("utf-8", "replace")
    sc.check("generator over HTTP: text/event-stream ending with 'data: [DONE]'",
             st == 200 and h.get("content-type", "").startswith("text/event-stream")
             and text.rstrip().endswith("data: [DONE]") and text.startswith("data: "), f"{st} {h.get('content-type')} {text[:200]!r}")


if __name__ == "__main__":
    Scenario("http_proxy").run(main)
