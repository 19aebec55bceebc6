"""torch.save archives read the way torch's reader reads them: data.pkl, records, storage index."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeload.formats import (
    Budget,
    Container,
    PersistentScheme,
    ReadContext,
    StreamRole,
    open_container,
    zipread,
)
from safeload.formats.torchzip import record_prefix
from safeload.limits import Limits
from tests.unit.formats.torchfiles import PAYLOAD_TEXT, Payload, save_checkpoint


def scan(data: bytes, limits: Limits | None = None) -> Container:
    return open_container(memoryview(data), path="x", limits=limits or Limits())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def test_real_checkpoint(checkpoint: bytes) -> None:
    c = scan(checkpoint)
    members = _members(checkpoint)
    assert c.formats == ["torch-zip"]
    assert c.findings == []
    [stream] = c.streams
    assert stream.role is StreamRole.TORCH_ZIP_DATA
    assert stream.member == "model/data.pkl"
    assert stream.persistent_scheme is PersistentScheme.TORCH_ZIP
    assert stream.loadable and not stream.multi
    assert bytes(stream.data) == members["model/data.pkl"]
    # Zero-copy: the stream is a slice of the buffer at the offset torch reads from.
    assert checkpoint[stream.file_offset : stream.file_offset + len(stream.data)] == bytes(stream.data)
    storage_members = {
        k.removeprefix("model/data/"): v for k, v in members.items() if k.startswith("model/data/")
    }
    assert set(c.storages) == set(storage_members) and len(storage_members) >= 5
    for key, entry in c.storages.items():
        assert bytes(entry.data) == storage_members[key]
        assert entry.file_offset is not None
        assert checkpoint[entry.file_offset : entry.file_offset + len(entry.data)] == storage_members[key]
    assert c.meta["record_prefix"] == "model"
    assert c.meta["byteorder"] == "little"
    assert c.meta["version"] == int(members["model/version"])
    assert "torchscript" not in c.formats
    assert c.meta["loadable"] == {"format": "torch-zip", "member": "model/data.pkl"}


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
def test_every_pickle_protocol(tmp_path: Path, protocol: int) -> None:
    # A protocol-0 data.pkl is text: the whole file then parses as PERSID + opcodes. A plain
    # unpickler stops at that PERSID, so it is no second (raw pickle) view of the file.
    torch.save({"a": torch.arange(5.0), "b": [1, "x"]}, tmp_path / "p.pt", pickle_protocol=protocol)
    c = scan((tmp_path / "p.pt").read_bytes())
    assert c.formats == ["torch-zip"] and c.findings == []
    assert [s.role for s in c.streams] == [StreamRole.TORCH_ZIP_DATA] and list(c.storages) == ["0"]


def test_storages_shared_by_views_are_indexed_once(tmp_path: Path) -> None:
    base = torch.arange(10, dtype=torch.float32)
    torch.save({"a": base, "b": base[3:7], "c": base.view(2, 5)}, tmp_path / "shared.pt")
    c = scan((tmp_path / "shared.pt").read_bytes())
    assert list(c.storages) == ["0"]
    assert bytes(c.storages["0"].data) == base.numpy().tobytes()


def test_detection_ignores_the_name(tmp_path: Path, checkpoint: bytes) -> None:
    results = []
    for name in ("model.bin", "notes.txt", "noextension"):
        path = tmp_path / name
        path.write_bytes(checkpoint)
        c = open_container(memoryview(path.read_bytes()), path=str(path), limits=Limits())
        results.append((c.formats, [(s.member, s.role) for s in c.streams], sorted(c.storages)))
    assert results[0] == results[1] == results[2]
    assert results[0][0] == ["torch-zip"]


def test_record_prefix_is_the_first_entrys_directory(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(1)}, tmp_path / "some.name.pt")
    data = (tmp_path / "some.name.pt").read_bytes()
    ctx = ReadContext(path="x", member=None, file_offset=0, depth=0, limits=Limits(), budget=Budget(1 << 30))
    archive = zipread.read_archive(memoryview(data), ctx)
    assert archive is not None
    assert record_prefix(archive) == b"some.name"
    assert scan(data).streams[0].member == "some.name/data.pkl"


def test_deflated_archive(tmp_path: Path, checkpoint: bytes) -> None:
    """An archive recompressed with deflate: torch's reader inflates members, so do we."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in _members(checkpoint).items():
            zf.writestr(name, data)
    c = scan(out.getvalue())
    [stream] = c.streams
    assert stream.file_offset is None and stream.encoding == ("deflate",)
    assert bytes(stream.data) == _members(checkpoint)["model/data.pkl"]
    assert c.findings == []
    assert set(c.storages) == {k.removeprefix("model/data/") for k in _members(checkpoint) if "/data/" in k}


def test_torchscript_archive_pickles_are_all_scanned(tmp_path: Path) -> None:
    module = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(module, tmp_path / "ts.pt")
    c = scan((tmp_path / "ts.pt").read_bytes())
    assert c.formats[0] == "torchscript"
    others = {s.member for s in c.streams if s.role is StreamRole.TORCH_ZIP_OTHER}
    assert "ts/constants.pkl" in others
    # TorchScript's own pickles are read by its own unpickler: marked so, and no SL307 for them.
    assert all(s.torchscript for s in c.streams)
    assert [f.code for f in c.findings] == ["SL312"]


def test_unexpected_pickle_member(tmp_path: Path, checkpoint: bytes, marker: Path) -> None:
    import pickle

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in _members(checkpoint).items():
            zf.writestr(name, data)
        zf.writestr("model/extra/hook", pickle.dumps(Payload(), protocol=4))
    c = scan(out.getvalue())
    [other] = [s for s in c.streams if s.role is StreamRole.TORCH_ZIP_OTHER]
    assert other.member == "model/extra/hook" and PAYLOAD_TEXT in bytes(other.data)
    assert any(f.code == "SL307" for f in c.findings)
    assert not marker.exists()


def test_zip_that_is_not_a_checkpoint_hands_members_on(tmp_path: Path) -> None:
    import pickle

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("README.md", "# a model\n")
        zf.writestr("nested/weights.pkl", pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    c = scan(out.getvalue())
    assert c.formats == ["zip", "pickle"]
    [stream] = c.streams
    assert stream.member == "nested/weights.pkl" and stream.role is StreamRole.RAW
    assert stream.encoding == ("deflate",)
    assert c.findings == []


def test_checkpoint_inside_a_zip_is_read_by_content(checkpoint: bytes) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("release/model.bin", checkpoint)
    c = scan(out.getvalue())
    assert c.formats == ["zip", "torch-zip"]
    [stream] = c.streams
    assert stream.member == "release/model.bin!model/data.pkl"
    assert bytes(stream.data) == _members(checkpoint)["model/data.pkl"]
    assert stream.file_offset is not None  # stored inside stored: still an absolute offset
    assert out.getvalue()[stream.file_offset : stream.file_offset + len(stream.data)] == bytes(stream.data)


def test_zip_bomb_member_is_stopped(tmp_path: Path) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/data.pkl", b"\x80\x02N." + b"\0" * (4 << 20))
        zf.writestr("model/version", b"3\n")
    c = scan(out.getvalue(), Limits(max_compression_ratio=10))
    assert any(f.code == "SL309" and f.member == "model/data.pkl" for f in c.findings)
    c = scan(out.getvalue(), Limits(max_decompressed_bytes=1 << 20))
    assert any(f.code == "SL203" for f in c.findings)


def test_member_count_limit(checkpoint: bytes) -> None:
    c = scan(checkpoint, Limits(max_zip_members=3))
    assert any(f.code == "SL203" for f in c.findings)


def test_truncated_checkpoint_is_a_finding(checkpoint: bytes) -> None:
    c = scan(checkpoint[: len(checkpoint) // 2])
    assert [f.code for f in c.findings] == ["SL205"]  # no end record: torch cannot open it either
    assert c.streams == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncations_and_flips_never_raise(checkpoint: bytes, data: st.DataObject) -> None:
    buf = bytearray(checkpoint)
    cut = data.draw(st.integers(0, len(buf)), label="cut")
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(1, 255)), max_size=8), label="flips"
    )
    for pos, mask in flips:
        buf[pos] ^= mask
    mutated = bytes(buf[:cut])
    c = scan(mutated)
    # No reader crashed on the damage (a crash would be an SL207 finding, closed but a bug).
    assert not [f for f in c.findings if f.code == "SL207"], c.findings
    # Something was found to scan, or the scan says why not: never a silent nothing.
    assert c.streams or any(f.effect.value != "none" for f in c.findings), (c.formats, c.findings)
    assert sum(s.loadable for s in c.streams) <= 1
