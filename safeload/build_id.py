"""Which scanner computed a cached result: safeload's version, the code of this install and the
Python running it (the cross-check replays streams through that Python's own unpickler).

A cache keyed by the version alone hands back what an older scanner said for as long as the
version string stays the same (every development build between two releases): a fix to a reader
would not reach the files audited before it, and a false SAFE it fixed would stay SAFE.

The code's fingerprint comes from the package files' names, sizes and modification times, not
their bytes: a replayed audit pays for it on every run (well under a millisecond for the package's
files, against several to read and hash them), and installing or editing a file gives it a new
time. The built-in rules are left out: audit keys digest them by content already.
"""

from __future__ import annotations

import os
import sys

from safeload import __version__
from safeload.keyhash import digest

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_SKIPPED_DIRS = frozenset({"__pycache__", "rules"})


def code_fingerprint(folder: str = _PACKAGE) -> str:
    """A digest of every file under ``folder`` (its path, size and mtime), bytecode caches and the
    rules folder left out. Empty where the package is no directory (a zipped install)."""
    if not os.path.isdir(folder):
        return ""
    rows: list[tuple[str, int, int]] = []
    _list(folder, "", rows)
    rows.sort()
    return digest(repr(rows).encode("utf-8", "surrogateescape"))[:16]


def _list(folder: str, prefix: str, rows: list[tuple[str, int, int]]) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in _SKIPPED_DIRS:
                        _list(entry.path, f"{prefix}{entry.name}/", rows)
                    continue
                st = entry.stat()
            except OSError:
                continue  # gone since it was listed: what is there now is what runs
            rows.append((prefix + entry.name, st.st_size, st.st_mtime_ns))


_fingerprint: str | None = None


def install_fingerprint() -> str:
    """This install's code_fingerprint and the running Python, taken once per process."""
    global _fingerprint
    if _fingerprint is None:
        python = f"{sys.implementation.name} {sys.version_info[:3]}"
        _fingerprint = digest(f"{code_fingerprint()} {python}".encode())[:16]
    return _fingerprint


def scanner_id() -> str:
    """The version results are cached under: ``<version>+<install fingerprint>``."""
    return f"{__version__}+{install_fingerprint()}"
