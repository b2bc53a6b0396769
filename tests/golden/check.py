#!/usr/bin/env python3
"""Check re-encoded golden frames with the stock Python client's decoder.

Usage:
    python tests/golden/check.py DIR [--require-all] [--client-main] [--fixtures FIXDIR] [-q]
        DIR holds files `<fixture name>.bin` (e.g. frames a Rust test re-encoded from the
        decoded fixtures). Each one is decoded the way the stock hypha-rpc client decodes
        a received package (main segment, then extra segment through `RPC._decode` with
        the ORIGINAL fixture's context: receiving client id, remote workspace, remote
        parent = the original `session`) and compared with the original fixture decoded
        the same way. Exit 0 only if every file matches (and, with --require-all, every
        fixture of the manifest has a file). A file whose name is not a fixture fails.
        --client-main compares main segments with the fixture's `sent_main` (what the
        sending client emitted, without the server's `ws`/`user`), for encoders that
        produce client-side frames; the package kind has no sent_main and is unaffected.
    python tests/golden/check.py --selftest [--fixtures FIXDIR]
        Compares every fixture with itself (must match), checks that re-packing the
        unpacked segments reproduces the exact bytes, and then compares every fixture
        with many deliberately altered copies (every leaf changed in turn, every map's
        last key removed, trailing garbage, dropped extra segment): each alteration must
        be reported as a mismatch. Exit 0 only if all of that holds.

Equality is type-strict (bool vs int vs float, str vs bytes, bytes vs memoryview) and
float-bit-exact (NaN equals NaN with the same bits, -0.0 differs from 0.0). Maps compare
by key set (order does not matter to the stock client). ndarrays compare dtype, shape
and data (the report says whether the values are still equal NaN-aware); remote
functions and generators compare by descriptor (`__rpc_object__`, target made absolute)
and remote parent; sets by content; errors by type and message; custom codec values by
codec and fields. Frames must hold exactly one or two msgpack maps and nothing after.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import struct
import sys

import msgpack

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import golden_common as gc  # noqa: E402


def load_manifest(fixdir):
    with open(os.path.join(fixdir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != gc.FORMAT_VERSION:
        raise SystemExit(f"manifest format_version {manifest.get('format_version')} != {gc.FORMAT_VERSION}")
    return {e["name"]: e for e in manifest["fixtures"]}


class Checker:
    def __init__(self, client_main=False):
        self.decoders = {}
        self.client_main = client_main

    def rpc(self, client_id):
        if client_id not in self.decoders:
            self.decoders[client_id] = gc.make_decoder_rpc(client_id)
        return self.decoders[client_id]

    def decoded(self, entry, data):
        """(canon main, canon extra or None) as the stock receiver sees the package."""
        max_buf = 0 if entry["kind"] == "package" else None
        main, extra, _ = gc.split_frame(data, max_buffer_size=max_buf)
        if extra is None:
            return gc.canon(main), None
        ctx = entry["decode"]
        value = self.rpc(ctx["receiver"])._decode(
            extra, remote_parent=ctx["remote_parent"], remote_workspace=ctx["remote_workspace"]
        )
        return gc.canon(main), gc.canon(value)

    def compare(self, entry, original: bytes, candidate: bytes):
        """Human-readable differences; empty when the candidate decodes the same."""
        want_main, want_extra = self.decoded(entry, original)
        if self.client_main and entry.get("sent_main") is not None:
            want_main = gc.tagged_to_canon(entry["sent_main"], original)
        try:
            got_main, got_extra = self.decoded(entry, candidate)
        except Exception as exc:  # noqa: BLE001
            return [f"cannot decode the re-encoded package: {exc!r}"]
        out = [f"main {x}" for x in gc.diff(want_main, got_main)]
        if (want_extra is None) != (got_extra is None):
            out.append(
                "extra segment "
                + ("missing" if got_extra is None else "present but the original has none")
            )
        elif want_extra is not None:
            out += [f"extra {x}" for x in gc.diff(want_extra, got_extra)]
        return out


# ----------------------------------------------------------------------------------
# Checking a directory
# ----------------------------------------------------------------------------------


def check_dir(args):
    entries = load_manifest(args.fixtures)
    checker = Checker(client_main=args.client_main)
    files = sorted(f for f in os.listdir(args.dir) if f.endswith(".bin"))
    if not files:
        print(f"FAIL: no .bin files in {args.dir}")
        return 1
    failed = 0
    seen = set()
    for fname in files:
        name = fname[: -len(".bin")]
        seen.add(name)
        entry = entries.get(name)
        if entry is None:
            print(f"FAIL {name}: not a fixture of the manifest")
            failed += 1
            continue
        with open(os.path.join(args.fixtures, entry["file"]), "rb") as f:
            original = f.read()
        with open(os.path.join(args.dir, fname), "rb") as f:
            candidate = f.read()
        problems = checker.compare(entry, original, candidate)
        if problems:
            failed += 1
            print(f"FAIL {name} ({entry['description']})")
            for line in problems:
                print(f"    {line}")
        elif not args.quiet:
            same = " (byte-identical)" if candidate == original else ""
            print(f"ok   {name}{same}")
    missing = sorted(set(entries) - seen)
    if missing:
        label = "FAIL missing" if args.require_all else "skipped (no file)"
        print(f"{label}: {', '.join(missing)}")
        if args.require_all:
            failed += len(missing)
    print(f"{len(files) - failed if failed <= len(files) else 0}/{len(files)} files match"
          + (f", {len(missing)} fixtures without a file" if missing else ""))
    return 1 if failed else 0


# ----------------------------------------------------------------------------------
# Self-test
# ----------------------------------------------------------------------------------


def _mutate_leaf(v):
    if v is None:
        return False
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1 if v < 2**64 - 1 else v - 1
    if isinstance(v, float):
        bits = bytearray(struct.pack(">d", v))
        bits[-1] ^= 1
        return struct.unpack(">d", bytes(bits))[0]
    if isinstance(v, str):
        return v + "!"
    if isinstance(v, bytes):
        return b"\x00" if not v else bytes([v[0] ^ 1]) + v[1:]
    if isinstance(v, list):
        assert not v
        return [0]
    if isinstance(v, dict):
        assert not v
        return {"x": 1}
    raise TypeError(type(v))


def _walk(v, path=()):
    """Yield ("leaf", path) for every leaf and empty container, ("map", path) for maps."""
    if isinstance(v, dict) and v:
        yield "map", path
        for k, x in v.items():
            yield from _walk(x, path + (k,))
    elif isinstance(v, list) and v:
        for i, x in enumerate(v):
            yield from _walk(x, path + (i,))
    else:
        yield "leaf", path


def _get_parent(root, path):
    node = root
    for p in path[:-1]:
        node = node[p]
    return node


def mutations(main, extra):
    """(label, package bytes) for every single deliberate alteration of a package."""
    segs = {"main": main, "extra": extra}
    for seg, value in segs.items():
        if value is None:
            continue
        for kind, path in _walk(value):
            new = {k: copy.deepcopy(v) for k, v in segs.items()}
            label = seg + "".join(f"[{p!r}]" for p in path)
            if kind == "leaf":
                if not path:
                    continue
                parent = _get_parent(new[seg], path)
                parent[path[-1]] = _mutate_leaf(parent[path[-1]])
                label += " changed"
            else:
                target = new[seg]
                for p in path:
                    target = target[p]
                last = list(target)[-1]
                del target[last]
                label += f" lost key {last!r}"
            data = msgpack.packb(new["main"]) + (b"" if new["extra"] is None else msgpack.packb(new["extra"]))
            yield label, data
    base = msgpack.packb(main) + (b"" if extra is None else msgpack.packb(extra))
    yield "trailing garbage byte", base + b"\xc0"
    if extra is not None:
        yield "extra segment dropped", msgpack.packb(main)


def selftest(args):
    entries = load_manifest(args.fixtures)
    checker = Checker()
    failures = []
    n_mut = n_det = 0
    for name, entry in entries.items():
        with open(os.path.join(args.fixtures, entry["file"]), "rb") as f:
            original = f.read()
        problems = checker.compare(entry, original, original)
        if problems:
            failures.append(f"{name}: differs from itself: {problems}")
            continue
        max_buf = 0 if entry["kind"] == "package" else None
        main, extra, _ = gc.split_frame(original, max_buffer_size=max_buf)
        repacked = msgpack.packb(main) + (b"" if extra is None else msgpack.packb(extra))
        if repacked != original:
            failures.append(f"{name}: re-packing the unpacked segments does not reproduce the bytes")
            continue
        undetected = []
        count = 0
        for label, data in mutations(main, extra):
            count += 1
            if not checker.compare(entry, original, data):
                undetected.append(label)
        n_mut += count
        n_det += count - len(undetected)
        if undetected:
            failures.append(f"{name}: {len(undetected)} of {count} alterations NOT detected: {undetected[:10]}")
        elif not args.quiet:
            print(f"ok   {name}: matches itself; {count}/{count} alterations detected")
    # One worked example of a failure report, so a reader sees what a diff looks like.
    demo = entries.get("ndarray_floats_call")
    if demo is not None and not args.quiet:
        with open(os.path.join(args.fixtures, demo["file"]), "rb") as f:
            original = f.read()
        main, extra, _ = gc.split_frame(original)
        extra["args"][1]["_rvalue"] = b"\x00" * len(extra["args"][1]["_rvalue"])
        extra["t"] = 15
        print("example report for an altered ndarray_floats_call:")
        for line in checker.compare(demo, original, msgpack.packb(main) + msgpack.packb(extra)):
            print(f"    {line}")
    for line in failures:
        print(f"FAIL {line}")
    print(f"selftest: {len(entries)} fixtures, {n_det}/{n_mut} alterations detected, "
          f"{len(failures)} failures")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description="Check re-encoded golden frames with the stock hypha-rpc decoder.")
    ap.add_argument("dir", nargs="?", help="directory with <fixture name>.bin files to check")
    ap.add_argument("--selftest", action="store_true", help="prove the comparison works (see module doc)")
    ap.add_argument("--fixtures", default=os.path.join(HERE, "fixtures"), help="fixture directory")
    ap.add_argument("--require-all", action="store_true", help="fail if a fixture has no file in DIR")
    ap.add_argument("--client-main", action="store_true",
                    help="compare main segments with the fixture's sent_main (as the client emitted it, "
                    "before the server added ws/user) instead of the delivered main")
    ap.add_argument("-q", "--quiet", action="store_true", help="print failures and the summary only")
    args = ap.parse_args()
    if args.selftest == bool(args.dir):
        ap.error("give either DIR or --selftest")
    sys.exit(selftest(args) if args.selftest else check_dir(args))


if __name__ == "__main__":
    main()
