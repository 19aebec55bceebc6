"""The compiled walk that keys a replay (audit_treewalk) gives the very bytes that the Python walk's
entries give (audit_walk.key_records), or None where the Python walk reports a path it could not
list: a replayed report must stand for the tree exactly as an audit walks it."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safeload import audit_memo
from safeload.audit_runs import RunRecord, RunStore
from safeload.audit_walk import built_after, fast_key_records, key_records, walk

try:
    from safeload import audit_treewalk_c  # type: ignore[attr-defined]  # noqa: F401

    COMPILED = True
except ImportError:
    COMPILED = False

# The walk is compiled on Linux wherever the walker is (scripts/test.sh requires both).
needs_compiled = pytest.mark.skipif(not COMPILED, reason="audit_treewalk is compiled on Linux only")


def same(roots: list[str], exclude: list[str] | None = None, report: str | None = None) -> bytes:
    exclude = exclude or []
    python = key_records(walk(roots, exclude, report))
    compiled = fast_key_records(roots, exclude, report)
    assert compiled is not None
    assert compiled == python
    return compiled


def _files(records: bytes) -> list[tuple[bytes, bool, bool]]:
    """(path, named, link) of each file record, read by the layout key_records documents."""
    out, pos = [], 0
    while pos < len(records):
        nul = records.index(b"\0", pos)
        kind, named, link = records[nul + 1 : nul + 4]
        assert kind == ord("F")
        out.append((records[pos:nul], bool(named), bool(link)))
        pos = nul + 4 + 48  # device, inode, size: 8 bytes each; each time: 8 and 4
    assert pos == len(records)
    return out


def _file(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@needs_compiled
def test_a_tree_of_links_loops_and_copies(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    _file(root / "a" / "model.pt", b"1")
    _file(root / "a" / "b" / "c" / "deep.bin", b"2")
    _file(root / "z.pkl", b"3")
    (root / "empty").mkdir()
    (root / "link-to-file").symlink_to(root / "z.pkl")
    (root / "a" / "b" / "up").symlink_to(root / "a")  # a loop: cut where the walk meets it again
    (root / "again").symlink_to(root / "a" / "b")  # one directory by two paths: listed once
    (root / "rel").symlink_to("a/b/c")
    os.link(root / "z.pkl", root / "hard.pkl")
    records = same([str(root)])
    assert len(_files(records)) == len(walk([str(root)])) == 5
    # Two roots walk apart (each its own loop check); the same root twice is listed twice.
    same([str(root / "a"), str(root)])
    same([str(root), str(root)])
    same([str(root) + "/", str(root / "a") + "//"])


@needs_compiled
def test_a_hugging_face_cache(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--m"
    blob = _file(repo / "blobs" / ("ab" * 32), b"weights")
    _file(repo / "refs" / "main", b"c" * 40)
    for rev in ("r1", "r2"):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "pytorch_model.bin").symlink_to(
            os.path.relpath(blob, repo / "snapshots" / rev)
        )
    same([str(tmp_path / "hub")])


@needs_compiled
def test_the_cache_and_the_report_are_left_out_as_the_python_walk_leaves_them(tmp_path: Path) -> None:
    root = tmp_path / "reg"
    _file(root / "m.pt")
    _file(root / "cache" / "cache.sqlite3")
    _file(root / "out.json", b"{}")
    _file(root / ".out.json.123.tmp")
    _file(root / ".out.json.tmp")  # no twin: no name between the dots
    _file(root / "sub" / "out.json")  # another folder's out.json is a file like any other
    with_both = same([str(root)], [str(root / "cache")], str(root / "out.json"))
    assert b"cache.sqlite3" not in with_both and b"/out.json\0" not in with_both.replace(b"sub/out.json", b"")
    assert with_both != same([str(root)])
    # Named on the command line, the report is a file to audit.
    same([str(root / "out.json")], [], str(root / "out.json"))
    same([str(root)], [str(tmp_path / "missing")], str(tmp_path / "elsewhere" / "r.json"))


@needs_compiled
def test_named_files_and_links_to_them(tmp_path: Path) -> None:
    model = _file(tmp_path / "m.pt")
    (tmp_path / "ln").symlink_to(model)
    records = same([str(model), str(tmp_path / "ln"), "./" + os.path.relpath(model)])
    flags = sorted((named, link) for _, named, link in _files(records))
    assert flags == [(True, False), (True, False), (True, True)]  # the link named as a link


@needs_compiled
def test_names_python_orders_otherwise_than_their_bytes(tmp_path: Path) -> None:
    """Which of two paths to one directory is listed depends on the order of their parents' names,
    which the walk compares as str (an undecodable byte, U+DCFF, before U+E000; its bytes after)."""
    root = tmp_path / "reg"
    target = root / "\U0010ffff"  # last as str; between the two below as bytes
    _file(target / "m.pt")
    for raw in ("\ue000".encode(), b"\xff"):
        (Path(os.fsdecode(bytes(root) + b"/" + raw))).mkdir(parents=True)
        (Path(os.fsdecode(bytes(root) + b"/" + raw + b"/to"))).symlink_to(target)
    _file(Path(os.fsdecode(bytes(root) + b"/\xfe.pkl")))
    _file(root / "é" / "m.pt")
    records = same([str(root)])
    assert b"/\xff/to/m.pt\0" in records and b"/\xee\x80\x80/to/m.pt\0" not in records


@needs_compiled
def test_timestamps_before_1970_and_past_2262(tmp_path: Path) -> None:
    old, far = _file(tmp_path / "old.pt"), _file(tmp_path / "far.pt")
    os.utime(old, ns=(-1_500_000_001, -1_500_000_001))
    try:
        os.utime(far, ns=(2**63 + 5, 2**63 + 5))  # beyond int64 nanoseconds
    except (OverflowError, OSError):
        pytest.skip("this filesystem keeps no such time")
    same([str(tmp_path)])


@needs_compiled
@pytest.mark.parametrize("kind", ["fifo", "dangling link", "missing root", "named fifo"])
def test_what_the_python_walk_reports_instead_of_listing_gives_none(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "reg"
    _file(root / "m.pt")
    roots = [str(root)]
    if kind == "fifo":
        os.mkfifo(root / "pipe")
    elif kind == "dangling link":
        (root / "gone").symlink_to(tmp_path / "nowhere")
    elif kind == "missing root":
        roots.append(str(tmp_path / "nowhere"))
    else:
        os.mkfifo(tmp_path / "pipe")
        roots.append(str(tmp_path / "pipe"))
    assert fast_key_records(roots) is None
    assert b"\0E" in key_records(walk(roots))  # the Python walk says why, and the key holds it


@needs_compiled
def test_a_root_with_a_nul_is_never_cut_short(tmp_path: Path) -> None:
    _file(tmp_path / "m.pt")
    assert fast_key_records([str(tmp_path / "m.pt") + "\0ignored"]) is None


@needs_compiled
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_random_trees(tmp_path_factory: pytest.TempPathFactory, seed: int) -> None:
    rng = random.Random(seed)
    root = tmp_path_factory.mktemp("tree")
    dirs = [root]
    names = ["a", "b", "B", "é", "\ue000", os.fsdecode(b"\xff"), "x.pt", ".h", "model.bin"]
    files: list[Path] = []
    for _ in range(rng.randint(1, 40)):
        parent = rng.choice(dirs)
        path = parent / (rng.choice(names) + str(rng.randint(0, 3)))
        if path.exists() or path.is_symlink():
            continue
        roll = rng.random()
        if roll < 0.3:
            path.mkdir()
            dirs.append(path)
        elif roll < 0.8 or not (files or len(dirs) > 1):
            path.write_bytes(bytes(rng.randint(0, 9)))
            files.append(path)
        else:
            path.symlink_to(rng.choice(files + dirs))  # to a file, to a directory, or a loop
    roots = [str(root)] + [str(rng.choice(files + dirs)) for _ in range(rng.randint(0, 2))]
    report = str(rng.choice(files)) if files and rng.random() < 0.3 else None
    exclude = [str(rng.choice(dirs))] if rng.random() < 0.3 else []
    same(roots, exclude, report)


def test_a_change_after_the_key_is_taken_is_in_the_key_the_report_is_stored_under(tmp_path: Path) -> None:
    """On a miss the audit walks in Python; the report it stores is of that walk's tree."""
    root = tmp_path / "reg"
    model = _file(root / "m.pt", b"first")
    spec = audit_memo.RunSpec(
        paths=(str(root),), policy="default", allow=(), compare=(), fmt="json", verbose=False, baseline=None
    )
    store = RunStore(tmp_path / "cache")
    assert not store.any_stored()
    first = audit_memo.RunMemo(store, spec, exclude=[], report=None)
    assert first._entries is not None  # nothing stored: the audit's own walk keys it, no other
    record = RunRecord(valid_until=None, sources=[], exit_code=0, summary={}, length=1)
    store.put("another run", record, b"r")
    assert store.any_stored()
    memo = audit_memo.RunMemo(store, spec, exclude=[], report=None)
    assert (memo._entries is None) is COMPILED  # keyed by the compiled walk where there is one
    before = memo.key
    assert before == first.key
    model.write_bytes(b"second, longer")
    assert len(memo.groups) == 1
    assert memo.key != before
    assert memo.key == audit_memo.RunMemo(store, spec, exclude=[], report=None).key


def test_a_binary_older_than_its_source_is_not_used(tmp_path: Path) -> None:
    binary, source = _file(tmp_path / "walk.so"), _file(tmp_path / "walk.pyx")
    os.utime(source, ns=(10**18, 10**18))
    os.utime(binary, ns=(10**18 + 1, 10**18 + 1))
    assert built_after(str(binary), str(source))
    os.utime(source, ns=(10**18 + 2, 10**18 + 2))  # edited since the build
    assert not built_after(str(binary), str(source))
    assert built_after(str(binary), str(tmp_path / "no source, as installed"))
    assert not built_after(None, str(source))
