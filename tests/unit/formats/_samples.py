"""Shared helpers for the numpy/joblib/compression/archive/safetensors reader tests."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import struct
import tarfile

import numpy as np

from safeload.formats.base import Budget, ReadContext, ReadResult
from safeload.limits import Limits


def make_ctx(
    limits: Limits | None = None,
    *,
    member: str | None = None,
    file_offset: int | None = 0,
    encoding: tuple[str, ...] = (),
) -> ReadContext:
    limits = limits or Limits()
    return ReadContext(
        path="<test>",
        member=member,
        file_offset=file_offset,
        depth=0,
        limits=limits,
        budget=Budget(limits.max_decompressed_bytes),
        encoding=encoding,
    )


def codes(result: ReadResult) -> list[str]:
    return [f.code for f in result.findings]


def imports(stream_bytes: bytes | memoryview) -> list[str]:
    """Names a plain pickle imports, decoded by pickletools (it never runs anything).

    STACK_GLOBAL operands are followed through string pushes and the memo, which is all that
    real writers produce; it is a test oracle, not the scanner.
    """
    found: list[str] = []
    pushed: list[object] = []
    memo: dict[int, object] = {}
    for op, arg, _ in pickletools.genops(bytes(stream_bytes)):
        if op.name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.append(f"{pushed[-2]}.{pushed[-1]}")
        if op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg)))
        elif "UNICODE" in op.name or "STRING" in op.name:
            pushed.append(arg)
        elif op.name not in ("PROTO", "FRAME"):
            pushed.append(None)
    return found


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype.hasobject)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file written by hand per the format's spec (the package is not installed)."""
    names = {
        np.dtype("float32"): "F32",
        np.dtype("int64"): "I64",
        np.dtype("uint8"): "U8",
        np.dtype("float16"): "F16",
    }
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    blobs, offset = [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": names[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def foreign_samples() -> dict[str, bytes]:
    """Real files of other formats, for "this sniff does not claim them" checks."""
    import bz2
    import gzip
    import lzma

    obj = {"w": [1.0, 2.0], "name": "model"}
    samples = {f"pickle-p{p}": pickle.dumps(obj, protocol=p) for p in range(6)}
    samples["npy"] = npy_bytes(np.arange(12, dtype=np.float32))
    samples["gzip"] = gzip.compress(pickle.dumps(obj))
    samples["bz2"] = bz2.compress(pickle.dumps(obj))
    samples["xz"] = lzma.compress(pickle.dumps(obj))
    samples["tar"] = tar_bytes({"a.pkl": pickle.dumps(obj)})
    samples["safetensors"] = safetensors_bytes({"w": np.arange(4, dtype=np.float32)})
    samples["text"] = b"just some text, not a model\n" * 20
    samples["empty"] = b""
    return samples
