"""The wheel ships rules/ and the compiled walker, and works outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import importlib.resources, pathlib, sys
import safeload
from safeload.policy import builtin_policy_names, load_policy
assert "site-packages" in safeload.__file__, safeload.__file__
names = builtin_policy_names()
assert {"floor", "strict", "default"} <= set(names) | {"floor"}, names
files = sorted(p.name for p in importlib.resources.files("safeload.rules").iterdir() if p.name.endswith(".toml"))
assert "strict.toml" in files and "default.toml" in files and "floor.toml" in files, files
for n in names:
    p = load_policy(n)
    assert p.allowed, n
import safeload.analysis.walker as w
from safeload.audit_walk import fast_key_records, key_records, walk
here = [str(pathlib.Path(safeload.__file__).parent)]
fast = fast_key_records(here)
assert fast is None or fast == key_records(walk(here)), "the compiled walk differs"
print("OK", len(names), "compiled" if w.COMPILED else "pure", "walk-compiled" if fast else "walk-python")
"""
PURE = os.environ.get("SAFELOAD_PURE_PYTHON", "").strip() not in ("", "0")


@pytest.mark.slow
def test_wheel_installs_and_loads_every_builtin_policy(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True,
    )
    (wheel,) = dist.glob("safeload-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    compiled = [n for n in names if n.startswith("safeload/analysis/_walker_c.") and n.endswith(".so")]
    assert len(compiled) == (0 if PURE else 1), compiled
    assert not [n for n in names if n.endswith("_walker_c.py")], "the generated source stays in build/"
    # The replay's compiled walk (Linux only): its binary, not its source.
    treewalk = [n for n in names if n.startswith("safeload/audit_treewalk_c.") and n.endswith(".so")]
    assert len(treewalk) == (0 if PURE or not sys.platform.startswith("linux") else 1), treewalk
    assert not [n for n in names if n.endswith((".pyx", ".c"))]
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True)
    out = subprocess.run(
        [str(py), "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "OK"
    # Installed, the compiled walker is current with the walker.py beside it, so it is the one used.
    assert out.stdout.split()[-2] == ("pure" if PURE else "compiled")
    linux = sys.platform.startswith("linux")
    assert out.stdout.split()[-1] == ("walk-compiled" if linux and not PURE else "walk-python")
    cli = subprocess.run([str(env_dir / "bin" / "safeload"), "policy", "list"], capture_output=True, text=True)
    assert cli.returncode == 0 and "strict" in cli.stdout
