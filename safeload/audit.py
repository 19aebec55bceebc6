"""`safeload audit`: scan a model registry once per distinct file, in parallel, with a cache.

Logic only (no printing): walk the given trees (audit_walk), reuse cached results by content
(audit_cache), scan the rest (audit_workers; in worker processes, audit_pool), then build the
registry views (audit_views): globals inventory, which files block which policy and, with a
baseline, only what is new.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from safeload import __version__, build_id
from safeload.audit_cache import AuditCache, cacheable, stat_key
from safeload.audit_model import AuditRun, AuditStats, RunCounts
from safeload.audit_views import (
    AuditError,
    Identity,
    apply_baseline,
    global_names,
    load_baseline,
    policy_allows,
    policy_check,
    reapply_waivers,
)
from safeload.audit_walk import FileGroup, collect
from safeload.audit_workers import Outcome, PolicyName, PoolConfig, Scanner, unreadable
from safeload.gcpause import FrozenHeap
from safeload.model import Finding, ScanReport, Verdict, decide
from safeload.report.summary import count_globals, file_identity

if TYPE_CHECKING:
    from safeload.policy import Policy

__all__ = ["AuditError", "AuditOptions", "Progress", "audit"]

COMPARED_POLICIES = ("strict", "default")


class AuditOptions(msgspec.Struct, frozen=True):
    policy: PolicyName = "default"
    allow: tuple[str, ...] = ()
    jobs: int | None = None  # None: auto_jobs decides from the work and the CPUs
    cache_dir: Path | None = None
    baseline: Path | None = None
    rehash: bool = False  # ignore cached hashes (results are still reused by content)
    compare: tuple[str, ...] = COMPARED_POLICIES
    report: Path | None = None  # the file the report goes to: not audited where the walk meets it


class Progress(msgspec.Struct, frozen=True):
    """One file finished (or, with path None, the total is known)."""

    done: int
    total: int
    path: str | None = None
    verdict: Verdict | None = None
    cached: bool = False
    skipped: bool = False  # no model format, met by a directory walk: not in the report's files


ProgressFn = Callable[[Progress], None]


def audit(
    paths: Sequence[str],
    options: AuditOptions | None = None,
    progress: ProgressFn | None = None,
    *,
    groups: list[FileGroup] | None = None,
    wait_for_cache: bool = True,
) -> AuditRun:
    """Audit files and directory trees. Raises AuditError or PolicyError for usage problems only;
    every file problem becomes a finding in the report.

    groups: the tree as ``collect(paths, [cache_dir], report)`` walked it just now (audit_memo
    walks first, to look for a report to replay); otherwise it is walked here.
    wait_for_cache: False lets the cache's last commit go on after the audit returns (while the
    report is written); ``audit_cache.wait_for_commits`` waits for it. An interrupted audit
    always waits.
    """
    # Not safeload.api: a fully cached run then never imports the scanner (most of its start-up).
    from safeload.policy import load_policy

    options = options or AuditOptions()
    if options.jobs is not None and options.jobs < 1:
        raise AuditError("--jobs must be at least 1")
    policy = load_policy(options.policy, allow=options.allow)
    known = load_baseline(options.baseline) if options.baseline is not None else None
    cache = AuditCache(options.cache_dir) if options.cache_dir is not None else None

    if groups is None:
        exclude = [str(options.cache_dir)] if options.cache_dir is not None else []
        groups = collect(paths, exclude, None if options.report is None else str(options.report))
    total = sum(not g.inert for g in groups)
    done = 0
    notify = progress or (lambda _event: None)
    notify(Progress(done=0, total=total))

    def finish(group: FileGroup, report: ScanReport, cached: bool) -> None:
        nonlocal done
        group.report, group.cached, done = report, cached, done + 1
        shown = group.reported_paths() or group.paths
        skipped = not group.named and report.no_model_format
        notify(
            Progress(
                done=done, total=total, path=shown[0], verdict=report.verdict, cached=cached, skipped=skipped
            )
        )

    hashes = cache.load_hashes() if cache is not None else {}
    hash_hits = _resolve_from_cache(groups, policy, cache, {} if options.rehash else hashes, finish)
    plan = _scan_plan(groups)
    members = dict(plan)
    scanned = 0

    def on_done(path: str, outcome: Outcome) -> None:
        nonlocal scanned
        scanned += not (outcome.cached or outcome.reused)
        sha = outcome.report.sha256
        if cache is not None and outcome.stat_key is not None and sha is not None:
            if hashes.get(outcome.stat_key) != sha:
                # Committed with the results as the audit goes, not in one go at its end.
                cache.save_hashes({outcome.stat_key: sha})
            if not (outcome.cached or outcome.reused):
                # A file that was read whole and did not change meanwhile (it has a stat key).
                cache.put_report(outcome.report, build_id.scanner_id(), text=outcome.report_json)
        for group in members[path]:
            finish(group, outcome.report, outcome.cached)

    # Files whose hash is not known (or, with --rehash, not trusted) are read once: the scanner
    # hashes those bytes and reuses a result cached for them, or scans them.
    tasks = [path for path, _ in plan]
    jobs = options.jobs if options.jobs is not None else auto_jobs(plan)
    interrupted = True  # until the run is built: then the cache may finish committing on its own
    try:
        if jobs == 1 or len(tasks) <= 1:
            if tasks:
                import safeload.api  # noqa: F401  (imported before the heap is frozen: its objects too)
            scanner = Scanner(policy, cache)
            with FrozenHeap():
                for path in tasks:
                    on_done(path, scanner.safe_process(path))
        else:
            config = PoolConfig(options.policy, options.allow, options.cache_dir, jobs)
            from safeload.audit_pool import run_parallel  # here: a run of one job needs no processes

            run_parallel(tasks, config, policy, on_done)
        if cache is not None:
            cache.start_closing()  # the last commit goes on while the registry views are built
        run = _registry_run(paths, options, policy, groups, known, scanned, hash_hits)
        interrupted = False
        return run
    finally:
        if cache is not None:
            # Even when interrupted: what was learned stays learned, committed whole.
            cache.close(wait=wait_for_cache or interrupted)


def _registry_run(
    paths: Sequence[str],
    options: AuditOptions,
    policy: Policy,
    groups: list[FileGroup],
    known: set[Identity] | None,
    scanned: int,
    hash_hits: int,
) -> AuditRun:
    """The audit's result from the groups' reports: the registry views, the exit code, the counts."""
    from safeload.policy import load_policy

    reports, skipped = _expand(groups)
    compared = [policy] + [load_policy(n) for n in options.compare if n != policy.name]
    every_name = {n for r in reports for n in global_names(r)}
    allowed_sets = {p.name: {n for n in every_name if policy_allows(p, n)} for p in compared}
    checks = tuple(policy_check(p, reports, p is policy, allowed_sets[p.name]) for p in compared)
    inventory = tuple(count_globals(reports, allowed_sets))

    baseline_info = None
    decisive: list[Finding] | None = None
    if known is not None and options.baseline is not None:
        reports, baseline_info, decisive = apply_baseline(reports, known, options.baseline)
    verdicts = [r.verdict for r in reports] if decisive is None else [decide(decisive)]
    stats = AuditStats(
        paths=sum(len(g.reported_paths()) for g in groups),
        files=len({file_identity(g.report) for g in groups if g.report is not None}),
    )
    run = AuditRun(
        version=__version__,
        policy=policy.name,
        reports=tuple(reports),
        skipped=tuple(skipped),
        exit_code=_exit_code(verdicts),
        roots=tuple(paths),
        stats=stats,
        inventory=inventory,
        policy_checks=checks,
        baseline=baseline_info,
    )
    today = date.today()
    in_force = [w.expires for p in compared for w in p.waivers if w.expires >= today]
    return run.with_counts(
        RunCounts(
            scanned=scanned,
            from_cache=sum(1 for g in groups if g.cached),
            hash_cache_hits=hash_hits,
            replayable=options.cache_dir is not None
            and all(g.error is None and (g.report is None or cacheable(g.report)) for g in groups),
            policy_sources=tuple(dict.fromkeys(d for p in compared for d in p.source_digests)),
            changes_on=min(in_force) + timedelta(days=1) if in_force else None,
        )
    )


# Most workers --jobs picks by itself: each may hold a hostile file's scan (hundreds of MB).
MAX_AUTO_JOBS = 8
# Below both, a tree is scanned in this process: starting and feeding workers costs about what
# scanning 150 small files does (measured on 2 cores: 100 files took 0.18 s alone, 0.20 s with two).
SMALL_PLAN_FILES = 150
SMALL_PLAN_BYTES = 64 << 20


def auto_jobs(plan: Sequence[tuple[str, list[FileGroup]]]) -> int:
    """Workers for an audit whose --jobs was left out: one per CPU this process may run on (at
    most MAX_AUTO_JOBS, at most one per file), or none for a small plan."""
    size = sum(groups[0].st.st_size for _, groups in plan if groups[0].st is not None)
    if len(plan) < SMALL_PLAN_FILES and size < SMALL_PLAN_BYTES:
        return 1
    return max(1, min(usable_cpus(), MAX_AUTO_JOBS, len(plan)))


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # the CPUs this process may run on (a container's share)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _resolve_from_cache(
    groups: list[FileGroup],
    policy: Policy,
    cache: AuditCache | None,
    hashes: dict[str, str],
    finish: Callable[[FileGroup, ScanReport, bool], None],
) -> int:
    """Unreadable paths get their report; known hashes and cached results are filled in.
    Returns how many hashes were known."""
    hits = 0
    known: list[FileGroup] = []
    for group in groups:
        if group.error is not None:
            finish(group, unreadable(group.first, group.error, policy), False)
            continue
        if cache is None or group.st is None or group.inert:
            continue
        group.sha256 = hashes.get(stat_key(group.st))
        if group.sha256 is not None:
            hits += 1
            known.append(group)
    if cache is None or not known:
        return hits
    # One read of the cache for every known hash (a query each costs more than the lookup).
    found = cache.get_reports({g.sha256 for g in known if g.sha256}, policy.hash, build_id.scanner_id())
    by_sha = {sha: reapply_waivers(report, policy) for sha, report in found.items()}
    for group in known:
        cached = by_sha.get(group.sha256 or "")
        if cached is not None:
            finish(group, cached, True)
    return hits


def _scan_plan(groups: list[FileGroup]) -> list[tuple[str, list[FileGroup]]]:
    """What to scan: one path per distinct known sha256, one per file whose hash is not known yet."""
    plan: dict[str, list[FileGroup]] = {}
    order: list[str] = []
    for group in groups:
        if group.report is not None or group.inert:
            continue
        key = group.sha256 or f"file:{group.first}"
        if key not in plan:
            plan[key] = []
            order.append(key)
        plan[key].append(group)
    return [(plan[k][0].first, plan[k]) for k in order]


def _expand(groups: list[FileGroup]) -> tuple[list[ScanReport], list[str]]:
    """One report per reported path; walked files that are no model format become `skipped`."""
    reports: list[ScanReport] = []
    skipped: list[str] = []
    for group in groups:
        if group.inert:
            skipped.extend(group.reported_paths())
            continue
        if group.report is None:
            continue
        for path in group.reported_paths():
            if path not in group.named and group.report.no_model_format:
                skipped.append(path)
                continue
            reports.append(group.report if group.report.path == path else replace(group.report, path=path))
    reports.sort(key=lambda r: r.path)
    skipped.sort()
    return reports, skipped


def _names(report: ScanReport) -> set[str]:
    return {g.name for s in report.streams for g in s.globals}


def _exit_code(verdicts: Iterable[Verdict]) -> int:
    found = set(verdicts)
    if Verdict.UNSAFE in found:
        return 1
    if Verdict.UNSCANNABLE in found:
        return 2
    return 0
