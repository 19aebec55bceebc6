"""Markdown report: hostile names cannot make links, break tables or close code fences."""

from __future__ import annotations

import re

from safeload.report.markdown import md, render_markdown
from tests.unit.report.sample import PIPE_LINK, audit_run, scan_run


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def _tables(text: str) -> list[list[str]]:
    tables: list[list[str]] = []
    current: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_tables_keep_their_columns() -> None:
    tables = _tables(render_markdown(audit_run()))
    assert len(tables) == 2  # files, globals
    for rows in tables:
        assert len(rows) > 2
        assert all(_unescaped_pipes(r) == _unescaped_pipes(rows[0]) for r in rows), rows
    assert any("a\\|b" in r for r in tables[0])


def test_no_live_links_html_or_mentions() -> None:
    text = render_markdown(audit_run(), verbose=True)
    assert "[click](https" not in text
    # code blocks show text verbatim (a browser never parses them as HTML); look outside them
    prose = re.sub(r"^(`{3,})python$.*?^\1$", "", text, flags=re.M | re.S)
    assert (
        "onerror=alert(1)> </pre>" in text
        and "<img" not in prose
        and "&lt;img src=x onerror=alert\\(1\\)&gt;" in text
    )
    assert "\x1b" not in text
    assert md("@team #12 *x*") == "\\@team \\#12 \\*x\\*"


def test_explanation_fence_outlasts_backticks_inside() -> None:
    text = render_markdown(scan_run())
    fences = re.findall(r"^(`{3,})python$", text, flags=re.M)
    assert fences and len(fences[0]) > 3  # the explanation holds ``` so the fence must be longer
    body = text.split(fences[0] + "python\n", 1)[1]
    assert fences[0] + "\n" in body  # closed by a fence of the same length


def test_summary_and_sections() -> None:
    text = render_markdown(audit_run())
    assert text.startswith("## safeload audit: 1 unsafe, 1 unscannable, 3 safe")
    for heading in (
        "### Files",
        "### Findings",
        "### Globals inventory",
        "### Which files block which policy",
    ):
        assert heading in text
    assert "waived: reviewed by the model team" in text
    assert "| Global | Files | default | strict |" in text  # one column per checked policy
    assert "| collections\\.OrderedDict | 2 | allowed | allowed |" in text
    assert "| Global | Files | default |" in render_markdown(scan_run())
    assert "5 paths, 4 distinct files" in text
    assert md(PIPE_LINK).count("\\|") == 1
