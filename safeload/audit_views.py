"""Registry views over finished reports: waivers re-applied, baselines, which files block which policy."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from safeload.audit_model import BaselineInfo, BlockedFile, PolicyCheck
from safeload.codes import Effect, rule
from safeload.model import Finding, ScanReport, Verdict, decide
from safeload.report.summary import file_identity

if TYPE_CHECKING:
    from safeload.policy import Policy

# Codes whose outcome depends on the policy's allow list; every other blocking finding blocks any policy.
_POLICY_CODES = frozenset({"SL100", "SL101"})
_MAX_BASELINE_BYTES = 512 << 20


class AuditError(ValueError):
    """A usage problem (bad baseline file, policy changed mid-run): CLI exit 3."""


def reapply_waivers(report: ScanReport, policy: Policy) -> ScanReport:
    """Cached reports carry the waivers of their day; a waiver may have expired since."""
    if report.sha256 is None:
        return report
    findings = []
    for f in report.findings:
        if rule(f.code).effect is Effect.NONE:
            findings.append(f)
            continue
        waiver = policy.waiver_for(report.sha256, f.code, f.global_name)
        if waiver is None:
            findings.append(replace(f, waived=False, waiver_reason=None))
        else:
            findings.append(replace(f, waived=True, waiver_reason=waiver.reason))
    new = tuple(findings)
    if new == report.findings:
        return report
    return replace(report, findings=new, verdict=decide(new))


Identity = tuple[str, str, str]


def finding_identity(report: ScanReport, finding: Finding) -> Identity:
    """What makes a finding the same one in a later run: the bytes, the rule, the global. Never offsets."""
    return (file_identity(report), finding.code, finding.global_name or "")


def load_baseline(path: Path) -> set[Identity]:
    """Finding identities from an earlier `--format json` report of scan or audit."""
    try:
        if path.stat().st_size > _MAX_BASELINE_BYTES:
            raise AuditError(f"baseline {path} is larger than {_MAX_BASELINE_BYTES} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditError(f"cannot read baseline {path}: {exc}") from exc
    reports = data.get("reports") if isinstance(data, dict) else None
    if not isinstance(reports, list):
        raise AuditError(f"baseline {path} is not a safeload JSON report (no 'reports' list)")
    known: set[Identity] = set()
    for r in reports:
        if not isinstance(r, dict) or not isinstance(r.get("findings"), list):
            raise AuditError(f"baseline {path}: a report without a 'findings' list")
        sha = r.get("sha256")
        ident = sha if isinstance(sha, str) and sha else f"path:{r.get('path')}"
        for f in r["findings"]:
            if not isinstance(f, dict) or not isinstance(f.get("code"), str):
                raise AuditError(f"baseline {path}: a finding without a 'code'")
            known.add((ident, f["code"], f.get("global_name") or ""))
    return known


def apply_baseline(
    reports: list[ScanReport], known: set[Identity], path: Path
) -> tuple[list[ScanReport], BaselineInfo, list[Finding]]:
    """Keep only the findings the baseline does not have, and only the files that have some.

    A kept file keeps its own verdict (it describes the bytes); the returned new findings decide
    the exit code. Files with no findings at all have nothing new to say and are left out too.
    """
    kept: list[ScanReport] = []
    new_findings: list[Finding] = []
    suppressed = unchanged = 0
    for report in reports:
        new = tuple(f for f in report.findings if finding_identity(report, f) not in known)
        suppressed += len(report.findings) - len(new)
        if not new:
            unchanged += bool(report.findings)
            continue
        kept.append(replace(report, findings=new))
        new_findings.extend(new)
    info = BaselineInfo(path=str(path), known=len(known), suppressed=suppressed, unchanged_files=unchanged)
    return kept, info, new_findings


def policy_allows(policy: Policy, name: str) -> bool:
    return policy.decide(name).allowed


def policy_check(
    policy: Policy, reports: Sequence[ScanReport], scanned: bool, allowed: set[str] | None = None
) -> PolicyCheck:
    """Files `policy` would refuse. For the policy the run was scanned with, the verdicts decide;
    for another, the globals each file imports are judged against it (limits and waivers aside).
    `allowed`: the run's globals this policy allows, when already known."""
    if allowed is None:
        allowed = {n for r in reports for n in global_names(r) if policy_allows(policy, n)}
    blocked: dict[str, tuple[ScanReport, set[str], set[str], list[str]]] = {}
    for report in reports:
        if scanned:
            if report.verdict is Verdict.SAFE:
                continue
            active = [f for f in report.findings if f.effect is not Effect.NONE]
            names = {f.global_name for f in active if f.code in _POLICY_CODES and f.global_name}
            codes = {f.code for f in active if f.code not in _POLICY_CODES}
        else:
            names = global_names(report) - allowed
            codes = {
                f.code
                for f in report.findings
                if rule(f.code).effect is not Effect.NONE and f.code not in _POLICY_CODES
            }
            if not names and not codes:
                continue
        key = file_identity(report)
        entry = blocked.setdefault(key, (report, set(), set(), []))
        entry[1].update(names)
        entry[2].update(codes)
        entry[3].append(report.path)
    files = tuple(
        BlockedFile(sha256=r.sha256, paths=tuple(sorted(p)), globals=tuple(sorted(n)), codes=tuple(sorted(c)))
        for r, n, c, p in sorted(blocked.values(), key=lambda e: min(e[3]))
    )
    return PolicyCheck(policy=policy.name, policy_hash=policy.hash, blocked=files)


def global_names(report: ScanReport) -> set[str]:
    return {g.name for s in report.streams for g in s.globals}
