"""Hostile inputs: what each scanner spends on files built to exhaust it, side by side.

    python bench/bench_hostile.py [--timeout 120] [--only NAME ...]

Each case is a small file shaped against a scanner's bounds (a flood of import sites, tens of
thousands of distinct globals, memo fan-out, millions of tiny opcodes, archives of 100,000
members), with one planted ``os.system`` call at its end. Prints each tool's scan time and peak
RSS, the time as a ratio to safeload's (>1: safeload faster), whether the tool read the file to
its end, and whether it named the planted global. A tool that runs out of time has failed open
unless its caller treats the timeout as a refusal; a safeload scan that stops at a bound is
UNSCANNABLE (exit 2): refused, never passed. Nothing unpickles these files (the script stops if
the payload's marker file ever appears).
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, TOOLS, coverage, detects, run_tool, table, walker_build  # noqa: E402

MARKER = OUT / "hostile-marker"


def _planted(protocol: int = 2) -> bytes:
    """A pickle whose load would run ``os.system("touch MARKER")``; nothing here loads it."""
    command = f"touch {MARKER}".encode()
    return (
        b"\x80"
        + bytes([protocol])
        + b"cos\nsystem\n"
        + b"X"
        + struct.pack("<I", len(command))
        + command
        + b"\x85R."  # TUPLE1, REDUCE, STOP
    )


def _flood(sites: int) -> bytes:
    """``sites`` lookups of one allowed global (STACK_GLOBAL over two memoized strings, 6 bytes a
    site), then the planted call, in one pickle."""
    head = b"\x80\x04\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94"
    return head + b"h\x00h\x01\x930" * sites + _planted()[2:]


def sites(path: Path) -> None:
    path.write_bytes(_flood(199_000))


def sites_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(5):
            archive.writestr(f"m{i}.pkl", _flood(199_000))


def distinct_globals(path: Path) -> None:
    body = b"".join(b"cm%d\nn\n0" % i for i in range(50_000))  # GLOBAL, POP
    path.write_bytes(b"\x80\x02" + body + _planted()[2:])


def memo_fan_out(path: Path) -> None:
    out = b"\x80\x04]\x94"  # an empty list, memoized
    for level in range(60):
        out += b"(" + (b"j" + struct.pack("<I", level)) * 16 + b"l\x94"  # 16 refs to the last level
    path.write_bytes(out + b"00" + _planted()[2:])  # POP the last level and the first list


def tiny_opcodes(path: Path) -> None:
    path.write_bytes(b"\x80\x02" + b"N0" * 10_000_000 + _planted()[2:])  # NONE, POP: 20 million opcodes


def zip_members(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for i in range(100_000):
            archive.writestr(f"m{i}.pkl", b"N.")
        archive.writestr("z.pkl", _planted())


def tar_members(path: Path) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for i in range(100_000):
            info = tarfile.TarInfo(f"m{i}.pkl")
            info.size = 2
            archive.addfile(info, io.BytesIO(b"N."))
        planted = _planted()
        info = tarfile.TarInfo("z.pkl")
        info.size = len(planted)
        archive.addfile(info, io.BytesIO(planted))


CASES: list[tuple[str, str, Callable[[Path], None]]] = [
    ("sites", "199,000 import sites in one pickle", sites),
    ("sites-zip", "a zip of five such pickles", sites_zip),
    ("globals", "50,000 distinct globals", distinct_globals),
    ("fan-out", "memo fan-out, 16^60 references", memo_fan_out),
    ("opcodes", "20 million one-byte opcodes", tiny_opcodes),
    ("zip-members", "a zip of 100,000 pickles", zip_members),
    ("tar-members", "a tar.gz of 100,000 pickles", tar_members),
]
SUFFIX = {"sites-zip": ".zip", "zip-members": ".zip", "tar-members": ".tar.gz"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=120, help="seconds per tool and case (default 120)")
    ap.add_argument("--only", nargs="+", choices=[c[0] for c in CASES], help="run these cases only")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    MARKER.unlink(missing_ok=True)
    rows = []
    for name, what, make in CASES:
        if args.only and name not in args.only:
            continue
        target = OUT / f"hostile_{name}{SUFFIX.get(name, '.pkl')}"
        if not target.exists():
            make(target)
        size = target.stat().st_size
        results = {tool: run_tool(tool, str(target), repeat=1, timeout=args.timeout) for tool in TOOLS}
        base = results["safeload"]
        for tool in TOOLS:
            r = results[tool]
            if isinstance(r, str):  # a timeout or the tool's error
                rows.append([what, f"{size / 1e6:.2f}", tool, "-", "", "", r, ""])
                continue
            ratio = (
                r["seconds"] / base["seconds"] if isinstance(base, dict) and base["seconds"] else float("nan")
            )
            rows.append(
                [
                    what,
                    f"{size / 1e6:.2f}",
                    tool,
                    f"{r['seconds']:.2f}",
                    f"{r['peak_rss'] / 1e6:.0f}",
                    "1.00 (base)" if tool == "safeload" else f"{ratio:.2f}",
                    coverage(r, base),
                    detects(tool, str(target), timeout=args.timeout),
                ]
            )
    if MARKER.exists():
        raise SystemExit(f"a tool ran a planted payload: {MARKER} exists")
    print(f"safeload walker: {walker_build()}")
    print(table(rows, ["case", "MB", "tool", "seconds", "peak RSS MB", "vs safeload", "read", "planted"]))
    print("seconds: one scan, the tool's imports not counted; peak RSS: the whole process. vs safeload: the")
    print(
        "peer's time over safeload's; above 1 safeload is faster. read: PARTIAL means the tool stopped part"
    )
    print("way; for safeload that is an UNSCANNABLE verdict (SL203 at a bound: exit 2, the file refused).")
    print("planted: whether the tool named the os.system call at the file's end. A timeout or MISSED with a")
    print("clean result is a pass for the payload; safeload's MISSED comes with its refusal (PARTIAL).")


if __name__ == "__main__":
    main()
