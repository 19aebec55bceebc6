"""Scanning files for an audit: in this process or in a pool of workers that may die.

Workers get JSON back across the process boundary (results are data, never pickled objects). A
worker that dies costs only the file that killed it: see run_parallel.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from safeload import build_id
from safeload.audit_cache import AuditCache, stat_key
from safeload.audit_views import AuditError, reapply_waivers
from safeload.gcpause import FrozenHeap
from safeload.model import ResultError, ScanReport, decide, dump_json, load_json, make_finding, unread_report
from safeload.versions import versions

if TYPE_CHECKING:
    from safeload.policy import Policy

PolicyName = str | os.PathLike[str]


class PoolConfig(msgspec.Struct, frozen=True):
    """What a worker needs to rebuild the parent's policy and cache (a policy is resolved, never pickled)."""

    policy: PolicyName
    allow: tuple[str, ...]
    cache_dir: Path | None
    jobs: int


class Outcome(msgspec.Struct, frozen=True):
    report: ScanReport
    cached: bool = False  # the result was found in the cache by the hash of the bytes read
    stat_key: str | None = None  # identity under which report.sha256 may be remembered
    report_json: str | None = None  # the report as a worker sent it (cached as it is, not re-dumped)
    reused: bool = False  # the same bytes were scanned earlier in this run: that report, this path


class Scanner:
    """Scans one file: stat, read, hash, scan those very bytes (unless the same bytes were scanned
    earlier in this run, or their result is cached), stat again."""

    def __init__(self, policy: Policy, cache: AuditCache | None) -> None:
        self.policy = policy
        self.cache = cache
        # sha256 -> report of bytes scanned in this process (copies in a registry are common).
        self.seen: dict[str, ScanReport] = {}
        self._cached: set[str] | None = None  # what the cache holds results for (None: ask it)
        self._cached_loaded = False

    def scan(self, path: str) -> Outcome:
        report, how, opened = self._scan_once(path)
        if opened is None:
            return Outcome(report)  # never read: nothing to remember
        try:
            after = os.stat(path)
        except OSError:
            # removed after it was read: the report stands for the bytes that were read
            return Outcome(report, cached=how == "cached", reused=how == "reused")
        if _identity(after) != _identity(opened):
            # Written to, or another file put in its place, since it was opened.
            changed = make_finding("SL206", "the file changed while it was being scanned; scan it again")
            findings = (*report.findings, changed)
            return Outcome(replace(report, findings=findings, verdict=decide(findings)))
        # The auditing process stores the result (workers only read the cache).
        key = stat_key(after) if report.sha256 else None
        return Outcome(report, cached=how == "cached", stat_key=key, reused=how == "reused")

    def _scan_once(self, path: str) -> tuple[ScanReport, str, os.stat_result | None]:
        """(report, how, the opened file's status): how is "scanned", "reused" (bytes seen earlier
        in this run) or "cached"; the status is None where the file could not be read."""
        from safeload.api import analyse, open_scan_source, unreadable_report
        from safeload.errors import SafeloadError

        try:
            # The walk saw a regular file; one swapped for a FIFO since must not block the audit.
            source = open_scan_source(path, self.policy, regular_only=True)
        except SafeloadError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return unreadable(path, "vanished before it was scanned", self.policy), "scanned", None
            return unreadable_report(path, exc, self.policy), "scanned", None
        opened = source.opened
        # The hash is taken from the buffer the scan then walks: what is reused is for these bytes.
        digest = source.sha256()
        known = self.seen.get(digest)
        if known is not None:
            return replace(known, path=path), "reused", opened
        if self.cache is not None and self._may_be_cached(self.cache, digest):
            hit = self.cache.get_report(digest, self.policy.hash, build_id.scanner_id())
            if hit is not None:
                return replace(reapply_waivers(hit, self.policy), path=path), "cached", opened
        report = analyse(source, self.policy, sha256=digest).report
        if len(self.seen) >= _SEEN_MAX:
            del self.seen[next(iter(self.seen))]  # the oldest: memory stays bounded
        self.seen[digest] = report
        return report, "scanned", opened

    def _may_be_cached(self, cache: AuditCache, digest: str) -> bool:
        if not self._cached_loaded:
            self._cached = cache.cached_shas(self.policy.hash, build_id.scanner_id())
            self._cached_loaded = True
        return self._cached is None or digest in self._cached

    def safe_process(self, path: str) -> Outcome:
        """As process, but a bug (ours) becomes this file's internal-error finding, never the audit's end."""
        try:
            return self.scan(path)
        except Exception as exc:
            return Outcome(
                _internal_error(path, self.policy, f"audit failed on this file: {type(exc).__name__}: {exc}")
            )

    def batch(self, tasks: list[Task]) -> list[Result]:
        # JSON crosses the process boundary: results are data, never pickled objects.
        out = []
        for path in tasks:
            o = self.safe_process(path)
            try:
                text = dump_json(o.report)
            except Exception as exc:  # a bug of ours costs this file, never the batch or the audit
                why = f"its report could not be written as JSON: {type(exc).__name__}: {exc}"
                out.append((dump_json(_internal_error(path, self.policy, why)), False, None, False))
                continue
            out.append((text, o.cached, o.stat_key, o.reused))
        return out


Task = str  # a path to scan (its hash is looked up in the cache from the bytes read)
Result = tuple[str, bool, str | None, bool]  # (report JSON, cached, stat key, reused)
# Reports a scanner remembers by hash to reuse for copies of the same bytes.
_SEEN_MAX = 4096


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def unreadable(path: str, message: str, policy: Policy) -> ScanReport:
    """A file that could not be read. Built here, not by the api, so that a cached run never has to
    import the scanner."""
    return unread_report(
        path,
        make_finding("SL206", message),
        policy=policy.name,
        policy_hash=policy.hash,
        versions=dict(versions()),
    )


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
    ctx.set_forkserver_preload(["safeload.api", "safeload.audit_workers"])
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
                on_done(path, _outcome(path, result, policy))
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
                    on_done(rest, Outcome(_internal_error(rest, policy, "worker processes keep dying")))
                return
            pool = pool or _new_pool(config, policy, 1)
            try:
                (result,) = _result(pool, pool.submit(_worker_batch, [path]))
            except BrokenProcessPool:
                pool.shutdown(wait=False)
                pool = None
                deaths += 1
                on_done(
                    path, Outcome(_internal_error(path, policy, "the worker process scanning this file died"))
                )
                continue
            deaths = 0
            on_done(path, _outcome(path, result, policy))
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _outcome(path: str, result: Result, policy: Policy) -> Outcome:
    text, cached, key, reused = result
    try:
        report = load_json(text, ScanReport)
    except ResultError as exc:
        # Ours to fix, never the audit's end: the file's result is an internal error.
        return Outcome(_internal_error(path, policy, f"the worker's report for this file is broken: {exc}"))
    return Outcome(report, cached=cached, stat_key=key, report_json=text, reused=reused)


def _internal_error(path: str, policy: Policy, why: str) -> ScanReport:
    finding = make_finding("SL207", why)
    report = unreadable(path, why, policy)
    return replace(report, findings=(finding,), verdict=decide((finding,)))
