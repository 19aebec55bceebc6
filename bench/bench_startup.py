"""A short run's cost: one file scanned by one command, what a pre-commit hook pays per commit.

    python bench/bench_startup.py [--runs 20]

Each tool scans one small file of each kind (a torch.save checkpoint, a pickle) as a command-line
run, start-up included: `safeload scan FILE`, `picklescan -p FILE`, `modelscan -p FILE`. The tools
take turns, --runs times each; printed are the best and the median wall time, and each peer's time
as a ratio to safeload's (> 1: safeload faster). `python -c pass` is the floor: the interpreter
alone, which every tool pays. Run it with a regular install (`pip install .`): an editable one
adds an import hook to every start.
"""

from __future__ import annotations

import argparse
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
    here = BIN / name
    return str(here) if here.exists() else (shutil.which(name) or str(here))


def commands(path: Path) -> dict[str, list[str]]:
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "safeload scan": [_tool("safeload"), "scan", str(path)],
        "picklescan -p": [_tool("picklescan"), "-p", str(path)],
        "modelscan -p": [_tool("modelscan"), "-p", str(path)],
    }


def make_files(folder: Path) -> dict[str, Path]:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "model.pt"
    torch.save({"weight": torch.arange(64, dtype=torch.float32), "step": 3}, checkpoint)
    state = folder / "state.pkl"
    state.write_bytes(pickle.dumps({"step": 3, "lr": 0.1, "hist": list(range(50))}, protocol=4))
    return {"torch checkpoint": checkpoint, "pickle": state}


def timed(cmd: list[str]) -> float | str:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return f"error {proc.returncode}: {last[:50]}"
    return elapsed


def bench_file(kind: str, path: Path, runs: int) -> list[list[str]]:
    cmds = commands(path)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    failed: dict[str, str] = {}
    for _ in range(runs):
        for name, cmd in cmds.items():
            if name in failed:
                continue
            t = timed(cmd)
            if isinstance(t, str):
                failed[name] = t
            else:
                times[name].append(t)
    reference = times["safeload scan"]
    rows = []
    for name in cmds:
        if name in failed:
            rows.append([kind, name, failed[name], "-", "-"])
            continue
        best, median = min(times[name]), statistics.median(times[name])
        ratio = "-"
        if name.split()[0] in ("picklescan", "modelscan") and reference:
            ratio = f"{best / min(reference):.2f} ({median / statistics.median(reference):.2f})"
        rows.append([kind, name, f"{1000 * best:.0f}", f"{1000 * median:.0f}", ratio])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="runs per tool and file, taking turns (default 20)")
    args = ap.parse_args()
    rows: list[list[str]] = []
    for kind, path in make_files(OUT / "startup").items():
        rows += bench_file(kind, path, args.runs)
    print(f"python: {sys.version.split()[0]}  safeload walker: {walker_build()}  runs: {args.runs}")
    print(table(rows, ["file", "command", "best ms", "median ms", "peer/safeload (median)"]))


if __name__ == "__main__":
    main()
