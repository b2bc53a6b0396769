"""generators: sync and async generators returned by a service in another workspace
(rpc-protocol §12 #26, #52-#57): full consumption, partial consumption followed by
aclose() (the producer's `finally` runs), an error in the middle of the stream, custom
iterator objects, several infinite generators closed early, and no `:close` entries left
in the producer's session store."""

import asyncio

from _common import Scenario, wait_until


class Countdown:
    """Custom async iterator object (not a generator function)."""

    def __init__(self, n):
        self.n = n

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.n <= 0:
            raise StopAsyncIteration
        self.n -= 1
        return self.n


class SyncCounter:
    """Custom sync iterator object."""

    def __init__(self, n):
        self.i = 0
        self.n = n

    def __iter__(self):
        return self

    def __next__(self):
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return self.i - 1


def close_keys(rpc):
    """Names of `...:close` entries (pending generator close handlers) in the session store."""
    found = []

    def walk(d, prefix):
        if not isinstance(d, dict):
            return
        for k, v in list(d.items()):
            if isinstance(k, str) and k.endswith(":close"):
                found.append(prefix + k)
            if isinstance(v, dict) and k not in ("services",):
                walk(v, prefix + str(k) + ".")

    walk(rpc._object_store, "")
    return found


async def main(sc):
    provider = await sc.connect("provider", client_id="gen-provider")
    consumer = await sc.connect("consumer", client_id="gen-consumer")
    events = {"finally": 0, "started": 0}

    def sync_gen(n):
        for i in range(n):
            yield i

    async def async_gen(n):
        for i in range(n):
            await asyncio.sleep(0)
            yield {"i": i, "sq": i * i}

    async def infinite():
        events["started"] += 1
        i = 0
        try:
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.01)
        finally:
            events["finally"] += 1

    async def broken():
        for i in range(3):
            yield i
        raise RuntimeError("stream broke mid-way")

    def countdown(n):
        return Countdown(n)

    def counter(n):
        return SyncCounter(n)

    info = await provider.register_service({
        "id": "gen-svc", "config": {"visibility": "public"},
        "sync_gen": sync_gen, "async_gen": async_gen, "infinite": infinite,
        "broken": broken, "countdown": countdown, "counter": counter,
    })
    svc = await consumer.get_service(info.id)

    # #26: full consumption
    g = await svc.sync_gen(5)
    sc.eq("sync generator fully consumed", [x async for x in g], [0, 1, 2, 3, 4])
    g = await svc.async_gen(4)
    items = [x async for x in g]
    sc.eq("async generator fully consumed (dict items)",
          [(x["i"], x["sq"]) for x in items], [(0, 0), (1, 1), (2, 4), (3, 9)])
    g = await svc.sync_gen(0)
    sc.eq("empty generator", [x async for x in g], [])
    g = await svc.sync_gen(200)
    sc.eq("200-item generator", [x async for x in g], list(range(200)))

    # #53: partial consumption then aclose(): the producer's finally runs
    g = await svc.infinite()
    sc.check("an open remote generator holds a ':close' entry on the producer",
             bool(close_keys(provider.rpc)), "none found (the leak checks below would be vacuous)")
    got = []
    async for x in g:
        got.append(x)
        if len(got) == 3:
            break
    await g.aclose()
    sc.eq("partial consumption yields the first 3 items", got, [0, 1, 2])
    ok = await wait_until(lambda: events["finally"] >= 1, timeout=5)
    sc.check("aclose() makes the producer generator run its finally (<5 s)", ok, events)

    # #52: an error in the middle of the stream reaches the consumer
    g = await svc.broken()
    received = []

    async def consume():
        async for x in g:
            received.append(x)

    await sc.expect_error("error raised mid-stream reaches the consumer", consume(),
                          ["stream broke mid-way"], timeout=10)
    sc.check("items before the error were received", received == [0, 1, 2][:len(received)],
             received)

    # #55, #56: custom iterator objects
    g = await svc.countdown(5)
    sc.eq("custom async iterator object iterates remotely", [x async for x in g], [4, 3, 2, 1, 0])
    g = await svc.counter(4)
    sc.eq("custom sync iterator object iterates remotely", [x async for x in g], [0, 1, 2, 3])
    g = await svc.countdown(5)
    part = []
    async for x in g:
        part.append(x)
        if len(part) == 2:
            break
    await g.aclose()
    sc.eq("custom async iterator partially consumed", part, [4, 3])

    # #57: several infinite generators, each partially consumed then closed
    before = events["finally"]
    gens = [await svc.infinite() for _ in range(5)]
    for g in gens:
        n = 0
        async for _ in g:
            n += 1
            if n == 2:
                break
        await g.aclose()
    ok = await wait_until(lambda: events["finally"] >= before + 5, timeout=5)
    sc.check("5 partially consumed generators all closed on the producer", ok,
             f"finally ran {events['finally'] - before} of 5 times")

    # #54/#57: no leftover ':close' entries on the producer
    left = await wait_until(lambda: not close_keys(provider.rpc), timeout=3)
    sc.check("no ':close' entries left in the producer's session store", left,
             close_keys(provider.rpc))


if __name__ == "__main__":
    Scenario("generators").run(main)
