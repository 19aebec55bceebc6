"""The bounded child process risky replays run in: a result comes back as data, and a step that
allocates too much, runs too long or crashes costs only itself."""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import pytest

from safeload.analysis.isolate import can_isolate, run_bounded

pytestmark = pytest.mark.skipif(not can_isolate(), reason="needs fork, RLIMIT_AS and /proc (Linux)")

MIB = 1 << 20


def test_a_result_comes_back_as_data() -> None:
    assert run_bounded(
        lambda: {"imports": [["os", "system"]], "n": 3}, memory_bytes=64 * MIB, seconds=10
    ) == (
        {"imports": [["os", "system"]], "n": 3},
        None,
    )


def test_an_allocation_past_the_bound_fails_in_the_child_only() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def greedy() -> int:
        block = bytearray(2048 * MIB)  # zero-filled: touched, as the C unpickler's memo is
        return len(block)

    result, why = run_bounded(greedy, memory_bytes=128 * MIB, seconds=10)
    assert result is None and why is not None and "memory" in why
    # Nothing of it in this process (ru_maxrss is in KiB on Linux).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024


def test_a_step_past_its_time_is_stopped() -> None:
    started = time.monotonic()
    result, why = run_bounded(lambda: time.sleep(60), memory_bytes=64 * MIB, seconds=1)
    assert result is None and why is not None and "time" in why
    assert time.monotonic() - started < 30


def test_a_step_that_burns_cpu_is_stopped_by_its_cpu_limit() -> None:
    def spin() -> None:
        while True:
            pass

    result, why = run_bounded(spin, memory_bytes=64 * MIB, seconds=1)
    assert result is None and why is not None


def test_a_crash_in_the_child_is_a_reason_not_a_crash_here() -> None:
    result, why = run_bounded(lambda: os.kill(os.getpid(), signal.SIGSEGV), memory_bytes=64 * MIB, seconds=10)
    assert result is None and why is not None and "SIGSEGV" in why


def test_an_exception_in_the_step_is_its_reason() -> None:
    def broken() -> None:
        raise ValueError("no such thing")

    assert run_bounded(broken, memory_bytes=64 * MIB, seconds=10) == (None, "ValueError: no such thing")


def test_the_child_leaves_no_process_behind() -> None:
    run_bounded(lambda: 1, memory_bytes=64 * MIB, seconds=10)
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_no_process_to_start_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refuse)
    result, why = run_bounded(lambda: 1, memory_bytes=64 * MIB, seconds=10)
    assert result is None and why is not None and "unavailable" in why


def test_readers_that_cannot_be_bounded_are_reported_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no child with capped memory can run, the readings behind a lying FRAME are not
    replayed at all, and the report says what is not known (fail closed)."""
    import safeload
    from safeload.analysis import isolate
    from tests.regressions.test_parser_differentials import lying_frame_exec

    monkeypatch.setattr(isolate, "can_isolate", lambda: False)
    report = safeload.scan_bytes(lying_frame_exec(Path("never-created")))
    stopped = [f for f in report.findings if f.code == "SL203"]
    assert {"file", "bytesio"} == {
        r for f in stopped for r in ("file", "bytesio") if f" {r} reader" in f.message
    }
    assert all("cannot run it in a process with bounded memory" in f.message for f in stopped)
    assert "SL107" in {f.code for f in report.findings} and report.verdict.value == "UNSAFE"


def test_the_child_leaves_no_core_file() -> None:
    def core_limit() -> int:
        return resource.getrlimit(resource.RLIMIT_CORE)[0]

    assert run_bounded(core_limit, memory_bytes=64 * MIB, seconds=10) == (0, None)


def test_the_child_prints_nothing_where_the_user_reads(capfd: pytest.CaptureFixture[str]) -> None:
    """Its only channel is the pipe: what it (or CPython in it) writes to stdout or stderr would
    land on the user's terminal, or inside a report written to stdout."""

    def noisy() -> int:
        os.write(1, b"to stdout\n")
        os.write(2, b"SystemError: to stderr\n")
        return 7

    assert run_bounded(noisy, memory_bytes=64 * MIB, seconds=10) == (7, None)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
