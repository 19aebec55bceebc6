"""A scan of a large mapped pickle keeps only a window of the file mapped.

The walk and the replay hop from opcode to opcode over large payloads. Each page they touch is
mapped, and kernels that map a page cache folio whole map up to 2 MiB around it: without letting
go of what they have read past, a scan's resident memory grew with the file (127 MB for 200
payloads of 1 MB on this project's VMs).
"""

from __future__ import annotations

import gzip
import mmap
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import safeload
from safeload.analysis.readers import Payloads, WholeBuffer
from safeload.analysis.replay import replay_imports
from safeload.analysis.walk_args import RELEASE_EVERY
from safeload.analysis.walker import walk
from safeload.model import Verdict
from safeload.source import Source

_MB = 1 << 20


def _payloads_pickle(path: Path, count: int) -> bytes:
    chunk = bytes(range(256)) * (_MB // 256)
    data = pickle.dumps({f"blob{i}": chunk + i.to_bytes(4, "little") for i in range(count)}, protocol=4)
    path.write_bytes(data)
    return data


def _spans_cover(calls: list[tuple[int, int]], upto: int) -> bool:
    """Consecutive, each at least RELEASE_EVERY long, from 0 to at least ``upto``."""
    pos = 0
    for start, end in calls:
        if start != pos or end - start < RELEASE_EVERY:
            return False
        pos = end
    return pos >= upto


def test_walk_and_replay_release_what_they_read_past_and_read_the_same(tmp_path: Path) -> None:
    path = tmp_path / "big.pkl"
    data = _payloads_pickle(path, 3 * RELEASE_EVERY // _MB + 2)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    view = memoryview(mapped)
    source = Source(buffer=view, path=str(path), size=len(view), mapped=True, _holders=[mapped])
    calls: list[tuple[int, int]] = []

    def release(start: int, end: int) -> None:
        calls.append((start, end))
        source.release(start, end)  # really drops the pages: the walk must not need them again

    released = walk(view, multi=True, fold_values=False, release=release)
    assert _spans_cover(calls, len(data) - RELEASE_EVERY - 2 * _MB)
    assert released == walk(data, multi=True, fold_values=False)  # as the bytes read, in one piece

    calls.clear()
    replay = replay_imports(view, multi=True, walk=released, release=release)
    assert _spans_cover(calls, len(data) - RELEASE_EVERY - 2 * _MB)
    assert replay.replays[0].error is None and replay.replays[0].pickles == 1
    assert replay == replay_imports(data, multi=True, walk=released)


def test_bytes_in_memory_are_never_released() -> None:
    data = pickle.dumps([b"x" * (RELEASE_EVERY + _MB)] * 2, protocol=4)
    calls: list[tuple[int, int]] = []
    walk(data, release=lambda a, b: calls.append((a, b)))
    assert calls == []
    reader = WholeBuffer(memoryview(data), Payloads([]), None)
    assert reader.readinto(bytearray(RELEASE_EVERY + 1)) == RELEASE_EVERY + 1


_HWM = """
import pickle, sys
import safeload

def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) >> 10

safeload.scan(sys.argv[2])  # imports, policy, caches: what any scan has
before = hwm_mb()
report = safeload.scan(sys.argv[1])
print(report.verdict.value, hwm_mb() - before)
"""


def _peak_growth_mb(target: Path, tmp_path: Path) -> int:
    """How much a fresh process's peak RSS grows while it scans ``target`` (after a first scan
    of a small file); the scan must find it SAFE."""
    small = tmp_path / "small.pkl"
    small.write_bytes(pickle.dumps({"a": b"x" * (2 * _MB)}, protocol=4))
    done = subprocess.run(
        [sys.executable, "-c", _HWM, str(target), str(small)], capture_output=True, text=True, check=True
    )
    verdict, grew = done.stdout.split()
    assert verdict == Verdict.SAFE.value, done.stdout
    return int(grew)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_scan_of_a_large_pickle_stays_within_a_window_of_memory(tmp_path: Path) -> None:
    big = tmp_path / "big.pkl"
    _payloads_pickle(big, 160)
    # The walk's and the replay's windows, a few folios each side: far under the file's 160 MB.
    assert _peak_growth_mb(big, tmp_path) < 3 * RELEASE_EVERY // _MB
    assert safeload.scan(big).verdict is Verdict.SAFE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_scan_of_a_large_compressed_pickle_stays_within_a_window_of_memory(tmp_path: Path) -> None:
    """The decompressed pickle goes to a temporary file past SPILL_AT and is mapped: the scan lets
    go of that mapping's pages as it does of a file's."""
    big = tmp_path / "big.pkl.gz"
    big.write_bytes(gzip.compress(_payloads_pickle(tmp_path / "big.pkl", 160), compresslevel=1))
    # SPILL_AT in memory while decompressing, then the two windows: far under the 160 MB.
    assert _peak_growth_mb(big, tmp_path) < 4 * RELEASE_EVERY // _MB
