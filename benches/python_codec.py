"""The stock Python client's cost for the packages `benches/codec.rs` measures.

Runs hypha-rpc 0.21.47's own encode/decode path, as its RemoteFunction and message
handler do for every call: `RPC._encode` of the arguments plus `msgpack.packb` of the two
segments; `msgpack.Unpacker` over the frame plus `RPC._decode` of the arguments. Prints
one `name ns_per_op` line per case; `benches/codec_vs_python.sh` pairs them with the
Rust figures of the same run.

Usage: .venv/bin/python benches/python_codec.py
"""

import asyncio
import time

import msgpack
import numpy as np
from hypha_rpc.rpc import RPC

BIG = 64 << 20


def best_of(fn, repeat, number):
    """Best per-op time in ns over `repeat` runs of `number` calls (least noise)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter_ns()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter_ns() - t) / number)
    return best


def main_segment():
    return {"type": "method", "from": "ws/cons", "to": "ws/prov", "method": "services.demo.add", "session": "S1"}


async def run():
    rpc = RPC(None, client_id="cons", workspace="ws", silent=True, server_base_url="http://127.0.0.1:9527",
              loop=asyncio.get_running_loop(), logger=None)

    def encode(args, kwargs=None):
        extra = {"args": rpc._encode(list(args) + ([kwargs] if kwargs else []), session_id="S1",
                                     local_workspace="ws"), "promise": "*", "t": 15.0}
        if kwargs:
            extra["with_kwargs"] = True
        return msgpack.packb(main_segment()) + msgpack.packb(extra)

    def decode(frame):
        unpacker = msgpack.Unpacker(max_buffer_size=len(frame) + 1024)
        unpacker.feed(frame)
        main = unpacker.unpack()
        extra = unpacker.unpack()
        main.update(extra)
        return rpc._decode(main["args"], remote_parent=main.get("session"), remote_workspace="ws")

    small = encode([1], {"b": 5})
    big_array = np.full((4096, BIG // 4 // 4096), 1.5, dtype=np.float32)
    big = encode([big_array])
    decoded = decode(big)[0]
    assert decoded.dtype == np.float32 and decoded.shape == big_array.shape

    print("small_call/encode", round(best_of(lambda: encode([1], {"b": 5}), 5, 20000)))
    print("small_call/decode", round(best_of(lambda: decode(small), 5, 20000)))
    print("ndarray_f32_64MiB/encode", round(best_of(lambda: encode([big_array]), 5, 2)))
    print("ndarray_f32_64MiB/decode_to_f32_view", round(best_of(lambda: decode(big), 5, 2)))


asyncio.run(run())
