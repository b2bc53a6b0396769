#!/usr/bin/env python3
"""Generate golden wire fixtures with the REAL stock Python client (hypha-rpc 0.21.47).

Two real `hypha_rpc.rpc.RPC` engines (client ids `prov` and `cons`, workspace
`ws-golden`) are connected back to back through an in-process loopback that does to
every binary frame exactly what the hypha server does (spec §1.5): decode only the main
segment, set `from` to `<ws>/<client id>`, normalize `to`, add `ws` and `user`, re-pack
the main segment and append the sender's extra bytes unchanged. Nothing else is mocked.
Every frame is recorded; the interesting ones are written to `fixtures/<name>.bin`
(the exact bytes the receiving peer got) and described in `fixtures/manifest.json`.

Usage:  python tests/golden/generate.py [--random-ids] [--verbose]

Determinism: the interpreter re-executes itself with PYTHONHASHSEED=0 (set iteration
order), numpy data comes from fixed seeds, client ids are fixed, and by default the
stock client's id source (`shortuuid.uuid`, used for session and object ids) is replaced
by a seeded generator of ids of the same shape (22 chars of the shortuuid alphabet), so
a re-run reproduces identical bytes. `--random-ids` keeps the real random ids; the
manifest records whatever ids were used either way. Error tracebacks embed file paths
of this checkout, so they differ between checkouts.

Manifest entry (one per fixture):
    name, file, kind ("frame": a frame as delivered to the receiver; "package": the
    reassembled content of a chunked message, not a frame), description, src, dst, seq,
    size, segments (1 or 2), main (tagged JSON of the main segment), sent_main (frames
    only: the main segment as the sender emitted it, before the server rewrite),
    extra (tagged JSON of the extra segment's expected DECODED content, or null),
    decode {receiver, local_workspace, remote_workspace, remote_parent}: the context the
    stock receiver decodes the extra segment with.

Tagged JSON (a JSON object with exactly one key starting with `$` is a tag; any other
JSON value has its plain meaning: null, true/false, integer literal = int, literal with
a fraction or exponent = float64, string, array = list, object = string-keyed map):
    {"$int": "<decimal>"}                  integer outside +-(2**53-1)
    {"$float": "nan" | "inf" | "-inf"}     non-finite float64
    {"$bytes": "<hex>"}                    msgpack bin (<= 4096 bytes)
    {"$bytes_at": {"offset", "len", "sha256"}}  bin > 4096 bytes: the bytes are
                                           fixture_file[offset:offset+len]
    {"$map": {...}}                        a plain map whose only key starts with `$`
    {"$ndarray": {"dtype", "shape", "hex"}}     _rtype ndarray (raw C-order bytes)
    {"$typedarray": {"dtype", "hex"}}      _rtype typedarray (JS only; not produced here)
    {"$memoryview": "<hex>"}               _rtype memoryview
    {"$set": [items]}                      _rtype set (items in wire order)
    {"$orderedmap": [[k, v], ...]}         _rtype orderedmap (JS only; not produced here)
    {"$error": {"message", "trace"}}       _rtype error (_rvalue, _rtrace or null)
    {"$method": {"descriptor": {...}, "remote_parent": str|null}}
        _rtype method: all wire fields except _rtype, values tagged, `_rtarget` made
        absolute with the sender's workspace as the stock decoder does; remote_parent
        is the carrying package's `session` (what calls through it send as `parent`)
    {"$generator": {"descriptor": {...}, "remote_parent": ...}}   _rtype generator, same
    {"$custom": {"codec": "cell", "fields": {...}}}   a registered custom codec value
    Maps with any other `_rtype` (e.g. {"_rtype": "stop_iteration"}) stay plain maps.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import random
import shutil
import sys
import time

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import golden_common as gc  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures")


# ----------------------------------------------------------------------------------
# Loopback "server"
# ----------------------------------------------------------------------------------


class Frame:
    def __init__(self, seq, src, dst, sent, delivered, sent_main, main):
        self.seq = seq
        self.src = src
        self.dst = dst
        self.sent = sent
        self.delivered = delivered
        self.sent_main = sent_main
        self.main = main

    @property
    def method(self):
        return self.main.get("method")

    @property
    def session(self):
        return self.main.get("session")


class LoopbackServer:
    """Routes frames between in-process peers, rewriting them as hypha does (§1.5)."""

    def __init__(self, loop):
        self.loop = loop
        self.peers = {}
        self.frames: list[Frame] = []
        self.errors = []

    def connect(self, client_id):
        conn = LoopbackConnection(self, client_id)
        self.peers[client_id] = conn
        return conn

    def route(self, src: str, data: bytes):
        assert isinstance(data, bytes), type(data)
        unpacker = msgpack.Unpacker(io.BytesIO(data), max_buffer_size=0)
        main = unpacker.unpack()
        extra_bytes = data[unpacker.tell() :]
        sent_main = dict(main)
        to = main.get("to")
        if to == "*":
            to = gc.WORKSPACE + "/*"
        elif "/" not in to:
            to = gc.WORKSPACE + "/" + to
        main.update(
            {"from": f"{gc.WORKSPACE}/{src}", "to": to, "ws": gc.WORKSPACE, "user": gc.user_info(src)}
        )
        delivered = msgpack.packb(main) + extra_bytes
        ws, dst = to.split("/", 1)
        frame = Frame(len(self.frames), src, dst, data, delivered, sent_main, main)
        self.frames.append(frame)
        target = self.peers.get(dst) if ws == gc.WORKSPACE else None
        if target is None:
            self.errors.append(f"frame {frame.seq} to unknown peer {to}")
            return
        self.loop.call_soon(target.deliver, delivered)


class LoopbackConnection:
    """The connection interface RPC uses (emit_message, on_message, on_connected...)."""

    def __init__(self, server, client_id):
        self.server = server
        self.client_id = client_id
        self.manager_id = gc.MANAGER_ID
        self.workspace = gc.WORKSPACE
        self._handle_message = None
        self._handle_connected = None

    def on_message(self, handler):
        self._handle_message = handler

    def on_connected(self, handler):
        self._handle_connected = handler

    def on_disconnected(self, handler):
        pass

    async def emit_message(self, data):
        self.server.route(self.client_id, data)

    def deliver(self, data):
        try:
            self._handle_message(data)
        except Exception as exc:  # noqa: BLE001
            self.server.errors.append(f"{self.client_id} failed to handle a frame: {exc!r}")


# ----------------------------------------------------------------------------------
# Deterministic ids
# ----------------------------------------------------------------------------------


def install_seeded_ids(seed=20250101):
    import shortuuid

    alphabet = shortuuid.get_alphabet()
    rng = random.Random(seed)

    def seeded_uuid(name=None, pad_length=None):
        return "".join(rng.choice(alphabet) for _ in range(22))

    shortuuid.uuid = seeded_uuid


# ----------------------------------------------------------------------------------
# Fixture writer
# ----------------------------------------------------------------------------------


class Writer:
    def __init__(self, server):
        self.server = server
        self.entries = []
        self.names = set()
        self.blobs = {}

    def _entry(self, name, description, kind, data, src, dst, seq, sent_main, receiver):
        assert name not in self.names, name
        self.names.add(name)
        max_buf = 0 if kind == "package" else None
        main, extra, _ = gc.split_frame(data, max_buffer_size=max_buf)
        remote_ws, remote_parent = gc.decode_context(main)
        d = gc.Describer(data, remote_ws, remote_parent)
        entry = {
            "name": name,
            "file": name + ".bin",
            "kind": kind,
            "description": description,
            "src": src,
            "dst": dst,
            "seq": seq,
            "size": len(data),
            "segments": 1 if extra is None else 2,
            "main": d.plain(main),
        }
        if sent_main is not None:
            entry["sent_main"] = d.plain(sent_main)
        entry["extra"] = None if extra is None else d.value(extra)
        entry["decode"] = {
            "receiver": receiver,
            "local_workspace": gc.WORKSPACE,
            "remote_workspace": remote_ws,
            "remote_parent": remote_parent,
        }
        self.entries.append(entry)
        self.blobs[name] = data

    def frame(self, name, frame: Frame, description):
        self._entry(name, description, "frame", frame.delivered, frame.src, frame.dst, frame.seq,
                    frame.sent_main, frame.dst)

    def package(self, name, data, src, dst, description):
        self._entry(name, description, "package", data, src, dst, None, None, dst)

    def write(self, meta):
        if os.path.isdir(FIXTURES):
            shutil.rmtree(FIXTURES)
        os.makedirs(FIXTURES)
        for name, data in self.blobs.items():
            with open(os.path.join(FIXTURES, name + ".bin"), "wb") as f:
                f.write(data)
        manifest = dict(meta)
        manifest["fixtures"] = self.entries
        with open(os.path.join(FIXTURES, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False, allow_nan=False)
            f.write("\n")


def verify_against_stock_decoder(entries, blobs):
    """Cross-check every description against what the stock decoder really produces."""
    decoders = {}
    problems = []
    for e in entries:
        rpc = decoders.setdefault(e["decode"]["receiver"], gc.make_decoder_rpc(e["decode"]["receiver"]))
        data = blobs[e["name"]]
        main, extra, _ = gc.split_frame(data, max_buffer_size=0 if e["kind"] == "package" else None)
        got_main = gc.canon(main)
        want_main = gc.tagged_to_canon(e["main"], data)
        problems += [f"{e['name']} main: {x}" for x in gc.diff(want_main, got_main)]
        if extra is not None:
            ctx = e["decode"]
            decoded = rpc._decode(extra, remote_parent=ctx["remote_parent"],
                                  remote_workspace=ctx["remote_workspace"])
            problems += [f"{e['name']} extra: {x}"
                         for x in gc.diff(gc.tagged_to_canon(e["extra"], data), gc.canon(decoded))]
    return problems


# ----------------------------------------------------------------------------------
# Scenario helpers
# ----------------------------------------------------------------------------------


async def settle(n=20):
    for _ in range(n):
        await asyncio.sleep(0)


class Picker:
    def __init__(self, server):
        self.server = server
        self.start = 0

    def mark(self):
        self.start = len(self.server.frames)

    def frames(self):
        return self.server.frames[self.start :]

    def one(self, pred, what):
        hits = [f for f in self.frames() if pred(f)]
        if not hits:
            lines = "\n".join(f"  {f.seq} {f.src}->{f.dst} {f.method}" for f in self.frames())
            raise RuntimeError(f"no frame for {what}; frames since mark:\n{lines}")
        return hits[0]

    def call(self, method, src=None):
        return self.one(lambda f: f.method == method and (src is None or f.src == src), f"call {method}")

    def reply(self, call_frame, kind="resolve"):
        m = f"{call_frame.session}.{kind}"
        return self.one(lambda f: f.method == m, m)

    def all(self, pred):
        return [f for f in self.frames() if pred(f)]


# ----------------------------------------------------------------------------------
# The provider's service
# ----------------------------------------------------------------------------------


def build_service(state):
    def echo(x):
        """Return the argument unchanged."""
        return x

    def echo2(x):
        return x

    def echo_all(*args):
        return list(args)

    def add(a, b=0):
        return a + b

    add = gc_schema(add)

    async def async_echo(x):
        await asyncio.sleep(0)
        return x

    async def call_back(cb, n):
        out = []
        for i in range(n):
            out.append(await cb(i))
        return out

    def gen(n):
        for i in range(n):
            yield i * 10

    async def agen(n):
        for i in range(n):
            await asyncio.sleep(0)
            yield f"item-{i}"

    def fail_sync():
        raise ValueError("boom")

    async def fail_async():
        await asyncio.sleep(0)
        raise RuntimeError("async boom")

    def keep_rintf(obj):
        state["rintf"] = obj
        return "kept"

    async def use_rintf(x):
        return await state["rintf"]["add_one"](x)

    async def apply(fn, x):
        return await fn(x)

    def byte_len(data):
        return len(data)

    def make_bytes(n):
        return np.random.default_rng(7).integers(0, 256, n, dtype=np.uint8).tobytes()

    return {
        "id": "golden",
        "name": "Golden fixtures",
        "description": "Service used to record golden frames",
        "config": {"visibility": "protected"},
        "echo": echo,
        "echo_all": echo_all,
        "add": add,
        "async_echo": async_echo,
        "call_back": call_back,
        "gen": gen,
        "agen": agen,
        "fail_sync": fail_sync,
        "fail_async": fail_async,
        "keep_rintf": keep_rintf,
        "use_rintf": use_rintf,
        "apply": apply,
        "byte_len": byte_len,
        "make_bytes": make_bytes,
        "const": 42,
        "nested": {"echo2": echo2},
    }


def gc_schema(fn):
    from hypha_rpc.utils.schema import schema_function

    return schema_function(
        fn,
        name="add",
        description="Add two numbers.",
        parameters={
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "default": 0}},
            "required": ["a"],
        },
    )


def nested_map(depth):
    node = {"leaf": True}
    for i in reversed(range(depth)):
        node = {"level": i, "child": node}
    return node


# ----------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------


async def run(args):
    from hypha_rpc.rpc import RPC

    loop = asyncio.get_running_loop()
    server = LoopbackServer(loop)
    logger = logging.getLogger("golden") if args.verbose else None

    def make_rpc(cid):
        kwargs = {} if logger is not None else {"logger": None}
        rpc = RPC(
            server.connect(cid),
            client_id=cid,
            workspace=gc.WORKSPACE,
            default_context={"connection_type": "websocket"},
            silent=True,
            server_base_url=gc.SERVER_URL,
            loop=loop,
            **kwargs,
        )
        rpc.register_codec(dict(gc.CELL_CODEC))
        return rpc

    prov = make_rpc(gc.PROVIDER)
    cons = make_rpc(gc.CONSUMER)
    await settle()
    state = {}
    info = await prov.register_service(build_service(state), notify=False)
    assert info["id"] == f"{gc.WORKSPACE}/{gc.PROVIDER}:golden", info["id"]

    async def double(x):
        """Double a number (a registered service function of the consumer)."""
        return x * 2

    await cons.register_service({"id": "cons-tools", "config": {"visibility": "public"}, "double": double},
                                notify=False)

    w = Writer(server)
    p = Picker(server)
    P, C = gc.PROVIDER, gc.CONSUMER
    S = "services.golden."

    # --- get_service (explicit promise) -------------------------------------------
    p.mark()
    svc = await cons.get_remote_service(f"{gc.WORKSPACE}/{P}:golden")
    await settle()
    f = p.call("services.built-in.get_service", C)
    w.frame("get_service_call", f, "get_remote_service('ws-golden/prov:golden'): explicit promise "
            "(_rpromise true) with heartbeat/interval/resolve/reject descriptors")
    w.frame("get_service_resolve", p.reply(f), "the service map returned by get_service: services.* "
            "descriptors (_rasync, _rschema on add), nested map, plain values")

    async def call_and_record(name, method, coro, describe_call, describe_reply, reply="resolve"):
        p.mark()
        try:
            result = await coro
        except Exception as exc:  # noqa: BLE001
            result = exc
        await settle()
        call = p.call(S + method, C)
        if describe_call:
            w.frame(name + "_call", call, describe_call)
        if describe_reply:
            w.frame(name + "_" + reply, p.reply(call, reply), describe_reply)
        return result, call

    # --- primitives ----------------------------------------------------------------
    prims = [None, True, False, 0, 1, -1, 127, 128, 255, 256, -32, -33, -128, -129, 65535, 65536,
             -32768, -32769, 2**31 - 1, 2**32, -(2**31) - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1,
             -(2**63), 0.0, -0.0, 1.5, -2.25, 1e300, 5e-324, float("inf"), float("-inf"), float("nan"),
             "", "a", "héllo 🎉 漢字 العربية e\u0301", "x" * 40, "y" * 300]
    res, _ = await call_and_record("primitives", "echo_all", svc.echo_all(*prims),
                                   "echo_all(None, bools, ints of every msgpack width incl. 2**63, "
                                   "2**64-1, -2**63, floats incl. -0.0/inf/-inf/nan, strs incl. empty, "
                                   "emoji/CJK/RTL, str8/str16)", "the same list echoed back")
    assert len(res) == len(prims)

    await call_and_record("bytes", "echo_all",
                          svc.echo_all(b"", b"abc", b"\x00\x01\x00\xff\x00", bytes(range(256)), b"z" * 300),
                          "echo_all(b'', b'abc', bytes with zeros, bytes(range(256)), bin16)",
                          "the same bytes echoed back")

    containers = [{}, [], {"a": 1, "b": [1, 2, {"c": None}], "d": {"e": "f"}},
                  [1, "string", True, None, {"nested": [1, 2, 3]}], (1, 2, (3, 4)),
                  {"$weird": 1}, list(range(20)), {f"k{i:02d}": i for i in range(20)},
                  [[[]], [{}], {"x": [{"y": []}]}]]
    await call_and_record("containers", "echo_all", svc.echo_all(*containers),
                          "echo_all(empty map/list, nested maps and lists, tuples (sent as lists), a map "
                          "whose only key starts with '$', array16, map16)",
                          "the same containers echoed back (tuples came back as lists)")

    await call_and_record("nested50", "echo", svc.echo(nested_map(50)),
                          "echo(map nested 50 levels deep)", "the nested map echoed back")

    await call_and_record("set", "echo", svc.echo({3, 1, 2, -7, "a", "b"}),
                          "echo(set {3, 1, 2, -7, 'a', 'b'}) -> _rtype set", "the set echoed back")

    # --- numpy ----------------------------------------------------------------------
    rng = np.random.default_rng(1234)
    ints = [rng.integers(np.iinfo(t).min, np.iinfo(t).max, size=5, dtype=t, endpoint=True)
            for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)]
    ints[3][0] = np.iinfo(np.int64).min
    ints[7][0] = np.iinfo(np.uint64).max
    await call_and_record("ndarray_ints", "echo_all", svc.echo_all(*ints),
                          "echo_all(int8, int16, int32, int64, uint8, uint16, uint32, uint64 arrays of 5)",
                          "the arrays echoed back")
    special = [0.0, -0.0, 1.5, float("nan"), float("inf"), float("-inf")]
    floats = [np.array(special, dtype=np.float16), np.array(special + [3.25], dtype=np.float32),
              np.array(special + [1e300, 5e-324], dtype=np.float64),
              rng.standard_normal((2, 3)).astype(np.float32)]
    await call_and_record("ndarray_floats", "echo_all", svc.echo_all(*floats),
                          "echo_all(float16, float32, float64 arrays with -0.0/nan/inf, a 2x3 float32)",
                          "the arrays echoed back")
    misc = [np.array([True, False, True]), np.array([1 + 2j, -0.5j, complex("nan+1j")], dtype=np.complex64),
            np.array([3 - 4j, 1e300 + 0j], dtype=np.complex128), np.array(["ab", "héllo", "", "🎉"], dtype="<U5")]
    await call_and_record("ndarray_misc", "echo_all", svc.echo_all(*misc),
                          "echo_all(bool, complex64, complex128, '<U5' string arrays)", "the arrays echoed back")
    shapes = [np.float32(1.5), np.array(7, dtype=np.int16), np.arange(24, dtype=np.float32).reshape(2, 3, 4),
              np.arange(6, dtype=np.int32).reshape(2, 3).T, np.zeros((0, 3)), np.float64(2.5), np.int64(-3)]
    await call_and_record("ndarray_shapes", "echo_all", svc.echo_all(*shapes),
                          "echo_all(np.float32(1.5) 0-d scalar, 0-d int16 array, 3-D float32, transposed "
                          "(non-contiguous) int32 sent in C order, empty (0,3), np.float64(2.5) (a float "
                          "subclass: sent as a plain float), np.int64(-3) (0-d ndarray))",
                          "the values echoed back")

    # --- chunking -------------------------------------------------------------------
    payload = np.random.default_rng(99).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    p.mark()
    n = await svc.byte_len(payload)
    assert n == len(payload)
    await settle()
    get_bi = p.call("services.built-in.get_service", C)
    w.frame("chunk_builtin_get_call", get_bi,
            "before chunking, the sender fetches the receiver's built-in service (explicit promise)")
    w.frame("chunk_builtin_get_resolve", p.reply(get_bi),
            "the receiver's built-in service map: ping, get_service, message_cache.{create,append,set,process,"
            "remove} descriptors, config.api_version 3")
    create = p.call("services.built-in.message_cache.create", C)
    w.frame("chunk_create_call", create, "message_cache.create(key, False): chunked call, no parent")
    sets = sorted(p.all(lambda f: f.method == "services.built-in.message_cache.set" and f.src == C),
                  key=lambda f: f.seq)
    assert len(sets) == 2, len(sets)
    chunks = {}
    for fr in sets:
        _, extra, _ = gc.split_frame(fr.delivered)
        chunks[extra["args"][1]] = extra["args"][2]
    for i, fr in enumerate(sets):
        w.frame(f"chunk_set{i}_call", fr, f"message_cache.set(key, index, <bin chunk>, False), frame {i} of 2")
    process = p.call("services.built-in.message_cache.process", C)
    w.frame("chunk_process_call", process, "message_cache.process(key, False)")
    w.frame("chunk_process_resolve", p.reply(process), "resolve of process (null)")
    package = b"".join(chunks[i] for i in sorted(chunks))
    w.package("chunk_reassembled", package, C, P,
              "NOT a frame: the chunks concatenated, i.e. the package byte_len(<300000 bytes>) as the sender "
              "packed it (main without ws/user; the receiver overwrites from/to/ws/user from the process call)")
    main, _, _ = gc.split_frame(package, max_buffer_size=0)
    chunked_session = main["session"]
    w.frame("chunk_result_resolve", p.one(lambda f: f.method == chunked_session + ".resolve", "chunked resolve"),
            "resolve of the chunked call: 300000")

    p.mark()
    big = await svc.make_bytes(300_000)
    assert len(big) == 300_000
    await settle()
    create = p.call("services.built-in.message_cache.create", P)
    w.frame("chunk_reply_create_call", create,
            "a large RESULT is chunked by the callee: create(key=<caller session>, heartbeat=True)")
    w.frame("chunk_reply_process_call", p.call("services.built-in.message_cache.process", P),
            "process(key=<caller session>, heartbeat=True) for the chunked result")

    # --- callbacks --------------------------------------------------------------------
    def times_two(i):
        return i * 2

    p.mark()
    res = await svc.call_back(times_two, 2)
    assert res == [0, 2], res
    await settle()
    call = p.call(S + "call_back", C)
    w.frame("callback_call", call, "call_back(<session function times_two>, 2): a callback argument")
    inv = p.one(lambda f: f.src == P and f.method and f.method.startswith(call.session + ".")
                and "#times_two" in f.method, "callback invocation")
    w.frame("callback_invoke_call", inv, "the callee calls the callback: <caller session>.<id>#times_two(0), "
            "parent = caller session")
    w.frame("callback_invoke_resolve", p.reply(inv), "the callback's result (0) back to the callee")
    w.frame("callback_resolve", p.reply(call), "final result [0, 2]")

    # --- generators -------------------------------------------------------------------
    p.mark()
    g = await svc.gen(2)
    items = [x async for x in g]
    assert items == [0, 10], items
    await settle()
    call = p.call(S + "gen", C)
    w.frame("gen_call", call, "gen(2): a service returning a sync generator")
    res_f = p.reply(call)
    w.frame("gen_resolve", res_f, "the _rtype generator descriptor")
    _, extra, _ = gc.split_frame(res_f.delivered)
    next_m = extra["args"][0]["_rmethod"]
    nexts = p.all(lambda f: f.method == next_m)
    assert len(nexts) == 3, len(nexts)
    w.frame("gen_next_call", nexts[0], "next: a call to the generator's _rmethod with no args")
    w.frame("gen_next_resolve", p.reply(nexts[0]), "first item (0)")
    w.frame("gen_stop_resolve", p.reply(nexts[2]), "{_rtype: stop_iteration} ends the iteration")

    p.mark()
    g = await svc.agen(3)
    async for x in g:
        assert x == "item-0"
        break
    await g.aclose()
    await settle()
    call = p.call(S + "agen", C)
    res_f = p.reply(call)
    w.frame("agen_resolve", res_f, "agen(3): descriptor of an async generator")
    _, extra, _ = gc.split_frame(res_f.delivered)
    desc = extra["args"][0]
    nxt = p.call(desc["_rmethod"], C)
    w.frame("agen_next_resolve", p.reply(nxt), "first item 'item-0' (heartbeat precedes it: async method)")
    close = p.call(desc["_rclose_method"], C)
    w.frame("agen_close_call", close, "early exit: a call to _rclose_method")
    w.frame("agen_close_resolve", p.reply(close), "close returns true")

    # --- kwargs, async result with heartbeat -----------------------------------------------------
    res, _ = await call_and_record("kwargs", "add", svc.add(1, b=5), "add(1, b=5): args [1, {b: 5}], with_kwargs",
                                   "result 6")
    assert res == 6
    p.mark()
    await svc.async_echo("hb")
    await settle()
    call = p.call(S + "async_echo", C)
    hb = p.one(lambda f: f.method == call.session + ".heartbeat", "heartbeat")
    w.frame("heartbeat", hb, "single-segment heartbeat (async callee heartbeats immediately), parent = session")

    # --- errors ---------------------------------------------------------------------------------
    res, _ = await call_and_record("error_sync", "fail_sync", svc.fail_sync(), None,
                                   "reject from a sync function: _rvalue 'boom', _rtrace = traceback",
                                   reply="reject")
    assert "boom" in str(res)
    res, _ = await call_and_record("error_async", "fail_async", svc.fail_async(), None,
                                   "reject from an async function: _rvalue = formatted traceback",
                                   reply="reject")
    assert "async boom" in str(res)
    missing = cons._generate_remote_method({"_rtype": "method", "_rserver": gc.SERVER_URL,
                                            "_rtarget": f"{gc.WORKSPACE}/{P}", "_rmethod": S + "nope",
                                            "_rpromise": "*"})
    res, _ = await call_and_record("error_not_found", "nope", missing(), None,
                                   "reject: 'Method expired or not found: ...'", reply="reject")
    assert "Method expired or not found" in str(res), res

    # --- _rintf ---------------------------------------------------------------------------------
    def add_one(x):
        return x + 1

    obj = {"_rintf": True, "add_one": add_one, "label": "rintf object"}
    await call_and_record("rintf", "keep_rintf", svc.keep_rintf(obj),
                          "keep_rintf({_rintf: true, add_one: fn, label}): functions become "
                          "services._rintf_<id>.* descriptors, plus _dispose and _rintf_service_id",
                          "result 'kept'")
    assert obj.get("_rintf_service_id", "").startswith("_rintf_")
    p.mark()
    res = await svc.use_rintf(41)
    assert res == 42
    await settle()
    inv = p.one(lambda f: f.src == P and f.method and f.method.endswith(".add_one"), "rintf invoke")
    w.frame("rintf_invoke_call", inv, "after keep_rintf returned, the callee calls add_one(41) on the "
            "_rintf service (parent = the use_rintf call's session)")
    w.frame("rintf_invoke_resolve", p.reply(inv), "42 back to the callee")

    # --- custom codec ---------------------------------------------------------------------------
    res, _ = await call_and_record("custom", "echo", svc.echo(gc.Cell([1, 2.5, {"k": b"\x01"}], "cell-1")),
                                   "echo(Cell(...)): custom codec 'cell' -> {value, label, _rtype: 'cell'}",
                                   "the cell echoed back")
    assert isinstance(res, gc.Cell) and res.label == "cell-1"

    # --- a registered service function as a value ---------------------------------------------------
    await call_and_record("service_fn", "echo", svc.echo(double),
                          "echo(<cons's registered service function double>): a services.cons-tools.double "
                          "descriptor with _rasync and _rdoc",
                          "echoed back: the prov re-encodes the proxy as its original descriptor (forwarding)")
    p.mark()
    res = await svc.apply(double, 4)
    assert res == 8
    await settle()
    inv = p.call("services.cons-tools.double", P)
    w.frame("service_fn_invoke_call", inv, "the callee calls the passed service function: "
            "services.cons-tools.double(4), parent = caller session")
    w.frame("service_fn_invoke_resolve", p.reply(inv), "8")

    # --- memoryview -------------------------------------------------------------------------------
    await call_and_record("memoryview", "echo", svc.echo(memoryview(b"mv\x00data")),
                          "echo(memoryview(b'mv\\x00data')) -> _rtype memoryview", "the memoryview echoed back")

    await settle(50)
    if server.errors:
        raise RuntimeError("loopback errors:\n" + "\n".join(server.errors))

    meta = {
        "format_version": gc.FORMAT_VERSION,
        "generator": "tests/golden/generate.py",
        "hypha_rpc_version": __import__("hypha_rpc").__version__,
        "msgpack_version": ".".join(map(str, msgpack.version)),
        "numpy_version": np.__version__,
        "workspace": gc.WORKSPACE,
        "clients": {"provider": P, "consumer": C},
        "manager_id": gc.MANAGER_ID,
        "server_base_url": gc.SERVER_URL,
        "chunk_size": gc.CHUNK_SIZE,
        "seeded_ids": not args.random_ids,
        "total_frames_recorded": len(server.frames),
    }
    problems = verify_against_stock_decoder(w.entries, w.blobs)
    if problems:
        raise RuntimeError("manifest disagrees with the stock decoder:\n" + "\n".join(problems))
    w.write(meta)
    prov.close()
    cons.close()
    return w


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--random-ids", action="store_true", help="keep the stock random session/object ids")
    ap.add_argument("--verbose", action="store_true", help="let the RPC engines log")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    if not args.random_ids:
        install_seeded_ids()
    t0 = time.time()
    w = asyncio.run(run(args))
    total = sum(len(b) for b in w.blobs.values())
    print(f"wrote {len(w.entries)} fixtures ({total} bytes) to {FIXTURES} in {time.time() - t0:.2f} s")


if __name__ == "__main__":
    main()
