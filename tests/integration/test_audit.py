"""`safeload audit` over a generated registry: Hugging Face cache layout with symlinks, duplicates,
unreadable entries, a malicious file; the cache; waivers; baselines; the CLI and Ctrl-C."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import sqlite3
import stat
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from safeload import audit_pool, audit_walk, audit_workers, build_id
from safeload.audit import AuditError, AuditOptions, Progress, audit
from safeload.audit_cache import DB_NAME
from safeload.audit_views import load_baseline, reapply_waivers
from safeload.cli import main
from safeload.model import Verdict, make_finding
from safeload.policy import load_policy
from safeload.report import render
from tests.pickle_builder import exec_payload


def _torch_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"layer.weight": torch.ones(4, 3), "layer.bias": torch.zeros(4)}, buf)
    return buf.getvalue()


def _hf_model(hub: Path, repo: str, files: dict[str, bytes], revs: tuple[str, ...]) -> None:
    """huggingface_hub's cache: snapshots/<rev>/<name> -> ../../blobs/<sha256>, refs/main -> rev."""
    model = hub / f"models--{repo.replace('/', '--')}"
    (model / "blobs").mkdir(parents=True)
    (model / "refs").mkdir()
    # a commit id, as huggingface_hub writes it; this one starts with an opcode byte ('a' is APPEND)
    (model / "refs" / "main").write_text("a" + hashlib.sha1(revs[-1].encode()).hexdigest()[1:])
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (model / "blobs" / sha).write_bytes(data)
        for rev in revs:
            link = model / "snapshots" / rev / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path("..") / ".." / "blobs" / sha)


@pytest.fixture
def registry(tmp_path: Path, marker: Path) -> Path:
    root = tmp_path / "registry"
    hub = root / "hub"
    torch_bytes = _torch_bytes()
    _hf_model(hub, "org/good", {"pytorch_model.bin": torch_bytes}, revs=("rev1", "rev2"))
    _hf_model(hub, "org/evil", {"pytorch_model.bin": exec_payload(marker)}, revs=("main1",))
    numpy_pickle = pickle.dumps({"mean": np.arange(3, dtype=np.float32)}, protocol=4)
    _hf_model(hub, "org/stats", {"stats.pkl": numpy_pickle}, revs=("r",))
    copies = root / "copies"
    copies.mkdir()
    (copies / "dup.pt").write_bytes(torch_bytes)  # same bytes as the good blob, another inode
    buf = io.BytesIO()
    np.save(buf, np.eye(3))
    (copies / "eye.npy").write_bytes(buf.getvalue())
    (copies / "vanished.pt").symlink_to(copies / "gone.pt")  # a link whose file is gone
    os.mkfifo(copies / "pipe.pt")  # reading it would block: reported, never opened
    (copies / "notes.txt").write_text("not a model\n")
    return root


def _paths(run: object) -> dict[str, Verdict]:
    return {os.path.relpath(r.path, run.roots[0]): r.verdict for r in run.reports}  # type: ignore[attr-defined]


def test_registry_audit_with_cache(registry: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    events: list[Progress] = []
    first = audit([str(registry)], AuditOptions(cache_dir=cache, jobs=2), progress=events.append)
    seen = _paths(first)
    good_links = [
        "hub/models--org--good/snapshots/rev1/pytorch_model.bin",
        "hub/models--org--good/snapshots/rev2/pytorch_model.bin",
    ]
    for link in good_links:
        assert seen[link] is Verdict.SAFE
    assert not [p for p in seen if "/blobs/" in p]  # blobs are reported under the links to them
    assert seen["hub/models--org--evil/snapshots/main1/pytorch_model.bin"] is Verdict.UNSAFE
    assert seen["hub/models--org--stats/snapshots/r/stats.pkl"] is Verdict.SAFE
    assert seen["copies/dup.pt"] is Verdict.SAFE and seen["copies/eye.npy"] is Verdict.SAFE
    for bad in ("copies/vanished.pt", "copies/pipe.pt"):
        assert seen[bad] is Verdict.UNSCANNABLE
        (report,) = [r for r in first.reports if r.path.endswith(bad)]
        assert report.findings[0].code == "SL206"
    skipped = {os.path.relpath(p, registry) for p in first.skipped}
    assert "copies/notes.txt" in skipped and "hub/models--org--good/refs/main" in skipped
    assert first.exit_code == 1

    good = [r for r in first.reports if r.path.endswith(tuple(good_links)) or r.path.endswith("dup.pt")]
    assert len({r.sha256 for r in good}) == 1  # one content, three paths
    assert first.stats.paths == len(first.reports) + len(first.skipped)
    # good blob, evil blob, stats blob, eye.npy, notes.txt, and dup.pt unless the worker that hashed
    # it had scanned the good blob already (each worker remembers what it scanned); refs are
    # recognised as refs and not scanned
    assert first.counts.scanned in (5, 6) and first.counts.from_cache == 0
    assert events[0].path is None and events[-1].done == events[-1].total

    exec_row = next(c for c in first.inventory if c.name == "builtins.exec")
    assert exec_row.files == 1 and not exec_row.allowed and exec_row.allowed_by == ()
    numpy_rows = [c for c in first.inventory if c.name.startswith("numpy")]
    assert numpy_rows and all("default" in c.allowed_by and "strict" not in c.allowed_by for c in numpy_rows)
    checks = {c.policy: c for c in first.policy_checks}
    assert set(checks) == {"default", "strict"}
    strict_blocked = {os.path.basename(p) for b in checks["strict"].blocked for p in b.paths}
    default_blocked = {os.path.basename(p) for b in checks["default"].blocked for p in b.paths}
    assert "stats.pkl" in strict_blocked and "stats.pkl" not in default_blocked
    assert "pytorch_model.bin" in default_blocked and "vanished.pt" in default_blocked

    # unchanged registry: nothing scanned anew, nothing even re-hashed, same reports
    events.clear()
    second = audit([str(registry)], AuditOptions(cache_dir=cache, jobs=2), progress=events.append)
    assert second.counts.scanned == 0
    assert second.counts.from_cache == 6 and second.counts.hash_cache_hits == 6
    fresh = {os.path.basename(e.path) for e in events if e.path is not None and not e.cached}
    assert fresh == {"vanished.pt", "pipe.pt"}  # what cannot be read is never cached
    assert second.reports == first.reports and second.skipped == first.skipped
    assert second.inventory == first.inventory and second.exit_code == 1

    # one file changes: only it is scanned again
    (registry / "copies" / "dup.pt").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    third = audit([str(registry)], AuditOptions(cache_dir=cache))
    assert third.counts.scanned == 1 and third.counts.from_cache == 5


def test_duplicates_by_content_are_scanned_once_when_their_hash_is_known(
    registry: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    audit([str(registry)], AuditOptions(cache_dir=cache))
    rehashed = audit([str(registry)], AuditOptions(cache_dir=cache, rehash=True, jobs=2))
    assert rehashed.counts.hash_cache_hits == 0
    # every file is hashed again, and results are still reused by content
    assert rehashed.counts.scanned == 0 and rehashed.counts.from_cache == 6
    # a fresh result cache, known hashes: the good blob and dup.pt share one scan
    with contextlib.closing(sqlite3.connect(cache / DB_NAME)) as db, db:
        db.execute("DELETE FROM results")
    again = audit([str(registry)], AuditOptions(cache_dir=cache))
    assert again.counts.scanned == 5 and again.counts.from_cache == 0


def test_jobs_do_not_change_the_result(registry: Path) -> None:
    one = audit([str(registry)], AuditOptions(jobs=1))
    two = audit([str(registry)], AuditOptions(jobs=2))
    # The reports are the same; only how many copies were scanned twice may differ (once per
    # worker that met them), and that is no part of a report.
    assert render(one, "json") == render(two, "json")
    assert one.counts.scanned == 5 and two.counts.scanned in (5, 6)


def test_copies_are_scanned_once_and_each_is_reported_under_its_own_path(
    tmp_path: Path, marker: Path
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    good, evil = _torch_bytes(), exec_payload(marker)
    for i in range(3):  # separate files (separate inodes): only their bytes say they are copies
        (tree / f"good{i}.pt").write_bytes(good)
        (tree / f"evil{i}.pkl").write_bytes(evil)
    cache = tmp_path / "cache"
    run = audit([str(tree)], AuditOptions(cache_dir=cache))
    assert run.counts.scanned == 2 and run.stats.files == 2 and run.counts.from_cache == 0
    verdicts = _paths(run)
    assert verdicts == {
        **{f"good{i}.pt": Verdict.SAFE for i in range(3)},
        **{f"evil{i}.pkl": Verdict.UNSAFE for i in range(3)},
    }
    for report in run.reports:
        assert os.path.basename(report.path) in verdicts
        if report.path.endswith(".pkl"):
            assert any(f.global_name == "builtins.exec" for f in report.findings)
    # A new copy (no known stat key) is found in the cache by its hash, not scanned again.
    (tree / "good3.pt").write_bytes(good)
    again = audit([str(tree / "good3.pt")], AuditOptions(cache_dir=cache))
    assert again.counts.scanned == 0 and again.counts.from_cache == 1
    assert again.reports[0].verdict is Verdict.SAFE and again.reports[0].path.endswith("good3.pt")
    # Bytes that differ from a cached file by one byte are scanned, never matched.
    (tree / "evil3.pkl").write_bytes(evil + b".")
    changed = audit([str(tree / "evil3.pkl")], AuditOptions(cache_dir=cache))
    assert changed.counts.scanned == 1 and changed.counts.from_cache == 0
    assert changed.reports[0].verdict is Verdict.UNSAFE
    assert not marker.exists()


def test_results_cached_by_other_code_of_the_same_version_are_not_reused(
    registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A development build between two releases keeps the version: a result its predecessor cached
    (a verdict a fixed reader would change) must not come back."""
    options = AuditOptions(cache_dir=tmp_path / "cache")
    first = audit([str(registry)], options)
    assert audit([str(registry)], options).counts.scanned == 0  # the cache works
    monkeypatch.setattr(build_id, "install_fingerprint", lambda: "another build")
    rebuilt = audit([str(registry)], options)
    assert rebuilt.counts.from_cache == 0 and rebuilt.counts.scanned == first.counts.scanned
    assert rebuilt.reports == first.reports
    assert audit([str(registry)], options).counts.scanned == 0  # cached again, for this build


def test_a_result_for_want_of_an_optional_package_is_never_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marker: Path
) -> None:
    """Installing the package must make the next audit read the file: nothing stale comes back."""
    import lz4.frame

    from safeload.formats import compressed

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "model.pkl.lz4").write_bytes(lz4.frame.compress(exec_payload(marker)))
    options = AuditOptions(cache_dir=tmp_path / "cache")
    with monkeypatch.context() as m:
        m.setitem(compressed._OPTIONAL, "lz4", "safeload_no_such_module")
        (missing,) = audit([str(folder)], options).reports
        assert missing.verdict is Verdict.UNSCANNABLE and [f.code for f in missing.findings] == ["SL208"]
    (installed,) = audit([str(folder)], options).reports
    assert installed.verdict is Verdict.UNSAFE
    assert "builtins.exec" in {g.name for s in installed.streams for g in s.globals}


def test_file_vanishing_mid_audit_is_reported_and_the_audit_goes_on(registry: Path) -> None:
    victim = registry / "copies" / "eye.npy"

    def delete_after_the_walk(event: Progress) -> None:
        if event.path is None and victim.exists():
            victim.unlink()

    run = audit([str(registry)], AuditOptions(), progress=delete_after_the_walk)
    (report,) = [r for r in run.reports if r.path.endswith("eye.npy")]
    assert report.verdict is Verdict.UNSCANNABLE and "vanished" in report.findings[0].message
    assert any(r.path.endswith("dup.pt") and r.verdict is Verdict.SAFE for r in run.reports)


def test_waivers_are_applied_and_stay_visible_and_expire(registry: Path, tmp_path: Path) -> None:
    blob = next((registry / "hub" / "models--org--stats" / "blobs").iterdir())
    plain = audit([str(blob)], AuditOptions(policy="strict"))
    (report,) = plain.reports
    assert report.verdict is Verdict.UNSAFE
    names = sorted({f.global_name for f in report.findings if f.code == "SL101" and f.global_name})
    waives = "".join(
        f'[[waive]]\nsha256 = "{report.sha256}"\ncode = "SL101"\nglobal = "{n}"\nreason = "numpy stats, reviewed"\n'
        f"expires = 2099-01-01\n"
        for n in names
    )
    policy = tmp_path / "waive.toml"
    policy.write_text(f'schema_version = 1\nname = "w"\nextends = ["strict"]\n{waives}')
    cache = tmp_path / "cache"
    waived = audit([str(blob)], AuditOptions(policy=str(policy), cache_dir=cache))
    (wreport,) = waived.reports
    assert wreport.verdict is Verdict.SAFE and waived.exit_code == 0
    assert {f.global_name for f in wreport.findings if f.waived} == set(names)
    cached = audit([str(blob)], AuditOptions(policy=str(policy), cache_dir=cache))
    assert cached.counts.from_cache == 1 and cached.reports == waived.reports
    # the same cached report judged by a policy whose waiver is gone (expired, removed) is unsafe again
    unwaived = reapply_waivers(wreport, load_policy("strict"))
    assert unwaived.verdict is Verdict.UNSAFE and not any(f.waived for f in unwaived.findings)


def test_baseline_reports_only_what_is_new(registry: Path, tmp_path: Path, marker: Path) -> None:
    old = tmp_path / "old.json"
    assert main(["audit", str(registry), "--format", "json", "-o", str(old), "--no-progress"]) == 1
    same = audit([str(registry)], AuditOptions(baseline=old))
    assert same.reports == () and same.exit_code == 0
    assert same.baseline is not None and same.baseline.suppressed > 0

    (registry / "copies" / "new-evil.pkl").write_bytes(exec_payload(marker, protocol=4))
    newer = audit([str(registry)], AuditOptions(baseline=old))
    assert [os.path.basename(r.path) for r in newer.reports] == ["new-evil.pkl"]
    assert newer.exit_code == 1
    # identity is sha256 + rule + global: the old malicious file under a new name is not new
    evil_blob = next((registry / "hub" / "models--org--evil" / "blobs").iterdir())
    (registry / "copies" / "new-evil.pkl").unlink()
    (registry / "copies" / "renamed.bin").write_bytes(evil_blob.read_bytes())
    assert audit([str(registry)], AuditOptions(baseline=old)).exit_code == 0

    bad = tmp_path / "bad.json"
    bad.write_text('{"reports": 3}')
    assert main(["audit", str(registry), "--baseline", str(bad), "--no-progress"]) == 3


def test_cli_writes_reports_atomically_and_prints_plain_progress(
    registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.html"
    assert main(["audit", str(registry), "-o", str(out), "--jobs", "2", "--cache", str(tmp_path / "c")]) == 1
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "safeload audit report" in page
    err = capsys.readouterr().err
    assert "UNSAFE" in err and "pytorch_model.bin" in err and "[" in err  # one plain line per file
    sarif = tmp_path / "r.sarif"
    assert main(["audit", str(registry), "-o", str(sarif), "--no-progress"]) == 1
    assert json.loads(sarif.read_text())["version"] == "2.1.0"
    assert main(["audit", str(registry / "copies" / "eye.npy"), "--no-progress", "--format", "markdown"]) == 0
    assert "## safeload audit: 0 unsafe, 0 unscannable, 1 safe" in capsys.readouterr().out


def test_ctrl_c_leaves_no_report(registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report.json"
    real = audit_workers.Scanner.scan
    calls = []

    def interrupted(self: object, path: str) -> object:
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, path)  # type: ignore[arg-type]

    monkeypatch.setattr(audit_workers.Scanner, "scan", interrupted)
    assert main(["audit", str(registry), "-o", str(out), "--no-progress"]) == 130
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report")] == []


def test_usage_errors(registry: Path) -> None:
    assert main(["audit", str(registry), "--jobs", "0", "--no-progress"]) == 3
    assert main(["audit", str(registry), "--policy", "no-such-policy", "--no-progress"]) == 3
    with pytest.raises(AuditError):
        audit([str(registry)], AuditOptions(jobs=0))


# -- the pieces, without the scanner ---------------------------------------------------------------


def test_collect_groups_links_with_their_blob_and_cuts_directory_loops(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    _hf_model(hub, "a/b", {"w.bin": b"\x80\x04N."}, revs=("r1", "r2"))
    (hub / "loop").symlink_to(hub)  # a directory link back to the top
    (hub / "dangling.pt").symlink_to(hub / "missing")
    groups = audit_walk.collect([str(hub)])
    (blob,) = [g for g in groups if g.links]
    assert sorted(os.path.relpath(p, hub) for p in blob.reported_paths()) == [
        "models--a--b/snapshots/r1/w.bin",
        "models--a--b/snapshots/r2/w.bin",
    ]
    assert any("/blobs/" in p for p in blob.paths)  # found, but stands behind its links
    (dangling,) = [g for g in groups if g.error]
    assert dangling.paths == [str(hub / "dangling.pt")] and "cannot stat" in dangling.error
    # naming the blob itself reports it under its own path too
    named = audit_walk.collect([str(hub), str(next((hub / "models--a--b" / "blobs").iterdir()))])
    (blob,) = [g for g in named if g.links]
    assert any("/blobs/" in p for p in blob.reported_paths())


def test_cache_entries_are_validated_and_written_atomically(tmp_path: Path) -> None:
    from safeload.audit_cache import AuditCache, stat_key
    from safeload.model import ScanReport

    cache = AuditCache(tmp_path / "c")
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    before = stat_key(f.stat())
    cache.save_hashes({before: "d" * 64})
    cache.flush()
    cache.save_hashes({"other": "e" * 64})  # merged, not replaced
    cache.close()
    assert AuditCache(tmp_path / "c").load_hashes() == {before: "d" * 64, "other": "e" * 64}
    assert stat.S_IMODE((tmp_path / "c" / DB_NAME).stat().st_mode) == 0o600
    f.write_bytes(b"abc")  # same size, same bytes: ctime (and mtime) still move on
    assert stat_key(f.stat()) != before
    os.utime(f, ns=(f.stat().st_atime_ns, int(before.split(":")[3])))  # mtime set back: ctime still differs
    assert stat_key(f.stat()) != before

    report = ScanReport(path="x", sha256="e" * 64, size=3, verdict=Verdict.SAFE, policy="p", policy_hash="h")
    cache = AuditCache(tmp_path / "c")
    cache.put_report(report, "1.0")
    assert cache.get_report("e" * 64, "h", "1.0") is None  # buffered: nothing half-written is visible
    cache.close()
    cache = AuditCache(tmp_path / "c")
    assert cache.get_report("e" * 64, "h", "1.0") == report
    assert cache.get_report("e" * 64, "other-policy", "1.0") is None
    assert cache.get_report("e" * 64, "h", "2.0") is None
    cache.put_report(replace(report, sha256="f" * 64), "1.0")
    cache.flush()
    # what a scanner checks before it queries: per policy and version, and None past the limit
    assert cache.cached_shas("h", "1.0") == {"e" * 64, "f" * 64}
    assert cache.cached_shas("other-policy", "1.0") == set() == cache.cached_shas("h", "2.0")
    assert cache.cached_shas("h", "1.0", limit=1) is None
    # many at once, over several queries; misses and other policies are left out
    many = [f"{i:064x}" for i in range(1200)]
    for sha in many:
        cache.put_report(replace(report, sha256=sha), "1.0")
    cache.flush()
    got = cache.get_reports([*many, "a" * 64], "h", "1.0")
    assert set(got) == set(many) and all(got[sha].sha256 == sha for sha in many)
    assert cache.get_reports(many[:3], "other-policy", "1.0") == {}
    cache.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "c" / DB_NAME)) as db, db:
        db.execute("UPDATE results SET report = replace(report, '\"SAFE\"', '\"MAYBE\"')")
    assert AuditCache(tmp_path / "c").get_report("e" * 64, "h", "1.0") is None  # corrupt: a miss
    with contextlib.closing(sqlite3.connect(tmp_path / "c" / DB_NAME)) as db, db:
        db.execute("DELETE FROM results")
    unreadable_ = replace(report, findings=(make_finding("SL206", "gone"),))
    cache = AuditCache(tmp_path / "c")
    cache.put_report(unreadable_, "1.0")  # circumstances of one run are never reused
    cache.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "c" / DB_NAME)) as db:
        assert db.execute("SELECT count(*) FROM results").fetchone() == (0,)


def test_an_unusable_cache_file_is_set_aside(tmp_path: Path) -> None:
    from safeload.audit_cache import AuditCache

    root = tmp_path / "c"
    root.mkdir()
    (root / DB_NAME).write_bytes(b"not a database, " * 100)
    cache = AuditCache(root)
    assert cache.load_hashes() == {}
    cache.save_hashes({"k": "a" * 64})
    cache.close()
    assert AuditCache(root).load_hashes() == {"k": "a" * 64}
    assert [p.name.startswith(DB_NAME + ".unusable-") for p in root.iterdir() if "unusable" in p.name] == [
        True
    ]


def test_an_interrupted_audit_keeps_what_it_committed(registry: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    seen: list[Progress] = []

    def interrupt_after_two(event: Progress) -> None:
        seen.append(event)
        if sum(e.verdict is Verdict.SAFE for e in seen) == 2:  # two files scanned (and cacheable)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        audit([str(registry)], AuditOptions(cache_dir=cache), progress=interrupt_after_two)
    # Whatever was scanned before Ctrl-C is whole in the cache; the next run reuses it.
    again = audit([str(registry)], AuditOptions(cache_dir=cache))
    assert again.counts.from_cache >= 1 and again.counts.scanned + again.counts.from_cache == 6


def test_baseline_files_are_checked(tmp_path: Path) -> None:
    for text in ("not json", "[]", '{"reports": [1]}', '{"reports": [{"findings": [{"no": "code"}]}]}'):
        bad = tmp_path / "b.json"
        bad.write_text(text)
        with pytest.raises(AuditError):
            load_baseline(bad)
    with pytest.raises(AuditError):
        load_baseline(tmp_path / "missing.json")


def test_progress_bar_on_a_terminal_shows_names_as_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "x[red]y.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))  # "[red]" is rich markup
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(["audit", str(folder), "-o", str(tmp_path / "r.json")]) == 0
    assert "auditing" in terminal.getvalue()  # the bar, not plain lines
    assert "x[red]y.pkl" in terminal.getvalue()  # shown as the name it is, not as a style
    assert "1 paths, 1 distinct files" in terminal.getvalue()


def _many(tmp_path: Path, n: int) -> Path:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(n):
        (folder / f"s{i}.pkl").write_bytes(pickle.dumps({"i": i}, protocol=4))
    return folder


def test_a_killed_worker_costs_no_file_its_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker is killed while batches are still waiting in the pool, as the OOM killer would.
    Every file still gets its own verdict: what the dead pool left is scanned one file at a time."""
    import multiprocessing
    import signal
    import time

    folder = _many(tmp_path, 120)
    gate = tmp_path / "gate"
    real_batch = audit_workers.Scanner.batch

    def held_batch(
        self: audit_workers.Scanner, tasks: list[audit_workers.Task]
    ) -> list[audit_workers.Result]:
        # Only the batch holding s0.pkl runs at once; the others wait until the pool a worker
        # was killed in has been given up, so the kill always finds batches pending.
        deadline = time.monotonic() + 60
        while (
            not any(t.endswith("/s0.pkl") for t in tasks)
            and not gate.exists()
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        return real_batch(self, tasks)

    # Forked workers inherit the patched method (a forkserver or spawn worker would not).
    monkeypatch.setattr(audit_pool, "_pool_context", lambda: multiprocessing.get_context("fork"))
    monkeypatch.setattr(audit_workers.Scanner, "batch", held_batch)
    isolated: list[int] = []
    real_isolated = audit_pool._run_isolated
    seen: list[str] = []
    done_in_pool: list[int] = []

    def spy(tasks, *args):  # type: ignore[no-untyped-def]
        isolated.append(len(tasks))
        done_in_pool.append(len(seen))
        # The gate opens only once the broken pool has been given up: a surviving worker let
        # through earlier could race the pool's own notice of the death and finish batches.
        gate.touch()
        return real_isolated(tasks, *args)

    monkeypatch.setattr(audit_pool, "_run_isolated", spy)
    killed: list[int] = []

    def kill_a_worker(event: Progress) -> None:
        if event.path is not None:
            seen.append(event.path)
        if event.path is not None and not killed:
            for child in multiprocessing.active_children():
                if child.pid is not None:
                    os.kill(child.pid, signal.SIGKILL)
                    killed.append(child.pid)
                    break

    run = audit([str(folder)], AuditOptions(jobs=2), progress=kill_a_worker)
    assert killed
    assert len(run.reports) == 120 and all(r.verdict is Verdict.SAFE for r in run.reports)
    assert run.exit_code == 0
    # Only the first batch ran in the pool; every other was held there when the worker died
    # and is run again, one file at a time.
    assert done_in_pool and 0 < done_in_pool[0] <= 32
    assert isolated == [120 - done_in_pool[0]]


def test_workers_that_always_die_fail_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ProcessPoolExecutor

    folder = _many(tmp_path, 6)
    policy = load_policy("default")

    def dying_pool(config: audit_workers.PoolConfig, policy: object, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, initializer=os._exit, initargs=(3,))

    monkeypatch.setattr(audit_pool, "_new_pool", dying_pool)
    done: dict[str, object] = {}
    tasks = [str(p) for p in sorted(folder.iterdir())]
    config = audit_workers.PoolConfig("default", (), None, 2)
    audit_pool.run_parallel(tasks, config, policy, lambda path, o: done.setdefault(path, o))
    assert set(done) == set(tasks)
    for outcome in done.values():
        assert outcome.report.verdict is Verdict.UNSCANNABLE  # type: ignore[attr-defined]
        assert outcome.report.findings[0].code == "SL207"  # type: ignore[attr-defined]
    messages = [o.report.findings[0].message for o in done.values()]  # type: ignore[attr-defined]
    assert messages.count("the worker process scanning this file died") == 3
    assert messages.count("worker processes keep dying") == 3


def test_a_pool_that_breaks_while_batches_are_handed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers can die before every batch is submitted (a crash on the first file, under load):
    submit itself then raises. The audit must go on one file at a time, never end in a traceback."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    folder = _many(tmp_path, 6)
    policy = load_policy("default")
    pools: list[str] = []

    class Breaking:
        def __init__(self) -> None:
            self.submitted = 0

        def submit(self, fn: object, batch: list[audit_workers.Task]) -> Future[object]:
            self.submitted += 1
            if self.submitted > 1:
                raise BrokenProcessPool("a worker died while batches were handed out")
            future: Future[object] = Future()
            future.set_exception(BrokenProcessPool("died"))
            return future

        def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
            pass

    class InProcess(Breaking):
        def submit(self, fn: object, batch: list[audit_workers.Task]) -> Future[object]:
            future: Future[object] = Future()
            future.set_result(audit_workers.Scanner(policy, None).batch(batch))
            return future

    def new_pool(config: audit_workers.PoolConfig, policy_: object, workers: int) -> object:
        pools.append("round" if not pools else "isolated")
        return Breaking() if len(pools) == 1 else InProcess()

    monkeypatch.setattr(audit_pool, "_new_pool", new_pool)
    done: dict[str, audit_workers.Outcome] = {}
    tasks = [str(p) for p in sorted(folder.iterdir())]
    audit_pool.run_parallel(tasks, audit_workers.PoolConfig("default", (), None, 2), policy, done.setdefault)
    assert pools[0] == "round" and "isolated" in pools
    assert set(done) == set(tasks)
    assert {o.report.verdict for o in done.values()} == {Verdict.SAFE}


def test_a_locked_cache_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another audit holding the cache past the timeout means no cache for this run, never a
    cache set aside as unusable."""
    from safeload import audit_cache
    from safeload.audit_cache import AuditCache

    root = tmp_path / "c"
    first = AuditCache(root)
    first.save_hashes({"k": "a" * 64})
    first.close()
    monkeypatch.setattr(audit_cache, "_BUSY_TIMEOUT_S", 0.1)
    with contextlib.closing(sqlite3.connect(root / DB_NAME, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        blocked = AuditCache(root)
        assert blocked.load_hashes() == {}
        blocked.close()
        other.execute("ROLLBACK")
    assert sorted(p.name for p in root.iterdir() if "unusable" in p.name) == []
    assert AuditCache(root).load_hashes() == {"k": "a" * 64}


def test_workers_are_forked_only_while_no_other_thread_runs() -> None:
    # A fork starts at once with the scanner imported; with another thread running (rich's progress
    # refresher) a fork could copy a lock that thread holds, so a forkserver starts the workers.
    assert audit_pool._pool_context().get_start_method() == "fork"
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert audit_pool._pool_context().get_start_method() == "forkserver"
    finally:
        stop.set()
        other.join()


def test_a_pool_whose_workers_all_vanished_unnoticed_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """concurrent.futures can miss that every worker died and leave their futures pending forever;
    the audit notices that no worker is alive and reports those files instead of hanging."""
    from concurrent.futures import Future

    class Dead:
        def is_alive(self) -> bool:
            return False

    class Silent:
        """An executor whose workers are gone and whose futures never complete."""

        def __init__(self) -> None:
            self._processes = {1: Dead(), 2: Dead()}

        def submit(self, *args: object) -> Future[object]:
            return Future()

        def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
            pass

    folder = _many(tmp_path, 4)
    monkeypatch.setattr(audit_pool, "_new_pool", lambda config, policy, workers: Silent())
    monkeypatch.setattr(audit_pool, "STALL_CHECK_S", 0.05)
    done: dict[str, object] = {}
    tasks = [str(p) for p in sorted(folder.iterdir())]
    config = audit_workers.PoolConfig("default", (), None, 2)
    audit_pool.run_parallel(tasks, config, load_policy("default"), lambda path, o: done.setdefault(path, o))
    assert set(done) == set(tasks)
    for outcome in done.values():
        assert outcome.report.findings[0].code == "SL207"  # type: ignore[attr-defined]
    messages = [o.report.findings[0].message for o in done.values()]  # type: ignore[attr-defined]
    assert messages.count("the worker process scanning this file died") == 3


def test_a_file_swapped_for_a_fifo_after_the_walk_never_blocks_the_audit(tmp_path: Path) -> None:
    """The walk listed a regular file; the worker opens the FIFO put in its place since: reported,
    never waited on."""
    import threading

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    scanner = audit_workers.Scanner(load_policy("default"), None)
    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(scanner.safe_process(str(fifo))), daemon=True)
    worker.start()
    worker.join(30)
    assert out, "the audit blocked on a FIFO"
    report = out[0].report  # type: ignore[attr-defined]
    assert report.verdict is Verdict.UNSCANNABLE
    assert any("not a regular file" in f.message for f in report.findings)


def test_the_ref_check_never_waits_on_a_fifo(tmp_path: Path) -> None:
    """The walk reads files of a git ref's size (40 or 41 bytes): one swapped for a FIFO is no ref."""
    import stat
    import threading

    from safeload import audit_walk

    fifo = tmp_path / "main"
    os.mkfifo(fifo)
    ref = tmp_path / "ref"
    ref.write_text("0123456789abcdef0123456789abcdef01234567\n")
    seen = os.stat(ref)  # what the walk's listing said: a regular file of 41 bytes
    assert seen.st_size == 41 and stat.S_ISREG(seen.st_mode)
    out: list[bool] = []
    worker = threading.Thread(target=lambda: out.append(audit_walk.is_ref(str(fifo), seen)), daemon=True)
    worker.start()
    worker.join(30)
    assert out == [False]
    assert audit_walk.is_ref(str(ref), seen) is True


def test_the_objects_forked_workers_share_are_frozen_while_they_run(tmp_path: Path) -> None:
    """Frozen while workers run (their collections would copy every shared page), thawed after;
    a caller that froze objects itself keeps them frozen."""
    import gc

    folder = _many(tmp_path, 6)
    tasks = [str(p) for p in sorted(folder.iterdir())]
    config = audit_workers.PoolConfig("default", (), None, 2)
    policy = load_policy("default")
    for callers_own in (False, True):
        if callers_own:
            gc.freeze()
        during: list[int] = []
        try:
            audit_pool.run_parallel(
                tasks, config, policy, lambda path, o, seen=during: seen.append(gc.get_freeze_count())
            )
            assert len(during) == len(tasks)
            assert all(n > 0 for n in during)
            # thawed only by whoever froze: the caller's objects stay frozen (some may be freed)
            assert gc.get_freeze_count() > 0 if callers_own else gc.get_freeze_count() == 0
        finally:
            gc.unfreeze()


def test_a_run_of_scans_in_one_process_freezes_what_it_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """audit --jobs 1 and scan DIR: objects made before the scans are frozen while they run, thawed after."""
    import gc

    import safeload.api

    folder = _many(tmp_path, 4)
    during: list[int] = []
    audit([str(folder)], AuditOptions(jobs=1), progress=lambda e: during.append(gc.get_freeze_count()))
    assert len(during) == 5 and all(n > 0 for n in during[1:])  # the first event only gives the total
    assert gc.get_freeze_count() == 0

    real_scan = safeload.api.scan
    scanned: list[int] = []

    def counting_scan(*args, **kwargs):  # type: ignore[no-untyped-def]
        scanned.append(gc.get_freeze_count())
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(safeload.api, "scan", counting_scan)
    assert main(["scan", str(folder)]) == 0
    assert len(scanned) == 4 and all(n > 0 for n in scanned)
    assert gc.get_freeze_count() == 0
