"""The opcode walker: imports, uses, anomalies, frames, limits. Benign inputs are real pickles."""

from __future__ import annotations

import collections
import gc
import io
import pickle
import struct
import tracemalloc
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest

from safeload.analysis.types import UNKNOWN, ImportSite, WalkResult
from safeload.analysis.walker import walk
from safeload.limits import Limits
from safeload.model import Use
from tests import pickle_builder as pb

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


class _Recorder(pickle.Unpickler):
    """The real C unpickler, recording find_class; used only on benign data made by the test."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.calls: list[tuple[str, str]] = []

    def find_class(self, module: str, name: str) -> Any:
        self.calls.append((module, name))
        return super().find_class(module, name)


def real_imports(data: bytes) -> list[tuple[str, str]]:
    rec = _Recorder(data)
    rec.load()
    return rec.calls


def codes(result: WalkResult) -> list[str]:
    return [a.code for a in result.anomalies]


def site(result: WalkResult, qualname: str) -> ImportSite:
    found = [i for i in result.imports if i.qualname == qualname]
    assert found, f"{qualname} not among {[i.qualname for i in result.imports]}"
    return found[0]


def torch_data_pkl(obj: object) -> bytes:
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        return zf.read(name)


# -- benign --------------------------------------------------------------------------------------


PLAIN = {"a": [1, 2.5, "x", None, True, (1, (2, 3)), {"k": [4, -7, 2**40]}], "b": (), "c": "é\u1234"}
TYPED = {
    "s": {1, 2},
    "f": frozenset({3}),
    "b": b"xy",
    "ba": bytearray(b"z"),
    "od": collections.OrderedDict(a=1),
    "c": complex(1, 2),
    "big": 10**40,
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_containers_import_nothing(protocol: int) -> None:
    data = pickle.dumps(PLAIN, protocol=protocol)
    result = walk(data)
    assert result.anomalies == []
    assert result.imports == []
    assert result.complete and result.pickles == 1 and result.end == len(data)
    assert result.protocol == (protocol if protocol >= 2 else 0)
    assert result.values == [PLAIN]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_typed_containers_imports_match_the_real_unpickler(protocol: int) -> None:
    data = pickle.dumps(TYPED, protocol=protocol)
    result = walk(data)
    assert result.anomalies == []
    assert result.complete
    raw = [i.raw or (i.module, i.name) for i in result.imports]
    assert raw == real_imports(data)
    names = {i.qualname for i in result.imports}
    assert "collections.OrderedDict" in names
    assert ("builtins.set" in names) == (protocol < 4)  # protocol 4 has EMPTY_SET


def test_protocol2_names_are_mapped_from_python2() -> None:
    result = walk(pickle.dumps({1, 2}, protocol=2))
    s = site(result, "builtins.set")
    assert s.raw == ("__builtin__", "set")
    assert s.uses == {Use.REFERENCED, Use.CALLED}


def test_torch_state_dict() -> None:
    torch = pytest.importorskip("torch")
    data = torch_data_pkl(torch.nn.Linear(3, 2).state_dict())
    result = walk(data, multi=False)
    assert result.anomalies == [] and result.complete
    assert {i.qualname for i in result.imports} == {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
    }
    assert Use.CALLED in site(result, "torch._utils._rebuild_tensor_v2").uses
    storage = site(result, "torch.FloatStorage")
    assert storage.uses == {Use.REFERENCED, Use.PERSISTENT_ID}
    pids = [p.value for p in result.persistent_ids]
    assert len(pids) == 2
    for pid in pids:
        assert isinstance(pid, tuple) and pid[0] == "storage" and pid[3] == "cpu"
        assert pid[1] is storage and isinstance(pid[2], str)
    assert sorted(p[4] for p in pids) == [2, 6]  # type: ignore[index]


def test_memoryview_input_is_walked_like_bytes() -> None:
    data = pickle.dumps(TYPED, protocol=2)
    padded = b"\0" * 7 + data + b"\0" * 5
    view = memoryview(padded)[7:-5]
    a, b = walk(data), walk(view)
    assert [i.qualname for i in a.imports] == [i.qualname for i in b.imports]
    assert a.complete and b.complete and a.opcodes == b.opcodes


def test_large_payloads_are_skipped_not_copied() -> None:
    payload = b"\xab" * (8 << 20)
    data = pickle.dumps([payload, "tail"], protocol=4)
    tracemalloc.start()
    try:
        result = walk(memoryview(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.complete and result.anomalies == []
    assert peak < len(payload) // 8


# -- globals and uses ----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_global_reduce_every_protocol(protocol: int, marker: Path) -> None:
    result = walk(pb.exec_payload(marker, protocol=protocol))
    s = site(result, "builtins.exec")
    assert s.opcode == "GLOBAL" and s.uses == {Use.REFERENCED, Use.CALLED}
    assert result.complete


def test_inst_obj_newobj_newobj_ex() -> None:
    inst = pb.wrap(pb.MARK + pb.unicode("a") + pb.inst("m1", "C1"), 1)
    obj = pb.wrap(pb.MARK + pb.glob("m2", "C2") + pb.binint(1) + pb.OBJ, 1)
    newobj = pb.wrap(pb.glob("m3", "C3") + pb.tup(pb.binint(1)) + pb.NEWOBJ, 2)
    newobj_ex = pb.wrap(pb.stack_global("m4", "C4") + pb.EMPTY_TUPLE + pb.EMPTY_DICT + pb.NEWOBJ_EX, 4)
    for data, name, opcode in [
        (inst, "m1.C1", "INST"),
        (obj, "m2.C2", "GLOBAL"),
        (newobj, "m3.C3", "GLOBAL"),
        (newobj_ex, "m4.C4", "STACK_GLOBAL"),
    ]:
        result = walk(data)
        s = site(result, name)
        assert s.opcode == opcode
        assert Use.INSTANTIATED in s.uses, name
        assert result.complete and result.anomalies == []


def test_build_target_and_argument_uses() -> None:
    # torch._tensor._rebuild_from_type_v2(func, new_type, args, state): func is called by torch.
    body = (
        pb.glob("torch._tensor", "_rebuild_from_type_v2")
        + pb.tup(pb.glob("builtins", "exec"), pb.glob("torch", "Tensor"), pb.EMPTY_TUPLE, pb.EMPTY_DICT)
        + pb.REDUCE
        + pb.EMPTY_DICT
        + pb.unicode("x")
        + pb.binint(1)
        + pb.SETITEM
        + pb.BUILD
    )
    result = walk(pb.wrap(body, 2))
    rebuild = site(result, "torch._tensor._rebuild_from_type_v2")
    assert rebuild.uses == {Use.REFERENCED, Use.CALLED, Use.BUILD_TARGET}
    assert site(result, "builtins.exec").uses == {Use.REFERENCED, Use.ARGUMENT}
    assert site(result, "torch.Tensor").uses == {Use.REFERENCED, Use.ARGUMENT}
    assert result.anomalies == []


def test_stack_global_from_memo_every_path() -> None:
    via_binget = pb.unicode("os") + pb.put(0) + pb.POP + pb.unicode("system") + pb.put(1) + pb.POP
    via_binget += pb.get(0) + pb.get(1) + pb.STACK_GLOBAL
    via_memoize = pb.unicode("os") + pb.MEMOIZE + pb.unicode("system") + pb.MEMOIZE + pb.POP + pb.POP
    via_memoize += b"g0\ng1\n" + pb.STACK_GLOBAL
    via_long = pb.unicode("subprocess") + b"r" + struct.pack("<I", 70000) + b"2" + pb.unicode("run")
    via_long += (
        pb.STACK_GLOBAL + b"0" + b"j" + struct.pack("<I", 70000) + pb.unicode("Popen") + pb.STACK_GLOBAL
    )
    for body, expect in [
        (via_binget, ["os.system"]),
        (via_memoize, ["os.system"]),
        (via_long, ["subprocess.run", "subprocess.Popen"]),
    ]:
        result = walk(pb.wrap(body, 4))
        assert [i.qualname for i in result.imports] == expect
        assert all(i.opcode == "STACK_GLOBAL" for i in result.imports)
        assert result.anomalies == [] and result.complete


@pytest.mark.parametrize(
    "module_ops",
    [
        pb.binint(7),
        b"C\x02os",
        pb.call(pb.glob("builtins", "str"), pb.unicode("os")),
        pb.unicode("os") + pb.TUPLE1,
        b"N",
    ],
    ids=["int", "bytes", "call-result", "tuple", "none"],
)
def test_stack_global_with_non_string_operand_is_critical(module_ops: bytes) -> None:
    result = walk(pb.wrap(module_ops + pb.unicode("system") + pb.STACK_GLOBAL, 4))
    sl102 = [a for a in result.anomalies if a.code == "SL102"]
    assert len(sl102) == 1 and sl102[0].offset > 0
    assert all(i.name != "system" for i in result.imports)  # never guessed
    assert sl102[0].global_name == "?.system"


def test_dotted_name_is_kept_whole() -> None:
    result = walk(pb.wrap(pb.stack_global("torch.serialization", "os.system"), 4))
    (s,) = result.imports
    assert (s.module, s.name, s.qualname) == (
        "torch.serialization",
        "os.system",
        "torch.serialization.os.system",
    )


def test_python2_names_follow_the_protocol() -> None:
    p2 = walk(pb.wrap(pb.glob("__builtin__", "eval"), 2))
    assert p2.imports[0].qualname == "builtins.eval" and p2.imports[0].raw == ("__builtin__", "eval")
    p0 = walk(pb.glob("copy_reg", "_reconstructor") + pb.STOP)
    assert p0.imports[0].qualname == "copyreg._reconstructor"
    p3 = walk(pb.wrap(pb.glob("__builtin__", "eval"), 3))
    assert p3.imports[0].qualname == "__builtin__.eval" and p3.imports[0].raw is None
    pairs = walk(pb.wrap(pb.glob("itertools", "imap"), 2))
    assert pairs.imports[0].qualname == "builtins.map"
    # A PROTO in the middle changes the mapping from there on, as in CPython.
    mid = walk(pb.glob("__builtin__", "eval") + pb.proto(3) + pb.glob("__builtin__", "eval") + pb.STOP)
    assert [i.qualname for i in mid.imports] == ["builtins.eval", "__builtin__.eval"]


def test_ext_opcodes() -> None:
    for op, arg, code in [
        (b"\x82", b"\x05", 5),
        (b"\x83", b"\x01\x01", 257),
        (b"\x84", struct.pack("<i", 70000), 70000),
    ]:
        result = walk(pb.wrap(op + arg + pb.tup() + pb.REDUCE, 2))
        (anomaly,) = result.anomalies
        assert anomaly.code == "SL103" and str(code) in anomaly.message
        assert result.imports == []


def test_dunder_build() -> None:
    for state in [
        pb.EMPTY_DICT + pb.unicode("__setstate__") + pb.glob("builtins", "exec") + pb.SETITEM,
        pb.MARK
        + pb.NONE
        + pb.EMPTY_DICT
        + pb.unicode("__reduce_ex__")
        + pb.binint(1)
        + pb.SETITEM
        + pb.TUPLE,
        pb.EMPTY_DICT + pb.call(pb.glob("builtins", "str"), pb.unicode("x")) + pb.binint(1) + pb.SETITEM,
    ]:
        body = pb.glob("collections", "OrderedDict") + pb.EMPTY_TUPLE + pb.REDUCE + state + pb.BUILD
        result = walk(pb.wrap(body, 2))
        assert "SL104" in codes(result), state
    plain = pb.glob("m", "C") + pb.EMPTY_TUPLE + pb.NEWOBJ + pb.EMPTY_DICT + pb.unicode("w") + pb.binint(1)
    assert walk(pb.wrap(plain + pb.SETITEM + pb.BUILD, 2)).anomalies == []
    on_class = pb.glob("m", "C") + pb.EMPTY_DICT + pb.BUILD
    assert codes(walk(pb.wrap(on_class, 2))) == ["SL104"]


def test_persistent_ids() -> None:
    binpersid = pb.MARK + pb.unicode("storage") + pb.glob("torch", "HalfStorage") + pb.unicode("k")
    binpersid += pb.unicode("cpu") + pb.binint(3) + pb.TUPLE + b"Q"
    result = walk(pb.wrap(binpersid, 2))
    (pid,) = result.persistent_ids
    assert pid.value[:1] == ("storage",) and pid.value[2:] == ("k", "cpu", 3)  # type: ignore[index]
    assert isinstance(pid.value[1], ImportSite) and pid.value[1].uses >= {Use.PERSISTENT_ID}  # type: ignore[index]
    text = walk(b"Pkey-1\n.")
    assert text.persistent_ids[0].value == "key-1" and text.complete
    dynamic = walk(pb.wrap(pb.call(pb.glob("m", "f")) + b"Q", 2))
    assert dynamic.persistent_ids[0].value is UNKNOWN


# -- several pickles, broken tails -----------------------------------------------------------------


def test_payload_in_second_pickle(marker: Path) -> None:
    data = pickle.dumps([1]) + pb.exec_payload(marker)
    result = walk(data)
    assert [i.qualname for i in result.imports] == ["builtins.exec"]
    assert codes(result) == ["SL202"] and result.pickles == 2 and result.complete
    single = walk(data, multi=False)
    assert single.imports == [] and codes(single) == ["SL201"] and not single.complete


def test_payload_before_broken_tail(marker: Path) -> None:
    good = pb.exec_payload(marker)
    for tail in [good[:-1], good[:-1] + b"\xff", good[:-1] + b"0" * 5]:
        result = walk(tail)
        assert [i.qualname for i in result.imports] == ["builtins.exec"]
        assert "SL200" in codes(result) and not result.complete


def test_trailing_bytes() -> None:
    data = pickle.dumps({"a": 1})
    garbage = walk(data + b"\x00\x00\x00")
    assert codes(garbage) == ["SL201"] and not garbage.complete and garbage.end == len(data)
    broken = walk(data + pb.glob("os", "system"))
    assert codes(broken) == ["SL200", "SL201"]
    assert [i.qualname for i in broken.imports] == ["os.system"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\x80\x02\xff.", "invalid opcode"),
        (b"\x80\x02R.", "underflow"),
        (b"\x80\x02(\x85.", "MARK"),
        (b"\x80\x02t.", "could not find MARK"),
        (b"\x80\x02h\x05.", "memo"),
        (b"\x80\x02X\x02\x00\x00\x00\xff\xfe.", "UTF-8"),
        (b"c\xff\xfe\nx\n.", "utf-8"),
        (b"\x80\x02X\x09\x00\x00\x00abc", "truncated"),
        (b"\x80\x06N.", "protocol"),
        (b"}K\x01K\x02K\x03u.", "MARK"),
        (b"(K\x01K\x02K\x03d.", "odd"),
        (b"\x80\x02N\x8b\xff\xff\xff\xff.", "negative"),
    ],
)
def test_malformed(data: bytes, message: str) -> None:
    result = walk(data)
    sl200 = [a for a in result.anomalies if a.code == "SL200"]
    assert sl200 and message.lower() in sl200[0].message.lower()
    assert not result.complete


# -- frames ----------------------------------------------------------------------------------------


def test_real_frames_are_clean() -> None:
    data = pickle.dumps([list(range(5000)), "x" * 70000, b"y" * 100], protocol=5)
    assert data.count(b"\x95") >= 2
    result = walk(data)
    assert result.anomalies == [] and result.complete


def test_lying_frame_crossing() -> None:
    data = b"\x80\x04" + pb.frame(b"cbui", 4) + b"ltins\nexec\n."
    result = walk(data)
    assert "SL107" in codes(result)
    assert [i.qualname for i in result.imports] == ["builtins.exec"]  # what pickle.loads sees


def test_frame_inside_frame_and_past_stop() -> None:
    inner = pb.frame(b"N.", 2)
    nested = walk(b"\x80\x04" + pb.frame(inner, len(inner)))
    assert "SL107" in codes(nested)
    past = walk(b"\x80\x04" + pb.frame(b"N.", 4) + b"N.")
    assert "SL107" in codes(past)
    beyond = walk(b"\x80\x04" + pb.frame(b"N.", 1000))
    assert codes(beyond)[:2] == ["SL107", "SL200"]


# -- limits and denial of service -----------------------------------------------------------------


def billion_laughs(levels: int = 40, fan: int = 10) -> bytes:
    """Each level: a list of ``fan`` references to the previous one (10**40 leaves)."""
    out = pb.proto(4) + pb.EMPTY_LIST + pb.MEMOIZE
    for level in range(levels):
        out += pb.MARK + pb.get(level) * fan + pickle.LIST + pb.MEMOIZE
    return out + pb.STOP


def test_billion_laughs_stays_small() -> None:
    data = billion_laughs()
    tracemalloc.start()
    try:
        result = walk(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.complete and result.anomalies == []
    assert result.values == [UNKNOWN]  # folding gives up instead of expanding
    assert peak < 2 << 20


def test_huge_long_is_bounded() -> None:
    text = walk(b"L" + b"9" * 100_000 + b"L\n.")
    assert codes(text) == ["SL203"]
    binary = walk(b"\x80\x02\x8b" + struct.pack("<i", 50_000) + b"\x01" * 50_000 + b".")
    assert codes(binary) == ["SL203"]
    ok = walk(pickle.dumps(2**1000, protocol=2))
    assert ok.complete and ok.values == [2**1000]


def test_limits_stop_the_walk_and_keep_imports(marker: Path) -> None:
    payload = pb.exec_payload(marker, protocol=2)[:-1]  # without STOP
    filler = b"N0" * 100
    cases = [
        (Limits(max_opcodes=50), payload + filler + b"N."),
        (Limits(max_stack_depth=20), payload + b"N" * 50 + b"."),
        (Limits(max_nesting_depth=10), payload + b"(" * 30 + b"N."),
        (Limits(max_nesting_depth=10), payload + b"N" + b"\x85" * 30 + b"."),
        (Limits(max_memo=10), payload + b"r" + struct.pack("<I", 50) + b"."),
        (Limits(max_memo=10), payload + b"N\x94" * 30 + b"."),
    ]
    for limits, data in cases:
        result = walk(data, limits=limits)
        assert "SL203" in codes(result), limits
        assert [i.qualname for i in result.imports] == ["builtins.exec"]
        assert not result.complete


def test_deep_tuples_mark_the_stream_unsafe_to_replay() -> None:
    data = b"\x80\x02N" + b"\x85" * 3000 + b"."
    result = walk(data, limits=Limits(max_nesting_depth=5000))
    assert result.replay_hazard and "nested" in result.replay_hazard
    assert walk(pickle.dumps((((1,),),))).replay_hazard is None


def test_colliding_hash_keys_mark_the_stream_unsafe_to_replay() -> None:
    modulus = (1 << 61) - 1
    items = b"".join(
        b"\x8a\x0a" + (k * modulus).to_bytes(10, "little", signed=True) + b"N" for k in range(1, 1500)
    )
    data = b"\x80\x02}(" + items + b"u."
    assert walk(data).replay_hazard is not None
    benign = pickle.dumps({i: i for i in range(3000)}, protocol=2)
    assert walk(benign).replay_hazard is None


# -- joblib ----------------------------------------------------------------------------------------


def joblib_bytes(obj: object, **kw: Any) -> bytes:
    joblib = pytest.importorskip("joblib")
    buf = io.BytesIO()
    joblib.dump(obj, buf, **kw)
    return buf.getvalue()


def test_joblib_arrays_are_skipped() -> None:
    np = pytest.importorskip("numpy")
    obj = {
        "f": np.arange(12.0).reshape(3, 4),
        "i": np.asfortranarray(np.arange(6, dtype=">i2").reshape(2, 3)),
        "s": np.array(["ab", "c"]),
        "z": np.zeros((0, 5)),
        "scalar": np.array(3.5),
        "rec": np.zeros(2, dtype=[("a", "f4"), ("b", "i8", (2,))]),
        "obj": np.array([1, "x", None], dtype=object),
        "tail": "end",
    }
    data = joblib_bytes(obj)
    result = walk(data, joblib_arrays=True)
    assert result.anomalies == [] and result.complete and result.end == len(data)
    names = {i.qualname for i in result.imports}
    assert "joblib.numpy_pickle.NumpyArrayWrapper" in names and "numpy.dtype" in names
    # The object array's nested pickle was walked as part of the stream.
    assert any("_reconstruct" in n for n in names)
    plain = walk(data, joblib_arrays=False)
    assert not plain.complete


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_joblib_every_protocol(protocol: int) -> None:
    np = pytest.importorskip("numpy")
    data = joblib_bytes([np.arange(5), np.ones(3, dtype="f4")], protocol=protocol)
    result = walk(data, joblib_arrays=True)
    assert result.anomalies == [] and result.complete


def test_joblib_object_array_payload_is_seen(marker: Path) -> None:
    np = pytest.importorskip("numpy")
    data = joblib_bytes(np.array([None, None], dtype=object))
    nested_start = data.index(b"\x80\x05", 2)
    evil = data[:nested_start] + pb.exec_payload(marker, protocol=5)
    result = walk(evil, joblib_arrays=True)
    assert "builtins.exec" in {i.qualname for i in result.imports}


def test_joblib_wrapper_with_unknown_state() -> None:
    body = pb.glob("joblib.numpy_pickle", "NumpyArrayWrapper") + pb.EMPTY_TUPLE + pb.NEWOBJ
    body += pb.EMPTY_DICT + pb.unicode("shape") + pb.call(pb.glob("m", "f")) + pb.SETITEM + pb.BUILD
    result = walk(pb.wrap(body, 2), joblib_arrays=True)
    assert any(a.code == "SL200" and "joblib" in a.message for a in result.anomalies)


def test_a_broken_walk_leaves_no_reference_cycle() -> None:
    """A walk that stops must not keep its frames (and through them the scanned buffer, up to a
    decompressed gigabyte) alive until the cyclic collector happens to run."""
    broken = b"\x80\x04" + b"K\x01" * 10 + b"\xff"
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        result = walk(broken)
        gc.collect()
        frames = [o for o in gc.garbage if isinstance(o, types.FrameType)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not result.complete
    assert frames == []


def test_a_copy_of_a_walk_has_its_own_anomalies() -> None:
    data = pickle.dumps({"a": 1}, protocol=2) + b"junk"
    result = walk(data, multi=False)
    copied = result.with_own_anomalies()
    assert copied == result and copied is not result
    copied.anomalies.append(copied.anomalies[0])
    assert len(copied.anomalies) == len(result.anomalies) + 1
    changed = result.replaced(complete=True, values=[])
    assert changed.complete and changed.values == [] and not result.complete and result.values
    with pytest.raises(TypeError):
        result.replaced(no_such_field=1)


def test_runs_of_small_ints_stop_where_the_loop_would_check() -> None:
    ints = b"".join(b"K" + bytes([i]) for i in range(40))
    # a list of 40 BININT1, taken as one run: the same values, opcodes and offsets as one by one
    data = b"\x80\x02]q\x00(" + ints + b"e."
    result = walk(data, multi=False)
    assert result.complete and result.values == [list(range(40))]
    assert result.opcodes == 46  # PROTO ] q ( K*40 e .
    # the opcode limit falls inside the run: the walk stops there, as it would one at a time
    limited = walk(data + b"", limits=Limits(max_opcodes=20), multi=False)
    assert codes(limited) == ["SL203"] and limited.opcodes == 20
    # a FRAME that ends between a BININT1 and its argument: the opcode crosses the frame end
    body = b"]q\x00(" + ints[:21]  # ends right after the 11th BININT1's opcode byte
    framed = b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body + ints[21:] + b"e."
    crossing = walk(framed, multi=False)
    sl107 = [a for a in crossing.anomalies if a.code == "SL107"]
    assert len(sl107) == 1 and sl107[0].offset == 11 + len(body) - 1
    assert crossing.values == [list(range(40))]


@pytest.mark.parametrize("limit", [1, 2, 7, 37, 200])
def test_the_opcode_limit_is_exact_whatever_the_opcodes_length(limit: int) -> None:
    # The loop head checks by position (every opcode takes at least one byte); long opcodes must
    # neither let more opcodes through nor stop the walk early.
    ops = [b"\x8c\x10" + b"x" * 16 + b"0", b"N0", b"J\x01\x00\x00\x000"]  # each pushes and pops
    body = b"".join(ops[i % 3] for i in range(300))
    data = b"\x80\x04\x95" + struct.pack("<Q", len(body) + 2) + body + b"N."
    whole = walk(data, multi=False)
    assert whole.complete and whole.opcodes == 2 + 600 + 2
    limited = walk(data, limits=Limits(max_opcodes=limit), multi=False)
    assert codes(limited) == ["SL203"] and limited.opcodes == limit
