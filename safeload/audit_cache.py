"""The audit cache: scan results by content, and content hashes by file identity. One JSON file per key.

Results are keyed by (sha256, policy hash, safeload version), one JSON file per key: the same bytes
under the same policy and the same scanner give the same report, wherever the file lives. Hashing
is what a re-run would spend its time on, so the sha256 of a file is also remembered, keyed by
(device, inode, size, mtime_ns, ctime_ns), in one index file read once per run (thousands of
tiny files would cost a registry re-run more than the lookups save).

Why the hash cache is safe enough: writing to a file updates its mtime and ctime. mtime can be set
back (`touch -d`), but that sets ctime to the present, and ctime cannot be set by an unprivileged
user. A file replaced by rename is a new inode. What it cannot see: a rewrite within one timestamp
tick of a filesystem with coarse timestamps (FAT: 2 s) that keeps size, inode and both times, or
someone with root or raw disk access. An inode number reused by a new file comes with a new ctime.
`--rehash` ignores the index (every file is read and hashed again; results are still reused by
content).

The cache directory must be as trusted as safeload itself: whoever can write it can mark a file
SAFE. Entries are validated and any that does not parse or does not match its key is a miss.
Every write goes to a temporary file in the same directory and is renamed into place, so an
interrupted run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from safeload.model import ScanReport

CACHE_FORMAT = 1
_HASH_INDEX = "hashes.json"
_MAX_HASHES = 2_000_000
_COUNTER = itertools.count()
_MAX_ENTRY_BYTES = 64 << 20  # a report with every global of a huge pickle still fits; a bigger file is junk
# Findings that describe this run's circumstances, not the bytes: never reused.
UNCACHEABLE_CODES = frozenset({"SL206", "SL207"})


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HashIndex(_Entry):
    format: int
    hashes: dict[str, str]


class ResultEntry(_Entry):
    format: int
    sha256: str
    policy_hash: str
    version: str
    report: ScanReport


def stat_key(st: os.stat_result) -> str:
    """What identifies a file's bytes without reading them (see the module docstring for why)."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _digest(*parts: object) -> str:
    text = "\0".join(str(p) for p in parts)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


class AuditCache:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root_str = os.fspath(root)
        self._made: set[str] = set()

    def _file(self, kind: str, key: str) -> str:
        # plain strings: pathlib costs more than the read itself on a cached run of many files
        return os.path.join(self.root_str, kind, key[:2], key + ".json")

    def _read(self, path: str | Path) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > _MAX_ENTRY_BYTES:
                return None
            chunks = []
            while size > 0 and (chunk := os.read(fd, size)):
                chunks.append(chunk)
                size -= len(chunk)
            return b"".join(chunks)
        except OSError:
            return None
        finally:
            os.close(fd)

    def _write(self, path: str | Path, text: str) -> None:
        """Atomic: a reader sees the old entry, the new one, or none; never a partial one."""
        parent = os.path.dirname(path)
        tmp = os.path.join(parent, f".tmp-{os.getpid()}-{next(_COUNTER)}.json")
        try:
            if parent not in self._made:
                os.makedirs(parent, mode=0o700, exist_ok=True)
                self._made.add(parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(text.encode("utf-8"))
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if not isinstance(exc, OSError):
                raise
            # An OSError only means an entry that was not written: the next run is slower, no worse.

    # -- sha256 by file identity -----------------------------------------------------------------

    def load_hashes(self) -> dict[str, str]:
        """The whole index (empty when missing or invalid: every file is then hashed by its scan)."""
        data = self._read(self.root / _HASH_INDEX)
        if data is None:
            return {}
        try:
            index = HashIndex.model_validate_json(data)
        except ValidationError:
            return {}
        return dict(index.hashes) if index.format == CACHE_FORMAT else {}

    def save_hashes(self, learned: dict[str, str]) -> None:
        """Merge what this run learned into the index (another run may have saved meanwhile)."""
        if not learned:
            return
        merged = {**self.load_hashes(), **learned}
        if len(merged) > _MAX_HASHES:  # keep the newest: entries of deleted files only cost space
            merged = dict(list(merged.items())[-_MAX_HASHES:])
        self._write(self.root / _HASH_INDEX, HashIndex(format=CACHE_FORMAT, hashes=merged).model_dump_json())

    # -- reports by content ----------------------------------------------------------------------

    def get_report(self, sha256: str, policy_hash: str, version: str) -> ScanReport | None:
        data = self._read(self._file("results", _digest(sha256, policy_hash, version)))
        if data is None:
            return None
        try:
            entry = ResultEntry.model_validate_json(data)
        except ValidationError:
            return None
        report = entry.report
        if (
            entry.format != CACHE_FORMAT
            or (entry.sha256, entry.policy_hash, entry.version) != (sha256, policy_hash, version)
            or report.sha256 != sha256
            or report.policy_hash != policy_hash
        ):
            return None
        return report

    def put_report(self, report: ScanReport, version: str) -> None:
        if report.sha256 is None or not cacheable(report):
            return
        entry = ResultEntry(
            format=CACHE_FORMAT,
            sha256=report.sha256,
            policy_hash=report.policy_hash,
            version=version,
            report=report,
        )
        self._write(
            self._file("results", _digest(report.sha256, report.policy_hash, version)),
            entry.model_dump_json(),
        )


def cacheable(report: ScanReport) -> bool:
    return report.sha256 is not None and not any(f.code in UNCACHEABLE_CODES for f in report.findings)
