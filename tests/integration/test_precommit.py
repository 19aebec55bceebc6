"""A real `pre-commit` run of the hook this repository publishes (.pre-commit-hooks.yaml).

The project tree is copied into a temporary git repository (pre-commit needs a repo and a rev),
and a second temporary repository uses it as its hook source. pre-commit builds the hook's own
virtualenv and pip-installs safeload into it, exactly as a user's machine would.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pickle_builder import exec_payload

ROOT = Path(__file__).resolve().parents[2]
PRE_COMMIT = Path(sys.executable).with_name("pre-commit")


def _git(cwd: Path, *args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=check)


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"),
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.invalid",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.invalid",
            "GIT_CONFIG_GLOBAL": str(tmp_path / "gitconfig"),
            "GIT_CONFIG_NOSYSTEM": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            # pre-commit installs the hook from source: skip compiling the walker (a minute of
            # CI); the wheel test checks the compiled build, this one the hook.
            "SAFELOAD_PURE_PYTHON": "1",
        }
    )
    # the hook must run from its own environment, not this test's
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join([str(PRE_COMMIT.parent), env.get("PATH", "")])
    return env


def _hook_repo(tmp_path: Path, env: dict[str, str]) -> tuple[Path, str]:
    """The working tree as it is now (tracked and new files, not ignored ones), committed."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    repo = tmp_path / "hook-repo"
    for raw in filter(None, listed):
        rel = os.fsdecode(raw)
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the working tree
        dst = repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    _git(repo.parent, "init", "-q", repo.name, env=env)
    _git(repo, "add", "-A", env=env)
    _git(repo, "commit", "-q", "-m", "snapshot", env=env)
    rev = _git(repo, "rev-parse", "HEAD", env=env).stdout.strip()
    return repo, rev


@pytest.mark.slow
def test_hook_lets_benign_models_in_and_keeps_malicious_ones_out(tmp_path: Path, marker: Path) -> None:
    env = _env(tmp_path)
    hook_repo, rev = _hook_repo(tmp_path, env)

    work = tmp_path / "models"
    work.mkdir()
    _git(work, "init", "-q", env=env)
    (work / ".pre-commit-config.yaml").write_text(
        f"repos:\n- repo: {hook_repo}\n  rev: {rev}\n  hooks:\n  - id: safeload\n", encoding="utf-8"
    )
    installed = subprocess.run(
        [str(PRE_COMMIT), "install"], cwd=work, env=env, capture_output=True, text=True, check=False
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    # benign: real torch and pickle output, a file the hook's pattern does not select, and one it
    # selects by name that is no model format (a sentencepiece tokenizer is protobuf): skipped
    torch.save({"w": torch.zeros(3, 2), "step": 7}, work / "good.pt")
    (work / "stats.pkl").write_bytes(pickle.dumps({"mean": [0.5, 0.25], "n": 10}, protocol=4))
    (work / "README.md").write_text("# models\n", encoding="utf-8")
    (work / "tokenizer.model").write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02" * 20)
    _git(work, "add", "-A", env=env)
    ok = _git(work, "commit", "-m", "benign models", env=env, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "safeload" in ok.stdout + ok.stderr  # the hook ran on them
    head = _git(work, "rev-parse", "HEAD", env=env).stdout

    # malicious: a raw pickle that would run exec(...) on load, under a weights-like name
    (work / "pytorch_model.bin").write_bytes(exec_payload(marker))
    _git(work, "add", "-A", env=env)
    refused = _git(work, "commit", "-m", "malicious model", env=env, check=False)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0, out
    assert "UNSAFE" in out and "pytorch_model.bin" in out and "builtins.exec" in out
    assert _git(work, "rev-parse", "HEAD", env=env).stdout == head  # nothing was committed
    assert not marker.exists()
