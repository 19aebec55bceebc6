"""Read the input once: a path, PathLike or binary file object becomes one buffer.

The scanner and the loader both work on this buffer, so what is loaded is exactly what was scanned
(no second open of the path, no time-of-check/time-of-use gap).
"""

from __future__ import annotations

import hashlib
import mmap as mmap_module
import os
import stat
from collections.abc import Callable
from typing import IO, Any

import msgspec

from safeload.errors import LimitExceededError, ScanError

_CHUNK = 8 << 20
# Linux maps up to 16 pages around a faulting one (fault-around): what a read of either end costs.
_NEAR_ENDS = 64 << 10


class _Descriptor:
    """Closes a file descriptor when the source holding it is dropped."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    # os.close bound when the class is made: a source alive at interpreter exit may be dropped
    # after the os module's globals are cleared.
    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        try:
            _close(self.fd)
        except OSError:
            pass  # already closed: nothing holds it


class Source(msgspec.Struct):
    buffer: memoryview
    path: str  # for messages: the path, or a description of the object
    size: int
    mapped: bool  # buffer is a read-only mapping of the file (pages load on touch)
    # The opened file's status (fstat) when the source is a path: which file was read, for callers
    # that check it did not change meanwhile (status_now).
    opened: os.stat_result | None = None
    _holders: list[Any] = msgspec.field(default_factory=list)
    _fd: int | None = None  # the mapped file, open for `peek`
    _read_status: os.stat_result | None = None  # a file read whole: its status once it was read

    def status_now(self) -> os.stat_result | None:
        """The opened file's status as far as this source is concerned: a mapped file's now (its
        pages are read as the scan touches them), a file read whole as it was right after the
        read (what happens to it later changes nothing in these bytes). None for no file. Raises
        OSError only where fstat does."""
        if self._fd is not None:
            return os.fstat(self._fd)
        return self._read_status

    def peek(self, offset: int, size: int) -> bytes | memoryview:
        """buffer[offset:offset + size] (shorter at the end), without mapping its page when the file
        is mapped: the first touch of a page costs several times a pread (~10 us against ~2 us on
        this project's VMs), and a scan of a large file reads a few bytes from many far-apart pages
        (zip local headers, legacy storage counts). Near either end of the file, where every scan
        maps pages anyway (the first pickle, a zip's directory), the mapping is read. A mapping is
        no snapshot either: both read the file as it is now."""
        if self._fd is not None and _NEAR_ENDS <= offset < self.size - _NEAR_ENDS:
            try:
                return os.pread(self._fd, max(0, min(size, self.size - offset)), offset)
            except OSError:
                pass  # the mapping then says what it can (or faults, as any read of it would)
        return self.buffer[offset : offset + size]

    def release(self, start: int, end: int) -> None:
        """Drop the mapped pages wholly inside buffer[start:end] from this process's memory (the
        kernel keeps them in its page cache; a later read maps them again). No-op unless mapped."""
        if self.mapped:
            release_pages(self._holders[0], start, end)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for start in range(0, self.size, _CHUNK):
            digest.update(self.buffer[start : start + _CHUNK])
            # Hashed pages are not kept mapped: the scan faults in the few it reads again.
            self.release(start, start + _CHUNK)
        return digest.hexdigest()


def release_pages(mapping: mmap_module.mmap, start: int, end: int) -> None:
    """Source.release for any mapping of ours (a file, a decompressor's spilled output)."""
    if not hasattr(mmap_module, "MADV_DONTNEED"):
        return
    page = mmap_module.PAGESIZE
    first = -(-start // page) * page
    try:
        last = (min(end, len(mapping)) // page) * page
        if last > first:
            mapping.madvise(mmap_module.MADV_DONTNEED, first, last - first)
    except (OSError, ValueError):
        pass  # memory stays in use (or the mapping is closed), nothing else changes


def describe(f: object) -> str:
    if isinstance(f, (str, os.PathLike)):
        return os.fsdecode(f)
    name = getattr(f, "name", None)
    if isinstance(name, (str, bytes)):
        return os.fsdecode(name)
    return f"<{type(f).__name__}>"


def open_source(
    f: object, *, use_mmap: bool, max_bytes: int, read_below: int = 0, regular_only: bool = False
) -> Source:
    """Read or map `f` once. Raises ScanError (with the path) when it cannot be read.

    read_below: with use_mmap, a regular file smaller than this is read into immutable bytes instead
    (a scan of a small file: mapping and unmapping cost more than reading it, and the walker is
    fastest on bytes). Loads that asked for mmap leave it at 0.
    regular_only: a path that is not a regular file when opened is refused (ScanError), and opening
    it never waits: a directory walk found a regular file there, and a FIFO put in its place since
    would otherwise block until someone writes to it.
    """
    if isinstance(f, (str, os.PathLike)):
        return _from_path(
            os.fsdecode(f),
            use_mmap=use_mmap,
            max_bytes=max_bytes,
            read_below=read_below,
            regular_only=regular_only,
        )
    if hasattr(f, "read"):
        if use_mmap:
            raise ScanError(
                "mmap=True needs a file path, as with torch.load",
                path=describe(f),
                remedy="pass the path instead of an open file object, or leave mmap unset",
            )
        return _from_file_object(f, max_bytes=max_bytes)  # type: ignore[arg-type]
    raise TypeError(f"expected a path, PathLike or binary file object, not {type(f).__name__}")


def from_bytes(data: bytes | bytearray | memoryview, name: str) -> Source:
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    return Source(buffer=view, path=name, size=len(view), mapped=False, _holders=[data])


# Looked up once: a getattr that fails formats an AttributeError, a microsecond per file scanned.
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def _from_path(
    path: str, *, use_mmap: bool, max_bytes: int, read_below: int = 0, regular_only: bool = False
) -> Source:
    flags = _READ_FLAGS
    if regular_only:
        flags |= _NONBLOCK  # no effect on a regular file's reads
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ScanError(f"cannot open: {exc.strerror}", path=path) from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ScanError("is a directory", path=path)
        regular = stat.S_ISREG(info.st_mode)
        if regular_only and not regular:
            raise ScanError("not a regular file (any more: it was replaced since it was listed)", path=path)
        if regular and info.st_size > max_bytes:
            raise LimitExceededError(
                f"file is {info.st_size} bytes, over the limit of {max_bytes}",
                path=path,
                remedy="raise limits.max_file_bytes in a policy file if you expect files this large",
            )
        if regular and use_mmap and 0 < info.st_size < read_below:
            data = _read_small(fd, info.st_size)
            if data is not None:
                return _read_whole(data, memoryview(data), path, info, fd)
        if regular and use_mmap and info.st_size > 0:
            # Copy-on-write, as torch.load(mmap=True) maps: loaded tensors stay writable and writes
            # never reach the file.
            mapped = mmap_module.mmap(fd, 0, access=mmap_module.ACCESS_COPY)
            view = memoryview(mapped)
            # The descriptor stays open for `peek`; the holder closes it when the source is dropped
            # (weakref.finalize costs as much as the map call: ~10 us).
            source = Source(
                buffer=view,
                path=path,
                size=len(view),
                mapped=True,
                opened=info,
                _holders=[mapped, _Descriptor(fd)],
                _fd=fd,
            )
            fd = -1  # the source owns it now
            return source
        with os.fdopen(os.dup(fd), "rb", buffering=0) as raw:
            if regular:
                holder, view = _read_sized(raw, max_bytes, path, info.st_size)
            else:
                holder = _read_bounded(raw, max_bytes, path, None)
                view = memoryview(holder)
        return _read_whole(holder, view, path, info, fd)
    except OSError as exc:
        raise ScanError(f"cannot read: {exc.strerror or exc}", path=path) from exc
    finally:
        if fd >= 0:
            os.close(fd)


def _read_whole(holder: object, view: memoryview, path: str, info: os.stat_result, fd: int) -> Source:
    """A source read into memory from an open file, with the file's status right after the read."""
    return Source(
        buffer=view,
        path=path,
        size=len(view),
        mapped=False,
        opened=info,
        _holders=[holder],
        _read_status=os.fstat(fd),
    )


def _read_small(fd: int, size: int) -> bytes | None:
    """The whole of a small regular file in one read; None when it changed size meanwhile (the
    caller then maps it, which sees the file as it is)."""
    data = os.read(fd, size + 1)
    while len(data) < size:
        more = os.read(fd, size + 1 - len(data))
        if not more:
            return None
        data += more
    return data if len(data) == size else None


def _from_file_object(f: IO[bytes], *, max_bytes: int) -> Source:
    name = describe(f)
    try:
        data = _read_bounded(f, max_bytes, name, None)
    except OSError as exc:
        raise ScanError(f"cannot read: {exc}", path=name) from exc
    return Source(buffer=memoryview(data), path=name, size=len(data), mapped=False, _holders=[data])


def _read_sized(f: IO[bytes], max_bytes: int, name: str, expected: int) -> tuple[object, memoryview]:
    """Read a file of known size into one writable buffer (tensors can then share it, no copy).

    numpy.empty, not bytearray(n): bytearray zero-fills every page before the read overwrites it.
    Only the bytes actually read are exposed.
    """
    import numpy as np  # here, not at the top: a scan that maps or reads small files never needs it

    array = np.empty(expected, dtype=np.uint8)
    view = memoryview(array)
    got = 0
    while got < expected:
        # Chunked: one huge readinto into untouched pages ran 3-4x slower than 8 MiB pieces here.
        n = f.readinto(view[got : got + _CHUNK])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    extra = f.read(1)  # the file grew while we read it: keep reading, bounded
    if not extra:
        return array, view[:got]
    data = bytearray(view[:got]) + extra
    rest = _read_bounded(f, max_bytes - len(data), name, None)
    data += rest
    if len(data) > max_bytes:
        raise LimitExceededError(f"input is over the limit of {max_bytes} bytes", path=name)
    return data, memoryview(data)


def _read_bounded(f: IO[bytes], max_bytes: int, name: str, expected: int | None) -> bytearray:
    """Read to EOF into one writable buffer (tensors can then share it without a copy)."""
    if expected is not None:
        data = bytearray(expected)
        view = memoryview(data)
        got = 0
        while got < expected:
            n = f.readinto(view[got:]) if hasattr(f, "readinto") else _readinto(f, view[got:])  # type: ignore[attr-defined]
            if not n:
                break
            got += n
        view.release()
        del data[got:]
        extra = f.read(1)  # the file grew while we read it: keep reading, bounded
        if not extra:
            return data
        data += extra
    else:
        data = bytearray()
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            return data
        if not isinstance(chunk, (bytes, bytearray)):
            raise ScanError("file object returned text, not bytes; open it in binary mode ('rb')", path=name)
        data += chunk
        if len(data) > max_bytes:
            raise LimitExceededError(
                f"input is over the limit of {max_bytes} bytes",
                path=name,
                remedy="raise limits.max_file_bytes in a policy file if you expect inputs this large",
            )


def _readinto(f: IO[bytes], view: memoryview) -> int:
    chunk = f.read(len(view))
    view[: len(chunk)] = chunk
    return len(chunk)
