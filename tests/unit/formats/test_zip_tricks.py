"""Zip tricks that make other readers see a different archive than torch's: each is live, each is caught.

Every trick is a rewrite of the bytes of a real ``torch.save`` archive whose data.pkl carries a
harmless payload. For each one: (a) ``torch.load(weights_only=False)`` in a subprocess really runs
it (the payload's marker appears in that subprocess's directory), (b) Python's zipfile refuses or
misreads it where that is the point of the trick, (c) open_container hands on the data.pkl bytes
torch would unpickle and reports the anomaly, and the scan itself runs nothing.
"""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from safeload.formats import Container, StreamRole, open_container
from safeload.limits import Limits
from tests.unit.formats.torchfiles import (
    MARKER_NAME,
    PAYLOAD_TEXT,
    Member,
    Payload,
    central_records,
    members_of,
    patch,
    record,
    save_checkpoint,
    shift_offsets,
    write_zip,
)


def scan(data: bytes) -> Container:
    return open_container(memoryview(data), path="checkpoint", limits=Limits())


def codes(container: Container) -> set[str]:
    return {f.code for f in container.findings}


def data_pkl(container: Container) -> list[bytes]:
    return [bytes(s.data) for s in container.streams if s.role is StreamRole.TORCH_ZIP_DATA]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    evil, good = tmp_path_factory.mktemp("evil"), tmp_path_factory.mktemp("good")
    # Same file name, so both archives use the record prefix "model".
    return {
        "evil": save_checkpoint(evil / "model.pt", payload=True),
        "good": save_checkpoint(good / "model.pt"),
    }


def _evil_data(evil: bytes) -> bytes:
    return next(m.data for m in members_of(evil) if m.name.endswith(b"/data.pkl"))


def bad_crc(s: dict[str, bytes]) -> bytes:
    rec = record(s["evil"], b"/data.pkl")
    crc = struct.unpack_from("<I", s["evil"], rec.offset + 16)[0]
    return patch(s["evil"], rec.offset + 16, struct.pack("<I", crc ^ 0xFFFFFFFF))


def local_flag_bits(s: dict[str, bytes]) -> bytes:
    rec = record(s["evil"], b"/data.pkl")
    # Encryption and strong-encryption bits in the local header only: miniz reads central flags.
    return patch(s["evil"], rec.header_offset + 6, struct.pack("<H", rec.flags | 0x0041))


def encrypted_member(s: dict[str, bytes]) -> bytes:
    # A member torch never reads, marked encrypted: zipfile-based scanners that stop at the first
    # unreadable member never reach data.pkl (CVE-2025-1945 style).
    members = members_of(s["evil"])
    prefix = members[0].name.split(b"/")[0]
    members.insert(1, Member(prefix + b"/extra/notes.bin", b"not a pickle", flags=0x0801))
    return write_zip(members)


def name_mismatch(s: dict[str, bytes]) -> bytes:
    rec = record(s["evil"], b"/data.pkl")
    at = rec.header_offset + 30 + len(rec.name) - len(b"data.pkl")
    return patch(s["evil"], at, b"note.txt")


def case_alias(s: dict[str, bytes]) -> bytes:
    rec = record(s["evil"], b"/data.pkl")
    at_central = rec.offset + 46 + len(rec.name) - len(b"data.pkl")
    at_local = rec.header_offset + 30 + len(rec.name) - len(b"data.pkl")
    return patch(patch(s["evil"], at_central, b"DATA.PKL"), at_local, b"DATA.PKL")


def prepended_pickle(s: dict[str, bytes]) -> bytes:
    # Not a zip for torch.load (it does not start with PK): it takes the legacy path and unpickles
    # the front; zipfile finds the clean archive behind it.
    return pickle.dumps(Payload(), protocol=2) + s["good"]


def prepended_header(s: dict[str, bytes]) -> bytes:
    junk = b"PK\x03\x04" + b"\0" * 60
    return junk + shift_offsets(s["evil"], len(junk))


def duplicate_name(s: dict[str, bytes]) -> bytes:
    evil = members_of(s["evil"])
    benign = next(m.data for m in members_of(s["good"]) if m.name.endswith(b"/data.pkl"))
    name = evil[0].name
    assert name.endswith(b"/data.pkl")
    # miniz's sorted binary search takes the first of these two, zipfile's name table the last.
    return write_zip(evil + [Member(name, benign)])


def zip64_locator_astray(s: dict[str, bytes]) -> bytes:
    """Two central directories over one body. The EOCD names the one with the payload's data.pkl;
    a ZIP64 record right before the locator names one with a benign data.pkl. zipfile reads the
    record before the locator; miniz follows the locator's offset, finds no ZIP64 record there (it
    points at the first local header) and keeps the EOCD's values."""
    evil = members_of(s["evil"])
    benign = next(m.data for m in members_of(s["good"]) if m.name.endswith(b"/data.pkl"))
    assert evil[0].name.endswith(b"/data.pkl")
    full = write_zip(evil + [Member(evil[0].name, benign)])
    records = central_records(full)
    ends = [r.offset for r in records[1:]] + [full.rfind(b"PK\x05\x06")]
    raw = [full[r.offset : end] for r, end in zip(records, ends, strict=True)]
    body = full[: records[0].offset]
    torch_cd = b"".join(raw[: len(evil)])
    zipfile_cd = raw[-1] + b"".join(raw[1 : len(evil)])
    n = len(evil)
    zip64 = struct.pack(
        "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(zipfile_cd), len(body) + len(torch_cd)
    )
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, 0, 1)
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(torch_cd), len(body), 0)
    return body + torch_cd + zipfile_cd + zip64 + locator + eocd


TRICKS: dict[str, Callable[[dict[str, bytes]], bytes]] = {
    "bad_crc": bad_crc,
    "local_flag_bits": local_flag_bits,
    "encrypted_member": encrypted_member,
    "name_mismatch": name_mismatch,
    "case_alias": case_alias,
    "prepended_pickle": prepended_pickle,
    "prepended_header": prepended_header,
    "duplicate_name": duplicate_name,
    "zip64_locator_astray": zip64_locator_astray,
}


@pytest.fixture(scope="module")
def tricks(sources: dict[str, bytes]) -> dict[str, bytes]:
    return {name: build(sources) for name, build in TRICKS.items()}


_RUNNER = """
import os, sys, torch
for path, workdir in zip(sys.argv[1::2], sys.argv[2::2]):
    os.chdir(workdir)
    try:
        torch.load(path, weights_only=False)
        print("loaded", path)
    except Exception as exc:
        print("failed", path, type(exc).__name__, str(exc)[:200].replace(chr(10), " "))
"""


@pytest.fixture(scope="module")
def torch_ran(tricks: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bool]:
    """Which tricks made torch.load run the payload: one subprocess, one working directory each."""
    root = tmp_path_factory.mktemp("torch_load")
    args: list[str] = []
    for name, data in tricks.items():
        (root / name).mkdir()
        path = root / f"{name}.bin"
        path.write_bytes(data)
        args += [str(path), str(root / name)]
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return {name: (root / name / MARKER_NAME).exists() for name in tricks}


@pytest.fixture
def in_marker_dir(marker: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Scan from the directory where a payload that ran would leave the marker."""
    monkeypatch.chdir(marker.parent)
    return marker


def _zipfile_read(data: bytes, name: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.read(name)


@pytest.mark.slow
def test_every_trick_is_live_under_torch_load(torch_ran: dict[str, bool]) -> None:
    assert torch_ran == {name: True for name in TRICKS}


def test_bad_crc(tricks: dict[str, bytes], sources: dict[str, bytes], in_marker_dir: Path) -> None:
    data = tricks["bad_crc"]
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        _zipfile_read(data, "model/data.pkl")
    c = scan(data)
    assert data_pkl(c) == [_evil_data(sources["evil"])]
    assert "SL300" in codes(c)
    assert not in_marker_dir.exists()


def test_flag_bits_in_local_header(
    tricks: dict[str, bytes], sources: dict[str, bytes], in_marker_dir: Path
) -> None:
    # Python 3.11's zipfile checks only the central flags and reads this one; the trick is aimed at
    # readers that check local headers. test_encrypted_member is the variant zipfile refuses.
    c = scan(tricks["local_flag_bits"])
    assert data_pkl(c) == [_evil_data(sources["evil"])]
    sl301 = [f for f in c.findings if f.code == "SL301"]
    assert sl301 and sl301[0].member == "model/data.pkl"
    assert not in_marker_dir.exists()


def test_encrypted_member_does_not_stop_the_scan(
    tricks: dict[str, bytes], sources: dict[str, bytes], in_marker_dir: Path
) -> None:
    data = tricks["encrypted_member"]
    with pytest.raises(RuntimeError, match="encrypted"):
        _zipfile_read(data, "model/extra/notes.bin")
    c = scan(data)
    assert data_pkl(c) == [_evil_data(sources["evil"])]
    assert any(f.code == "SL301" and f.member == "model/extra/notes.bin" for f in c.findings)
    assert not in_marker_dir.exists()


def test_local_and_central_names_differ(
    tricks: dict[str, bytes], sources: dict[str, bytes], in_marker_dir: Path
) -> None:
    data = tricks["name_mismatch"]
    with pytest.raises(zipfile.BadZipFile, match="differ"):
        _zipfile_read(data, "model/data.pkl")
    c = scan(data)
    assert data_pkl(c) == [_evil_data(sources["evil"])]
    assert "SL302" in codes(c)
    assert not in_marker_dir.exists()


def test_data_pkl_under_another_spelling(
    tricks: dict[str, bytes], sources: dict[str, bytes], in_marker_dir: Path
) -> None:
    data = tricks["case_alias"]
    with pytest.raises(KeyError):
        _zipfile_read(data, "model/data.pkl")
    c = scan(data)
    assert c.formats[0] == "torch-zip"
    streams = [s for s in c.streams if s.role is StreamRole.TORCH_ZIP_DATA]
    assert [bytes(s.data) for s in streams] == [_evil_data(sources["evil"])]
    assert streams[0].member == "model/DATA.PKL" and streams[0].loadable
    assert "SL311" in codes(c)
    assert not in_marker_dir.exists()


def test_pickle_in_front_of_a_clean_archive(
    tricks: dict[str, bytes], sources: dict[str, bytes], in_marker_dir: Path
) -> None:
    data = tricks["prepended_pickle"]
    # zipfile finds the clean archive and nothing else.
    assert PAYLOAD_TEXT not in _zipfile_read(data, "model/data.pkl")
    c = scan(data)
    raw = [s for s in c.streams if s.role is StreamRole.RAW]
    assert raw and all(PAYLOAD_TEXT in bytes(s.data) for s in raw)
    assert any(s.member is None and s.loadable for s in raw)  # what torch.load unpickles
    assert {"SL305", "SL308"} <= codes(c)
    assert set(c.formats) >= {"pickle", "torch-zip"}
    assert not in_marker_dir.exists()


def test_bytes_before_the_first_header(
    tricks: dict[str, bytes], sources: dict[str, bytes], in_marker_dir: Path
) -> None:
    # Every reader opens this one; the point is bytes no record claims, where anything can hide.
    c = scan(tricks["prepended_header"])
    assert data_pkl(c) == [_evil_data(sources["evil"])]
    before = [f for f in c.findings if f.code == "SL305"]
    assert before and before[0].offset == 0
    assert not in_marker_dir.exists()


def test_duplicate_data_pkl(tricks: dict[str, bytes], sources: dict[str, bytes], in_marker_dir: Path) -> None:
    data = tricks["duplicate_name"]
    assert PAYLOAD_TEXT not in _zipfile_read(data, "model/data.pkl")  # zipfile takes the last copy
    c = scan(data)
    found = data_pkl(c)
    assert len(found) == 2 and sum(PAYLOAD_TEXT in d for d in found) == 1
    loadable = [s for s in c.streams if s.loadable]
    # The copy safeload would load is the one torch's reader picks: the payload.
    assert len(loadable) == 1 and PAYLOAD_TEXT in bytes(loadable[0].data)
    assert "SL303" in codes(c)
    assert not in_marker_dir.exists()


def test_duplicate_order_reversed_follows_miniz(sources: dict[str, bytes]) -> None:
    evil = members_of(sources["evil"])
    benign = next(m for m in members_of(sources["good"]) if m.name.endswith(b"/data.pkl"))
    data = write_zip([Member(evil[0].name, benign.data)] + evil)
    loadable = [s for s in scan(data).streams if s.loadable]
    assert len(loadable) == 1 and PAYLOAD_TEXT not in bytes(loadable[0].data)


def test_entries_sharing_bytes_overlap(sources: dict[str, bytes]) -> None:
    members = members_of(sources["good"])
    prefix = members[0].name.split(b"/")[0]
    data = write_zip(members + [Member(prefix + b"/alias.pkl", members[0].data)])
    alias = record(data, b"/alias.pkl")
    first = record(data, b"/data.pkl")
    data = patch(data, alias.offset + 42, struct.pack("<I", first.header_offset))
    c = scan(data)
    assert "SL304" in codes(c)


def test_zip64_record_disagrees_with_eocd(sources: dict[str, bytes]) -> None:
    data = sources["good"]
    eocd = data.rfind(b"PK\x05\x06")
    z64 = struct.unpack_from("<Q", data, eocd - 20 + 8)[0]
    assert data[z64 : z64 + 4] == b"PK\x06\x06"  # torch writes ZIP64 end records
    total = struct.unpack_from("<Q", data, z64 + 32)[0]
    bad = patch(data, z64 + 32, struct.pack("<Q", total + 1))
    assert "SL306" in codes(scan(bad))
    assert "SL306" not in codes(scan(data))


# ZIP64 end record fields (offset in the record) miniz checks against its limits.
_Z64_ON_DISK, _Z64_TOTAL, _Z64_CD_SIZE = 24, 32, 40


@pytest.mark.parametrize(
    ("at", "value", "why"),
    [
        (_Z64_TOTAL, 2**32, "entries, over miniz's"),
        (_Z64_ON_DISK, 2**32, "entries, over miniz's"),
        (_Z64_CD_SIZE, 2**32, "central directory of 4294967296 bytes"),
        (4, 43, "gives its own size as 43"),
    ],
)
def test_zip64_values_miniz_refuses_mark_the_archive_as_one_torch_refuses(
    sources: dict[str, bytes], at: int, value: int, why: str
) -> None:
    data = sources["good"]
    z64 = data.rfind(b"PK\x06\x06")
    assert "torch_refuses" not in scan(data).meta
    refused = scan(patch(data, z64 + at, struct.pack("<Q", value))).meta["torch_refuses"]
    assert why in refused["why"] and refused["file_offset"] == z64


@pytest.mark.parametrize(("disks", "refused"), [(0, True), (1, False), (2, True), (2**32 - 1, True)])
def test_zip64_locator_disk_count_other_than_one_is_one_torch_refuses(
    sources: dict[str, bytes], disks: int, refused: bool
) -> None:
    data = sources["good"]
    locator = data.rfind(b"PK\x06\x07")
    meta = scan(patch(data, locator + 16, struct.pack("<I", disks))).meta
    assert ("torch_refuses" in meta) is refused
    if refused:
        assert f"counts {disks} disks" in meta["torch_refuses"]["why"]
        assert meta["torch_refuses"]["file_offset"] == locator


def test_zip64_locator_pointing_past_any_record_is_one_torch_refuses(sources: dict[str, bytes]) -> None:
    data = sources["good"]
    locator = data.rfind(b"PK\x06\x07")
    c = scan(patch(data, locator + 8, struct.pack("<Q", len(data) - 10)))
    assert "SL306" in codes(c)
    assert "too near the end of the file" in c.meta["torch_refuses"]["why"]


def test_central_record_running_past_the_directory_is_one_torch_refuses(sources: dict[str, bytes]) -> None:
    """miniz sizes each central record against what is left of the directory; zipfile reads the
    last record's extra field cut short there (here into the ZIP64 end record after it)."""
    data = sources["good"]
    last = central_records(data)[-1]
    bad = patch(data, last.offset + 30, struct.pack("<H", 86))  # the extra field's length
    assert zipfile.ZipFile(io.BytesIO(bad)).testzip() is None
    with pytest.raises(RuntimeError, match="failed reading zip archive"):
        torch.load(io.BytesIO(bad), weights_only=True)
    refused = scan(bad).meta["torch_refuses"]
    assert "runs past the end of the directory" in refused["why"] and refused["file_offset"] == last.offset
    assert "torch_refuses" not in scan(data).meta


def test_zip64_locator_pointing_at_no_record(
    tricks: dict[str, bytes], sources: dict[str, bytes], in_marker_dir: Path
) -> None:
    data = tricks["zip64_locator_astray"]
    assert PAYLOAD_TEXT not in _zipfile_read(data, "model/data.pkl")  # the record before the locator
    c = scan(data)
    loadable = [s for s in c.streams if s.loadable]
    # What torch unpickles: the data.pkl of the directory the EOCD names.
    assert len(loadable) == 1 and bytes(loadable[0].data) == _evil_data(sources["evil"])
    astray = [f for f in c.findings if f.code == "SL306" and "locator" in f.message]
    assert any("without a ZIP64 end record where it points" in f.message for f in astray)
    assert not in_marker_dir.exists()


def test_entry_hidden_past_the_eocd_count(sources: dict[str, bytes], in_marker_dir: Path) -> None:
    members = members_of(sources["good"])
    prefix = members[0].name.split(b"/")[0]
    data = write_zip(members + [Member(prefix + b"/hidden.pkl", pickle.dumps(Payload(), protocol=2))])
    eocd = data.rfind(b"PK\x05\x06")
    n = len(members)
    data = patch(data, eocd + 8, struct.pack("<HH", n, n))  # zipfile still reads to the directory's end
    c = scan(data)
    assert "SL306" in codes(c)
    assert any(s.member == "model/hidden.pkl" and PAYLOAD_TEXT in bytes(s.data) for s in c.streams)
    assert not in_marker_dir.exists()


def _container_summary(c: Container) -> object:
    return (
        c.formats,
        [(f.code, f.message, f.member, f.offset, f.file_offset) for f in c.findings],
        [(s.member, s.file_offset, s.role, s.loadable, bytes(s.data)) for s in c.streams],
        {k: (v.file_offset, len(v.data)) for k, v in c.storages.items()},
        c.meta,
    )


def test_headers_read_through_peek_match_the_mapping(
    tricks: dict[str, bytes], sources: dict[str, bytes], tmp_path: Path
) -> None:
    """A mapped file's local headers, descriptors and storage counts are read with pread
    (Source.peek); every archive, tricks included, reads the same as from its bytes."""
    from safeload.source import open_source

    legacy = save_checkpoint(tmp_path / "legacy.pt", legacy=True)
    # Members far from both ends of the file, where peek reads with pread.
    spread: dict[str, bytes] = {}
    for new_zip in (True, False):
        buf = io.BytesIO()
        tensors = {f"t{i}": torch.full((65536,), float(i)) for i in range(4)}  # 256 KiB each
        torch.save(tensors, buf, _use_new_zipfile_serialization=new_zip)
        spread[f"spread-{'zip' if new_zip else 'legacy'}"] = buf.getvalue()
    for name, data in {**sources, **tricks, "legacy": legacy, **spread}.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        source = open_source(path, use_mmap=True, max_bytes=1 << 30)
        assert source.mapped
        peeked = open_container(source.buffer, path="checkpoint", limits=Limits(), peek=source.peek)
        assert _container_summary(peeked) == _container_summary(scan(data)), name
        # The readers really take those bytes from peek: wrong bytes there change what they see.
        blind = open_container(
            source.buffer, path="checkpoint", limits=Limits(), peek=lambda offset, size: b"\0" * size
        )
        assert _container_summary(blind) != _container_summary(peeked), name


@pytest.mark.parametrize("start_disk", [1, 2])
def test_entry_starting_on_another_disk(sources: dict[str, bytes], tmp_path: Path, start_disk: int) -> None:
    """miniz refuses an archive with an entry on a disk other than its own or 1; zipfile ignores the
    field. torch cannot open the file, numpy.load (zipfile) can: readers disagree, SL306."""
    import safeload
    from safeload.errors import UnsafeModelError

    rec = record(sources["good"], b"/data.pkl")
    data = patch(sources["good"], rec.offset + 34, struct.pack("<H", start_disk))
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    assert _zipfile_read(data, "model/data.pkl") == _zipfile_read(sources["good"], "model/data.pkl")
    odd = [f for f in scan(data).findings if f.code == "SL306" and "disk" in f.message]
    if start_disk == 1:
        assert torch.load(path, weights_only=True).keys() == safeload.load(path).keys()
        assert odd == []
        return
    with pytest.raises(RuntimeError, match="unsupported multidisk archive"):
        torch.load(path, weights_only=True)
    assert len(odd) == 1 and odd[0].file_offset == rec.offset
    with pytest.raises(UnsafeModelError, match="starts on disk 2"):
        safeload.load(path)
