"""Fuzz the scanner and the loader with mutated real files; keep every input that kills the process.

    python scripts/fuzz_loader.py --seconds 600 --out fuzz-out
    python scripts/fuzz_loader.py --kinds numpy-objects,torch-zip --mode ops --seconds 3600
    python scripts/fuzz_loader.py --loader stock --kinds numpy-objects,npy-record --seconds 600

A search, not a test: it runs until its time is up and prints what it found. Each batch of inputs
runs in a child process that writes every input to ``OUT/last-<kind>.bin`` before it scans it
(and, when the scan says SAFE, loads it). A child that dies by a signal leaves that input behind,
copied to ``OUT/crash-<kind>-<seed>.bin``. Exceptions from the loader are fine (a refusal); a
crash is a finding, and so is an input on which safeload writes anything but a Python warning to
stderr (kept as ``OUT/stderr-<kind>-<mode>-<seed>-<n>.bin``): CPython printing an error from deep inside a scan reads, to
a user, as a crash of safeload (one such input was a BYTEARRAY8 too large for the capped replay).

``--loader stock`` loads what scans SAFE with the library's own loader instead of safeload's
(``pickle.loads``, ``numpy.load(allow_pickle=True)``, ``torch.load(weights_only=False)``): a crash
there is a file the scan calls SAFE that crashes the loader people use it for, a gap in the scan
(safeload's loader checks more than the scan can see; SECURITY.md says what).

Mutations:
- ``flip``: one to four bytes of the file XORed with random values;
- ``ops``: the file's pickle (data.pkl of a torch archive, the object pickle of a legacy file)
  re-encoded opcode by opcode after one to three changes: a memo index, an integer, a string
  from a list of dtype codes and field names, a span of opcodes duplicated, dropped or copied
  elsewhere. Most of the inputs stay parseable, so about half of them reach the loader.

Every crash found so far (numpy dtype and array states) became a regression test.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import pickletools
import random
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
Op = tuple[Any, Any]  # (pickletools.OpcodeInfo, argument)

_INTS = [0, 1, 2, 3, 4, 7, 8, 16, 63, 255, -1, 2**31 - 1, 1000]
_STRS = ["O", "O8", "f4", "f8", "V8", "V16", "M8", "m8", "U3", "S2", "i8", "|", "<", ">", "b", "x", "y", "?"]


# -- samples: real files written by the real libraries --------------------------------------------


def samples() -> dict[str, bytes]:
    import numpy as np
    import torch

    base = torch.arange(24.0).reshape(4, 6)
    tensors = {
        "view": base[1:, ::2],
        "t": base.t(),
        "p": torch.nn.Parameter(torch.ones(3)),
        "i8": torch.arange(5, dtype=torch.int8),
        "empty": torch.zeros(0, 3),
        "shared": base,
        "meta": {"epoch": 3, "lr": [0.1, 0.01]},
    }
    out: dict[str, bytes] = {}
    buf = io.BytesIO()
    torch.save(tensors, buf)
    out["torch-zip"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save(tensors, buf, _use_new_zipfile_serialization=False)
    out["torch-legacy"] = buf.getvalue()
    record = np.dtype([("x", "<f4", (2,)), ("y", "O"), ("z", "M8[s]")])
    aligned = np.dtype([("a", "i1"), ("b", "<i8", (2, 2))], align=True)
    objects = [np.zeros(2, record), record, np.ones(2, aligned), np.arange(6).reshape(2, 3).T]
    objects += [np.array(["ab", "c"]), np.float64(2.5), np.array([{"k": 1}, None], dtype=object)]
    out["numpy-objects"] = pickle.dumps(objects, protocol=2)
    buf = io.BytesIO()
    np.save(
        buf, np.array([(1, {"k": 2}, 2.5)], dtype=[("a", "i4"), ("b", "O"), ("c", "f8")]), allow_pickle=True
    )
    out["npy-record"] = buf.getvalue()
    return out


# -- the pickle inside each kind, and how to put a changed one back -------------------------------


def _pickle_of(kind: str, raw: bytes) -> tuple[bytes, Callable[[bytes], bytes]] | None:
    if kind == "torch-zip":
        archive = zipfile.ZipFile(io.BytesIO(raw))
        members = {name: archive.read(name) for name in archive.namelist()}
        pkl = next(name for name in members if name.endswith("/data.pkl"))

        def rezip(data: bytes) -> bytes:
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
                for name, body in members.items():
                    z.writestr(name, data if name == pkl else body)
            return out.getvalue()

        return members[pkl], rezip
    if kind == "torch-legacy":
        parts, pos = [], 0
        for _ in range(5):  # magic, protocol, sys_info, the object, storage keys
            end = pos
            for op, _arg, at in pickletools.genops(raw[pos:]):
                end = pos + at + 1
                if op.name == "STOP":
                    break
            parts.append(raw[pos:end])
            pos = end
        head, tail = b"".join(parts[:3]), parts[4] + raw[pos:]
        return parts[3], lambda data: head + data + tail
    if kind == "numpy-objects":
        return raw, lambda data: data
    return None  # no pickle at a fixed place: byte flips only


def _encode(op: Any, arg: Any) -> bytes:
    code, name = op.code.encode("latin-1"), op.name
    if arg is None:
        return code
    if name == "PROTO":
        return code + bytes([arg])
    if name in ("GLOBAL", "INST"):
        module, _, attr = arg.partition(" ")
        return code + module.encode() + b"\n" + attr.encode() + b"\n"
    if name in ("BINPUT", "BINGET", "BININT1"):
        return code + bytes([arg & 0xFF])
    if name in ("LONG_BINPUT", "LONG_BINGET"):
        return code + struct.pack("<I", arg & 0xFFFFFFFF)
    if name == "BININT2":
        return code + struct.pack("<H", arg & 0xFFFF)
    if name == "BININT":
        return code + struct.pack("<i", max(-(2**31), min(2**31 - 1, arg)))
    if name == "BINFLOAT":
        return code + struct.pack(">d", arg)
    if name in ("BINUNICODE", "SHORT_BINUNICODE", "BINBYTES", "SHORT_BINBYTES"):
        data = arg.encode("utf-8", "surrogatepass") if isinstance(arg, str) else bytes(arg)
        if name.startswith("SHORT_"):
            data = data[:255]
            return code + bytes([len(data)]) + data
        return code + struct.pack("<I", len(data)) + data
    if name == "LONG1":
        data = arg.to_bytes((arg.bit_length() + 8) // 8, "little", signed=True) if arg else b""
        return code + bytes([len(data)]) + data
    raise KeyError(name)


def _mutate_ops(ops: list[Op], rng: random.Random) -> list[Op]:
    ops = list(ops)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(ops))
        op, _arg = ops[i]
        roll = rng.random()
        if roll < 0.3 and op.name in ("BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT"):
            ops[i] = (op, rng.randrange(60))
        elif roll < 0.5 and op.name in ("BININT1", "BININT2", "BININT"):
            ops[i] = (op, rng.choice(_INTS if op.name == "BININT" else [n for n in _INTS if 0 <= n < 256]))
        elif roll < 0.6 and op.name in ("BINUNICODE", "SHORT_BINUNICODE"):
            ops[i] = (op, rng.choice(_STRS))
        elif roll < 0.75:
            j = min(len(ops) - 1, i + rng.randint(1, 12))
            ops[j:j] = ops[i:j]
        elif roll < 0.85:
            del ops[i : min(len(ops) - 1, i + rng.randint(1, 3))]
        else:
            span = ops[i : min(len(ops) - 1, i + rng.randint(1, 10))]
            at = rng.randrange(len(ops))
            ops[at:at] = span
    return ops


def mutants(kind: str, raw: bytes, mode: str, rng: random.Random) -> Callable[[], bytes | None]:
    found = _pickle_of(kind, raw) if mode == "ops" else None
    if found is None:

        def flip() -> bytes:
            data = bytearray(raw)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= rng.randint(1, 255)
            return bytes(data)

        return flip
    stream, put_back = found
    ops = [(op, arg) for op, arg, _ in pickletools.genops(stream) if op.name != "FRAME"]

    def change() -> bytes | None:
        try:
            return put_back(b"".join(_encode(op, arg) for op, arg in _mutate_ops(ops, rng)))
        except (KeyError, ValueError, OverflowError, struct.error, UnicodeEncodeError):
            return None

    return change


# -- one batch, in a child process ----------------------------------------------------------------


def _stock_load(kind: str, data: bytes) -> None:
    """The loader a file of this kind is made for, with nothing of safeload's: only for inputs the
    scan called SAFE (every global they name is allowed)."""
    if kind == "numpy-objects":
        pickle.loads(data)  # noqa: S301 - the point: does a file the scan calls SAFE crash it?
    elif kind == "npy-record":
        import numpy as np

        np.load(io.BytesIO(data), allow_pickle=True)
    else:
        import torch

        torch.load(io.BytesIO(data), weights_only=False)


def child(kind: str, mode: str, seed: int, count: int, out: Path, loader: str) -> None:
    import safeload
    from safeload.errors import SafeloadError
    from safeload.model import Verdict

    raw = samples()[kind]
    make = mutants(kind, raw, mode, random.Random(seed))
    last = out / f"last-{kind}.bin"
    # Whatever reaches fd 2 (CPython's own prints included, and those of forked replay processes)
    # lands in this file; an input after which safeload has made it grow is kept. Python warnings
    # are left out: a caller filters those (numpy warns of dtype arguments it will refuse one day).
    warnings.simplefilter("ignore")
    stderr = (out / "child-stderr.log").open("w+b")
    os.dup2(stderr.fileno(), 2)
    for n in range(count):
        data = make()
        if data is None:
            continue
        last.write_bytes(data)
        written = os.fstat(2).st_size
        safe = safeload.scan_bytes(data).verdict is Verdict.SAFE
        if safe and loader == "safeload":
            for framework in ("auto", "numpy"):
                try:
                    safeload.loads(data, framework=framework)
                except SafeloadError:
                    pass
        if os.fstat(2).st_size != written:
            kept = out / f"stderr-{kind}-{mode}-{seed}-{n}.bin"
            kept.write_bytes(data)
            print(f"STDERR: {kind} {mode} seed {seed}: {kept}", flush=True)
        if safe and loader == "stock":
            try:
                _stock_load(kind, data)
            except Exception:  # noqa: BLE001, S110 - only a crash of the process is a finding
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="all", help="comma-separated sample names, or all")
    ap.add_argument("--mode", choices=["flip", "ops", "both"], default="both")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--batch", type=int, default=300, help="inputs per child process")
    ap.add_argument("--seed", type=int, default=1, help="first seed (one per batch)")
    ap.add_argument("--out", type=Path, default=Path("fuzz-out"))
    ap.add_argument(
        "--loader",
        choices=["safeload", "stock"],
        default="safeload",
        help="what loads the inputs the scan calls SAFE: safeload's loader, or the library's own (scan gaps)",
    )
    ap.add_argument("--child", nargs=4, metavar=("KIND", "MODE", "SEED", "COUNT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        kind, mode, seed, count = args.child
        child(kind, mode, int(seed), int(count), args.out, args.loader)
        return 0
    kinds = list(samples()) if args.kinds == "all" else args.kinds.split(",")
    modes = ["flip", "ops"] if args.mode == "both" else [args.mode]
    deadline, seed, batches, crashes, noisy = time.monotonic() + args.seconds, args.seed, 0, 0, 0
    while time.monotonic() < deadline:
        for kind in kinds:
            for mode in modes:
                cmd = [
                    sys.executable,
                    __file__,
                    "--out",
                    str(args.out),
                    "--loader",
                    args.loader,
                    "--child",
                    kind,
                    mode,
                    str(seed),
                    str(args.batch),
                ]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                batches += 1
                for line in proc.stdout.splitlines():
                    if line.startswith("STDERR"):
                        noisy += 1
                        print(line, flush=True)
                if proc.returncode < 0:  # killed by a signal: the input it was on is the finding
                    crashes += 1
                    kept = args.out / f"crash-{kind}-{mode}-{seed}.bin"
                    shutil.copy(args.out / f"last-{kind}.bin", kept)
                    print(f"CRASH (signal {-proc.returncode}): {kind} {mode} seed {seed}: {kept}", flush=True)
                elif proc.returncode != 0:
                    print(
                        f"error in batch {kind} {mode} seed {seed}: {proc.stderr.strip()[-300:]}", flush=True
                    )
        seed += 1
    print(
        f"{batches} batches of {args.batch} inputs, seeds {args.seed}-{seed - 1}: {crashes} crashes, "
        f"{noisy} inputs that made safeload write to stderr"
    )
    return 1 if crashes or noisy else 0


if __name__ == "__main__":
    sys.exit(main())
