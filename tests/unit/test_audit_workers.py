"""What the auditing process does with a worker's answer."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import pytest

from safeload.audit_workers import Outcome, Scanner, decode_outcome
from safeload.model import ResultError, ScanReport, Verdict, load_json, make_finding, unread_report
from safeload.policy import load_policy


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
