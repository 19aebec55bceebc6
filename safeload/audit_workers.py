"""Scanning files for an audit: one file at a time, as this process or a worker does it
(safeload.audit_pool runs the workers). A worker sends its results back as JSON (results are
data, never pickled objects).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import msgspec

from safeload import build_id
from safeload.audit_cache import AuditCache, stat_key
from safeload.audit_views import reapply_waivers
from safeload.errors import SafeloadError
from safeload.model import ResultError, ScanReport, decide, dump_json, load_json, make_finding, unread_report
from safeload.versions import versions

if TYPE_CHECKING:
    from safeload.policy import Policy
    from safeload.source import Source

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
        report, how, opened, after = self._scan_once(path)
        if opened is None:
            return Outcome(report)  # never read: nothing to remember
        if after is None:
            return Outcome(report, cached=how == "cached", reused=how == "reused")
        if _identity(after) != _identity(opened):
            # Written to while it was read (or, mapped, while it was scanned).
            changed = make_finding("SL206", "the file changed while it was being scanned; scan it again")
            findings = (*report.findings, changed)
            return Outcome(replace(report, findings=findings, verdict=decide(findings)))
        # The auditing process stores the result (workers only read the cache). The key is the
        # identity of the inode that was read: the path may name another file by now, whose own
        # identity a later run looks up (and misses).
        key = stat_key(after) if report.sha256 else None
        return Outcome(report, cached=how == "cached", stat_key=key, reused=how == "reused")

    def _scan_once(self, path: str) -> tuple[ScanReport, str, os.stat_result | None, os.stat_result | None]:
        """(report, how, the opened file's status, its status once scanned): how is "scanned",
        "reused" (bytes seen earlier in this run) or "cached"; the statuses are None where the file
        could not be read (the second also where fstat failed)."""
        api = _api or _import_api()
        try:
            # The walk saw a regular file; one swapped for a FIFO since must not block the audit.
            source = api.open_scan_source(path, self.policy, regular_only=True)
        except SafeloadError as exc:
            if isinstance(exc.__cause__, FileNotFoundError):
                return unreadable(path, "vanished before it was scanned", self.policy), "scanned", None, None
            return api.unreadable_report(path, exc, self.policy), "scanned", None, None
        opened = source.opened
        # The hash is taken from the buffer the scan then walks: what is reused is for these bytes.
        digest = source.sha256()
        known = self.seen.get(digest)
        if known is not None:
            return replace(known, path=path), "reused", opened, _status(source)
        if self.cache is not None and self._may_be_cached(self.cache, digest):
            hit = self.cache.get_report(digest, self.policy.hash, build_id.scanner_id())
            if hit is not None:
                return (
                    replace(reapply_waivers(hit, self.policy), path=path),
                    "cached",
                    opened,
                    _status(source),
                )
        report = api.analyse(source, self.policy, sha256=digest).report
        if len(self.seen) >= _SEEN_MAX:
            del self.seen[next(iter(self.seen))]  # the oldest: memory stays bounded
        self.seen[digest] = report
        return report, "scanned", opened, _status(source)

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
                internal_error(path, self.policy, f"audit failed on this file: {type(exc).__name__}: {exc}")
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
                out.append((dump_json(internal_error(path, self.policy, why)), False, None, False))
                continue
            out.append((text, o.cached, o.stat_key, o.reused))
        return out


# safeload.api, imported by the first scan (a run whose files are all cached never imports the
# scanner) and kept: an import statement run for each file costs microseconds (the module is
# searched for a __path__, and not finding one formats an AttributeError).
_api: ModuleType | None = None


def _import_api() -> ModuleType:
    global _api
    import safeload.api

    _api = safeload.api
    return _api


Task = str  # a path to scan (its hash is looked up in the cache from the bytes read)
Result = tuple[str, bool, str | None, bool]  # (report JSON, cached, stat key, reused)
# Reports a scanner remembers by hash to reuse for copies of the same bytes.
_SEEN_MAX = 4096


def _status(source: Source) -> os.stat_result | None:
    """The source's file once it was hashed and scanned: fstat on what was opened, never the path
    again (a path lookup costs several times as much, and names whatever is there by now)."""
    try:
        return source.status_now()
    except OSError:
        return None


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


def decode_outcome(path: str, result: Result, policy: Policy) -> Outcome:
    text, cached, key, reused = result
    try:
        report = load_json(text, ScanReport)
    except ResultError as exc:
        # Ours to fix, never the audit's end: the file's result is an internal error.
        return Outcome(internal_error(path, policy, f"the worker's report for this file is broken: {exc}"))
    return Outcome(report, cached=cached, stat_key=key, report_json=text, reused=reused)


def internal_error(path: str, policy: Policy, why: str) -> ScanReport:
    finding = make_finding("SL207", why)
    report = unreadable(path, why, policy)
    return replace(report, findings=(finding,), verdict=decide((finding,)))
