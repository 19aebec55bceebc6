"""Where decompressed bytes go: memory while they are few, an unlinked temporary file beyond that.

A compressed checkpoint decompresses to as many bytes as the model has weights. Held in memory,
that is the process's peak (and more while a growing buffer is copied). Past ``SPILL_AT`` bytes the
output goes to an anonymous temporary file instead, written as it is produced, then mapped
copy-on-write: the scan touches the pages holding opcodes, the kernel keeps the rest in its page
cache or on disk, and the process's memory no longer grows with the file.

The file has no name (it is unlinked when created), so nothing else can open it and change the
bytes between the scan and the load; it disappears once the last view of the mapping is released.
"""

from __future__ import annotations

import mmap
from typing import IO

__all__ = ["SPILL_AT", "Spool", "SpoolError"]

# Output kept in memory up to this many bytes; beyond, it is written to a temporary file. At 64 MiB
# a 256 MB gzip-wrapped pickle's scan peaked at 97 MB of RSS (the buffer, and its copies as it
# grew), at 16 MiB at 49 MB, in the same time.
SPILL_AT = 16 << 20


class SpoolError(Exception):
    """The temporary file could not be created or written (no space left, no temporary directory)."""


class Spool:
    def __init__(self, spill_at: int | None = None) -> None:
        self._spill_at = SPILL_AT if spill_at is None else spill_at
        self._memory = bytearray()
        self._file: IO[bytes] | None = None
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def write(self, piece: bytes | bytearray | memoryview) -> None:
        try:
            if self._file is None and self._size + len(piece) > self._spill_at:
                import tempfile  # here: most scans never spill, and its import costs a few ms of each

                self._file = tempfile.TemporaryFile(prefix="safeload-")
                self._file.write(self._memory)
                self._memory = bytearray()
            if self._file is not None:
                self._file.write(piece)
            else:
                self._memory += piece
        except OSError as exc:
            raise SpoolError(f"cannot write decompressed data to a temporary file: {exc}") from exc
        self._size += len(piece)

    def view(self) -> memoryview:
        """Everything written, read-only to the file: a copy-on-write map of the spilled file, or the
        memory buffer. Call once, when writing is done."""
        if self._file is None:
            return memoryview(self._memory)
        try:
            self._file.flush()
            mapped = mmap.mmap(self._file.fileno(), self._size, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise SpoolError(f"cannot map the decompressed data: {exc}") from exc
        finally:
            self._file.close()  # the mapping keeps the data; the file itself has no name
        return memoryview(mapped)

    def discard(self) -> None:
        """Drop what was written (a reader that gives up on the output)."""
        if self._file is not None:
            self._file.close()
        self._memory = bytearray()
        self._size = 0
