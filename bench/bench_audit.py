"""Registry audit speed: `safeload audit` against `picklescan -p DIR` and `modelscan -p DIR`.

    python bench/bench_audit.py [--small 5000] [--large 20] [--large-mb 1024] [--jobs 1 2]

Two trees, each timed with every tool as a command-line run (start-up included, the same for all):
  small: many small files (raw pickles of every protocol and small torch.save checkpoints);
  large: a few big torch.save checkpoints (the issue's figure is 20 files of 1 GB: --large-mb 1024,
         which needs about 20 GB of disk; the default is smaller so that a quick run stays quick).
Every tool's first run is timed --firsts times, the tools taking turns (safeload with each --jobs
value, from an empty cache each time); then safeload runs again on the unchanged tree --reruns times
(the cached re-run: the tree is walked and stat'ed again, and the last report replayed). Printed:
the best and the median time, files/s at the best, each peer's time as a ratio to safeload's first
run with the most jobs, best to best and median to median (> 1: safeload faster), and the cached
re-run as a share of the first run, and an interpreter's start-up alone (`python -c pass`: no CLI
run is faster). On this project's VMs one command takes anything up to 1.6
times as long from run to run (picklescan's first run of 5,000 files: 1.0 to 1.6 s in one
session), so one timing says more about the VM than about the tools: compare medians.

A first audit reads every byte once (the scan hashes what it walks: sha256 is the file's identity
for dedupe, cache and waivers); picklescan and modelscan read only the pickle members of a torch
archive. On big checkpoints that difference is the cost of identity, and the cache is what pays it
back.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, table, walker_build  # noqa: E402

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    """The console script next to this interpreter, else the one on PATH."""
    here = BIN / name
    return str(here) if here.exists() else (shutil.which(name) or str(here))


# Distinct checkpoints among the small tree's torch files (the rest are copies of them).
DISTINCT_CHECKPOINTS = 251


def make_small(folder: Path, count: int) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    checkpoints: list[bytes] = []
    for k in range(DISTINCT_CHECKPOINTS):
        # Each a real torch.save archive (an edited byte would break its CRC or directory).
        buf = io.BytesIO()
        torch.save({"w": torch.arange(16, dtype=torch.float32) + k, "step": 1}, buf)
        checkpoints.append(buf.getvalue())
    for i in range(count):
        sub = folder / f"shard{i % 50:02d}"
        sub.mkdir(exist_ok=True)
        if i % 4 == 0:
            # Copies of the same checkpoint, as registries hold them: dedupe has work to do.
            (sub / f"model{i}.pt").write_bytes(checkpoints[i % DISTINCT_CHECKPOINTS])
        else:
            obj = {"step": i, "lr": 0.1, "hist": list(range(i % 50)), "name": f"run{i}"}
            (sub / f"state{i}.pkl").write_bytes(pickle.dumps(obj, protocol=(i % 5) + 1))


def make_large(folder: Path, count: int, size_mb: int) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    chunks = max(1, size_mb // 16)
    for i in range(count):
        state = {
            f"layer{j}.weight": torch.full((4 * 1024 * 1024,), float(i)) for j in range(chunks)
        }  # 16 MB each
        torch.save(state, folder / f"model{i}.pt")


def timed(cmd: list[str], timeout: float) -> float | str:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    elapsed = time.perf_counter() - start
    # 0 clean, 1 findings (picklescan and modelscan use 1 for "issues found" too); anything else failed
    if proc.returncode not in (0, 1):
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return f"error {proc.returncode}: {last[:50]}"
    return elapsed


def _seconds(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def _summary(times: list[float | str]) -> tuple[float, float] | str:
    """(best, median) of the timings, or the first failure."""
    failed = [t for t in times if isinstance(t, str)]
    if failed:
        return failed[0]
    done = sorted(t for t in times if isinstance(t, float))
    return done[0], statistics.median(done)


def bench_tree(
    name: str, tree: Path, files: int, jobs: list[int], timeout: float, reruns: int = 5, firsts: int = 3
) -> list[list[str]]:
    """Every tool's first run ``firsts`` times, the tools taking turns (safeload from an empty cache
    each time), then safeload's cached re-runs on the cache its last first run left."""
    slug = tree.name
    commands: dict[str, tuple[list[str], Path | None]] = {}
    for n in jobs:
        cache = OUT / f"cache-{slug}-{n}"
        cmd = [
            _tool("safeload"),
            "audit",
            str(tree),
            "--jobs",
            str(n),
            "--cache",
            str(cache),
            "--format",
            "json",
            "-o",
            str(OUT / f"{slug}-jobs{n}.json"),
            "--no-progress",
        ]
        commands[f"safeload audit --jobs {n}"] = (cmd, cache)
    commands["picklescan -p"] = ([_tool("picklescan"), "-p", str(tree)], None)
    commands["modelscan -p"] = ([_tool("modelscan"), "-p", str(tree)], None)

    first_times: dict[str, list[float | str]] = {tool: [] for tool in commands}
    for _ in range(max(1, firsts)):
        for tool, (cmd, cache) in commands.items():
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)
            first_times[tool].append(timed(cmd, timeout))
    results: dict[str, tuple[float, float] | str] = {}
    for tool, (cmd, cache) in commands.items():
        results[tool] = _summary(first_times[tool])
        if cache is not None:
            again = [timed(cmd, timeout) for _ in range(max(1, reruns))]
            results[f"{tool} (cached re-run)"] = _summary(again)

    rows: list[list[str]] = []
    reference = results[f"safeload audit --jobs {max(jobs)}"]
    for tool, result in results.items():
        if isinstance(result, str):
            rows.append([name, tool, result, "-", "-", "-", "-"])
            continue
        best, median = result
        ratio = "-"
        if not isinstance(reference, str) and not tool.startswith("safeload"):
            ratio = f"{best / reference[0]:.2f} ({median / reference[1]:.2f})"
        share = "-"
        if "cached" in tool:
            first = results[tool.replace(" (cached re-run)", "")]
            if not isinstance(first, str):
                share = f"{100 * best / first[0]:.1f}% (median {100 * median / first[1]:.1f}%)"
        rows.append([name, tool, _seconds(best), _seconds(median), f"{files / best:.0f}", ratio, share])
    # What no command-line run beats: this interpreter started with nothing to do. On a small tree
    # it is most of a cached re-run, and so the floor of its share of the first run.
    idle = _summary([timed([sys.executable, "-c", "pass"], timeout) for _ in range(max(1, reruns))])
    if not isinstance(idle, str):
        rows.append(
            [name, "python -c pass (start-up floor)", _seconds(idle[0]), _seconds(idle[1]), "-", "-", "-"]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=5000, help="number of small files (default 5000)")
    ap.add_argument("--large", type=int, default=20, help="number of large files (default 20)")
    ap.add_argument("--large-mb", type=int, default=64, help="size of each large file in MB (issue: 1024)")
    ap.add_argument(
        "--jobs", type=int, nargs="+", default=[1, 2], help="safeload --jobs values (default 1 2)"
    )
    ap.add_argument("--timeout", type=float, default=3600, help="per command, seconds")
    ap.add_argument(
        "--reruns", type=int, default=5, help="cached re-runs per --jobs value: best and median (default 5)"
    )
    ap.add_argument(
        "--firsts",
        type=int,
        default=3,
        help="first runs per tool, the tools taking turns: best and median (default 3)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated trees in bench/out")
    args = ap.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    small, large = OUT / "audit-small", OUT / "audit-large"
    shutil.rmtree(small, ignore_errors=True)
    shutil.rmtree(large, ignore_errors=True)
    rows: list[list[str]] = []
    try:
        if args.small:
            make_small(small, args.small)
            rows += bench_tree(
                f"{args.small} small", small, args.small, args.jobs, args.timeout, args.reruns, args.firsts
            )
        if args.large:
            make_large(large, args.large, args.large_mb)
            rows += bench_tree(
                f"{args.large} x {args.large_mb} MB",
                large,
                args.large,
                args.jobs,
                args.timeout,
                args.reruns,
                args.firsts,
            )
    finally:
        if not args.keep:
            for leftover in (small, large, *OUT.glob("cache-audit-*")):
                shutil.rmtree(leftover, ignore_errors=True)
    print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}  safeload walker: {walker_build()}")
    print(
        table(
            rows, ["tree", "tool", "best s", "median s", "files/s", "peer/safeload (median)", "cached/first"]
        )
    )


if __name__ == "__main__":
    main()
