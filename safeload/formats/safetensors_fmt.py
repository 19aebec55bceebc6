"""safetensors: an 8-byte little-endian header length, a JSON header, then raw tensor bytes. No pickle.

The header is validated the way the safetensors library validates it before it hands out a tensor:
at most 100,000,000 bytes of UTF-8 JSON starting with ``{``; an optional ``__metadata__`` mapping
of strings to strings; every other key a tensor with a known ``dtype``, a ``shape`` of non-negative
ints and ``data_offsets`` [begin, end] whose length is exactly shape x dtype size; sorted by offset the
tensors tile the data area from 0 to its end with no gap and no overlap. On top of that, a JSON key
that appears twice is refused (two JSON parsers may keep different copies).

A valid file gives one SL400 (info, "no pickle") and is clean; an invalid header gives SL205.
Meta for the loader, ``meta["safetensors"]``: ``header_length``, ``data_offset`` (absolute start of the
data area inside this buffer), ``metadata`` (the ``__metadata__`` dict or None) and ``tensors``: name ->
{``dtype``, ``shape``, ``data_offsets``}. ``storages`` maps each tensor name to its bytes (zero-copy).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from safeload.formats.base import ReadContext, ReadResult, StorageEntry
from safeload.model import make_finding

NAME = "safetensors"

MAX_HEADER = 100_000_000
# Bits per element. Sub-byte types must fill whole bytes.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
_U64 = 1 << 64


class HeaderError(Exception):
    """A header the safetensors library would refuse (kept inside this module)."""


def sniff(buf: memoryview) -> bool:
    if len(buf) < 10:
        return False
    (n,) = struct.unpack_from("<Q", buf, 0)
    return 2 <= n <= len(buf) - 8 and buf[8] == ord("{")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"key {key!r} appears twice in the header"[:200])
        out[key] = value
    return out


def _refuse_constant(name: str) -> None:
    raise HeaderError(f"{name} is not JSON")


def _is_u64(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < _U64


def parse_header(buf: memoryview) -> tuple[int, dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(header length, __metadata__, tensors) of a valid file; HeaderError otherwise."""
    if len(buf) < 8:
        raise HeaderError("shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > MAX_HEADER:
        raise HeaderError(f"header length {n} is above the library's limit {MAX_HEADER}")
    if 8 + n > len(buf):
        raise HeaderError(f"header length {n} runs past the end of the file ({len(buf)} bytes)")
    raw = bytes(buf[8 : 8 + n])
    if not raw.startswith(b"{"):
        raise HeaderError("header does not start with '{'")
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HeaderError(f"header is not valid UTF-8 JSON: {exc}"[:300]) from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise HeaderError("__metadata__ is not a mapping of strings to strings")
    tensors: dict[str, dict[str, Any]] = {}
    for name, info in header.items():
        tensors[name] = _tensor(name, info)
    _check_tiling(tensors, len(buf) - 8 - n)
    return n, metadata, tensors


def _tensor(name: str, info: object) -> dict[str, Any]:
    if not isinstance(info, dict):
        raise HeaderError(f"tensor {name!r} is not an object"[:200])
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise HeaderError(f"tensor {name!r} has unknown dtype {dtype!r}"[:200])
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise HeaderError(f"tensor {name!r} shape is not a list of non-negative ints"[:200])
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)):
        raise HeaderError(f"tensor {name!r} data_offsets is not [begin, end]"[:200])
    begin, end = offsets
    elements = 1
    for d in shape:
        # Stop at the first overflow, as the library's checked multiplication does; a long shape
        # list of huge numbers would otherwise make an enormous integer.
        elements *= d
        if elements >= _U64:
            raise HeaderError(f"tensor {name!r} shape overflows"[:200])
    bits = elements * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 >= _U64:
        raise HeaderError(f"tensor {name!r} does not fill whole bytes or overflows"[:200])
    if end < begin or end - begin != bits // 8:
        raise HeaderError(
            f"tensor {name!r}: data_offsets {offsets} do not hold shape {shape} of {dtype}"[:200]
        )
    return {"dtype": dtype, "shape": tuple(shape), "data_offsets": (begin, end)}


def _check_tiling(tensors: dict[str, dict[str, Any]], data_len: int) -> None:
    pos = 0
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, end = info["data_offsets"]
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
            raise HeaderError(f"tensor {name!r} at offset {begin} {what}"[:200])
        pos = end
    if pos != data_len:
        raise HeaderError(f"tensors cover {pos} bytes but the data area holds {data_len}")


def read(buf: memoryview, ctx: ReadContext) -> ReadResult:
    result = ReadResult(format=NAME)
    try:
        n, metadata, tensors = parse_header(buf)
    except HeaderError as exc:
        result.findings.append(
            make_finding(
                "SL205", f"invalid safetensors header: {exc}", member=ctx.member, file_offset=ctx.file_offset
            )
        )
        return result
    start = 8 + n
    for name, info in tensors.items():
        begin, end = info["data_offsets"]
        result.storages[name] = StorageEntry(
            key=name,
            data=buf[start + begin : start + end],
            file_offset=None if ctx.file_offset is None else ctx.file_offset + start + begin,
        )
    result.meta["safetensors"] = {
        "header_length": n,
        "data_offset": start,
        "metadata": metadata,
        "tensors": tensors,
    }
    result.findings.append(
        make_finding("SL400", f"safetensors file with {len(tensors)} tensors: no pickle", member=ctx.member)
    )
    return result
