"""The compiled walker (setup.py builds it with Cython) is the walker: the one in use unless the
build could not make it, current with walker.py, and walking every stream exactly as the Python
source does, broken and hostile ones included."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safeload.analysis import walker
from safeload.analysis.types import ImportSite, WalkResult
from safeload.limits import DEFAULT_LIMITS, Limits
from tests.property.test_differential import SETTINGS, containers, typed_leaves
from tests.property.test_mutations_walker import mutated, seeds

PURE = os.environ.get("SAFELOAD_PURE_PYTHON", "").strip() not in ("", "0")
REBUILD = (
    "the compiled walker is missing or older than walker.py: rebuild it with `pip install -e .` (it"
    " needs Cython and a C compiler), or set SAFELOAD_PURE_PYTHON=1 to test the pure-Python walker"
)
TIGHT = Limits(max_opcodes=40, max_memo=8, max_stack_depth=12, max_nesting_depth=4, max_int_digits=10)


def _plain(value: object) -> object:
    """A value folded by a walk, comparable across the two walkers (NaN, sets, import sites)."""
    if isinstance(value, ImportSite):
        uses = sorted(u.value for u in value.uses)
        return ("site", value.module, value.name, value.offset, value.opcode, uses, value.raw)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, [_plain(v) for v in value])
    if isinstance(value, dict):
        return ("dict", [(_plain(k), _plain(v)) for k, v in value.items()])
    if isinstance(value, (set, frozenset)):
        return (type(value).__name__, sorted(repr(_plain(v)) for v in value))
    return (type(value).__name__, repr(value))


def _snapshot(result: WalkResult) -> dict[str, object]:
    return {
        "imports": [_plain(site) for site in result.imports],
        "anomalies": result.anomalies,
        "persistent_ids": [(p.offset, _plain(p.value)) for p in result.persistent_ids],
        "values": [_plain(v) for v in result.values],
        "numbers": (result.protocol, result.opcodes, result.pickles, result.end, result.frames),
        "complete": result.complete,
        "replay_hazard": result.replay_hazard,
        "payloads": result.payloads,
    }


def _same_walk(data: bytes, **options: object) -> None:
    compiled = walker.walk(data, **options)  # type: ignore[arg-type]
    python = walker.walk_python(data, **options)  # type: ignore[arg-type]
    assert _snapshot(compiled) == _snapshot(python)


def test_the_compiled_walker_is_the_one_in_use() -> None:
    if PURE:
        assert not walker.COMPILED and walker.walk is walker.walk_python
    else:
        assert walker.COMPILED, REBUILD
        assert walker.walk is not walker.walk_python
        assert type(walker.walk).__name__ == "cython_function_or_method"


def test_a_compiled_walker_built_from_other_source_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edited = tmp_path / "walker.py"
    edited.write_bytes(Path(walker.__file__).read_bytes() + b"\n# edited after the build\n")
    assert walker._compiled_walk() is (None if PURE else walker.walk)
    monkeypatch.setattr(walker, "__file__", str(edited))
    assert walker._compiled_walk() is None


def test_safeload_pure_python_turns_it_off() -> None:
    code = "import safeload.analysis.walker as w; print(w.COMPILED, w.walk is w.walk_python)"
    env = {**os.environ, "SAFELOAD_PURE_PYTHON": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("index", range(len(seeds())))
@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, TIGHT], ids=["default-limits", "tight-limits"])
def test_real_pickles_walk_the_same(index: int, limits: Limits) -> None:
    data, joblib_stream = seeds()[index]
    for multi in (False, True):
        _same_walk(data, limits=limits, multi=multi, joblib_arrays=joblib_stream)
        _same_walk(data + data, limits=limits, multi=multi, joblib_arrays=joblib_stream, fold_values=False)


@SETTINGS
@given(sample=mutated(), multi=st.booleans(), tight=st.booleans())
def test_broken_pickles_walk_the_same(sample: tuple[bytes, bool], multi: bool, tight: bool) -> None:
    data, joblib_stream = sample
    limits = TIGHT if tight else DEFAULT_LIMITS
    _same_walk(data, limits=limits, multi=multi, joblib_arrays=joblib_stream)


@SETTINGS
@given(obj=containers(typed_leaves), protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_generated_pickles_walk_the_same(obj: object, protocol: int) -> None:
    _same_walk(pickle.dumps(obj, protocol=protocol))


@SETTINGS
@given(data=st.binary(max_size=200), multi=st.booleans())
def test_random_bytes_walk_the_same(data: bytes, multi: bool) -> None:
    _same_walk(data, multi=multi)
