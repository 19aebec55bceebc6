"""The opcode walker: every pickle opcode of protocols 0-5, run symbolically, nothing executed.

It keeps CPython's own unpickler state (object stack, mark stack with its "fence", memo, protocol)
and follows ``Modules/_pickle.c`` wherever the C and pure-Python unpicklers differ, because the C
one is what ``pickle.load`` and ``torch.load`` run; with ``pure_python`` it follows ``pickle.py``
instead, the unpickler joblib.load runs on every file. Rule of thumb: the walker may go on where a
loader would fail (it then reports more, never less), but it must never stop where a loader goes on.
Byte payloads are skipped by length, never copied; values are shared references, never copies.

It never raises on bad input: every problem is an :class:`Anomaly`, and every import seen before a
break stays in the result, because a loader has already run those when it fails.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import struct
import sys
from collections.abc import Callable

from safeload.analysis.names import map_name
from safeload.analysis.types import Anomaly, ImportSite, WalkResult
from safeload.analysis.values import EMPTY_TUP, Dct, Glob, Lst, Obj, Opaque, SetV, Tup, fold
from safeload.analysis.walk_args import HAZARD_TUPLE_DEPTH, Stop
from safeload.analysis.walk_semantics import Semantics
from safeload.limits import DEFAULT_LIMITS, Limits
from safeload.model import Use

__all__ = ["walk"]

_U4 = struct.Struct("<I").unpack_from
_I4 = struct.Struct("<i").unpack_from
_U8 = struct.Struct("<Q").unpack_from
_F8 = struct.Struct(">d").unpack_from
_NL = re.compile(b"\n")
# Consecutive BININT1 opcodes, each with its one-byte argument.
_BININT1_RUN = re.compile(b"(?:K.)+", re.DOTALL)

_NOFRAME = sys.maxsize
_HIGHEST_PROTOCOL = 5
_MAX_SSIZE = sys.maxsize
# Records kept per stream; past these the walk stops with a limit finding (memory stays bounded).
MAX_IMPORT_SITES = 200_000
MAX_ANOMALIES = 1_000
# Strings longer than this are validated in chunks and kept opaque (no module name is this long).
_BIG_STR = 1 << 20
# Byte payloads up to this size are kept as constants; longer ones are skipped.
_SMALL_BYTES = 4096
# Byte payloads from this size (outside frames) are listed so the replay need not copy them.
_PAYLOAD = 1 << 20
# Streams up to this size are walked from a bytes copy (see _as_buffer).
_COPY_SMALL = 1 << 20
# Past this many colliding dict/set keys, replaying the stream through CPython could crawl.
_HAZARD_COLLISIONS = 1_000
# What makes a tuple worth scanning for globals passed as arguments.
_HOLDERS = frozenset({Glob, Lst, Dct, SetV})


def walk(
    data: bytes | bytearray | memoryview,
    *,
    limits: Limits = DEFAULT_LIMITS,
    multi: bool = True,
    joblib_arrays: bool = False,
    pure_python: bool = False,
    fold_values: bool = True,
    max_sites: int = MAX_IMPORT_SITES,
    release: Callable[[int, int], None] | None = None,
) -> WalkResult:
    """Walk every pickle in ``data``; never raises on bad input.

    ``multi``: after a STOP, walk what follows as the next pickle (a loader that reads on, e.g. a
    raw file or the legacy torch sequence); otherwise bytes after the first STOP are reported.
    ``joblib_arrays``: skip the array bytes joblib's reader consumes after each
    ``NumpyArrayWrapper`` BUILD (object arrays: walk the nested pickle there). joblib reads with
    pickle.py, so this implies ``pure_python``.
    ``pure_python``: read as pickle.py's unpickler does where it parts from the C one (it reads on
    where the C unpickler stops: a FRAME cut short by the end of the data, a last line without its
    newline, INST's import before its MARK is checked).
    ``fold_values``: fill ``result.values`` with each pickle's constant-folded value (readers that
    need a value, such as the legacy format's header pickles); a policy scan does not need them.
    ``max_sites``: import sites after which the walk stops (SL203); at most MAX_IMPORT_SITES. A scan
    passes what its file may still take (analysis.budget), so that a stream past it is not walked
    to its end only to be refused.
    ``release``: drops the pages of ``data`` (a mapped file's) between two offsets; called for
    what the walk has read past, every RELEASE_EVERY bytes. The walk never reads back: the values
    it keeps are copies, and offsets.
    """
    buf = _as_buffer(data)
    walker = _Walker(
        buf,
        limits,
        joblib_arrays,
        fold_values,
        pure_python or joblib_arrays,
        min(max_sites, MAX_IMPORT_SITES),
        release if isinstance(buf, memoryview) else None,  # a bytes copy maps nothing
    )
    try:
        walker.run(multi)
    except MemoryError:
        walker.note("SL203", walker.last_offset, "memory exhausted while walking the stream")
        walker.result.complete = False
    except Exception as exc:  # a bug must fail closed, never escape
        walker.note("SL207", walker.last_offset, f"walker internal error: {type(exc).__name__}: {exc}")
        walker.result.complete = False
    walker.result.opcodes = walker.ops
    return walker.result


def _as_buffer(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    if isinstance(data, bytes):
        return data
    if len(data) <= _COPY_SMALL:
        # Indexing, slicing and searching bytes is several times cheaper than a memoryview's;
        # offsets are the same in the copy.
        return bytes(data)
    view = memoryview(data)
    if view.ndim != 1 or view.format not in ("B", "b", "c") or not view.c_contiguous:
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    elif view.format != "B":
        view = view.cast("B")
    return view


class _Walker(Semantics):
    def __init__(
        self,
        buf: bytes | memoryview,
        limits: Limits,
        joblib: bool,
        fold_values: bool = True,
        pure: bool = False,
        max_sites: int = MAX_IMPORT_SITES,
        release: Callable[[int, int], None] | None = None,
    ) -> None:
        self.buf = buf
        self.release = release
        self.released = 0  # offset up to which release() was called
        self.n = len(buf)
        self.limits = limits
        self.joblib = joblib
        self.fold_values = fold_values
        self.pure = pure  # read as pickle.py's unpickler does, not as the C one
        self.max_sites = max_sites
        self.result = WalkResult()
        self.ops = 0
        self.last_offset = 0
        self.dropped = 0
        self.first_proto: int | None = None
        self.hash_seen: dict[int, object] = {}
        self.collisions = 0
        self.np_pending: dict[int, Obj] = {}
        self.find_nl: Callable[[int], int]
        if isinstance(buf, bytes):
            self.find_nl = lambda pos: buf.find(b"\n", pos)
        else:
            search = _NL.search

            def find(pos: int) -> int:
                m = search(buf, pos)
                return -1 if m is None else m.start()

            self.find_nl = find

    # -- records -----------------------------------------------------------------------------------

    def _memo_beyond(self, idx: int, offset: int, limit: int) -> None:
        # The loader's bound, not the walk's: CPython grows its memo list to the index (gigabytes,
        # or a MemoryError) and reads on. The walk's memo is a dict, so it reads on too and judges
        # what follows; the note keeps the stream from passing.
        self.note("SL203", offset, f"memo index {idx} is beyond the memo limit {limit}")

    def note(self, code: str, offset: int, message: str, global_name: str | None = None) -> None:
        anomalies = self.result.anomalies
        if len(anomalies) >= MAX_ANOMALIES:
            self.dropped += 1
            return
        anomalies.append(Anomaly(code=code, offset=offset, message=message, global_name=global_name))

    def site(self, module: str, name: str, offset: int, opcode: str, proto: int) -> ImportSite:
        imports = self.result.imports
        if len(imports) >= self.max_sites:
            raise Stop("SL203", offset, f"more than {self.max_sites} imports in one stream")
        mapped = map_name(module, name, proto)
        site = ImportSite(
            module=mapped[0],
            name=mapped[1],
            offset=offset,
            opcode=opcode,
            raw=None if mapped == (module, name) else (module, name),
        )
        imports.append(site)
        return site

    # -- driver ------------------------------------------------------------------------------------

    def run(self, multi: bool) -> None:
        result, n = self.result, self.n
        if n == 0:
            self.note("SL200", 0, "empty stream: a loader fails with 'Ran out of input'")
            return
        pos = 0
        failed = False
        while True:
            start = pos
            try:
                pos, value = self.pickle(pos, None, self.joblib)
            except Stop as stop:
                failed = True
                self._failed(stop, start)
                break
            result.pickles += 1
            result.end = pos
            if self.fold_values:
                result.values.append(fold(value))
            if result.pickles == 2:
                self.note("SL202", start, "several pickles back to back; each was walked")
            if pos >= n:
                break
            if not multi:
                self.note("SL201", pos, f"{n - pos} bytes after the end of the pickle")
                failed = True
                break
            if result.pickles >= self.limits.max_streams:
                self.note("SL203", pos, f"more than {self.limits.max_streams} pickles back to back")
                failed = True
                break
        if self.dropped:
            # Past note()'s bound itself: the report says that anomalies went unrecorded.
            result.anomalies.append(
                Anomaly(
                    code="SL203",
                    offset=self.last_offset,
                    message=f"{self.dropped} further anomalies were not recorded",
                    global_name=None,
                )
            )
        result.protocol = self.first_proto if self.first_proto is not None else 0
        result.opcodes = self.ops
        if self.collisions > _HAZARD_COLLISIONS and result.replay_hazard is None:
            result.replay_hazard = f"{self.collisions} dict/set keys with colliding hashes"
        result.complete = not failed and not (
            result.anomalies and any(a.code in ("SL200", "SL203", "SL207") for a in result.anomalies)
        )

    def _failed(self, stop: Stop, start: int) -> None:
        trailing = self.result.pickles > 0
        if trailing and stop.code == "SL200" and stop.offset == start:
            # Not even one opcode: garbage or padding after the last pickle, not a pickle.
            self.note("SL201", start, f"{self.n - start} bytes after the last pickle are not a pickle")
            return
        self.note(stop.code, stop.offset, stop.message)
        if trailing:
            self.note("SL201", start, f"the data after pickle {self.result.pickles} is a broken pickle")

    # -- one pickle --------------------------------------------------------------------------------

    def pickle(self, pos: int, name_proto: int | None, joblib: bool) -> tuple[int, object]:
        """Walk one pickle from ``pos`` to its STOP; returns (offset after STOP, returned value).

        ``name_proto``: the protocol that decides the Python 2 name mapping, when it is not this
        pickle's own (joblib's nested pickles borrow the outer unpickler's ``find_class``).
        """
        buf, n, limits = self.buf, self.n, self.limits
        stack: list[object] = []
        marks: list[int] = []
        memo: dict[int, object] = {}
        append = stack.append
        fence = 0
        proto = 0
        fend = _NOFRAME  # end of the current frame
        op_start = pos
        max_memo = limits.max_memo
        max_ops = limits.max_opcodes
        depth_check = min(limits.max_nesting_depth, HAZARD_TUPLE_DEPTH)
        step = max(1, min(1024, limits.max_stack_depth, limits.max_memo, limits.max_nesting_depth))
        ops = self.ops
        # The loop head does its work only once pos reaches `due`: the end of the current frame, or
        # `check_pos`, where the periodic limit checks run. Every opcode takes at least one byte,
        # so checks `step` bytes apart are at most `step` opcodes apart, and no more opcodes than
        # max_opcodes allows can pass before one (position-based: one comparison per opcode).
        # An empty stack, marks and memo pass every check but the opcode count (earlier pickles').
        left = max_ops - ops
        check_pos = pos + (step if step < left else left if left > 0 else 0)
        due = check_pos
        self.last_offset = pos
        mproto = name_proto  # protocol for the name mapping; None: follow PROTO
        np_pending = self.np_pending  # mutated in place: truthy while a numpy object awaits its BUILD
        took = self._took

        try:
            while True:
                if pos >= due:
                    if pos >= fend:
                        if pos > fend:
                            self.note(
                                "SL107",
                                op_start,
                                f"an opcode crosses the end of a FRAME (frame ends at {fend})",
                            )
                        fend = _NOFRAME
                    if pos >= check_pos:
                        self.ops = ops
                        self._periodic(ops, pos, stack, marks, memo)
                        left = max_ops - ops
                        check_pos = pos + (step if step < left else left)
                    due = fend if fend < check_pos else check_pos
                ops += 1
                op_start = pos
                op = buf[pos]
                pos += 1

                if op == 0x71 or op == 0x94:  # BINPUT, MEMOIZE
                    if len(stack) <= fence:
                        raise self._underflow(op_start, marks)
                    if op == 0x71:  # BINPUT
                        memo[buf[pos]] = stack[-1]
                        pos += 1
                    else:
                        memo[len(memo)] = stack[-1]
                elif op == 0x72:  # LONG_BINPUT
                    idx = _U4(buf, pos)[0]
                    pos += 4
                    if len(stack) <= fence:
                        raise self._underflow(op_start, marks)
                    if idx >= max_memo:
                        self._memo_beyond(idx, op_start, max_memo)
                    memo[idx] = stack[-1]
                elif op == 0x68:  # BINGET
                    try:
                        append(memo[buf[pos]])
                    except KeyError:
                        raise Stop("SL200", op_start, f"memo value not found at index {buf[pos]}") from None
                    pos += 1
                elif op == 0x4B:  # BININT1
                    append(buf[pos])
                    pos += 1
                    # Runs of BININT1 (list and tuple contents) are taken in one slice, without the
                    # dispatch; anything the loop head would check (an opcode crossing the frame or
                    # data end, periodic limits) is left to it.
                    if pos < n and buf[pos] == 0x4B:
                        # Up to `due` at most: the frame's end and the next checks stay the loop
                        # head's to see.
                        run = _BININT1_RUN.match(buf, pos, due if due < n else n)
                        if run is not None:
                            end = run.end()
                            stack.extend(buf[pos + 1 : end : 2])
                            ops += (end - pos) >> 1
                            op_start = end - 2
                            pos = end
                elif op == 0x8C or op == 0x58:  # SHORT_BINUNICODE, BINUNICODE
                    if op == 0x8C:  # SHORT_BINUNICODE
                        size = buf[pos]
                        pos += 1
                    else:
                        size = _U4(buf, pos)[0]
                        pos += 4
                    end = pos + size
                    if end > n:
                        raise self._truncated(op_start)
                    append(
                        self._text(pos, end, op_start)
                        if size > _BIG_STR
                        else str(buf[pos:end], "utf-8", "surrogatepass")
                    )
                    pos = end
                elif op == 0x28:  # MARK
                    fence = len(stack)
                    marks.append(fence)
                elif op == 0x85 or op == 0x86 or op == 0x87:  # TUPLE1, TUPLE2, TUPLE3
                    k = op - 0x84
                    if len(stack) - k < fence:
                        raise self._underflow(op_start, marks)
                    items = tuple(stack[-k:])
                    del stack[-k:]
                    if np_pending:
                        took(items)
                    d = 1
                    g = False
                    for it in items:
                        ti = type(it)
                        if ti is Tup:
                            if it.depth >= d:
                                d = it.depth + 1
                            g = g or it.g
                        elif ti in _HOLDERS:
                            g = True
                    if d > depth_check:
                        self._deep(d, op_start)
                    append(Tup(items, d, g))
                elif op == 0x52:  # REDUCE
                    if len(stack) - 2 < fence:
                        raise self._underflow(op_start, marks)
                    args = stack.pop()
                    if np_pending:
                        took((stack[-1], args))
                    stack[-1] = self._call(stack[-1], args)
                elif op == 0x74:  # TUPLE
                    if not marks:
                        raise self._no_mark(op_start)
                    x = marks.pop()
                    fence = marks[-1] if marks else 0
                    items = tuple(stack[x:])
                    del stack[x:]
                    if np_pending:
                        took(items)
                    if items:
                        d = 1
                        g = False
                        for it in items:
                            ti = type(it)
                            if ti is Tup:
                                if it.depth >= d:
                                    d = it.depth + 1
                                g = g or it.g
                            elif ti in _HOLDERS:
                                g = True
                        if d > depth_check:
                            self._deep(d, op_start)
                        append(Tup(items, d, g))
                    else:
                        append(EMPTY_TUP)
                elif op == 0x29:  # EMPTY_TUPLE
                    append(EMPTY_TUP)
                elif op == 0x89 or op == 0x88:  # NEWFALSE, NEWTRUE
                    append(op == 0x88)
                elif op == 0x51:  # BINPERSID
                    if len(stack) <= fence:
                        raise self._underflow(op_start, marks)
                    if np_pending:
                        took(stack[-1])
                    stack[-1] = self._persistent(stack[-1], op_start)
                elif op == 0x6A:  # LONG_BINGET
                    idx = _U4(buf, pos)[0]
                    pos += 4
                    try:
                        append(memo[idx])
                    except KeyError:
                        raise Stop("SL200", op_start, f"memo value not found at index {idx}") from None
                elif op == 0x4E:  # NONE
                    append(None)
                elif op == 0x4D:  # BININT2
                    append(buf[pos] | (buf[pos + 1] << 8))
                    pos += 2
                elif op == 0x4A:  # BININT
                    append(_I4(buf, pos)[0])
                    pos += 4
                elif op == 0x7D:  # EMPTY_DICT
                    append(Dct([]))
                elif op == 0x5D:  # EMPTY_LIST
                    append(Lst([]))
                elif op == 0x75 or op == 0x73:  # SETITEMS, SETITEM
                    if op == 0x75:  # SETITEMS
                        if not marks:
                            raise self._no_mark(op_start)
                        x = marks.pop()
                        fence = marks[-1] if marks else 0
                    else:
                        x = len(stack) - 2
                    size = len(stack)
                    if x > size or x <= fence:
                        raise self._underflow(op_start, marks)
                    if size > x:
                        if (size - x) & 1:
                            raise Stop("SL200", op_start, "odd number of items for SETITEMS")
                        items = stack[x:]
                        del stack[x:]
                        if np_pending:
                            took(items)
                        self._setitems(stack[-1], items)
                elif op == 0x65 or op == 0x61:  # APPENDS, APPEND
                    if op == 0x65:  # APPENDS
                        if not marks:
                            raise self._no_mark(op_start)
                        x = marks.pop()
                        fence = marks[-1] if marks else 0
                    else:
                        x = len(stack) - 1
                    size = len(stack)
                    if x > size or x <= fence:
                        raise self._underflow(op_start, marks)
                    if size > x:
                        items = stack[x:]
                        del stack[x:]
                        if np_pending:
                            took(items)
                        target = stack[-1]
                        if type(target) is Lst:
                            target.items.extend(items)
                        elif type(target) is Obj:
                            if target.items is None:
                                target.items = []
                            target.items.extend(items)
                elif op == 0x47:  # BINFLOAT
                    append(_F8(buf, pos)[0])
                    pos += 8
                elif op == 0x63 or op == 0x69:  # GLOBAL, INST
                    x = -1
                    enc = "utf-8" if op == 0x63 else "ascii"
                    opname = "GLOBAL" if op == 0x63 else "INST"
                    cut = False
                    if self.pure:
                        # pickle.py imports before it looks for INST's MARK, and at the end of the
                        # data takes a line without its newline (dropping its last byte instead):
                        # it then still imports, and INST calls, before it finds no next opcode.
                        pos, module, name = self._py_names(pos, op_start, enc)
                        site = self.site(module, name, op_start, opname, proto if mproto is None else mproto)
                        if not module:  # __import__("") fails: nothing is imported
                            raise Stop("SL200", op_start, "empty module name")
                        cut = pos > n
                    if op == 0x69:  # INST
                        if not marks:
                            raise self._no_mark(op_start)
                        x = marks.pop()
                        fence = marks[-1] if marks else 0
                    if not self.pure:
                        pos, module, name = self._c_names(pos, op_start, enc)
                        site = self.site(module, name, op_start, opname, proto if mproto is None else mproto)
                    if op == 0x63:  # GLOBAL
                        append(Glob(site))
                    else:
                        site.use(Use.INSTANTIATED)
                        items = tuple(stack[x:])
                        del stack[x:]
                        if np_pending:
                            took(items)
                        args_t = Tup(items, 1) if items else EMPTY_TUP
                        self._mark(args_t, Use.ARGUMENT)
                        inst = Obj(site, site, args_t)
                        self._made(inst)
                        append(inst)
                    if cut:
                        raise self._truncated(op_start)
                elif op == 0x93:  # STACK_GLOBAL
                    if len(stack) - 2 < fence:
                        raise self._underflow(op_start, marks)
                    name_v = stack.pop()
                    module_v = stack[-1]
                    if type(module_v) is str and type(name_v) is str:
                        site = self.site(
                            module_v, name_v, op_start, "STACK_GLOBAL", proto if mproto is None else mproto
                        )
                        stack[-1] = Glob(site)
                    else:
                        self._dynamic(module_v, name_v, op_start)
                        stack[-1] = Glob(None)
                elif op == 0x62:  # BUILD
                    if len(stack) - 2 < fence:
                        raise self._underflow(op_start, marks)
                    state = stack.pop()
                    built = self._build(stack[-1], state, op_start)
                    if np_pending:
                        took(state)
                    if built and joblib:
                        if fend != _NOFRAME and pos < fend:
                            self.note("SL107", op_start, "joblib array data inside an unfinished FRAME")
                            raise Stop(
                                "SL200", op_start, "joblib reads this array after the frame; not modelled"
                            )
                        self.ops = ops
                        pos = self._array(stack[-1], pos, op_start, proto if mproto is None else mproto)
                        ops = self.ops
                        fend = _NOFRAME  # the frame (if any) ended at the BUILD
                        check_pos = due = pos  # a nested pickle may have walked many opcodes
                        stack[-1] = Obj(None, None, None)
                elif op == 0x81 or op == 0x92:  # NEWOBJ, NEWOBJ_EX
                    k = 2 if op == 0x81 else 3
                    if len(stack) - k < fence:
                        raise self._underflow(op_start, marks)
                    if k == 3:
                        kwargs = stack.pop()
                        self._mark(kwargs, Use.ARGUMENT)
                        if np_pending:
                            took(kwargs)
                    args = stack.pop()
                    if np_pending:
                        took((stack[-1], args))
                    stack[-1] = self._new(stack[-1], args)
                elif op == 0x95:  # FRAME
                    size = _U8(buf, pos)[0]
                    pos += 8
                    if fend != _NOFRAME:
                        self.note(
                            "SL107",
                            op_start,
                            f"FRAME opened inside an unfinished frame (which ends at {fend})",
                        )
                    if size > _MAX_SSIZE or pos + size > n:
                        self.note("SL107", op_start, f"FRAME declares {size} bytes, past the end of the data")
                        if not self.pure:
                            raise Stop("SL200", op_start, "FRAME runs past the end of the data")
                        # pickle.py takes what is left as the frame and unpickles it.
                        size = n - pos
                    fend = pos + size
                    if fend < due:
                        due = fend
                    self.result.frames += 1
                elif op == 0x80:  # PROTO
                    p = buf[pos]
                    pos += 1
                    if p > _HIGHEST_PROTOCOL:
                        raise Stop("SL200", op_start, f"unsupported pickle protocol: {p}")
                    proto = p
                    if self.first_proto is None:
                        self.first_proto = p
                elif op == 0x2E:  # STOP
                    if len(stack) <= fence:
                        raise self._underflow(op_start, marks)
                    if fend != _NOFRAME and fend > pos:
                        self.note("SL107", op_start, f"the last FRAME extends {fend - pos} bytes past STOP")
                    self.ops = ops
                    if self.first_proto is None:
                        self.first_proto = proto
                    return pos, stack.pop()
                elif (
                    op == 0x43 or op == 0x42 or op == 0x8E or op == 0x96
                ):  # SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
                    if op == 0x43:  # SHORT_BINBYTES
                        size = buf[pos]
                        pos += 1
                    elif op == 0x42:  # BINBYTES
                        size = _U4(buf, pos)[0]
                        pos += 4
                    else:
                        size = _U8(buf, pos)[0]
                        pos += 8
                    end = pos + size
                    if end > n:
                        raise self._past_end(op_start, size)
                    if op == 0x96:  # BYTEARRAY8
                        append(Opaque("bytearray"))
                    else:
                        append(bytes(buf[pos:end]) if size <= _SMALL_BYTES else Opaque("bytes"))
                    if size >= _PAYLOAD and fend == _NOFRAME:
                        self.result.payloads.append((pos, size))
                    pos = end
                elif op == 0x54 or op == 0x55:  # BINSTRING, SHORT_BINSTRING
                    if op == 0x55:  # SHORT_BINSTRING
                        size = buf[pos]
                        pos += 1
                    else:
                        size = _U4(buf, pos)[0]  # unsigned in C (pickle.py refuses negatives)
                        pos += 4
                    end = pos + size
                    if end > n:
                        raise self._truncated(op_start)
                    append(self._ascii(buf[pos:end]) if size <= _SMALL_BYTES else Opaque("str"))
                    pos = end
                elif op == 0x8F:  # EMPTY_SET
                    append(SetV([], False))
                elif op == 0x90:  # ADDITEMS
                    if not marks:
                        raise self._no_mark(op_start)
                    x = marks.pop()
                    fence = marks[-1] if marks else 0
                    size = len(stack)
                    if x > size or x <= fence:
                        raise self._underflow(op_start, marks)
                    if size > x:
                        items = stack[x:]
                        del stack[x:]
                        if np_pending:
                            took(items)
                        target = stack[-1]
                        if type(target) is SetV:
                            self._keys(items)
                            target.items.extend(items)
                        elif type(target) is Obj:
                            if target.items is None:
                                target.items = []
                            target.items.extend(items)
                elif op == 0x91 or op == 0x6C or op == 0x64:  # FROZENSET, LIST, DICT
                    if not marks:
                        raise self._no_mark(op_start)
                    x = marks.pop()
                    fence = marks[-1] if marks else 0
                    items = stack[x:]
                    del stack[x:]
                    if np_pending:
                        took(items)
                    if op == 0x6C:  # LIST
                        append(Lst(items))
                    elif op == 0x91:  # FROZENSET
                        self._keys(items)
                        append(SetV(items, True))
                    else:
                        if len(items) & 1:
                            raise Stop("SL200", op_start, "odd number of items for DICT")
                        pairs = list(zip(items[::2], items[1::2], strict=True))
                        self._keys([k for k, _ in pairs])
                        append(Dct(pairs))
                elif op == 0x6F:  # OBJ
                    if not marks:
                        raise self._no_mark(op_start)
                    x = marks.pop()
                    fence = marks[-1] if marks else 0
                    if len(stack) - x < 1:
                        raise self._underflow(op_start, marks)
                    items = tuple(stack[x + 1 :])
                    cls = stack[x]
                    del stack[x:]
                    if np_pending:
                        took((cls, *items))
                    append(self._new(cls, Tup(items, 1) if items else EMPTY_TUP))
                elif op == 0x30:  # POP
                    size = len(stack)
                    if marks and marks[-1] == size:
                        marks.pop()
                        fence = marks[-1] if marks else 0
                    elif size <= fence:
                        raise self._underflow(op_start, marks)
                    else:
                        stack.pop()
                elif op == 0x31:  # POP_MARK
                    if not marks:
                        raise self._no_mark(op_start)
                    x = marks.pop()
                    fence = marks[-1] if marks else 0
                    del stack[x:]
                elif op == 0x32:  # DUP
                    if len(stack) <= fence:
                        raise self._underflow(op_start, marks)
                    append(stack[-1])
                elif op == 0x8D:  # BINUNICODE8
                    size = _U8(buf, pos)[0]
                    pos += 8
                    end = pos + size
                    if size > _MAX_SSIZE or end > n:
                        raise self._past_end(op_start, size)
                    append(
                        self._text(pos, end, op_start)
                        if size > _BIG_STR
                        else str(buf[pos:end], "utf-8", "surrogatepass")
                    )
                    pos = end
                elif op == 0x8A or op == 0x8B:  # LONG1, LONG4
                    if op == 0x8A:  # LONG1
                        size = buf[pos]
                        pos += 1
                    else:
                        size = _I4(buf, pos)[0]
                        pos += 4
                        if size < 0:
                            raise Stop("SL200", op_start, "LONG4 has a negative byte count")
                    end = pos + size
                    if end > n:
                        raise self._truncated(op_start)
                    if size * 2.41 > limits.max_int_digits:
                        raise Stop("SL203", op_start, f"integer of {size} bytes exceeds max_int_digits")
                    append(int.from_bytes(buf[pos:end], "little", signed=True))
                    pos = end
                elif op == 0x49 or op == 0x4C or op == 0x46:  # INT, LONG, FLOAT
                    pos, text = self._line(pos, op_start)
                    append(self._number(op, text, op_start))
                elif op == 0x53:  # STRING
                    pos, text = self._line(pos, op_start)
                    append(self._string(text, op_start))
                elif op == 0x56:  # UNICODE
                    pos, text = self._line(pos, op_start, minimum=0)
                    try:
                        append(codecs.raw_unicode_escape_decode(text)[0])
                    except UnicodeDecodeError as exc:
                        raise Stop(
                            "SL200", op_start, f"UNICODE argument does not decode: {exc.reason}"
                        ) from None
                elif op == 0x67 or op == 0x70:  # GET, PUT
                    pos, text = self._line(pos, op_start)
                    idx = self._index(text, op_start)
                    if op == 0x67:  # GET
                        try:
                            append(memo[idx])
                        except KeyError:
                            raise Stop("SL200", op_start, f"memo value not found at index {idx}") from None
                    else:
                        if len(stack) <= fence:
                            raise self._underflow(op_start, marks)
                        if idx < 0:
                            raise Stop("SL200", op_start, "negative PUT argument")
                        if idx >= max_memo:
                            self._memo_beyond(idx, op_start, max_memo)
                        memo[idx] = stack[-1]
                elif op == 0x50:  # PERSID
                    pos, text = self._line(pos, op_start, minimum=0)
                    if not text.isascii():
                        raise Stop("SL200", op_start, "PERSID argument is not ASCII")
                    append(self._persistent(text.decode("ascii"), op_start))
                elif op == 0x82 or op == 0x83 or op == 0x84:  # EXT1, EXT2, EXT4
                    if op == 0x82:  # EXT1
                        code = buf[pos]
                        pos += 1
                    elif op == 0x83:  # EXT2
                        code = buf[pos] | (buf[pos + 1] << 8)
                        pos += 2
                    else:
                        code = _I4(buf, pos)[0]
                        pos += 4
                    opname = {0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4"}[op]
                    self.note(
                        "SL103",
                        op_start,
                        f"{opname} names a global by extension code {code} through the copyreg registry",
                    )
                    append(Glob(None))
                elif op == 0x98:  # READONLY_BUFFER
                    if len(stack) <= fence:
                        raise self._underflow(op_start, marks)
                elif op == 0x97:  # NEXT_BUFFER
                    # Loaders that pass no buffers= fail here; the walk goes on in case one does.
                    self.note("SL200", op_start, "NEXT_BUFFER: out-of-band data a plain loader cannot read")
                    append(Opaque("buffer"))
                else:
                    raise Stop("SL200", op_start, f"invalid opcode {op:#04x}")
        except (Stop, IndexError, struct.error, UnicodeDecodeError) as exc:
            self.ops = ops
            self.last_offset = op_start
            if self.first_proto is None:
                self.first_proto = proto
            if isinstance(exc, Stop):
                stop = exc
            elif isinstance(exc, UnicodeDecodeError):
                stop = Stop("SL200", op_start, f"string is not valid UTF-8: {exc.reason}")
            elif n - op_start > 9:  # every fixed-size argument fits in 8 bytes: not a truncation
                raise
            else:
                stop = self._truncated(op_start)
            reach = stop.reach if stop.reach is not None else pos
            if fend != _NOFRAME and reach > fend:
                # The failing opcode reads past its frame: a file-backed loader reads other bytes here.
                self.note("SL107", op_start, f"an opcode crosses the end of a FRAME (frame ends at {fend})")
            try:
                raise stop from None
            finally:
                # This frame's local would keep the exception, its traceback this frame, and the
                # frames above it their locals (the scanned buffer): freed only by the cyclic GC.
                del stop


# -- the compiled walk -----------------------------------------------------------------------------

walk_python = walk


def _compiled_walk() -> Callable[..., WalkResult] | None:
    """This module's walk compiled by setup.py (Cython), if it was built from this very source.

    The compiled copy records the SHA-256 of the walker.py it was made from: after an edit (an
    editable install), the walk runs as Python until the next build rather than as stale code.
    """
    if os.environ.get("SAFELOAD_PURE_PYTHON", "").strip() not in ("", "0"):
        return None
    try:
        from safeload.analysis import _walker_c  # type: ignore[attr-defined]

        with open(__file__, "rb") as f:
            source = f.read()
    except (ImportError, OSError):
        return None
    if getattr(_walker_c, "SOURCE_SHA256", None) != hashlib.sha256(source).hexdigest():
        return None
    compiled: Callable[..., WalkResult] = _walker_c.walk
    return compiled


# The compiled copy is this same source: only the module itself picks the walk to export.
if __name__ == "safeload.analysis.walker":
    _compiled = _compiled_walk()
    COMPILED = _compiled is not None
    if _compiled is not None:
        walk = _compiled  # noqa: F811 - the same function, compiled
