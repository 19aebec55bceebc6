"""What the auditing process does with a worker's answer."""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from dataclasses import replace
from pathlib import Path

import pytest

from safeload import api, source
from safeload.audit_walk import stat_key
from safeload.audit_workers import Outcome, Scanner, decode_outcome
from safeload.model import ResultError, ScanReport, Verdict, load_json, make_finding, unread_report
from safeload.policy import load_policy
from safeload.source import Source


def _report() -> ScanReport:
    policy = load_policy("default")
    return unread_report(
        "a.pkl", make_finding("SL206", "gone"), policy=policy.name, policy_hash=policy.hash, versions={}
    )


def test_a_worker_report_round_trips() -> None:
    report = _report()
    outcome = decode_outcome("a.pkl", (report.to_json(), False, "key", False), load_policy("default"))
    assert outcome.report == report and outcome.stat_key == "key"


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"path": "a.pkl"}',  # fields missing
        _report().to_json().replace('"UNSCANNABLE"', '"MAYBE"'),  # a verdict no report has
        _report().to_json().replace('"size":0', '"size":"0"'),  # a field of the wrong type
    ],
)
def test_a_broken_worker_report_is_that_files_internal_error(text: str) -> None:
    with pytest.raises(ResultError):
        load_json(text, ScanReport)
    outcome = decode_outcome("a.pkl", (text, True, "key", False), load_policy("default"))
    assert outcome.report.verdict is Verdict.UNSCANNABLE
    assert [f.code for f in outcome.report.findings] == ["SL207"]
    assert "report for this file is broken" in outcome.report.findings[0].message
    assert outcome.stat_key is None and not outcome.cached  # nothing of it is remembered


def test_a_report_that_cannot_be_written_costs_only_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = tmp_path / "good.pkl", tmp_path / "bad.pkl"
    good.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    bad.write_bytes(pickle.dumps({"b": 2}, protocol=4))
    policy = load_policy("default")
    scanner = Scanner(policy, None)
    real = scanner.safe_process

    def odd_report(path: str) -> Outcome:
        outcome = real(path)
        if path == str(bad):
            # A value no JSON encoder knows, as a bug could leave in a report.
            return Outcome(replace(outcome.report, size=object()))  # type: ignore[arg-type]
        return outcome

    monkeypatch.setattr(scanner, "safe_process", odd_report)
    results = scanner.batch([str(bad), str(good)])
    reports = [
        decode_outcome(path, result, policy).report
        for path, result in zip([str(bad), str(good)], results, strict=True)
    ]
    assert [f.code for f in reports[0].findings] == ["SL207"]
    assert "could not be written as JSON" in reports[0].findings[0].message
    assert reports[0].verdict is Verdict.UNSCANNABLE and results[0][2] is None  # nothing cached
    assert reports[1].verdict is Verdict.SAFE and reports[1].path == str(good)


def _written_over(path: Path) -> None:
    """Rewrite the file in place with other bytes of the same size (its times move on)."""
    data = path.read_bytes()
    time.sleep(0.01)  # past any timestamp tick of this filesystem
    path.write_bytes(data[::-1])


def test_a_small_file_written_while_it_is_read_is_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.pkl"
    target.write_bytes(pickle.dumps({"a": list(range(20))}, protocol=4))
    real_read = source._read_small

    def read_while_written(fd: int, size: int) -> bytes | None:
        _written_over(target)  # between the open's fstat and the read
        return real_read(fd, size)

    monkeypatch.setattr(source, "_read_small", read_while_written)
    outcome = Scanner(load_policy("default"), None).scan(str(target))
    assert "SL206" in [f.code for f in outcome.report.findings]
    assert outcome.stat_key is None  # nothing about this file is remembered


def test_a_small_file_written_after_it_was_read_keeps_the_identity_it_was_read_under(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan works on the bytes read: a later write changes nothing in them. The identity kept
    is the one those bytes had, which the rewritten file no longer has."""
    target = tmp_path / "m.pkl"
    original = pickle.dumps({"a": list(range(20))}, protocol=4)
    target.write_bytes(original)
    read_under = stat_key(target.stat())
    real_analyse = api.analyse

    def analyse_while_written(*args: object, **kwargs: object) -> object:
        _written_over(target)
        return real_analyse(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "analyse", analyse_while_written)
    outcome = Scanner(load_policy("default"), None).scan(str(target))
    assert [f.code for f in outcome.report.findings] == []
    assert outcome.report.sha256 == hashlib.sha256(original).hexdigest()
    assert outcome.stat_key == read_under != stat_key(target.stat())


def test_a_mapped_file_written_while_it_is_scanned_is_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapped file's pages are read as the scan touches them: a write during the scan counts."""
    target = tmp_path / "big.pkl"
    target.write_bytes(pickle.dumps({"pad": b"x" * api.SMALL_FILE_READ}, protocol=4))
    real_analyse = api.analyse

    def analyse_while_written(src: Source, *args: object, **kwargs: object) -> object:
        assert src.mapped
        with open(target, "r+b") as f:  # in place: the same inode, as the mapping sees it
            time.sleep(0.01)
            f.seek(api.SMALL_FILE_READ // 2)
            f.write(b"y")
        return real_analyse(src, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "analyse", analyse_while_written)
    outcome = Scanner(load_policy("default"), None).scan(str(target))
    assert "SL206" in [f.code for f in outcome.report.findings]
    assert outcome.stat_key is None


def test_a_file_renamed_over_after_it_was_read_keeps_the_identity_it_was_read_under(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path names another inode by the end of the scan: the key is the inode that was read,
    never the newcomer's (whose bytes were not scanned)."""
    target = tmp_path / "m.pkl"
    target.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    read_under = stat_key(target.stat())
    newcomer = tmp_path / "new.pkl"
    newcomer.write_bytes(pickle.dumps({"b": 2}, protocol=4))
    real_analyse = api.analyse

    def analyse_then_replace(*args: object, **kwargs: object) -> object:
        os.replace(newcomer, target)
        return real_analyse(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "analyse", analyse_then_replace)
    outcome = Scanner(load_policy("default"), None).scan(str(target))
    assert outcome.stat_key == read_under != stat_key(target.stat())
