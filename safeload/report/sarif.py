"""SARIF 2.1.0 for GitHub code scanning and other SARIF viewers.

Rules come from the catalogue (safeload.codes); each finding is a result located at its file, with a
binary region (byteOffset) when its absolute offset is known and the archive member as a logical
location. Files that could not be fully analysed are also tool-execution notifications, so a viewer
that hides results still shows that the run was incomplete.

Regions are binary only: the spec forbids mixing line and byte properties, and model files have no
lines. GitHub then shows the alert at the file level.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from safeload.codes import RULES, Severity, rule
from safeload.model import Finding, ScanReport, ScanRun
from safeload.report.summary import incomplete, shown_findings
from safeload.text import escape

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
ROOT_ID = "%SRCROOT%"
FINGERPRINT_KEY = "safeloadFinding/v1"

_LEVEL = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
    Severity.INFO: "note",
}
# GitHub maps security-severity to its labels: >= 9.0 critical, 7.0-8.9 high, 4.0-6.9 medium, < 4 low.
_SECURITY_SEVERITY = {
    Severity.CRITICAL: "9.8",
    Severity.HIGH: "8.1",
    Severity.MEDIUM: "5.3",
    Severity.LOW: "3.1",
    Severity.INFO: "0.0",
}
_RULE_INDEX = {code: i for i, code in enumerate(RULES)}


def render_sarif(run: ScanRun, *, verbose: bool = False, base: str | os.PathLike[str] | None = None) -> str:
    """The run as one SARIF log. Paths under `base` (default: the working directory) are relative."""
    root = Path(base if base is not None else os.getcwd()).resolve()
    artifacts: list[dict[str, Any]] = []
    artifact_index: dict[str, int] = {}
    results: list[dict[str, Any]] = []
    notifications: list[dict[str, Any]] = []
    for report in run.reports:
        location = _artifact_location(report.path, root)
        artifact_index[report.path] = len(artifacts)
        artifacts.append(_artifact(report, location))
        location = {**location, "index": artifact_index[report.path]}
        for finding in shown_findings(report, verbose=verbose):
            results.append(_result(report, finding, location))
        gaps = [f for f in report.findings if incomplete(f) and not f.waived]
        if gaps:
            notifications.append(_notification(report, gaps, location))
    sarif_run: dict[str, Any] = {
        "tool": {"driver": _driver(run.version)},
        "originalUriBaseIds": {ROOT_ID: {"uri": root.as_uri().rstrip("/") + "/"}},
        "invocations": [
            {
                # 0 and 1 are complete scans (clean or with findings); 2 and 3 mean something was not analysed.
                "executionSuccessful": run.exit_code in (0, 1),
                "exitCode": run.exit_code,
                "toolExecutionNotifications": notifications,
            }
        ],
        "artifacts": artifacts,
        "results": results,
        "columnKind": "unicodeCodePoints",
        "properties": {
            "policy": run.policy,
            "schemaVersion": run.schema_version,
            "skipped": [escape(p) for p in run.skipped],
        },
    }
    log = {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [sarif_run]}
    return json.dumps(log, indent=2, ensure_ascii=False) + "\n"


def _driver(version: str) -> dict[str, Any]:
    return {
        "name": "safeload",
        "version": version,
        "semanticVersion": version,
        "informationUri": "https://pypi.org/project/safeload/",
        "rules": [_rule_descriptor(code) for code in RULES],
    }


def _rule_descriptor(code: str) -> dict[str, Any]:
    r = RULES[code]
    return {
        "id": r.code,
        "name": r.name,
        "shortDescription": {"text": r.title},
        "fullDescription": {"text": r.help},
        "help": {"text": r.help, "markdown": f"**{r.title}** ({r.cwe})\n\n{r.help}"},
        "defaultConfiguration": {"level": _LEVEL[r.severity]},
        "properties": {
            "tags": ["security", f"external/cwe/{r.cwe.lower()}", f"effect/{r.effect.value}"],
            "security-severity": _SECURITY_SEVERITY[r.severity],
            "precision": "very-high",
            "problem.severity": "recommendation" if r.severity is Severity.INFO else _LEVEL[r.severity],
        },
    }


def _artifact_location(path: str, root: Path) -> dict[str, Any]:
    """A relative uri under the source root when the file is inside it, else an absolute file uri."""
    absolute = Path(os.path.abspath(path))
    try:
        relative = absolute.relative_to(root)
    except ValueError:
        return {"uri": absolute.as_uri()}
    # surrogateescape: a file name that is not UTF-8 keeps its original bytes, percent-encoded.
    uri = quote(PurePosixPath(*relative.parts).as_posix(), safe="/", errors="surrogateescape")
    return {"uri": uri, "uriBaseId": ROOT_ID}


def _artifact(report: ScanReport, location: dict[str, Any]) -> dict[str, Any]:
    artifact: dict[str, Any] = {
        "location": dict(location),
        "length": report.size,
        "roles": ["analysisTarget"],
        "properties": {
            "verdict": report.verdict.value,
            "formats": list(report.formats),
            "policy": report.policy,
        },
    }
    if report.sha256:
        artifact["hashes"] = {"sha-256": report.sha256}
    return artifact


def _result(report: ScanReport, finding: Finding, artifact_location: dict[str, Any]) -> dict[str, Any]:
    physical: dict[str, Any] = {"artifactLocation": artifact_location}
    if finding.file_offset is not None and finding.file_offset >= 0:
        physical["region"] = {"byteOffset": finding.file_offset, "byteLength": 1}
    location: dict[str, Any] = {"physicalLocation": physical}
    if finding.member:
        member = escape(finding.member)
        location["logicalLocations"] = [
            {"name": member, "fullyQualifiedName": f"{escape(report.path)}!{member}", "kind": "member"}
        ]
    result: dict[str, Any] = {
        "ruleId": finding.code,
        "ruleIndex": _RULE_INDEX[finding.code],
        "level": _LEVEL[finding.severity],
        "kind": "fail",
        "message": {"text": _message(report, finding)},
        "locations": [location],
        "partialFingerprints": {FINGERPRINT_KEY: fingerprint(report, finding)},
        "properties": _properties(report, finding),
    }
    if finding.waived:
        result["suppressions"] = [
            {
                "kind": "external",
                "status": "accepted",
                "justification": escape(finding.waiver_reason or "", 1000),
            }
        ]
    return result


def _message(report: ScanReport, finding: Finding) -> str:
    parts = [escape(finding.message, 1000)]
    where = []
    if finding.member:
        where.append(f"member {escape(finding.member)}")
    if finding.offset is not None:
        where.append(f"stream offset {finding.offset}")
    if finding.global_name:
        where.append(f"global {escape(finding.global_name)}")
    if where:
        parts.append("(" + ", ".join(where) + ")")
    if finding.waived:
        parts.append(f"Waived by policy {report.policy}: {escape(finding.waiver_reason or '', 500)}.")
    elif finding.remedy:
        parts.append("Remedy: " + escape(finding.remedy, 1000))
    elif finding.code == "SL100" and "malicious" not in finding.message:
        parts.append("No policy can allow this global: the file is very likely malicious.")
    return " ".join(parts)


def _properties(report: ScanReport, finding: Finding) -> dict[str, Any]:
    props: dict[str, Any] = {
        "severity": finding.severity.value,
        "rule": finding.rule,
        "effect": rule(finding.code).effect.value,
        "waived": finding.waived,
        "fileVerdict": report.verdict.value,
    }
    if report.sha256:
        props["sha256"] = report.sha256
    if finding.member:
        props["member"] = escape(finding.member)
    if finding.offset is not None:
        props["streamOffset"] = finding.offset
    if finding.global_name:
        props["global"] = escape(finding.global_name)
    if finding.uses:
        props["uses"] = [u.value for u in finding.uses]
    return props


def fingerprint(report: ScanReport, finding: Finding) -> str:
    """Stable across runs for the same bytes and finding; offsets are left out on purpose."""
    identity = report.sha256 or f"path:{report.path}"
    key = "\0".join([identity, finding.code, finding.global_name or "", finding.member or ""])
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _notification(
    report: ScanReport, gaps: list[Finding], artifact_location: dict[str, Any]
) -> dict[str, Any]:
    first = gaps[0]
    reasons = "; ".join(escape(f.message, 300) for f in gaps[:5])
    more = f" (and {len(gaps) - 5} more)" if len(gaps) > 5 else ""
    return {
        "level": "error",
        "message": {"text": f"{escape(report.path)} could not be fully analysed: {reasons}{more}"},
        "locations": [{"physicalLocation": {"artifactLocation": artifact_location}}],
        "associatedRule": {"id": first.code, "index": _RULE_INDEX[first.code]},
        "properties": {"verdict": report.verdict.value, "codes": sorted({f.code for f in gaps})},
    }
