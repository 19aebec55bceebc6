"""Bit-for-bit comparison of what safeload.load and torch.load(weights_only=True) return."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch


def storage_bytes(t: torch.Tensor) -> bytes:
    """Every byte of the tensor's storage (not only the part the view covers)."""
    s = t.untyped_storage()
    if s.device.type == "meta":
        return b""
    return torch.empty(0, dtype=torch.uint8).set_(s.cpu()).numpy().tobytes()


def assert_tensor_same(ref: torch.Tensor, out: torch.Tensor, where: str) -> None:
    assert type(out) is type(ref), where
    assert out.dtype == ref.dtype, where
    assert out.layout == ref.layout, where
    assert out.device == ref.device, where
    assert out.shape == ref.shape, where
    assert out.requires_grad == ref.requires_grad, where
    assert out.is_conj() == ref.is_conj() and out.is_neg() == ref.is_neg(), where
    if ref.layout is torch.sparse_coo:
        assert_tensor_same(ref._indices(), out._indices(), where + ".indices")
        assert_tensor_same(ref._values(), out._values(), where + ".values")
        assert out.is_coalesced() == ref.is_coalesced(), where
        return
    if ref.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        for name in ("crow_indices", "col_indices", "values"):
            if hasattr(ref, name):
                try:
                    assert_tensor_same(getattr(ref, name)(), getattr(out, name)(), f"{where}.{name}")
                except RuntimeError:
                    pass
        return
    assert out.stride() == ref.stride(), where
    assert out.storage_offset() == ref.storage_offset(), where
    if ref.is_quantized:
        assert out.qscheme() == ref.qscheme(), where
        if ref.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            assert out.q_scale() == ref.q_scale() and out.q_zero_point() == ref.q_zero_point(), where
        else:
            assert torch.equal(out.q_per_channel_scales(), ref.q_per_channel_scales()), where
            assert torch.equal(out.q_per_channel_zero_points(), ref.q_per_channel_zero_points()), where
            assert out.q_per_channel_axis() == ref.q_per_channel_axis(), where
    assert out.untyped_storage().nbytes() == ref.untyped_storage().nbytes(), where
    assert storage_bytes(out) == storage_bytes(ref), where


def assert_same(ref: Any, out: Any, where: str = "obj") -> None:
    """Equal values, types and tensor layout; storages shared between the same tensors."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    _same(ref, out, where, pairs)
    # Sharing: two tensors share a storage in the result exactly when they do in torch's.
    for i, (r1, o1) in enumerate(pairs):
        for r2, o2 in pairs[i + 1 :]:
            if r1.layout is not torch.strided or r2.layout is not torch.strided or r1.device.type == "meta":
                continue
            shared_ref = r1.untyped_storage().data_ptr() == r2.untyped_storage().data_ptr()
            shared_out = o1.untyped_storage().data_ptr() == o2.untyped_storage().data_ptr()
            assert shared_ref == shared_out, f"storage sharing differs at {where}"


def _same(ref: Any, out: Any, where: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert type(out) is type(ref), f"{where}: {type(out)} != {type(ref)}"
    if isinstance(ref, torch.Tensor):
        assert_tensor_same(ref, out, where)
        pairs.append((ref, out))
        return
    if isinstance(ref, dict):
        assert list(out) == list(ref), where
        if isinstance(ref, OrderedDict) or hasattr(ref, "_metadata"):
            assert getattr(out, "_metadata", None) == getattr(ref, "_metadata", None), where
        for k in ref:
            _same(ref[k], out[k], f"{where}[{k!r}]", pairs)
        return
    if isinstance(ref, (list, tuple)) and not isinstance(ref, torch.Size):
        assert len(out) == len(ref), where
        for i, (r, o) in enumerate(zip(ref, out, strict=True)):
            _same(r, o, f"{where}[{i}]", pairs)
        return
    assert out == ref, where
