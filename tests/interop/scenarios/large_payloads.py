"""large_payloads: a 32 MB bytes payload and a 64 MB float32 array (2048x2048x4, as in
rpc-protocol §12 #7/#20) sent to a service in another workspace and returned (chunked
through `message_cache` both ways, since each direction exceeds the 256 KiB chunk size)."""

import hashlib
import time

import numpy as np

from _common import Scenario


async def main(sc):
    provider = await sc.connect("provider", client_id="big-provider", method_timeout=60)
    consumer = await sc.connect("consumer", client_id="big-consumer", method_timeout=60)

    def digest(data):
        return {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def echo(x):
        return x

    def add_one(x):
        return x + 1.0

    def make_bytes(n):
        return bytes(range(256)) * (n // 256)

    info = await provider.register_service({
        "id": "big-svc", "config": {"visibility": "public"},
        "digest": digest, "echo": echo, "add_one": add_one, "make_bytes": make_bytes,
    })
    svc = await consumer.get_service(info.id)

    n = 32 * 1024 * 1024
    payload = bytes(range(256)) * (n // 256)
    want = {"len": n, "sha256": hashlib.sha256(payload).hexdigest()}
    t = time.monotonic()
    r = await svc.digest(payload)
    sc.eq("32 MB bytes argument arrives intact (length + sha256)", dict(r), want)
    t1 = time.monotonic()
    r = await svc.echo(payload)
    sc.check("32 MB bytes echoed back intact", isinstance(r, bytes) and r == payload,
             f"{type(r).__name__} len={len(r) if hasattr(r, '__len__') else '?'}")
    t2 = time.monotonic()
    r = await svc.make_bytes(n)
    sc.check("32 MB bytes result produced by the service arrives intact",
             isinstance(r, bytes) and len(r) == n and hashlib.sha256(r).hexdigest() == want["sha256"],
             f"len={len(r) if hasattr(r, '__len__') else '?'}")
    t3 = time.monotonic()
    print(f"  .. timings: digest {t1 - t:.2f}s, echo {t2 - t1:.2f}s, result {t3 - t2:.2f}s", flush=True)

    sc.eq("small float call before the big array", await svc.add_one(2.1), 3.1)
    arr = np.random.default_rng(7).random((2048, 2048, 4)).astype(np.float32)  # 64 MiB
    t = time.monotonic()
    r = await svc.add_one(arr)
    ok = (isinstance(r, np.ndarray) and r.dtype == np.float32 and r.shape == arr.shape
          and np.array_equal(r, arr + 1.0))
    sc.check("64 MB float32 array sent and x+1.0 returned (chunked both ways)", ok,
             f"{type(r).__name__} {getattr(r, 'dtype', '')} {getattr(r, 'shape', '')}")
    print(f"  .. timings: 64 MB array round trip {time.monotonic() - t:.2f}s", flush=True)


if __name__ == "__main__":
    Scenario("large_payloads").run(main)
