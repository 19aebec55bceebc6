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
import lzma
import random
import zlib
from pathlib import Path

import joblib
import numpy as np
import pytest

import safeload
from safeload.audit_views import policy_allows
from safeload.policy import load_policy
from tests.property.recording import record_loads
from tests.unit.formats.torchfiles import Payload

pytestmark = pytest.mark.slow

MUTANTS = 300

# Reads "path<TAB>mmap mode" lines; prints, per line, the globals joblib's unpicklers asked for.
_LOAD_WITH_JOBLIB = r"""
import joblib
import joblib.numpy_pickle as numpy_pickle

# What joblib files are made of: real, so that arrays are read and the stream goes on after them.
REAL = {("joblib.numpy_pickle", "NumpyArrayWrapper"), ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

def find_class(self, module, name):
    module, name = record(module, name, self.proto < 3 and self.fix_imports)
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


def _objects() -> list[object]:
    return [
        {"a": np.arange(10.0), "b": np.arange(6, dtype=np.int32).reshape(2, 3), "s": "x"},
        {"o": np.array([1, "two", None], dtype=object), "f": np.asfortranarray(np.ones((3, 2)))},
        [np.arange(4.0), np.zeros(3, dtype=">i4"), Payload()],
        {"o": np.array([Payload(), 2], dtype=object), "z": np.float64(1.5)},
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


def test_what_joblib_asks_for_the_scan_saw_or_said_it_could_not(tmp_path: Path, marker: Path) -> None:
    rng = random.Random(20261123)
    plain = [_dump(obj) for obj in _objects()]
    cases: list[tuple[Path, str]] = []
    for i in range(MUTANTS):
        mutant = _mutate(rng.choice(plain), rng)
        compression = rng.choice(["none", "none", *sorted(_COMPRESS)])
        path = tmp_path / f"mutant{i}.joblib"
        path.write_bytes(mutant if compression == "none" else _COMPRESS[compression](mutant))
        cases.append((path, "-"))
        if compression == "none":
            cases.append((path, "r"))  # joblib.load(mmap_mode="r") reads arrays another way
    # A load that crashes numpy (dtype states it applies unchecked) ends its process: None.
    asked_per_case = record_loads(
        _LOAD_WITH_JOBLIB, [f"{p}\t{mode}" for p, mode in cases], marker.parent, crashes=True
    )
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
