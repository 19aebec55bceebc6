"""How many workers an audit starts when --jobs is left out."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest

import safeload.audit_pool as audit_pool
from safeload.audit import (
    MAX_AUTO_JOBS,
    SMALL_PLAN_BYTES,
    SMALL_PLAN_FILES,
    AuditOptions,
    audit,
    auto_jobs,
    usable_cpus,
)
from safeload.audit_walk import FileGroup
from safeload.model import Verdict


class _Stat:
    def __init__(self, size: int) -> None:
        self.st_size = size


def _plan(sizes: list[int]) -> list[tuple[str, list[FileGroup]]]:
    groups = [FileGroup(f"f{i}", st=_Stat(size)) for i, size in enumerate(sizes)]  # type: ignore[arg-type]
    return [(g.first, [g]) for g in groups]


def test_a_small_plan_is_scanned_in_this_process() -> None:
    assert auto_jobs(_plan([1000] * (SMALL_PLAN_FILES - 1))) == 1
    assert auto_jobs(_plan([])) == 1
    assert auto_jobs(_plan([SMALL_PLAN_BYTES - 1])) == 1


def test_many_files_or_many_bytes_get_a_worker_per_cpu() -> None:
    cpus = min(usable_cpus(), MAX_AUTO_JOBS)
    assert auto_jobs(_plan([10] * SMALL_PLAN_FILES)) == cpus
    assert auto_jobs(_plan([10] * 10_000)) == cpus
    # Two big files: no more workers than files.
    assert auto_jobs(_plan([SMALL_PLAN_BYTES, SMALL_PLAN_BYTES])) == min(cpus, 2)


def test_usable_cpus_is_this_process_share() -> None:
    if hasattr(os, "sched_getaffinity"):
        assert usable_cpus() == len(os.sched_getaffinity(0))
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)


@pytest.mark.parametrize(
    ("files", "jobs", "pooled"),
    [(20, None, False), (SMALL_PLAN_FILES, None, True), (SMALL_PLAN_FILES, 1, False)],
)
def test_an_audit_without_jobs_pools_only_a_tree_worth_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: int, jobs: int | None, pooled: bool
) -> None:
    for i in range(files):
        (tmp_path / f"m{i}.pkl").write_bytes(pickle.dumps({"step": i}, protocol=4))
    started: list[int] = []
    real = audit_pool.run_parallel

    def recording(tasks: list[str], config: Any, policy: Any, on_done: Any) -> None:
        started.append(config.jobs)
        real(tasks, config, policy, on_done)

    monkeypatch.setattr(audit_pool, "run_parallel", recording)
    run = audit([str(tmp_path)], AuditOptions(jobs=jobs))
    assert [r.verdict for r in run.reports] == [Verdict.SAFE] * files
    expected = min(usable_cpus(), MAX_AUTO_JOBS)
    assert started == ([expected] if pooled and expected > 1 else [])
