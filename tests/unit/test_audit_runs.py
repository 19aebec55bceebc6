"""The reports an audit keeps for replay: records that say what they stored, kept by last use."""

from __future__ import annotations

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
    ("line", "replacement"),
    [
        ("exit_code 1", "exit_code one"),
        ("exit_code 1", "exit_code +1"),
        ("exit_code 1", "exit_code 1_0"),
        ("exit_code 1", "exit_code"),
        ("exit_code 1", ""),
        ("exit_code 1", "exit_code 1\nexit_code 2"),
        ("length 1", "length -1"),
        ("length 1", "length 1.5"),
        ("length 1", "length \u0661"),
        ("safeload-run-record 1", "safeload-run-record 2"),
        ("valid_until ", "valid_until zz"),
        ("source ", "source 6f6e6c79 "),
        ("\nend\n", "\n"),
        ("source ", "sources "),
        ("summary-int ", "summary-int 7061746873 x"),
        ("summary-int ", "summary-other "),
    ],
)
def test_a_record_of_another_shape_is_a_miss(tmp_path: Path, line: str, replacement: str) -> None:
    store = RunStore(tmp_path)
    store.put("k1", _record(b"r"), b"r")
    record = tmp_path / "runs" / "k1.record"
    text = record.read_text()
    assert store.get("k1") is not None and line in text
    record.write_text(text.replace(line, replacement, 1))
    assert store.get("k1") is None
    with pytest.raises(ValueError):
        RunRecord.from_bytes(record.read_bytes())


@pytest.mark.parametrize(
    "raw",
    [b"", b"not a record", b"\xff\xfe", b'{"exit_code": 1, "length": 1}', b"safeload-run-record 1"],
)
def test_a_record_that_is_no_record_is_a_miss(tmp_path: Path, raw: bytes) -> None:
    store = RunStore(tmp_path)
    store.put("k1", _record(b"r"), b"r")
    record = tmp_path / "runs" / "k1.record"
    assert store.get("k1") is not None
    record.write_bytes(raw)
    assert store.get("k1") is None


def test_every_prefix_of_a_record_is_a_miss(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.put("k1", _record(b"r"), b"r")
    record = tmp_path / "runs" / "k1.record"
    whole = record.read_bytes()
    for cut in range(len(whole)):
        record.write_bytes(whole[:cut])
        assert store.get("k1") is None
    record.write_bytes(whole)
    assert store.get("k1") is not None


def test_any_text_survives_a_record(tmp_path: Path) -> None:
    """Labels and the output file are paths: spaces, newlines, undecodable bytes, any script."""
    odd = "/tmp/a b\nc\td\udcff\u00e9\U0001f600 policy.toml"
    record = RunRecord(
        valid_until=None,
        sources=[(odd, "ab" * 32), ("default.toml", "")],
        exit_code=-1,
        summary={"paths": 0, "output": [odd, "1:2:3:4:5"], "empty": []},
        length=0,
    )
    back = RunRecord.from_bytes(record.to_bytes())
    assert (back.valid_until, back.sources, back.exit_code, back.summary, back.length) == (
        None,
        record.sources,
        -1,
        record.summary,
        0,
    )


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
    assert sorted(p.name for p in runs.iterdir()) == [".k2.123.tmp", "k1", "k1.record"]


def test_a_cache_that_cannot_be_written_stores_nothing_and_raises_nothing(tmp_path: Path) -> None:
    (tmp_path / "runs").write_bytes(b"a file where the folder would be")
    store = RunStore(tmp_path)
    store.put("k1", _record(b"r"), b"r")
    store.touch("k1")
    assert store.get("k1") is None and store.latest_manifest("cmd") is None
