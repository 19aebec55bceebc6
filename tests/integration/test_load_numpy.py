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
from safeload.errors import DisallowedGlobalError, LoadError
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
        assert list(out) == ref.files
        for key in ref.files:
            assert_arrays_equal(ref[key], out[key])


@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"]
)
def test_npz_members_that_are_no_npy_are_their_bytes(tmp_path: Path, compression: int) -> None:
    # numpy.load's NpzFile decides by each member's magic: an array for .npy bytes, the member's
    # bytes for anything else (b"" for a directory entry), in archive order.
    path = tmp_path / "a.npz"
    np.savez(path, first=np.arange(3))
    with zipfile.ZipFile(path, "a", compression=compression) as zf:
        zf.writestr("meta.json", b'{"epoch": 3}')
        zf.writestr("notes/", b"")
        zf.writestr("broken.npy", b"\x93RUMPY" + bytes(range(40)))  # not the magic: bytes, not an array
        with zf.open("last.npy", "w") as member:
            np.lib.format.write_array(member, np.ones((2, 2), dtype=">f4"))
    assert safeload.scan(path).verdict is safeload.Verdict.SAFE
    out = safeload.load(path)
    with np.load(path) as ref:
        assert list(out) == ref.files == ["first", "meta.json", "notes/", "broken", "last"]
        for key in ("meta.json", "notes/", "broken"):
            assert type(out[key]) is bytes and out[key] == ref[key]
        for key in ("first", "last"):
            assert_arrays_equal(ref[key], out[key])


def test_zip_whose_first_member_is_no_npy_loads_as_numpy_loads_it(tmp_path: Path) -> None:
    # numpy.load opens any zip as an npz; here the first member is text, so detection reads the
    # file as a plain zip whose members are recognized by content (npy arrays, one of objects).
    path = tmp_path / "a.npz"
    objects = np.array([{"k": [1, 2]}, "two"], dtype=object)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("README.txt", b"weights of a model")
        for name, value in {"w": np.arange(6.0).reshape(2, 3), "objects": objects}.items():
            with zf.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, value, allow_pickle=True)
    report = safeload.scan(path)
    assert report.verdict is safeload.Verdict.SAFE and "zip" in report.formats
    out = safeload.load(path)
    with np.load(path, allow_pickle=True) as ref:
        assert list(out) == ref.files == ["README.txt", "w", "objects"]
        assert out["README.txt"] == ref["README.txt"]
        assert_arrays_equal(ref["w"], out["w"])
        assert list(out["objects"]) == list(ref["objects"])
    with pytest.raises(DisallowedGlobalError):
        safeload.load(path, policy="strict")  # the object array still goes through the policy


@pytest.mark.parametrize("member", ["a.npy", "meta.bin"])
def test_npz_member_with_a_wrong_crc_is_refused_as_numpy_refuses_it(tmp_path: Path, member: str) -> None:
    # The scan does not hash plain array bytes (no code can hide there); the loader checks what
    # numpy's zipfile checks when it reads a member, and never hands over damaged bytes.
    path = tmp_path / "a.npz"
    np.savez(path, a=np.arange(64, dtype="<i4"))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("meta.bin", bytes(range(64)))
    data = bytearray(path.read_bytes())
    target = (5).to_bytes(4, "little") if member == "a.npy" else bytes(range(16, 24))
    data[data.index(target)] ^= 0x55
    path.write_bytes(bytes(data))
    with np.load(path) as ref, pytest.raises(zipfile.BadZipFile):
        ref[member.removesuffix(".npy")]
    with pytest.raises(LoadError, match="CRC-32") as caught:
        safeload.load(path)
    assert caught.value.member == member


def _npy_with_descr(
    path: Path, descr: str, shape: tuple[int, ...], payload: bytes, fortran: bool = False
) -> None:
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": fortran, "shape": shape})
        f.write(payload)


@pytest.mark.parametrize(
    ("descr", "shape", "fortran"),
    [
        ("(1,)<i8", (3,), False),
        ("(1,1)<i2", (2, 3), True),
        ("(0,)<i8", (0, 3), False),
        ("(2,)<f4", (0,), False),
    ],
)
def test_npy_subarray_descr_reads_as_numpy_reads_it(
    tmp_path: Path, descr: str, shape: tuple[int, ...], fortran: bool
) -> None:
    # numpy.save never writes one, but numpy.load reads prod(shape) items of a subarray dtype and
    # reshapes what that gives (its base dtype) to ``shape``.
    path = tmp_path / "a.npy"
    dtype = np.dtype(descr)
    _npy_with_descr(path, descr, shape, bytes(range(int(np.prod(shape)) * dtype.itemsize)), fortran)
    ref = np.load(path)
    out = safeload.load(path)
    assert_arrays_equal(ref, out)
    assert out.flags.f_contiguous == ref.flags.f_contiguous


def test_npy_subarray_descr_numpy_cannot_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    _npy_with_descr(path, "(2,)<i8", (3,), bytes(48))
    with pytest.raises(ValueError):
        np.load(path)
    with pytest.raises(LoadError, match="subarray"):
        safeload.load(path)


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
