"""Where a sub-millisecond scan's time goes: each tool on the same file, from its path and from
the file's bytes already in memory, in the same process, the two taking turns.

    python bench/bench_fixed.py [--rounds 3] [--passes 2000] [--diagnose]

The cases are bench_scan.py's fixed-cost rows (its files are made if missing): a 16 MB torch zip
checkpoint with one tensor, a legacy torch file (256 MB, 16 tensors), one small pickle. From
memory: ``safeload.scan_bytes`` (no hash) against picklescan's ``scan_bytes`` over a BytesIO. The
difference between the two columns is what opening and reading the file costs each tool in the
middle of a scan (safeload maps files from 1 MiB and reads smaller ones; picklescan reads
through a buffered file object). modelscan and fickling have no comparable in-memory entry point;
bench_scan.py times them, several times slower on these files.

``--diagnose`` adds rows for safeload with parts of its verification switched off, to measure what
they cost in the middle of a scan: ``no replay`` (no stream is cross-checked through CPython's
unpickler), ``own format only`` (only the readers whose content test accepts the file run: no
other format's test, which is how a polyglot is found), and both. These are measurements, never
scans to trust; each checks that its report still has the full scan's findings.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import make_legacy, make_torch_zip  # noqa: E402
from common import OUT, TOOL_CWD, table, walker_build  # noqa: E402

# Diagnostic variants of safeload (--diagnose): what each leaves out (see the module docstring).
DIAGNOSTIC = ("no replay", "own format only", "no replay, own format only")

# One process per tool and case: both ways of scanning take turns, pass by pass, so that a slow
# spell of the machine falls on both alike. The best pass of each counts, and the mean of all.
RUNNER = r"""
import io, json, os, sys, time
tool, path, passes, off = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with open(path, "rb") as f:
    data = f.read()
if tool == "safeload":
    import safeload, safeload.api
    from safeload.formats import detect, raw
    safeload.api.resolve_policy("default")
    full = safeload.scan(path, policy="default")
    if "no replay" in off:
        safeload.api.could_import = lambda *args, **kwargs: False
    if "own format only" in off:
        view = memoryview(data)
        detect._READERS = [(label, m) for label, m in detect._READERS if m is raw or m.sniff(view)]
    if off:
        cut = safeload.scan(path, policy="default")
        if [f.code for f in cut.findings] != [f.code for f in full.findings] or cut.formats != full.formats:
            sys.exit(f"{off}: the report differs from the full scan's")
    ways = {
        "path": lambda: safeload.scan(path, policy="default"),
        "memory": lambda: safeload.scan_bytes(data, name=path, policy="default", sha256=False),
    }
else:
    from picklescan.scanner import scan_bytes, scan_file_path
    ext = os.path.splitext(path)[1]
    ways = {
        "path": lambda: scan_file_path(path),
        "memory": lambda: scan_bytes(io.BytesIO(data), path, ext),
    }
times = {way: [] for way in ways}
for i in range(passes + 100):
    for way, fn in ways.items():
        t = time.perf_counter()
        fn()
        took = time.perf_counter() - t
        if i >= 100:  # warmed up: imports done, CPython has specialized the code it runs
            times[way].append(took)
print(json.dumps({way: {"best": min(ts), "mean": sum(ts) / len(ts)} for way, ts in times.items()}))
"""


def run(tool: str, path: str, passes: int, off: str = "") -> dict[str, dict[str, float]] | str:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, tool, path, str(passes), off],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=TOOL_CWD,
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    if proc.returncode != 0:
        return "error: " + (proc.stderr.strip().splitlines() or ["failed"])[-1][:60]
    result: dict[str, dict[str, float]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per tool and case, taken in turn")
    ap.add_argument("--passes", type=int, default=2000, help="scans per way (path, memory) in each process")
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="add safeload with its replay and its other formats' content tests switched off",
    )
    args = ap.parse_args()
    zip_path = OUT / "ckpt_16mb.pt"
    if not zip_path.exists():
        make_torch_zip(zip_path, 16)
    legacy = OUT / "torch_legacy_256mb.pt"
    if not legacy.exists():
        make_legacy(legacy, 256)
    small = OUT / "fixed_small.pkl"  # as bench_scan.py's small pickles are, at protocol 4
    small.write_bytes(pickle.dumps({"step": 7, "lr": 0.1, "hist": list(range(50))}, protocol=4))
    cases = [
        ("torch zip 16 MB, 1 tensor", zip_path),
        ("torch legacy 256 MB", legacy),
        ("small pickle", small),
    ]

    # (row name, tool, what is switched off)
    runs = [("safeload", "safeload", "")]
    if args.diagnose:
        runs += [(f"safeload, {off}", "safeload", off) for off in DIAGNOSTIC]
    runs.append(("picklescan", "picklescan", ""))
    rows = []
    for label, path in cases:
        best: dict[str, dict[str, dict[str, float]] | str] = {}
        for _ in range(max(1, args.rounds)):
            for name, tool, off in runs:
                r = run(tool, str(path), args.passes, off)
                held = best.get(name)
                if isinstance(held, str):
                    continue
                if isinstance(r, str) or held is None or r["path"]["best"] < held["path"]["best"]:
                    best[name] = r
        base = best["safeload"]
        for name, _, _ in runs:
            r = best[name]
            if isinstance(r, str):
                rows.append([label, name, r, "", "", "", ""])
                continue
            cells = [label, name]
            for way in ("path", "memory"):
                cells.append(f"{r[way]['best'] * 1e6:.0f} ({r[way]['mean'] * 1e6:.0f})")
            cells.append(f"{(r['path']['best'] - r['memory']['best']) * 1e6:.0f}")
            for way in ("path", "memory"):
                if name == "safeload":
                    cells.append("1.00 (base)")
                elif isinstance(base, dict):
                    ratio = r[way]["best"] / base[way]["best"]
                    mean_ratio = r[way]["mean"] / base[way]["mean"]
                    cells.append(f"{ratio:.2f} ({mean_ratio:.2f})")
                else:
                    cells.append("-")
            rows.append(cells)
    print(f"safeload walker: {walker_build()}")
    headers = [
        "case",
        "tool",
        "from path us",
        "from memory us",
        "path - memory",
        "vs safeload, path",
        "vs safeload, memory",
    ]
    print(table(rows, headers))
    print("Microseconds per scan: the best pass, the mean of all in brackets. Each tool ran in")
    print(f"{args.rounds} fresh processes per case, in turn with the other; the process with the best pass")
    print("from the path counts. vs safeload: the peer's time over safeload's (above 1 safeload is faster).")
    if args.diagnose:
        print("safeload, no replay / own format only: that verification switched off (see the module")
        print("docstring); measurements, never scans to trust. Their reports kept the full scan's findings.")


if __name__ == "__main__":
    main()
