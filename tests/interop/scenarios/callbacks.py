"""callbacks: callables passed as arguments across workspaces (rpc-protocol §12 #48, #49,
#60-#63). A callback is invoked several times during the call, in order; async callbacks;
errors raised by a callback propagate to the caller; the service can hand its own function
to the callback (nested); a callback stored by the service and invoked after the call
returned fails; the caller's session store does not grow with callback calls."""

import asyncio
import time

from _common import Scenario


async def main(sc):
    provider = await sc.connect("provider", client_id="cb-provider")
    consumer = await sc.connect("consumer", client_id="cb-consumer")
    stored = {}

    async def count(n, cb):
        for i in range(n):
            r = cb(i, n)
            if asyncio.iscoroutine(r) or isinstance(r, asyncio.Future):
                await r
        return n

    async def count_results(n, cb):
        out = []
        for i in range(n):
            out.append(await cb(i))
        return out

    async def keep(cb):
        stored["cb"] = cb
        await cb("during")
        return "kept"

    async def call_kept():
        return await stored["cb"]("after")

    async def nested(cb):
        def inner(x):
            return x * 10 + 1
        return await cb(inner)

    async def failing_cb(cb):
        return await cb()

    info = await provider.register_service({
        "id": "cb-svc", "config": {"visibility": "public"},
        "count": count, "count_results": count_results, "keep": keep,
        "call_kept": call_kept, "nested": nested, "failing_cb": failing_cb,
    })
    svc = await consumer.get_service(info.id)

    # #49: one callback invoked 10 times during the call, in order, with (i, n)
    seen = []
    ret = await svc.count(10, lambda i, n: seen.append((i, n)))
    sc.eq("count() returns n", ret, 10)
    sc.eq("sync callback invoked 10 times in order with (i, n)", seen, [(i, 10) for i in range(10)])

    seen_async = []

    async def acb(i, n):
        await asyncio.sleep(0)
        seen_async.append(i)

    await svc.count(5, acb)
    sc.eq("async callback invoked 5 times in order", seen_async, list(range(5)))

    sc.eq("callback return values travel back to the service",
          await svc.count_results(4, lambda i: i * i), [0, 1, 4, 9])

    # #48: an error raised inside the callback reaches the caller
    def bad():
        raise ValueError("callback exploded")

    t = time.monotonic()
    await sc.expect_error("error raised in a callback propagates to the caller",
                          svc.failing_cb(bad), ["callback exploded"], timeout=15)
    sc.check("callback error arrives quickly", time.monotonic() - t < 10, f"{time.monotonic() - t:.1f}s")

    # #62: nested callback: the service passes its own function into our callback
    async def use_inner(inner):
        return await inner(7)

    sc.eq("nested callback (service function passed into client callback)",
          await svc.nested(use_inner), 71)

    # #63: a stored callback works during the call, fails after the call returned
    during = []
    ret = await svc.keep(lambda v: during.append(v))
    sc.eq("stored callback works during the call", (ret, during), ("kept", ["during"]))
    await sc.expect_error("stored callback invoked after the call returned fails",
                          svc.call_kept(), ["Session not found", "not found"], timeout=20,
                          max_seconds=10)
    sc.check("the late invocation did not reach the caller", during == ["during"], during)

    # #60/#61: the caller's object store does not grow with calls that pass callbacks
    store = consumer.rpc._object_store
    before = len(store)
    for _ in range(20):
        await svc.count(2, lambda i, n: None)
    await asyncio.sleep(0.2)
    after = len(store)
    sc.check("caller session store does not grow after 20 callback calls", after <= before + 1,
             f"{before} -> {after}")


if __name__ == "__main__":
    Scenario("callbacks").run(main)
