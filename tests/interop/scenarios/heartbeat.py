"""heartbeat: long calls survive a short caller-side method_timeout because the callee's
heartbeats travel back through the server (rpc-protocol §12 #44). With method_timeout=2 on
the caller (another workspace): a 5 s method reporting progress through a callback, a 2.5 s
method calling back 5 times, and a plain 5 s sleep all succeed (run concurrently)."""

import asyncio
import time

from _common import Scenario


async def main(sc):
    provider = await sc.connect("provider", client_id="hb-provider")
    caller = await sc.connect("caller with method_timeout=2", client_id="hb-caller", method_timeout=2)

    async def long_with_progress(cb):
        for i in range(5):
            await asyncio.sleep(1)
            await cb(i)
        return "progress-done"

    async def streaming(cb):
        for i in range(5):
            await asyncio.sleep(0.5)
            await cb({"chunk": i})
        return "stream-done"

    async def sleeper(t):
        await asyncio.sleep(t)
        return f"slept {t}"

    info = await provider.register_service({
        "id": "hb-svc", "config": {"visibility": "public"},
        "long_with_progress": long_with_progress, "streaming": streaming, "sleeper": sleeper,
    })
    svc = await caller.get_service(info.id)
    progress, chunks = [], []
    t0 = time.monotonic()
    res = await asyncio.gather(
        svc.long_with_progress(lambda i: progress.append(i)),
        svc.streaming(lambda c: chunks.append(c["chunk"])),
        svc.sleeper(5),
        return_exceptions=True,
    )
    dt = time.monotonic() - t0
    sc.eq("5 s method with progress callback succeeds (method_timeout=2)", res[0], "progress-done")
    sc.eq("progress callbacks all arrived in order", progress, [0, 1, 2, 3, 4])
    sc.eq("2.5 s streaming method with 5 callbacks succeeds", res[1], "stream-done")
    sc.eq("streaming callbacks all arrived in order", chunks, [0, 1, 2, 3, 4])
    sc.eq("plain 5 s sleep succeeds thanks to heartbeats", res[2], "slept 5")
    sc.check("the three calls ran concurrently (< 8 s)", dt < 8, f"{dt:.1f}s")
    sc.eq("manager call still fine after the long calls", await caller.echo("ok"), "ok")


if __name__ == "__main__":
    Scenario("heartbeat").run(main)
