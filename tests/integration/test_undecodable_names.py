"""Names that are not UTF-8: a file name on a Linux file system, a member name in a tar. Python
carries their bytes as surrogates, which JSON cannot hold; the JSON report, the audit's worker
results and its cache write them as \\xNN instead of ending in a traceback (exit 1, which would
read as "unsafe")."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.pickle_builder import system_payload

NAME = b"m\xe9\x80.pkl"  # Latin-1 bytes, no UTF-8


@pytest.fixture
def tree(tmp_path: Path, marker: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    try:
        with open(os.path.join(os.fsencode(root), NAME), "wb") as f:
            f.write(pickle.dumps({"step": 1}, protocol=4))
    except (OSError, UnicodeError):
        pytest.skip("this file system takes no file name that is not UTF-8")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        payload = system_payload(marker)
        info = tarfile.TarInfo(os.fsdecode(b"ev\xffil.pkl"))
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    (root / "bundle.tar").write_bytes(buf.getvalue())
    return root


def _safeload(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "safeload", *args],
        capture_output=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        check=False,
    )


def test_scan_writes_json_for_names_that_are_not_utf8(tree: Path, tmp_path: Path, marker: Path) -> None:
    done = _safeload("scan", str(tree), "--format", "json", cwd=tmp_path)
    assert done.returncode == 1 and b"Traceback" not in done.stderr, done.stderr[-600:]
    reports = {r["path"].rsplit("/", 1)[-1]: r for r in json.loads(done.stdout)["reports"]}
    assert reports["m\\xe9\\x80.pkl"]["verdict"] == "SAFE"
    flagged = [f for f in reports["bundle.tar"]["findings"] if f["global_name"] == "os.system"]
    assert flagged and flagged[0]["member"] == "ev\\xffil.pkl"
    assert not marker.exists()


def test_an_audit_with_workers_and_a_cache_carries_them_too(tree: Path, tmp_path: Path, marker: Path) -> None:
    out = tmp_path / "audit.json"
    args = (
        "audit",
        str(tree),
        "--jobs",
        "2",
        "--cache",
        str(tmp_path / "cache"),
        "-o",
        str(out),
        "--no-progress",
    )
    first = _safeload(*args, "--format", "json", cwd=tmp_path)
    assert first.returncode == 1 and b"Traceback" not in first.stderr, first.stderr[-600:]
    report = out.read_bytes()
    paths = sorted(r["path"].rsplit("/", 1)[-1] for r in json.loads(report)["reports"])
    assert paths == ["bundle.tar", "m\\xe9\\x80.pkl"]
    again = _safeload(*args, "--format", "json", cwd=tmp_path)  # replayed from the cache
    assert again.returncode == 1 and out.read_bytes() == report
    for fmt in ("sarif", "html", "markdown", "text"):
        other = _safeload(*args, "--format", fmt, cwd=tmp_path)
        assert other.returncode == 1 and b"Traceback" not in other.stderr, (fmt, other.stderr[-600:])
    assert not marker.exists()


def test_text_output_names_the_bytes_as_json_does(tree: Path, tmp_path: Path, marker: Path) -> None:
    """The same \\xNN in every report: a person comparing the text output with the JSON (or
    looking for the file) sees the byte, not the surrogate Python carries it in."""
    done = _safeload("scan", str(tree), cwd=tmp_path)
    assert done.returncode == 1 and b"Traceback" not in done.stderr, done.stderr[-600:]
    text = done.stdout.decode()
    assert "m\\xe9\\x80.pkl" in text and "ev\\xffil.pkl" in text
    assert "\\udc" not in text
    assert not marker.exists()
