""".npy files np.save wrote to more than once: np.load reads the first array, and each further
np.load on the same handle the next (numpy's own documented use). With allow_pickle, np.load
unpickles whatever follows that is no array. Every array and pickle in such a file is scanned;
safeload.load returns the first array, as one np.load does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import safeload
from safeload.model import Verdict
from tests.pickle_builder import exec_payload

ARRAYS = {
    "plain": [np.arange(5.0), np.arange(3, dtype=np.int32).reshape(3, 1), np.zeros((2, 2), dtype=">f4")],
    "object-first": [np.array([1, "x", None], dtype=object), np.arange(4.0)],
    "object-last": [np.arange(4.0), np.array([{"k": 1}, (2, 3)], dtype=object)],
}


def _save_all(path: Path, arrays: list[np.ndarray]) -> None:
    with open(path, "wb") as f:
        for a in arrays:
            np.save(f, a, allow_pickle=True)


@pytest.mark.parametrize("case", sorted(ARRAYS))
def test_arrays_saved_one_after_another_are_read_as_numpy_reads_them(case: str, tmp_path: Path) -> None:
    path = tmp_path / "seq.npy"
    _save_all(path, ARRAYS[case])
    report = safeload.scan(path)
    assert report.verdict is Verdict.SAFE, report.findings
    assert [f.code for f in report.findings if f.code != "SL400"] == ["SL202"]  # SL400: no pickle at all
    first = safeload.load(path)
    with open(path, "rb") as f:
        expected = [np.load(f, allow_pickle=True) for _ in ARRAYS[case]]
    assert np.array_equal(np.asarray(first, dtype=object), np.asarray(expected[0], dtype=object))
    assert first.dtype == expected[0].dtype and first.shape == expected[0].shape


def _np_load_all(path: Path, workdir: Path) -> subprocess.CompletedProcess[bytes]:
    """np.load on one handle until the file ends, as a reader of a multi-array file does."""
    code = (
        "import numpy as np, sys\n"
        "f = open(sys.argv[1], 'rb')\n"
        "while f.peek(1):\n"
        "    np.load(f, allow_pickle=True)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=workdir, capture_output=True, check=False
    )


@pytest.mark.parametrize("where", ["pickle-after", "object-array-after"])
def test_a_payload_after_the_first_array_is_found_and_named(where: str, tmp_path: Path, marker: Path) -> None:
    def build(path: Path, m: Path) -> None:
        _save_all(path, [np.arange(5.0)])
        with open(path, "ab") as f:
            if where == "pickle-after":
                f.write(exec_payload(m, protocol=2))  # np.load unpickles what is no array
            else:
                header = path.read_bytes()[:128].replace(b"'<f8'", b"'|O' ").replace(b"(5,)", b"(1,)")
                f.write(header + exec_payload(m, protocol=2))

    live = tmp_path / "live"
    live.mkdir()
    ran = live / "RAN"
    build(live / "seq.npy", ran)
    proc = _np_load_all(live / "seq.npy", live)
    assert ran.exists(), proc.stderr.decode()

    path = tmp_path / "seq.npy"
    build(path, marker)
    with open(path, "rb") as f:  # the first array alone is harmless: one np.load runs nothing
        assert np.array_equal(np.load(f), np.arange(5.0))
    report = safeload.scan(path)
    assert report.verdict is Verdict.UNSAFE
    assert "builtins.exec" in report.globals
    assert any(f.code == "SL100" and f.member for f in report.findings)  # named where it sits
    with pytest.raises(safeload.errors.UnsafeModelError):
        safeload.load(path)
    assert not marker.exists()


def test_bytes_after_the_array_that_no_np_load_reads_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "junk.npy"
    _save_all(path, [np.arange(5.0)])
    with open(path, "ab") as f:
        f.write(bytes(10))
    report = safeload.scan(path)
    assert [f.code for f in report.findings if f.code != "SL400"] == ["SL201"]
    assert report.verdict is Verdict.UNSCANNABLE


def test_an_array_too_short_for_its_header_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.npy"
    _save_all(path, [np.arange(5.0)])
    path.write_bytes(path.read_bytes()[:-3])
    report = safeload.scan(path)
    assert [f.code for f in report.findings] == ["SL205"]


def test_npz_members_with_bytes_after_their_array_are_still_refused(tmp_path: Path) -> None:
    """An npz member is read by one np.load: nothing reads on after its array."""
    import zipfile

    path = tmp_path / "a.npz"
    np.savez(path, a=np.arange(5.0))
    with zipfile.ZipFile(path) as z:
        member = z.read("a.npy")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.npy", member + member)
    report = safeload.scan(path)
    assert "SL205" in {f.code for f in report.findings}
