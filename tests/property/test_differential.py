"""Generated containers, pickled by the real pickler in every protocol: the walker and CPython's
unpickler (replayed through every reader kind) see exactly the same imports."""

from __future__ import annotations

import collections
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeload.analysis.replay import differential, replay_imports
from safeload.analysis.types import UNKNOWN
from safeload.analysis.walker import walk

# Hypothesis warns about the size of these recursive strategies' repr; harmless.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
hashables = st.recursive(
    scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=6
)


def containers(leaf: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=5),
            st.tuples(inner, inner),
            st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=5),
            st.sets(hashables, max_size=4),
            st.frozensets(hashables, max_size=4),
        ),
        max_leaves=25,
    )


typed_leaves = st.one_of(
    scalars,
    st.binary(max_size=10).map(bytearray),
    st.builds(
        complex,
        st.floats(allow_nan=False, allow_infinity=False),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3).map(collections.OrderedDict),
    st.lists(st.text(max_size=3), max_size=3).map(collections.Counter),
)


@SETTINGS
@given(obj=containers(typed_leaves), protocol=st.integers(0, pickle.HIGHEST_PROTOCOL), twice=st.booleans())
def test_walker_and_replays_agree(obj: object, protocol: int, twice: bool) -> None:
    data = pickle.dumps(obj, protocol=protocol)
    if twice:
        data += pickle.dumps([obj, obj], protocol=protocol)
    result = walk(data)
    assert result.complete
    assert [a.code for a in result.anomalies] == (["SL202"] if twice else [])
    replays = replay_imports(data, multi=True, walk=result)
    raw = [i.raw or (i.module, i.name) for i in result.imports]
    for replay in replays.replays:
        assert replay.completed, replay.error
        assert replay.imports == raw, replay.reader
    assert differential(result, replays) == []


@SETTINGS
@given(obj=containers(scalars), protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_plain_containers_fold_to_themselves(obj: object, protocol: int) -> None:
    data = pickle.dumps(obj, protocol=protocol)
    result = walk(data)
    assert result.complete and result.anomalies == []
    folded = result.values[0]
    if (protocol < 3 and _contains(obj, bytes)) or (protocol < 4 and _contains(obj, (set, frozenset))):
        # Protocols 0-2 pickle bytes as _codecs.encode(...) calls; 0-3 pickle sets as set(...) calls.
        assert result.imports
        return
    assert folded is not UNKNOWN
    assert folded == pickle.loads(data)  # noqa: S301 - the test pickled it itself


def _contains(value: object, kind: type | tuple[type, ...]) -> bool:
    if isinstance(value, kind):
        return True
    if isinstance(value, dict):
        return any(_contains(k, kind) or _contains(v, kind) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_contains(v, kind) for v in value)
    return False
