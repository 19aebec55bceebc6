"""In-memory file objects that make CPython's C unpickler take each of its reading paths.

The C unpickler reads differently from a file with ``peek`` (a buffered file), from one without
(``io.BytesIO``), and from one in-memory buffer (``pickle.loads``). The readers here reproduce each
path over a ``memoryview`` of the stream, without writing it to disk.

Payload skipping: the C unpickler calls ``readinto`` only to fill a BINBYTES/BYTEARRAY payload it
has just allocated, and a payload's content never changes what gets imported (it is only ever
data to the stubs). So these readers advance past ``readinto`` requests without copying: a 200 MB
pickle of tensors replays without touching 200 MB. Opcodes and their arguments always come through
``read``/``readline``/``peek`` with the real bytes. The in-memory (``loads``) reader needs the
walker's list of large payloads to end its ``peek`` window before each one.
"""

from __future__ import annotations

import bisect
import io
import re
from collections.abc import Callable
from typing import Any

from safeload.analysis.walk_args import RELEASE_EVERY

_NL = re.compile(b"\n")

# The buffer size open() picks when the file system reports none (io.DEFAULT_BUFFER_SIZE).
FILE_BUFFER_SIZE = io.DEFAULT_BUFFER_SIZE


class Payloads:
    """Where the walker saw large payloads (for window ends), and how much the replay skipped."""

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        self.starts = sorted(start for start, _ in spans)
        self.skipped = 0  # payload bytes not copied

    def next_start(self, pos: int) -> int | None:
        """The first payload start at or after ``pos``."""
        i = bisect.bisect_left(self.starts, pos)
        return self.starts[i] if i < len(self.starts) else None


class _MemoryRaw(io.RawIOBase):
    """An unbuffered, seekable in-memory stream: BufferedReader on top behaves as on a real file."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        b[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


class BufferedFile(io.BufferedReader):
    """``open(path, "rb")``: a BufferedReader (with ``peek``) over the stream."""

    def __init__(self, view: memoryview, payloads: Payloads) -> None:
        super().__init__(_MemoryRaw(view), buffer_size=FILE_BUFFER_SIZE)
        self._sl_payloads = payloads

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        # Payload content only (see module docstring): advance, do not copy.
        pos = self.tell()
        end = min(pos + len(b), self.seek(0, io.SEEK_END))
        self.seek(end)
        self._sl_payloads.skipped += end - pos
        return end - pos

    def at_end(self) -> bool:
        return not self.peek(1)


class MemoryFile(io.BytesIO):
    """``io.BytesIO`` itself (no ``peek``), with payload skipping."""

    def __init__(self, view: memoryview, payloads: Payloads) -> None:
        obj = view.obj
        # BytesIO shares a bytes object it is given; anything else it copies.
        data = obj if isinstance(obj, bytes) and len(obj) == view.nbytes else view.tobytes()
        super().__init__(data)
        self._sl_size = len(data)
        self._sl_payloads = payloads

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        # Payload content only (see module docstring): advance, do not copy.
        pos = self.tell()
        end = min(pos + len(b), self._sl_size)
        self.seek(end)
        self._sl_payloads.skipped += end - pos
        return end - pos

    def at_end(self) -> bool:
        return self.tell() >= self._sl_size


class WholeBuffer:
    """``pickle.loads``: ``peek`` hands over everything left, so the C unpickler buffers the whole
    rest as it does with in-memory input (FRAME lengths are then only checked, never acted on).

    The window stops at the next large payload, which the unpickler then takes through
    ``readinto``; payloads sit outside frames, so no frame is ever split by a window end.
    """

    def __init__(
        self, view: memoryview, payloads: Payloads, release: Callable[[int, int], None] | None = None
    ) -> None:
        self._view = view
        self._pos = 0
        self._payloads = payloads
        # Drops pages of a mapped file the replay has read past (see walker.walk), at payloads:
        # between them the unpickler holds the window it peeked.
        self._release = release
        self._released = 0

    def at_end(self) -> bool:
        return self._pos >= len(self._view)

    def peek(self, n: int = 0) -> memoryview:
        end = self._payloads.next_start(self._pos)
        if end == self._pos:  # only when a parse disagrees with the walker: window to the next one
            end = self._payloads.next_start(self._pos + 1)
        return self._view[self._pos :] if end is None else self._view[self._pos : end]

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self._pos + n)
        out = bytes(self._view[self._pos : end])
        self._pos = end
        return out

    def readinto(self, b: Any) -> int:
        # Payload content only (see module docstring): advance, do not copy.
        n = max(0, min(len(b), len(self._view) - self._pos))
        self._pos += n
        self._payloads.skipped += n
        if self._release is not None and self._pos - self._released >= RELEASE_EVERY:
            self._release(self._released, self._pos)
            self._released = self._pos
        return n

    def readline(self, limit: int = -1) -> bytes:
        m = _NL.search(self._view, self._pos)
        end = len(self._view) if m is None else m.end()
        out = bytes(self._view[self._pos : end])
        self._pos = end
        return out


def open_reader(
    reader: str, view: memoryview, payloads: Payloads, release: Callable[[int, int], None] | None = None
) -> Any:
    """``release``: see WholeBuffer (the in-process reader); the others run in a child process."""
    if reader == "file":
        return BufferedFile(view, payloads)
    if reader == "bytes":
        return WholeBuffer(view, payloads, release)
    return MemoryFile(view, payloads)
