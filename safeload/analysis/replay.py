"""Cross-check the walker against CPython's own unpickler, run on the same bytes with inert stubs.

``find_class`` and ``persistent_load`` are replaced by recorders that return stubs (see
``stubs.py``): nothing the file names is imported or called. The C unpickler reads a stream
differently depending on the file object under it (THREATS.md §3: a lying FRAME), so each stream
is replayed through every reader kind real loaders use:

* ``file``: a buffered file as ``open(path, "rb")`` gives (``pickle.load``, legacy ``torch.load``);
  an ``io.BufferedReader`` over an in-memory raw stream, so ``peek`` behaves exactly like a file's;
* ``bytesio``: ``io.BytesIO``, which has no ``peek`` (``torch.load`` of a zip checkpoint);
* ``bytes``: ``pickle.loads``, which unpickles from one in-memory buffer. ``loads`` cannot take a
  ``find_class`` override, so the same C code path is reached through a reader whose ``peek``
  hands over everything left at once: the C unpickler then buffers the whole rest, as ``loads``.

The readers can only part ways at a FRAME that lies: without frames, every read either consumes
exactly what it asked for or (with ``peek``) tells the file how much it consumed; an honest frame
ends on an opcode boundary inside the data and before its STOP, so every reader resumes at the same
byte after it. A stream whose walk found no lying FRAME (no SL107) is therefore replayed through
``bytes`` alone, and through the other two as well when that replay disagrees with the walker in
any way. (What that leaves to trust: that a walker which agrees with ``bytes`` on every import also
parsed the same opcodes, so saw every FRAME that replay ran.)

A stream that cannot import through any reader needs no replay (``could_import``). The C
unpickler calls ``find_class`` only for STACK_GLOBAL, EXT1/2/4, and GLOBAL and INST after reading
their two arguments, each a line that must end in a newline (through every reader; it never reads
backwards). So bytes without any of those four one-byte opcodes, and without a ``c`` or ``i`` byte
that two newlines follow, import nothing, however they parse: there is nothing to compare.

joblib streams are read by joblib's pure-Python unpickler, which also reads array bytes between
opcodes; they get one replay (``joblib``) through ``pickle._Unpickler`` doing the same. Other
streams read the way pickle.py reads them (joblib.load of a plain pickle) get one replay
(``pickle.py``) through ``pickle._Unpickler`` alone.

The C unpickler's ``find_class`` applies the Python 2 name mapping itself, so an override receives
the names as written in the stream; the replay records those raw names and the comparison uses the
walker's raw names too (``ImportSite.raw``).
"""

from __future__ import annotations

import copyreg
import pickle
import re
from collections.abc import Callable
from typing import Any

import msgspec

from safeload.analysis import joblib_arrays as jl
from safeload.analysis.isolate import MEMORY_BOUND, run_bounded
from safeload.analysis.names import map_name
from safeload.analysis.readers import Payloads, open_reader
from safeload.analysis.stubs import Stub, StubMeta, is_stub, stub_class
from safeload.analysis.types import Anomaly, WalkResult
from safeload.limits import DEFAULT_LIMITS
from safeload.text import escape

try:
    import _pickle

    _CUnpickler: Any = _pickle.Unpickler
except ImportError:  # pragma: no cover - CPython always has it
    _CUnpickler = None

__all__ = ["READERS", "ReaderReplay", "ReplayResult", "could_import", "differential", "replay_imports"]

READERS = ("file", "bytesio", "bytes")
JOBLIB_READER = "joblib"
PY_READER = "pickle.py"


class ReaderReplay(msgspec.Struct):
    """What CPython's unpickler did through one reader kind."""

    reader: str
    imports: list[tuple[str, str]] = msgspec.field(default_factory=list)  # raw (module, name), in order
    pickles: int = 0  # loads that reached STOP
    persistent_ids: int = 0
    skipped_bytes: int = 0  # payload bytes passed over without copying
    error: str | None = None  # why it stopped early (escaped); None when it read to the end
    # Why safeload stopped it, not the stream (a bound on memory or time, a crash): what the
    # reader would import after that point is unknown.
    bounded: str | None = None

    @property
    def completed(self) -> bool:
        return self.error is None

    def as_json(self) -> dict[str, Any]:
        return {
            "reader": self.reader,
            "imports": [list(name) for name in self.imports],
            "pickles": self.pickles,
            "persistent_ids": self.persistent_ids,
            "skipped_bytes": self.skipped_bytes,
            "error": self.error,
            "memory": self.error is not None and self.error.startswith("MemoryError"),
        }

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> ReaderReplay:
        error = item["error"]
        return cls(
            reader=str(item["reader"]),
            imports=[(str(m), str(n)) for m, n in item["imports"]],
            pickles=int(item["pickles"]),
            persistent_ids=int(item["persistent_ids"]),
            skipped_bytes=int(item["skipped_bytes"]),
            error=error,
            bounded=MEMORY_BOUND if item["memory"] else None,
        )


# (offset, (module, name) as the stream wrote it); the name is None for a global the walker could
# not name (SL102/SL103). Plain tuples: a hostile stream has 200,000 of them.
_Slot = tuple[int, "tuple[str, str] | None"]


class ReplayResult(msgspec.Struct):
    replays: list[ReaderReplay] = msgspec.field(default_factory=list)
    skipped: str | None = None  # why no replay ran; None when the replays below ran
    # The walk the replays were checked against, and its import slots: differential() reuses them
    # for that same walk (building them costs a tenth of a hostile stream's scan).
    walk: WalkResult | None = None
    slots: list[_Slot] | None = None


# -- recorders -------------------------------------------------------------------------------------


class _Log:
    """Records the names find_class receives and hands out one stub class per name."""

    def __init__(self, replay: ReaderReplay) -> None:
        self.replay = replay
        self.imports = replay.imports
        self.classes: dict[tuple[str, str], StubMeta] = {}

    def find_class(self, module: Any, name: Any, proto: int = 3) -> StubMeta:
        """Record the raw name; the stub stands for what the loader would import under ``proto``."""
        key = (str(module), str(name))
        self.imports.append(key)
        cls = self.classes.get(key)
        if cls is None:
            cls = self.classes[key] = stub_class(*map_name(key[0], key[1], proto))
        return cls


if _CUnpickler is not None:

    class _CRecorder(_CUnpickler):  # type: ignore[misc, valid-type]
        """CPython's C unpickler with recorders in place of find_class and persistent_load."""

        def __init__(self, f: Any, log: _Log) -> None:
            # latin-1 never fails on STRING/BINSTRING: the replay reads on as far as any loader.
            super().__init__(f, encoding="latin1")
            self.find_class = log.find_class  # type: ignore[method-assign]
            self._sl_replay = log.replay

        def find_class(self, module: Any, name: Any) -> Any:  # replaced per instance
            raise pickle.UnpicklingError("replay recorder not initialised")

        def persistent_load(self, pid: Any) -> Any:
            self._sl_replay.persistent_ids += 1
            return Stub()


class _PyRecorder(pickle._Unpickler):  # type: ignore[name-defined, misc]
    """pickle.py's unpickler with recorders; with ``arrays``, joblib's reader: it also reads array
    bytes after each wrapper BUILD."""

    dispatch = pickle._Unpickler.dispatch.copy()  # type: ignore[attr-defined]

    def __init__(self, f: Any, log: _Log, arrays: bool) -> None:
        super().__init__(f, encoding="latin1")
        self._sl_file = f
        self._sl_log = log
        self._sl_arrays = arrays

    def find_class(self, module: Any, name: Any) -> Any:
        # pickle.py knows its protocol, so stubs get the mapped name (copy_reg -> copyreg) and the
        # copyreg helpers and joblib's wrapper are recognised as under a real load.
        return self._sl_log.find_class(module, name, self.proto)

    def persistent_load(self, pid: Any) -> Any:
        self._sl_log.replay.persistent_ids += 1
        return Stub()

    def get_extension(self, code: int) -> Any:
        # Never consult copyreg's process-wide registry or cache from a replay.
        raise pickle.UnpicklingError(f"extension code {code} (not resolved in a replay)")

    def load_build(self) -> None:
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]
        inst = self.stack[-1]
        if not self._sl_arrays or not isinstance(inst, Stub):
            return
        cls = type(inst)
        if not jl.is_wrapper(cls.sl_module, cls.sl_name):
            return
        attrs = inst.sl_attrs or {}
        read = jl.array_read(attrs, _dtype_info(attrs.get("dtype")))
        if isinstance(read, str):
            raise pickle.UnpicklingError(f"joblib array: {read}")
        f = self._sl_file
        if read.pickled:
            # joblib: a fresh pure-Python unpickler on the same file, with the outer find_class.
            inner = _PyRecorder(f, self._sl_log, False)
            inner.find_class = self.find_class  # type: ignore[method-assign]  # as joblib does
            inner.load()
        else:
            if read.padded:
                pad = f.read(1)
                f.read(pad[0] if pad else 0)
            # Only the position matters: skip the array bytes instead of reading them.
            end = f.tell() + read.nbytes
            if end > f.seek(0, 2):
                raise pickle.UnpicklingError("joblib array data truncated")
            f.seek(end)
        self.stack[-1] = Stub()

    dispatch[pickle.BUILD[0]] = load_build


def _dtype_info(dtype: Any) -> tuple[int, bool] | str:
    if not isinstance(dtype, Stub):
        return "wrapper dtype is not a numpy.dtype"
    cls = type(dtype)
    if f"{cls.sl_module}.{cls.sl_name}" not in jl.DTYPE_NAMES:
        return "wrapper dtype is not a numpy.dtype"
    spec = dtype.sl_args[0] if dtype.sl_args else None
    state = dtype.sl_states[-1] if dtype.sl_states else None
    return jl.dtype_info(spec, state)


# -- replay ----------------------------------------------------------------------------------------

# STACK_GLOBAL, EXT1, EXT2, EXT4: one byte is all they need.
_IMPORT_OPCODES = re.compile(b"[\x93\x82\x83\x84]")
# GLOBAL, INST: they import only after reading two newline-terminated lines.
_LINE_IMPORT_OPCODES = re.compile(b"[ci]")
# Larger streams are replayed without looking: they hold such bytes anyway, almost always.
_INERT_CHECK_MAX = 1 << 20


def could_import(data: bytes | bytearray | memoryview, walk: WalkResult, *, pure_python: bool) -> bool:
    """False only when no reader of ``data`` could import anything (see the module docstring), so
    that a replay would have nothing to compare; the walker saw no import either."""
    if pure_python:
        return True  # pickle.py also takes a last line without its newline: not modelled here
    if walk.imports or any(a.code in ("SL102", "SL103") for a in walk.anomalies):
        return True
    if len(data) > _INERT_CHECK_MAX:
        return True
    raw = bytes(data)
    if _IMPORT_OPCODES.search(raw):
        return True
    # A GLOBAL or INST byte must come before the second-to-last newline to have two lines after it.
    last = raw.rfind(b"\n")
    second_last = raw.rfind(b"\n", 0, last) if last > 0 else -1
    return second_last > 0 and _LINE_IMPORT_OPCODES.search(raw, 0, second_last) is not None


def hazard(walk: WalkResult) -> str | None:
    """Why the stream must not be replayed in this process; None when it may."""
    if any(a.code == "SL203" for a in walk.anomalies):
        return "the walker hit a resource limit"
    if walk.replay_hazard:
        return walk.replay_hazard
    if copyreg._extension_cache:  # type: ignore[attr-defined]
        # EXT opcodes would receive these live objects from the C unpickler, unseen by find_class.
        return "this process's copyreg extension cache holds live objects"
    if _CUnpickler is None:
        return "CPython's C unpickler is not available"
    return None


def replay_imports(
    data: bytes | bytearray | memoryview,
    *,
    multi: bool,
    joblib_arrays: bool = False,
    pure_python: bool = False,
    walk: WalkResult | None = None,
    max_pickles: int = DEFAULT_LIMITS.max_streams,
    release: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Replay ``data`` through CPython's unpickler with recorders, once per reader kind; through
    pickle.py's alone for a stream read the joblib way (``joblib_arrays``) or as pickle.py reads it
    (``pure_python``).

    ``walk``: the walker's result for the same bytes, used to refuse replays that could hang or
    crash the process; walked here when not given. Never raises on bad input.
    ``release``: drops pages of ``data`` (a mapped file's) the in-process replay has read past,
    as walker.walk does.
    """
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    if walk is None:
        from safeload.analysis.walker import walk as walk_fn

        walk = walk_fn(view, multi=multi, joblib_arrays=joblib_arrays, pure_python=pure_python)
    why = hazard(walk)
    if why is not None:
        return ReplayResult(skipped=why)
    payloads = walk.payloads
    result = ReplayResult()
    try:
        if joblib_arrays or pure_python:
            reader = JOBLIB_READER if joblib_arrays else PY_READER
            result.replays.append(_replay_one(reader, view, payloads, multi, max_pickles))
            return result
        # The in-memory reader is the cheapest: zero-copy, and a handful of Python-level calls.
        first = _replay_one("bytes", view, payloads, multi, max_pickles, release)
        result.replays.append(first)
        lying = any(a.code == "SL107" for a in walk.anomalies)
        result.walk, result.slots = walk, _slots(walk)
        if lying or _compare(result.slots, first) is not None:
            # Readers part ways only at a lying FRAME (see module docstring); without one in the
            # walk, and with the walker confirmed by one reader, the others read identically.
            # Their readings were never walked, so none of the walker's checks bounds them.
            result.replays.extend(_isolated(("file", "bytesio"), view, payloads, multi, max_pickles))
            result.replays.sort(key=lambda r: READERS.index(r.reader))
    finally:
        _purge_extension_cache()
    return result


def _replay_one(
    reader: str,
    view: memoryview,
    spans: list[tuple[int, int]],
    multi: bool,
    max_pickles: int,
    release: Callable[[int, int], None] | None = None,
) -> ReaderReplay:
    replay = ReaderReplay(reader=reader)
    log = _Log(replay)
    payloads = Payloads(spans)
    pure = reader in (JOBLIB_READER, PY_READER)
    # pickle.py reads exactly what it needs, so for its readers any file object will do.
    f: Any = open_reader("file" if pure else reader, view, payloads, release)
    try:
        while True:
            unpickler = _PyRecorder(f, log, reader == JOBLIB_READER) if pure else _CRecorder(f, log)
            unpickler.load()
            replay.pickles += 1
            if not multi or f.at_end():
                break
            if replay.pickles >= max_pickles:
                replay.error = f"stopped after {max_pickles} pickles"
                break
    except (Exception, RecursionError, MemoryError) as exc:  # broken streams fail here
        replay.error = escape(f"{type(exc).__name__}: {exc}", 200)
    finally:
        # The C unpickler caches what find_class returned for a registered EXT code; a stub left
        # there would be handed to the next reader (and to real loads) without a find_class call.
        _purge_extension_cache()
        replay.skipped_bytes = payloads.skipped
    return replay


# A replay in a child process may use this much memory beyond the parent's, plus a few times the
# stream (the readers copy it), and this long plus a second per 4 MiB.
_ISOLATED_MEMORY = 256 << 20
_ISOLATED_SECONDS = 20.0


def _isolated(
    readers: tuple[str, ...], view: memoryview, spans: list[tuple[int, int]], multi: bool, max_pickles: int
) -> list[ReaderReplay]:
    """Replays through ``readers``, run in a child process with bounded memory and time (see
    isolate.py). A replay that could not run to its end there says so in ``bounded``."""

    def step() -> list[dict[str, Any]]:
        return [_replay_one(reader, view, spans, multi, max_pickles).as_json() for reader in readers]

    done, why = run_bounded(
        step,
        memory_bytes=_ISOLATED_MEMORY + 3 * len(view),
        seconds=_ISOLATED_SECONDS + len(view) / (4 << 20),
    )
    if why is not None or not isinstance(done, list) or len(done) != len(readers):
        reason = why or "the replay process sent no result"
        return [ReaderReplay(reader=r, error=escape(reason, 200), bounded=reason) for r in readers]
    return [ReaderReplay.from_json(item) for item in done]


def _purge_extension_cache() -> None:
    """Drop any stub the C unpickler cached for a registered extension code."""
    cache = copyreg._extension_cache  # type: ignore[attr-defined]
    if not cache:
        return
    for code, obj in list(cache.items()):
        if is_stub(obj):
            cache.pop(code, None)


# -- comparison ------------------------------------------------------------------------------------


def _slots(walk: WalkResult) -> list[_Slot]:
    # An empty module name imports nothing (``__import__("")`` fails), on either side.
    slots: list[_Slot] = [
        (i.offset, i.raw or (i.module, i.name)) for i in walk.imports if (i.raw or (i.module,))[0]
    ]
    slots += [(a.offset, None) for a in walk.anomalies if a.code in ("SL102", "SL103")]
    slots.sort(key=_slot_offset)
    return slots


def _slot_offset(slot: _Slot) -> int:
    return slot[0]


def _show(name: tuple[str, str]) -> str:
    return escape(f"{name[0]}.{name[1]}", 120)


def _compare(slots: list[_Slot], replay: ReaderReplay) -> tuple[int, str] | None:
    """(offset, what differs), or None when the replay's imports agree with the walker's."""
    i = 0
    for k, name in enumerate(n for n in replay.imports if n[0]):
        if i >= len(slots):
            return (slots[-1][0] if slots else 0), (
                f"the unpickler imports {_show(name)} (import #{k + 1}), which the walker never saw"
            )
        offset, seen = slots[i]
        if seen is not None and seen != name:
            return offset, (
                f"the walker saw {_show(seen)} where the unpickler imports {_show(name)} (import #{k + 1})"
            )
        i += 1
    rest = [s for s in slots[i:] if s[1] is not None]
    if rest and replay.completed:
        offset, seen = rest[0]
        shown = _show(seen) if seen is not None else "an unresolved global"
        return (
            offset,
            f"the walker saw {shown}, which the unpickler never imports although it read to the end",
        )
    return None


def differential(walk: WalkResult, replays: ReplayResult) -> list[Anomaly]:
    """SL105 for every way a replay's imports differ from the walker's (naming the readers).

    The walker may legitimately see more than a replay that failed: it reads on where a loader
    stops. Globals the walker could not name (SL102, SL103) match whatever the replay resolved.
    """
    if replays.skipped is not None:
        if any(a.code == "SL203" for a in walk.anomalies):
            return []
        return [Anomaly("SL203", 0, f"cross-check with CPython's unpickler skipped: {replays.skipped}")]
    slots = replays.slots if replays.walk is walk and replays.slots is not None else _slots(walk)
    found: dict[tuple[int, str], list[str]] = {}
    # Where the readers part ways: the first lying FRAME, when there is one.
    parting = min((a.offset for a in walk.anomalies if a.code == "SL107"), default=0)
    stopped = [
        Anomaly(
            "SL203",
            parting,
            f"cross-check through the {r.reader} reader not run to its end: {escape(r.bounded, 200)}; "
            "what that reader imports past this offset is not known",
        )
        for r in replays.replays
        if r.bounded is not None
    ]
    for replay in replays.replays:
        diff = _compare(slots, replay)
        if diff is not None:
            found.setdefault(diff, []).append(replay.reader)
    return stopped + [
        Anomaly("SL105", offset, f"{message} (reader: {', '.join(readers)})")
        for (offset, message), readers in found.items()
    ]
