"""The stock Python client as a data peer of the Rust client (tests/client_data.rs).

    data_peer.py serve URL             register `py-data`, print service_id=..., serve until stdin closes
    data_peer.py call URL SERVICE_ID   call the Rust `rs-data` service with numpy data, print RESULT {...}

Both sides register a codec named `point` for their own Point type: {"x": .., "y": ..}.
"""
import asyncio
import hashlib
import json
import sys

import numpy as np
from hypha_rpc import connect_to_server

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]


def sample(dtype):
    """The 2x3 array both sides agree on for `dtype`."""
    base = np.arange(6).reshape(2, 3)
    if dtype == "bool":
        return base % 2 == 1
    if dtype.startswith("complex"):
        return (base + 1j * (base - 2)).astype(dtype)
    if dtype.startswith("int"):
        return (base - 2).astype(dtype)
    return base.astype(dtype)


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


def register_point(server):
    server.register_codec({
        "name": "point",
        "type": Point,
        "encoder": lambda p: {"x": p.x, "y": p.y},
        "decoder": lambda d: Point(d["x"], d["y"]),
    })


def digest(x):
    """A summary of a payload that Rust can check without moving it back."""
    if isinstance(x, np.ndarray):
        return {"kind": "ndarray", "dtype": str(x.dtype), "shape": list(x.shape),
                "sha256": hashlib.sha256(x.tobytes()).hexdigest()}
    if isinstance(x, bytes):
        return {"kind": "bytes", "len": len(x), "sha256": hashlib.sha256(x).hexdigest()}
    return {"kind": type(x).__name__}


async def serve(url):
    server = await connect_to_server({"server_url": url, "method_timeout": 120})
    register_point(server)

    def echo(x):
        return x

    def make(dtype):
        return sample(dtype)

    def check(arr, dtype):
        """Did Rust send `sample(dtype)`?"""
        ok = isinstance(arr, np.ndarray) and str(arr.dtype) == dtype and arr.shape == (2, 3) \
            and bool(np.array_equal(arr, sample(dtype)))
        return {"ok": ok, "got": repr(arr)}

    def big_array(n):
        return np.arange(n, dtype=np.float32)

    def big_bytes(n):
        return bytes(i % 251 for i in range(256)) * (n // 256)

    def nested():
        return {"list": [1, 2.5, "three", None, True], "map": {"deep": {"arr": sample("float64")}},
                "blob": b"\x00\x01\xff", "arrays": [sample("int32"), sample("uint8")]}

    def point_move(p, dx):
        assert isinstance(p, Point), f"not a Point: {p!r}"
        return Point(p.x + dx, p.y)

    def make_point(x, y):
        return Point(x, y)

    info = await server.register_service({
        "id": "py-data",
        "config": {"visibility": "public"},
        "echo": echo, "make": make, "check": check, "digest": digest,
        "big_array": big_array, "big_bytes": big_bytes, "nested": nested,
        "point_move": point_move, "make_point": make_point,
    })
    print("service_id=" + info["id"], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.disconnect()


async def call(url, service_id):
    server = await connect_to_server({"server_url": url, "method_timeout": 120})
    register_point(server)
    svc = await server.get_service(service_id)
    out = {}
    for dtype in DTYPES:
        if dtype == "float16":
            continue  # no Rust element type; carried as NdArray bytes (see the Rust test)
        a = sample(dtype)
        back = await svc.echo_array(a)
        out["echo_" + dtype] = isinstance(back, np.ndarray) and back.dtype == a.dtype \
            and back.shape == a.shape and bool(np.array_equal(back, a))
    out["sum_f64"] = await svc.sum_f64(np.arange(10, dtype=np.float64))
    made = await svc.make_f32(4)
    out["make_f32"] = [str(made.dtype), list(made.shape), made.tolist()]
    big = np.arange(16 * 1024 * 1024, dtype=np.float32)
    back = await svc.echo_array(big)
    out["big_f32"] = isinstance(back, np.ndarray) and back.dtype == big.dtype and bool(np.array_equal(back, big))
    blob = bytes(i % 251 for i in range(256)) * (32 * 1024 * 1024 // 256)
    out["big_bytes_len"] = await svc.bytes_len(blob)
    p = await svc.point_move(Point(1, 2), 10)
    out["point"] = [type(p).__name__, p.x, p.y]
    print("RESULT " + json.dumps(out), flush=True)
    await server.disconnect()


if __name__ == "__main__":
    # The stock client warns on every closed connection; the Rust test ends peers by
    # closing their stdin, which is expected.
    import logging
    for name in ("RPC", "websocket-client", "hypha-rpc"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if sys.argv[1] == "call":
        asyncio.run(call(sys.argv[2], sys.argv[3]))
    else:
        asyncio.run(serve(sys.argv[2]))
