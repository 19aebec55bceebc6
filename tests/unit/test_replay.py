"""The CPython replay cross-check: reader kinds, stubs, guards, and the differential."""

from __future__ import annotations

import collections
import copyreg
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest

from safeload.analysis.replay import READERS, ReaderReplay, ReplayResult, differential, replay_imports
from safeload.analysis.stubs import Stub, StubMeta
from safeload.analysis.types import Anomaly, ImportSite, WalkResult
from safeload.analysis.walker import walk
from safeload.limits import Limits
from tests import pickle_builder as pb

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)
TYPED = {
    "s": {1, 2},
    "f": frozenset({3}),
    "b": b"xy",
    "ba": bytearray(b"z"),
    "od": collections.OrderedDict(a=[1, (2, 3)]),
    "c": complex(1, 2),
    "text": "é",
}


def check(data: bytes, *, multi: bool = True, joblib_arrays: bool = False) -> tuple[WalkResult, ReplayResult]:
    result = walk(data, multi=multi, joblib_arrays=joblib_arrays)
    replays = replay_imports(data, multi=multi, joblib_arrays=joblib_arrays, walk=result)
    return result, replays


def by_reader(replays: ReplayResult) -> dict[str, ReaderReplay]:
    return {r.reader: r for r in replays.replays}


def raw_imports(result: WalkResult) -> list[tuple[str, str]]:
    return [i.raw or (i.module, i.name) for i in result.imports]


# -- benign ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_benign_pickles_agree_in_every_reader(protocol: int) -> None:
    data = pickle.dumps(TYPED, protocol=protocol) + pickle.dumps([1, "two"], protocol=protocol)
    result, replays = check(data)
    assert replays.skipped is None
    # Readers can only differ at a lying FRAME: without one, one confirming reader stands for all.
    assert (result.frames > 0) == (protocol >= 4)
    assert [r.reader for r in replays.replays] == ["bytes"]
    for replay in replays.replays:
        assert replay.completed and replay.pickles == 2
        assert replay.imports == raw_imports(result)
    assert differential(result, replays) == []


def test_torch_checkpoint_agrees() -> None:
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"model": torch.nn.Linear(4, 2).state_dict(), "step": 3, "half": torch.ones(2).half()}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    result, replays = check(data, multi=False)
    assert differential(result, replays) == []
    for replay in replays.replays:
        assert replay.completed and replay.persistent_ids == 3
        assert ("torch", "HalfStorage") in replay.imports


def test_python2_names_are_compared_raw() -> None:
    data = pb.wrap(
        pb.glob("copy_reg", "_reconstructor") + pb.glob("__builtin__", "object") + pb.POP + pb.POP, 2
    )
    result, replays = check(data)
    assert [i.qualname for i in result.imports] == ["copyreg._reconstructor", "builtins.object"]
    assert by_reader(replays)["bytes"].imports == [
        ("copy_reg", "_reconstructor"),
        ("__builtin__", "object"),
    ]
    assert differential(result, replays) == []


def test_every_reader_runs_when_the_first_disagrees() -> None:
    data = pickle.dumps(TYPED, protocol=2)
    result = walk(data)
    assert result.frames == 0
    result.imports.pop()  # a walker that missed an import
    replays = replay_imports(data, multi=True, walk=result)
    assert [r.reader for r in replays.replays] == list(READERS)
    assert [a.code for a in differential(result, replays)] == ["SL105"]


def test_large_payloads_are_skipped_not_copied() -> None:
    from safeload.analysis.replay import _replay_one

    payload = b"\x01" * (8 << 20)
    data = pickle.dumps([payload, bytearray(payload), "tail"], protocol=5)
    result = walk(data)
    assert [n for _, n in result.payloads] == [len(payload)] * 2
    replays = replay_imports(data, multi=True, walk=result)
    assert differential(result, replays) == []
    for reader in READERS:
        replay = _replay_one(reader, memoryview(data), result.payloads, True, 10)
        assert replay.completed and replay.pickles == 1
        # A buffered file hands over what already sat in its buffer; the rest is never copied.
        assert 2 * len(payload) - 2 * 8192 <= replay.skipped_bytes <= 2 * len(payload), reader
    # Without the walker's payload list the in-memory reader copies them (its window covers all).
    copied = _replay_one("bytes", memoryview(data), [], True, 10)
    assert copied.skipped_bytes == 0 and copied.completed
    # Payloads cut short are still reported truncated.
    cut = data[: result.payloads[1][0] + 100]
    short = _replay_one("file", memoryview(cut), [], True, 10)
    assert short.error and "truncated" in short.error


# -- stubs never run anything ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_payloads_are_recorded_not_run(protocol: int, marker: Path) -> None:
    for data in [pb.exec_payload(marker, protocol), pb.system_payload(marker, protocol)]:
        result, replays = check(data)
        for replay in replays.replays:
            assert replay.completed and len(replay.imports) == 1
        assert differential(result, replays) == []
    assert not marker.exists()


def test_stubs_accept_anything_and_record() -> None:
    body = pb.glob("m", "C") + pb.tup(pb.binint(1)) + pb.NEWOBJ  # cls.__new__(cls, 1)
    body += pb.EMPTY_DICT + pb.unicode("x") + pb.binint(2) + pb.SETITEM + pb.BUILD
    body += pb.MARK + pb.binint(3) + pb.binint(4) + pb.SETITEMS + pb.MARK + pb.binint(5) + b"e"
    body += pb.unicode("attr") + pb.POP
    result, replays = check(pb.wrap(body, 2))
    assert differential(result, replays) == []
    assert all(r.completed for r in replays.replays)


def test_stub_classes_are_inert() -> None:
    from safeload.analysis.stubs import stub_class

    cls = stub_class("os", "system")
    assert isinstance(cls, StubMeta)
    inst = cls("rm -rf /")  # calling a stub only records its arguments
    assert isinstance(inst, Stub) and inst.sl_args == ("rm -rf /",)
    assert isinstance(inst.anything(1), Stub)
    with pytest.raises(AttributeError):
        _ = inst.__getinitargs__  # noqa: B018
    with pytest.raises(AttributeError):
        _ = cls.__getinitargs__  # noqa: B018
    inst.__setstate__(({"a": 1}, {"b": 2}))
    assert inst.sl_attrs == {"a": 1, "b": 2}


def test_distinct_globals_make_no_class_each() -> None:
    """A class costs about 7 us and 1 KB: a stream naming thousands of globals must not make one per
    name, while the names a replay looks at (copyreg helpers, joblib's wrapper, numpy's dtype) keep
    a class that says what it stands for."""
    from safeload.analysis.stubs import stub_class

    before = len(Stub.__subclasses__())
    body = b"".join(pb.glob(f"pkg{i}", "Thing") + pb.EMPTY_TUPLE + pb.NEWOBJ + pb.POP for i in range(300))
    result, replays = check(pb.wrap(body + pb.NONE, 2))
    assert len(result.imports) == 300
    assert differential(result, replays) == []
    assert all(r.completed for r in replays.replays)
    assert replays.replays[0].imports[:2] == [("pkg0", "Thing"), ("pkg1", "Thing")]
    assert len(Stub.__subclasses__()) - before <= 0
    assert stub_class("pkg0", "Thing") is stub_class("os", "system")
    wrapper = stub_class("joblib.numpy_pickle", "NumpyArrayWrapper")
    assert wrapper is not stub_class("os", "system")
    assert (wrapper.sl_module, wrapper.sl_name) == ("joblib.numpy_pickle", "NumpyArrayWrapper")
    dtype = stub_class("numpy", "core.multiarray.dtype")  # protocol 4's dotted spelling
    assert f"{dtype.sl_module}.{dtype.sl_name}" == "numpy.core.multiarray.dtype"
    made = stub_class("copyreg", "_reconstructor")(wrapper, object, None)
    assert type(made) is wrapper


# -- reader kinds: the lying FRAME ---------------------------------------------------------------


def lying_frame(module_tail: bytes = b"ltins", name: bytes = b"exec", pad: int = 0) -> bytes:
    """GLOBAL whose module line starts inside a FRAME and ends after it."""
    body = b"N0" * pad + b"cbui"
    return b"\x80\x04" + pb.frame(body, len(body)) + module_tail + b"\n" + name + b"\n."


def test_lying_frame_reads_differently_per_reader() -> None:
    data = lying_frame()
    result, replays = check(data)
    readers = by_reader(replays)
    assert readers["file"].imports == [("builtins", "exec")]
    assert readers["bytes"].imports == [("builtins", "exec")]
    assert readers["bytesio"].imports == [("ltins", "exec")]
    assert "SL107" in [a.code for a in result.anomalies]
    (sl105,) = differential(result, replays)
    assert sl105.code == "SL105" and "ltins.exec" in sl105.message and "bytesio" in sl105.message


def test_big_lying_frame_blinds_the_buffered_file_too() -> None:
    data = lying_frame(pad=4600)  # frame larger than the file buffer: read exactly, like BytesIO
    result, replays = check(data)
    readers = by_reader(replays)
    assert readers["file"].imports == [("ltins", "exec")]
    assert readers["bytes"].imports == [("builtins", "exec")]
    (sl105,) = differential(result, replays)
    assert "file" in sl105.message and "bytesio" in sl105.message


class _RealRecorder(pickle.Unpickler):
    def __init__(self, f: Any) -> None:
        super().__init__(f)
        self.seen: list[tuple[str, str]] = []

    def find_class(self, module: str, name: str) -> Any:
        self.seen.append((module, name))
        return Stub


@pytest.mark.parametrize("pad", [0, 4600])
def test_reader_kinds_match_the_real_ones(pad: int, tmp_path: Path) -> None:
    """Our in-memory readers behave like open(), io.BytesIO and pickle.loads on the same bytes."""
    tail = b"ltins_no_such_module_for_safeload"
    data = lying_frame(tail, b"x", pad)
    replays = by_reader(replay_imports(data, multi=False))
    path = tmp_path / "sample.pkl"
    path.write_bytes(data)
    with open(path, "rb") as f:
        real_file = _RealRecorder(f)
        real_file.load()
    assert replays["file"].imports == real_file.seen
    real_bytesio = _RealRecorder(io.BytesIO(data))
    real_bytesio.load()
    assert replays["bytesio"].imports == real_bytesio.seen
    # pickle.loads takes no find_class: the module it tries to import names what it read.
    with pytest.raises(ModuleNotFoundError) as err:
        pickle.loads(data)  # noqa: S301 - names only a module that does not exist
    assert replays["bytes"].imports == [(err.value.name, "x")]


# -- multi, broken tails ---------------------------------------------------------------------------


def test_payload_in_second_pickle_is_seen_by_every_reader(marker: Path) -> None:
    data = pickle.dumps({"a": 1}, protocol=4) + pb.exec_payload(marker, 4)
    result, replays = check(data)
    for replay in replays.replays:
        assert replay.imports == [("builtins", "exec")] and replay.pickles == 2
    assert differential(result, replays) == []
    single = replay_imports(data, multi=False, walk=walk(data, multi=False))
    assert all(r.imports == [] and r.pickles == 1 for r in single.replays)


def test_broken_tail_prefix_agrees(marker: Path) -> None:
    data = pb.exec_payload(marker, 2)[:-1] + b"\xff"
    result, replays = check(data)
    for replay in replays.replays:
        assert not replay.completed and replay.imports == [("builtins", "exec")]
    assert differential(result, replays) == []


def test_dynamic_stack_global_is_not_a_differential() -> None:
    data = pb.wrap(
        pb.call(pb.glob("builtins", "str"), pb.unicode("os")) + pb.unicode("system") + pb.STACK_GLOBAL, 4
    )
    result, replays = check(data)
    assert "SL102" in [a.code for a in result.anomalies]
    assert all("STACK_GLOBAL requires str" in (r.error or "") for r in replays.replays)
    assert differential(result, replays) == []


# -- the comparison itself -------------------------------------------------------------------------


def _walk_with(*names: tuple[str, str], wild_at: int | None = None) -> WalkResult:
    result = WalkResult()
    for i, (module, name) in enumerate(names):
        result.imports.append(ImportSite(module=module, name=name, offset=10 * (i + 1), opcode="GLOBAL"))
    if wild_at is not None:
        result.anomalies.append(Anomaly("SL102", wild_at, "dynamic"))
    return result


def _replays(*imports: tuple[str, str], error: str | None = None) -> ReplayResult:
    return ReplayResult(replays=[ReaderReplay(reader="file", imports=list(imports), pickles=1, error=error)])


def test_differential_rules() -> None:
    a, b, c = ("m", "a"), ("m", "b"), ("m", "c")
    assert differential(_walk_with(a, b), _replays(a, b)) == []
    # The unpickler imports something the walker never saw.
    (missing,) = differential(_walk_with(a), _replays(a, b))
    assert missing.code == "SL105" and "m.b" in missing.message and "never saw" in missing.message
    # Same position, different name.
    (swapped,) = differential(_walk_with(a, b), _replays(a, c))
    assert "m.b" in swapped.message and "m.c" in swapped.message
    # The walker reads on past a failing loader: fine. Past a loader that read everything: not.
    assert differential(_walk_with(a, b), _replays(a, error="truncated")) == []
    assert len(differential(_walk_with(a, b), _replays(a))) == 1
    # A name the walker could not resolve matches whatever the unpickler resolved there.
    assert differential(_walk_with(a, c, wild_at=15), _replays(a, b, c)) == []


def test_skipped_replay_is_reported_once() -> None:
    deep = b"\x80\x02}N" + b"\x85" * 3000 + b"\x88s."  # a deep tuple as a dict key: CPython crashes
    result = walk(deep, limits=Limits(max_nesting_depth=10_000))
    replays = replay_imports(deep, multi=True, walk=result)
    assert replays.skipped and not replays.replays
    (note,) = differential(result, replays)
    assert note.code == "SL203" and "skipped" in note.message
    limited = walk(deep)  # default limits: the walker itself stops
    assert replay_imports(deep, multi=True, walk=limited).skipped
    assert differential(limited, replay_imports(deep, multi=True, walk=limited)) == []
    # Without a walk the replay walks first, so the guard still holds.
    assert replay_imports(deep, multi=True).skipped


# -- EXT opcodes and copyreg -----------------------------------------------------------------------


def test_ext_codes_never_resolve_through_live_objects() -> None:
    data = pb.wrap(b"\x82\xf0" + pb.tup() + pb.REDUCE, 2)
    result, replays = check(data)
    assert all("extension code" in (r.error or "") for r in replays.replays)
    assert differential(result, replays) == []
    copyreg.add_extension("safeload_test_no_module", "thing", 240)
    try:
        result, replays = check(data)
        assert all(r.imports == [("safeload_test_no_module", "thing")] for r in replays.replays)
        assert differential(result, replays) == []  # the walker's SL103 matches it
        assert not any(isinstance(v, (Stub, StubMeta)) for v in copyreg._extension_cache.values())  # type: ignore[attr-defined]
    finally:
        copyreg.remove_extension("safeload_test_no_module", "thing", 240)
    copyreg._extension_cache[241] = print  # type: ignore[attr-defined]
    try:
        assert "extension cache" in (replay_imports(data, multi=True).skipped or "")
    finally:
        del copyreg._extension_cache[241]  # type: ignore[attr-defined]


# -- joblib ----------------------------------------------------------------------------------------


def test_joblib_replay_agrees_with_the_walker() -> None:
    joblib = pytest.importorskip("joblib")
    np = pytest.importorskip("numpy")
    obj = {"a": np.arange(10.0), "o": np.array([1, "x"], dtype=object), "s": np.array(["q"]), "n": 3}
    for protocol in (2, 4, 5):
        buf = io.BytesIO()
        joblib.dump(obj, buf, protocol=protocol)
        data = buf.getvalue()
        result, replays = check(data, multi=False, joblib_arrays=True)
        (replay,) = replays.replays
        assert replay.reader == "joblib" and replay.completed, replay.error
        assert replay.imports == raw_imports(result)
        assert differential(result, replays) == []


def test_joblib_array_size_lie_is_caught() -> None:
    """A wrapper whose shape claims more bytes than follow: both sides fail at the same place."""
    joblib = pytest.importorskip("joblib")
    np = pytest.importorskip("numpy")
    buf = io.BytesIO()
    joblib.dump(np.arange(4.0), buf, protocol=2)
    data = buf.getvalue().replace(b"K\x04\x85", b"K\x40\x85", 1)  # shape (4,) -> (64,)
    result, replays = check(data, multi=False, joblib_arrays=True)
    assert any(a.code == "SL200" for a in result.anomalies)
    assert not replays.replays[0].completed
    assert differential(result, replays) == []


def test_frame_spanning_stop_differs_between_readers() -> None:
    """A frame that ends inside the next pickle: BytesIO resumes after the frame, the others after STOP."""
    first = b"N."
    second = pb.wrap(pb.glob("os", "system"), 2)
    data = b"\x80\x04" + pb.frame(first + second[:3], len(first) + 3) + second[3:]
    result, replays = check(data)
    assert "SL107" in [a.code for a in result.anomalies]
    readers = by_reader(replays)
    assert readers["file"].pickles == readers["bytes"].pickles == 2
    assert readers["bytesio"].pickles != 2  # resumed mid-pickle after the frame
