"""A zip member's CRC is verified when the member holds a pickle, and only then.

A bad CRC makes zipfile-based loaders and scanners refuse a member that torch's reader loads, so
on a pickle it is an evasion signal (SL300). On array bytes or text it decides nothing about code,
and hashing gigabytes of weights to learn that is what made a 1 GB npz take most of a second.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from safeload.formats import Container, open_container, zipread
from safeload.limits import Limits
from tests.pickle_builder import exec_payload
from tests.unit.formats._samples import npy_bytes


def scan(data: bytes) -> Container:
    return open_container(memoryview(data), path="archive.zip", limits=Limits())


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    fh = io.BytesIO()
    with zipfile.ZipFile(fh, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return fh.getvalue()


def break_crc(data: bytes, name: str) -> bytes:
    """Flip the recorded CRC of ``name`` in both its local and its central header."""
    out = bytearray(data)
    raw = name.encode()
    central = out.find(b"PK\x01\x02")
    while central >= 0:
        name_len = int.from_bytes(out[central + 28 : central + 30], "little")
        if bytes(out[central + 46 : central + 46 + name_len]) == raw:
            out[central + 16] ^= 0xFF
            local = int.from_bytes(out[central + 42 : central + 46], "little")
            out[local + 14] ^= 0xFF
            return bytes(out)
        central = out.find(b"PK\x01\x02", central + 4)
    raise AssertionError(f"{name} not in the archive")


@pytest.fixture
def crc_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the buffers zipread hashes."""
    calls: list[int] = []
    real = zipread.zlib.crc32

    def counting(data: object, *rest: int) -> int:
        calls.append(len(memoryview(data)))  # type: ignore[arg-type]
        return real(data, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(zipread.zlib, "crc32", counting)
    return calls


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_pickle_member_with_a_bad_crc_is_flagged(marker: Path, compression: int) -> None:
    payload = exec_payload(marker)
    data = break_crc(zip_bytes({"readme.txt": b"hello", "model.pkl": payload}, compression), "model.pkl")
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        zipfile.ZipFile(io.BytesIO(data)).read("model.pkl")
    c = scan(data)
    sl300 = [f for f in c.findings if f.code == "SL300"]
    assert [f.member for f in sl300] == ["model.pkl"]
    assert [bytes(s.data) for s in c.streams] == [payload]
    assert not marker.exists()


def test_a_good_crc_on_a_pickle_member_is_checked_and_quiet(crc_calls: list[int]) -> None:
    payload = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01K\x02\x86\x94."
    c = scan(zip_bytes({"model.pkl": payload}))
    assert not [f for f in c.findings if f.code == "SL300"]
    assert len(payload) in crc_calls


def test_data_members_are_not_hashed(crc_calls: list[int]) -> None:
    weights = bytes(range(256)) * 4096  # 1 MiB that is not a pickle
    data = break_crc(zip_bytes({"weights.bin": weights, "notes.txt": b"plain text"}), "weights.bin")
    c = scan(data)
    assert not [f for f in c.findings if f.code == "SL300"]
    assert len(weights) not in crc_calls


def test_plain_npz_arrays_are_not_hashed(crc_calls: list[int]) -> None:
    array = np.arange(1 << 18, dtype=np.float32)
    member = npy_bytes(array)
    data = break_crc(zip_bytes({"a.npy": member, "b.npy": npy_bytes(np.zeros(3))}), "a.npy")
    c = scan(data)
    assert c.formats == ["npz"]
    assert not [f for f in c.findings if f.code == "SL300"]
    assert len(member) not in crc_calls


def test_a_pickle_inside_a_non_array_npz_member_is_verified(marker: Path) -> None:
    payload = exec_payload(marker)
    data = break_crc(zip_bytes({"a.npy": npy_bytes(np.zeros(3)), "extra": payload}), "extra")
    c = scan(data)
    assert [f.member for f in c.findings if f.code == "SL300"] == ["extra"]
    assert payload in [bytes(s.data) for s in c.streams]
    assert not marker.exists()


def test_a_pickle_nested_in_a_member_is_verified(marker: Path) -> None:
    # The member is itself a zip holding the pickle: the outer member's CRC matters too.
    payload = exec_payload(marker)
    inner = zip_bytes({"p.pkl": payload})
    data = break_crc(zip_bytes({"inner.zip": inner}), "inner.zip")
    c = scan(data)
    assert "inner.zip" in [f.member for f in c.findings if f.code == "SL300"]
    assert not marker.exists()


@pytest.mark.parametrize("compression", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_members_zipfile_decompresses_are_scanned(marker: Path, compression: int) -> None:
    # numpy.load reads npz members through zipfile, which inflates bzip2 and LZMA too: an object
    # array stored that way is unpickled by numpy, so it must be scanned, not left unreadable.
    payload = exec_payload(marker)
    data = zip_bytes({"a.npy": npy_bytes(np.zeros(3)), "o.npy": object_npy(payload)}, compression)
    c = scan(data)
    assert c.formats == ["npz"]
    assert payload in [bytes(s.data) for s in c.streams]
    assert not [f for f in c.findings if f.code in ("SL205", "SL203")]
    assert not marker.exists()


def test_a_hostile_lzma_dictionary_size_is_not_allocated(marker: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dictionaries: list[int] = []
    real = zipread.lzma.LZMADecompressor

    def recording(*args: object, filters: list[dict[str, int]], **kw: object) -> object:
        dictionaries.append(filters[0]["dict_size"])
        return real(*args, filters=filters, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(zipread.lzma, "LZMADecompressor", recording)
    payload = exec_payload(marker)
    data = bytearray(zip_bytes({"p.pkl": payload}, zipfile.ZIP_LZMA))
    local = data.find(b"PK\x03\x04")
    start = local + 30 + int.from_bytes(data[local + 26 : local + 28], "little")
    start += int.from_bytes(data[local + 28 : local + 30], "little")
    data[start + 5 : start + 9] = (0xFFFFFFFF).to_bytes(4, "little")  # a 4 GiB dictionary
    c = scan(bytes(data))
    assert [bytes(s.data) for s in c.streams] == [payload]
    # liblzma would allocate the declared 4 GiB up front; no more than the output is needed.
    assert dictionaries and max(dictionaries) <= max(4096, len(payload) + 1)
    assert not marker.exists()


def object_npy(pickled: bytes) -> bytes:
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (117 - len(header)) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + pickled


def test_an_archive_lists_a_bounded_number_of_findings_per_code() -> None:
    """One finding per member of an archive of 200,000 members took 1.3 s and 200 MB to build
    before the scan kept 1,000 of them. An archive lists 100 of each code and counts the rest."""
    names = [f"m{i}.txt" for i in range(150)]
    data = zip_bytes(dict.fromkeys(names, b"x"))
    out = bytearray(data)
    for info in zipfile.ZipFile(io.BytesIO(data)).infolist():
        out[info.header_offset + 14] ^= 0xFF  # the local header's CRC only: the records disagree
    found = [f for f in scan(bytes(out)).findings if f.code == "SL300"]
    assert len(found) == zipread.MAX_NOTES_PER_CODE + 1 == 101
    assert [f.member for f in found[:3]] == names[:3] and found[0].offset == 0
    assert found[-1].message.startswith("50 more SL300 findings in this archive's records are not listed")
    assert found[-1].member is None
