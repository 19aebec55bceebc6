"""Protocol 0 numbers (INT, LONG, FLOAT) read as CPython's C unpickler reads them, by the walker and
by the loader; pickle.py's pure-Python reading differs (found by a loader differential fuzzer)."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safeload
from safeload.analysis.text_numbers import float_arg, int_arg, long_arg
from safeload.analysis.walker import walk
from safeload.errors import LoadError

OPCODES = {b"I": int_arg, b"L": long_arg, b"F": float_arg}
# Characters C and Python disagree on: signs, spaces, prefixes, underscores, exponents, NUL.
LINE = st.text(alphabet="0123456789+-_ .\t\v\fxXoObBeELinfINFa\0", max_size=12).map(
    lambda s: s.encode("latin-1")
)


def c_unpickler(opcode: bytes, line: bytes) -> object:
    """What pickle.loads (the C unpickler) makes of the line, or None where it raises."""
    try:
        return pickle.loads(opcode + line + b"\n.")
    except Exception:  # noqa: BLE001 - ValueError, OverflowError, UnpicklingError...
        return None


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@settings(max_examples=400, deadline=None)
@given(opcode=st.sampled_from(sorted(OPCODES)), line=LINE)
def test_each_line_reads_as_the_c_unpickler_reads_it(opcode: bytes, line: bytes) -> None:
    if b"\n" in line:
        return
    assert same(OPCODES[opcode](line), c_unpickler(opcode, line))


# Lines the C unpickler and pickle.py read differently.
DIFFERENT = [
    (b"I", b"-0", False),
    (b"I", b"+1", True),
    (b"I", b" 0", False),
    (b"I", b"\t1", True),
    (b"I", b"1\0", True),
    (b"I", b"010", 8),
    (b"I", b"002", 2),
    (b"I", b"0x1f", 31),
    (b"I", b"7\0junk", 7),
    (b"I", b"1_0\0", 10),
    (b"L", b"12\0L", 12),
    (b"F", b"2.5\0x", 2.5),
]
REFUSED = [(b"F", b"1_5"), (b"F", b" 1.5"), (b"F", b"1e999"), (b"I", b"1__0"), (b"I", b"08")]


@pytest.mark.parametrize(("opcode", "line", "value"), DIFFERENT, ids=repr)
def test_the_walker_and_the_loader_read_what_pickle_load_reads(
    opcode: bytes, line: bytes, value: object
) -> None:
    data = b"(" + opcode + line + b"\nl."
    assert same(pickle.loads(data)[0], value)
    [walked] = walk(data, fold_values=True).values
    assert same(walked[0], value)
    assert same(safeload.loads(data)[0], value)


@pytest.mark.parametrize(("opcode", "line"), REFUSED, ids=repr)
def test_lines_pickle_load_refuses_are_refused(opcode: bytes, line: bytes) -> None:
    data = opcode + line + b"\n."
    with pytest.raises((ValueError, OverflowError)):
        pickle.loads(data)
    with pytest.raises(LoadError):
        safeload.loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x02c__builtin__\nset\n]R.",  # REDUCE on a list of arguments
        b"\x80\x02ccollections\nOrderedDict\n]\x81.",  # NEWOBJ
        b"\x80\x04ccollections\nOrderedDict\n]}\x92.",  # NEWOBJ_EX
        b"\x80\x04ccollections\nOrderedDict\n)]\x92.",  # NEWOBJ_EX with a list for keywords
    ],
    ids=["reduce", "newobj", "newobj_ex-args", "newobj_ex-kwargs"],
)
def test_calls_need_the_argument_types_pickle_load_needs(data: bytes) -> None:
    with pytest.raises((TypeError, pickle.UnpicklingError)):
        pickle.loads(data)
    with pytest.raises(LoadError, match="tuple|dict"):
        safeload.loads(data)
