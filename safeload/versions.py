"""The versions a report names (safeload, Python and the libraries that shape a scan)."""

from __future__ import annotations

import functools
import platform
import re
from importlib import metadata

from safeload import __version__

_VERSION_LINE = re.compile(r"^Version:[ \t]*(\S+)", re.MULTILINE)


@functools.cache
def versions() -> tuple[tuple[str, str], ...]:
    # Reading package metadata costs more than scanning a small file: once per process.
    out = {"safeload": __version__, "python": platform.python_version()}
    for dist in ("fickling", "numpy", "torch"):
        version = installed_version(dist)
        if version is not None:
            out[dist] = version
    return tuple(out.items())


def installed_version(dist: str) -> str | None:
    """The Version header of an installed distribution. `metadata.version` parses the whole file
    with the email package: four times slower, and the first scan in a process paid for it."""
    try:
        text = metadata.distribution(dist).read_text("METADATA") or ""
    except metadata.PackageNotFoundError:
        return None
    found = _VERSION_LINE.search(text.partition("\n\n")[0])
    return found.group(1) if found else None
