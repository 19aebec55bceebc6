"""numpy's .npy/.npz and joblib files through safeload.load: arrays from the bytes, objects by policy."""

from __future__ import annotations

import argparse
import mmap
import pickle
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest

import safeload
from safeload.errors import DisallowedGlobalError
from tests.pickle_builder import marker_code

WRAPPER = "joblib.numpy_pickle.NumpyArrayWrapper"


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((4, 5))),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "bool": rng.standard_normal(7) > 0,
        "complex": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 3)),
        "structured": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
    }


def assert_arrays_equal(ref: np.ndarray, out: np.ndarray) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("name", list(arrays()))
def test_npy(tmp_path: Path, name: str) -> None:
    path = tmp_path / "a.npy"
    np.save(path, arrays()[name])
    ref = np.load(path)
    out = safeload.load(path)
    assert_arrays_equal(ref, out)
    assert out.flags.f_contiguous == ref.flags.f_contiguous
    assert out.flags.writeable  # like np.load's


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_npz(tmp_path: Path, compressed: bool) -> None:
    path = tmp_path / "a.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays())
    out = safeload.load(path)
    with np.load(path) as ref:
        assert sorted(out) == sorted(ref.files)
        for key in ref.files:
            assert_arrays_equal(ref[key], out[key])


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_npz_members_in_every_method_zipfile_reads(tmp_path: Path, compression: int) -> None:
    # np.savez never writes these, but numpy.load reads them (through zipfile): so does safeload.
    path = tmp_path / "a.npz"
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for key, value in arrays().items():
            with zf.open(f"{key}.npy", "w") as member:
                np.lib.format.write_array(member, value)
    assert safeload.scan(path).verdict is safeload.Verdict.SAFE
    out = safeload.load(path)
    with np.load(path) as ref:
        assert sorted(out) == sorted(ref.files)
        for key in ref.files:
            assert_arrays_equal(ref[key], out[key])


def test_object_arrays_go_through_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "obj.npy"
    value = np.array([1, "two", None, {"k": [1.5]}, argparse.Namespace(a=1)], dtype=object)
    np.save(path, value, allow_pickle=True)
    out = safeload.load(path)
    assert out.dtype == object and list(out[:4]) == [1, "two", None, {"k": [1.5]}] and out[4].a == 1
    with pytest.raises(DisallowedGlobalError):
        safeload.load(path, policy="strict")  # numpy's reconstruct functions are not in strict


def test_mmap_npy_shares_the_mapping(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.arange(1 << 16, dtype=np.float64))
    out = safeload.load(path, mmap=True)
    assert np.array_equal(out, np.arange(1 << 16, dtype=np.float64))
    # A view of the file mapping itself, not a copy of it.
    assert isinstance(_owner(out), mmap.mmap)
    assert not isinstance(_owner(safeload.load(path)), mmap.mmap)


def _owner(array: np.ndarray) -> object:
    base = array.base
    return base.obj if isinstance(base, memoryview) else base


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)], ids=str)
def test_joblib(tmp_path: Path, compress: object) -> None:
    path = tmp_path / "model.joblib"
    value = {
        "arrays": arrays(),
        "list": [np.arange(3), np.ones((2, 2), dtype=np.float16)],
        "object_array": np.array([1, "a"], dtype=object),
        "n": 3,
        "ns": argparse.Namespace(lr=0.1),
    }
    joblib.dump(value, path, compress=compress)
    with pytest.raises(DisallowedGlobalError) as info:
        safeload.load(path, policy="strict", allow=["argparse.Namespace"])  # strict has no joblib/numpy names
    assert info.value.global_name == WRAPPER
    out = safeload.load(path)
    ref = joblib.load(path)
    for key in ref["arrays"]:
        assert_arrays_equal(ref["arrays"][key], out["arrays"][key])
    assert_arrays_equal(ref["list"][1], out["list"][1])
    assert list(out["object_array"]) == [1, "a"]
    assert out["n"] == 3 and out["ns"] == ref["ns"]


class _Payload:
    """joblib.dump pickles it as a call of exec (nothing runs when it is pickled)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (self.code,)


def _vocabulary() -> dict[str, int]:
    # More pickle than joblib_fmt.SNIFF_WINDOW before the first array, as a large text vocabulary
    # (CountVectorizer.vocabulary_) puts there.
    from safeload.formats.joblib_fmt import SNIFF_WINDOW

    words = {f"token{i:07d}": i for i in range(SNIFF_WINDOW // 12)}
    assert len(pickle.dumps(words)) > SNIFF_WINDOW
    return words


def test_joblib_whose_first_array_comes_late(tmp_path: Path) -> None:
    path = tmp_path / "vectorizer.joblib"
    joblib.dump({"vocabulary": _vocabulary(), "idf": np.linspace(0, 1, 50), "n": 3}, path)
    report = safeload.scan(path)
    assert report.verdict is safeload.Verdict.SAFE and "joblib" in report.formats
    out, ref = safeload.load(path), joblib.load(path)
    assert out["vocabulary"] == ref["vocabulary"] and out["n"] == 3
    assert_arrays_equal(ref["idf"], out["idf"])


def test_payload_after_a_late_first_array_is_caught(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "vectorizer.joblib"
    joblib.dump({"vocabulary": _vocabulary(), "idf": np.ones(4), "x": _Payload(marker_code(marker))}, path)
    report = safeload.scan(path)
    assert report.verdict is safeload.Verdict.UNSAFE
    assert "builtins.exec" in {f.global_name for f in report.findings}
    with pytest.raises(safeload.errors.UnsafeModelError):
        safeload.load(path)
    assert not marker.exists()
