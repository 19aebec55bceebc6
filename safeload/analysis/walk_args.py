"""Reading opcode arguments as CPython's unpickler does, and how the walker stops.

Part of the walker (see ``walker.py``): the numbers, strings and text lines that follow an opcode,
each parsed with the rules of ``Modules/_pickle.c`` (or of ``pickle.py`` for joblib streams), and
the errors that end the walk of one pickle.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

from safeload.analysis.text_numbers import float_arg, int_arg, long_arg
from safeload.analysis.types import WalkResult
from safeload.analysis.values import Opaque
from safeload.limits import Limits

# Past these, replaying the stream through CPython could crash (recursive tuple hashing) or fail
# to allocate, whatever the policy's limits say.
HAZARD_TUPLE_DEPTH = 2_000
# A walk over a mapped file lets go of the pages it has read past this often. On kernels that
# map a page cache folio whole (up to 2 MiB) at a fault, a walk that hops from opcode to opcode
# over large payloads would otherwise map as much of the file as it spans.
RELEASE_EVERY = 16 << 20
_HAZARD_ALLOC = 1 << 40
_HAZARD_BYTEARRAY = 1 << 30


class Stop(Exception):
    """The walk of one pickle cannot go on (a loader fails here too, or a limit was hit)."""

    def __init__(self, code: str, offset: int, message: str, reach: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.offset = offset
        self.message = message
        self.reach = reach  # how far the failing opcode read, when past the loop's position


class Arguments:
    """Argument parsing and stop signals for the walker (a mixin: the walker supplies the state)."""

    buf: bytes | memoryview
    n: int
    limits: Limits
    result: WalkResult
    last_offset: int
    find_nl: Callable[[int], int]
    release: Callable[[int, int], None] | None
    released: int

    def _periodic(
        self, ops: int, pos: int, stack: list[object], marks: list[int], memo: dict[int, object]
    ) -> None:
        limits = self.limits
        self.last_offset = pos
        if ops >= limits.max_opcodes:
            raise Stop("SL203", pos, f"more than {limits.max_opcodes} opcodes")
        if len(stack) > limits.max_stack_depth:
            raise Stop("SL203", pos, f"stack deeper than {limits.max_stack_depth}")
        if len(marks) > limits.max_nesting_depth:
            raise Stop("SL203", pos, f"more than {limits.max_nesting_depth} nested MARKs")
        if len(memo) > limits.max_memo:
            raise Stop("SL203", pos, f"more than {limits.max_memo} memo entries")
        if self.release is not None and pos - self.released >= RELEASE_EVERY:
            self.release(self.released, pos)
            self.released = pos

    def _deep(self, depth: int, offset: int) -> None:
        if depth > self.limits.max_nesting_depth:
            raise Stop("SL203", offset, f"tuples nested deeper than {self.limits.max_nesting_depth}")
        if self.result.replay_hazard is None:
            self.result.replay_hazard = f"tuples nested {depth} deep (hashing them recurses in C)"

    def _past_end(self, offset: int, size: int) -> Stop:
        # CPython allocates a declared payload before reading it. A bytearray too big to allocate
        # trips a CPython bug (a spurious SystemError printed to stderr); any absurd size fails.
        limit = _HAZARD_BYTEARRAY if self.buf[offset] == 0x96 else _HAZARD_ALLOC
        if size > limit and self.result.replay_hazard is None:
            self.result.replay_hazard = f"an opcode at offset {offset} declares a {size}-byte payload"
        return self._truncated(offset)

    def _truncated(self, offset: int) -> Stop:
        return Stop("SL200", offset, "pickle data was truncated", reach=self.n + 1)

    def _underflow(self, offset: int, marks: list[int]) -> Stop:
        what = "unexpected MARK found" if marks else "unpickling stack underflow"
        return Stop("SL200", offset, what)

    def _no_mark(self, offset: int) -> Stop:
        return Stop("SL200", offset, "could not find MARK")

    def _line(self, pos: int, offset: int, minimum: int = 1) -> tuple[int, bytes]:
        """A newline-terminated argument, without its newline (C refuses lines shorter than 2)."""
        end = self.find_nl(pos)
        if end < 0:
            raise self._truncated(offset)
        if end - pos < minimum:
            raise Stop("SL200", offset, "pickle data was truncated (empty line argument)")
        return end + 1, bytes(self.buf[pos:end])

    def _py_names(self, pos: int, offset: int, encoding: str) -> tuple[int, str, str]:
        """GLOBAL/INST arguments as pickle.py reads them: ``readline()[:-1]`` twice.

        At the end of the data ``readline`` returns what is left without a newline, so the last
        byte is dropped and the import still happens (with an empty name when the module line was
        cut). Returns a position past the data in that case, so the caller stops after recording.
        """
        buf, n = self.buf, self.n
        parts: list[str] = []
        for _ in range(2):
            end = self.find_nl(pos) if pos < n else -1
            raw = bytes(buf[pos:end]) if end >= 0 else bytes(buf[pos:n])[:-1]
            try:
                parts.append(raw.decode(encoding))
            except UnicodeDecodeError:
                raise Stop(
                    "SL200", offset, f"module or class name is not valid {encoding}", reach=pos
                ) from None
            pos = end + 1 if end >= 0 else n + 1
        return pos, parts[0], parts[1]

    def _c_names(self, pos: int, offset: int, encoding: str) -> tuple[int, str, str]:
        """GLOBAL/INST arguments as the C unpickler reads them: two newline-terminated lines."""
        find = self.find_nl
        end = find(pos)
        if end > pos:
            end2 = find(end + 1)
            if end2 > end + 1:
                buf = self.buf
                try:
                    return end2 + 1, str(buf[pos:end], encoding), str(buf[end + 1 : end2], encoding)
                except UnicodeDecodeError:
                    pass
        # Something is wrong with the lines: the step-by-step reading says exactly what.
        pos, module = self._line_text(pos, offset, encoding)
        pos, name = self._line_text(pos, offset, encoding)
        return pos, module, name

    def _line_text(self, pos: int, offset: int, encoding: str) -> tuple[int, str]:
        pos, raw = self._line(pos, offset)
        try:
            return pos, raw.decode(encoding)
        except UnicodeDecodeError:
            raise Stop("SL200", offset, f"module or class name is not valid {encoding}", reach=pos) from None

    def _text(self, start: int, end: int, offset: int) -> Opaque:
        """Validate a huge UTF-8 payload chunk by chunk without keeping it."""
        decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")
        buf = self.buf
        chunk = 1 << 20
        for i in range(start, end, chunk):
            decoder.decode(buf[i : min(end, i + chunk)], final=False)
        decoder.decode(b"", final=True)
        return Opaque("str")

    @staticmethod
    def _ascii(raw: bytes | memoryview) -> object:
        data = bytes(raw)
        # STRING/BINSTRING decode with the loader's encoding (ASCII by default, UTF-8 in torch):
        # only an ASCII value means the same thing to every loader.
        return data.decode("ascii") if data.isascii() else Opaque("str")

    def _string(self, text: bytes, offset: int) -> object:
        if len(text) >= 2 and text[0] == text[-1] and text[:1] in (b"'", b'"'):
            try:
                raw = codecs.escape_decode(text[1:-1])[0]
            except ValueError as exc:
                raise Stop("SL200", offset, f"STRING argument does not decode: {exc}") from None
            return self._ascii(raw)
        raise Stop("SL200", offset, "the STRING opcode argument must be quoted")

    def _number(self, op: int, text: bytes, offset: int) -> object:
        """INT, LONG, FLOAT as the C unpickler reads them (text_numbers); an Opaque where C refuses
        (walking on only reports more)."""
        if op == 0x46:  # FLOAT
            value = float_arg(text)
            return Opaque("float") if value is None else value
        # C parses these with NUL-terminated string functions: a NUL ends the number.
        digits = self.limits.max_int_digits
        if len(text.split(b"\0", 1)[0].strip().lstrip(b"+-")) > digits:
            raise Stop("SL203", offset, f"integer literal longer than {digits} digits")
        number = int_arg(text) if op == 0x49 else long_arg(text)
        return Opaque("int") if number is None else number

    def _index(self, text: bytes, offset: int) -> int:
        text = text.split(b"\0", 1)[0]  # as in _number
        if len(text) > 40:
            raise Stop("SL200", offset, "memo index out of range")
        try:
            return int(text)
        except ValueError:
            raise Stop("SL200", offset, "memo index is not an integer") from None
