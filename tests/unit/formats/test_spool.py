"""Decompressed output spills to an unlinked temporary file, and consumed compressed input lets go
of its pages: a scan's memory does not grow with a compressed file."""

from __future__ import annotations

import gzip
import mmap
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import pytest

import safeload
from safeload.errors import UnsafeModelError
from safeload.formats import compressed, spool, zipread
from safeload.formats.spool import Spool, SpoolError
from safeload.model import Verdict
from safeload.source import Source, open_source
from tests.pickle_builder import exec_payload
from tests.unit.formats._samples import codes, make_ctx


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def test_small_output_stays_in_memory_and_large_output_is_a_private_mapping() -> None:
    small = Spool(spill_at=100)
    small.write(b"x" * 60)
    small.write(b"y" * 40)
    assert not small.spilled and len(small) == 100
    assert bytes(small.view()) == b"x" * 60 + b"y" * 40

    large = Spool(spill_at=100)
    chunks = [os.urandom(64) for _ in range(5)]
    for chunk in chunks:
        large.write(chunk)
    assert large.spilled and len(large) == 320
    view = large.view()
    assert isinstance(view.obj, mmap.mmap)
    assert bytes(view) == b"".join(chunks)
    # copy-on-write: writing through the view never reaches the (unnamed) file
    view[0] = view[0] ^ 0xFF
    assert bytes(view[1:]) == b"".join(chunks)[1:]


def test_a_spool_that_cannot_spill_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_space)
    s = Spool(spill_at=10)
    s.write(b"12345")
    with pytest.raises(SpoolError, match="No space left"):
        s.write(b"1234567890")


def test_spilled_output_reads_as_the_same_child(monkeypatch: pytest.MonkeyPatch) -> None:
    data = pickle.dumps([os.urandom(1000) for _ in range(50)], protocol=4)
    monkeypatch.setattr(spool, "SPILL_AT", 4096)
    result = compressed.read(memoryview(gzip.compress(data)), make_ctx())
    (child,) = result.children
    assert isinstance(child.data.obj, mmap.mmap)
    assert bytes(child.data) == data and codes(result) == []


def test_no_space_for_the_spill_fails_closed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool, "SPILL_AT", 4096)
    monkeypatch.setattr(tempfile, "TemporaryFile", no_space)
    path = tmp_path / "big.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps([os.urandom(1000) for _ in range(50)], protocol=4)))
    report = safeload.scan(path)
    assert report.verdict is Verdict.UNSCANNABLE
    assert any(f.code == "SL203" and "No space left" in f.message for f in report.findings)


def test_a_payload_past_the_spill_point_is_caught(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, marker: Path
) -> None:
    monkeypatch.setattr(spool, "SPILL_AT", 4096)
    benign = pickle.dumps([os.urandom(1000) for _ in range(50)], protocol=4)
    path = tmp_path / "two.pkl.gz"
    path.write_bytes(gzip.compress(benign + exec_payload(marker)))
    report = safeload.scan(path)
    assert report.verdict is Verdict.UNSAFE
    assert "builtins.exec" in report.globals
    with pytest.raises(UnsafeModelError):
        safeload.load(path)
    assert not marker.exists()


def test_spilled_checkpoint_loads_equal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(spool, "SPILL_AT", 4096)
    state = {"w": torch.randn(64, 64), "b": torch.arange(10)}
    raw = tmp_path / "m.pt"
    torch.save(state, raw, _use_new_zipfile_serialization=False)
    path = tmp_path / "m.pt.gz"
    path.write_bytes(gzip.compress(raw.read_bytes()))
    loaded = safeload.load(path)
    expected = torch.load(raw, weights_only=True)
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert torch.equal(loaded[key], expected[key]) and loaded[key].dtype == expected[key].dtype


def test_release_lets_go_of_mapped_pages_and_reads_stay_right(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    content = os.urandom(64 << 20)
    path.write_bytes(content)
    source = open_source(path, use_mmap=True, max_bytes=1 << 40)
    assert source.mapped
    step = 1 << 20
    total = sum(source.buffer[i] for i in range(0, source.size, 4096))  # touch every page
    touched = _rss_file_kib()
    source.release(0, source.size)
    released = _rss_file_kib()
    assert touched - released > 48 << 10  # most of the 64 MiB left this process's memory
    assert sum(source.buffer[i] for i in range(0, source.size, 4096)) == total
    assert bytes(source.buffer[step : 2 * step]) == content[step : 2 * step]
    # only whole pages inside the range go; an unmapped source ignores the call
    source.release(1, 4095)
    open_source(path, use_mmap=False, max_bytes=1 << 40).release(0, 10)


def test_a_compressed_file_is_scanned_without_keeping_its_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps([os.urandom(1 << 20) for _ in range(48)], protocol=4), 1))
    seen: list[tuple[int, int]] = []
    source = open_source(path, use_mmap=True, max_bytes=1 << 40)
    original = Source.release

    def record(self: Source, start: int, end: int) -> None:
        seen.append((start, end))
        original(self, start, end)

    monkeypatch.setattr(Source, "release", record)
    from safeload.api import analyse, resolve_policy

    report = analyse(source, resolve_policy("default")).report
    assert report.verdict is Verdict.SAFE
    # consumed input was let go of in steps, in order, up to near the end of the file
    assert seen and all(a < b for a, b in seen)
    assert all(seen[i][1] == seen[i + 1][0] for i in range(len(seen) - 1))
    assert seen[-1][1] > source.size - compressed.RELEASE_EVERY - compressed.IN_CHUNK


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_large_compressed_zip_members_spill_and_are_read_whole(
    method: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, marker: Path
) -> None:
    monkeypatch.setattr(spool, "SPILL_AT", 4096)
    benign = pickle.dumps([bytes(range(256)) * 40 for _ in range(20)], protocol=4)
    path = tmp_path / "bundle.zip"
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        zf.writestr("weights.pkl", benign)
        zf.writestr("evil.pkl", benign[:-1] + exec_payload(marker)[2:])
    report = safeload.scan(path)
    assert report.verdict is Verdict.UNSAFE
    assert "builtins.exec" in report.globals
    assert not [f for f in report.findings if f.code in ("SL203", "SL205", "SL300")]
    got = zipread.extract(
        memoryview(path.read_bytes()),
        next(e for e in zipread.entries(memoryview(path.read_bytes()), make_ctx()) if e.name == "weights.pkl"),
        make_ctx(),
    )
    assert isinstance(got.data, memoryview) and isinstance(got.data.obj, mmap.mmap)
    assert bytes(got.data) == benign and got.complete and got.findings == []
    assert not marker.exists()


def test_hashing_a_mapped_file_does_not_keep_it_in_memory(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "big.bin"
    content = os.urandom(96 << 20)
    path.write_bytes(content)
    source = open_source(path, use_mmap=True, max_bytes=1 << 40)
    before = _rss_file_kib()
    assert source.sha256() == hashlib.sha256(content).hexdigest()
    assert _rss_file_kib() - before < 32 << 10  # far below the 96 MiB it read
    assert bytes(source.buffer[-10:]) == content[-10:]  # and the bytes are still there
