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

A batch is committed in a thread of its own, on a connection of its own, while the scan goes on:
each table's rows are bound as one JSON array to one INSERT that reads them with json_each, so
SQLite inserts the whole batch (and commits, and checkpoints) without the GIL. Bound row by row,
the sqlite3 module takes the GIL back for each row, and the thread would queue behind the scan
at every one of them (on the 2-core VMs this project measures on, the writes were a tenth of an
audit's time with one job).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator

import msgspec

from safeload.audit_walk import stat_key
from safeload.model import ResultError, ScanReport, dump_json, load_json

__all__ = ["AuditCache", "cacheable", "result_key", "stat_key", "wait_for_commits"]

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    import threading

CACHE_FORMAT = 2
DB_NAME = "cache.sqlite3"
# Findings that describe this run's circumstances or this installation, not the bytes: never reused.
UNCACHEABLE_CODES = frozenset({"SL206", "SL207", "SL208"})
_FLUSH_ENTRIES = 2000  # results and hashes (a file scanned anew brings one of each)
_FLUSH_SECONDS = 2.0
_BUSY_TIMEOUT_S = 60.0
# Each table's batch as one statement over a JSON array of rows (json_extract: SQLite 3.9 with JSON1,
# built in since 3.38); where SQLite lacks it, the rows are bound one by one.
_INSERT_HASHES_JSON = (
    "INSERT OR REPLACE INTO hashes SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') "
    "FROM json_each(?)"
)
_INSERT_RESULTS_JSON = (
    "INSERT OR REPLACE INTO results SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), json_extract(value, '$[3]'), json_extract(value, '$[4]') FROM json_each(?)"
)
_INSERT_HASHES = "INSERT OR REPLACE INTO hashes VALUES (?, ?)"
_INSERT_RESULTS = "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)"
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
        self._db: sqlite3.Connection | None = None  # reads, and the set-up of a fresh file
        self._writer: sqlite3.Connection | None = None  # commits, from one thread at a time
        self._committing: threading.Thread | None = None  # the batch being committed
        self._json_rows = True  # False once SQLite is found to have no json_each
        self._hashes: list[tuple[str, str]] = []
        self._results: list[tuple[ScanReport, str, str | None]] = []  # (report, version, its JSON)
        self._last_flush = time.monotonic()

    # -- connection ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is not None:
            return self._db
        wait_for_commits()  # what an earlier cache of this process left committing is read, too
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
        db = _connection(self.path)
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

    def close(self, *, wait: bool = True) -> None:
        """Commit what is buffered and close. ``wait=False``: the last commit (and the checkpoint
        of closing) may go on in the background; ``wait_for_commits`` waits for it, and so does
        any cache opened in this process afterwards."""
        if not wait:
            if self._committing is None or self._hashes or self._results:
                self.start_closing()
            if self._committing is not None:
                _PENDING.append(self._committing)
                self._committing = None
                return
        self.flush()
        for db in (self._db, self._writer):
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
        self._writer = self._db = None

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
            cursor = db.execute(
                "SELECT sha256 FROM results WHERE policy_hash = ? AND version = ?", (policy_hash, version)
            )
            rows = cursor.fetchmany(limit + 1)
            # Ends the read: an open one would keep the writer's checkpoints from emptying the log.
            cursor.close()
        except sqlite3.Error:
            return set()
        return None if len(rows) > limit else {row[0] for row in rows}

    def put_report(self, report: ScanReport, version: str, *, text: str | None = None) -> None:
        """``text``: the report's JSON when the caller has it already (a worker sent it)."""
        if report.sha256 is None or not cacheable(report):
            return
        # Made a row when its batch is committed: JSON for thousands of reports in one go runs
        # about twice as fast as one report at a time between scans (whose work evicts the
        # encoder's from the CPU's caches).
        self._results.append((report, version, text))
        self._maybe_flush()

    # -- writing ---------------------------------------------------------------------------------

    def _maybe_flush(self) -> None:
        pending = len(self._results) + len(self._hashes)
        if pending >= _FLUSH_ENTRIES or time.monotonic() - self._last_flush >= _FLUSH_SECONDS:
            self._flush(in_background=True)

    def flush(self) -> None:
        """Commit what is buffered, in one transaction, and return once it is committed (or given
        up: a failure loses only cache entries)."""
        self._flush(in_background=False)

    def start_closing(self) -> None:
        """Commit what is buffered and close, in the background: ``close`` waits for it to end. The
        last connection to close writes the log back into the database (a checkpoint, its syncs):
        the reading one closes here, the writing one in the background after its commit."""
        self._flush(in_background=True, then_close=True)

    def _flush(self, *, in_background: bool, then_close: bool = False) -> None:
        self._last_flush = time.monotonic()
        self._await_commit()  # one batch in flight: batches commit in order
        batch = _Batch(self._hashes, [_result_row(*pending) for pending in self._results])
        self._hashes, self._results = [], []
        if not batch.empty and self._connect() is None:  # opens the file, sets it up or sets it aside
            return
        if then_close and self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        if batch.empty and (not then_close or self._writer is None):
            return
        if not in_background:
            self._commit(batch, then_close)
            return
        import threading  # here: an audit that never writes (a replay, a run of cached files) needs none

        # The rows are made JSON here: work under the GIL either way, and the thread then goes
        # straight into SQLite. Not a daemon: an interpreter that exits lets a commit finish, whole.
        batch.encode(self._json_rows)
        self._committing = threading.Thread(
            target=self._commit, args=(batch, then_close), name="safeload-cache-commit"
        )
        self._committing.start()

    def _await_commit(self) -> None:
        if self._committing is not None:
            self._committing.join()
            self._committing = None

    def _commit(self, batch: _Batch, then_close: bool = False) -> None:
        """Commit one batch on the writing connection (in whichever thread runs it); then close it."""
        try:
            if not batch.empty:
                if self._writer is None:
                    # check_same_thread off: each batch may come from another thread, one at a time.
                    self._writer = _connection(self.path, check_same_thread=False)
                    self._writer.execute("PRAGMA synchronous=NORMAL")
                self._json_rows = batch.commit(self._writer, self._json_rows)
        except sqlite3.Error:
            pass  # entries not written: the next run is slower, no worse
        if then_close and self._writer is not None:
            with contextlib.suppress(sqlite3.Error):
                self._writer.close()
            self._writer = None


class _Batch:
    """Rows to commit in one transaction: bound as one JSON array per table where SQLite has JSON1."""

    def __init__(self, hashes: list[tuple[str, str]], results: list[tuple[str, str, str, str, str]]) -> None:
        self.hashes = hashes
        self.results = results
        self.as_json: tuple[str | None, str | None] | None = None  # None: not encoded, or not encodable

    @property
    def empty(self) -> bool:
        return not self.hashes and not self.results

    def encode(self, json_rows: bool) -> None:
        if json_rows and self.as_json is None:
            try:
                self.as_json = (_json_array(self.hashes), _json_array(self.results))
            except UnicodeEncodeError:
                pass  # a row JSON cannot carry: bound row by row

    def commit(self, db: sqlite3.Connection, json_rows: bool) -> bool:
        """Commits (or raises sqlite3.Error); returns whether SQLite took JSON rows (json_rows
        stays False once it is found to lack json_each)."""
        self.encode(json_rows)
        if json_rows and self.as_json is not None:
            hash_rows, result_rows = self.as_json
            try:
                with _transaction(db):
                    _insert(db, _INSERT_HASHES_JSON, hash_rows)
                    _insert(db, _INSERT_RESULTS_JSON, result_rows)
                return True
            except sqlite3.OperationalError as exc:
                if "json" not in str(exc).lower():
                    raise
                json_rows = False  # no JSON1 in this SQLite: the rows one by one, from now on
        with _transaction(db):
            db.executemany(_INSERT_HASHES, self.hashes)
            db.executemany(_INSERT_RESULTS, self.results)
        return json_rows


# Commits that caches closed without waiting left in flight (close(wait=False)).
_PENDING: list[threading.Thread] = []


def wait_for_commits() -> None:
    """Wait for the commits that caches closed with ``wait=False`` left in flight."""
    while True:
        try:
            committing = _PENDING.pop()  # one pop: another thread may be waiting for them too
        except IndexError:
            return
        committing.join()


def _result_row(report: ScanReport, version: str, text: str | None) -> tuple[str, str, str, str, str]:
    sha = report.sha256 or ""  # put_report keeps only reports with a hash
    key = result_key(sha, report.policy_hash, version)
    return key, sha, report.policy_hash, version, dump_json(report) if text is None else text


def _connection(path: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    return sqlite3.connect(
        path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=check_same_thread
    )


def _json_array(rows: list[tuple[str, ...]]) -> str | None:
    """The rows as one JSON array of arrays (None for no rows). UnicodeEncodeError where a string
    holds a lone surrogate (JSON text cannot) or a NUL character (json_extract's text ends there;
    the test also meets an escaped one inside a report's JSON, which then goes the slow way too)."""
    if not rows:
        return None
    text = msgspec.json.encode(rows).decode("utf-8")
    if "\\u0000" in text:
        raise UnicodeEncodeError("utf-8", text, 0, 1, "a NUL character in a cache row")
    return text


def _insert(db: sqlite3.Connection, statement: str, rows: str | None) -> None:
    if rows is not None:
        db.execute(statement, (rows,))


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
