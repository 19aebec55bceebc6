"""The versions a report names (safeload, Python and the libraries that shape a scan).

Every scan names them, so they are looked up in every process that scans: `importlib.metadata`
would do it, but importing it imports the email package and more (about 28 ms, a fifth of a
one-file ``safeload scan``). A distribution installed the usual way is a ``.dist-info`` directory
in a ``sys.path`` folder, found here the way importlib.metadata finds it; anything else
(an egg, a zip on ``sys.path``, a meta-path finder that lists distributions of its own) is left
to importlib.metadata itself.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterable

from safeload import __version__

_VERSION_LINE = re.compile(r"^Version:[ \t]*(\S+)", re.MULTILINE)
_SEPARATORS = re.compile(r"[-_.]+")
LIBRARIES = ("fickling", "numpy", "torch")
# The headers come first; a long description follows them. Read no more than this of the file.
_HEADER_CHARS = 1 << 16


@functools.cache
def versions() -> tuple[tuple[str, str], ...]:
    # Reading package metadata costs more than scanning a small file: once per process.
    out = {"safeload": __version__, "python": python_version()}
    out.update(installed_versions(LIBRARIES))
    return tuple(out.items())


def python_version() -> str:
    """What ``platform.python_version()`` says (without importing platform): sys.version's first word."""
    return sys.version.split(" ", 1)[0]


def installed_version(dist: str) -> str | None:
    """The Version header of an installed distribution, None where it is not installed."""
    return installed_versions((dist,)).get(dist)


def installed_versions(dists: Iterable[str]) -> dict[str, str]:
    """The Version header of each distribution that is installed (as ``importlib.metadata.version``
    reads it, without parsing the whole file with the email package)."""
    wanted = {_normalized(d): d for d in dists}
    try:
        places = _metadata_dirs(wanted)
    except _Unusual:
        return _by_importlib_metadata(wanted.values())
    out = {}
    for dist in wanted.values():
        if dist in places:
            version = _version_in(places[dist])
            if version is not None:
                out[dist] = version
    return out


class _Unusual(Exception):
    """sys.path or sys.meta_path holds something only importlib.metadata knows how to search."""


def _normalized(name: str) -> str:
    # importlib.metadata's Prepared.normalize: runs of -_. are one separator, case is ignored.
    return _SEPARATORS.sub("_", name).lower()


def _metadata_dirs(wanted: dict[str, str]) -> dict[str, str]:
    """dist -> its metadata directory: the first one on sys.path, as importlib.metadata's
    path finder yields them (sys.path in order, a folder's entries in listing order)."""
    from importlib.machinery import PathFinder

    if any(hasattr(f, "find_distributions") and f is not PathFinder for f in sys.meta_path):
        raise _Unusual
    found: dict[str, str] = {}
    for entry in sys.path:
        folder = entry or "."
        if folder.lower().endswith(".egg"):
            raise _Unusual
        try:
            children = os.listdir(folder)
        except OSError:
            if os.path.exists(folder):
                raise _Unusual from None  # a zip archive on sys.path: importlib.metadata reads inside
            continue
        for child in children:
            low = child.lower()
            if low.endswith(".egg"):
                raise _Unusual  # an egg holds its metadata in a layout of its own
            if not low.endswith((".dist-info", ".egg-info")):
                continue
            dist = wanted.get(_normalized(low.rpartition(".")[0].partition("-")[0]))
            if dist is not None and dist not in found:
                found[dist] = os.path.join(folder, child)
        if len(found) == len(wanted):
            break
    return found


def _version_in(folder: str) -> str | None:
    for name in ("METADATA", "PKG-INFO"):  # a .dist-info's, an .egg-info's
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                text = f.read(_HEADER_CHARS)
        except (OSError, UnicodeDecodeError):
            continue
        found = _VERSION_LINE.search(text.partition("\n\n")[0])
        return found.group(1) if found else None
    return None


def _by_importlib_metadata(dists: Iterable[str]) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
