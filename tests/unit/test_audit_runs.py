"""The reports an audit keeps for replay: records that say what they stored, kept by last use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safeload.audit_runs import KEEP_RUNS, RunRecord, RunStore


def _record(report: bytes, exit_code: int = 1) -> RunRecord:
    return RunRecord(
        valid_until="2030-01-01",
        sources=[("/etc/policy.toml", "ab" * 32)],
        exit_code=exit_code,
        summary={"paths": 3, "files": 2, "skipped": 0},
        length=len(report),
    )


def test_a_stored_run_reads_back_as_it_was_stored(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "cache")
    assert store.get("k1") is None and store.latest_manifest("cmd") is None  # nothing yet, no error
    report = "résumé: ok\n".encode()
    store.put("k1", _record(report), report, manifest=("cmd", b'{"format":1}'))
    got = store.get("k1")
    assert got is not None
    assert (got.valid_until, got.sources, got.exit_code, got.summary, got.length) == (
        "2030-01-01",
        [("/etc/policy.toml", "ab" * 32)],
        1,
        {"paths": 3, "files": 2, "skipped": 0},
        len(report),
    )
    assert store.read_report("k1", got.length) == report and store.report_is_whole("k1", got.length)
    assert store.latest_manifest("cmd") == ("k1", b'{"format":1}')
    assert store.latest_manifest("other") is None


def test_a_report_cut_short_is_no_report(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.put("k1", _record(b"0123456789"), b"0123456789")
    (tmp_path / "runs" / "k1").write_bytes(b"012345678")
    assert store.read_report("k1", 10) is None and not store.report_is_whole("k1", 10)
    (tmp_path / "runs" / "k1").write_bytes(b"0123456789!")
    assert store.read_report("k1", 10) is None and not store.report_is_whole("k1", 10)


@pytest.mark.parametrize(
    "change",
    [
        {"exit_code": "1"},
        {"exit_code": True},
        {"length": -1},
        {"length": 1.5},
        {"valid_until": 20300101},
        {"sources": "x"},
        {"sources": [["only a label"]]},
        {"sources": [["label", 7]]},
        {"summary": []},
    ],
)
def test_a_record_of_another_shape_is_a_miss(tmp_path: Path, change: dict[str, object]) -> None:
    store = RunStore(tmp_path)
    store.put("k1", _record(b"r"), b"r")
    record = tmp_path / "runs" / "k1.json"
    data = json.loads(record.read_bytes())
    assert store.get("k1") is not None
    record.write_text(json.dumps({**data, **change}))
    assert store.get("k1") is None
    with pytest.raises(ValueError):
        RunRecord.from_json(record.read_bytes())


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b"{}", b'{"sources": []}', b"\xff\xfe"])
def test_a_record_that_is_no_record_is_a_miss(tmp_path: Path, raw: bytes) -> None:
    store = RunStore(tmp_path)
    store.put("k1", _record(b"r"), b"r")
    (tmp_path / "runs" / "k1.json").write_bytes(raw)
    assert store.get("k1") is None


def test_the_most_recently_used_runs_are_kept(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    keys = [f"k{i:02d}" for i in range(KEEP_RUNS + 3)]
    for i, key in enumerate(keys):
        store.put(key, _record(b"r"), b"r", manifest=("cmd", key.encode()))
        if i == 0:
            first = key
        else:
            store.touch(first)  # used at every run: never the oldest
    kept = {p.name.split(".", 1)[0] for p in (tmp_path / "runs").iterdir()}
    assert len(kept) == KEEP_RUNS
    assert first in kept and keys[-1] in kept
    assert kept == {first, *keys[-(KEEP_RUNS - 1) :]}
    # the manifest that explains a miss is the one of the run used last
    assert store.latest_manifest("cmd") == (first, first.encode())
    store.touch(keys[-2])
    assert store.latest_manifest("cmd") == (keys[-2], keys[-2].encode())


def test_touch_with_a_record_replaces_it(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.put("k1", _record(b"r"), b"r")
    record = _record(b"r", exit_code=0)
    record.summary = {"paths": 3, "files": 2, "skipped": 0, "output": ["/x", "1:2:3:4:5"]}
    store.touch("k1", record)
    got = store.get("k1")
    assert got is not None and got.exit_code == 0 and got.summary["output"] == ["/x", "1:2:3:4:5"]


def test_files_of_no_kept_run_are_removed_and_writes_in_progress_left(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "old").write_bytes(b"a report of an earlier layout, with no record")
    (runs / "old.cmd.manifest").write_bytes(b"{}")
    (runs / ".k2.123.tmp").write_bytes(b"another audit's write in progress")
    RunStore(tmp_path).put("k1", _record(b"r"), b"r")
    assert sorted(p.name for p in runs.iterdir()) == [".k2.123.tmp", "k1", "k1.json"]


def test_a_cache_that_cannot_be_written_stores_nothing_and_raises_nothing(tmp_path: Path) -> None:
    (tmp_path / "runs").write_bytes(b"a file where the folder would be")
    store = RunStore(tmp_path)
    store.put("k1", _record(b"r"), b"r")
    store.touch("k1")
    assert store.get("k1") is None and store.latest_manifest("cmd") is None
