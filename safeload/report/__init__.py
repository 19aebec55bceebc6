"""Report renderers. They read the result model; they never scan.

Renderers are imported when a report is rendered: the command line lists the format names before
it knows whether it will render anything (a replayed audit report renders nothing).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: a replayed audit never needs it
if TYPE_CHECKING:
    from collections.abc import Callable

    from safeload.model import ScanRun

    Renderer = Callable[..., str]

FORMATS: tuple[str, ...] = ("text", "json", "sarif", "html", "markdown")


def renderer(fmt: str) -> Renderer:
    if fmt == "text":
        from safeload.report.audit_text import render_text

        return render_text
    if fmt == "json":
        # Not at the top: json_report is also run as a script (--write-schema), and importing it
        # with this package would make `python -m safeload.report.json_report` warn of a double import.
        from safeload.report.json_report import render_json

        return render_json
    if fmt == "sarif":
        from safeload.report.sarif import render_sarif

        return render_sarif
    if fmt == "html":
        from safeload.report.html import render_html

        return render_html
    if fmt == "markdown":
        from safeload.report.markdown import render_markdown

        return render_markdown
    raise KeyError(fmt)


def render(run: ScanRun, fmt: str, *, verbose: bool = False) -> str:
    return renderer(fmt)(run, verbose=verbose)


def render_bytes(run: ScanRun, fmt: str, *, verbose: bool = False) -> bytes:
    """The report as UTF-8, for a file. JSON is encoded straight to bytes: a registry's report is
    megabytes, and text would be decoded only to be encoded again for each file it goes to."""
    if fmt == "json":
        from safeload.report.json_report import render_json_bytes

        return render_json_bytes(run, verbose=verbose)
    return render(run, fmt, verbose=verbose).encode("utf-8")
