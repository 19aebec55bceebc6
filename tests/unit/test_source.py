"""Reading the input once: Source.peek reads a mapped file's bytes without mapping their pages."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from safeload import source as source_module
from safeload.source import from_bytes, open_source


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_peek_reads_what_the_mapping_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(251)) * 4096  # ~1 MiB: a middle far from both ends
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    preads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, size: int, offset: int) -> bytes:
        preads.append(offset)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(source_module.os, "pread", counting_pread)
    source = open_source(path, use_mmap=True, max_bytes=1 << 21)
    assert source.mapped
    n = len(data)
    middle = [(n // 2, 8), (300_000, 30), (n - 70_000, 100), (n // 3, 0)]
    ends = [(0, 8), (100, 30), (n - 5, 8), (n, 4), (n + 10, 4), (7, 0)]
    for offset, size in middle + ends:
        assert (
            bytes(source.peek(offset, size))
            == data[offset : offset + size]
            == bytes(source.buffer[offset : offset + size])
        )
    # The middle is read with pread; either end, which a scan maps anyway, from the mapping.
    assert preads == [offset for offset, _ in middle]


def test_peek_on_bytes_and_small_reads_slices_the_buffer(tmp_path: Path) -> None:
    data = b"0123456789"
    assert bytes(from_bytes(data, "x").peek(3, 4)) == b"3456"
    path = tmp_path / "small.bin"
    path.write_bytes(data)
    small = open_source(path, use_mmap=True, max_bytes=100, read_below=1 << 20)
    assert not small.mapped
    assert bytes(small.peek(8, 10)) == b"89"


def test_mapped_source_closes_its_file_when_dropped(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10000)
    before = _open_fds()
    source = open_source(path, use_mmap=True, max_bytes=1 << 20)
    assert _open_fds() - before  # the mapping's own descriptor, and the one peek reads through
    del source
    gc.collect()
    assert _open_fds() - before == set()


def _in_thread(fn):  # type: ignore[no-untyped-def]
    """fn() in a thread given 30 s: a call that would block forever fails the test instead."""
    import threading

    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # noqa: BLE001 - handed to the test to assert on
            out.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(30)
    assert out, "the call blocked"
    return out[0]


def test_regular_only_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    from safeload.errors import ScanError

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    before = _open_fds()
    error = _in_thread(lambda: open_source(fifo, use_mmap=True, max_bytes=1 << 20, regular_only=True))
    assert isinstance(error, ScanError) and "not a regular file" in str(error)
    assert _open_fds() == before  # the descriptor was closed
    regular = tmp_path / "ok.pkl"
    regular.write_bytes(b"\x80\x04K\x01.")
    assert bytes(open_source(regular, use_mmap=True, max_bytes=1 << 20, regular_only=True).buffer) == (
        b"\x80\x04K\x01."
    )


def test_a_directory_scan_never_waits_on_a_fifo(tmp_path: Path) -> None:
    """A FIFO swapped in for a listed file (os.path.isfile saw the file): reported, never waited on."""
    import safeload

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    report = _in_thread(lambda: safeload.scan(fifo, regular_only=True))
    assert report.verdict.value == "UNSCANNABLE"  # type: ignore[attr-defined]
    assert "not a regular file" in report.findings[0].message  # type: ignore[attr-defined]
