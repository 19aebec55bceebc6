"""The audit cache: scan results by content, and content hashes by file identity, in one SQLite file.

Results are keyed by (sha256, policy hash, safeload version and code: build_id.scanner_id): the same
bytes under the same policy and the same scanner give the same report, wherever the file lives.
Hashing is what a re-run would spend its time on, so the sha256 of a file is also remembered, keyed
by (device, inode, size, mtime_ns, ctime_ns).

Why the hash cache is safe enough: writing to a file updates its mtime and ctime. mtime can be set
back (`touch -d`), but that sets ctime to the present, and ctime cannot be set by an unprivileged
user. A file replaced by rename is a new inode. What it cannot see: a rewrite within one timestamp
tick of a filesystem with coarse timestamps (FAT: 2 s) that keeps size, inode and both times, or
someone with root or raw disk access. An inode number reused by a new file comes with a new ctime.
`--rehash` ignores the remembered hashes (every file is read and hashed again; results are still
reused by content).

The same directory keeps the last few whole reports for replay (audit_memo, stored by audit_runs):
a tree in which no file's identity changed, audited the same way, gets its report back without a
scan.

The cache directory must be as trusted as safeload itself: whoever can write it can mark a file
SAFE. Entries are validated, and one that does not parse or does not match its key is a miss; a
file that is not a database of this format is set aside and started afresh.

Why SQLite (the standard library's): a registry run writes thousands of entries, and a file per
entry cost more than the scans of small files (a create, a write and a rename each). Writes are
buffered and committed in transactions, by the auditing process only, so an interrupted run leaves
every entry whole or absent, never half-written; concurrent runs on one cache wait for each other's
commits instead of clobbering them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator

from safeload.audit_walk import stat_key

__all__ = ["AuditCache", "cacheable", "result_key", "stat_key"]

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: a replayed audit never needs it
if TYPE_CHECKING:
    from safeload.model import ScanReport

CACHE_FORMAT = 2
DB_NAME = "cache.sqlite3"
# Findings that describe this run's circumstances or this installation, not the bytes: never reused.
UNCACHEABLE_CODES = frozenset({"SL206", "SL207", "SL208"})
_FLUSH_ENTRIES = 2000  # results and hashes (a file scanned anew brings one of each)
_FLUSH_SECONDS = 2.0
_BUSY_TIMEOUT_S = 60.0
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS hashes (stat_key TEXT PRIMARY KEY, sha256 TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, sha256 TEXT NOT NULL, "
    "policy_hash TEXT NOT NULL, version TEXT NOT NULL, report TEXT NOT NULL)",
)


# Keys in one SELECT ... IN (...): well under SQLite's limit on bound parameters.
_KEYS_PER_QUERY = 500


def result_key(sha256: str, policy_hash: str, version: str) -> str:
    text = "\0".join((sha256, policy_hash, version))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


class AuditCache:
    """Open lazily; reads see committed entries; writes are buffered until ``flush`` (or ``close``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        # Paths as text, not pathlib: a replayed audit imports little else (pathlib is 5% of it).
        self.root = os.fspath(root)
        self.path = os.path.join(self.root, DB_NAME)
        self._db: sqlite3.Connection | None = None
        self._hashes: list[tuple[str, str]] = []
        self._results: list[tuple[str, str, str, str, str]] = []
        self._last_flush = time.monotonic()

    # -- connection ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is not None:
            return self._db
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            db = self._open()
        except sqlite3.OperationalError:
            return None  # locked past the timeout, read-only, I/O: no cache this run, file untouched
        except sqlite3.DatabaseError:
            # Not a database, or another format: a cache may always be dropped (set aside for a look).
            try:
                os.replace(self.path, f"{self.path}.unusable-{os.getpid()}")
                db = self._open()
            except (OSError, sqlite3.Error):
                return None
        except OSError:
            return None  # no cache this run: slower, never wrong
        self._db = db
        return db

    def _open(self) -> sqlite3.Connection:
        fresh = not os.path.exists(self.path)
        db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        try:
            if fresh:
                os.chmod(self.path, 0o600)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            with _transaction(db):
                for statement in _SCHEMA:
                    db.execute(statement)
                row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('format', ?)", (str(CACHE_FORMAT),))
                elif row[0] != str(CACHE_FORMAT):
                    raise sqlite3.DatabaseError(f"cache format {row[0]!r}, not {CACHE_FORMAT}")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- sha256 by file identity -----------------------------------------------------------------

    def load_hashes(self) -> dict[str, str]:
        """Every remembered hash (empty when there is no usable cache: files are then hashed)."""
        db = self._connect()
        if db is None:
            return {}
        try:
            return dict(db.execute("SELECT stat_key, sha256 FROM hashes"))
        except sqlite3.Error:
            return {}

    def save_hashes(self, learned: dict[str, str]) -> None:
        self._hashes.extend(learned.items())
        self._maybe_flush()

    # -- reports by content ----------------------------------------------------------------------

    def get_report(self, sha256: str, policy_hash: str, version: str) -> ScanReport | None:
        return self.get_reports([sha256], policy_hash, version).get(sha256)

    def get_reports(self, shas: Iterable[str], policy_hash: str, version: str) -> dict[str, ScanReport]:
        """The cached, valid reports among ``shas`` (one query per few hundred, not one each)."""
        # Here, not at the top: a replayed run (audit_memo) opens the cache without the models.
        from safeload.model import ResultError, ScanReport, load_json

        db = self._connect()
        if db is None:
            return {}
        wanted = {result_key(sha, policy_hash, version): sha for sha in shas}
        keys = list(wanted)
        found: dict[str, ScanReport] = {}
        for i in range(0, len(keys), _KEYS_PER_QUERY):
            chunk = keys[i : i + _KEYS_PER_QUERY]
            try:
                rows = db.execute(
                    "SELECT key, sha256, policy_hash, version, report FROM results WHERE key IN "
                    f"({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
            except sqlite3.Error:
                return found
            for key, sha, row_policy, row_version, text in rows:
                if wanted.get(key) != sha or (row_policy, row_version) != (policy_hash, version):
                    continue
                try:
                    report = load_json(text, ScanReport)
                except ResultError:
                    continue
                if report.sha256 == sha and report.policy_hash == policy_hash:
                    found[sha] = report
        return found

    def cached_shas(self, policy_hash: str, version: str, limit: int = 200_000) -> set[str] | None:
        """The sha256 of every file with a committed result for this policy and version, so that a
        miss costs no query; None when there are more than ``limit`` (ask ``get_report`` then)."""
        db = self._connect()
        if db is None:
            return set()
        try:
            rows = db.execute(
                "SELECT sha256 FROM results WHERE policy_hash = ? AND version = ?", (policy_hash, version)
            ).fetchmany(limit + 1)
        except sqlite3.Error:
            return set()
        return None if len(rows) > limit else {row[0] for row in rows}

    def put_report(self, report: ScanReport, version: str, *, text: str | None = None) -> None:
        """``text``: the report's JSON when the caller has it already (a worker sent it)."""
        if report.sha256 is None or not cacheable(report):
            return
        key = result_key(report.sha256, report.policy_hash, version)
        if text is None:
            from safeload.model import dump_json  # here: a replayed run never imports the models

            text = dump_json(report)
        self._results.append((key, report.sha256, report.policy_hash, version, text))
        self._maybe_flush()

    # -- writing ---------------------------------------------------------------------------------

    def _maybe_flush(self) -> None:
        pending = len(self._results) + len(self._hashes)
        if pending >= _FLUSH_ENTRIES or time.monotonic() - self._last_flush >= _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Commit what is buffered, in one transaction. A failure loses only cache entries."""
        self._last_flush = time.monotonic()
        if not self._results and not self._hashes:
            return
        hashes, results = self._hashes, self._results
        self._hashes, self._results = [], []
        db = self._connect()
        if db is None:
            return
        try:
            with _transaction(db):
                db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?)", hashes)
                db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", results)
        except sqlite3.Error:
            pass  # entries not written: the next run is slower, no worse


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error (Ctrl-C included)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        raise
    db.execute("COMMIT")


def cacheable(report: ScanReport) -> bool:
    return report.sha256 is not None and not any(f.code in UNCACHEABLE_CODES for f in report.findings)
