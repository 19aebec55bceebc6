"""torch's legacy formats: the five-pickle sequence with its storage region, and the old tar."""

from __future__ import annotations

import io
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeload
from safeload.formats import Container, PersistentScheme, StreamRole, open_container
from safeload.formats.legacy import element_size
from safeload.limits import Limits
from tests.unit.formats.torchfiles import MARKER_NAME, PAYLOAD_TEXT, Payload, legacy_tar, save_checkpoint

SEQUENCE = [
    StreamRole.LEGACY_MAGIC,
    StreamRole.LEGACY_PROTOCOL,
    StreamRole.LEGACY_SYS_INFO,
    StreamRole.LEGACY_OBJECT,
    StreamRole.LEGACY_STORAGE_KEYS,
]


def scan(data: bytes) -> Container:
    return open_container(memoryview(data), path="legacy", limits=Limits())


def pickle_ends(data: bytes, count: int) -> list[int]:
    """Where each of the first ``count`` pickles ends, found with pickletools (independent of safeload)."""
    f = io.BytesIO(data)
    ends = []
    for _ in range(count):
        for op, _, _ in pickletools.genops(f):
            if op.name == "STOP":
                break
        ends.append(f.tell())
    return ends


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return save_checkpoint(tmp_path_factory.mktemp("legacy") / "old.pt", legacy=True)


def _expected_storages() -> list[bytes]:
    """The storages save_checkpoint's object holds, as raw bytes."""
    return sorted(
        [
            torch.arange(12, dtype=torch.float32).numpy().tobytes(),
            torch.ones(3, dtype=torch.int16).numpy().tobytes(),
            torch.tensor([1, 2, 3], dtype=torch.int64).numpy().tobytes(),
            torch.tensor([True, False]).numpy().tobytes(),
            torch.zeros(2, dtype=torch.float64).numpy().tobytes(),
            torch.full((4,), 0.5, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes(),
        ]
    )


def test_sequence_streams(legacy: bytes) -> None:
    c = scan(legacy)
    assert c.formats == ["torch-legacy"]  # the raw-pickle view of the same bytes is replaced
    assert [s.role for s in c.streams] == SEQUENCE
    ends = pickle_ends(legacy, 5)
    starts = [0, *ends[:-1]]
    for stream, start, end in zip(c.streams, starts, ends, strict=True):
        assert stream.file_offset == start and bytes(stream.data) == legacy[start:end]
        assert not stream.multi
    obj = c.streams[3]
    assert obj.loadable and obj.persistent_scheme is PersistentScheme.TORCH_LEGACY
    assert [s.loadable for s in c.streams] == [False, False, False, True, False]
    assert all(s.persistent_scheme is PersistentScheme.NONE for s in c.streams if s is not obj)


def test_storage_region_is_indexed(legacy: bytes) -> None:
    c = scan(legacy)
    assert c.findings == []
    keys_end = pickle_ends(legacy, 5)[-1]
    assert sorted(bytes(e.data) for e in c.storages.values()) == _expected_storages()
    layout = c.meta["storages"]
    assert isinstance(layout, dict) and set(layout) == set(c.storages)
    for key, entry in c.storages.items():
        assert entry.file_offset is not None and entry.file_offset >= keys_end
        assert legacy[entry.file_offset : entry.file_offset + len(entry.data)] == bytes(entry.data)
        info = layout[key]
        assert info["numel"] * info["element_size"] == len(entry.data)  # type: ignore[index,operator]
    # The last storage ends the file.
    assert max(e.file_offset + len(e.data) for e in c.storages.values()) == len(legacy)  # type: ignore[operator]


def test_element_sizes_follow_torch() -> None:
    for name, dtype in [
        ("FloatStorage", torch.float32),
        ("HalfStorage", torch.float16),
        ("LongStorage", torch.int64),
        ("BoolStorage", torch.bool),
        ("ComplexDoubleStorage", torch.complex128),
        ("BFloat16Storage", torch.bfloat16),
    ]:
        assert element_size(f"torch.{name}") == torch._utils._element_size(dtype)
    assert element_size("torch.cuda.FloatStorage") == 4  # torch maps by name
    assert element_size("torch.NoSuchStorage") is None


def _with_sys_info(legacy: bytes, replacement: bytes) -> bytes:
    ends = pickle_ends(legacy, 3)
    return legacy[: ends[1]] + replacement + legacy[ends[2] :]


def test_payload_in_sys_info_is_a_stream(
    legacy: bytes, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(marker.parent)
    data = _with_sys_info(legacy, pickle.dumps(Payload(), protocol=2))
    c = scan(data)
    [sys_info] = [s for s in c.streams if s.role is StreamRole.LEGACY_SYS_INFO]
    assert PAYLOAD_TEXT in bytes(sys_info.data)
    assert [s.role for s in c.streams] == SEQUENCE
    assert not marker.exists()


@pytest.mark.slow
def test_payload_in_sys_info_runs_under_torch_load(legacy: bytes, tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(_with_sys_info(legacy, pickle.dumps(Payload(), protocol=2)))
    code = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, capture_output=True, timeout=300)
    assert (tmp_path / MARKER_NAME).exists()


def test_broken_object_pickle(legacy: bytes) -> None:
    ends = pickle_ends(legacy, 4)
    cut = (ends[2] + ends[3]) // 2
    c = scan(legacy[:cut])
    assert [s.role for s in c.streams] == SEQUENCE[:4]
    last = c.streams[-1]
    assert last.multi and bytes(last.data) == legacy[ends[2] : cut]
    assert [f.code for f in c.findings] == ["SL205"]


def test_bytes_after_the_storages(legacy: bytes) -> None:
    c = scan(legacy + b"\x80\x02N.")
    assert [f.code for f in c.findings] == ["SL201"]
    assert c.findings[0].offset == len(legacy)


def test_a_second_checkpoint_after_the_storages_is_scanned_as_its_own(legacy: bytes, tmp_path: Path) -> None:
    # torch.save called twice on one file handle: torch.load reads the first, a second torch.load
    # on the same handle the next one.
    second = save_checkpoint(tmp_path / "second.pt", legacy=True)
    c = scan(legacy + second)
    assert [(f.code, f.offset) for f in c.findings] == [("SL202", len(legacy))]
    assert [s.role for s in c.streams] == SEQUENCE + SEQUENCE
    assert [s.member for s in c.streams[5:]] == ["<appended 2>"] * 5
    assert [s.file_offset for s in c.streams[5:]] == [len(legacy) + e for e in [0, *pickle_ends(second, 4)]]
    assert sorted(bytes(e.data) for e in c.storages.values()) == _expected_storages()  # the first's


def test_a_payload_in_a_second_checkpoint_is_caught(
    legacy: bytes, tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(marker.parent)
    data = legacy + save_checkpoint(tmp_path / "evil.pt", payload=True, legacy=True)
    report = safeload.scan_bytes(data)
    assert report.verdict is safeload.Verdict.UNSAFE
    assert {(f.global_name, f.member) for f in report.findings if f.code == "SL100"} == {
        ("builtins.exec", "<appended 2>")
    }
    assert not marker.exists()


def test_checkpoints_appended_many_times_are_siblings(
    legacy: bytes, tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many times torch.save appended to the file, each checkpoint is read at the same
    depth (no nesting limit is hit) and a payload in the last is named where it sits."""
    monkeypatch.chdir(marker.parent)
    data = legacy * 5 + save_checkpoint(tmp_path / "evil.pt", payload=True, legacy=True)
    report = safeload.scan_bytes(data)
    assert report.verdict is safeload.Verdict.UNSAFE
    assert [f.code for f in report.findings if f.code != "SL100"] == ["SL202"]
    assert {(f.global_name, f.member) for f in report.findings if f.code == "SL100"} == {
        ("builtins.exec", "<appended 6>")
    }
    assert safeload.scan_bytes(legacy * 6).verdict is safeload.Verdict.SAFE
    assert not marker.exists()


@pytest.mark.slow
def test_a_payload_in_a_second_checkpoint_runs_under_a_second_torch_load(
    legacy: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "two.pt"
    path.write_bytes(legacy + save_checkpoint(tmp_path / "evil.pt", payload=True, legacy=True))
    code = "import sys, torch\nf = open(sys.argv[1], 'rb')\ntorch.load(f, weights_only=False)\ntorch.load(f, weights_only=False)"
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, capture_output=True, timeout=300)
    assert (tmp_path / MARKER_NAME).exists()


def test_storage_count_past_the_end(legacy: bytes) -> None:
    c = scan(legacy[:-3])
    assert [f.code for f in c.findings] == ["SL205"]
    assert len(c.storages) < 6


def test_a_pickle_that_only_looks_like_the_sequence_is_still_scanned(marker: Path) -> None:
    # The magic number computed by a call: torch.load runs it; it is no canonical magic pickle,
    # so the file is read as a raw pickle sequence (every pickle still walked).
    data = pickle.dumps(Payload(), protocol=2) + pickle.dumps(1001, protocol=2)
    c = scan(data)
    assert c.formats == ["pickle"]
    assert PAYLOAD_TEXT in bytes(c.streams[0].data) and c.streams[0].multi


# -- tar -------------------------------------------------------------------------------------------


def test_legacy_tar_every_pickle_is_a_stream() -> None:
    data = legacy_tar()
    c = scan(data)
    assert c.formats == ["torch-legacy-tar"]  # the generic tar view is replaced
    assert all(s.role is StreamRole.LEGACY_TAR and not s.loadable for s in c.streams)
    by_member: dict[str | None, int] = {}
    for s in c.streams:
        by_member[s.member] = by_member.get(s.member, 0) + 1
        assert data[s.file_offset : s.file_offset + len(s.data)] == bytes(s.data)  # type: ignore[operator]
    # storages: count, one description, views; tensors: count, one description.
    assert by_member == {"sys_info": 1, "pickle": 1, "storages": 3, "tensors": 2}
    assert c.findings == []
    assert "loadable" not in c.meta  # safeload does not load this format
    [obj] = [s for s in c.streams if s.member == "pickle"]
    assert obj.persistent_scheme is PersistentScheme.TORCH_LEGACY_TAR


@pytest.mark.parametrize("member", ["storages", "tensors", "pickle", "sys_info"])
def test_legacy_tar_payloads_are_found(member: str, marker: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(marker.parent)
    c = scan(legacy_tar(payload_in=member))
    assert any(s.member == member and PAYLOAD_TEXT in bytes(s.data) for s in c.streams)
    assert not marker.exists()


@pytest.mark.slow
def test_legacy_tar_is_loaded_by_torch(tmp_path: Path) -> None:
    """The tar is real enough that torch.load reads it and runs payloads in its pickles."""
    paths = []
    for member in ("storages", "tensors", "pickle"):
        (tmp_path / member).mkdir()
        path = tmp_path / f"{member}.tar"
        path.write_bytes(legacy_tar(payload_in=member))
        paths += [str(path), str(tmp_path / member)]
    clean = tmp_path / "clean.tar"
    clean.write_bytes(legacy_tar())
    code = (
        "import os, sys, torch\n"
        "print(torch.load(sys.argv[1], weights_only=False)['t'].tolist())\n"
        "for path, d in zip(sys.argv[2::2], sys.argv[3::2]):\n"
        "    os.chdir(d)\n"
        "    try: torch.load(path, weights_only=False)\n"
        "    except Exception: pass\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(clean), *paths], capture_output=True, text=True, timeout=300
    )
    assert proc.stdout.strip() == "[0.0, 1.0, 2.0, 3.0]", proc.stderr
    for member in ("storages", "tensors", "pickle"):
        assert (tmp_path / member / MARKER_NAME).exists(), member


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_legacy_files_never_crash_a_reader(legacy: bytes, data: st.DataObject) -> None:
    source = data.draw(st.sampled_from([legacy, legacy_tar()]), label="source")
    buf = bytearray(source)
    for pos, mask in data.draw(
        st.lists(st.tuples(st.integers(0, len(buf) - 1), st.integers(1, 255)), max_size=6)
    ):
        buf[pos] ^= mask
    c = scan(bytes(buf[: data.draw(st.integers(0, len(buf)), label="cut")]))
    assert not [f for f in c.findings if f.code == "SL207"], c.findings
    assert c.streams or any(f.effect.value != "none" for f in c.findings)


def test_the_readers_walks_are_the_walks_of_the_streams(legacy: bytes, tmp_path: Path) -> None:
    # The reader walks each pickle to find its end; the scan reuses that walk. It must be what a
    # walk of exactly the stream's bytes gives, for a clean file and for one with a payload.
    from safeload.analysis.walker import walk

    evil = save_checkpoint(tmp_path / "evil.pt", payload=True, legacy=True)
    tars = [legacy_tar(), legacy_tar(payload_in="storages"), legacy_tar(payload_in="tensors")]
    for data in (legacy, evil, *tars):
        c = open_container(memoryview(data), path="x", limits=Limits())
        walked = [s for s in c.streams if s.walked is not None]
        # every pickle of the sequence; the pickles inside the tar's storages and tensors members
        if data in (legacy, evil):
            assert len(walked) == len(c.streams) == 5
        else:
            assert {s.member for s in walked} == {"storages", "tensors"}
        for s in walked:
            assert s.walked is not None
            fresh = walk(s.data, limits=Limits(), multi=False, fold_values=False)
            assert [(i.qualname, i.offset, i.uses) for i in s.walked.imports] == [
                (i.qualname, i.offset, i.uses) for i in fresh.imports
            ]
            assert s.walked.anomalies == fresh.anomalies
            assert (s.walked.complete, s.walked.opcodes, s.walked.end) == (
                fresh.complete,
                fresh.opcodes,
                fresh.end,
            )
            assert [p.offset for p in s.walked.persistent_ids] == [p.offset for p in fresh.persistent_ids]
