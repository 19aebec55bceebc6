"""write_atomic: the whole file or the old one, never through a link, with the usual permissions.
write_if_changed: the same, or nothing at all when the file already holds those bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safeload.atomic import write_atomic, write_if_changed


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


def test_a_file_that_holds_the_bytes_already_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    assert write_if_changed(target, "same ✓") is True  # absent: written
    before = target.stat()
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns - 10**9))
    before = target.stat()
    assert write_if_changed(target, "same ✓") is False
    assert write_if_changed(str(target), "same ✓".encode()) is False
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert os.listdir(tmp_path) == ["report.json"]


@pytest.mark.parametrize("old", ["same-size", "longer text", "short", ""])
def test_other_bytes_are_replaced_whole(tmp_path: Path, old: str) -> None:
    target = tmp_path / "report.json"
    target.write_text(old)
    inode = target.stat().st_ino
    assert write_if_changed(target, "SAME-SIZE") is True
    assert target.read_text() == "SAME-SIZE"
    assert target.stat().st_ino != inode  # a new file renamed into place, as write_atomic does


@pytest.mark.parametrize("where", [0, (1 << 20) - 1, 1 << 20, (5 << 20) // 2, (3 << 20) - 1])
def test_files_of_several_pieces_are_compared_to_the_last_byte(tmp_path: Path, where: int) -> None:
    """The existing file is read a piece (1 MiB) at a time: a difference in any piece, at either
    edge of one, or in the last byte is found; a file holding every byte is left alone."""
    payload = bytes(range(256)) * ((3 << 20) // 256)
    target = tmp_path / "report.json"
    target.write_bytes(payload)
    inode = target.stat().st_ino
    assert write_if_changed(target, payload) is False and target.stat().st_ino == inode
    changed = bytearray(payload)
    changed[where] ^= 0xFF
    target.write_bytes(changed)
    assert write_if_changed(target, payload) is True
    assert target.read_bytes() == payload


def test_a_link_to_the_same_bytes_is_still_replaced(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("{}")
    target = tmp_path / "report.json"
    target.symlink_to(victim)
    assert write_if_changed(target, "{}") is True
    assert not target.is_symlink() and target.read_text() == "{}"
    assert victim.read_text() == "{}"


def test_a_fifo_at_the_target_is_replaced_without_waiting_for_a_writer(tmp_path: Path) -> None:
    import threading

    target = tmp_path / "report.json"
    os.mkfifo(target)
    done: list[bool] = []
    writer = threading.Thread(target=lambda: done.append(write_if_changed(target, "{}")), daemon=True)
    writer.start()
    writer.join(30)
    assert done == [True]
    assert target.is_file() and target.read_text() == "{}"
