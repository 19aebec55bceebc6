"""Reading the input once: Source.peek reads a mapped file's bytes without mapping their pages."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from safeload.source import from_bytes, open_source


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_peek_reads_what_the_mapping_holds(tmp_path: Path) -> None:
    data = bytes(range(256)) * 64
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    source = open_source(path, use_mmap=True, max_bytes=1 << 20)
    assert source.mapped
    for offset, size in [(0, 8), (100, 30), (len(data) - 5, 8), (len(data), 4), (len(data) + 10, 4), (7, 0)]:
        assert bytes(source.peek(offset, size)) == data[offset : offset + size] == bytes(
            source.buffer[offset : offset + size]
        )


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
