"""Text report of an audit: the scan report plus inventory, policy checks and baseline lines."""

from __future__ import annotations

from safeload.report import render
from safeload.report.text import render_run
from tests.unit.report.sample import audit_run, scan_run


def test_scan_runs_keep_the_plain_text_report() -> None:
    assert render(scan_run(), "text") == render_run(scan_run())


def test_audit_text_adds_the_registry_views() -> None:
    text = render(audit_run(), "text")
    assert text.startswith(render_run(audit_run()))
    assert "5 path(s), 4 distinct file(s)\n" in text and "cache" not in text
    assert "baseline old.json: only new findings shown" in text
    assert "2  collections.OrderedDict  [default, strict]" in text
    assert "1  builtins.exec  [none]" in text
    assert "policy default would refuse 1 file(s)\n  models/evil.pt: builtins.exec" in text
    assert "policy strict would refuse 0 file(s)" in text
    assert "\x1b" not in text
