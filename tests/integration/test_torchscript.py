"""TorchScript archives (torch.jit.save): torch.load hands them to torch.jit.load, which compiles
their program and runs it. safeload reports that as one finding (SL312), never loads one, and judges
any name in their pickles that TorchScript's own unpickler does not resolve as it does everywhere.

The archives are real torch.jit.save output. The malicious one's program creates a marker file as
it loads (torch.from_file with shared=True creates the file it maps); the `marker` fixture asserts
it never appears, and a twin aimed at another path shows that torch.load really runs it.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import safeload
from safeload.cli import EXIT_UNSAFE, main
from safeload.errors import UnsafeModelError, UnsupportedFormatError
from safeload.model import Verdict
from tests import pickle_builder as pb


class Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 2


class WritesAtLoad(torch.nn.Module):
    """Its __setstate__, which torch.jit.load runs, maps (and so creates) the file at ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.w = torch.zeros(1)
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        made = torch.from_file(state[1], shared=True, size=1, dtype=torch.uint8)
        self.w = state[0] + made.float()
        self.path = state[1]
        self.training = state[2]


# A library that falls back to an unsafe load when the safe one refuses (TorchScript makes
# torch.load(weights_only=True) raise a RuntimeError).
LIBRARY_WITH_FALLBACK = """
import torch
def library_load(path):
    try:
        return torch.load(path, weights_only=True)
    except Exception:
        return torch.load(path, weights_only=False)
"""


def _scripted(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def _rewritten(source: Path, target: Path, replace: dict[str, bytes], rename: dict[str, str]) -> Path:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = replace.get(info.filename, zin.read(info.filename))
            zout.writestr(rename.get(info.filename, info.filename), data)
    return target


def _header_offset(path: Path, member: str) -> int:
    with zipfile.ZipFile(path) as zf:
        return zf.getinfo(member).header_offset


def _torch_calls_it_torchscript(path: Path) -> bool:
    from torch.serialization import _is_torchscript_zip

    return bool(_is_torchscript_zip(torch._C.PyTorchFileReader(str(path))))


def test_a_benign_archive_is_one_program_finding(tmp_path: Path) -> None:
    path = _scripted(Affine(), tmp_path / "affine.pt")
    assert _torch_calls_it_torchscript(path)
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.load(path, weights_only=True)

    report = safeload.scan(path)
    assert report.formats == ("torchscript",)
    assert report.verdict is Verdict.UNSAFE
    # No policy finding for the program's classes or TorchScript's list helpers, no SL307 for the
    # pickles TorchScript writes itself: the program is what matters, and one finding says so.
    [finding] = report.findings
    assert finding.code == "SL312" and finding.member == "affine/constants.pkl"
    assert finding.file_offset == _header_offset(path, "affine/constants.pkl")
    assert "torch.jit.load" in finding.message and "affine/code/" in finding.message
    assert finding.remedy is not None and "state_dict" in finding.remedy
    # ... and still every pickle in it was walked, its names in the inventory.
    members = {s.member for s in report.streams}
    assert {"affine/data.pkl", "affine/constants.pkl"} <= members
    assert any(m is not None and m.endswith(".debug_pkl") for m in members)
    rows = [g for s in report.streams for g in s.globals]
    assert any(g.name.startswith("__torch__.") and not g.allowed for g in rows)
    assert any(g.name == "torch.jit._pickle.build_intlist" and not g.allowed for g in rows)


def test_a_lite_interpreter_archive_is_a_program_too(tmp_path: Path) -> None:
    path = tmp_path / "affine.ptl"
    torch.jit.script(Affine())._save_for_lite_interpreter(str(path))
    assert _torch_calls_it_torchscript(path)
    report = safeload.scan(path)
    assert report.formats == ("torchscript",)
    assert [f.code for f in report.findings] == ["SL312"]
    assert "affine/bytecode.pkl" in {s.member for s in report.streams}


def test_other_names_and_other_pickles_are_judged_as_everywhere(tmp_path: Path, marker: Path) -> None:
    payload = pb.exec_payload(marker, protocol=2)
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(Affine()), str(path), _extra_files={"hook.pkl": payload})
    # constants.pkl swapped for a payload: TorchScript's unpickler would refuse builtins.exec, a
    # Python reader would run it, and no TorchScript writer writes it.
    planted = _rewritten(path, tmp_path / "planted.pt", {"ts/constants.pkl": payload}, {})
    live = tmp_path / "LIVE_TWIN_RAN"  # the same payload, aimed elsewhere, is live for pickle.loads
    pb.real_load_in_subprocess(pb.exec_payload(live, protocol=2), tmp_path)
    assert live.exists()
    for report, member in ((safeload.scan(path), "ts/extra/hook.pkl"), (safeload.scan(planted), None)):
        assert report.formats == ("torchscript",) and report.verdict is Verdict.UNSAFE
        floor = [f for f in report.findings if f.code == "SL100"]
        assert floor and all(f.global_name == "builtins.exec" for f in floor)
        if member is not None:
            assert {f.member for f in floor} == {member}
            assert any(f.code == "SL307" and f.member == member for f in report.findings)
        else:
            assert "ts/constants.pkl" in {f.member for f in floor}


def test_constants_pkl_in_another_case_is_no_torchscript(tmp_path: Path) -> None:
    """torch looks for the exact record name: CONSTANTS.PKL leaves the archive to torch's
    ordinary unpickler, so it is an ordinary torch archive, its extra pickle judged as such."""
    path = _scripted(Affine(), tmp_path / "ts.pt")
    renamed = _rewritten(path, tmp_path / "renamed.pt", {}, {"ts/constants.pkl": "ts/CONSTANTS.PKL"})
    assert not _torch_calls_it_torchscript(renamed)
    report = safeload.scan(renamed)
    assert report.formats == ("torch-zip",)
    codes = {f.code for f in report.findings}
    assert "SL312" not in codes and "SL101" in codes  # data.pkl names the program's classes
    assert any(f.code == "SL307" and f.member == "ts/CONSTANTS.PKL" for f in report.findings)


def test_a_program_that_writes_as_it_loads_is_live_and_refused(
    tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = tmp_path / "LIVE_TWIN_RAN"
    twin = _scripted(WritesAtLoad(str(live)), tmp_path / "twin.pt")
    path = _scripted(WritesAtLoad(str(marker)), tmp_path / "evil.pt")
    assert not live.exists() and not marker.exists()

    # Live: the library's fallback runs the program (a fresh interpreter, no safeload in it).
    script = LIBRARY_WITH_FALLBACK + f"\nlibrary_load({str(twin)!r})\n"
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    assert live.exists()

    with pytest.raises(UnsafeModelError) as refused:
        safeload.load(path)
    error = refused.value
    assert error.member == "evil/constants.pkl"
    assert error.file_offset == _header_offset(path, "evil/constants.pkl")
    assert "TorchScript" in str(error) and error.remedy is not None and "torch.jit.load" in error.remedy
    assert f"byte {error.file_offset} of the file" in str(error)

    assert main(["scan", str(path)]) == EXIT_UNSAFE
    assert "SL312 torchscript-program" in capsys.readouterr().out

    library: dict[str, object] = {}
    exec(compile(LIBRARY_WITH_FALLBACK, "library_with_fallback", "exec"), library)  # noqa: S102
    with safeload.guard_torch_load(), pytest.raises(UnsafeModelError, match="TorchScript"):
        library["library_load"](str(path))  # type: ignore[operator]


def test_a_waived_program_still_does_not_load(tmp_path: Path) -> None:
    path = _scripted(Affine(), tmp_path / "affine.pt")
    digest = safeload.scan(path, sha256=True).sha256
    assert digest is not None
    policy = tmp_path / "reviewed.toml"
    policy.write_text(
        textwrap.dedent(
            f"""\
            schema_version = 1
            name = "reviewed"
            extends = ["default"]
            [[waive]]
            sha256 = "{digest}"
            code = "SL312"
            reason = "program read and approved for the registry"
            expires = 2099-01-01
            """
        )
    )
    report = safeload.scan(path, policy=str(policy))
    assert report.verdict is Verdict.SAFE and [f.waived for f in report.findings] == [True]
    with pytest.raises(UnsupportedFormatError, match="TorchScript archive is a program"):
        safeload.load(path, policy=str(policy))


def test_a_state_dict_saved_from_a_scripted_module_is_an_ordinary_checkpoint(tmp_path: Path) -> None:
    """What the remedy asks for loads, bit for bit as torch.load(weights_only=True)."""
    scripted = torch.jit.script(Affine())
    buf = io.BytesIO()
    torch.save(scripted.state_dict(), buf)
    (tmp_path / "sd.pt").write_bytes(buf.getvalue())
    assert safeload.scan(tmp_path / "sd.pt").verdict is Verdict.SAFE
    got = safeload.load(tmp_path / "sd.pt")
    want = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]) and got[key].dtype == want[key].dtype
