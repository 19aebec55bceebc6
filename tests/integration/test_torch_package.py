"""torch.package archives: PackageImporter imports the modules shipped in the archive in place of
installed ones, so a pickle that names only allowed globals can run the archive's code. safeload
reports every such archive (SL313) and never loads one.

The archives are real PackageExporter output. The malicious one ships a collections.py whose code
creates a marker file; its pickle names only collections.OrderedDict. The `marker` fixture asserts
the marker never appears, and a twin aimed at another path shows that PackageImporter runs it.
"""

from __future__ import annotations

import collections
import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch.package import PackageExporter

import safeload
from safeload.errors import UnsafeModelError
from safeload.model import Verdict

# Allowed by every policy, and the name the archive's own collections.py answers to.
ORDERED = pickle.dumps(collections.OrderedDict(a=1), protocol=2)


def _shadowing_package(path: Path, marker: Path) -> Path:
    source = f"open({str(marker)!r}, 'w').close()\nfrom builtins import dict as OrderedDict\n"
    with PackageExporter(str(path)) as exporter:
        exporter.save_source_string("collections", source)
        exporter.save_binary("model", "state.pkl", ORDERED)
    return path


def _header_offset(path: Path, suffix: str) -> tuple[str, int]:
    with zipfile.ZipFile(path) as zf:
        [info] = [i for i in zf.infolist() if i.filename.endswith(suffix)]
        return info.filename, info.header_offset


def test_a_module_shipped_in_place_of_an_installed_one_is_live_and_refused(
    tmp_path: Path, marker: Path
) -> None:
    live = tmp_path / "LIVE_TWIN_RAN"
    twin = _shadowing_package(tmp_path / "twin.pt", live)
    path = _shadowing_package(tmp_path / "evil.pt", marker)
    # The pickle alone is what any scanner would pass: it names one allowed global.
    assert safeload.scan_bytes(ORDERED, policy="strict").verdict is Verdict.SAFE

    script = f"from torch.package import PackageImporter\nPackageImporter({str(twin)!r}).load_pickle('model', 'state.pkl')\n"
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    assert live.exists()

    report = safeload.scan(path)
    assert report.verdict is Verdict.UNSAFE and report.formats[0] == "torch-package"
    [finding] = [f for f in report.findings if f.code == "SL313"]
    member, offset = _header_offset(path, "/.data/extern_modules")
    assert finding.member == member and finding.file_offset == offset
    assert "(collections)" in finding.message and "PackageImporter" in finding.message
    assert finding.remedy is not None and ".py files" in finding.remedy
    # Its pickle was scanned too, and names nothing the policy refuses: SL313 is why it is unsafe.
    assert any(s.member is not None and s.member.endswith("model/state.pkl") for s in report.streams)
    assert [f.code for f in report.findings] == ["SL313"]

    with pytest.raises(UnsafeModelError, match="torch.package archive") as refused:
        safeload.load(path)
    assert refused.value.member == member


def test_a_package_without_modules_is_still_a_package(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    with PackageExporter(str(path)) as exporter:
        exporter.save_pickle("model", "w.pkl", {"w": torch.ones(2)})
    report = safeload.scan(path)
    assert report.verdict is Verdict.UNSAFE
    [finding] = [f for f in report.findings if f.code == "SL313"]
    assert "ships none" in finding.message


def test_a_checkpoint_that_is_also_a_package_is_reported_as_both(tmp_path: Path) -> None:
    """torch.load reads data.pkl, PackageImporter the rest: each reader's view counts."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    path = tmp_path / "both.pt"
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(path, "w") as zout:
        prefix = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        zout.writestr(f"{prefix}/.data/extern_modules", "")
        zout.writestr(f"{prefix}/collections.py", "OrderedDict = dict\n")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4.0))
    report = safeload.scan(path)
    assert report.formats[0] == "torch-zip" and report.verdict is Verdict.UNSAFE
    assert any(f.code == "SL313" and "(collections)" in f.message for f in report.findings)


def test_an_ordinary_checkpoint_is_no_package(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    report = safeload.scan(tmp_path / "plain.pt")
    assert report.verdict is Verdict.SAFE and report.formats == ("torch-zip",)
