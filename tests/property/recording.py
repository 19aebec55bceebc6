"""Running a real loader on test files in a subprocess, recording every global its unpickler asks
for and handing back an inert stub, so that nothing a file names ever runs (the differential tests).

A recorder script is PRELUDE followed by a body that reads one case a line from stdin, loads it
with ``find_class`` routed through ``record`` (which returns ``Inert`` unless the body hands back a
real class) and prints ``json.dumps(asked)`` for it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import safeload

PRELUDE = r"""
import _compat_pickle, json, pickle, sys, warnings
warnings.filterwarnings("ignore")

class Inert:
    def __init__(self, *args, **kwargs): pass
    def __call__(self, *args, **kwargs): return Inert()
    def __setstate__(self, state): pass

asked = []

def record(module, name, fix_imports=True):
    # What pickle's own find_class does to Python 2 names before importing: the scan reports
    # the mapped name.
    if fix_imports:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    asked.append(f"{module}.{name}")
    return module, name
"""


# The lines of a recorder body that make numpy's own pickle.load calls (np.load of an object array,
# or of a file that is no array) go through ``record``.
NUMPY_RECORDING = r"""
import numpy as np
import numpy.lib._npyio_impl as npyio
try:
    import numpy.lib._format_impl as fmt
except ImportError:  # numpy < 2
    import numpy.lib.format as fmt

class Recording(pickle.Unpickler):
    def find_class(self, module, name):
        record(module, name)
        return Inert

class Pickle:
    UnpicklingError = pickle.UnpicklingError
    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL
    dumps = staticmethod(pickle.dumps)
    dump = staticmethod(pickle.dump)
    @staticmethod
    def load(f, **kwargs):
        return Recording(f).load()

fmt.pickle = npyio.pickle = Pickle
"""


def record_loads(body: str, lines: list[str], cwd: Path, *, crashes: bool = False) -> list[list[str] | None]:
    """The globals asked for, per input line. With ``crashes``, a load that ends the process gets
    None and the lines after it go to a fresh process; otherwise that fails the test."""
    out: list[list[str] | None] = []
    while len(out) < len(lines):
        proc = subprocess.run(
            [sys.executable, "-c", PRELUDE + body],
            input="".join(f"{line}\n" for line in lines[len(out) :]),
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=600,
        )
        out.extend(json.loads(line) for line in proc.stdout.splitlines())
        if len(out) < len(lines):
            assert crashes and proc.returncode != 0, (
                f"the recorder stopped at line {len(out)}: {proc.stderr[-2000:]}"
            )
            out.append(None)
    return out


def assert_the_scan_saw(
    paths: Sequence[Path], asked_per_file: Sequence[list[str] | None], loader: str
) -> int:
    """Whatever ``loader``'s unpickler asked for, the scan of that file listed, unless a limit stopped
    it (then it says so); a SAFE file asked for no payload. Returns how many files reached the
    unpickler: the mutants must, often enough for the comparison to mean anything."""
    reached = 0
    for path, asked in zip(paths, asked_per_file, strict=True):
        assert asked is not None, f"{path.name}: {loader} crashed"
        report = safeload.scan(path)
        limited = any(f.code == "SL203" for f in report.findings)
        missed = set(asked) - set(report.globals)
        reached += bool(asked)
        assert limited or not missed, (
            f"{path.name}: {loader} asked for {sorted(missed)}, the scan saw {report.globals}"
        )
        if report.verdict.value == "SAFE":
            assert not missed and "builtins.exec" not in asked, path.name
    return reached
