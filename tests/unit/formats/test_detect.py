"""Detection by content: every matching reader, nesting, limits, polyglots, never an exception."""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace

import joblib
import numpy as np
import pytest

from safeload.formats import Container, ReadResult, StreamRole, detect, open_container
from safeload.limits import Limits
from tests.unit.formats.torchfiles import PAYLOAD_TEXT, Payload, legacy_tar, save_checkpoint


def scan(data: bytes, **limits: int) -> Container:
    return open_container(memoryview(data), path="input", limits=Limits(**limits))


def codes(c: Container) -> list[str]:
    return [f.code for f in c.findings]


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def test_every_reader_follows_the_protocol() -> None:
    labels = [label for label, _ in detect._READERS]
    assert labels[0] == "torch-zip" and labels[-1] == "pickle"
    for _, module in detect._READERS:
        assert isinstance(module.NAME, str) and callable(module.sniff) and callable(module.read)


@pytest.mark.parametrize("kind", ["pickle0", "pickle5", "legacy", "zip"])
def test_names_do_not_matter(kind: str, tmp_path: Path) -> None:
    if kind == "legacy":
        data = save_checkpoint(tmp_path / "m.pt", legacy=True)
    elif kind == "zip":
        data = save_checkpoint(tmp_path / "m.pt")
    else:
        data = pickle.dumps({"w": [1.0, 2.0]}, protocol=int(kind[-1]))
    seen = []
    for name in ("weights.bin", "README.txt", "model", "data.safetensors"):
        (tmp_path / name).write_bytes(data)
        c = open_container(
            memoryview((tmp_path / name).read_bytes()), path=str(tmp_path / name), limits=Limits()
        )
        seen.append((c.formats, [(s.member, s.role, s.loadable) for s in c.streams], codes(c)))
    assert all(s == seen[0] for s in seen)
    assert seen[0][1], "nothing found to scan"


def test_unknown_bytes_are_unsupported() -> None:
    c = scan(b"# Model card\nNothing to see here.\n")
    assert codes(c) == ["SL204"] and c.streams == [] and c.formats == []


def test_empty_input_is_unsupported() -> None:
    assert codes(scan(b"")) == ["SL204"]


def test_ambiguous_top_level_bytes_are_read_as_a_pickle() -> None:
    # Starts with an opcode (c = GLOBAL), fits no format: a loader would try it, so it is walked.
    c = scan(b"cool model, trained for 3 epochs\n")
    assert c.formats == ["pickle"]
    [stream] = c.streams
    assert stream.role is StreamRole.RAW and stream.member is None


def test_gzip_wrapped_pickle(marker: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(marker.parent)
    data = gzip.compress(pickle.dumps(Payload(), protocol=0))
    c = scan(data)
    assert c.formats == ["gzip", "pickle"]
    [stream] = c.streams
    assert PAYLOAD_TEXT in bytes(stream.data)
    assert stream.file_offset is None and stream.encoding == ("gzip",) and stream.loadable
    assert not marker.exists()


def test_compressed_content_is_judged_like_a_file() -> None:
    assert codes(scan(gzip.compress(b"# just text\n"))) == ["SL204"]
    assert scan(gzip.compress(b"cool text\n")).formats == ["gzip", "pickle"]


def test_unrecognized_archive_members_are_not_findings() -> None:
    c = scan(_zip({"README.md": b"# hello\n", "vocab.txt": b"[PAD]\n[CLS]\n"}))
    assert c.formats == ["zip"] and c.streams == [] and codes(c) == ["SL400"]


def test_nesting_limit() -> None:
    inner = pickle.dumps([1, 2], protocol=2)
    data = _zip({"a.zip": _zip({"b.zip": _zip({"c.pkl": inner})})})
    deep = scan(data)
    assert [s.member for s in deep.streams] == ["a.zip!b.zip!c.pkl"]
    shallow = scan(data, max_nesting=1)
    assert shallow.streams == []
    assert any(f.code == "SL203" and f.member == "a.zip!b.zip" for f in shallow.findings)


def test_stream_limit() -> None:
    data = _zip({f"p{i}.pkl": pickle.dumps(i, protocol=2) for i in range(5)})
    c = scan(data, max_streams=3)
    assert len(c.streams) == 3
    assert codes(c).count("SL203") == 1


def test_members_past_the_stream_limit_are_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first max_streams streams are scanned; reading the other members was work thrown away
    (a zip of 199,000 one-opcode members: 9 s of 16). The archive itself is still checked."""
    data = _zip({f"p{i}.pkl": pickle.dumps(i, protocol=2) for i in range(50)})
    read: list[str | None] = []
    read_child = detect._read_child

    def counted(child, view, ctx, state):  # type: ignore[no-untyped-def]
        read.append(child.name)
        return read_child(child, view, ctx, state)

    monkeypatch.setattr(detect, "_read_child", counted)
    c = scan(data, max_streams=3)
    assert [s.member for s in c.streams] == ["p0.pkl", "p1.pkl", "p2.pkl"]
    assert codes(c) == ["SL203"]
    assert read == ["p0.pkl", "p1.pkl", "p2.pkl", "p3.pkl"]


def test_file_size_limit() -> None:
    c = scan(pickle.dumps(list(range(100))), max_file_bytes=10)
    assert codes(c) == ["SL203"] and c.streams == []


def test_a_crashing_reader_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(buf: memoryview, ctx: object) -> ReadResult:
        raise ValueError("reader bug")

    broken = SimpleNamespace(NAME="broken", sniff=lambda buf: True, read=boom)
    monkeypatch.setattr(detect, "_READERS", [("broken", broken), *detect._READERS])
    c = scan(pickle.dumps([1], protocol=2))
    assert "SL207" in codes(c)
    assert c.formats == ["pickle"]  # the other readers still ran


def test_polyglot_views_are_all_scanned(tmp_path: Path) -> None:
    clean = save_checkpoint(tmp_path / "m.pt")
    c = scan(pickle.dumps(Payload(), protocol=2) + clean)
    assert "SL308" in codes(c)
    assert {s.role for s in c.streams} >= {StreamRole.RAW, StreamRole.TORCH_ZIP_DATA}
    loadable = [s for s in c.streams if s.loadable]
    # torch.load does not open it as a zip (no PK at offset 0): it unpickles the front.
    assert len(loadable) == 1 and loadable[0].role is StreamRole.RAW and loadable[0].member is None


def test_joblib_replaces_the_raw_view(tmp_path: Path) -> None:
    joblib.dump({"a": np.arange(10.0)}, tmp_path / "j.joblib")
    c = scan((tmp_path / "j.joblib").read_bytes())
    assert c.formats == ["joblib"]
    # joblib's reading, and pickle.load's (secondary: it breaks at the first array)
    assert [s.role for s in c.streams] == [StreamRole.JOBLIB, StreamRole.RAW]
    assert [s.secondary for s in c.streams] == [False, True]


def test_npz_replaces_the_generic_zip_view(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.arange(3), y=np.ones(2))
    c = scan((tmp_path / "a.npz").read_bytes())
    assert c.formats == ["npz"]
    assert not [f for f in c.findings if f.effect.value != "none"]


def test_legacy_tar_replaces_the_tar_view() -> None:
    c = scan(legacy_tar())
    assert c.formats == ["torch-legacy-tar"]
    assert {s.member for s in c.streams} == {"sys_info", "pickle", "storages", "tensors"}


def test_storages_come_with_the_loadable_stream(tmp_path: Path) -> None:
    data = _zip({"release/model.pt": save_checkpoint(tmp_path / "model.pt")})
    c = scan(data)
    [stream] = c.streams
    assert stream.loadable is False  # a checkpoint inside a zip is not what torch.load opens
    assert c.storages == {} and "loadable" not in c.meta
    direct = scan(save_checkpoint(tmp_path / "model.pt"))
    assert direct.storages and direct.meta["loadable"] == {"format": "torch-zip", "member": "model/data.pkl"}
