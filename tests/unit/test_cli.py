"""The CLI's contract: exit codes, formats, directory walking, escaping."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest

from safeload.cli import main
from tests.pickle_builder import call, glob, system_payload, unicode, wrap


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_clean_file_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _write(tmp_path / "ok.pkl", pickle.dumps(OrderedDict(a=[1, 2.5, "x"]), protocol=4))
    assert main(["scan", str(f)]) == 0
    assert "SAFE" in capsys.readouterr().out


def test_malicious_file_exits_1_and_explains(tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _write(tmp_path / "weights.bin", system_payload(marker))
    assert main(["scan", str(f)]) == 1
    out = capsys.readouterr().out
    assert "UNSAFE" in out and "os.system" in out
    assert "very likely malicious" in out.lower()
    assert "system(" in out  # the decompiled explanation shows the call


def test_dash_scans_one_file_from_standard_input(tmp_path: Path, marker: Path) -> None:
    evil = system_payload(marker)
    clean = pickle.dumps(OrderedDict(a=[1, 2.5]), protocol=4)
    run = [sys.executable, "-m", "safeload", "scan", "-", "--format", "json", "--sha256"]
    bad = subprocess.run(run, input=evil, capture_output=True, check=False)
    assert bad.returncode == 1, bad.stderr
    (report,) = json.loads(bad.stdout)["reports"]
    assert report["path"] == "<stdin>" and report["verdict"] == "UNSAFE"
    assert [g["name"] for g in report["streams"][0]["globals"]] == ["os.system"]
    assert report["sha256"] == hashlib.sha256(evil).hexdigest()
    good = subprocess.run(run[:5], input=clean, capture_output=True, check=False)
    assert good.returncode == 0 and b"SAFE" in good.stdout
    named = _write(tmp_path / "-", clean)  # a file of that name is still reachable as ./-
    assert main(["scan", str(named)]) == 0


def test_unsafe_wins_over_incomplete(tmp_path: Path, marker: Path) -> None:
    bad = _write(tmp_path / "a.pkl", system_payload(marker))
    unknown = _write(tmp_path / "b.bin", b"\x00\x01 definitely not a model format \xff" * 10)
    assert main(["scan", str(unknown)]) == 2
    assert main(["scan", str(unknown), str(bad)]) == 1


def test_unrecognized_named_file_is_never_clean(tmp_path: Path) -> None:
    f = _write(tmp_path / "model.pt", b"# just some text\nhello\n")
    assert main(["scan", str(f)]) == 2


def test_skip_non_model_skips_named_files_no_loader_would_unpickle(
    tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The pre-commit hook's files are selected by name, and most model repositories hold a
    sentencepiece tokenizer.model (protobuf): no model format, so the hook skips it as a directory
    walk does. Content still decides: a pickle under that name is scanned, and a known format that
    cannot be read whole still gives exit 2."""
    tokenizer = _write(tmp_path / "tokenizer.model", b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02" * 20)
    assert main(["scan", str(tokenizer)]) == 2
    capsys.readouterr()
    assert main(["scan", "--skip-non-model", str(tokenizer)]) == 0
    assert "0 file(s) scanned" in (out := capsys.readouterr().out) and "1 skipped (no model format)" in out
    payload = _write(tmp_path / "spiece.model", system_payload(marker))
    assert main(["scan", "--skip-non-model", str(tokenizer), str(payload)]) == 1
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
    truncated = _write(tmp_path / "cut.model", buf.getvalue()[:-30])
    assert main(["scan", "--skip-non-model", str(tokenizer), str(truncated)]) == 2
    assert not marker.exists()


def test_directory_walk_skips_non_model_files_by_content(tmp_path: Path, marker: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "repo").mkdir()
    _write(tmp_path / "repo" / "README.md", b"# A model\nSee config.json.\n")
    _write(tmp_path / "repo" / "config.json", b'{"hidden_size": 8}\n')
    _write(tmp_path / "repo" / "weights.pkl", pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    assert main(["scan", str(tmp_path / "repo")]) == 0
    out = capsys.readouterr().out
    assert "2 skipped" in out
    # The same payload under a name that looks like text is still found by content.
    _write(tmp_path / "repo" / "notes.txt", system_payload(marker))
    assert main(["scan", str(tmp_path / "repo")]) == 1


def test_json_report_and_output_file(tmp_path: Path, marker: Path) -> None:
    f = _write(tmp_path / "m.pkl", system_payload(marker))
    out = tmp_path / "report.json"
    assert main(["scan", str(f), "--format", "json", "-o", str(out), "--sha256"]) == 1
    data = json.loads(out.read_text())
    assert data["exit_code"] == 1
    (report,) = data["reports"]
    assert report["verdict"] == "UNSAFE"
    assert len(report["sha256"]) == 64
    assert any(x["global_name"] == "os.system" and x["code"] == "SL100" for x in report["findings"])


def test_policy_and_allow_flags(tmp_path: Path) -> None:
    # An innocent but unlisted class: refused by default, allowed by name.
    data = wrap(call(glob("mypkg.layers", "Scale"), unicode("x")), 2)
    f = _write(tmp_path / "m.pkl", data)
    assert main(["scan", str(f)]) == 1
    assert main(["scan", str(f), "--allow", "mypkg.layers.Scale"]) == 0
    policy = tmp_path / "mine.toml"
    policy.write_text(
        'schema_version = 1\nname = "mine"\ndescription = "test"\nextends = ["default"]\n'
        '[[allow]]\nglobal = "mypkg.layers.Scale"\nreason = "our layer"\n'
    )
    assert main(["scan", str(f), "--policy", str(policy)]) == 0


def test_remedy_names_the_exact_policy_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _write(tmp_path / "m.pkl", wrap(call(glob("mypkg.layers", "Scale"), unicode("x")), 2))
    main(["scan", str(f)])
    out = capsys.readouterr().out
    assert 'global = "mypkg.layers.Scale"' in out
    assert "trust" in out


def test_usage_and_policy_errors_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = _write(tmp_path / "m.pkl", pickle.dumps(1))
    assert main(["scan"]) == 3
    assert main(["scan", str(f), "--format", "nope"]) == 3
    assert main(["scan", str(f), "--policy", "no-such-policy"]) == 3
    bad = tmp_path / "bad.toml"
    bad.write_text('schema_version = 1\nname = "x"\ndescription = "d"\n[[allow]]\nglobal = "a.b"\n')
    assert main(["policy", "validate", str(bad)]) == 3
    err = capsys.readouterr().err
    assert "bad.toml" in err and "reason" in err


def test_help_lists_every_command_and_each_command_parses_alone(capsys: pytest.CaptureFixture[str]) -> None:
    # A run builds only its own command's parser; the help without one lists them all.
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert all(f"    {name}" in listed for name in ("scan", "policy", "audit"))
    for name in ("scan", "policy", "audit"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert f"usage: safeload {name}" in capsys.readouterr().out
    assert main(["nosuch"]) == 3
    assert "invalid choice: 'nosuch' (choose from 'scan', 'policy', 'audit')" in capsys.readouterr().err


def test_policy_show_validate_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"strict", "default"} <= set(names)
    assert main(["policy", "show", "strict"]) == 0
    shown = capsys.readouterr().out
    assert "torch._utils._rebuild_tensor_v2" in shown
    saved = tmp_path / "strict-copy.toml"
    saved.write_text(shown)
    assert main(["policy", "validate", str(saved)]) == 0


def test_control_characters_in_names_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evil = "x\x1b[2J\nfake SAFE line"
    f = _write(tmp_path / "m.pkl", wrap(call(glob("mod", "nm"), unicode(evil)), 2).replace(b"mod\nnm", b"mod\x1b[31m\nnm"))
    main(["scan", str(f)])
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\\x1b" in out


def test_missing_file_is_incomplete(tmp_path: Path) -> None:
    assert main(["scan", str(tmp_path / "nope.pt")]) == 2


def test_python_dash_m_and_console_script(tmp_path: Path, marker: Path) -> None:
    f = _write(tmp_path / "m.pkl", system_payload(marker))
    proc = subprocess.run([sys.executable, "-m", "safeload", "scan", str(f)], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    help_text = subprocess.run([sys.executable, "-m", "safeload", "--help"], capture_output=True, text=True).stdout
    assert "scan" in help_text and "Exit codes" in help_text


def test_git_refs_in_a_walked_tree_are_not_models_but_named_ones_are_unscannable(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    ref = _write(repo / "refs" / "main", b"0a1b2c3d4e5f60718293a4b5c6d7e8f901234567")  # starts with opcodes
    _write(repo / "weights.pkl", pickle.dumps({"w": [1.0]}, protocol=2))
    assert main(["scan", str(repo)]) == 0
    assert main(["scan", str(ref)]) == 2


def test_broken_pickle_with_an_import_in_a_walked_tree_is_not_skipped(tmp_path: Path, marker: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _write(repo / "notes", system_payload(marker)[:-1])  # no STOP: the payload still runs first
    assert main(["scan", str(repo)]) == 1


def test_the_command_does_not_look_for_pydantic_plugins(tmp_path: Path) -> None:
    """pydantic scans every installed distribution's metadata for plugins on first use (a tenth of
    a second in a venv with torch): the console command turns that off, unless the user chose.
    (pydantic validates a user's policy file; built-in ones are read without it.)"""
    site = tmp_path / "site"
    (site / "probe_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "probe_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-plugin\nVersion: 1.0\n")
    (site / "probe_plugin-1.0.dist-info" / "entry_points.txt").write_text("[pydantic]\nprobe = probe_plugin:plugin\n")
    seen = tmp_path / "plugin-was-loaded"
    (site / "probe_plugin.py").write_text(
        f"open({str(seen)!r}, 'w').close()\n"
        "class Plugin:\n"
        "    def new_schema_validator(self, *args, **kwargs):\n"
        "        return None, None, None\n"
        "plugin = Plugin()\n"
    )
    model = _write(tmp_path / "ok.pkl", pickle.dumps({"a": 1}, protocol=4))
    mine = tmp_path / "mine.toml"
    mine.write_text('schema_version = 1\nextends = ["default"]\n')
    env = {"PYTHONPATH": f"{site}:{Path(__file__).resolve().parents[2]}", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-c", "from safeload.cli import entry; entry()", "scan", "--policy", str(mine), str(model)]

    subprocess.run(command, env=env, capture_output=True, check=True)
    assert not seen.exists()
    # The probe works: where the user asks for plugins, pydantic loads it.
    subprocess.run(command, env={**env, "PYDANTIC_DISABLE_PLUGINS": ""}, capture_output=True, check=True)
    assert seen.exists()


def test_the_console_command_hands_over_all_its_output_and_exit_code(tmp_path: Path, marker: Path) -> None:
    # entry() ends the process without the interpreter's teardown: whatever was written must still
    # arrive whole, through pipes and into files, with main()'s exit code.
    files = [_write(tmp_path / f"m{i}.pkl", pickle.dumps({"step": i, "k": list(range(i))}, protocol=4)) for i in range(40)]
    evil = _write(tmp_path / "evil.pkl", system_payload(marker))
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin"}
    entry = [sys.executable, "-c", "from safeload.cli import entry; entry()"]
    for args, code in ((["scan", "--format", "json", *map(str, files)], 0), (["scan", "--format", "json", str(evil)], 1)):
        proc = subprocess.run([*entry, *args], env=env, capture_output=True)
        assert proc.returncode == code, proc.stderr
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(args) == code
        # the same document (it carries no timestamps), to the last byte
        assert proc.stdout.decode() == out.getvalue() and len(proc.stdout) > 4096 * (code == 0)
    report = tmp_path / "audit.json"
    proc = subprocess.run([*entry, "audit", str(tmp_path), "--format", "json", "-o", str(report)], env=env, capture_output=True)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(report.read_text())["exit_code"] == 1
    assert b"exit 1" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("columns", ["50", "132", "", "junk", "-3"])
def test_help_is_wrapped_as_argparse_wraps_it(columns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """safeload's help formatter takes the terminal width without shutil: the text must not change."""
    import argparse

    from safeload import cli_parser

    monkeypatch.setenv("COLUMNS", columns)
    for command in (None, "scan", "audit", "policy"):
        ours = cli_parser.build_parser(command)
        monkeypatch.setattr(cli_parser, "_Formatter", argparse.HelpFormatter)
        stock = cli_parser.build_parser(command)
        monkeypatch.undo()
        monkeypatch.setenv("COLUMNS", columns)
        helps = [p.format_help() for p in (ours, stock)]
        if command is not None:
            sub = [a for a in ours._actions if isinstance(a, argparse._SubParsersAction)][0]
            stock_sub = [a for a in stock._actions if isinstance(a, argparse._SubParsersAction)][0]
            helps = [sub.choices[command].format_help(), stock_sub.choices[command].format_help()]
        assert helps[0] == helps[1]
        widest = max(len(line) for line in helps[0].splitlines())
        # the width is really taken from $COLUMNS (or, without a usable one, is 80)
        assert widest > 80 if columns == "132" else widest <= 80


def test_a_scan_never_imports_the_audit_models(tmp_path: Path) -> None:
    """Every `safeload scan` (a pre-commit hook runs one per batch of files) pays for what it
    imports; the registry models are an audit's alone (checked in a fresh process)."""
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    script = (
        "import sys; from safeload.cli import main; code = main(sys.argv[1:]); "
        "print(code, 'safeload.audit_model' in sys.modules, 'safeload.audit' in sys.modules)"
    )
    for fmt in ("text", "json", "sarif"):
        done = subprocess.run(
            [sys.executable, "-c", script, "scan", str(path), "--format", fmt],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert done.stdout.splitlines()[-1] == "0 False False", (fmt, done.stdout[-300:])
