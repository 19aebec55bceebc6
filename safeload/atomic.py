"""Writing a file whole or not at all: reports, the JSON schema, the audit cache's stored reports."""

from __future__ import annotations

import errno
import os
from stat import S_ISREG

_CREATE = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_TRIES = 100


def write_atomic(target: str | os.PathLike[str], data: str | bytes, *, mode: int = 0o666) -> None:
    """Write ``data`` (text as UTF-8) to a new file beside ``target``, then rename it over ``target``.

    A reader of ``target``, and an interrupted run (Ctrl-C, a full disk), sees the old file or the
    new one, never half of one. The temporary file gets a random name and is created exclusively,
    so a link planted under a guessable name in a shared directory is never written through.
    ``mode`` is filtered by the umask, as for any file the user creates.
    """
    path = os.fspath(target)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = _create_beside(path, mode)
    try:
        with open(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_if_changed(target: str | os.PathLike[str], data: str | bytes, *, mode: int = 0o666) -> bool:
    """``write_atomic``, unless ``target`` is a regular file (not a link) that already holds exactly
    these bytes: it is then left as it is, inode and times included. Returns whether it wrote.

    A replayed audit rewrites the report it wrote last time: reading it back costs a fraction of
    writing it anew and freeing the old one's pages.
    """
    path = os.fspath(target)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if _holds(path, payload):
        return False
    write_atomic(path, payload, mode=mode)
    return True


_READ_EXISTING = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
    # What is opened is judged by its descriptor: were a FIFO swapped in, opening it must not wait
    # for a writer.
    | getattr(os, "O_NONBLOCK", 0)
)


# The existing file is compared a piece at a time: a registry's report is megabytes, and reading
# it whole would take as much new memory again.
_COMPARE_CHUNK = 1 << 20


def _holds(path: str, payload: bytes) -> bool:
    try:
        fd = os.open(path, _READ_EXISTING)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not S_ISREG(st.st_mode) or st.st_size != len(payload):
            return False
        expected = memoryview(payload)
        chunk = bytearray(min(len(payload), _COMPARE_CHUNK) or 1)
        pos = 0
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while got := f.readinto(chunk):
                # startswith compares bytes as they are (a memoryview's == goes element by element).
                if pos + got > len(payload) or not chunk.startswith(expected[pos : pos + got]):
                    return False
                pos += got
        return pos == len(payload)
    except OSError:
        return False
    finally:
        os.close(fd)


def _create_beside(path: str, mode: int) -> tuple[int, str]:
    # What tempfile.mkstemp does; importing tempfile (with shutil and random) costs a replayed
    # audit, which writes one report and little else, several percent of its time.
    folder, name = os.path.split(path)
    for _ in range(_TRIES):
        tmp = os.path.join(folder, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, _CREATE, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name beside the file", path)
