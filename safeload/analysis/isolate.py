"""Running one risky step in a forked child whose memory and time are bounded.

The replay through CPython's C unpickler is bounded by the walker's checks only where it reads the
bytes as the walker does. Behind a lying FRAME, the readers that part ways from it may meet what
the walker never walked: a LONG_BINPUT whose index makes the C unpickler allocate and zero a memo
of twice that many pointers (gigabytes from a 500-byte stream), a length that makes it allocate a
buffer, tuples nested deeply enough to overflow the C stack when hashed. Those replays run here:
in a child process whose address space is capped (an allocation past the cap fails with
MemoryError instead of taking the machine's memory), whose run time is capped, and whose death
(a crash, the cap, the OOM killer) costs nothing but that replay. What the child sends back is
JSON, never pickled objects.

Where the child's memory cannot be capped (no fork, no RLIMIT_AS, no /proc to measure from), the
step does not run at all: the caller reports it as not done, which fails closed.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import select
import signal
import time
import warnings
from collections.abc import Callable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MEMORY_BOUND = "it needed more memory than safeload allows a replay"


def can_isolate() -> bool:
    try:
        import resource  # noqa: F401 - POSIX only
    except ImportError:
        return False
    return hasattr(os, "fork") and _address_space() is not None


def _address_space() -> int | None:
    """This process's virtual size in bytes (what RLIMIT_AS counts), or None when unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[0]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def run_bounded(
    step: Callable[[], object], *, memory_bytes: int, seconds: float
) -> tuple[object, str | None]:
    """(what ``step`` returned, None), or (None, why there is no result). ``step`` runs in a forked
    child with at most ``memory_bytes`` of address space more than this process has now and at most
    ``seconds`` of run time; its result must be JSON-serializable."""
    if not can_isolate():
        return None, "this platform cannot run it in a process with bounded memory"
    try:
        read_end, write_end = os.pipe()
    except OSError as exc:
        return None, f"no pipe to a replay process: {exc.strerror or exc}"
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a process with threads: the child runs only the
            # step (no locks, no imports) and leaves with os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        return None, f"no replay process could be started: {exc.strerror or exc}"
    if pid == 0:  # pragma: no cover - runs in the child, measured by the tests through its result
        _child(step, read_end, write_end, memory_bytes, seconds)
    os.close(write_end)
    try:
        raw, why = _collect(read_end, pid, seconds + 5.0)
    finally:
        os.close(read_end)
    if why is not None:
        return None, why
    try:
        answer = json.loads(raw)
    except ValueError:
        return None, "the replay process sent no readable result"
    if not isinstance(answer, dict) or "result" not in answer:
        return None, str(answer.get("error", "no result")) if isinstance(answer, dict) else "no result"
    return answer["result"], None


def _child(
    step: Callable[[], object], read_end: int, write_end: int, memory_bytes: int, seconds: float
) -> None:
    import resource

    try:
        os.close(read_end)
        # No collection in the child: it could run finalizers of the parent's objects (a temporary
        # directory's cleanup, a file's flush) in this copy of its memory.
        gc.disable()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        faulthandler.disable()  # a crash here is reported by the parent, not as a traceback dump
        _silence_output()
        # A crash or the CPU cap (SIGXCPU) would otherwise dump this process's memory to a core
        # file in the working directory.
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        size = _address_space() or 0
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = size + memory_bytes
        resource.setrlimit(
            resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard)
        )
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu_cap = int(used.ru_utime + used.ru_stime + seconds) + 1
        _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(
            resource.RLIMIT_CPU,
            (cpu_cap if cpu_hard == resource.RLIM_INFINITY else min(cpu_cap, cpu_hard), cpu_hard),
        )
        try:
            payload = {"result": step()}
        except MemoryError:
            payload = {"error": MEMORY_BOUND}
        except Exception as exc:  # noqa: BLE001 - reported to the parent as the reason
            payload = {"error": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(payload).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view) :]
    finally:
        os._exit(0)


def _silence_output() -> None:
    """The child speaks through its pipe only. What CPython itself prints here is noise to the
    user, on the terminal or inside a report written to stdout: under the memory cap, CPython 3.11
    prints "SystemError: deallocated bytearray object has exported buffers" when a BYTEARRAY8 too
    large to allocate fails (its error path reads a field it has not set yet)."""
    devnull = os.open(os.devnull, os.O_WRONLY)  # failing, the child sends nothing: "no result"
    for fd in (1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _collect(fd: int, pid: int, timeout: float) -> tuple[bytes, str | None]:
    """Everything the child writes, then its exit; kills it past ``timeout`` seconds."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            _reap(pid)
            return b"", f"it ran past safeload's time bound for a replay ({timeout:.0f} s)"
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    status = _reap(pid)
    if status is not None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return b"", f"the replay process died of {name} (a crash in the unpickler, or a bound it hit)"
    return b"".join(chunks), None


def _reap(pid: int) -> int | None:
    """The child's exit status; None when it was reaped already (SIGCHLD ignored by the host)."""
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None
