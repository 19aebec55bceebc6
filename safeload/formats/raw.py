"""Raw pickle files: the whole buffer is one pickle stream (possibly several pickles back to back).

Also the cheap opcode-level scanner that recognizes a pickle by structure and finds where one pickle
ends (the legacy torch reader splits its sequence with it). It reads opcodes and argument lengths
only; what a pickle *does* is the walker's job.
"""

from __future__ import annotations

import pickletools
import re
import struct

import msgspec

from safeload.formats.base import PickleStream, ReadContext, ReadResult, StreamRole

NAME = "pickle"

_HIGHEST_PROTOCOL = 5
_SNIFF_OPS = 64

# Argument layouts, taken from pickletools' opcode table (data only, nothing is parsed by it).
_FIXED = "fixed"
_LEN1, _LEN4S, _LEN4U, _LEN8U = "len1", "len4s", "len4u", "len8u"
_LINE, _LINE_PAIR = "line", "line-pair"
_NONE = "none"
_LENGTH_FORMATS = {_LEN1: ("<B", 1), _LEN4S: ("<i", 4), _LEN4U: ("<I", 4), _LEN8U: ("<Q", 8)}

_LENGTH_KINDS = {
    pickletools.TAKEN_FROM_ARGUMENT1: _LEN1,
    pickletools.TAKEN_FROM_ARGUMENT4: _LEN4S,
    pickletools.TAKEN_FROM_ARGUMENT4U: _LEN4U,
    pickletools.TAKEN_FROM_ARGUMENT8U: _LEN8U,
}


class _Op(msgspec.Struct, frozen=True):
    name: str
    kind: str
    size: int  # fixed argument size (kind _FIXED) else 0
    pops_to_mark: bool
    pops: int  # items popped (after the mark slice, if any)
    pushes: int
    pushes_mark: bool


def _build_table() -> dict[int, _Op]:
    table: dict[int, _Op] = {}
    for info in pickletools.opcodes:
        arg = info.arg
        if arg is None:
            kind, size = _NONE, 0
        elif arg.n >= 0:
            kind, size = _FIXED, arg.n
        elif arg.n == pickletools.UP_TO_NEWLINE:
            kind, size = (_LINE_PAIR if arg.name == "stringnl_noescape_pair" else _LINE), 0
        else:
            kind, size = _LENGTH_KINDS[arg.n], 0
        before = [s.name for s in info.stack_before]
        after = [s.name for s in info.stack_after]
        to_mark = "mark" in before
        pops = len(before) - (2 if to_mark else 0)
        table[ord(info.code.encode("latin-1"))] = _Op(
            name=info.name,
            kind=kind,
            size=size,
            pops_to_mark=to_mark,
            pops=pops,
            pushes=len([a for a in after if a != "mark"]),
            pushes_mark="mark" in after,
        )
    return table


OPCODES: dict[int, _Op] = _build_table()

# Opcodes at which CPython's unpickler imports or calls something: a stream that reaches one before
# it breaks can already have run code, so it must be scanned, never dismissed as "not a pickle".
_ACTING = frozenset(
    {
        "GLOBAL",
        "STACK_GLOBAL",
        "INST",
        "OBJ",
        "REDUCE",
        "BUILD",
        "NEWOBJ",
        "NEWOBJ_EX",
        "EXT1",
        "EXT2",
        "EXT4",
    }
)

_PERSISTENT = frozenset({"PERSID", "BINPERSID"})

_DOTTED = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_INTLIKE = re.compile(rb"[+-]?[0-9]+L?\Z")
_FLOATLIKE = re.compile(
    rb"[+-]?([0-9]+\.?[0-9]*([eE][+-]?[0-9]+)?|\.[0-9]+([eE][+-]?[0-9]+)?|inf|nan)\Z", re.I
)


class _Stop(Exception):
    """The scan cannot go on: the bytes are not what CPython's unpickler would accept here.
    ``acted``: the unpickler would already have imported a module on its way to refusing them."""

    def __init__(self, message: str, *, acted: bool = False) -> None:
        super().__init__(message)
        self.acted = acted


class OpScan(msgspec.Struct, frozen=True):
    """Result of an opcode-level scan of one pickle."""

    end: int | None  # offset just after STOP, None when no STOP was reached
    ops: int
    acting: bool  # an import/call opcode was parsed
    error: str | None  # why the scan stopped early (None: STOP reached or op budget spent)
    protocol: int | None


def _line(buf: memoryview, pos: int, limit: int) -> tuple[bytes, int]:
    """The newline-terminated argument at ``pos``; copied in growing chunks, since hostile input
    can make a "line" the rest of a huge file."""
    end = min(len(buf), limit)
    size = 256
    while True:
        stop = min(end, pos + size)
        chunk = bytes(buf[pos:stop])
        nl = chunk.find(b"\n")
        if nl >= 0:
            return chunk[:nl], pos + nl + 1
        if stop >= end:
            raise _Stop("line argument without newline")
        size *= 4


def _imports_at_the_end(buf: memoryview, pos: int, line_limit: int) -> None:
    """Raise an acting _Stop for a GLOBAL or INST whose lines the buffer ends inside, where
    pickle.py (joblib.load) still imports: its readline hands over what is left without a
    newline, and it cuts the last byte of a line. The C unpickler stops there, having done
    nothing."""
    rest = bytes(buf[pos : pos + line_limit])
    if pos + line_limit < len(buf) or rest.count(b"\n") >= 2:
        return  # both lines are whole (or the limit cut them): the usual checks apply
    module = rest.split(b"\n", 1)[0] if b"\n" in rest else rest[:-1]
    if _DOTTED.match(module):
        raise _Stop(f"the data ends inside the lines of a global of module {module.decode()}", acted=True)


def _check_line(op: _Op, line: bytes, second: bytes | None) -> None:
    """Text arguments the way CPython's unpickler would reject them (strict sniffing only)."""
    name = op.name
    if op.kind == _LINE_PAIR:
        if not _DOTTED.match(line):
            raise _Stop(f"{name} names no importable module")
        if second is None or not _DOTTED.match(second):
            # find_class imports the module before it looks the name up (and fails): that import
            # runs the module's code (``antigravity`` opens a browser).
            raise _Stop(f"{name} names no global in module {line.decode()}", acted=True)
    elif name in {"INT", "LONG", "GET", "PUT"}:
        if not _INTLIKE.match(line.strip()):
            raise _Stop(f"{name} argument is not an integer")
    elif name == "FLOAT":
        if not _FLOATLIKE.match(line.strip()):
            raise _Stop("FLOAT argument is not a number")
    elif name == "STRING":
        text = line.rstrip()
        if len(text) < 2 or text[:1] not in (b"'", b'"') or text[-1:] != text[:1]:
            raise _Stop("STRING argument is not quoted")


def scan_pickle(
    buf: memoryview,
    pos: int = 0,
    *,
    max_ops: int | None = None,
    strict: bool = False,
    line_limit: int = 1 << 20,
) -> OpScan:
    """Walk opcodes from ``pos`` until STOP, an impossible opcode, or ``max_ops`` opcodes.

    ``strict`` also rejects text arguments CPython would refuse and tracks stack/mark depth, so
    text and binary files that merely start with an opcode byte are not taken for pickles.
    """
    n = len(buf)
    ops = 0
    acting = False
    protocol: int | None = None
    depth = 0
    marks: list[int] = []
    try:
        while True:
            if max_ops is not None and ops >= max_ops:
                return OpScan(None, ops, acting, None, protocol)
            if pos >= n:
                raise _Stop("truncated: no STOP")
            code = buf[pos]
            op = OPCODES.get(code)
            if op is None:
                raise _Stop(f"byte {code:#04x} is not an opcode")
            pos += 1
            ops += 1
            kind = op.kind
            name = op.name
            if kind == _FIXED:
                if pos + op.size > n:
                    raise _Stop(f"{op.name} argument truncated")
                if name == "PROTO":
                    protocol = buf[pos]
                    if protocol > _HIGHEST_PROTOCOL:
                        raise _Stop(f"unsupported protocol {protocol}")
                pos += op.size
            elif kind in _LENGTH_FORMATS:
                fmt, width = _LENGTH_FORMATS[kind]
                if pos + width > n:
                    raise _Stop(f"{op.name} length truncated")
                (length,) = struct.unpack_from(fmt, buf, pos)
                if length < 0:
                    raise _Stop(f"{op.name} negative length")
                pos += width
                if pos + length > n:
                    raise _Stop(f"{op.name} data truncated")
                pos += length
            elif kind in (_LINE, _LINE_PAIR):
                pair = kind == _LINE_PAIR
                if strict and pair:
                    _imports_at_the_end(buf, pos, line_limit)
                first, pos = _line(buf, pos, pos + line_limit)
                second = None
                if pair:
                    second, pos = _line(buf, pos, pos + line_limit)
                if strict:
                    _check_line(op, first, second)
            if strict:
                if name in _PERSISTENT:
                    # A plain unpickler has no persistent_load and stops here (torch's legacy one
                    # is only set for the object pickle, after the magic number).
                    raise _Stop(f"{op.name}: a plain unpickler stops at a persistent id")
                if name == "POP" and marks and marks[-1] == depth:
                    marks.pop()  # CPython's POP discards a MARK on top of the stack
                    continue
                if name == "INST":
                    acting = True  # pickle.py (joblib.load) imports before it looks for the MARK
                if op.pops_to_mark:
                    if not marks:
                        raise _Stop(f"{op.name} without MARK")
                    depth = marks.pop()
                if depth < op.pops:
                    raise _Stop(f"{op.name} on a stack too short")
                depth -= op.pops
                if op.pushes_mark:
                    marks.append(depth)
                depth += op.pushes
            # Only after the stack check: an import CPython refuses on an empty stack never acts.
            if name in _ACTING:
                acting = True
            if name == "STOP":
                return OpScan(pos, ops, acting, None, protocol)
    except _Stop as stop:
        return OpScan(None, ops, acting or stop.acted, str(stop), protocol)


def is_opcode(byte: int) -> bool:
    return byte in OPCODES


def sniff(buf: memoryview) -> bool:
    """A pickle by structure: a PROTO header, or opcodes CPython would accept for a while.

    Accepted: a complete pickle, ``_SNIFF_OPS`` well-formed opcodes, or a break after an opcode that
    imports or calls (CPython would have acted before failing). Rejected: bytes CPython refuses
    before doing anything, so a text file that starts with ``c`` or ``(`` is not taken for a pickle.
    """
    return _sniffed(buf, acting_counts=True)


def structured(buf: memoryview) -> bool:
    """As sniff, without the last reason: a PROTO header, a complete pickle or ``_SNIFF_OPS``
    well-formed opcodes. What the bytes may do before they break is the walker's to say."""
    return _sniffed(buf, acting_counts=False)


def _sniffed(buf: memoryview, *, acting_counts: bool) -> bool:
    if len(buf) >= 2 and buf[0] == 0x80 and buf[1] <= _HIGHEST_PROTOCOL:
        return True
    if not buf or buf[0] not in OPCODES or OPCODES[buf[0]].name in _PERSISTENT:
        # A plain unpickler stops at a leading persistent id (a zip's "PK") before doing anything.
        return False
    scan = scan_pickle(buf, 0, max_ops=_SNIFF_OPS, strict=True, line_limit=4096)
    return scan.error is None or (acting_counts and scan.acting)


# EXT1, EXT2, EXT4: the size of the extension code each takes.
EXT_ARGUMENT = {0x82: 1, 0x83: 2, 0x84: 4}


def read(buf: memoryview, ctx: ReadContext, *, guessed: bool = False) -> ReadResult:
    stream = PickleStream(
        member=ctx.member,
        data=buf,
        file_offset=ctx.file_offset,
        role=StreamRole.RAW,
        multi=True,
        loadable=True,
        encoding=ctx.encoding,
        guessed=guessed,
    )
    return ReadResult(format=NAME, streams=[stream])
