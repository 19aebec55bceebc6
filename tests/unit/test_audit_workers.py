"""What the auditing process does with a worker's answer."""

from __future__ import annotations

import pytest

from safeload.audit_workers import _outcome
from safeload.model import ResultError, ScanReport, Verdict, load_json, make_finding, unread_report
from safeload.policy import load_policy


def _report() -> ScanReport:
    policy = load_policy("default")
    return unread_report(
        "a.pkl", make_finding("SL206", "gone"), policy=policy.name, policy_hash=policy.hash, versions={}
    )


def test_a_worker_report_round_trips() -> None:
    report = _report()
    outcome = _outcome("a.pkl", (report.to_json(), False, "key", False), load_policy("default"))
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
    outcome = _outcome("a.pkl", (text, True, "key", False), load_policy("default"))
    assert outcome.report.verdict is Verdict.UNSCANNABLE
    assert [f.code for f in outcome.report.findings] == ["SL207"]
    assert "report for this file is broken" in outcome.report.findings[0].message
    assert outcome.stat_key is None and not outcome.cached  # nothing of it is remembered
