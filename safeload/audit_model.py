"""Result types of `safeload audit`: a ScanRun plus registry-wide views. Frozen pydantic models.

Kept apart from audit.py (the logic) so that report renderers can read an audit without importing
the scanner, and so that the published JSON schema is generated from these classes alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from safeload.model import ScanRun


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GlobalCount(_Frozen):
    """One global over the whole run: how widely it is used and which policies allow it."""

    name: str
    files: int = Field(description="Distinct files (by sha256, else by path) whose pickles import it")
    paths: int = Field(description="Reported paths whose file imports it (links and copies count again)")
    allowed: bool = Field(description="Allowed by the policy the run was scanned with")
    allowed_by: tuple[str, ...] = Field(default=(), description="Compared policies that allow it")


class BlockedFile(_Frozen):
    """A file that a policy would refuse, and why."""

    sha256: str | None
    paths: tuple[str, ...]
    globals: tuple[str, ...] = Field(default=(), description="Globals this policy does not allow")
    codes: tuple[str, ...] = Field(default=(), description="Blocking findings that no policy can lift")


class PolicyCheck(_Frozen):
    """Which files a policy would refuse, judged from the globals the scan resolved."""

    policy: str
    policy_hash: str
    blocked: tuple[BlockedFile, ...] = ()


class BaselineInfo(_Frozen):
    """With --baseline, reports keep only new findings (identity: sha256 + rule + global, never
    offsets) and only files that have some; a kept file keeps its own verdict."""

    path: str
    known: int = Field(description="Finding identities in the baseline (sha256 + rule + global)")
    suppressed: int = Field(description="Findings of this run left out because the baseline has them")
    unchanged_files: int = Field(description="Files with findings left out because all of them are known")


class AuditStats(_Frozen):
    """The registry's size. How a run got its results (scanned, cached) is no part of the report:
    an unchanged registry gives the same report, byte for byte (see RunCounts)."""

    paths: int = Field(description="Paths reported (every link to a file counts)")
    files: int = Field(description="Distinct files by content")


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


class AuditRun(ScanRun):
    """`safeload audit` over a registry: every path's report plus inventory, policy checks, baseline."""

    kind: Literal["audit"] = "audit"
    roots: tuple[str, ...] = ()
    stats: AuditStats
    inventory: tuple[GlobalCount, ...] = ()
    policy_checks: tuple[PolicyCheck, ...] = ()
    baseline: BaselineInfo | None = None
    _counts: RunCounts = PrivateAttr(default_factory=RunCounts)

    @property
    def counts(self) -> RunCounts:
        return self._counts
