"""The README's main job: the bundled examples scan as documented, and no payload runs."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from safeload.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_examples_scan_as_documented(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "files"
    make = runpy.run_path(str(ROOT / "examples" / "make_examples.py"))
    make["main"](out)
    report_path = tmp_path / "r.json"
    assert main(["scan", str(out), "--format", "json", "-o", str(report_path)]) == 1
    verdicts = {Path(r["path"]).name: r["verdict"] for r in json.loads(report_path.read_text())["reports"]}
    assert verdicts == {
        "benign_config.pkl": "SAFE",
        "benign_weights.npy": "SAFE",
        "benign_model.pt": "SAFE",
        "malicious_checkpoint.bin": "UNSAFE",
        "malicious_raw.pkl": "UNSAFE",
        "malicious_disguised.txt": "UNSAFE",
    }
    assert not (out / make["MARKER"]).exists()
