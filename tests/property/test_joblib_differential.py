"""Mutated joblib files against joblib.load itself: nothing joblib's unpicklers ask for hides from a
SAFE verdict, and where the scan missed a name it says it could not read on.

Each mutant is a real joblib.dump file (arrays, an object array, a payload after the arrays or
inside an object array; uncompressed, or zlib, gzip, bz2, xz compressed with the damage made
before compressing) with bytes flipped, deleted, inserted or repeated. joblib.load reads it in a
subprocess, with and without mmap_mode, its NumpyUnpickler's find_class recording every global and
handing back an inert stub for any outside numpy's and joblib's own, so nothing a file names ever
runs. Where joblib reads on past what the scan could parse (numpy accepts dtype states safeload
does not follow), the scan must have said so (SL200, SL203, SL205) and never be SAFE.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import random
import subprocess
import sys
import zlib
from pathlib import Path

import joblib
import numpy as np
import pytest

import safeload
from safeload.audit_views import policy_allows
from safeload.policy import load_policy

pytestmark = pytest.mark.slow

MUTANTS = 300

# Reads "path<TAB>mmap mode" lines; prints, per line, the globals joblib's unpicklers asked for.
_RECORDING_LOADER = r"""
import _compat_pickle, json, pickle, sys, warnings
warnings.filterwarnings("ignore")
import joblib
import joblib.numpy_pickle as numpy_pickle

class Inert:
    def __init__(self, *args, **kwargs): pass
    def __call__(self, *args, **kwargs): return Inert()
    def __setstate__(self, state): pass

# What joblib files are made of: real, so that arrays are read and the stream goes on after them.
REAL = {("joblib.numpy_pickle", "NumpyArrayWrapper"), ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}
asked = []

def find_class(self, module, name):
    if self.proto < 3 and self.fix_imports:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    asked.append(f"{module}.{name}")
    if (module, name) in REAL:
        return pickle._Unpickler.find_class(self, module, name)
    return Inert

numpy_pickle.NumpyUnpickler.find_class = find_class
for line in sys.stdin:
    path, mode = line.rstrip("\n").split("\t")
    asked.clear()
    try:
        joblib.load(path, mmap_mode=None if mode == "-" else mode)
    except BaseException:
        pass
    print(json.dumps(asked), flush=True)
"""


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _objects(marker: Path) -> list[object]:
    return [
        {"a": np.arange(10.0), "b": np.arange(6, dtype=np.int32).reshape(2, 3), "s": "x"},
        {"o": np.array([1, "two", None], dtype=object), "f": np.asfortranarray(np.ones((3, 2)))},
        [np.arange(4.0), np.zeros(3, dtype=">i4"), _Payload(marker)],
        {"o": np.array([_Payload(marker), 2], dtype=object), "z": np.float64(1.5)},
    ]


_COMPRESS = {
    "zlib": lambda d: zlib.compress(d, 3),
    "gzip": lambda d: gzip.compress(d, 3),
    "bz2": lambda d: bz2.compress(d, 3),
    "xz": lambda d: lzma.compress(d),
}


def _dump(obj: object) -> bytes:
    buf = io.BytesIO()
    joblib.dump(obj, buf)
    return buf.getvalue()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        at = rng.randrange(len(out))
        edit = rng.random()
        if edit < 0.5:
            out[at] = (
                rng.randrange(256) if rng.random() < 0.5 else (out[at] + rng.choice((-2, -1, 1, 2, 8))) % 256
            )
        elif edit < 0.65:
            del out[at : at + rng.randint(1, 8)]
        elif edit < 0.8:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif edit < 0.92:
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randint(1, 64)]
        else:
            del out[rng.randrange(1, len(out)) :]
        if not out:
            out = bytearray(data[:1])
    return bytes(out)


def _record(cases: list[tuple[Path, str]], cwd: Path) -> list[list[str] | None]:
    """What joblib asked for, per case; None where the load ended the process (numpy crashes on
    some dtype states it applies unchecked): the rest go to a fresh process."""
    out: list[list[str] | None] = []
    while len(out) < len(cases):
        rest = cases[len(out) :]
        proc = subprocess.run(
            [sys.executable, "-c", _RECORDING_LOADER],
            input="".join(f"{p}\t{mode}\n" for p, mode in rest),
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=600,
        )
        out.extend(json.loads(line) for line in proc.stdout.splitlines())
        if len(out) < len(cases):
            assert proc.returncode != 0, proc.stderr[-2000:]
            out.append(None)
    return out


def test_what_joblib_asks_for_the_scan_saw_or_said_it_could_not(tmp_path: Path, marker: Path) -> None:
    rng = random.Random(20261123)
    plain = [_dump(obj) for obj in _objects(marker)]
    cases: list[tuple[Path, str]] = []
    for i in range(MUTANTS):
        mutant = _mutate(rng.choice(plain), rng)
        compression = rng.choice(["none", "none", *sorted(_COMPRESS)])
        path = tmp_path / f"mutant{i}.joblib"
        path.write_bytes(mutant if compression == "none" else _COMPRESS[compression](mutant))
        cases.append((path, "-"))
        if compression == "none":
            cases.append((path, "r"))  # joblib.load(mmap_mode="r") reads arrays another way
    asked_per_case = _record(cases, marker.parent)
    policy = load_policy("default")
    reports = {}
    reached = 0
    for (path, mode), asked in zip(cases, asked_per_case, strict=True):
        report = reports.get(path) or reports.setdefault(path, safeload.scan(path))
        if asked is None:
            # What it imported before it crashed is unknown; a file that crashes numpy is never SAFE.
            assert report.verdict.value != "SAFE", f"{path.name} crashed joblib.load (mmap {mode})"
            continue
        said = {f.code for f in report.findings} & {"SL200", "SL203", "SL205"}
        missed = set(asked) - set(report.globals)
        reached += bool(asked)
        where = f"{path.name} (mmap {mode})"
        if report.verdict.value == "SAFE":
            assert not missed, f"{where}: SAFE, but joblib asked for {sorted(missed)}"
            assert all(policy_allows(policy, name) for name in asked), (
                f"{where}: SAFE, but joblib asked for {asked}"
            )
        assert said or not missed, (
            f"{where}: joblib asked for {sorted(missed)}, the scan saw {report.globals}"
        )
    assert reached > len(cases) // 3
