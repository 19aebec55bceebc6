"""Walking a registry: every file under the given paths, grouped by the file (inode) it reaches.

A Hugging Face cache links ``snapshots/<rev>/<name>`` to ``blobs/<sha>``: the links and the blob
are one group, reported under the links. Nothing here reads a model file.
"""

from __future__ import annotations

import os
from stat import S_ISREG

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: a replayed audit never needs it
if TYPE_CHECKING:
    from collections.abc import Sequence

    from safeload.model import ScanReport


class FileGroup:
    """Every path that reaches one file (same device and inode), or one path that could not be read.

    A plain class, not a dataclass: a replayed audit walks the tree and imports little else.
    """

    __slots__ = ("first", "st", "error", "paths", "links", "named", "sha256", "report", "cached", "inert")

    def __init__(
        self,
        first: str,
        st: os.stat_result | None = None,
        error: str | None = None,
        paths: list[str] | None = None,
        named: set[str] | None = None,
        inert: bool = False,
    ) -> None:
        self.first = first  # the path the file is read through
        self.st = st
        self.error = error
        self.paths: list[str] = [] if paths is None else paths
        self.links: list[str] = []
        self.named: set[str] = set() if named is None else named
        self.sha256: str | None = None
        self.report: ScanReport | None = None
        self.cached = False
        # A git/Hugging Face ref (refs/main: 40 hex digits). Such bytes cannot complete a pickle or
        # push anything a later opcode could call, so they are listed as skipped instead of
        # "malformed pickle".
        self.inert = inert

    def __repr__(self) -> str:
        return f"FileGroup(first={self.first!r}, paths={self.paths!r}, error={self.error!r})"

    def reported_paths(self) -> list[str]:
        """Links stand for the blob they point to; the blob itself only when nothing links to it."""
        if not self.links:
            return list(self.paths)
        links = set(self.links)  # a set: a blob may have a link per snapshot, thousands of them
        return [p for p in self.paths if p in links or p in self.named]


# One walked path: (path, named on the command line, reached through a link, its status, why it
# cannot be audited). Exactly one of the last two is None. What a replayed audit looks at: the
# groups are built from these only when there is no report to replay.
Entry = tuple[str, bool, bool, "os.stat_result | None", "str | None"]


def stat_key(st: os.stat_result) -> str:
    """What identifies a file's bytes without reading them (audit_cache says why that is enough)."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def collect(paths: Sequence[str], exclude: Sequence[str] = (), report: str | None = None) -> list[FileGroup]:
    """Every file under the given paths, grouped by the file it reaches. Never raises for a bad path."""
    return group(walk(paths, exclude, report))


def walk(paths: Sequence[str], exclude: Sequence[str] = (), report: str | None = None) -> list[Entry]:
    """Every file under the given paths, in walk order. Never raises for a bad path.

    Directories in `exclude` (the audit's own cache) are not walked. `report`, the file the audit
    writes, is not listed where a directory walk meets it (nor its temporary twins): each run
    replaces it, and it is no part of the registry. Named on the command line, it is audited.
    """
    skip_dirs, report_place = _skipped(exclude, report)
    skip_files = set() if report_place is None else {report_place}
    entries: list[Entry] = []
    for given in paths:
        if os.path.isdir(given):
            _walk(given, entries, skip_dirs, skip_files)
        else:
            entries.append(_entry(given, True, os.path.islink(given), None))
    return entries


def _skipped(
    exclude: Sequence[str], report: str | None
) -> tuple[set[tuple[int, int]], tuple[int, int, str] | None]:
    """(device, inode) of each excluded directory; (device, inode) of the report's folder and its
    name, or None."""
    skip_dirs = set()
    for path in exclude:
        try:
            st = os.stat(path)
        except OSError:
            continue
        skip_dirs.add((st.st_dev, st.st_ino))
    place = None
    if report is not None:
        try:
            parent = os.stat(os.path.dirname(os.path.abspath(report)))
            place = (parent.st_dev, parent.st_ino, os.path.basename(report))
        except OSError:
            pass
    return skip_dirs, place


def key_records(entries: Sequence[Entry]) -> bytes:
    """The walk as bytes for a key: one record per entry, in the order of their bytes, so that
    they depend on what the walk found and not on the order it found it in. (The order carries
    nothing more: the walk's is a function of the paths, depth first in name order.)

    A file: its path (os.fsencode), NUL, "F", named, link, then device, inode, size, and mtime and
    ctime as seconds and nanoseconds, little-endian; a path that could not be audited: its path,
    NUL, "E", named, link, and why, length first. No path holds a NUL, so records never run
    together. audit_treewalk makes the same bytes in C for a replay; keep the two alike.
    """
    import struct  # here: a replay whose walk is compiled never needs it

    file_fields = struct.Struct("<??QQqqIqI").pack
    error_fields = struct.Struct("<??I").pack
    fsencode = os.fsencode
    records = []
    add = records.append
    for path, named, is_link, st, error in entries:
        if st is not None:
            msec, mnsec = divmod(st.st_mtime_ns, 1_000_000_000)
            csec, cnsec = divmod(st.st_ctime_ns, 1_000_000_000)
            fields = file_fields(named, is_link, st.st_dev, st.st_ino, st.st_size, msec, mnsec, csec, cnsec)
            add(fsencode(path) + b"\0F" + fields)
        else:
            why = (error or "").encode("utf-8", "surrogateescape")
            add(fsencode(path) + b"\0E" + error_fields(named, is_link, len(why)) + why)
    records.sort()
    return b"".join(records)


def fast_key_records(
    paths: Sequence[str], exclude: Sequence[str] = (), report: str | None = None
) -> bytes | None:
    """key_records(walk(paths, exclude, report)), from the compiled walk (no Python object per
    file: a third of a replayed audit); None without it, or where the tree holds a path that the
    walk reports instead of listing (a tree that has no report to replay)."""
    try:
        from safeload import audit_treewalk_c  # type: ignore[attr-defined]
    except ImportError:
        return None
    if not built_after(audit_treewalk_c.__file__, os.path.join(os.path.dirname(__file__), _TREEWALK_SOURCE)):
        return None
    tree_records = audit_treewalk_c.tree_records
    skip_dirs, place = _skipped(exclude, report)
    report_place = None if place is None else (place[0], place[1], os.fsencode(place[2]))
    return tree_records([os.fsencode(p) for p in paths], skip_dirs, report_place)  # type: ignore[no-any-return]


_TREEWALK_SOURCE = "audit_treewalk.pyx"


def built_after(binary: str | None, source: str) -> bool:
    """Whether a compiled module is no older than its source beside it (an editable install
    whose .pyx was edited since the build runs the Python walk until it is built again). An
    installed package ships no source: its binary is what was built."""
    try:
        return binary is not None and os.stat(binary).st_mtime_ns >= os.stat(source).st_mtime_ns
    except FileNotFoundError:
        return binary is not None
    except OSError:
        return False


def _entry(path: str, named: bool, is_link: bool, st: os.stat_result | None) -> Entry:
    try:
        st = st or os.stat(path)
    except OSError as exc:
        return (path, named, is_link, None, f"cannot stat: {exc.strerror or exc}")
    if not S_ISREG(st.st_mode):
        # A FIFO or device would block or never end; it is no model file either way.
        return (path, named, is_link, None, "not a regular file")
    return (path, named, is_link, st, None)


def group(entries: Sequence[Entry]) -> list[FileGroup]:
    """The walked paths grouped by the file (device and inode) they reach, in walk order."""
    groups: dict[object, FileGroup] = {}
    # Each group's paths as a set too: a tree may link one file from any number of places, and a
    # list's membership test would make the grouping quadratic in them.
    members: dict[object, set[str]] = {}
    for path, named, is_link, st, error in entries:
        if st is None:
            key = ("error", path)
            if key not in groups:
                groups[key] = FileGroup(
                    first=path, error=error, paths=[path], named={path} if named else set()
                )
            continue
        key = (st.st_dev, st.st_ino)
        found = groups.get(key)
        if found is None:
            # A file the user names is always scanned and reported (never inert).
            found = groups[key] = FileGroup(path, st, paths=[path], inert=not named and is_ref(path, st))
            members[key] = {path}
            if is_link:
                found.links.append(path)
        elif path not in members[key]:
            members[key].add(path)
            found.paths.append(path)
            if is_link:
                found.links.append(path)
        if named:
            found.named.add(path)
            found.inert = False
    return list(groups.values())


_HEX_DIGITS = b"0123456789abcdef"


# Non-blocking: the walk saw a regular file, and a FIFO swapped in since must not make it wait.
_READ_REF = (
    os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)


def is_ref(path: str, st: os.stat_result) -> bool:
    if st.st_size not in (40, 41):
        return False
    try:
        fd = os.open(path, _READ_REF)
    except OSError:
        return False
    try:
        return S_ISREG(os.fstat(fd).st_mode) and _is_ref_text(os.read(fd, 42))
    except OSError:
        return False
    finally:
        os.close(fd)


def _is_ref_text(data: bytes) -> bool:
    """40 lowercase hex digits, then a newline or nothing (no re: a replayed audit never imports it)."""
    digits = data[:-1] if len(data) == 41 and data.endswith(b"\n") else data
    return len(digits) == 40 and not digits.translate(None, _HEX_DIGITS)


def _walk(
    root: str,
    entries: list[Entry],
    skip_dirs: set[tuple[int, int]],
    skip_files: set[tuple[int, int, str]],
) -> None:
    """Adds the files under root, depth first in name order. Directory links are followed once
    each; a loop is cut. A directory that cannot be listed is reported, not skipped."""
    seen = set(skip_dirs)
    stack = [root]
    add = entries.append
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                listing = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            add((folder, False, False, None, f"cannot list directory: {exc.strerror or exc}"))
            continue
        subdirs = []
        skipped = {name for dev, ino, name in skip_files if (dev, ino) == (st.st_dev, st.st_ino)}
        for item in listing:
            if skipped and _is_report(item.name, skipped):
                continue
            try:
                is_dir = item.is_dir()  # follows links: a linked directory is walked (once)
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(item.path)
                continue
            link = item.is_symlink()
            try:
                # The listing's own stat (it follows links, as os.stat does): one call fewer.
                found = item.stat()
            except OSError:
                found = None  # stat'ed again, to say why it cannot be
            if found is not None and S_ISREG(found.st_mode):
                add((item.path, False, link, found, None))
            else:
                add(_entry(item.path, False, link, found))
        stack.extend(reversed(subdirs))


def _is_report(name: str, reports: set[str]) -> bool:
    """The report itself, or a temporary file safeload.atomic.write_atomic writes it through."""
    return name in reports or any(name.startswith(f".{r}.") and name.endswith(".tmp") for r in reports)
