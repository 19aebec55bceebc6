"""HTML report: self-contained, every string from a file escaped, all sections present.

The page as a browser shows it is checked in tests/integration/test_html_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser

from safeload.report.html import render_html
from tests.unit.report.sample import HOSTILE_GLOBAL, audit_run, scan_run


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []
        self.style: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend((tag, k, v) for k, v in attrs)
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        (self.style if self._in_style else self.text).append(data)


def _parse(page: str) -> _Collect:
    parser = _Collect()
    parser.feed(page)
    parser.close()
    return parser


def test_hostile_strings_are_text_not_markup() -> None:
    page = render_html(audit_run(), verbose=True)
    parsed = _parse(page)
    assert "img" not in parsed.tags
    assert not any(k.startswith("on") for _, k, _ in parsed.attrs)
    text = "".join(parsed.text)
    assert HOSTILE_GLOBAL in text
    assert "</pre><b>x" in text  # from the decompiled explanation, shown as text
    assert "\x1b" not in page and "\\x1b[31mred\\x0anext" in text


def test_self_contained_and_locked_down() -> None:
    page = render_html(scan_run())
    parsed = _parse(page)
    assert not {"script", "link", "img", "iframe", "object", "embed", "base", "form"} & set(parsed.tags)
    for tag, key, value in parsed.attrs:
        if key in {"src", "href", "action", "srcset", "poster", "data"}:
            assert value is not None and value.startswith("#"), (tag, key, value)
    assert "@import" not in "".join(parsed.style) and "url(" not in "".join(parsed.style)
    csp = next(v for t, k, v in parsed.attrs if t == "meta" and k == "content" and v and "default-src" in v)
    style = "".join(parsed.style)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp


def test_sections_a_reader_needs() -> None:
    page = render_html(audit_run())
    text = re.sub(r"\s+", " ", "".join(_parse(page).text))
    for expected in (
        "Summary",
        "Files",
        "Findings",
        "Globals inventory",
        "Which files block which policy",
        "Remedy: if you trust this file's source",
        "very likely malicious",
        "Waived: reviewed by the model team",
        "decompiled with fickling",
        "from builtins import exec",
        "only what is new is shown",
        "1 known finding(s)",
    ):
        assert expected in text, expected
    ids = re.findall(r'id="(f\d+)"', page)
    links = re.findall(r'href="#(f\d+)"', page)
    assert links and set(links) <= set(ids)


def test_safe_files_have_no_detail_unless_verbose_or_waived() -> None:
    page = render_html(scan_run())
    assert page.count('<article class="file SAFE"') == 1  # SAFE through a waiver: the waiver is shown
    assert "models/good.pt</h3>" not in page
    assert render_html(scan_run(), verbose=True).count('<article class="file SAFE"') == 2
