"""safetensors: files written by hand per the spec (the package is not installed), valid and not."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest

from safeload.formats import safetensors_fmt
from tests.unit.formats._samples import codes, foreign_samples, make_ctx, safetensors_bytes

TENSORS = {
    "embed.weight": np.arange(24, dtype=np.float32).reshape(4, 6),
    "embed.bias": np.arange(6, dtype=np.float16),
    "step": np.array(7, dtype=np.int64),
    "mask": np.zeros((0, 3), dtype=np.uint8),
}


def with_header(header: dict[str, object] | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def test_valid_file_is_clean_and_indexed() -> None:
    data = safetensors_bytes(TENSORS, metadata={"format": "pt"})
    buf = memoryview(data)
    assert safetensors_fmt.sniff(buf)
    result = safetensors_fmt.read(buf, make_ctx(file_offset=0))
    assert result.format == "safetensors"
    assert codes(result) == ["SL400"]
    assert result.findings[0].effect.value == "none"
    assert result.streams == [] and result.children == []
    meta = result.meta["safetensors"]
    assert meta["metadata"] == {"format": "pt"}
    assert set(meta["tensors"]) == set(TENSORS)
    for name, array in TENSORS.items():
        storage = result.storages[name]
        assert bytes(storage.data) == array.tobytes()
        assert storage.data.obj is buf.obj
        assert storage.file_offset == meta["data_offset"] + meta["tensors"][name]["data_offsets"][0]
        assert meta["tensors"][name]["shape"] == array.shape


def test_empty_file_from_the_spec_is_valid() -> None:
    # The library's own serialization of no tensors: "{}" padded with spaces to 8 bytes.
    data = struct.pack("<Q", 8) + b"{}      "
    assert codes(safetensors_fmt.read(memoryview(data), make_ctx())) == ["SL400"]


def test_sub_byte_and_new_dtypes() -> None:
    header = {
        "a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]},
        "b": {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [2, 4]},
        "c": {"dtype": "C64", "shape": [1], "data_offsets": [4, 12]},
    }
    assert codes(safetensors_fmt.read(memoryview(with_header(header, bytes(12))), make_ctx())) == ["SL400"]


def _one(dtype: str = "F32", shape: list[object] | None = None, offsets: list[object] | None = None) -> dict:
    return {
        "dtype": dtype,
        "shape": [2] if shape is None else shape,
        "data_offsets": [0, 8] if offsets is None else offsets,
    }


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (with_header({"t": _one()}, bytes(7)), "data area shorter than the tensors"),
        (with_header({"t": _one()}, bytes(9)), "data area longer than the tensors"),
        (with_header({"t": _one(offsets=[0, 4])}, bytes(4)), "length does not match shape"),
        (with_header({"t": _one(dtype="F128")}, bytes(8)), "unknown dtype"),
        (with_header({"t": _one(shape=[-2])}, bytes(8)), "negative dimension"),
        (with_header({"t": _one(shape=[2.0])}, bytes(8)), "float dimension"),
        (with_header({"t": _one(offsets=[8, 0])}, bytes(8)), "end before begin"),
        (with_header({"t": _one(offsets=[0, 8, 9])}, bytes(8)), "three offsets"),
        (
            with_header({"a": _one(), "b": _one(offsets=[4, 12])}, bytes(12)),
            "overlap",
        ),
        (with_header({"a": _one(), "b": _one(offsets=[9, 17])}, bytes(17)), "gap"),
        (with_header({"a": _one(offsets=[2, 10])}, bytes(10)), "does not start at 0"),
        (with_header({"t": _one(dtype="F4", shape=[3], offsets=[0, 1])}, bytes(1)), "half a byte"),
        (with_header({"t": _one(shape=[2**40, 2**40], offsets=[0, 8])}, bytes(8)), "overflow"),
        (with_header({"t": _one(shape=[2**63] * 5000, offsets=[0, 8])}, bytes(8)), "long overflowing shape"),
        (with_header({"__metadata__": {"k": 1}, "t": _one()}, bytes(8)), "metadata not strings"),
        (with_header({"t": "not an object"}), "tensor not an object"),
        (
            with_header(b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "t": {}}', bytes(8)),
            "dup",
        ),
        (with_header(b'{"t": NaN}'), "NaN"),
        (with_header(b'{"t": \xff}'), "not UTF-8"),
        (with_header(b'{"t": [' * 100_000 + b"]" * 100_000 + b"}"), "deep nesting"),
        (with_header(b"{}", length=10), "length past the end"),
        (with_header(b"{" + b" " * 10, length=200_000_000), "header too large"),
        (with_header(b"[]"), "not an object"),
    ],
)
def test_invalid_headers_are_unreadable(data: bytes, why: str) -> None:
    result = safetensors_fmt.read(memoryview(data), make_ctx())
    assert codes(result) == ["SL205"], why
    assert result.storages == {}


@pytest.mark.parametrize("name", sorted(foreign_samples()))
def test_sniff_does_not_claim_other_formats(name: str) -> None:
    assert safetensors_fmt.sniff(memoryview(foreign_samples()[name])) is (name == "safetensors")


def test_truncations_and_flips_never_raise_and_never_pass_clean() -> None:
    data = safetensors_bytes(TENSORS)
    for cut in range(len(data)):
        buf = memoryview(data[:cut])
        if safetensors_fmt.sniff(buf):
            assert codes(safetensors_fmt.read(buf, make_ctx())) == ["SL205"], cut
    rng = random.Random(2)
    header_end = 8 + struct.unpack_from("<Q", data)[0]
    for _ in range(400):
        flipped = bytearray(data)
        flipped[rng.randrange(header_end)] = rng.randrange(256)
        buf = memoryview(bytes(flipped))
        if safetensors_fmt.sniff(buf):
            result = safetensors_fmt.read(buf, make_ctx())
            assert codes(result) in (["SL205"], ["SL400"])
            if codes(result) == ["SL400"]:
                # A flip the validator accepts still leaves a consistent index.
                for name, info in result.meta["safetensors"]["tensors"].items():
                    begin, end = info["data_offsets"]
                    assert result.storages[name].data.nbytes == end - begin
