""".npy and .npz: real files from numpy, object arrays, malicious twins, header tricks, damage."""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.format import descr_to_dtype, write_array, write_array_header_1_0

from safeload.formats import numpy_fmt
from safeload.formats.base import StreamRole
from tests.pickle_builder import exec_payload
from tests.unit.formats._samples import codes, foreign_samples, imports, make_ctx, npy_bytes

ARRAYS = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "fortran": np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
    "big-endian": np.arange(5, dtype=">f8"),
    "structured": np.array([(1, 2.0, b"ab")], dtype=[("a", "<i4"), ("b", "<f8"), ("c", "S2")]),
    "scalar": np.array(3.5),
    "empty": np.zeros((0, 7), dtype=np.uint8),
    "bool": np.array([True, False, True]),
    "complex": np.array([1 + 2j], dtype=np.complex64),
}


def rebuild(result: numpy_fmt.ReadResult, key: str) -> np.ndarray:
    """What the loader does with the reader's meta and storage (documented in numpy_fmt)."""
    info = result.meta["npy_arrays"][key]
    dtype = descr_to_dtype(info["descr"])
    storage = result.storages[info["storage"]]
    flat = np.frombuffer(storage.data, dtype=dtype, count=int(np.prod(info["shape"])))
    return flat.reshape(info["shape"], order="F" if info["fortran_order"] else "C")


def object_npy_header(shape: tuple[int, ...] = (1,), descr: object = "|O") -> bytes:
    fh = io.BytesIO()
    write_array_header_1_0(fh, {"descr": descr, "fortran_order": False, "shape": shape})
    return fh.getvalue()


def raw_npy(header_text: str, version: tuple[int, int] = (1, 0)) -> bytes:
    text = header_text.encode("latin1")
    length = struct.pack("<H", len(text)) if version == (1, 0) else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes(version) + length + text


# -- .npy -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_real_npy_gives_storage_and_meta_without_a_stream(name: str) -> None:
    array = ARRAYS[name]
    data = npy_bytes(array)
    buf = memoryview(data)
    assert numpy_fmt.sniff(buf)
    result = numpy_fmt.read(buf, make_ctx(file_offset=10))
    assert result.format == "npy"
    assert result.streams == []
    assert codes(result) == ["SL400"]
    info = result.meta["npy_arrays"]["npy"]
    assert info["shape"] == array.shape
    assert info["has_object"] is False
    storage = result.storages["npy"]
    assert storage.file_offset == 10 + info["data_offset"]
    assert storage.data.obj is buf.obj  # zero-copy
    rebuilt = rebuild(result, "npy")
    assert rebuilt.dtype == array.dtype
    np.testing.assert_array_equal(rebuilt, array)


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_every_npy_version(version: tuple[int, int]) -> None:
    array = np.array([(1, 2)], dtype=[("\u00e9t\u00e9" if version == (3, 0) else "x", "<i4"), ("y", "<i8")])
    fh = io.BytesIO()
    write_array(fh, array, version=version)
    result = numpy_fmt.read(memoryview(fh.getvalue()), make_ctx())
    assert codes(result) == ["SL400"]
    assert result.meta["npy_arrays"]["npy"]["version"] == version
    np.testing.assert_array_equal(rebuild(result, "npy"), array)


def test_object_array_is_a_pickle_stream() -> None:
    array = np.array([{"a": 1}, [1, 2], None], dtype=object)
    data = npy_bytes(array)
    result = numpy_fmt.read(memoryview(data), make_ctx(file_offset=0))
    assert codes(result) == []
    assert result.storages == {}
    (stream,) = result.streams
    info = result.meta["npy_arrays"]["npy"]
    assert info["has_object"] is True and info["storage"] is None
    assert stream.role is StreamRole.NPY_OBJECT
    assert stream.multi is False and stream.loadable is True
    assert bytes(stream.data) == data[info["data_offset"] :]
    assert stream.file_offset == info["data_offset"]
    assert "numpy._core.multiarray._reconstruct" in imports(stream.data)


def test_structured_dtype_with_an_object_field_is_a_pickle_stream() -> None:
    array = np.array([(1, "x")], dtype=[("n", "<i4"), ("o", "O")])
    result = numpy_fmt.read(memoryview(npy_bytes(array)), make_ctx())
    assert len(result.streams) == 1


def test_malicious_object_npy_stream_holds_the_payload(marker: Path) -> None:
    payload = exec_payload(marker)
    data = object_npy_header() + payload
    result = numpy_fmt.read(memoryview(data), make_ctx())
    (stream,) = result.streams
    assert bytes(stream.data) == payload
    assert imports(stream.data) == ["builtins.exec"]


def test_empty_object_array_still_unpickles_so_it_is_still_a_stream(marker: Path) -> None:
    # numpy pickle.loads the rest of the file for any object dtype, whatever the shape says.
    data = object_npy_header(shape=(0,)) + exec_payload(marker)
    result = numpy_fmt.read(memoryview(data), make_ctx())
    assert [bytes(s.data) for s in result.streams] == [exec_payload(marker)]


@pytest.mark.slow
def test_the_malicious_npy_is_live_for_numpy(tmp_path: Path) -> None:
    live = tmp_path / "numpy_ran_it"
    path = tmp_path / "weights.npy"
    path.write_bytes(object_npy_header() + exec_payload(live))
    result = numpy_fmt.read(memoryview(path.read_bytes()), make_ctx())
    assert imports(result.streams[0].data) == ["builtins.exec"]
    assert not live.exists()
    code = "import sys, numpy; numpy.load(sys.argv[1], allow_pickle=True)"
    subprocess.run([sys.executable, "-c", code, str(path)], check=False, timeout=120, capture_output=True)
    assert live.exists(), "fixture is not what numpy.load runs: the test would prove nothing"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }") + bytes(8), None),
        (raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }") + bytes(7), "SL205"),
        (raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }"), "SL205"),
        (raw_npy("{'descr': '<f4', 'fortran_order': 0, 'shape': (2,), }") + bytes(8), "SL205"),
        (raw_npy("{'descr': '<f4', 'shape': (2,), }") + bytes(8), "SL205"),
        (raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}") + bytes(8), "SL205"),
        (
            raw_npy("{'descr': __import__('os').system('true'), 'fortran_order': False, 'shape': (2,)}"),
            "SL205",
        ),
        (raw_npy("{'descr': 'not a dtype', 'fortran_order': False, 'shape': (2,), }"), "SL205"),
        (raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2L,), }") + bytes(8), "SL205"),
        (raw_npy("['descr', 'fortran_order', 'shape']"), "SL205"),
        (raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", (4, 0)) + bytes(8), "SL205"),
        (b"\x93NUMPY\x01\x00\xff\xff{'descr'", "SL205"),
        (b"\x93NUMPY\x02\x00" + struct.pack("<I", 50 << 20) + b"{", "SL203"),
    ],
)
def test_header_validation(data: bytes, code: str | None, marker: Path) -> None:
    result = numpy_fmt.read(memoryview(data), make_ctx())
    if code is None:
        assert codes(result) == ["SL400"]
    else:
        assert codes(result) == [code]
        assert result.streams == [] and result.storages == {}


def test_a_byte_after_the_array_is_trailing_data_and_the_array_still_indexed() -> None:
    """np.load reads the array; a second np.load on the handle finds no array and no pickle."""
    data = raw_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }") + bytes(9)
    result = numpy_fmt.read(memoryview(data), make_ctx())
    assert codes(result) == ["SL201", "SL400"]
    assert list(result.storages) == ["npy"] and len(result.storages["npy"].data) == 8


@pytest.mark.parametrize("name", sorted(foreign_samples()))
def test_sniff_does_not_claim_other_formats(name: str) -> None:
    assert numpy_fmt.sniff(memoryview(foreign_samples()[name])) is (name == "npy")


def test_npy_truncations_and_flips_never_raise() -> None:
    samples = [npy_bytes(ARRAYS["structured"]), npy_bytes(np.array([{"k": 1}], dtype=object))]
    rng = random.Random(11)
    for data in samples:
        for cut in range(len(data)):
            numpy_fmt.read(memoryview(data[:cut]), make_ctx())
        for _ in range(300):
            flipped = bytearray(data)
            flipped[rng.randrange(min(len(data), 140))] = rng.randrange(256)
            result = numpy_fmt.read(memoryview(bytes(flipped)), make_ctx())
            # Either the header is refused (a finding) or the array is fully accounted for.
            assert result.findings or result.streams or result.storages


# -- .npz -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_real_npz_every_member_read(save: object) -> None:
    fh = io.BytesIO()
    save(fh, weights=ARRAYS["f32"], bias=ARRAYS["big-endian"], mixed=np.array([1, "a"], dtype=object))  # type: ignore[operator]
    data = fh.getvalue()
    buf = memoryview(data)
    assert numpy_fmt.sniff(buf)
    result = numpy_fmt.read(buf, make_ctx(member="outer.tar"))
    assert result.format == "npz"
    assert codes(result) == []
    assert result.meta["npz_members"] == ["weights.npy", "bias.npy", "mixed.npy"]
    np.testing.assert_array_equal(rebuild(result, "weights.npy"), ARRAYS["f32"])
    np.testing.assert_array_equal(rebuild(result, "bias.npy"), ARRAYS["big-endian"])
    (stream,) = result.streams
    assert stream.member == "outer.tar!mixed.npy"
    assert stream.role is StreamRole.NPY_OBJECT
    compressed = save is np.savez_compressed
    assert stream.encoding == (("deflate",) if compressed else ())
    assert (stream.file_offset is None) is compressed
    if not compressed:
        assert result.storages["weights.npy"].data.obj is buf.obj


def test_npz_of_plain_arrays_says_no_pickle() -> None:
    fh = io.BytesIO()
    np.savez(fh, a=np.arange(3))
    assert codes(numpy_fmt.read(memoryview(fh.getvalue()), make_ctx())) == ["SL400"]


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_malicious_member_found_by_content_not_name(compression: int, marker: Path) -> None:
    # numpy.load(npz)["innocent"] checks the member's magic, not its name, and unpickles it.
    payload = exec_payload(marker)
    fh = io.BytesIO()
    with zipfile.ZipFile(fh, "w", compression=compression) as zf:
        zf.writestr("arr_0.npy", npy_bytes(np.arange(4)))
        zf.writestr("innocent", object_npy_header() + payload)
        zf.writestr("notes.txt", b"not an array")
    result = numpy_fmt.read(memoryview(fh.getvalue()), make_ctx())
    assert codes(result) == []
    (stream,) = result.streams
    assert stream.member == "innocent"
    assert bytes(stream.data) == payload
    assert imports(stream.data) == ["builtins.exec"]
    assert [(c.name, bytes(c.data)) for c in result.children] == [("notes.txt", b"not an array")]


def test_npz_with_a_bad_crc_is_flagged_and_still_scanned(marker: Path) -> None:
    payload = exec_payload(marker)
    fh = io.BytesIO()
    with zipfile.ZipFile(fh, "w") as zf:
        zf.writestr("x.npy", object_npy_header() + payload)
    data = bytearray(fh.getvalue())
    # zipfile (and so numpy) checks the CRC only at the member's end, after pickle.load ran.
    central = data.rfind(b"PK\x01\x02")
    data[central + 16] ^= 0xFF
    local = data.find(b"PK\x03\x04")
    data[local + 14] ^= 0xFF
    result = numpy_fmt.read(memoryview(bytes(data)), make_ctx())
    assert "SL300" in codes(result)
    assert [bytes(s.data) for s in result.streams] == [payload]


def _npz_with_two_directories(payload: bytes, first: tuple[str, bytes] | None = None) -> bytes:
    """The EOCD names a central directory of plain arrays (what torch's reader, miniz, reads: the
    ZIP64 locator points at no ZIP64 record); a ZIP64 record right before the locator names one
    that adds an object array (what Python's zipfile, and so numpy.load, reads)."""
    fh = io.BytesIO()
    with zipfile.ZipFile(fh, "w") as zf:
        zf.writestr(*(first or ("a.npy", npy_bytes(np.arange(4)))))
        zf.writestr("p.npy", object_npy_header() + payload)
    full = fh.getvalue()
    eocd = full.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack_from("<II", full, eocd + 12)
    body, whole_cd = full[:cd_offset], full[cd_offset : cd_offset + cd_size]
    first_cd = whole_cd[: whole_cd.find(b"PK\x01\x02", 4)]  # a.npy's record only
    zip64 = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 2, 2, len(whole_cd),
                        len(body) + len(first_cd))
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, 0, 1)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(first_cd), len(body), 0)
    return body + first_cd + whole_cd + zip64 + locator + end


def test_npz_member_only_pythons_zipfile_finds_is_scanned(marker: Path) -> None:
    payload = exec_payload(marker)
    data = _npz_with_two_directories(payload)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["a.npy", "p.npy"]  # numpy.load's view
    result = numpy_fmt.read(memoryview(data), make_ctx())
    assert [e for e in result.meta["npz_members"]] == ["a.npy"]  # torch's reader's view
    (stream,) = result.streams
    assert stream.member == "p.npy" and not stream.loadable
    assert bytes(stream.data) == payload and imports(stream.data) == ["builtins.exec"]
    only_zipfile = [f for f in result.findings if f.code == "SL306" and "numpy.load's and most unpackers' reader" in f.message]
    assert [f.member for f in only_zipfile] == ["p.npy"]
    assert not marker.exists()


@pytest.mark.slow
def test_npz_member_only_pythons_zipfile_finds_is_live_for_numpy(tmp_path: Path) -> None:
    live = tmp_path / "numpy_ran_it"
    path = tmp_path / "weights.npz"
    path.write_bytes(_npz_with_two_directories(exec_payload(live)))
    code = "import sys, numpy; numpy.load(sys.argv[1], allow_pickle=True)['p']"
    subprocess.run([sys.executable, "-c", code, str(path)], check=False, timeout=120, capture_output=True)
    assert live.exists(), "fixture is not what numpy.load runs: the test would prove nothing"


def test_npz_whose_directory_could_list_too_many_members_is_not_listed_by_zipfile() -> None:
    from safeload.limits import Limits

    data = _npz_with_two_directories(b"N.")
    # Room for two records in zipfile's directory; a limit of one member.
    result = numpy_fmt.read(memoryview(data), make_ctx(Limits(max_zip_members=1)))
    assert not result.streams
    limited = [f for f in result.findings if f.code == "SL203" and "Python's zipfile" in f.message]
    assert len(limited) == 1


def test_zip_member_only_pythons_zipfile_finds_is_scanned_by_content(marker: Path) -> None:
    # Not an npz to safeload's sniff (its first member is no array), but numpy.load opens any zip as
    # one: the generic zip reader hands zipfile's extra member on, and its content decides.
    from safeload.formats import open_container
    from safeload.limits import Limits

    payload = exec_payload(marker)
    data = _npz_with_two_directories(payload, first=("readme.txt", b"hello"))
    container = open_container(memoryview(data), path="weights.zip", limits=Limits())
    assert container.formats[0] == "zip"
    streams = [s for s in container.streams if s.member == "p.npy"]
    assert [bytes(s.data) for s in streams] == [payload] and not streams[0].loadable
    assert any(f.code == "SL306" and "unpackers" in f.message for f in container.findings)
    assert not marker.exists()


def test_npz_read_alike_by_both_readers_is_read_once() -> None:
    fh = io.BytesIO()
    np.savez(fh, a=np.arange(3), o=np.array([1, "x"], dtype=object))
    result = numpy_fmt.read(memoryview(fh.getvalue()), make_ctx())
    assert [s.member for s in result.streams] == ["o.npy"] and result.streams[0].loadable
    assert "SL306" not in codes(result)


def test_npz_sniff_needs_an_npy_first_member() -> None:
    fh = io.BytesIO()
    with zipfile.ZipFile(fh, "w") as zf:
        zf.writestr("readme.txt", b"hello")
        zf.writestr("a.npy", npy_bytes(np.arange(3)))
    # Not claimed as npz: the generic zip reader hands the members on, and the .npy one is then
    # read by content as its own child.
    assert not numpy_fmt.sniff(memoryview(fh.getvalue()))


def test_npz_truncations_and_flips_never_raise() -> None:
    fh = io.BytesIO()
    np.savez_compressed(fh, a=np.arange(50), o=np.array([{}], dtype=object))
    data = fh.getvalue()
    for cut in range(0, len(data), 7):
        buf = memoryview(data[:cut])
        if numpy_fmt.sniff(buf):
            numpy_fmt.read(buf, make_ctx())
    rng = random.Random(5)
    for _ in range(200):
        flipped = bytearray(data)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        buf = memoryview(bytes(flipped))
        if numpy_fmt.sniff(buf):
            result = numpy_fmt.read(buf, make_ctx())
            assert result.format == "npz"
