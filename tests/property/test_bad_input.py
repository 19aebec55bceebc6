"""Hostile bytes: truncations and byte flips of real files never crash, hang or pass unparsed."""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeload
from safeload.errors import SafeloadError
from safeload.model import Verdict

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def real_files() -> dict[str, bytes]:
    import joblib
    import torch

    files: dict[str, bytes] = {}
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}, buf)
    files["torch-zip"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4)}, buf, _use_new_zipfile_serialization=False)
    files["torch-legacy"] = buf.getvalue()
    files["raw"] = pickle.dumps(OrderedDict(a=[1, 2.0, "x"], b={"c": (None, True)}), protocol=4)
    files["raw-p0"] = pickle.dumps({"k": [1, 2]}, protocol=0)
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, [2, 3]], dtype=object), allow_pickle=True)
    files["npy-object"] = buf.getvalue()
    buf = io.BytesIO()
    record = np.dtype([("a", "i4"), ("b", "O"), ("c", "f8")])  # an object field inside a record
    np.save(buf, np.array([(1, {"k": 2}, 2.5)], dtype=record), allow_pickle=True)
    files["npy-record"] = buf.getvalue()
    buf = io.BytesIO()
    joblib.dump({"arr": np.arange(10.0), "n": 3}, buf)
    files["joblib"] = buf.getvalue()
    # numpy objects pickled directly: dtypes (a subarray field, an object field), a scalar, an array.
    # Three flipped bytes of this made numpy segfault in the loader (a dtype state of another kind).
    structured = np.dtype([("x", "<f4", (2,)), ("y", "O")])
    files["numpy-pickle"] = pickle.dumps({"s": np.float32(1.5), "d": structured, "a": np.arange(4)}, protocol=2)
    return files


KINDS = sorted(
    ["torch-zip", "torch-legacy", "raw", "raw-p0", "npy-object", "npy-record", "joblib", "numpy-pickle"]
)


def _check(data: bytes) -> Verdict:
    report = safeload.scan_bytes(data)  # must not raise
    if report.verdict is Verdict.SAFE:
        try:
            safeload.loads(data)
        except SafeloadError:
            pass
    return report.verdict


@pytest.mark.parametrize("kind", KINDS)
def test_real_files_are_safe(kind: str) -> None:
    assert safeload.scan_bytes(real_files()[kind]).verdict is Verdict.SAFE


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(cut=st.floats(min_value=0.0, max_value=0.9999))
def test_truncation_is_never_safe(kind: str, cut: float) -> None:
    data = real_files()[kind]
    prefix = data[: int(len(data) * cut)]
    assert _check(prefix) is not Verdict.SAFE


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_byte_flips_never_crash(kind: str, data: st.DataObject) -> None:
    original = bytearray(real_files()[kind])
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(1, 255)), min_size=1, max_size=4))
    for pos, xor in flips:
        original[pos] ^= xor
    _check(bytes(original))
