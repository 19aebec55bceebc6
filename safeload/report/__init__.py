"""Report renderers. They read the result model; they never scan."""

from __future__ import annotations

from collections.abc import Callable

from safeload.model import ScanRun
from safeload.report.audit_text import render_text
from safeload.report.html import render_html
from safeload.report.markdown import render_markdown
from safeload.report.sarif import render_sarif

Renderer = Callable[..., str]


def render_json(run: ScanRun, *, verbose: bool = False) -> str:
    # Imported on use: json_report is also run as a script (--write-schema), and importing it here
    # first would make `python -m safeload.report.json_report` warn about a double import.
    from safeload.report import json_report

    return json_report.render_json(run, verbose=verbose)


FORMATS: dict[str, Renderer] = {
    "text": render_text,
    "json": render_json,
    "sarif": render_sarif,
    "html": render_html,
    "markdown": render_markdown,
}


def render(run: ScanRun, fmt: str, *, verbose: bool = False) -> str:
    return FORMATS[fmt](run, verbose=verbose)
