"""safeload.suggest: a reviewable policy with exactly the names files need beyond a base."""

from __future__ import annotations

from pathlib import Path

import torch

import safeload
from safeload.suggest import allow_snippet, needed_names, suggest_policy
from tests import pickle_builder as pb
from tests.unit.loader import models

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def test_suggests_exactly_the_missing_names_and_loads_with_them(tmp_path: Path, marker: Path) -> None:
    model = tmp_path / "model.pt"
    torch.save(models.Net(), model)
    plain = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, plain)
    text = suggest_policy([model, plain])
    doc = tomllib.loads(text)
    assert doc["extends"] == ["default"]
    names = [entry["global"] for entry in doc["allow"]]
    assert names == [
        "tests.unit.loader.models.Net",
        "torch.nn.modules.linear.Linear",
        "torch.nn.modules.activation.ReLU",
    ]
    assert all(entry["reason"].startswith("TODO") for entry in doc["allow"])
    assert "# used as " in text and "member model/data.pkl" in text
    policy_file = tmp_path / "suggested.toml"
    policy_file.write_text(text)
    loaded = safeload.load(model, policy=str(policy_file))
    assert type(loaded) is models.Net


def test_floor_names_are_comments_never_entries(tmp_path: Path, marker: Path) -> None:
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pb.exec_payload(marker))
    text = suggest_policy([evil], base="strict")
    doc = tomllib.loads(text)
    assert "allow" not in doc
    assert "REFUSED, on the floor" in text and "builtins.exec" in text


def test_unreadable_files_are_noted(tmp_path: Path) -> None:
    text = suggest_policy([tmp_path / "missing.pt"])
    assert "NOTE" in text and "could not be fully analysed" in text
    assert "allow" not in tomllib.loads(text)


def test_refusal_helpers(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    torch.save(models.Net(), model)
    report = safeload.scan(model)
    names = needed_names(report)
    assert names[0] == "tests.unit.loader.models.Net" and len(names) == 3
    snippet = allow_snippet(names)
    assert [e["global"] for e in tomllib.loads(snippet)["allow"]] == names
