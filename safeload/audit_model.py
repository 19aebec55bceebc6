"""Result types of `safeload audit`: a ScanRun plus registry-wide views. Frozen dataclasses, as
in safeload.model.

Kept apart from audit.py (the logic) so that report renderers can read an audit without importing
the scanner, and so that the published JSON schema is generated from these classes alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

from safeload.model import ResultType, ScanRun, result_type


@result_type
class GlobalCount(ResultType):
    """One global over the whole run: how widely it is used and which policies allow it."""

    name: str
    files: int
    """Distinct files (by sha256, else by path) whose pickles import it"""
    paths: int
    """Reported paths whose file imports it (links and copies count again)"""
    allowed: bool
    """Allowed by the policy the run was scanned with"""
    allowed_by: tuple[str, ...] = ()
    """Compared policies that allow it"""


@result_type
class BlockedFile(ResultType):
    """A file that a policy would refuse, and why."""

    sha256: str | None
    paths: tuple[str, ...]
    globals: tuple[str, ...] = ()
    """Globals this policy does not allow"""
    codes: tuple[str, ...] = ()
    """Blocking findings that no policy can lift"""


@result_type
class PolicyCheck(ResultType):
    """Which files a policy would refuse, judged from the globals the scan resolved."""

    policy: str
    policy_hash: str
    blocked: tuple[BlockedFile, ...] = ()


@result_type
class BaselineInfo(ResultType):
    """With --baseline, reports keep only new findings (identity: sha256 + rule + global, never
    offsets) and only files that have some; a kept file keeps its own verdict."""

    path: str
    known: int
    """Finding identities in the baseline (sha256 + rule + global)"""
    suppressed: int
    """Findings of this run left out because the baseline has them"""
    unchanged_files: int
    """Files with findings left out because all of them are known"""


@result_type
class AuditStats(ResultType):
    """The registry's size. How a run got its results (scanned, cached) is no part of the report:
    an unchanged registry gives the same report, byte for byte (see RunCounts)."""

    paths: int
    """Paths reported (every link to a file counts)"""
    files: int
    """Distinct files by content"""


@dataclass(frozen=True)
class RunCounts:
    """How this run got its results; printed on stderr, never written into the report."""

    scanned: int = 0  # files scanned in this run
    from_cache: int = 0  # files whose result came from the cache
    hash_cache_hits: int = 0  # files whose sha256 came from the cache, unread
    # The report may be replayed for an unchanged tree: no file was unreadable and no result
    # depends on this run's circumstances (see audit_memo).
    replayable: bool = False
    # (policy file, sha256 of the bytes read) for every policy the run used.
    policy_sources: tuple[tuple[str, str], ...] = ()
    # The day the first waiver still in force lapses: the report would differ from then on.
    changes_on: date | None = None


# Not slotted: how the run got its results (RunCounts) rides along outside the fields, so that it
# is never written into the report.
@dataclass(frozen=True, kw_only=True)
class AuditRun(ScanRun):
    """`safeload audit` over a registry: every path's report plus inventory, policy checks, baseline."""

    kind: Literal["audit"] = "audit"
    roots: tuple[str, ...] = ()
    stats: AuditStats
    inventory: tuple[GlobalCount, ...] = ()
    policy_checks: tuple[PolicyCheck, ...] = ()
    baseline: BaselineInfo | None = None

    @property
    def counts(self) -> RunCounts:
        return self.__dict__.get("_counts") or RunCounts()

    def with_counts(self, counts: RunCounts) -> AuditRun:
        object.__setattr__(self, "_counts", counts)
        return self
