"""Checkpoints inside archives: a model.tar.gz (SageMaker's layout) or a tar of several model files.

A tar stores its members as they are, and a checkpoint is often its last member. Searched for from
the file's end, the checkpoint's own zip end record is then found, with offsets counted from the
member's start: read as a zip of its own, the tar's headers looked like bytes put in front of an
archive, its padding like bytes appended, and its ZIP64 locator like one pointing elsewhere. Such
files came out UNSAFE and UNSCANNABLE. The checkpoint is read once, as the member it is, with every
check there; a payload in it is named in that member.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import safeload
from safeload.errors import UnsupportedFormatError
from safeload.model import Verdict
from tests.unit.formats._samples import tar_bytes
from tests.unit.formats.torchfiles import MARKER_NAME, run_torch_load, save_checkpoint

# Findings a tarred checkpoint once drew from being read as a zip that starts part way into the tar.
SPURIOUS = {"SL205", "SL305", "SL306", "SL308"}

LAYOUTS = {
    "alone": ["model.pth"],
    "after code": ["code/inference.py", "model.pth"],
    "before a readme": ["model.pth", "README.md"],
}


def _members(names: list[str], checkpoint: bytes) -> dict[str, bytes]:
    other = {"code/inference.py": b"def model_fn(model_dir):\n    return None\n", "README.md": b"# weights\n"}
    return {name: checkpoint if name == "model.pth" else other[name] for name in names}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    good, evil = tmp_path_factory.mktemp("good"), tmp_path_factory.mktemp("evil")
    # Saved as model.pth, as they sit in the archive: torch names the record prefix after the file.
    return {
        "good": save_checkpoint(good / "model.pth"),
        "evil": save_checkpoint(evil / "model.pth", payload=True),
    }


@pytest.fixture
def in_marker_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Scans run here: a payload that ran would leave its marker in this directory."""
    here = tmp_path / "scan-cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    return here / MARKER_NAME


@pytest.mark.parametrize("gzipped", [False, True], ids=["tar", "tar.gz"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_tarred_checkpoint_is_read_as_the_member_it_is(
    layout: str, gzipped: bool, checkpoints: dict[str, bytes], tmp_path: Path, in_marker_dir: Path
) -> None:
    data = tar_bytes(_members(LAYOUTS[layout], checkpoints["good"]))
    path = tmp_path / ("model.tar.gz" if gzipped else "model.tar")
    path.write_bytes(gzip.compress(data) if gzipped else data)

    report = safeload.scan(path)
    assert report.verdict is Verdict.SAFE, [(f.code, f.member, f.message) for f in report.findings]
    assert not SPURIOUS & {f.code for f in report.findings}
    assert {"tar", "torch-zip"} <= set(report.formats)
    wrapper = "<gzip>!" if gzipped else ""
    pickled = [s.member for s in report.streams]
    assert f"{wrapper}model.pth!model/data.pkl" in pickled
    # Read once, as the member: no second reading of the same archive from the file's end.
    assert not [m for m in pickled if m and m.startswith(("model/", f"{wrapper}model/"))]
    assert not in_marker_dir.exists()


def test_what_readers_make_of_a_tar_that_ends_with_a_checkpoint(
    checkpoints: dict[str, bytes], tmp_path: Path
) -> None:
    """Why the member's reading is the only one needed: torch.load cannot open the tar at all, and
    Python's zipfile, opening it from its end, finds the member's archive and nothing else."""
    path = tmp_path / "model.tar"
    path.write_bytes(tar_bytes(_members(LAYOUTS["after code"], checkpoints["good"])))
    with pytest.raises(Exception):  # noqa: B017,PT011 - torch's own error, whichever it raises
        torch.load(path, weights_only=True)
    with zipfile.ZipFile(path) as outer, zipfile.ZipFile(io.BytesIO(checkpoints["good"])) as member:
        assert outer.namelist() == member.namelist()
        assert outer.read("model/data.pkl") == member.read("model/data.pkl")


@pytest.mark.parametrize("gzipped", [False, True], ids=["tar", "tar.gz"])
def test_a_payload_in_a_tarred_checkpoint_is_named_in_its_member(
    gzipped: bool, checkpoints: dict[str, bytes], tmp_path: Path, in_marker_dir: Path
) -> None:
    data = tar_bytes(_members(LAYOUTS["after code"], checkpoints["evil"]))
    path = tmp_path / "model.tar.gz"
    path.write_bytes(gzip.compress(data) if gzipped else data)

    report = safeload.scan(path)
    assert report.verdict is Verdict.UNSAFE
    wrapper = "<gzip>!" if gzipped else ""
    blocked = [f for f in report.findings if f.global_name == "builtins.exec"]
    assert blocked and all(f.member == f"{wrapper}model.pth!model/data.pkl" for f in blocked)
    assert not SPURIOUS & {f.code for f in report.findings}
    assert not in_marker_dir.exists()

    # The payload is live: extracted, the member runs it under torch.load(weights_only=False).
    with tarfile.open(path) as tar:
        member = tar.extractfile("model.pth")
        assert member is not None
        extracted = tmp_path / "extracted" / "model.pth"
        extracted.parent.mkdir()
        extracted.write_bytes(member.read())
    ran, stderr = run_torch_load(extracted, tmp_path / "torch-cwd")
    assert ran, stderr
    assert not in_marker_dir.exists()


def test_numpy_and_plain_zip_members_of_atar_bytes(tmp_path: Path) -> None:
    npz = io.BytesIO()
    np.savez(npz, w=np.arange(6.0), objects=np.array([{"k": 1}, "two"], dtype=object))
    plain = io.BytesIO()
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("state.pkl", pickle.dumps({"step": 3}, protocol=4))
    for name, member in {"arrays.npz": npz.getvalue(), "state.zip": plain.getvalue()}.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(tar_bytes({name: member}))
        report = safeload.scan(path)
        assert report.verdict is Verdict.SAFE, [(f.code, f.message) for f in report.findings]
        assert not SPURIOUS & {f.code for f in report.findings}
        assert all(s.member and s.member.startswith(f"{name}!") for s in report.streams)


def test_loading_a_tar_names_the_member_to_extract(checkpoints: dict[str, bytes], tmp_path: Path) -> None:
    path = tmp_path / "model.tar.gz"
    path.write_bytes(gzip.compress(tar_bytes(_members(LAYOUTS["after code"], checkpoints["good"]))))
    with pytest.raises(UnsupportedFormatError) as caught:
        safeload.load(path)
    assert "'model.pth'" in str(caught.value)
    assert caught.value.remedy is not None and "extract" in caught.value.remedy
    assert caught.value.path == str(path)


# -- a checkpoint with bytes put in front, its offsets left as they were ------------------------------


def _locator(data: bytes) -> int:
    at = data.rfind(b"PK\x05\x06") - 20
    assert data[at : at + 4] == b"PK\x06\x07", "torch.save writes ZIP64 end records"
    return at


def test_a_checkpoint_moved_whole_is_read_as_zipfile_reads_it(
    checkpoints: dict[str, bytes], tmp_path: Path
) -> None:
    """Its ZIP64 locator counts from the archive's start, as every offset in it does: no reader sees
    another archive there (torch opens none; zipfile reads the record the locator means)."""
    path = tmp_path / "stub.pth"
    path.write_bytes(b"#!/bin/sh\nexit 0\n" + checkpoints["good"])
    with zipfile.ZipFile(path) as zf:
        assert "model/data.pkl" in zf.namelist()
    with pytest.raises(Exception):  # noqa: B017,PT011 - torch's own error, whichever it raises
        torch.load(path, weights_only=True)
    report = safeload.scan(path)
    codes = {f.code for f in report.findings}
    assert "SL305" in codes and "SL306" not in codes
    assert report.verdict is Verdict.SAFE


def test_a_locator_that_points_elsewhere_in_a_moved_archive_is_still_reported(
    checkpoints: dict[str, bytes], tmp_path: Path
) -> None:
    data = bytearray(checkpoints["good"])
    at = _locator(bytes(data))
    (z64,) = struct.unpack_from("<Q", data, at + 8)
    struct.pack_into("<Q", data, at + 8, z64 + 1)  # not where the moved record is
    path = tmp_path / "stub.pth"
    path.write_bytes(b"#!/bin/sh\nexit 0\n" + bytes(data))
    report = safeload.scan(path)
    assert "SL306" in {f.code for f in report.findings}
    assert report.verdict is Verdict.UNSAFE


def test_a_large_archive_in_atar_bytes(checkpoints: dict[str, bytes], tmp_path: Path) -> None:
    """Past 4 GiB or 65,535 members the end record holds only placeholders and the ZIP64 record the
    values: inside a tar, the record right before the locator is the one to read."""
    data = bytearray(checkpoints["good"])
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HHII", data, eocd + 8, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    alone = tmp_path / "model.pth"
    alone.write_bytes(bytes(data))
    assert torch.load(alone, weights_only=True)["step"] == 7  # still a checkpoint torch reads
    path = tmp_path / "model.tar"
    path.write_bytes(tar_bytes(_members(LAYOUTS["after code"], bytes(data))))
    report = safeload.scan(path)
    assert report.verdict is Verdict.SAFE, [(f.code, f.message) for f in report.findings]
    assert "model.pth!model/data.pkl" in [s.member for s in report.streams]
    assert os.path.getsize(path) > len(data)


def test_a_large_archive_moved_whole_is_still_found(checkpoints: dict[str, bytes], tmp_path: Path) -> None:
    """With placeholders in its end record, only the ZIP64 record says where the directory is:
    recognizing the zip must ask it too, or Python's zipfile reads a payload the scan never sees
    (and a directory walk skips the file as no model at all)."""
    data = bytearray(checkpoints["evil"])
    eocd = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HHII", data, eocd + 8, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    path = tmp_path / "stub.pth"
    path.write_bytes(b"#!/bin/sh\nexit 0\n" + bytes(data))
    with zipfile.ZipFile(path) as zf:
        assert b"PAYLOAD_RAN" in zf.read("model/data.pkl")
    report = safeload.scan(path)
    assert report.verdict is Verdict.UNSAFE
    assert "torch-zip" in report.formats and not report.no_model_format
    # zipfile reads the directory size from the ZIP64 record, not the placeholder: no limit is near.
    assert "SL203" not in {f.code for f in report.findings}
    assert any(f.global_name == "builtins.exec" and f.member == "model/data.pkl" for f in report.findings)
