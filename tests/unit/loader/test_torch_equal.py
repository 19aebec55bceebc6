"""Tensors rebuilt by the loader are identical to torch.load(weights_only=True)'s, on real files."""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

import pytest
import torch

from safeload.loader import unpickle
from tests.unit.loader import handmade
from tests.unit.loader.compare import assert_same, storage_bytes


def save(obj: Any, **kw: Any) -> bytearray:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return bytearray(buf.getvalue())


def both(obj: Any, **load_kw: Any) -> tuple[Any, Any]:
    data = save(obj)
    ref = torch.load(io.BytesIO(bytes(data)), weights_only=True, **load_kw)
    out = unpickle(handmade.torch_zip(data), **load_kw)
    return ref, out


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex32,
    torch.complex64,
    torch.complex128,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]


def sample(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) * 4
    if dtype is torch.complex32:
        return torch.complex(base, base.flip(0)).to(torch.complex64).to(dtype)
    if dtype.is_complex:
        return torch.complex(base, base.flip(0)).to(dtype)
    if dtype is torch.bool:
        return base > 0
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return base.abs().to(torch.int64).to(dtype)
    return base.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype(dtype: torch.dtype) -> None:
    t = sample(dtype)
    ref, out = both({"t": t, "view": t[1:, ::2], "dtype": dtype})
    assert_same(ref, out)
    assert storage_bytes(out["t"]) == storage_bytes(t)


def test_bfloat16_float8_bits_survive_exactly() -> None:
    # Bit patterns numpy cannot represent directly (NaN payloads, subnormals) come back unchanged.
    raw = torch.arange(0, 256, dtype=torch.uint8)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = raw.view(dtype)
        ref, out = both(t)
        assert out.view(torch.uint8).tolist() == raw.tolist()
        assert_same(ref, out)
    bf = torch.arange(0, 1 << 16, 97, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    ref, out = both(bf)
    assert torch.equal(out.view(torch.int16), bf.view(torch.int16))


def test_views_share_one_storage() -> None:
    x = torch.arange(24.0).reshape(4, 6)
    obj = [x, x.t(), x[1:3], x.view(-1), x[0:1].expand(3, 6), x[:, 2], torch.ones(2)]
    ref, out = both(obj)
    assert_same(ref, out)
    ptr = out[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == ptr for t in out[:6])
    assert out[6].untyped_storage().data_ptr() != ptr
    out[0][0, 0] = 100.0  # one storage: a write shows through every view
    assert out[1][0, 0] == 100.0 and out[3][0] == 100.0


def test_parameters_and_requires_grad() -> None:
    obj = {
        "p": torch.nn.Parameter(torch.randn(3)),
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "leaf": torch.randn(4).requires_grad_(),
        "plain": torch.randn(2),
    }
    ref, out = both(obj)
    assert_same(ref, out)
    assert isinstance(out["p"], torch.nn.Parameter) and out["p"].requires_grad
    assert isinstance(out["frozen"], torch.nn.Parameter) and not out["frozen"].requires_grad
    assert out["leaf"].requires_grad and not out["plain"].requires_grad


def test_state_dict_keeps_metadata() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    sd = model.state_dict()
    ref, out = both(sd)
    assert_same(ref, out)
    assert isinstance(out, OrderedDict)
    assert out._metadata == sd._metadata  # type: ignore[attr-defined]
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    fresh.load_state_dict(out)
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_nested_containers_and_torch_values() -> None:
    obj = {
        "list": [1, 2.5, "x", None, True, b"bytes", bytearray(b"ba"), {1, 2}, complex(1, 2)],
        "tuple": (torch.zeros(1), (torch.ones(2), [torch.full((2,), 3.0)])),
        "size": torch.Size([3, 4]),
        "device": torch.device("cpu"),
        "dtypes": [torch.float16, torch.bfloat16, torch.int8],
        "counter": __import__("collections").Counter("aab"),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
        "nested": OrderedDict(a=OrderedDict(b=torch.arange(3))),
    }
    ref, out = both(obj)
    assert_same(ref, out)


def test_conj_and_neg_bits() -> None:
    z = torch.randn(4, dtype=torch.complex64)
    obj = {"conj": z.conj(), "neg": z._neg_view(), "plain": z}
    ref, out = both(obj)
    assert_same(ref, out)
    assert out["conj"].is_conj()


@pytest.mark.parametrize("layout", ["coo", "coo_coalesced", "csr", "csc", "bsr"])
def test_sparse(layout: str) -> None:
    dense = torch.tensor(
        [[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 5.0], [0.0, 6.0, 0.0, 0.0]]
    )
    t = {
        "coo": dense.to_sparse(),
        "coo_coalesced": dense.to_sparse().coalesce(),
        "csr": dense.to_sparse_csr(),
        "csc": dense.to_sparse_csc(),
        "bsr": dense.to_sparse_bsr((2, 2)),
    }[layout]
    ref, out = both({"s": t})
    assert_same(ref, out)
    assert torch.equal(out["s"].to_dense(), dense)


def test_quantized() -> None:
    x = torch.randn(4, 6)
    obj = {
        "qint8": torch.quantize_per_tensor(x, 0.1, 3, torch.qint8),
        "quint8": torch.quantize_per_tensor(x, 0.05, 10, torch.quint8),
        "qint32": torch.quantize_per_tensor(x, 0.01, 0, torch.qint32),
        "channel": torch.quantize_per_channel(
            x, torch.rand(4) + 0.1, torch.zeros(4, dtype=torch.long), 0, torch.qint8
        ),
    }
    ref, out = both(obj)
    assert_same(ref, out)
    assert torch.equal(out["qint8"].int_repr(), obj["qint8"].int_repr())


def test_big_endian_file() -> None:
    """A checkpoint written on a big-endian machine (byteorder record 'big') loads with native values."""
    t = {"f": torch.arange(6, dtype=torch.float32) / 3, "i": torch.arange(4, dtype=torch.int64) - 1}
    data = save(t)
    analysis = handmade.torch_zip(data)
    # Rewrite as torch on a big-endian machine would have written it: every storage swapped.
    for entry in analysis.container.storages.values():
        itemsize = 4 if len(entry.data) == 24 else 8
        swapped = bytearray(entry.data)
        for i in range(0, len(swapped), itemsize):
            swapped[i : i + itemsize] = swapped[i : i + itemsize][::-1]
        entry.data[:] = swapped
    analysis.container.meta["byteorder"] = "big"
    out = unpickle(analysis)
    assert torch.equal(out["f"], t["f"]) and torch.equal(out["i"], t["i"])


def test_zero_copy_from_the_read_once_buffer() -> None:
    t = torch.arange(1024, dtype=torch.float32)
    data = save({"t": t})
    analysis = handmade.torch_zip(data)
    out = unpickle(analysis)
    entry = analysis.container.storages["0"]
    # The storage is the file buffer itself: no copy was made.
    import numpy as np

    assert out["t"].data_ptr() == np.frombuffer(entry.data, dtype=np.uint8).ctypes.data
    assert torch.equal(out["t"], t)


def test_read_only_bytes_are_copied() -> None:
    t = torch.arange(8, dtype=torch.float32)
    data = bytes(save({"t": t}))
    out = unpickle(handmade.torch_zip(data))
    out["t"][0] = 5.0  # a private copy: writable, and the caller's bytes do not change
    assert bytes(data) == bytes(save({"t": t}))
