"""Properties of the whole load path on generated inputs.

Random nested containers of tensors round-trip through torch.save and safeload.loads equal to
torch.load(weights_only=True); flipped or truncated bytes of a real checkpoint give an object or a
SafeloadError, never another exception.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeload
from safeload.errors import SafeloadError
from tests.unit.loader.compare import assert_same

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.uint8,
    torch.float8_e5m2,
]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    seed = draw(st.integers(0, 1000))
    base = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 8
    t = base > 0 if dtype is torch.bool else base.to(dtype)
    view = draw(st.sampled_from(["none", "t", "slice", "expand"]))
    if view == "t" and t.dim() == 2:
        return t.t()
    if view == "slice" and t.dim() >= 1 and t.shape[0] > 1:
        return t[1:]
    if view == "expand" and t.dim() >= 1 and t.shape[0] == 1:
        return t.expand(3, *t.shape[1:])
    return t


leaves = st.one_of(
    tensors(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
)
trees = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=4), inner, max_size=3),
    ),
    max_leaves=8,
)


def _save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=trees)
def test_round_trip_equals_torch_load(obj: Any) -> None:
    data = _save(obj)
    assert_same(torch.load(io.BytesIO(data), weights_only=True), safeload.loads(data, policy="strict"))


def _real() -> bytes:
    x = torch.arange(12.0).reshape(3, 4)
    return _save({"w": x, "v": x.t(), "p": torch.nn.Parameter(torch.ones(2)), "n": [1, "a", (2.5, None)]})


REAL = _real()


def _check(data: bytes) -> None:
    try:
        safeload.loads(data, policy="strict")
    except SafeloadError:
        pass


@settings(max_examples=60, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_flipped_bytes_give_an_object_or_a_safeload_error(flips: list[tuple[int, int]]) -> None:
    data = bytearray(REAL)
    for pos, xor in flips:
        data[pos] ^= xor
    _check(bytes(data))


@settings(max_examples=30, deadline=None)
@given(cut=st.integers(0, len(REAL) - 1))
def test_truncated_files_give_a_safeload_error(cut: int) -> None:
    try:
        safeload.loads(REAL[:cut], policy="strict")
    except SafeloadError:
        return
    raise AssertionError("a truncated checkpoint loaded")
