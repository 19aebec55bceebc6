"""The decompiled explanation of a flagged stream: fickling must not write into safeload's output."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from safeload.cli import main
from safeload.explain import ExplainBudget, _quiet, explain
from tests.pickle_builder import system_payload


def _malformed_payload(marker: Path) -> bytes:
    # A STACK_GLOBAL on two Nones (popped), then os.system: fickling warns about the first.
    payload = system_payload(marker, protocol=4)
    return payload[:2] + b"NN\x930" + payload[2:]


def test_fickling_really_writes_warnings_for_this_stream(marker: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # Why the muting exists: fickling itself, called directly, prints to stdout.
    from fickling.fickle import Pickled

    Pickled.load(_malformed_payload(marker)).ast  # noqa: B018
    assert "Warning: malformed pickle file" in capfd.readouterr().out
    assert not marker.exists()


def test_explaining_a_malformed_stream_prints_nothing(marker: Path, capfd: pytest.CaptureFixture[str]) -> None:
    text = explain(_malformed_payload(marker), focus=["os.system"])
    assert text is not None and "system" in text
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not marker.exists()


def test_json_on_stdout_stays_json(tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(_malformed_payload(marker))
    assert main(["scan", "--format", "json", str(path)]) == 1
    out = capsys.readouterr().out
    report = json.loads(out)  # nothing but the report
    [file_report] = report["reports"]
    assert any(s["explanation"] and "system" in s["explanation"] for s in file_report["streams"])
    assert not marker.exists()


def test_only_the_explaining_thread_is_muted(capsys: pytest.CaptureFixture[str]) -> None:
    before = sys.stdout
    with _quiet():
        print("dropped: written by the thread that explains")
        other = threading.Thread(target=print, args=("kept: written by another thread",))
        other.start()
        other.join()
    assert sys.stdout is before
    assert capsys.readouterr().out == "kept: written by another thread\n"


def test_a_budget_stops_decompiling_once_spent(marker: Path) -> None:
    payload = system_payload(marker, protocol=4)
    budget = ExplainBudget(total=2 * len(payload) + 1)
    assert explain(payload, focus=["os.system"], budget=budget) is not None
    assert explain(payload, focus=["os.system"], budget=budget) is not None
    assert explain(payload, focus=["os.system"], budget=budget) is None  # 1 byte left
    assert budget.left == 1
    assert not marker.exists()
