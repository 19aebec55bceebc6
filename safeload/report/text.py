"""Plain-text report for terminals and logs. Every string from a file is escaped."""

from __future__ import annotations

from safeload.model import ScanReport, ScanRun, Verdict
from safeload.text import escape

_MARK = {Verdict.SAFE: "SAFE", Verdict.UNSAFE: "UNSAFE", Verdict.UNSCANNABLE: "UNSCANNABLE"}


def render_report(report: ScanReport, *, verbose: bool = False) -> str:
    formats = ", ".join(report.formats) or "unknown format"
    lines = [f"{_MARK[report.verdict]:<11} {escape(report.path)}  ({formats}; policy {report.policy})"]
    if report.sha256:
        lines.append(f"    sha256 {report.sha256}")
    shown = [f for f in report.findings if verbose or f.severity.value != "info"]
    for finding in shown:
        lines.extend("    " + line for line in finding.render().splitlines())
    flagged_streams = [s for s in report.streams if s.explanation]
    for stream in flagged_streams:
        where = escape(stream.member) if stream.member else "the file"
        lines.append(f"    what loading {where} would do (decompiled with fickling):")
        lines.extend("      | " + escape(line, 400) for line in stream.explanation.splitlines())  # type: ignore[union-attr]
    if verbose:
        for stream in report.streams:
            names = sorted({g.name for g in stream.globals})
            where = escape(stream.member) if stream.member else "<file>"
            lines.append(
                f"    stream {where}: protocol {stream.protocol}, {stream.opcodes} opcodes, {len(names)} globals"
            )
            lines.extend(
                f"      {'ok ' if g.allowed else 'NO '} {escape(g.name)}" for g in _unique(stream.globals)
            )
    return "\n".join(lines)


def _unique(globals_):  # type: ignore[no-untyped-def]
    seen = set()
    for g in globals_:
        if g.name not in seen:
            seen.add(g.name)
            yield g


def render_run(run: ScanRun, *, verbose: bool = False) -> str:
    parts = [render_report(r, verbose=verbose) for r in run.reports]
    counts = {v: sum(1 for r in run.reports if r.verdict is v) for v in Verdict}
    summary = (
        f"{len(run.reports)} file(s) scanned: {counts[Verdict.SAFE]} safe, {counts[Verdict.UNSAFE]} unsafe, "
        f"{counts[Verdict.UNSCANNABLE]} unscannable"
    )
    if run.skipped:
        summary += f"; {len(run.skipped)} skipped (no model format)"
    parts.append(summary)
    return "\n".join(parts) + "\n"
