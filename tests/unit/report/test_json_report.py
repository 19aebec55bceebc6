"""JSON report: round-trips through the models and matches the published schema, which is current."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from safeload.audit_model import AuditRun
from safeload.model import ScanRun, load_json
from safeload.report import FORMATS, render
from safeload.report.json_report import SCHEMA_FILE, json_schema, main, schema_text
from tests.unit.report.sample import audit_run, scan_run

ROOT = Path(__file__).resolve().parents[3]


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((ROOT / SCHEMA_FILE).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_published_schema_is_current() -> None:
    published = (ROOT / SCHEMA_FILE).read_text(encoding="utf-8")
    assert published == schema_text(), "run: python -m safeload.report.json_report --write-schema"


def test_check_schema_command_detects_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "s.json"
    stale.write_text("{}\n")
    assert main(["--check-schema", str(stale)]) == 1
    assert main(["--write-schema", str(stale)]) == 0
    assert main(["--check-schema", str(stale)]) == 0
    assert json.loads(stale.read_text()) == json_schema()


@pytest.mark.parametrize("make", [scan_run, audit_run])
def test_report_validates_and_round_trips(make) -> None:  # type: ignore[no-untyped-def]
    run = make()
    text = render(run, "json")
    data = json.loads(text)
    assert data["schema_version"] == 3
    _validator().validate(data)
    model = AuditRun if isinstance(run, AuditRun) else ScanRun
    assert load_json(text, model) == run


def test_schema_rejects_what_the_models_reject() -> None:
    validator = _validator()
    data = json.loads(render(scan_run(), "json"))
    data["reports"][0]["verdict"] = "MAYBE"
    assert not validator.is_valid(data)
    data = json.loads(render(scan_run(), "json"))
    data["reports"][0]["findings"][0]["surprise"] = 1
    assert not validator.is_valid(data)
    data = json.loads(render(audit_run(), "json"))
    del data["stats"]  # an audit without stats is neither a valid audit nor (with "kind") a scan
    assert not validator.is_valid(data)


def test_every_format_is_registered() -> None:
    assert set(FORMATS) == {"text", "json", "sarif", "html", "markdown"}
    for fmt in FORMATS:
        assert render(audit_run(), fmt).strip()
