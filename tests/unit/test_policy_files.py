"""Built-in policy files are read without pydantic when their bytes are the ones validated."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import msgspec
import pytest

from safeload import policy, policy_files
from safeload.errors import PolicyError
from safeload.limits import Limits
from safeload.policy import FLOOR_FILE, load_policy, parse_toml
from tests.pickle_builder import system_payload

RULES = Path(__file__).resolve().parents[2] / "rules"


@pytest.fixture
def fresh_policies() -> Iterator[None]:
    """Built-in policies are read once per process: read them again, before and after."""

    def clear() -> None:
        policy._BUILTIN_RESOLVED.clear()
        policy._builtin_policy.cache_clear()
        policy._builtin_names.cache_clear()
        policy.floor.cache_clear()
        policy._manifest.cache_clear()

    clear()
    yield
    clear()


def test_the_manifest_is_current() -> None:
    # Fails after a rules/*.toml edit: run `python -m safeload.policy_files --write-manifest`.
    assert policy_files.main(["--rules", str(RULES), "--check-manifest"]) == 0


def test_the_manifest_check_sees_a_changed_file(tmp_path: Path) -> None:
    for path in RULES.glob("*.*"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    assert policy_files.main(["--rules", str(tmp_path), "--check-manifest"]) == 0
    with (tmp_path / "strict.toml").open("a", encoding="utf-8") as fh:
        fh.write("\n# a comment changes the bytes\n")
    assert policy_files.main(["--rules", str(tmp_path), "--check-manifest"]) == 1


@pytest.mark.parametrize("filename", sorted(p.name for p in RULES.glob("*.toml")))
def test_a_builtin_file_is_read_from_the_manifest_as_the_models_read_it(
    filename: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = (RULES / filename).read_bytes()
    monkeypatch.setattr(policy, "parse_toml", None)  # the manifest's content, or a TypeError
    content = policy._validated(data, filename, builtin=True, floor_file=filename == FLOOR_FILE)
    raw = parse_toml(data, filename)
    if filename == FLOOR_FILE:
        assert content == policy_files.validate_floor_file(raw, filename)
    else:
        assert content == policy_files.validate_policy_file(raw, filename)


def test_every_field_survives_the_manifest() -> None:
    """Fields the built-in files do not use yet (dates, wildcards, limits) and the defaults of
    those they leave out come back from the manifest's JSON as the models gave them."""
    full = (
        textwrap.dedent(
            """
        schema_version = 1
        name = "full"
        description = "every field"
        extends = ["default", "pack-sklearn"]

        [limits]
        max_opcodes = 10
        max_nesting = 0

        [[allow]]
        global = "mypkg.Net"
        reason = "ours"

        [[allow]]
        global = "mypkg.layers.*"
        reason = "ours too"
        unsafe_wildcard = true

        [[waive]]
        sha256 = "AB"
        code = "SL101"
        global = "mypkg.Other"
        reason = "reviewed"
        expires = 2031-01-01

        [[waive]]
        sha256 = "cd"
        code = "SL204"
        reason = "reviewed"
        expires = 2031-01-01
        """
        )
        .replace('"AB"', '"' + "AB" * 32 + '"')
        .replace('"cd"', '"' + "cd" * 32 + '"')
    )
    policies = {
        name: policy_files.validate_policy_file(parse_toml(text.encode(), name), name)
        for name, text in (
            ("full.toml", full),
            ("bare.toml", "schema_version = 1\n[[allow]]\nglobal = 'a.b'\nreason = 'r'\n"),
        )
    }
    floor_text = "schema_version = 1\n[[module]]\nname = 'os'\nreason = 'r'\n"
    floor = policy_files.validate_floor_file(parse_toml(floor_text.encode(), FLOOR_FILE), FLOOR_FILE)
    manifest = policy.Manifest(sha256={"full.toml": "1" * 64}, policies=policies, floor=floor)
    again = msgspec.json.decode(msgspec.json.encode(manifest), type=policy.Manifest)
    assert again == manifest
    assert again.policies["full.toml"].waive[0].expires == date(2031, 1, 1)
    assert again.policies["full.toml"].limits == {"max_opcodes": 10, "max_nesting": 0}
    assert again.content("full.toml", "1" * 64) == policies["full.toml"]
    assert again.content("full.toml", "2" * 64) is None


def test_a_builtin_file_that_changed_is_validated(
    monkeypatch: pytest.MonkeyPatch, fresh_policies: None
) -> None:
    """Bytes the manifest does not record (an edited installation) go through the models."""
    real = policy._read_builtin

    def edited(filename: str) -> bytes:
        data = real(filename)
        return data + b"\nbogus = 1\n" if filename == "strict.toml" else data

    monkeypatch.setattr(policy, "_read_builtin", edited)
    with pytest.raises(PolicyError, match="bogus: unknown field"):
        load_policy("strict")


@pytest.mark.parametrize("manifest", [None, b"{not json", b'{"sha256": {"strict.toml": 3}}'])
def test_without_a_usable_manifest_every_builtin_file_is_validated(
    manifest: bytes | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_policies: None
) -> None:
    expected = {name: load_policy(name).hash for name in ("strict", "default", "pack-sklearn")}
    policy._BUILTIN_RESOLVED.clear()
    policy._builtin_policy.cache_clear()
    policy.floor.cache_clear()
    rules = tmp_path / "rules"
    rules.mkdir()
    for path in RULES.glob("*.toml"):
        (rules / path.name).write_bytes(path.read_bytes())
    if manifest is not None:
        (rules / policy.MANIFEST_FILE).write_bytes(manifest)
    monkeypatch.setattr(policy, "_rules_dir", lambda: str(rules))
    policy._manifest.cache_clear()
    assert policy._manifest().sha256 == {}
    assert {name: load_policy(name).hash for name in expected} == expected


def test_builtin_files_are_found_through_importlib_resources_where_no_folder_holds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_policies: None
) -> None:
    # A package imported from a zip has no rules folder on disk: importlib.resources reads it.
    expected = {name: load_policy(name).hash for name in ("strict", "default")}
    names = policy.builtin_policy_names()
    assert policy._rules_dir() is not None  # this install has the folder
    policy._BUILTIN_RESOLVED.clear()
    policy._builtin_policy.cache_clear()
    policy._builtin_names.cache_clear()
    policy.floor.cache_clear()
    policy._manifest.cache_clear()
    monkeypatch.setattr(policy, "_rules_dir", lambda: None)
    assert policy.builtin_policy_names() == names
    assert policy._manifest().sha256  # the manifest was read, so built-in files skip validation
    assert {name: load_policy(name).hash for name in expected} == expected


def test_limits_refuse_what_a_policy_file_may_not_set() -> None:
    assert Limits(max_nesting=0).max_nesting == 0
    for bad in ({"max_opcodes": 0}, {"max_nesting": -1}, {"max_memo": True}, {"max_streams": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Limits(**bad)  # type: ignore[arg-type]


def test_scan_and_audit_never_import_pydantic(tmp_path: Path, marker: Path) -> None:
    """pydantic's import was most of a short run's start-up (a pre-commit hook's every run)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "benign.pkl").write_bytes(pickle.dumps({"step": 3, "lr": [0.1, 0.01]}, protocol=4))
    (models / "evil.bin").write_bytes(system_payload(marker))
    code = textwrap.dedent(
        f"""
        import sys
        from safeload.cli import main
        codes = [
            main(["scan", "--format", "json", {str(models)!r}]),
            main(["audit", "--jobs", "1", "--format", "html", "-o", {str(tmp_path / "r.html")!r},
                  "--cache", {str(tmp_path / "cache")!r}, {str(models)!r}]),
        ]
        print(codes, "pydantic" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "[1, 1] False"
    assert not marker.exists()
