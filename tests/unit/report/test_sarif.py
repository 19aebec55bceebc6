"""SARIF 2.1.0: valid against the official schema, with what GitHub code scanning reads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema

from safeload.codes import RULES
from safeload.model import ScanRun
from safeload.report.sarif import FINGERPRINT_KEY, ROOT_ID, render_sarif
from tests.unit.report.sample import CONTROL, HOSTILE_GLOBAL, audit_run, scan_run, unsafe_report

ROOT = Path(__file__).resolve().parents[3]
# The official schema lives beside the checkout (../shared), never copied into the project.
SARIF_SCHEMA = ROOT / ".." / "shared" / "schemas" / "sarif-schema-2.1.0.json"


def _validator() -> jsonschema.Draft4Validator:
    schema = json.loads(SARIF_SCHEMA.read_text(encoding="utf-8"))
    return jsonschema.Draft4Validator(schema)


def _sarif(run: ScanRun, tmp_path: Path, **kw: Any) -> dict[str, Any]:
    return json.loads(render_sarif(run, base=tmp_path, **kw))


def _in(tmp_path: Path, run: ScanRun) -> ScanRun:
    """The same run with paths under tmp_path, as a scan from the repository root would give."""
    reports = tuple(replace(r, path=str(tmp_path / r.path)) for r in run.reports)
    return replace(run, reports=reports)


def test_valid_against_the_official_schema(tmp_path: Path) -> None:
    validator = _validator()
    for run in (scan_run(), audit_run(), _in(tmp_path, scan_run())):
        for verbose in (False, True):
            log = _sarif(run, tmp_path, verbose=verbose)
            errors = sorted(validator.iter_errors(log), key=str)
            assert not errors, errors[0]


def test_the_validator_catches_a_broken_log(tmp_path: Path) -> None:
    validator = _validator()
    log = _sarif(scan_run(), tmp_path)
    log["runs"][0]["results"][0]["level"] = "fatal"
    assert not validator.is_valid(log)
    log = _sarif(scan_run(), tmp_path)
    del log["runs"][0]["tool"]["driver"]["name"]
    assert not validator.is_valid(log)


def test_rules_are_the_catalogue_with_github_properties(tmp_path: Path) -> None:
    driver = _sarif(scan_run(), tmp_path)["runs"][0]["tool"]["driver"]
    assert [r["id"] for r in driver["rules"]] == list(RULES)
    floor = driver["rules"][list(RULES).index("SL100")]
    assert floor["name"] == "floor-global"
    assert float(floor["properties"]["security-severity"]) >= 9.0
    assert "external/cwe/cwe-502" in floor["properties"]["tags"]
    assert floor["defaultConfiguration"]["level"] == "error"
    info = driver["rules"][list(RULES).index("SL400")]
    assert info["defaultConfiguration"]["level"] == "note"


def test_results_have_locations_offsets_members_and_fingerprints(tmp_path: Path) -> None:
    run = _in(tmp_path, ScanRun(version="0.1.0", policy="default", reports=(unsafe_report(),), exit_code=1))
    sarif_run = _sarif(run, tmp_path)["runs"][0]
    results = sarif_run["results"]
    rules = sarif_run["tool"]["driver"]["rules"]
    assert [r["ruleId"] for r in results] == ["SL100", "SL101", "SL202"]
    for r in results:
        assert rules[r["ruleIndex"]]["id"] == r["ruleId"]
        loc = r["locations"][0]["physicalLocation"]
        assert loc["artifactLocation"]["uri"] == "models/evil.pt"
        assert loc["artifactLocation"]["uriBaseId"] == ROOT_ID
        assert len(r["partialFingerprints"][FINGERPRINT_KEY]) == 64
    floor, disallowed, _multi = results
    assert floor["level"] == "error"
    assert floor["locations"][0]["physicalLocation"]["region"] == {"byteOffset": 1041, "byteLength": 1}
    assert floor["locations"][0]["logicalLocations"][0]["name"] == "archive/data.pkl"
    assert floor["properties"]["global"] == "builtins.exec"
    assert "very likely malicious" in floor["message"]["text"]
    # no absolute offset known: no region, the stream offset is still said
    assert "region" not in disallowed["locations"][0]["physicalLocation"]
    assert disallowed["properties"]["streamOffset"] == 40
    assert "Remedy:" in disallowed["message"]["text"]
    assert sarif_run["originalUriBaseIds"][ROOT_ID]["uri"].endswith("/")
    artifact = sarif_run["artifacts"][0]
    assert artifact["hashes"]["sha-256"] == "a" * 64 and artifact["length"] == 4096


def test_fingerprint_ignores_offsets_but_not_the_global(tmp_path: Path) -> None:
    report = unsafe_report()
    moved = replace(report, findings=tuple(replace(f, offset=999, file_offset=5) for f in report.findings))
    other = replace(report, findings=tuple(replace(f, global_name="os.system") for f in report.findings))

    def prints(r: object) -> list[str]:
        run = ScanRun(version="0.1.0", policy="default", reports=(r,), exit_code=1)  # type: ignore[arg-type]
        return [
            x["partialFingerprints"][FINGERPRINT_KEY] for x in _sarif(run, tmp_path)["runs"][0]["results"]
        ]

    assert prints(report) == prints(moved)
    assert prints(report)[:2] != prints(other)[:2]


def test_unscannable_files_are_tool_execution_notifications(tmp_path: Path) -> None:
    sarif_run = _sarif(scan_run(), tmp_path)["runs"][0]
    invocation = sarif_run["invocations"][0]
    notes = invocation["toolExecutionNotifications"]
    assert len(notes) == 1
    assert notes[0]["associatedRule"]["id"] == "SL206"
    assert "Permission denied" in notes[0]["message"]["text"]
    assert invocation["exitCode"] == 1 and invocation["executionSuccessful"] is True
    incomplete = ScanRun(version="0.1.0", policy="default", reports=scan_run().reports[2:3], exit_code=2)
    assert _sarif(incomplete, tmp_path)["runs"][0]["invocations"][0]["executionSuccessful"] is False


def test_waived_findings_stay_visible_as_suppressed(tmp_path: Path) -> None:
    results = _sarif(scan_run(), tmp_path)["runs"][0]["results"]
    waived = [r for r in results if r.get("suppressions")]
    assert len(waived) == 1
    assert waived[0]["suppressions"][0]["justification"] == "reviewed by the model team"
    assert waived[0]["properties"]["waived"] is True


def test_attacker_strings_are_escaped_and_uris_encoded(tmp_path: Path) -> None:
    text = render_sarif(_in(tmp_path, scan_run()), base=tmp_path)
    assert "\x1b" not in text and "\\\\x1b" in text  # the ESC is shown, as text, never emitted
    sarif_run = json.loads(text)["runs"][0]
    uris = [a["location"]["uri"] for a in sarif_run["artifacts"]]
    assert all(" " not in u and "\n" not in u and "|" not in u for u in uris)
    assert any(u.startswith("models/evil%1B") for u in uris)
    members = [
        loc["name"] for r in sarif_run["results"] for loc in r["locations"][0].get("logicalLocations", [])
    ]
    assert f"archive/{CONTROL}" not in members
    assert any("\\x1b[31mred\\x0anext" in m for m in members)
    assert any(HOSTILE_GLOBAL == r["properties"].get("global") for r in sarif_run["results"])


def test_paths_outside_the_base_are_absolute_file_uris(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    run = _in(outside, ScanRun(version="0.1.0", policy="default", reports=(unsafe_report(),), exit_code=1))
    uri = _sarif(run, tmp_path / "repo")["runs"][0]["artifacts"][0]["location"]
    assert uri["uri"].startswith("file:///") and "uriBaseId" not in uri
