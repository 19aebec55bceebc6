"""Views shared by the renderers: counts, the findings a reader sees, the globals inventory."""

from __future__ import annotations

from collections.abc import Iterable

from safeload.codes import Effect, Severity, rule
from safeload.model import Finding, ScanReport, ScanRun, Verdict

TYPE_CHECKING = False
if TYPE_CHECKING:
    from safeload.audit_model import GlobalCount


def _is_audit(run: ScanRun) -> bool:
    """An audit run, told by its kind: a scan's report (SARIF, text) never imports the audit models."""
    return getattr(run, "kind", None) == "audit"


SEVERITY_ORDER = {s: i for i, s in enumerate(Severity)}


def verdict_counts(run: ScanRun) -> dict[Verdict, int]:
    counts = {v: 0 for v in Verdict}
    for report in run.reports:
        counts[report.verdict] += 1
    return counts


def shown_findings(report: ScanReport, *, verbose: bool) -> list[Finding]:
    """Findings worth a reader's attention, most severe first; info findings only when verbose."""
    shown = [f for f in report.findings if verbose or f.severity is not Severity.INFO]
    return sorted(shown, key=lambda f: (f.waived, SEVERITY_ORDER[f.severity]))


def file_identity(report: ScanReport) -> str:
    """The same bytes reached through several paths are one file."""
    return report.sha256 or f"path:{report.path}"


def incomplete(finding: Finding) -> bool:
    """A finding that means the file was not fully analysed (waived or not)."""
    return rule(finding.code).effect is Effect.INCOMPLETE


def inventory(run: ScanRun) -> tuple[GlobalCount, ...]:
    """The run's globals inventory: the audit's own (with policy comparisons) or one from its reports."""
    if _is_audit(run) and run.inventory:  # type: ignore[attr-defined]
        return run.inventory  # type: ignore[attr-defined, no-any-return]
    return tuple(count_globals(run.reports))


def policy_columns(run: ScanRun) -> list[str]:
    """Policies the globals inventory is judged against: an audit's checked policies (the one it
    ran with first), else the run's policy."""
    if _is_audit(run) and run.policy_checks:  # type: ignore[attr-defined]
        return [c.policy for c in run.policy_checks]  # type: ignore[attr-defined]
    return [run.policy]


def allowed_under(run: ScanRun, count: GlobalCount) -> list[bool]:
    """One cell per policy_columns(run)."""
    if _is_audit(run) and run.policy_checks:  # type: ignore[attr-defined]
        return [c.policy in count.allowed_by for c in run.policy_checks]  # type: ignore[attr-defined]
    return [count.allowed]


def count_globals(
    reports: Iterable[ScanReport], compared: dict[str, set[str]] | None = None
) -> list[GlobalCount]:
    """How many files and paths import each global, most widespread first.

    `compared` maps a policy name to the globals it allows, for the `allowed_by` column.
    """
    from safeload.audit_model import GlobalCount

    files: dict[str, set[str]] = {}
    paths: dict[str, set[str]] = {}
    allowed: dict[str, bool] = {}
    for report in reports:
        for stream in report.streams:
            for use in stream.globals:
                files.setdefault(use.name, set()).add(file_identity(report))
                paths.setdefault(use.name, set()).add(report.path)
                allowed[use.name] = allowed.get(use.name, True) and use.allowed
    counts = [
        GlobalCount(
            name=name,
            files=len(files[name]),
            paths=len(paths[name]),
            allowed=allowed[name],
            allowed_by=tuple(p for p, names in (compared or {}).items() if name in names),
        )
        for name in files
    ]
    return sorted(counts, key=lambda c: (c.allowed, -c.files, c.name))
