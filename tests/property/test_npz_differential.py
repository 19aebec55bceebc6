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
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import safeload
from tests.property.test_loader_differential import mutate

pytestmark = pytest.mark.slow

MUTANTS = 400

# Reads paths from stdin; prints, per path, the globals numpy's unpickler asked for.
_RECORDING_LOADER = r"""
import _compat_pickle, json, pickle, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np
try:
    import numpy.lib._format_impl as fmt
except ImportError:  # numpy < 2
    import numpy.lib.format as fmt

class Inert:
    def __init__(self, *args, **kwargs): pass
    def __call__(self, *args, **kwargs): return Inert()
    def __setstate__(self, state): pass

asked = []

class Recording(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        asked.append(f"{module}.{name}")
        return Inert

class Pickle:
    UnpicklingError = pickle.UnpicklingError
    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL
    dumps = staticmethod(pickle.dumps)
    dump = staticmethod(pickle.dump)
    @staticmethod
    def load(f, **kwargs):
        return Recording(f).load()

fmt.pickle = Pickle
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


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    marker = tmp_path_factory.mktemp("npz") / "PAYLOAD_RAN"
    out = []
    for save in (np.savez, np.savez_compressed):
        for evil in (False, True):
            objects = np.array([_Payload(marker) if evil else "x", 2], dtype=object)
            buf = io.BytesIO()
            save(buf, w=np.arange(8.0), o=objects, b=np.ones((2, 2), dtype=">i2"))
            out.append(buf.getvalue())
    assert not marker.exists()
    return out


def test_what_numpy_asks_for_the_scan_saw(archives: list[bytes], tmp_path: Path, marker: Path) -> None:
    rng = random.Random(20261123)
    paths = []
    for i in range(MUTANTS):
        path = tmp_path / f"mutant{i}.npz"
        path.write_bytes(mutate(archives[i % len(archives)], rng))
        paths.append(path)
    proc = subprocess.run(
        [sys.executable, "-c", _RECORDING_LOADER],
        input="".join(f"{p}\n" for p in paths),
        capture_output=True,
        text=True,
        cwd=marker.parent,
        timeout=600,
    )
    asked_per_file = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(asked_per_file) == MUTANTS, proc.stderr[-2000:]
    reached = 0
    for path, asked in zip(paths, asked_per_file, strict=True):
        report = safeload.scan(path)
        limited = any(f.code == "SL203" for f in report.findings)
        missed = set(asked) - set(report.globals)
        reached += bool(asked)
        assert limited or not missed, (
            f"{path.name}: numpy asked for {sorted(missed)}, the scan saw {report.globals}"
        )
        if report.verdict.value == "SAFE":
            assert "builtins.exec" not in asked, path.name
    assert reached > MUTANTS // 4, reached
