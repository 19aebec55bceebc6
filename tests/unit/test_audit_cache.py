"""The audit cache's writes: batches committed in a thread, their rows bound as one JSON array
(or one by one where SQLite or the rows rule that out), and closing without waiting."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from safeload import audit_cache
from safeload.audit_cache import DB_NAME, AuditCache, wait_for_commits
from safeload.model import ScanReport, Verdict, dump_json, load_json

# Strings that a JSON array must carry exactly: quotes, backslashes, control characters, a line
# separator, text beyond the BMP, and a name that was not UTF-8 (dump_json escapes its bytes).
_ODD_PATHS = [
    'a "quoted" \\ path',
    "tab\tnewline\nbell\x07",
    "line\u2028separator",
    "emoji \U0001f600 and é",
    "not utf-8 \udcff\udcfe",
    "an escaped \\u0000 in the text",
]


def _report(sha: str, path: str = "x") -> ScanReport:
    return ScanReport(path=path, sha256=sha, size=3, verdict=Verdict.SAFE, policy="p", policy_hash="h")


def _rows(root: Path) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(root / DB_NAME)) as db:
        results = db.execute("SELECT count(*) FROM results").fetchone()[0]
        hashes = db.execute("SELECT count(*) FROM hashes").fetchone()[0]
    return results, hashes


def test_rows_come_back_exactly_as_they_were_written(tmp_path: Path) -> None:
    cache = AuditCache(tmp_path / "c")
    reports = {f"{i:064x}": _report(f"{i:064x}", path) for i, path in enumerate(_ODD_PATHS)}
    for report in reports.values():
        cache.put_report(report, "1.0")
    cache.save_hashes({f"1:{i}:3:0:0": sha for i, sha in enumerate(reports)})
    cache.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "c" / DB_NAME)) as db:
        stored = dict(db.execute("SELECT sha256, report FROM results"))
    # the very text dump_json wrote, not an equivalent re-rendering of it
    assert stored == {sha: dump_json(r) for sha, r in reports.items()}
    fresh = AuditCache(tmp_path / "c")
    # (a name that was not UTF-8 comes back as dump_json wrote it: its bytes as \xNN text)
    assert fresh.get_reports(reports, "h", "1.0") == {
        sha: load_json(dump_json(r), ScanReport) for sha, r in reports.items()
    }
    assert fresh.load_hashes() == {f"1:{i}:3:0:0": sha for i, sha in enumerate(reports)}
    fresh.close()


def test_a_row_json_text_cannot_carry_is_bound_as_it_is(tmp_path: Path) -> None:
    """json_extract's text ends at a NUL character: such a batch goes row by row."""
    cache = AuditCache(tmp_path / "c")
    cache.put_report(_report("e" * 64), "1.0\0build")
    cache.close()
    cache = AuditCache(tmp_path / "c")
    assert cache.get_report("e" * 64, "h", "1.0\0build") == _report("e" * 64)
    assert cache.get_report("e" * 64, "h", "1.0") is None
    assert cache._json_rows  # one batch that JSON cannot carry says nothing of SQLite


def test_a_sqlite_without_json_functions_gets_the_rows_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = audit_cache._INSERT_RESULTS_JSON.replace("json_each", "json_each_missing")
    monkeypatch.setattr(audit_cache, "_INSERT_RESULTS_JSON", broken)
    cache = AuditCache(tmp_path / "c")
    cache.save_hashes({"1:2:3:4:5": "e" * 64})
    cache.put_report(_report("e" * 64), "1.0")
    cache.flush()
    assert not cache._json_rows  # found out once, and remembered
    cache.put_report(_report("f" * 64), "1.0")
    cache.close()
    fresh = AuditCache(tmp_path / "c")
    assert set(fresh.get_reports(["e" * 64, "f" * 64], "h", "1.0")) == {"e" * 64, "f" * 64}
    assert fresh.load_hashes() == {"1:2:3:4:5": "e" * 64}  # rolled back with the batch, then written


def test_other_sqlite_errors_lose_the_batch_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = AuditCache(tmp_path / "c")
    cache.put_report(_report("e" * 64), "1.0")
    cache.flush()
    monkeypatch.setattr(audit_cache, "_INSERT_RESULTS_JSON", "INSERT INTO no_such_table VALUES (?)")
    cache.put_report(_report("f" * 64), "1.0")
    cache.save_hashes({"1:2:3:4:5": "f" * 64})
    cache.close()  # no exception: a cache entry is never worth an audit
    fresh = AuditCache(tmp_path / "c")
    assert set(fresh.get_reports(["e" * 64, "f" * 64], "h", "1.0")) == {"e" * 64}
    assert fresh.load_hashes() == {}  # the batch is one transaction


def test_full_batches_commit_in_a_thread_while_the_audit_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    commit = AuditCache._commit

    def recording(self: AuditCache, *args: object) -> None:
        threads.append(threading.current_thread().name)
        commit(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(AuditCache, "_commit", recording)
    cache = AuditCache(tmp_path / "c")
    shas = [f"{i:064x}" for i in range(audit_cache._FLUSH_ENTRIES * 2 + 10)]
    for sha in shas:
        cache.put_report(_report(sha), "1.0")
    assert threads == ["safeload-cache-commit"] * 2  # two full batches, each in its thread
    cache.close()
    assert threads[-1] == threading.current_thread().name  # close commits the rest itself
    assert _rows(tmp_path / "c") == (len(shas), 0)


def test_closing_without_waiting_leaves_the_last_commit_to_finish(tmp_path: Path) -> None:
    cache = AuditCache(tmp_path / "c")
    reports = {f"{i:064x}": _report(f"{i:064x}") for i in range(300)}
    cache.load_hashes()  # open: reading and writing connections both
    for report in reports.values():
        cache.put_report(report, "1.0")
    cache.close(wait=False)
    assert audit_cache._PENDING  # committing (and closing) in the background
    # A cache opened afterwards in this process waits for it: it reads every row.
    reader = AuditCache(tmp_path / "c")
    assert reader.get_reports(reports, "h", "1.0") == reports
    assert not audit_cache._PENDING
    reader.close()
    cache.close(wait=False)  # closed already: nothing left to do
    wait_for_commits()
    assert _rows(tmp_path / "c") == (300, 0)
    # the log went back into the database when the last connection closed
    assert not (tmp_path / "c" / f"{DB_NAME}-wal").exists()


def test_an_audit_may_leave_its_last_commit_to_finish_but_never_when_interrupted(
    tmp_path: Path,
) -> None:
    import pickle

    from safeload.audit import AuditOptions, audit

    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(5):
        (tree / f"f{i}.pkl").write_bytes(pickle.dumps({"i": i}))
    options = AuditOptions(cache_dir=tmp_path / "c", jobs=1)
    run = audit([str(tree)], options, wait_for_cache=False)
    wait_for_commits()
    assert run.counts.scanned == 5 and _rows(tmp_path / "c") == (5, 5)

    for i in range(5):
        (tree / f"g{i}.pkl").write_bytes(pickle.dumps({"g": i}))
    seen = 0

    def interrupt(event: object) -> None:
        nonlocal seen
        seen += 1
        if seen == 8:  # the first event says how many there are; then 5 cached, 2 new
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        audit([str(tree)], options, progress=interrupt, wait_for_cache=False)
    assert not audit_cache._PENDING  # the interrupted audit waited: what it learned is on disk
    assert _rows(tmp_path / "c") == (7, 7)


def test_a_cache_that_is_never_written_starts_no_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    cache = AuditCache(tmp_path / "c")
    cache.load_hashes()
    cache.close(wait=False)
    assert not audit_cache._PENDING and threading.active_count() == before
    report = replace(_report("e" * 64), sha256=None)
    cache.put_report(report, "1.0")  # not cacheable: nothing buffered
    cache.close()
    assert _rows(tmp_path / "c") == (0, 0)
