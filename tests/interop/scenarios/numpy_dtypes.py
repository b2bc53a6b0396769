"""numpy_dtypes: numpy arrays of several dtypes (int8, uint16, int32, int64, float32,
float64, bool, complex64) and shapes round-tripped by a service in another workspace, and
(rpc-protocol §12 #12) through the server's manager `echo`."""

import numpy as np

from _common import Scenario

DTYPES = ["int8", "uint16", "int32", "int64", "float32", "float64", "bool", "complex64"]


def sample(dtype, shape):
    rng = np.random.default_rng(1234)
    n = int(np.prod(shape))
    if dtype == "bool":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    if dtype == "complex64":
        return (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(np.complex64).reshape(shape)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        v = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        v[0] = info.min
        v[-1] = info.max
        return v.reshape(shape)
    return rng.standard_normal(n).astype(dtype).reshape(shape)


def same(a, b):
    return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(a, b))


def desc(x):
    if isinstance(x, np.ndarray):
        return f"ndarray dtype={x.dtype} shape={x.shape}"
    return f"{type(x).__name__}: {str(x)[:80]}"


async def main(sc):
    provider = await sc.connect("provider", client_id="np-provider")
    consumer = await sc.connect("consumer", client_id="np-consumer")

    def echo(x):
        return x

    def inspect(x):
        return {"dtype": str(x.dtype), "shape": list(x.shape),
                "checksum": float(np.abs(x.astype(np.complex128)).sum())}

    def double(x):
        return x * 2

    info = await provider.register_service({
        "id": "np-svc", "config": {"visibility": "public"},
        "echo": echo, "inspect": inspect, "double": double,
    })
    svc = await consumer.get_service(info.id)

    for dt in DTYPES:
        for shape in [(7,), (3, 4, 5)]:
            a = sample(dt, shape)
            r = await svc.echo(a)
            sc.check(f"service echo {dt}{list(shape)} keeps dtype, shape and values", same(a, r),
                     desc(r))
        a = sample(dt, (2, 3))
        r = await svc.inspect(a)
        want = {"dtype": dt, "shape": [2, 3], "checksum": float(np.abs(a.astype(np.complex128)).sum())}
        got = {"dtype": r["dtype"], "shape": list(r["shape"]), "checksum": r["checksum"]}
        sc.check(f"service sees {dt} as an ndarray with the same content", got == want,
                 f"got {got}, want {want}")

    a = np.arange(12, dtype=np.int32).reshape(3, 4).T  # non-contiguous view
    sc.check("non-contiguous (transposed) array round-trips", same(np.ascontiguousarray(a), await svc.echo(a)), "")
    a = np.zeros((0, 3), dtype=np.float32)
    r = await svc.echo(a)
    sc.check("empty (0, 3) float32 array round-trips", same(a, r), desc(r))
    a = np.array(3.5, dtype=np.float64)
    r = await svc.echo(a)
    sc.check("0-d float64 array round-trips", isinstance(r, np.ndarray) and r.shape == () and float(r) == 3.5,
             desc(r))
    a = np.arange(10, dtype=np.float32)
    sc.check("service computes on the array (x*2)", same(a * 2, await svc.double(a)), "")
    r = await svc.echo({"nested": [np.arange(3, dtype=np.uint16), {"deep": np.ones(2, dtype=bool)}]})
    sc.check("arrays nested in maps and lists round-trip",
             same(np.arange(3, dtype=np.uint16), r["nested"][0]) and same(np.ones(2, dtype=bool), r["nested"][1]["deep"]),
             str(r)[:200])

    # The manager's echo is a server-side codec round trip.
    for dt in DTYPES:
        a = sample(dt, (4, 3))
        r = await consumer.echo(a)
        sc.check(f"manager echo {dt}[4, 3] round-trips", same(a, r), desc(r))
    a = np.random.default_rng(0).random((512, 512))
    r = await consumer.echo(a)
    sc.check("manager echo of a 512x512 float64 array (2 MB, chunked) returns shape (512, 512)",
             same(a, r), desc(r))


if __name__ == "__main__":
    Scenario("numpy_dtypes").run(main)
