"""write_atomic: the whole file or the old one, never through a link, with the usual permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safeload.atomic import write_atomic


def test_text_and_bytes_replace_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text("old")
    write_atomic(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    write_atomic(str(target), b"\x00raw")
    assert target.read_bytes() == b"\x00raw"
    assert os.listdir(tmp_path) == ["report.html"]  # no temporary file left beside it


def test_a_failed_rename_keeps_the_old_file_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_text("keep")
    with pytest.raises(OSError):
        write_atomic(target, "text")
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    assert (target / "inside").read_text() == "keep"


def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "report.json"
    target.symlink_to(victim)
    write_atomic(target, "{}")
    assert victim.read_text() == "precious"
    assert not target.is_symlink() and target.read_text() == "{}"


def test_permissions_follow_the_umask_or_the_mode_given(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "shared.json", "{}")
        write_atomic(tmp_path / "private", b"x", mode=0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600


def test_a_name_already_taken_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "r.txt"
    (tmp_path / ".r.txt.000000000000.tmp").symlink_to(tmp_path / "elsewhere")
    draws = iter([bytes(6), bytes([1] * 6)])
    monkeypatch.setattr(os, "urandom", lambda n: next(draws))
    write_atomic(target, "ok")
    assert target.read_text() == "ok"
    assert not (tmp_path / "elsewhere").exists()  # the planted link was not followed
