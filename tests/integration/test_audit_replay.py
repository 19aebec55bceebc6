"""Replaying an audit report (audit_memo): an unchanged tree audited the same way gets the same
report again without a scan; any change that could change the report audits afresh."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest
import torch

from safeload import audit_memo, build_id
from safeload.audit_runs import RunRecord, RunStore
from safeload.cli import main
from tests.pickle_builder import exec_payload

REPLAYED = "its report replayed"
MISS = "not replaying the last report: "


def _why(err: str) -> str:
    """The reason the audit gave for not replaying ("" when it gave none)."""
    lines = [line for line in err.splitlines() if MISS in line]
    return lines[0].split(MISS, 1)[1] if lines else ""


def _stored_reports(cache: Path) -> list[Path]:
    return [p for p in (cache / "runs").iterdir() if "." not in p.name]


def _torch_bytes(value: float) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.full((3,), value)}, buf)
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path: Path, marker: Path) -> Path:
    root = tmp_path / "models"
    (root / "a").mkdir(parents=True)
    (root / "a" / "good.pt").write_bytes(_torch_bytes(1.0))
    (root / "a" / "copy.pt").write_bytes(_torch_bytes(1.0))
    (root / "b").mkdir()
    (root / "b" / "evil.pkl").write_bytes(exec_payload(marker))
    (root / "b" / "link.pt").symlink_to(root / "a" / "good.pt")
    return root


@pytest.fixture(params=["walk as installed", "python walk"])
def walks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The replay's key from the compiled walk (where the install has it) or from the Python one."""
    if request.param == "python walk":
        monkeypatch.setattr(audit_memo, "fast_key_records", lambda *args, **kwargs: None)
    return str(request.param)


def _audit(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["audit", *args, "--no-progress"])
    return code, capsys.readouterr().err


def test_an_unchanged_tree_replays_the_same_report(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], marker: Path, walks: str
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "report.json"
    args = (str(tree), "--cache", str(cache), "-o", str(out), "--jobs", "2")
    code, err = _audit(capsys, *args)
    assert code == 1 and REPLAYED not in err and "0 scanned" not in err
    first = out.read_bytes()
    out.unlink()
    code, err = _audit(capsys, *args)
    assert code == 1 and REPLAYED in err and "0 scanned" in err
    assert out.read_bytes() == first
    # The report is the one an audit without any cache writes: reports say nothing of the cache.
    fresh = tmp_path / "fresh.json"
    assert main(["audit", str(tree), "-o", str(fresh), "--no-progress"]) == 1
    assert fresh.read_bytes() == first
    assert not marker.exists()


def test_a_replay_leaves_the_report_it_wrote_and_restores_one_that_changed(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output file that the last run wrote is left as it is, without reading the stored report
    (the file's status says it holds it). Edited, replaced, removed or turned into a link, it gets
    the stored report back."""
    cache, out = tmp_path / "cache", tmp_path / "report.json"
    args = (str(tree), "--cache", str(cache), "-o", str(out))
    assert _audit(capsys, *args)[0] == 1
    first, written = out.read_bytes(), out.stat()
    reads: list[str] = []
    read_report = RunStore.read_report

    def counted(self: RunStore, key: str, length: int) -> bytes | None:
        reads.append(key)
        return read_report(self, key, length)

    monkeypatch.setattr(RunStore, "read_report", counted)
    for _ in range(2):
        assert REPLAYED in _audit(capsys, *args)[1]
        assert reads == [] and out.read_bytes() == first
        now = out.stat()
        assert (now.st_ino, now.st_mtime_ns, now.st_ctime_ns) == (
            written.st_ino,
            written.st_mtime_ns,
            written.st_ctime_ns,
        )

    def edit() -> None:
        with out.open("r+b") as f:  # same size, same inode: only the times say it changed
            f.write(b"[")

    def replace() -> None:
        (tmp_path / "other").write_bytes(first)
        os.replace(tmp_path / "other", out)

    def link() -> None:
        (tmp_path / "elsewhere.json").write_bytes(b"{}")
        out.unlink()
        out.symlink_to(tmp_path / "elsewhere.json")

    for change in (edit, out.unlink, replace, link):
        reads.clear()
        change()
        assert REPLAYED in _audit(capsys, *args)[1], change
        assert reads != [] and out.read_bytes() == first and not out.is_symlink(), change
        reads.clear()
        assert REPLAYED in _audit(capsys, *args)[1], change
        assert reads == [], change  # the file it wrote (or found holding the report) is remembered
    assert (tmp_path / "elsewhere.json").read_bytes() == b"{}"  # a link is replaced, never written through

    # The same audit to stdout replays the same stored report, read each time.
    for _ in range(2):
        reads.clear()
        assert main(["audit", *args[:3], "--format", "json", "--no-progress"]) == 1
        captured = capsys.readouterr()
        assert REPLAYED in captured.err and len(reads) == 1
        assert captured.out.encode() == first


@pytest.mark.parametrize("target", ["missing", "link"])
def test_a_replay_into_a_file_no_run_wrote_writes_it(
    target: str, tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stored audit went to stdout: no -o file is remembered, and one that is not there (or is
    a link) is no file the report is known to be in."""
    cache = tmp_path / "cache"
    assert main(["audit", str(tree), "--cache", str(cache), "--format", "json", "--no-progress"]) == 1
    first = capsys.readouterr().out.encode()
    out, elsewhere = tmp_path / "report.json", tmp_path / "elsewhere.json"
    if target == "link":
        elsewhere.write_bytes(b"{}")
        out.symlink_to(elsewhere)
    assert REPLAYED in _audit(capsys, str(tree), "--cache", str(cache), "-o", str(out))[1]
    assert out.read_bytes() == first and not out.is_symlink()
    assert target == "missing" or elsewhere.read_bytes() == b"{}"


# What the audit says when it does not replay: a change of files is named; another command has no
# stored report of its own.
NOT_STORED = "no report of this audit is stored"
CHANGES = {
    "touch": "2 paths changed since the stored audit: ",  # the file and the link to it
    "add": "1 path changed since the stored audit: ",
    "remove": "1 path changed since the stored audit: ",
    "relink": "1 path changed since the stored audit: ",
    "format": NOT_STORED,
    "verbose": NOT_STORED,
    "policy": NOT_STORED,
    "rehash": "",  # never replays, so never looks
    "cwd": NOT_STORED,
    "allow": NOT_STORED,
}
NAMED = {
    "touch": "good.pt (changed)",
    "add": "new.pt (new)",
    "remove": "copy.pt (gone)",
    "relink": "link.pt (changed)",
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_audits_afresh(
    change: str,
    tree: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    walks: str,
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "report.txt"
    base = [str(tree), "--cache", str(cache), "-o", str(out), "--format", "text"]
    code, err = _audit(capsys, *base)
    assert code == 1 and _why(err).startswith(NOT_STORED)
    assert REPLAYED in _audit(capsys, *base)[1]  # unchanged: replayed
    extra: list[str] = []
    if change == "touch":
        good = tree / "a" / "good.pt"
        before = good.stat()
        good.write_bytes(_torch_bytes(2.0))  # same size, new bytes and times
        # File times tick coarsely on some file systems: make sure the new one differs.
        os.utime(good, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    elif change == "add":
        (tree / "a" / "new.pt").write_bytes(_torch_bytes(3.0))
    elif change == "remove":
        (tree / "a" / "copy.pt").unlink()
    elif change == "relink":
        (tree / "b" / "link.pt").unlink()
        (tree / "b" / "link.pt").symlink_to(tree / "a" / "copy.pt")
    elif change == "format":
        extra = ["--format", "markdown"]
    elif change == "verbose":
        extra = ["-v"]
    elif change == "policy":
        extra = ["--policy", "strict"]
    elif change == "rehash":
        extra = ["--rehash"]
    elif change == "allow":
        extra = ["--allow", "collections.Counter"]
    elif change == "cwd":
        monkeypatch.chdir(tmp_path)
    code, err = _audit(capsys, *base, *extra)
    assert code == 1 and REPLAYED not in err
    assert _why(err).startswith(CHANGES[change]) and (CHANGES[change] or MISS not in err)
    assert NAMED.get(change, "") in _why(err)
    if change != "rehash":
        # ... and that audit's report is kept for the next unchanged run.
        assert REPLAYED in _audit(capsys, *base, *extra)[1]


def test_usage_errors_are_reported_even_when_a_report_could_be_replayed(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = (str(tree), "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "r.txt"))
    assert _audit(capsys, *args)[0] == 1
    code, err = _audit(capsys, *args, "--jobs", "0")
    assert code == 3 and "--jobs must be at least 1" in err


def test_a_user_policy_edited_in_place_is_no_replay(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "mine.toml"
    policy.write_text('schema_version = 1\nname = "mine"\ndescription = "d"\nextends = ["default"]\n')
    args = (str(tree), "--cache", str(tmp_path / "c"), "--policy", str(policy), "-o", str(tmp_path / "r.md"))
    assert _audit(capsys, *args)[0] == 1
    assert REPLAYED in _audit(capsys, *args)[1]
    # Same file, same name: a new allow entry (the file's identity in the key is its bytes).
    policy.write_text(policy.read_text() + '[[allow]]\nglobal = "collections.Counter"\nreason = "r"\n')
    err = _audit(capsys, *args)[1]
    assert REPLAYED not in err and _why(err) == f"the policy file {policy} changed"
    assert REPLAYED in _audit(capsys, *args)[1]


def test_a_stored_source_that_is_neither_built_in_nor_a_file_is_no_replay(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Built-in rules files are checked through the key; any other label is checked as a file, so
    a record naming a source the key does not cover never replays."""
    cache = tmp_path / "c"
    args = (str(tree), "--cache", str(cache), "-o", str(tmp_path / "r.md"))
    assert _audit(capsys, *args)[0] == 1
    (record,) = (cache / "runs").glob("*.record")
    data = RunRecord.from_bytes(record.read_bytes())
    assert data.sources and all(label.endswith(".toml") for label, _ in data.sources)
    data.sources.append(("other.toml", "0" * 64))
    record.write_bytes(data.to_bytes())
    err = _audit(capsys, *args)[1]
    assert REPLAYED not in err and _why(err) == "the policy file other.toml changed"
    assert REPLAYED in _audit(capsys, *args)[1]


def test_a_changed_baseline_is_no_replay(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old.json"
    assert main(["audit", str(tree / "a"), "--format", "json", "-o", str(old), "--no-progress"]) == 0
    args = (str(tree), "--cache", str(tmp_path / "c"), "--baseline", str(old), "-o", str(tmp_path / "r.txt"))
    first = _audit(capsys, *args)[0]
    assert first == 1 and REPLAYED in _audit(capsys, *args)[1]
    assert main(["audit", str(tree), "--format", "json", "-o", str(old), "--no-progress"]) == 1
    code, err = _audit(capsys, *args)
    assert REPLAYED not in err and code == 0  # everything is in the new baseline
    assert _why(err) == "the baseline file changed since the stored audit"


def test_a_replay_ends_when_a_waiver_lapses(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    digest = hashlib.sha256((tree / "b" / "evil.pkl").read_bytes()).hexdigest()
    today = date.today()
    policy = tmp_path / "waive.toml"
    policy.write_text(
        'schema_version = 1\nname = "w"\ndescription = "d"\nextends = ["default"]\n'
        f'[[waive]]\nsha256 = "{digest}"\ncode = "SL101"\nreason = "r"\nexpires = {today.isoformat()}\n'
    )
    args = (str(tree), "--cache", str(tmp_path / "c"), "--policy", str(policy), "-o", str(tmp_path / "r.txt"))
    _audit(capsys, *args)
    assert REPLAYED in _audit(capsys, *args)[1]

    monkeypatch.setattr(audit_memo, "_today", lambda: (today + timedelta(days=1)).isoformat())
    err = _audit(capsys, *args)[1]
    assert REPLAYED not in err
    assert (
        _why(err)
        == f"a waiver in force at the last audit lapsed on {(today + timedelta(days=1)).isoformat()}"
    )


def test_unreadable_files_keep_the_report_from_replay(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tree / "b" / "gone.pt").symlink_to(tree / "nowhere.pt")
    args = (str(tree), "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "r.txt"))
    assert _audit(capsys, *args)[0] == 1
    assert REPLAYED not in _audit(capsys, *args)[1]  # a transient failure is never repeated


def test_a_damaged_stored_run_is_a_miss(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "c"
    args = (str(tree), "--cache", str(cache), "-o", str(tmp_path / "r.txt"))
    _audit(capsys, *args)
    (stored,) = _stored_reports(cache)
    text = stored.read_bytes()
    stored.write_bytes(text[:-1])  # cut short
    err = _audit(capsys, *args)[1]
    assert REPLAYED not in err and _why(err) == "the stored report is damaged or missing"
    assert REPLAYED in _audit(capsys, *args)[1]  # stored whole again by that audit
    # A record that is no record, or one of another shape: a miss that says so, then stored anew.
    (record,) = (cache / "runs").glob("*.record")
    shape = record.read_bytes().replace(b"\nsource ", b"\nsource x ", 1)
    assert shape != record.read_bytes()
    for damaged in (b"not a record", shape, record.read_bytes()[:-2]):
        record.write_bytes(damaged)
        code, err = _audit(capsys, *args)
        assert code == 1 and REPLAYED not in err
        assert _why(err) == "the stored report is damaged or missing"
        assert REPLAYED in _audit(capsys, *args)[1]


def test_a_replay_loads_neither_models_nor_scanner(tree: Path, tmp_path: Path) -> None:
    """What makes a replay fast: no pydantic, no scanner, no renderer, not even the rule catalogue,
    the error classes (and pickle with them), dataclasses, tempfile, pathlib, typing, shutil,
    threading, the cache's database, OpenSSL's hashes, argparse, json, re, enum, functools or
    collections (checked in a fresh process; an editable install's import hook loads pathlib at
    start-up, so the check forgets it first: an import by safeload loads it anew)."""
    args = [
        "audit",
        str(tree),
        "--cache",
        str(tmp_path / "c"),
        "-o",
        str(tmp_path / "r.html"),
        "--no-progress",
    ]
    script = (
        "import sys; names = ('pydantic', 'safeload.model', 'safeload.api', 'safeload.report.html', "
        "'safeload.codes', 'safeload.errors', 'pickle', 'dataclasses', 'tempfile', 'pathlib', 'typing', "
        "'shutil', 'threading', 'sqlite3', 'hashlib', '_hashlib', 'safeload.audit_cache', 'argparse', "
        "'gettext', 'json', 're', 'enum', 'functools', 'collections', 'collections.abc'); "
        "[sys.modules.pop(m, None) for m in names]; "
        "from safeload.cli import main; code = main(sys.argv[1:]); "
        "print(code, [m for m in names if m in sys.modules])"
    )
    if importlib.util.find_spec("safeload.audit_treewalk_c") is not None:
        # the compiled walk makes the key's records: key_records (and struct) are for a miss
        script = script.replace("'gettext', ", "'gettext', 'struct', ")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    outs = [
        subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, check=True
        )
        for _ in range(2)
    ]
    assert outs[0].stdout.split()[0] == "1" and "safeload.api" in outs[0].stdout  # audited
    assert outs[1].stdout.strip() == "1 []" and REPLAYED in outs[1].stderr  # replayed


def test_only_the_most_recent_reports_are_kept(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safeload.audit_runs import KEEP_RUNS

    cache = tmp_path / "c"
    formats = ["text", "json", "markdown", "html", "sarif"]
    for fmt in formats:
        for verbose in ([], ["-v"]):
            _audit(
                capsys, str(tree), "--cache", str(cache), "--format", fmt, "-o", str(tmp_path / "r"), *verbose
            )
    kept = _stored_reports(cache)
    assert len(kept) == KEEP_RUNS < 2 * len(formats)
    # each kept report has its manifest, and no other manifest is left
    manifests = [p for p in (cache / "runs").iterdir() if p.name.endswith(".manifest")]
    assert sorted(p.name.split(".")[0] for p in manifests) == sorted(p.name for p in kept)
    # the latest is kept, the first is gone
    assert REPLAYED in _audit(capsys, str(tree), "--cache", str(cache), "--format", "sarif", "-v")[1]
    assert REPLAYED not in _audit(capsys, str(tree), "--cache", str(cache), "--format", "text")[1]

    def err(fmt: str, *verbose: str) -> str:
        return _audit(capsys, str(tree), "--cache", str(cache), "--format", fmt, *verbose)[1]

    # Kept are the most recently used: json -v is now the oldest, and a replay makes it recent.
    assert REPLAYED in err("json", "-v")
    assert REPLAYED not in err("json")  # stored anew: markdown, now the least recently used, goes
    assert REPLAYED in err("json", "-v")
    assert REPLAYED not in err("markdown")


def test_a_report_written_inside_the_tree_is_no_part_of_it(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], walks: str
) -> None:
    """Each run replaces its report (a new inode): were it walked, no run would ever replay, and
    every report would list the previous one as a skipped file."""
    report = tree / "a" / "audit.json"
    (tree / "a" / ".audit.json.123.tmp").write_text("left by a crash")  # its temporary twin
    for cache in ([], ["--cache", str(tmp_path / "c")]):
        code, _ = _audit(capsys, str(tree), "-o", str(report), *cache)
        assert code == 1 and "audit.json" not in report.read_text()
    assert REPLAYED in _audit(capsys, str(tree), "-o", str(report), "--cache", str(tmp_path / "c"))[1]
    # Named on the command line, it is audited like any file.
    code, _ = _audit(capsys, str(report), "-o", str(tmp_path / "r.json"))
    assert "audit.json" in (tmp_path / "r.json").read_text()


def test_a_miss_after_safeload_keys_stored_audits_otherwise_says_so(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A development build (same version) that keys runs otherwise: no talk of changed links."""
    args = (str(tree), "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "r.txt"))
    _audit(capsys, *args)
    monkeypatch.setattr(audit_memo, "_KEY_FORMAT", audit_memo._KEY_FORMAT + 1)
    assert (
        _why(_audit(capsys, *args)[1]) == "the way safeload keys stored audits changed since the stored audit"
    )
    assert REPLAYED in _audit(capsys, *args)[1]


def test_a_miss_after_a_build_with_the_same_version_says_the_code_changed(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = (str(tree), "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "r.txt"))
    _audit(capsys, *args)
    monkeypatch.setattr(build_id, "install_fingerprint", lambda: "another build")
    assert _why(_audit(capsys, *args)[1]) == (
        "safeload's code or the Python running it changed since the stored audit"
    )
    assert REPLAYED in _audit(capsys, *args)[1]
    monkeypatch.setattr(audit_memo, "__version__", "99.0")
    # A new version is new code: said once.
    assert _why(_audit(capsys, *args)[1]).startswith("safeload's version (")


def test_a_miss_names_what_changed_since_the_stored_report(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "c"
    args = (str(tree), "--cache", str(cache), "-o", str(tmp_path / "r.txt"))
    _audit(capsys, *args)
    with monkeypatch.context() as m:
        m.setattr(audit_memo, "__version__", "99.0")
        err = _audit(capsys, *args)[1]
    from safeload import __version__

    assert _why(err) == f"safeload's version ({__version__} then, 99.0 now) changed since the stored audit"
    with monkeypatch.context() as m:
        m.setattr(audit_memo, "_rules_digest", lambda: "other rules")
        # compared with the most recent stored report: the one safeload "99.0" wrote
        assert _why(_audit(capsys, *args)[1]) == (
            f"safeload's version (99.0 then, {__version__} now) and the built-in rules changed since the stored audit"
        )
    # back as it was: the first report is still kept, and replays
    assert REPLAYED in _audit(capsys, *args)[1]

    # A name from the tree is escaped: it reaches a terminal.
    (tree / "a" / "new\x1b[2Jname.pt").write_bytes(_torch_bytes(4.0))
    assert _why(_audit(capsys, *args)[1]) == (
        f"1 path changed since the stored audit: {tree}/a/new\\x1b[2Jname.pt (new)"
    )
    for i in range(5):
        (tree / "b" / f"more{i}.pt").write_bytes(_torch_bytes(5.0 + i))
    assert _why(_audit(capsys, *args)[1]).endswith(" (new) and 2 more")
    # A name that is not UTF-8 (kept by the manifest, which then goes through json's escapes)
    # is named in the next miss as the bytes it has.
    odd = os.fsdecode(str(tree / "a").encode() + b"/\xffodd.pt")
    with open(os.fsencode(odd), "wb") as f:
        f.write(_torch_bytes(9.0))
    assert (
        _why(_audit(capsys, *args)[1]) == f"1 path changed since the stored audit: {tree}/a/\\xffodd.pt (new)"
    )
    with open(os.fsencode(odd), "wb") as f:  # read back from that manifest: this name changed
        f.write(_torch_bytes(10.0))
    assert (
        _why(_audit(capsys, *args)[1])
        == f"1 path changed since the stored audit: {tree}/a/\\xffodd.pt (changed)"
    )
    os.unlink(os.fsencode(odd))
    # Past the bound a manifest keeps no paths: the miss is still told, without names.
    monkeypatch.setattr(audit_memo, "MANIFEST_MAX_PATHS", 2)
    (tree / "b" / "more0.pt").unlink()
    assert _audit(capsys, *args)[0] == 1
    (tree / "b" / "more1.pt").unlink()
    assert (
        _why(_audit(capsys, *args)[1])
        == "the tree changed since the stored audit (too many files to say which)"
    )
    # A manifest that is no manifest: said, and the audit runs as usual.
    for manifest in (cache / "runs").glob("*.manifest"):
        manifest.write_bytes(b"{not json")
    (tree / "b" / "more2.pt").unlink()
    code, err = _audit(capsys, *args)
    assert code == 1 and _why(err) == "the stored report's manifest is damaged"
