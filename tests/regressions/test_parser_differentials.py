"""THREATS.md §3: the scanner must read the bytes the way the loader does, or say it cannot."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

import safeload
from safeload.analysis.replay import differential, replay_imports
from safeload.analysis.walker import walk
from safeload.errors import SafeloadError
from safeload.model import Verdict
from tests import pickle_builder as pb


def scan(data: bytes) -> tuple[Verdict, set[str], set[str | None]]:
    report = safeload.scan_bytes(data, policy="default")
    assert report.verdict is not Verdict.SAFE
    with pytest.raises(SafeloadError):
        safeload.loads(data, policy="default")
    return report.verdict, {f.code for f in report.findings}, {f.global_name for f in report.findings}


# -- a payload followed by a broken stream (nullifAI) ----------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [b"", b"\xff", b"\x00" * 100, b"X\xff\xff\xff\x7f", b"(" * 3 + b"u", b"h\x63"],
    ids=["truncated", "invalid-opcode", "zero-padding", "huge-length", "bad-mark", "missing-memo"],
)
def test_payload_before_broken_tail(tail: bytes, marker: Path, tmp_path: Path) -> None:
    def build(m: Path) -> bytes:
        return pb.exec_payload(m, protocol=2)[:-1] + pb.POP + tail  # no STOP: the stream breaks

    verdict, codes, names = scan(build(marker))
    assert verdict is Verdict.UNSAFE and "SL100" in codes and "builtins.exec" in names
    assert "SL200" in codes
    proof = tmp_path / "LIVE"
    failed = pb.real_load_in_subprocess(build(proof), tmp_path)
    assert failed.returncode != 0 and proof.exists()  # the loader ran the payload, then failed


# -- several pickles in one file -------------------------------------------------------------------


def test_payload_in_a_later_pickle(marker: Path, tmp_path: Path) -> None:
    def build(m: Path) -> bytes:
        return pickle.dumps({"weights": [1.0, 2.0]}, protocol=4) + pickle.dumps([3]) + pb.exec_payload(m, 4)

    verdict, codes, names = scan(build(marker))
    assert verdict is Verdict.UNSAFE and "builtins.exec" in names and "SL202" in codes
    proof = tmp_path / "LIVE"
    pb.real_load_in_subprocess(build(proof), tmp_path, mode="all")
    assert proof.exists()


def test_garbage_after_the_pickle_is_not_a_pass() -> None:
    data = pickle.dumps({"a": 1}) + b"\n\x00trailing"
    verdict, codes, _ = scan(data)
    assert verdict is Verdict.UNSCANNABLE and "SL201" in codes


def test_padding_longer_than_a_resync_window(marker: Path) -> None:
    data = pickle.dumps({"a": 1}) + b"\x00" * (1 << 20) + pb.exec_payload(marker, 2)
    verdict, codes, _ = scan(data)
    assert verdict is not Verdict.SAFE and "SL201" in codes


# -- FRAME lies ------------------------------------------------------------------------------------


def lying_frame_exec(marker: Path, pad: int = 0) -> bytes:
    body = b"N0" * pad + b"cbui"
    call = pb.tup(pb.unicode(pb.marker_code(marker))) + pb.REDUCE + pb.STOP
    return b"\x80\x04" + pb.frame(body, len(body)) + b"ltins\nexec\n" + call


@pytest.mark.parametrize("pad", [0, 4600])
def test_lying_frame(pad: int, marker: Path, tmp_path: Path) -> None:
    verdict, codes, names = scan(lying_frame_exec(marker, pad))
    assert verdict is Verdict.UNSAFE
    assert {"SL107", "SL105", "SL100"} <= codes and "builtins.exec" in names
    # Live through one reader, harmless through another: the same bytes, two meanings.
    proof = tmp_path / "LIVE"
    data = lying_frame_exec(proof, pad)
    through_bytesio = pb.real_load_in_subprocess(data, tmp_path, mode="bytesio")
    assert b"ltins" in through_bytesio.stderr and not proof.exists()
    pb.real_load_in_subprocess(data, tmp_path, mode="loads")
    assert proof.exists()


def test_frame_inside_a_frame_and_past_stop(marker: Path) -> None:
    payload = pb.exec_payload(marker, 4)[2:]
    inner = pb.frame(payload, len(payload))
    nested = b"\x80\x04" + pb.frame(inner, len(inner))
    assert "SL107" in scan(nested)[1]
    first = b"N."
    spill = b"\x80\x04" + pb.frame(first + payload[:3], len(first) + 3) + payload[3:]
    verdict, codes, _ = scan(spill)
    assert verdict is Verdict.UNSAFE and "SL107" in codes


def test_frame_length_beyond_the_data(marker: Path) -> None:
    payload = pb.exec_payload(marker, 4)[2:]
    data = b"\x80\x04" + pb.frame(payload, len(payload) + 10_000)
    verdict, codes, _ = scan(data)
    assert verdict is Verdict.UNSAFE and {"SL107", "SL200"} <= codes


# -- pickle.py (joblib's unpickler) at the end of the data -------------------------------------------


def _frame_cut_short(marker: Path) -> bytes:
    body = pb.exec_payload(marker, 4)[2:]
    return b"\x80\x04" + pb.frame(body, len(body) + 50)


def _inst_line_without_newline(marker: Path) -> bytes:
    # INST's name line lacks its newline: pickle.py takes "exec" (dropping the last byte) and calls it
    return pb.MARK + pb.unicode(pb.marker_code(marker)) + b"ibuiltins\nexecX"


@pytest.mark.parametrize("build", [_frame_cut_short, _inst_line_without_newline], ids=["frame", "inst"])
def test_joblib_load_of_a_plain_pickle_runs_what_the_c_unpickler_refuses(
    build: Callable[[Path], bytes], marker: Path, tmp_path: Path
) -> None:
    """joblib.load reads any file with pickle.py, which reads on where the C unpickler stops: a
    FRAME longer than what is left is taken as the rest, and a last line without its newline as a
    line. The scan reads a plain pickle that breaks that way the pickle.py way as well."""
    verdict, codes, names = scan(build(marker))
    assert verdict is Verdict.UNSAFE and "SL100" in codes and "builtins.exec" in names
    report = safeload.scan_bytes(build(marker), policy="default")
    assert [s.secondary for s in report.streams] == [False, True]
    assert report.streams[1].globals[0].name == "builtins.exec"
    assert not marker.exists()
    proof = tmp_path / "LIVE"
    refused = pb.real_load_in_subprocess(build(proof), tmp_path, mode="file")
    assert b"truncated" in refused.stderr and not proof.exists()  # the C unpickler stops
    pytest.importorskip("joblib")
    pb.real_load_in_subprocess(build(proof), tmp_path, mode="joblib")
    assert proof.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_plain_pickle_cut_short_is_reported_once_when_pickle_py_imports_nothing_more(protocol: int) -> None:
    cut = pickle.dumps({"w": [1.0, 2.0]}, protocol=protocol)[:-3]
    report = safeload.scan_bytes(cut, policy="default")
    assert report.verdict is not Verdict.SAFE and len(report.streams) == 1


def test_pure_python_unpickler_imports_a_cut_global() -> None:
    """pickle.py reads a GLOBAL line without its newline at EOF (dropping its last byte) and still
    imports it; the C unpickler refuses. joblib reads with pickle.py, so joblib streams model it."""
    missing = b"safeload_no_such_module_for_testX"
    with pytest.raises(ModuleNotFoundError) as err:
        pickle._loads(b"\x80\x02c" + missing)  # type: ignore[attr-defined]
    assert err.value.name == missing[:-1].decode()
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(b"\x80\x02c" + missing)  # noqa: S301 - the C unpickler imports nothing here

    joblib = pytest.importorskip("joblib")
    np = pytest.importorskip("numpy")
    buf = io.BytesIO()
    joblib.dump({"w": np.arange(3.0), "k": 1}, buf)
    stream = buf.getvalue()[:-1]  # drop STOP
    data = stream + b"cos\nsystem!"
    result = walk(data, multi=False, joblib_arrays=True)
    assert ("os", "system") in [(i.module, i.name) for i in result.imports]
    replays = replay_imports(data, multi=False, joblib_arrays=True, walk=result)
    assert replays.replays[0].imports[-1] == ("os", "system")
    assert differential(result, replays) == []
    assert walk(data, multi=False).imports == walk(stream, multi=False).imports  # C: nothing


# -- a member that imports before it breaks -------------------------------------------------------


@pytest.mark.parametrize("container", ["tar", "zip"])
def test_an_archive_member_that_imports_a_module_for_a_name_it_lacks(
    container: str, marker: Path, tmp_path: Path
) -> None:
    """GLOBAL of a module and a name no module has: find_class imports the module (running its
    code) before the name fails. Detection took such a member for no pickle, so the archive was
    SAFE; the whole file alone was UNSAFE."""
    import subprocess
    import sys
    import tarfile
    import zipfile

    member = b"cmarker_module\n!no such name\n."
    live = tmp_path / "live"
    live.mkdir()
    (live / "marker_module.py").write_text(f"open({str(live / 'RAN')!r}, 'w').close()\n")
    (live / "model.pkl").write_bytes(member)
    subprocess.run(
        [sys.executable, "-c", "import pickle; pickle.load(open('model.pkl', 'rb'))"],
        cwd=live,
        capture_output=True,
        check=False,
    )
    assert (live / "RAN").exists()  # imported, then failed on the name

    path = tmp_path / f"model.{container}"
    if container == "tar":
        with tarfile.open(path, "w") as t:
            info = tarfile.TarInfo("model.pkl")
            info.size = len(member)
            t.addfile(info, io.BytesIO(member))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("model.pkl", member)
    report = safeload.scan(path)
    assert report.verdict is Verdict.UNSAFE
    assert any(g.startswith("marker_module.") for g in report.globals)
    assert not marker.exists()
