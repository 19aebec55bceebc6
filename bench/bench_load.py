"""Load speed and memory of safeload.load against torch.load(weights_only=True), same files, same run.

    python bench/bench_load.py [--size-mb 1024] [--small 10000] [--legacy-mb 256] [--repeat 2]

Cases: a large state dict (torch zip), a checkpoint of many small tensors, and a legacy
(non-zip) file. Every measurement runs in a fresh interpreter: imports are not timed, the load is;
"peak RSS" is the process peak and "+RSS" its growth over the RSS just before the load (the
checkpoint's own footprint). safeload's time includes its scan. Ratios are safeload / torch
(< 1: safeload faster or smaller). Files are written to bench/out/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

RUNNER = r"""
import gc, json, resource, sys, time
sys.path.append(sys.argv[4])  # an installed safeload wins; the checkout is the fallback
tool, path, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch, safeload

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

calls = {
    "safeload.load": lambda: safeload.load(path),
    "safeload.load(mmap)": lambda: safeload.load(path, mmap=True),
    "safeload.scan": lambda: safeload.scan(path),
    "torch.load": lambda: torch.load(path, weights_only=True),
    "torch.load(mmap)": lambda: torch.load(path, weights_only=True, mmap=True),
}
fn = calls[tool]
# Warm up on a tiny checkpoint with the same call: lazy imports and caches are not what is measured.
warm = sys.argv[5]
path, keep = warm, path
fn()
path = keep
gc.collect()
base = rss()
best = float("inf")
for _ in range(repeat):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
    del out
    gc.collect()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": best, "peak_rss": peak, "growth": peak - base}))
"""


def make_large(path: Path, size_mb: int) -> None:
    code = (
        "import sys, torch\n"
        "n = max(1, int(sys.argv[2]) // 16)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "torch.save({f'layer{i}.weight': torch.randn(4 * 1024 * 1024, generator=g) for i in range(n)}, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(size_mb)], check=True)


def make_small(path: Path, count: int) -> None:
    code = (
        "import sys, torch\n"
        "n = int(sys.argv[2])\n"
        "sd = {f'block{i // 4}.layer{i % 4}.weight': torch.randn(8, 8) for i in range(n)}\n"
        "torch.save(sd, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(count)], check=True)


def make_legacy(path: Path, size_mb: int) -> None:
    code = (
        "import sys, torch\n"
        "n = max(1, int(sys.argv[2]) // 16)\n"
        "sd = {f'layer{i}.weight': torch.randn(4 * 1024 * 1024) for i in range(n)}\n"
        "sd.update({f'small{i}': torch.randn(16) for i in range(200)})\n"
        "torch.save(sd, sys.argv[1], _use_new_zipfile_serialization=False)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(size_mb)], check=True)


def measure(tool: str, path: Path, repeat: int, warm: Path) -> dict[str, float] | str:
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, tool, str(path), str(repeat), str(REPO), str(warm)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=OUT,  # not the repository root, whose safeload package `python -c` would import first
    )
    if proc.returncode != 0:
        return "error: " + ((proc.stderr.strip().splitlines() or ["failed"])[-1])[:70]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / (1 << 20):.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--legacy-mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    cases = [
        (
            f"state dict {args.size_mb} MB",
            OUT / f"load_large_{args.size_mb}.pt",
            make_large,
            args.size_mb,
            True,
        ),
        (f"{args.small} small tensors", OUT / f"load_small_{args.small}.pt", make_small, args.small, True),
        (
            f"legacy {args.legacy_mb} MB",
            OUT / f"load_legacy_{args.legacy_mb}.pt",
            make_legacy,
            args.legacy_mb,
            False,
        ),
    ]
    rows: list[list[str]] = []
    for label, path, make, size, is_zip in cases:
        if not path.exists():
            make(path, size)
        tools = ["torch.load", "safeload.load", "safeload.scan"]
        if is_zip:
            tools += ["torch.load(mmap)", "safeload.load(mmap)"]
        warm = OUT / ("load_warm.pt" if is_zip else "load_warm_legacy.pt")
        if not warm.exists():
            make_legacy(warm, 0) if not is_zip else make_small(warm, 4)
        results = {tool: measure(tool, path, args.repeat, warm) for tool in tools}
        for tool in tools:
            r = results[tool]
            if isinstance(r, str):
                rows.append([label, tool, r, "", "", ""])
                continue
            peer = results["torch.load(mmap)" if "mmap" in tool else "torch.load"]
            ratio = (
                f"{r['seconds'] / peer['seconds']:.2f}x"
                if isinstance(peer, dict) and tool != "safeload.scan"
                else ""
            )
            rows.append([label, tool, f"{r['seconds']:.3f} s", ratio, mb(r["peak_rss"]), mb(r["growth"])])
        print(f"done: {label}", file=sys.stderr)
    print(table(rows, ["case", "tool", "time", "vs torch", "peak RSS", "+RSS"]))


if __name__ == "__main__":
    main()
