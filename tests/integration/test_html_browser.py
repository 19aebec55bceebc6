"""The HTML report in a real headless Chromium: what a person reads, and hostile names stay text.

Chromium comes from Debian's `chromium` package (scripts/ensure_chromium.sh installs it). Without
it the test fails in CI (CI=true) and is skipped only on a developer machine.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from safeload.cli import main
from safeload.report.html import render_html
from tests.pickle_builder import call, glob, marker_code, unicode, wrap
from tests.unit.report.sample import HOSTILE, HOSTILE_GLOBAL, audit_run

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# Chromium's own background services still call home in headless mode; only the page's requests matter.
_BROWSER_HOSTS = re.compile(r"^https?://([a-z0-9-]+\.)*(google\.com|googleapis\.com|gstatic\.com)(/|:|$)")


def _chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: run scripts/ensure_chromium.sh")
    pytest.skip("chromium is not installed (scripts/ensure_chromium.sh); CI fails instead of skipping")


def _browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run(
        [_chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )


_BLOCKS = set("p div h1 h2 h3 h4 td th tr li dt dd pre section header br".split())


class _Dom(HTMLParser):
    """Elements and the text a reader sees (style contents left out; blocks separated as on screen)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[str] = []
        self.text: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(k for k, _ in attrs)
        self._skip += tag in ("style", "title")
        if tag in _BLOCKS:
            self.text.append(" ")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "title") and self._skip > 0
        if tag in _BLOCKS:
            self.text.append(" ")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)


def _dom(page: Path, tmp_path: Path) -> tuple[_Dom, str]:
    dumped = _browse(page, tmp_path, "--dump-dom").stdout
    assert "</html>" in dumped, dumped[-500:]
    dom = _Dom()
    dom.feed(dumped)
    return dom, re.sub(r"\s+", " ", "".join(dom.text))


def _png_pixels_vary(png: Path) -> bool:
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    idat = b""
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    return len(set(raw[1000:200000])) > 8  # more than a blank page's handful of byte values


def test_audit_page_reads_right_in_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(audit_run()), encoding="utf-8")
    dom, text = _dom(page, tmp_path)
    assert "img" not in dom.tags and "script" not in dom.tags
    assert not [a for a in dom.attrs if a.startswith("on")]
    for expected in (
        "safeload audit report",
        "Summary",
        "5 files reported",
        "1 unsafe",
        "1 unscannable",
        "models/evil.pt",
        "CRITICAL SL100 floor-global",
        "very likely malicious",
        f"global {HOSTILE_GLOBAL}, used as called",
        "Remedy: if you trust this file's source",
        "Waived: reviewed by the model team",
        "What loading member archive/data.pkl would do",
        "Globals inventory",
        "Which files block which policy",
        "default: 1 file(s) would be refused",
        "models/evil\\x1b[31mred\\x0anext.bin",
    ):
        assert expected in text, expected

    shot = tmp_path / "shot.png"
    netlog = tmp_path / "net.json"
    _browse(page, tmp_path, "--window-size=1280,1800", f"--screenshot={shot}", f"--log-net-log={netlog}")
    assert _png_pixels_vary(shot)
    urls = set(re.findall(r'"url":"([^"]+)"', netlog.read_text(encoding="utf-8", errors="replace")))
    fetched = {
        u for u in urls if not u.startswith(("file:", "data:", "chrome:")) and not _BROWSER_HOSTS.match(u)
    }
    assert fetched == set(), fetched


def test_real_scan_of_a_hostile_name_shows_it_as_text(tmp_path: Path, marker: Path) -> None:
    evil = tmp_path / "evil.pkl"
    # The module name is markup; the call would write the marker if anything ran it.
    evil.write_bytes(wrap(call(glob(HOSTILE, "run"), unicode(marker_code(marker))), 2))
    page = tmp_path / "scan.html"
    assert main(["scan", str(evil), "--format", "html", "-o", str(page)]) == 1
    dom, text = _dom(page, tmp_path)
    assert "img" not in dom.tags
    assert HOSTILE_GLOBAL in text
    assert "UNSAFE" in text and "1 unsafe" in text and "SL101 disallowed-global" in text
    assert not marker.exists()
