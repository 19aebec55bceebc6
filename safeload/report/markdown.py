"""Markdown for pull-request comments and CI job summaries (GitHub-flavoured tables).

Strings from scanned files are control-escaped, HTML-escaped (GitHub renders inline HTML) and
have Markdown punctuation backslash-escaped, so a file name cannot become a link, an image, a
table cell break or a heading.
"""

from __future__ import annotations

import html
import re

from safeload.audit_model import AuditRun
from safeload.model import Finding, ScanReport, ScanRun, Verdict
from safeload.report.summary import allowed_under, inventory, policy_columns, shown_findings, verdict_counts
from safeload.text import escape

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>:@])")
_ICON = {Verdict.SAFE: "✅ SAFE", Verdict.UNSAFE: "⛔ UNSAFE", Verdict.UNSCANNABLE: "⚠️ UNSCANNABLE"}
MAX_ROWS = 500


def md(value: object, limit: int = 300) -> str:
    """Inline text from a file, inert in Markdown and HTML."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(escape(value, limit), quote=False))


def _fence(lines: list[str]) -> str:
    # A fence longer than any backtick run inside cannot be closed by the content.
    longest = max((len(m) for line in lines for m in re.findall(r"`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return "\n".join([fence + "python", *lines, fence])


def render_markdown(run: ScanRun, *, verbose: bool = False) -> str:
    counts = verdict_counts(run)
    kind = "audit" if isinstance(run, AuditRun) else "scan"
    out = [
        f"## safeload {kind}: {counts[Verdict.UNSAFE]} unsafe, {counts[Verdict.UNSCANNABLE]} unscannable, "
        f"{counts[Verdict.SAFE]} safe",
        "",
        f"Policy **{md(run.policy)}** · safeload {md(run.version)} · exit code {run.exit_code}"
        + (f" · {len(run.skipped)} skipped (no model format)" if run.skipped else ""),
    ]
    if isinstance(run, AuditRun):
        s = run.stats
        out.append(f"\n{s.paths} paths, {s.files} distinct files.")
        if run.baseline is not None:
            b = run.baseline
            out.append(
                f"\nCompared with baseline {md(b.path)}: only what is new is shown "
                f"({b.suppressed} known findings and {b.unchanged_files} unchanged files left out)."
            )
    out += ["", *_files(run), *_details(run, verbose=verbose), *_globals(run)]
    if isinstance(run, AuditRun):
        out += _policy_checks(run)
    return "\n".join(out).rstrip() + "\n"


def _files(run: ScanRun) -> list[str]:
    if not run.reports:
        return ["No model files were found.", ""]
    rows = [
        "### Files",
        "",
        "| Verdict | Path | Size | Formats | Findings |",
        "| --- | --- | ---: | --- | ---: |",
    ]
    ordered = sorted(run.reports, key=lambda r: (r.verdict is Verdict.SAFE, r.verdict.value, r.path))
    for r in ordered[:MAX_ROWS]:
        n = sum(1 for f in r.findings if not f.waived and f.severity.value != "info")
        rows.append(
            f"| {_ICON[r.verdict]} | {md(r.path, 500)} | {r.size} | {md(', '.join(r.formats) or 'unknown')} | {n} |"
        )
    if len(ordered) > MAX_ROWS:
        rows.append(f"\n... and {len(ordered) - MAX_ROWS} more files (see the JSON or HTML report).")
    return [*rows, ""]


def _details(run: ScanRun, *, verbose: bool) -> list[str]:
    out: list[str] = []
    for r in sorted(run.reports, key=lambda r: r.path):
        findings = shown_findings(r, verbose=verbose)
        if r.verdict is Verdict.SAFE and not any(f.waived for f in findings) and not verbose:
            continue
        if not findings and not any(s.explanation for s in r.streams):
            continue
        out += _file_section(r, findings)
    return ["### Findings", "", *out] if out else []


def _file_section(r: ScanReport, findings: list[Finding]) -> list[str]:
    out = [f"#### {_ICON[r.verdict]} {md(r.path, 500)}", ""]
    if r.sha256:
        out += [f"sha256 {r.sha256}", ""]
    for f in findings:
        out.append(_finding(f))
    out.append("")
    for stream in r.streams:
        if stream.explanation:
            where = f"member {md(stream.member)}" if stream.member else "the file"
            lines = [escape(line, 400) for line in stream.explanation.splitlines()]
            out += [
                f"What loading {where} would do (decompiled with fickling, not run):",
                "",
                _fence(lines),
                "",
            ]
    return out


def _finding(f: Finding) -> str:
    text = f"- **{f.severity.value.upper()}** {f.code} {md(f.rule)}: {md(f.message, 1000)}"
    where = []
    if f.global_name:
        where.append(f"global {md(f.global_name)}")
    if f.member:
        where.append(f"member {md(f.member)}")
    if f.offset is not None:
        where.append(f"offset {f.offset}")
    if where:
        text += " (" + ", ".join(where) + ")"
    if f.waived:
        text += f"\n  - waived: {md(f.waiver_reason or '', 1000)}"
    elif f.remedy:
        text += f"\n  - remedy: {md(f.remedy, 2000)}"
    elif f.code == "SL100" and "malicious" not in f.message:
        text += "\n  - no policy can allow this global: the file is very likely malicious"
    return text


def _globals(run: ScanRun) -> list[str]:
    counts = inventory(run)
    if not counts:
        return []
    columns = policy_columns(run)
    out = [
        "### Globals inventory",
        "",
        "| Global | Files | " + " | ".join(md(p) for p in columns) + " |",
        "| --- | ---: |" + " --- |" * len(columns),
    ]
    for c in counts[:MAX_ROWS]:
        cells = " | ".join("allowed" if ok else "**refused**" for ok in allowed_under(run, c))
        out.append(f"| {md(c.name, 500)} | {c.files} | {cells} |")
    return [*out, ""]


def _policy_checks(run: AuditRun) -> list[str]:
    out = []
    for check in run.policy_checks:
        out.append(f"- policy **{md(check.policy)}** would refuse {len(check.blocked)} file(s)")
        for b in check.blocked[:50]:
            why = ", ".join([md(g) for g in b.globals] + [md(c) for c in b.codes])
            out.append(
                f"  - {md(b.paths[0], 500)}"
                + (f" (+{len(b.paths) - 1} paths)" if len(b.paths) > 1 else "")
                + f": {why}"
            )
    return ["### Which files block which policy", "", *out, ""] if out else []
