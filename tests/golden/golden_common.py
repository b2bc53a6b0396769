"""Shared helpers for the golden fixtures (used by generate.py and check.py).

Three things live here:

* the fixed setup both scripts agree on (workspace, client ids, server URL, the custom
  codec class), so that check.py can rebuild a decoding context identical to the one
  the fixtures were recorded in;
* ``describe``: turns a *wire* value (what msgpack gives) into the tagged JSON format
  documented in README.md, applying the same rules the stock Python decoder applies
  (target resolution, `_rtype` dispatch, codec lookup);
* ``canon`` / ``tagged_to_canon`` / ``diff``: a type-strict canonical form of values
  *decoded by the stock client* (``RPC._decode``), used to compare two decodings and to
  cross-check that a tagged description says the same thing as the stock decoder.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import math
import struct
from collections import OrderedDict

import msgpack

# ----------------------------------------------------------------------------------
# Fixed setup
# ----------------------------------------------------------------------------------

WORKSPACE = "ws-golden"
PROVIDER = "prov"  # the peer that registers the `golden` service
CONSUMER = "cons"  # the peer that calls it
MANAGER_ID = "manager-golden"
SERVER_URL = "http://127.0.0.1:9527"
CHUNK_SIZE = 262144
FORMAT_VERSION = 1


def user_info(client_id: str) -> dict:
    """The `user` map the loopback server adds to each frame (shape of §1.3)."""
    return {
        "id": f"user-{client_id}",
        "roles": ["user"],
        "is_anonymous": False,
        "scope": {
            "current_workspace": WORKSPACE,
            "workspaces": {WORKSPACE: "rw"},
            "client_id": client_id,
            "extra_scopes": None,
        },
        "email": None,
        "parent": None,
        "expires_at": 1795239562.0,
        "current_workspace": None,
    }


class Cell:
    """A value with a custom codec named `cell` (registered on both peers)."""

    def __init__(self, value, label):
        self.value = value
        self.label = label

    def __repr__(self):
        return f"Cell({self.value!r}, {self.label!r})"


def cell_encoder(cell: Cell) -> dict:
    return {"value": cell.value, "label": cell.label}


def cell_decoder(encoded) -> Cell:
    return Cell(encoded["value"], encoded["label"])


CELL_CODEC = {"name": "cell", "type": Cell, "encoder": cell_encoder, "decoder": cell_decoder}
CODEC_NAMES = {"cell"}


def make_decoder_rpc(client_id: str):
    """An RPC engine with no connection, used only for its `_decode`.

    It has the same client id, workspace, server URL and codecs as the receiving peer
    had when the fixture was recorded.
    """
    from hypha_rpc.rpc import RPC

    rpc = RPC(
        None,
        client_id=client_id,
        workspace=WORKSPACE,
        default_context={"connection_type": "websocket"},
        silent=True,
        logger=None,
        server_base_url=SERVER_URL,
    )
    rpc.register_codec(dict(CELL_CODEC))
    return rpc


# ----------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------


class FrameError(Exception):
    pass


def split_frame(data: bytes, max_buffer_size: int | None = None):
    """Split a package into (main, extra_or_None, main_len) the way the client does.

    Unlike the client, trailing bytes after the second object are an error here: the
    client would silently ignore them, which would hide an encoder bug.
    """
    if max_buffer_size is None:
        max_buffer_size = max(512000, CHUNK_SIZE * 2)
    unpacker = msgpack.Unpacker(io.BytesIO(data), max_buffer_size=max_buffer_size)
    try:
        main = unpacker.unpack()
    except Exception as exc:  # noqa: BLE001
        raise FrameError(f"cannot decode main segment: {exc!r}") from exc
    main_len = unpacker.tell()
    if not isinstance(main, dict):
        raise FrameError(f"main segment is a {type(main).__name__}, not a map")
    extra = None
    if main_len < len(data):
        try:
            extra = unpacker.unpack()
        except msgpack.exceptions.OutOfData as exc:
            raise FrameError("truncated extra segment") from exc
        except Exception as exc:  # noqa: BLE001
            raise FrameError(f"cannot decode extra segment: {exc!r}") from exc
        if unpacker.tell() != len(data):
            raise FrameError(f"{len(data) - unpacker.tell()} trailing bytes after the extra segment")
        if not isinstance(extra, dict):
            raise FrameError(f"extra segment is a {type(extra).__name__}, not a map")
    return main, extra, main_len


# ----------------------------------------------------------------------------------
# Tagged JSON description of wire values
# ----------------------------------------------------------------------------------

MAX_SAFE_INT = 2**53 - 1
INLINE_BYTES_MAX = 4096


def resolve_target(target, remote_workspace):
    """The stock decoder's `_rtarget` rule (spec §4.1)."""
    if remote_workspace and isinstance(target, str) and "/" not in target:
        if remote_workspace != target:
            return remote_workspace + "/" + target
    return target


def _float_tag(x: float):
    if math.isnan(x):
        return {"$float": "nan"}
    if math.isinf(x):
        return {"$float": "inf" if x > 0 else "-inf"}
    return x


class Describer:
    """Wire value -> tagged JSON, with the decoding context of one package."""

    def __init__(self, frame: bytes, remote_workspace, remote_parent):
        self.frame = frame
        self.remote_workspace = remote_workspace
        self.remote_parent = remote_parent

    def bytes_tag(self, b: bytes):
        if len(b) <= INLINE_BYTES_MAX:
            return b.hex()
        off = self.frame.find(b)
        assert off >= 0 and self.frame.find(b, off + 1) == -1, "large bytes not unique in frame"
        return {"offset": off, "len": len(b), "sha256": hashlib.sha256(b).hexdigest()}

    def plain(self, v):
        """Describe without interpreting `_rtype` (main segment, descriptor fields)."""
        return self.value(v, interpret=False)

    def value(self, v, interpret=True):
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return {"$int": str(v)} if abs(v) > MAX_SAFE_INT else v
        if isinstance(v, float):
            return _float_tag(v)
        if isinstance(v, bytes):
            t = self.bytes_tag(v)
            return {"$bytes": t} if isinstance(t, str) else {"$bytes_at": t}
        if isinstance(v, (list, tuple)):
            return [self.value(x, interpret) for x in v]
        if isinstance(v, dict):
            if interpret and "_rtype" in v:
                return self.rtype(v)
            out = {k: self.value(x, interpret) for k, x in v.items()}
            if len(out) == 1 and next(iter(out)).startswith("$"):
                return {"$map": out}
            return out
        raise TypeError(f"unexpected wire type {type(v)}")

    def descriptor(self, v):
        d = {k: self.value(x) for k, x in v.items() if k != "_rtype"}
        if "_rtarget" in d:
            d["_rtarget"] = resolve_target(d["_rtarget"], self.remote_workspace)
        return {"descriptor": d, "remote_parent": self.remote_parent}

    def rtype(self, v):
        rt = v["_rtype"]
        if rt in CODEC_NAMES:
            fields = {k: self.value(x) for k, x in v.items() if k != "_rtype"}
            return {"$custom": {"codec": rt, "fields": fields}}
        if rt == "method":
            return {"$method": self.descriptor(v)}
        if rt == "generator":
            return {"$generator": self.descriptor(v)}
        if rt == "ndarray":
            return {
                "$ndarray": {
                    "dtype": v["_rdtype"],
                    "shape": list(v["_rshape"]),
                    "hex": bytes(v["_rvalue"]).hex(),
                }
            }
        if rt == "typedarray":
            return {"$typedarray": {"dtype": v["_rdtype"], "hex": bytes(v["_rvalue"]).hex()}}
        if rt == "memoryview":
            return {"$memoryview": bytes(v["_rvalue"]).hex()}
        if rt == "set":
            return {"$set": [self.value(x) for x in v["_rvalue"]]}
        if rt == "orderedmap":
            return {"$orderedmap": [[self.value(k), self.value(x)] for k, x in v["_rvalue"]]}
        if rt == "error":
            return {"$error": {"message": v["_rvalue"], "trace": v.get("_rtrace") or None}}
        # Unknown `_rtype` (e.g. stop_iteration): a plain map that keeps its `_rtype`.
        return {k: self.value(x) for k, x in v.items()}


def decode_context(main: dict):
    """(remote_workspace, remote_parent) as `_handle_method` derives them."""
    frm = main.get("from") or ""
    return frm.split("/")[0] if "/" in frm else None, main.get("session")


# ----------------------------------------------------------------------------------
# Canonical form of stock-decoded values, and comparison
# ----------------------------------------------------------------------------------


def _fbits(x: float) -> str:
    return struct.pack(">d", x).hex()


def canon(obj):
    """A type-strict, order-independent-for-maps canonical form of a decoded value."""
    import numpy as np
    from hypha_rpc.rpc import RemoteFunction

    if obj is None:
        return ("nil",)
    if isinstance(obj, bool):
        return ("bool", obj)
    if isinstance(obj, int) and not isinstance(obj, bool):
        return ("int", int(obj))
    if isinstance(obj, float):
        return ("float", _fbits(obj))
    if isinstance(obj, str):
        return ("str", obj)
    if isinstance(obj, bytes):
        return ("bytes", obj)
    if isinstance(obj, memoryview):
        return ("memoryview", obj.tobytes())
    if isinstance(obj, np.ndarray):
        return ("ndarray", str(obj.dtype), tuple(obj.shape), obj.tobytes())
    if isinstance(obj, RemoteFunction):
        return ("method", canon(dict(obj.__rpc_object__)), canon(obj._remote_parent))
    if inspect.isasyncgen(obj) and obj.ag_code.co_name == "async_generator_proxy":
        loc = obj.ag_frame.f_locals
        gen = loc["gen_method"]
        return ("generator", canon(dict(gen.__rpc_object__)), canon(gen._remote_parent))
    if isinstance(obj, BaseException):
        return ("error", type(obj).__name__, str(obj))
    if isinstance(obj, Cell):
        return ("custom", "cell", canon({"value": obj.value, "label": obj.label}))
    if isinstance(obj, (set, frozenset)):
        return ("set", tuple(sorted((canon(x) for x in obj), key=repr)))
    if isinstance(obj, OrderedDict):
        return ("orderedmap", tuple((canon(k), canon(v)) for k, v in obj.items()))
    if isinstance(obj, dict):
        return ("map", {k: canon(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return ("list", tuple(canon(x) for x in obj))
    return ("other", type(obj).__name__, repr(obj))


def tagged_to_canon(t, frame: bytes):
    """The canonical form a tagged description predicts for the stock decoder."""
    if t is None:
        return ("nil",)
    if isinstance(t, bool):
        return ("bool", t)
    if isinstance(t, int):
        return ("int", t)
    if isinstance(t, float):
        return ("float", _fbits(t))
    if isinstance(t, str):
        return ("str", t)
    if isinstance(t, list):
        return ("list", tuple(tagged_to_canon(x, frame) for x in t))
    assert isinstance(t, dict)
    if len(t) == 1:
        (tag, body), = t.items()
        if tag == "$int":
            return ("int", int(body))
        if tag == "$float":
            return ("float", _fbits(float(body)))
        if tag == "$bytes":
            return ("bytes", bytes.fromhex(body))
        if tag == "$bytes_at":
            return ("bytes", frame[body["offset"] : body["offset"] + body["len"]])
        if tag == "$map":
            return ("map", {k: tagged_to_canon(v, frame) for k, v in body.items()})
        if tag == "$ndarray":
            return ("ndarray", body["dtype"], tuple(body["shape"]), bytes.fromhex(body["hex"]))
        if tag == "$memoryview":
            return ("memoryview", bytes.fromhex(body))
        if tag == "$set":
            return ("set", tuple(sorted((tagged_to_canon(x, frame) for x in body), key=repr)))
        if tag == "$orderedmap":
            return ("orderedmap", tuple((tagged_to_canon(k, frame), tagged_to_canon(v, frame)) for k, v in body))
        if tag == "$error":
            text = "RemoteError:" + body["message"] + "\n" + (body["trace"] or "")
            return ("error", "RemoteException", text)
        if tag in ("$method", "$generator"):
            d = {"_rtype": tag[1:], **body["descriptor"]}
            return (tag[1:], tagged_to_canon(d, frame), tagged_to_canon(body["remote_parent"], frame))
        if tag == "$custom":
            return ("custom", body["codec"], ("map", {k: tagged_to_canon(v, frame) for k, v in body["fields"].items()}))
        if tag == "$typedarray":
            return ("ndarray", body["dtype"], (len(bytes.fromhex(body["hex"])),), bytes.fromhex(body["hex"]))
        if tag.startswith("$"):
            raise ValueError(f"unknown tag {tag}")
    return ("map", {k: tagged_to_canon(v, frame) for k, v in t.items()})


def _short(c, limit=120):
    s = repr(c)
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"


def diff(a, b, path="$", out=None, limit=20):
    """Differences between two canonical forms, as human-readable lines."""
    if out is None:
        out = []
    if len(out) >= limit:
        return out
    if a == b:
        return out
    ka, kb = a[0], b[0]
    if ka != kb:
        out.append(f"{path}: kind {ka} != {kb} ({_short(a)} vs {_short(b)})")
        return out
    if ka == "map":
        ma, mb = a[1], b[1]
        for k in ma.keys() - mb.keys():
            out.append(f"{path}.{k}: missing in re-encoded (expected {_short(ma[k])})")
        for k in mb.keys() - ma.keys():
            out.append(f"{path}.{k}: unexpected in re-encoded ({_short(mb[k])})")
        for k in ma.keys() & mb.keys():
            diff(ma[k], mb[k], f"{path}.{k}", out, limit)
        return out
    if ka == "list":
        la, lb = a[1], b[1]
        if len(la) != len(lb):
            out.append(f"{path}: list length {len(la)} != {len(lb)}")
        for i, (x, y) in enumerate(zip(la, lb)):
            diff(x, y, f"{path}[{i}]", out, limit)
        return out
    if ka == "ndarray":
        import numpy as np

        _, da, sa, ba = a
        _, db, sb, bb = b
        if da != db:
            out.append(f"{path}: ndarray dtype {da} != {db}")
        elif sa != sb:
            out.append(f"{path}: ndarray shape {sa} != {sb}")
        else:
            try:
                xa = np.frombuffer(ba, dtype=da).reshape(sa)
                xb = np.frombuffer(bb, dtype=db).reshape(sb)
                nan_ok = xa.dtype.kind in "fc"
                same_vals = np.array_equal(xa, xb, equal_nan=nan_ok)
            except Exception as exc:  # noqa: BLE001
                same_vals = f"not comparable: {exc!r}"
            out.append(
                f"{path}: ndarray {da}{list(sa)} data differs "
                f"(values equal, NaN-aware: {same_vals}; bytes {_short(ba, 60)} vs {_short(bb, 60)})"
            )
        return out
    if ka in ("method", "generator", "custom", "orderedmap", "set"):
        n0 = len(out)
        if ka in ("method", "generator"):
            diff(a[1], b[1], f"{path}<{ka} descriptor>", out, limit)
            diff(a[2], b[2], f"{path}<{ka} remote_parent>", out, limit)
        elif ka == "custom":
            if a[1] != b[1]:
                out.append(f"{path}: codec {a[1]} != {b[1]}")
            diff(a[2], b[2], f"{path}<cell>", out, limit)
        else:
            out.append(f"{path}: {ka} differs: {_short(a[1])} vs {_short(b[1])}")
        if len(out) == n0:
            out.append(f"{path}: {ka} differs")
        return out
    out.append(f"{path}: {_short(a)} != {_short(b)}")
    return out
