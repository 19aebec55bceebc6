"""Shared helpers for the benchmark scripts: timing a tool on a file in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"
# Tools run with bench/out as their working directory: `python -c` puts the working directory
# first on sys.path, and from the repository root that imports the checkout's safeload package,
# not the one installed (whose policies ship as safeload.rules, which the checkout lacks).
TOOL_CWD = OUT
OUT.mkdir(exist_ok=True)

# Each peer is called through its Python API in a fresh interpreter; the import is not timed, the
# scan is, and peak RSS covers the whole process (imports included, the same for every tool).
# "seconds" is the best pass (steady state: CPython specializes code it has run a few times): at
# least `repeat` passes, more for fast scans (see the loop); "first" is the first pass, with whatever
# the tool imports or builds on first use.
RUNNER = r"""
import collections, json, sys, time
tool, path, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
paths = [path] if not path.startswith("@") else open(path[1:]).read().split("\n")
# Each fn scans one file and says whether the tool read all of it ("whole") or gave up part way
# ("partial": a parse error, a skipped file). A partial scan is no comparison for speed.
# Globals each tool reported, where its API lists them (safeload, picklescan): a tool that saw
# fewer distinct globals than safeload did not read everything either (a compressed file it did
# not open, pickles it stopped before).
seen = set()
if tool == "safeload":
    import safeload
    # What the peers do at import time, untimed here as theirs is: safeload imports its scanner
    # and reads its policy on first use instead (a fully cached audit then needs neither).
    import safeload.api
    safeload.api.resolve_policy("default")
    def fn(p):
        report = safeload.scan(p, policy="default")
        seen.update((p, g) for g in report.globals)
        return "partial" if report.verdict.value == "UNSCANNABLE" else "whole"
elif tool == "picklescan":
    from picklescan.scanner import scan_file_path
    def fn(p):
        result = scan_file_path(p)
        seen.update((p, f"{g.module}.{g.name}") for g in result.globals)
        return "partial" if result.scan_err else "whole"
elif tool == "modelscan":
    from modelscan.modelscan import ModelScan
    def fn(p):
        # modelscan lists members it does not scan (torch's version record, storages) as skipped:
        # that is no gap. Its errors are: a member it could not parse.
        return "partial" if ModelScan().scan(p)["errors"] else "whole"
elif tool == "fickling":
    import zipfile
    from fickling.analysis import check_safety
    from fickling.fickle import Pickled
    from fickling.pytorch import PyTorchModelWrapper
    # What fickling.is_likely_safe does for one raw pickle, keeping its "invalid opcode" flag;
    # torch archives go through its PyTorch wrapper, as fickling documents.
    def fn(p):
        if zipfile.is_zipfile(p):
            check_safety(PyTorchModelWrapper(p).pickled)
            return "whole"
        with open(p, "rb") as f:
            pickled = Pickled.load(f, fail_on_decode_error=False)
        if pickled.has_invalid_opcode:
            return "partial"
        check_safety(pickled)
        return "whole"
else:
    raise SystemExit("unknown tool")
best = float("inf")
first = None
passes = spent = 0
# At least `repeat` passes, and more while under half a second in all (at most 500): the best of five
# 1 ms passes is mostly noise on a busy machine.
while passes < repeat or (spent < 0.5 and passes < 500):
    outcomes = collections.Counter()
    t = time.perf_counter()
    for p in paths:
        if p:
            outcomes[fn(p)] += 1
    took = time.perf_counter() - t
    first = took if first is None else first
    best = min(best, took)
    passes += 1
    spent += took
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak.
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
globals_seen = len(seen) if tool in ("safeload", "picklescan") else None
print(json.dumps({"seconds": best, "mean": spent / passes, "first": first, "passes": passes, "peak_rss": rss, "outcomes": dict(outcomes), "globals": globals_seen}))
"""

TOOLS = ("safeload", "picklescan", "modelscan", "fickling")


# Whether a tool flags a file that carries one planted global (a twin of a benchmark file): a tool
# that misses it did not read where it sits, however fast it was.
DETECTOR = r"""
import json, sys
tool, path = sys.argv[1], sys.argv[2]
# Caught: the tool names the planted global (posix.system) among what it calls unsafe, not merely
# any warning (fickling warns about every joblib file, for one).
if tool == "safeload":
    import safeload
    report = safeload.scan(path, policy="default")
    named = [f.global_name or "" for f in report.findings if f.effect.value == "unsafe"]
elif tool == "picklescan":
    from picklescan.scanner import SafetyLevel, scan_file_path
    result = scan_file_path(path)
    named = [f"{g.module}.{g.name}" for g in result.globals if g.safety == SafetyLevel.Dangerous]
elif tool == "modelscan":
    from modelscan.modelscan import ModelScan
    named = [json.dumps(issue, default=str) for issue in ModelScan().scan(path)["issues"]]
elif tool == "fickling":
    import zipfile
    from fickling.analysis import check_safety
    from fickling.fickle import Pickled
    from fickling.pytorch import PyTorchModelWrapper
    if zipfile.is_zipfile(path):
        pickled = PyTorchModelWrapper(path).pickled
    else:
        with open(path, "rb") as f:
            pickled = Pickled.load(f, fail_on_decode_error=False)
    named = [str(r) for r in check_safety(pickled).results]
print("caught" if any("system" in n for n in named) else "MISSED")
"""


def detects(tool: str, path: str, timeout: float = 300) -> str:
    """"caught" or "MISSED" (the planted global), or the tool's error."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", DETECTOR, tool, path],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=TOOL_CWD,
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return f"error: {last[:40]}"
    return proc.stdout.strip()


def walker_build() -> str:
    """Which walker this interpreter's safeload runs: compiled (the install's Cython build) or pure."""
    code = "import safeload.analysis.walker as w; print('compiled' if w.COMPILED else 'pure Python')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TOOL_CWD)
    return out.stdout.strip() or f"unknown ({out.stderr.strip().splitlines()[-1:]})"


def run_tool(tool: str, target: str, repeat: int = 5, timeout: float = 900) -> dict[str, Any] | str:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, tool, target, str(repeat)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=TOOL_CWD,
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return f"error: {last[:60]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[list[str]], headers: list[str]) -> str:
    # strict: a row with a cell too few or too many would silently cut every row's last columns
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def coverage(result: dict[str, Any], reference: dict[str, Any] | str) -> str:
    """"whole" when the tool read every file to the end, else how many it stopped part way through;
    and, where its API lists globals, how many of the (file, global) pairs safeload found it saw."""
    outcomes = result["outcomes"]
    partial = outcomes.get("partial", 0)
    text = "whole" if not partial else f"PARTIAL ({partial} of {sum(outcomes.values())})"
    found = reference.get("globals") if isinstance(reference, dict) else None
    if result.get("globals") is not None and found:
        text += f", {result['globals']} of {found} globals"
    return text
