"""The code fingerprint results are cached under: a changed file changes it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import safeload
from safeload import build_id


def _package(tmp_path: Path) -> Path:
    root = tmp_path / "pkg"
    (root / "formats").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / "rules").mkdir()
    for name in ("__init__.py", "formats/gzip.py", "__pycache__/x.pyc", "rules/default.toml"):
        (root / name).write_text("one")
    return root


def test_an_edited_file_changes_the_fingerprint(tmp_path: Path) -> None:
    root = _package(tmp_path)
    before = build_id.code_fingerprint(str(root))
    assert before == build_id.code_fingerprint(str(root))  # stable while nothing changes
    (root / "formats" / "gzip.py").write_text("two")  # same size, a new mtime
    st = os.stat(root / "formats" / "gzip.py")
    os.utime(root / "formats" / "gzip.py", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = build_id.code_fingerprint(str(root))
    assert after != before
    (root / "formats" / "new.py").write_text("")
    assert build_id.code_fingerprint(str(root)) not in (before, after)


def test_bytecode_and_rules_do_not_count(tmp_path: Path) -> None:
    root = _package(tmp_path)
    before = build_id.code_fingerprint(str(root))
    (root / "__pycache__" / "x.pyc").write_text("recompiled, longer")
    (root / "rules" / "default.toml").write_text("rules are digested by content elsewhere")
    assert build_id.code_fingerprint(str(root)) == before


def test_the_installed_package_has_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_id.scanner_id().startswith(f"{safeload.__version__}+")
    here = build_id.install_fingerprint()
    assert len(here) == 16
    assert build_id.code_fingerprint(str(tmp_path / "missing")) == ""
    # Another Python replays streams through another unpickler: another fingerprint.
    # (taken once per process: monkeypatch puts the one taken back afterwards)
    monkeypatch.setattr(build_id, "_fingerprint", None)
    monkeypatch.setattr(build_id.sys, "version_info", (3, 99, 0))
    assert build_id.install_fingerprint() != here
