"""Plain text for runs: the scan text report, plus the registry views when the run is an audit."""

from __future__ import annotations

from safeload.model import ScanRun
from safeload.report.text import render_run
from safeload.text import escape

TYPE_CHECKING = False
if TYPE_CHECKING:
    from safeload.audit_model import AuditRun

MAX_GLOBALS = 50


def render_text(run: ScanRun, *, verbose: bool = False) -> str:
    text = render_run(run, verbose=verbose)
    # By its kind, not isinstance: a scan's text report then never imports the audit models.
    if getattr(run, "kind", None) != "audit":
        return text
    return text + _registry_views(run, verbose)  # type: ignore[arg-type]


def _registry_views(run: AuditRun, verbose: bool) -> str:
    s = run.stats
    lines = [f"{s.paths} path(s), {s.files} distinct file(s)"]
    if run.baseline is not None:
        b = run.baseline
        lines.append(
            f"baseline {escape(b.path)}: only new findings shown; {b.suppressed} known finding(s) and "
            f"{b.unchanged_files} unchanged file(s) left out"
        )
    if run.inventory:
        compared = [c.policy for c in run.policy_checks]
        lines.append("globals (files importing it; policies allowing it):")
        shown = run.inventory if verbose else run.inventory[:MAX_GLOBALS]
        for g in shown:
            allowed = ", ".join(p for p in compared if p in g.allowed_by) or "none"
            lines.append(f"  {g.files:>6}  {escape(g.name)}  [{allowed}]")
        if len(shown) < len(run.inventory):
            lines.append(f"  ... {len(run.inventory) - len(shown)} more (use -v or another format)")
    for check in run.policy_checks:
        lines.append(f"policy {escape(check.policy)} would refuse {len(check.blocked)} file(s)")
        for b in check.blocked if verbose else check.blocked[:20]:
            why = ", ".join([escape(g) for g in b.globals] + list(b.codes))
            lines.append(
                f"  {escape(b.paths[0])}"
                + (f" (+{len(b.paths) - 1} paths)" if len(b.paths) > 1 else "")
                + f": {why}"
            )
    return "\n".join(lines) + "\n"
