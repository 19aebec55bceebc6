"""Scanning an audit's files in a pool of worker processes that may die: a worker that dies costs
only the file that killed it (see run_parallel). Imported only for an audit with more than one
job: multiprocessing and concurrent.futures cost a run of one job about 10 ms of its start.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from safeload.audit_cache import AuditCache
from safeload.audit_views import AuditError
from safeload.audit_workers import (
    Outcome,
    PolicyName,
    PoolConfig,
    Result,
    Scanner,
    Task,
    decode_outcome,
    internal_error,
)
from safeload.gcpause import FrozenHeap

if TYPE_CHECKING:
    from safeload.policy import Policy


_WORKER: Scanner | None = None
_WORKER_ERROR: str | None = None


def _worker_init(policy: PolicyName, allow: tuple[str, ...], policy_hash: str, cache_dir: str | None) -> None:
    global _WORKER, _WORKER_ERROR
    from safeload.policy import load_policy

    # Ctrl-C is the parent's to handle: it cancels the pool and writes no report.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    resolved = load_policy(policy, allow=allow)
    if resolved.hash != policy_hash:
        _WORKER_ERROR = "the policy changed while the audit was running"
        return
    _WORKER = Scanner(resolved, AuditCache(cache_dir) if cache_dir else None)


def _worker_batch(tasks: list[Task]) -> list[Result]:
    if _WORKER is None:
        raise AuditError(_WORKER_ERROR or "worker not initialised")
    return _WORKER.batch(tasks)


def _pool_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        # A fork of this process starts at once, scanner already imported (a forkserver has to
        # import it first: most of a small audit). Only while no other thread runs: a fork copies
        # whatever lock another thread holds (rich's progress refresher, a pool's manager thread).
        import safeload.api  # noqa: F401  (imported here, inherited by every worker)

        return multiprocessing.get_context("fork")
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # The server imports the scanner once; each worker is then a cheap fork of it.
    ctx.set_forkserver_preload(["safeload.api", "safeload.audit_pool"])
    return ctx


OnDone = Callable[[str, Outcome], None]


def run_parallel(tasks: list[Task], config: PoolConfig, policy: Policy, on_done: OnDone) -> None:
    """Scan in worker processes, in batches (fewer round trips for many small files).

    A worker that dies (a crash in native code, the OOM killer) breaks the pool and every batch
    still in it. What was unfinished is then run one file at a time in a one-worker pool, so the
    file that kills a worker is known exactly and reported as an internal error, and the audit
    goes on with the others.
    """
    size = max(1, min(32, len(tasks) // (config.jobs * 8)))
    batches = [tasks[i : i + size] for i in range(0, len(tasks), size)]
    # Forked workers share what this process holds: no collection must copy it (see FrozenHeap).
    # Choosing the start method imports the scanner when workers are forked: before the freeze.
    _pool_context()
    with FrozenHeap():
        unfinished = _pool_round(batches, config, policy, on_done)
        if unfinished:
            _run_isolated(unfinished, config, policy, on_done)


def _new_pool(config: PoolConfig, policy: Policy, workers: int) -> ProcessPoolExecutor:
    initargs = (
        config.policy,
        config.allow,
        policy.hash,
        str(config.cache_dir) if config.cache_dir else None,
    )
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=_pool_context(), initializer=_worker_init, initargs=initargs
    )


def _pool_round(batches: list[list[Task]], config: PoolConfig, policy: Policy, on_done: OnDone) -> list[Task]:
    unfinished: list[Task] = []
    pool = _new_pool(config, policy, config.jobs)
    # Each batch's future reports itself here when it ends: one wait per batch, where
    # concurrent.futures.wait would walk every pending future each time (hundreds of batches).
    finished: queue.SimpleQueue[Future[list[Result]]] = queue.SimpleQueue()
    try:
        pending = {}
        for i, b in enumerate(batches):
            try:
                future = pool.submit(_worker_batch, b)
            except BrokenProcessPool:
                # A worker died while batches were still being handed out (as early as its start).
                unfinished.extend(task for rest in batches[i:] for task in rest)
                break
            pending[future] = b
            future.add_done_callback(finished.put)
        while pending:
            try:
                future = finished.get(timeout=STALL_CHECK_S)
            except queue.Empty:
                if not _workers_alive(pool):
                    # Every worker is gone and no future says so: fail closed, never wait forever.
                    unfinished.extend(task for batch in pending.values() for task in batch)
                    pending.clear()
                    pool.shutdown(wait=False, cancel_futures=True)
                    return unfinished
                continue
            batch = pending.pop(future)
            try:
                results = future.result()
            except BrokenProcessPool:
                unfinished.extend(batch)
                continue
            for path, result in zip(batch, results, strict=True):
                on_done(path, decode_outcome(path, result, policy))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return unfinished


_MAX_DEATHS_IN_A_ROW = 3
# How long a pool may go without finishing a batch before its workers are checked for life.
STALL_CHECK_S = 2.0


def _workers_alive(pool: ProcessPoolExecutor) -> bool:
    """Whether any worker process of ``pool`` still runs. In some races concurrent.futures misses
    that every worker died (seen here when each worker's initializer exits at once) and never
    completes their futures. There is no public way to see the processes: this reads the
    executor's own table, and says True (keep waiting) where it cannot."""
    processes = getattr(pool, "_processes", None)
    if not isinstance(processes, dict):
        return True
    return any(p.is_alive() for p in list(processes.values()))


def _result(pool: ProcessPoolExecutor, future: Future[list[Result]]) -> list[Result]:
    """future.result(), or BrokenProcessPool once no worker is left to produce it."""
    while True:
        try:
            return future.result(timeout=STALL_CHECK_S)
        except FutureTimeout:
            if not _workers_alive(pool):
                raise BrokenProcessPool("every worker process has exited") from None


def _run_isolated(tasks: list[Task], config: PoolConfig, policy: Policy, on_done: OnDone) -> None:
    deaths = 0
    pool: ProcessPoolExecutor | None = None
    try:
        for i, path in enumerate(tasks):
            if deaths >= _MAX_DEATHS_IN_A_ROW:
                # Workers die whatever they are given: the environment is broken, not these files.
                for rest in tasks[i:]:
                    on_done(rest, Outcome(internal_error(rest, policy, "worker processes keep dying")))
                return
            pool = pool or _new_pool(config, policy, 1)
            try:
                (result,) = _result(pool, pool.submit(_worker_batch, [path]))
            except BrokenProcessPool:
                pool.shutdown(wait=False)
                pool = None
                deaths += 1
                on_done(
                    path, Outcome(internal_error(path, policy, "the worker process scanning this file died"))
                )
                continue
            deaths = 0
            on_done(path, decode_outcome(path, result, policy))
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
