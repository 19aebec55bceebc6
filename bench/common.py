"""Shared helpers for the benchmark scripts: timing a tool on a file in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

# Each peer is called through its Python API in a fresh interpreter; the import is not timed, the
# scan is, and peak RSS covers the whole process (imports included, the same for every tool).
RUNNER = r"""
import json, sys, time
tool, path, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
paths = [path] if not path.startswith("@") else open(path[1:]).read().split("\n")
if tool == "safeload":
    import safeload
    fn = lambda p: safeload.scan(p, policy="default").verdict
elif tool == "picklescan":
    from picklescan.scanner import scan_file_path
    fn = lambda p: scan_file_path(p)
elif tool == "modelscan":
    from modelscan.modelscan import ModelScan
    fn = lambda p: ModelScan().scan(p)
elif tool == "fickling":
    import zipfile
    import fickling
    from fickling.analysis import check_safety
    from fickling.pytorch import PyTorchModelWrapper
    # fickling's is_likely_safe reads a file as one raw pickle; torch archives go through its
    # PyTorch wrapper, as fickling documents.
    fn = lambda p: check_safety(PyTorchModelWrapper(p).pickled) if zipfile.is_zipfile(p) else fickling.is_likely_safe(p)
else:
    raise SystemExit("unknown tool")
best = float("inf")
for _ in range(repeat):
    t = time.perf_counter()
    for p in paths:
        if p:
            fn(p)
    best = min(best, time.perf_counter() - t)
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak.
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": best, "peak_rss": rss}))
"""

TOOLS = ("safeload", "picklescan", "modelscan", "fickling")


def run_tool(tool: str, target: str, repeat: int = 3, timeout: float = 900) -> dict[str, float] | str:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, tool, target, str(repeat)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return f"error: {last[:60]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
