"""Plain progress lines (stderr is no terminal): one per file, in order, written in batches, and
none lost when the audit is interrupted."""

from __future__ import annotations

import io

import pytest

from safeload import cli_audit
from safeload.audit import Progress
from safeload.model import Verdict


class _Counting(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def isatty(self) -> bool:
        return False


def test_every_file_has_its_line_in_order_and_writes_are_few(monkeypatch: pytest.MonkeyPatch) -> None:
    err = _Counting()
    monkeypatch.setattr(cli_audit.sys, "stderr", err)
    total = 500
    with cli_audit._ProgressDisplay(enabled=True) as update:
        update(Progress(done=0, total=total))
        for i in range(1, total + 1):
            update(
                Progress(done=i, total=total, path=f"/reg/m{i}.pt", verdict=Verdict.SAFE, cached=i % 2 == 0)
            )
    lines = err.getvalue().splitlines()
    assert lines == [
        f"[{i}/{total}] SAFE        /reg/m{i}.pt{' (cached)' if i % 2 == 0 else ''}"
        for i in range(1, total + 1)
    ]
    assert err.writes < 10  # batched: a write per line would be 500


def test_lines_not_yet_written_are_written_when_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    err = _Counting()
    monkeypatch.setattr(cli_audit.sys, "stderr", err)
    with pytest.raises(KeyboardInterrupt):
        with cli_audit._ProgressDisplay(enabled=True) as update:
            update(Progress(done=1, total=9, path="/reg/a.pt", verdict=Verdict.UNSAFE))
            assert err.getvalue() == ""  # not yet: the first batch waits for its time
            raise KeyboardInterrupt
    assert err.getvalue() == "[1/9] UNSAFE      /reg/a.pt\n"


def test_a_slow_audit_shows_each_line_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    err = _Counting()
    monkeypatch.setattr(cli_audit.sys, "stderr", err)
    clock = [100.0]
    monkeypatch.setattr(cli_audit.time, "monotonic", lambda: clock[0])
    with cli_audit._ProgressDisplay(enabled=True) as update:
        for i in (1, 2):
            clock[0] += cli_audit._PLAIN_EVERY_S * 1.5  # a file took that long
            update(Progress(done=i, total=3, path=f"/reg/{i}.pt", verdict=Verdict.SAFE))
            assert err.getvalue().count("\n") == i
