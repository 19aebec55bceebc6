"""Mutated npz files against numpy.load itself: whatever numpy's unpickler asks for, the scan saw.

Each mutant rewrites fields of a real np.savez / np.savez_compressed archive's zip records (offsets,
sizes, counts, name lengths) the way evasion tricks do, or a byte anywhere. numpy.load(
allow_pickle=True) then reads every member it lists in a subprocess whose pickle module records
every global the unpickler asks for and hands back an inert stub, so nothing a file names ever
runs. numpy reads the zip with Python's zipfile, not torch's reader: the scan must still have
listed every such global, unless a limit stopped it (then it says so).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest

from tests.property.recording import NUMPY_RECORDING, assert_the_scan_saw, record_loads
from tests.property.test_loader_differential import mutate
from tests.unit.formats.torchfiles import Payload

pytestmark = pytest.mark.slow

MUTANTS = 400

# Reads paths from stdin; prints, per path, the globals numpy's unpickler asked for.
_LOAD_WITH_NUMPY = (
    NUMPY_RECORDING
    + r"""
for line in sys.stdin:
    asked.clear()
    try:
        with np.load(line.strip(), allow_pickle=True) as archive:
            for key in archive.files:
                try:
                    archive[key]
                except Exception:
                    pass
    except Exception:
        pass
    print(json.dumps(asked), flush=True)
"""
)


@pytest.fixture(scope="module")
def archives() -> list[bytes]:
    out = []
    for save in (np.savez, np.savez_compressed):
        for evil in (False, True):
            objects = np.array([Payload() if evil else "x", 2], dtype=object)
            buf = io.BytesIO()
            save(buf, w=np.arange(8.0), o=objects, b=np.ones((2, 2), dtype=">i2"))
            out.append(buf.getvalue())
    return out


def test_what_numpy_asks_for_the_scan_saw(archives: list[bytes], tmp_path: Path, marker: Path) -> None:
    rng = random.Random(20261123)
    paths = []
    for i in range(MUTANTS):
        path = tmp_path / f"mutant{i}.npz"
        path.write_bytes(mutate(archives[i % len(archives)], rng))
        paths.append(path)
    asked_per_file = record_loads(_LOAD_WITH_NUMPY, [str(p) for p in paths], marker.parent)
    assert assert_the_scan_saw(paths, asked_per_file, "numpy") > MUTANTS // 4
