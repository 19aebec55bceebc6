"""What a short run imports: a pre-commit hook runs `safeload scan` on every commit, and most of a
one-file scan's time is the interpreter and its imports. Modules a scan of an ordinary file has no
use for are imported only where a file needs them (a tar, a zip that Python's zipfile reads
differently, a spilled decompression, an explanation)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

# Each costs milliseconds of every start (the email package, behind importlib.metadata, about 28).
NOT_FOR_AN_ORDINARY_SCAN = (
    "importlib.metadata",
    "email",
    "importlib.resources",
    "zipfile",
    "tarfile",
    "tempfile",
    "pydantic",
    "numpy",
    "torch",
    "fickling",
    "multiprocessing",
    "concurrent.futures",
    "sqlite3",
    "rich",
)


def test_a_one_file_scan_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    torch.save({"weight": torch.arange(6.0).reshape(2, 3), "step": 3}, checkpoint)
    state = tmp_path / "state.pkl"
    state.write_bytes(pickle.dumps({"step": 3, "lr": [0.1, 0.01]}, protocol=2))
    code = textwrap.dedent(
        f"""
        import sys
        from safeload.cli import main
        codes = [main(["scan", {str(checkpoint)!r}]), main(["scan", "--format", "json", {str(state)!r}])]
        print(codes, sorted(m for m in {NOT_FOR_AN_ORDINARY_SCAN!r} if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.splitlines()[-1] == "[0, 0] []"


def test_an_audit_with_one_job_starts_no_process_machinery(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    torch.save({"weight": torch.ones(3)}, models / "model.pt")
    (models / "state.pkl").write_bytes(pickle.dumps({"step": 3}, protocol=4))
    code = textwrap.dedent(
        f"""
        import sys
        from safeload.cli import main
        code = main(["audit", "--jobs", "1", "--no-progress", "--cache", {str(tmp_path / "cache")!r},
                     "--format", "json", "-o", {str(tmp_path / "report.json")!r}, {str(models)!r}])
        print(code, sorted(m for m in {NOT_FOR_AN_ORDINARY_SCAN!r} if m in sys.modules), "argparse" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    # sqlite3 is the cache's own store: the one heavy module an audit with --cache needs. A plainly
    # written audit is read without argparse, and its JSON report needs none either.
    assert out.stdout.splitlines()[-1] == "0 ['sqlite3'] False"
