"""Truncations, byte flips, insertions and deletions of real pickles: the walker never raises, never
calls a broken stream complete, and never sees less than CPython's unpickler unless it says so."""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import zipfile
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeload.analysis.replay import differential, replay_imports
from safeload.analysis.walker import walk

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPCODES = sorted({op.code.encode("latin-1") for op in pickletools.opcodes})


@cache
def seeds() -> list[tuple[bytes, bool]]:
    """Real pickles (and whether they are joblib streams)."""
    import joblib
    import numpy as np
    import torch

    obj = {
        "a": [1, 2.5, "x", b"yy", (1, 2), {3}, frozenset([4]), None, True, 10**30, bytearray(b"z")],
        "od": collections.OrderedDict(q=[1, 2]),
        "c": complex(1, 2),
        "f": (len, print),
    }
    out = [(pickle.dumps(obj, protocol=p), False) for p in range(pickle.HIGHEST_PROTOCOL + 1)]
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3), "m": torch.nn.Linear(2, 2).state_dict()}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        out.append((zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl"))), False))
    buf = io.BytesIO()
    joblib.dump({"x": np.arange(6.0), "o": np.array([1, "s"], dtype=object), "n": 1}, buf)
    out.append((buf.getvalue(), True))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bool]:
    data, joblib_stream = draw(st.sampled_from(seeds()))
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not buf:
            break
        i = draw(st.integers(0, len(buf) - 1))
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "splice"]))
        if kind == "truncate":
            del buf[i:]
        elif kind == "flip":
            buf[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            buf[i:i] = draw(st.sampled_from(OPCODES))
        elif kind == "delete":
            del buf[i : i + draw(st.integers(1, 8))]
        else:
            other = draw(st.sampled_from(seeds()))[0]
            j = draw(st.integers(0, len(other) - 1))
            buf[i:i] = other[j : j + draw(st.integers(1, 40))]
    return bytes(buf), joblib_stream


@SETTINGS
@given(sample=mutated(), multi=st.booleans())
def test_mutations(sample: tuple[bytes, bool], multi: bool) -> None:
    data, joblib_stream = sample
    result = walk(data, multi=multi, joblib_arrays=joblib_stream)  # must not raise
    found = {a.code for a in result.anomalies}
    assert "SL207" not in found, result.anomalies
    if "SL200" in found or "SL203" in found:
        assert not result.complete
    replays = replay_imports(data, multi=multi, joblib_arrays=joblib_stream, walk=result)
    flagged = {a.code for a in differential(result, replays)} | found
    if flagged & {"SL105", "SL107", "SL102", "SL103"}:
        return  # a desync or an unnamed global was reported; that is the point
    seen = {i.raw or (i.module, i.name) for i in result.imports}
    for replay in replays.replays:
        assert set(replay.imports) <= seen, (replay.reader, replay.imports, seen)
