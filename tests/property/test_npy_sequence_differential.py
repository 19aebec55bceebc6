"""Mutated multi-array .npy files against np.load itself, called on one handle until the file ends
(numpy's documented way to read what repeated np.save calls wrote): whatever numpy's unpickler asks
for, the scan saw.

Each seed is one to three arrays (plain, or object arrays holding a payload or plain values),
sometimes followed by a bare pickle (np.load with allow_pickle unpickles what is no array). Then
bytes are flipped (mostly in the headers, where shapes and dtypes decide where the next array
starts), inserted, deleted or cut. A subprocess reads each file with np.load(allow_pickle=True) in
a loop, numpy's pickle module replaced by one whose unpickler records every global and hands back
an inert stub, so nothing a file names ever runs.
"""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from tests.pickle_builder import exec_payload
from tests.property.recording import NUMPY_RECORDING, assert_the_scan_saw, record_loads
from tests.unit.formats.torchfiles import Payload

pytestmark = pytest.mark.slow

MUTANTS = 400

_LOAD_IN_A_LOOP = (
    NUMPY_RECORDING
    + r"""
for line in sys.stdin:
    asked.clear()
    try:
        with open(line.strip(), "rb") as f:
            while f.peek(1):
                np.load(f, allow_pickle=True)
    except Exception:
        pass
    print(json.dumps(asked), flush=True)
"""
)


def _seed(rng: random.Random, marker: Path) -> bytes:
    out = io.BytesIO()
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.4:
            array = np.arange(rng.randint(0, 20), dtype=rng.choice(["<f8", ">i4", "<u2", "|u1"]))
        elif kind < 0.7:
            array = np.array([Payload(), rng.randint(0, 9)], dtype=object)
        else:
            array = np.array(["x", None, (1, 2)], dtype=object)
        np.save(out, array, allow_pickle=True)
    if rng.random() < 0.3:
        out.write(
            exec_payload(marker, protocol=rng.choice((0, 2))) if rng.random() < 0.7 else pickle.dumps([1])
        )
    return out.getvalue()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    headers = [i for i in range(len(out)) if out.startswith(b"\x93NUMPY", i)]
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        if not out:
            break
        if headers and rng.random() < 0.6:
            at = min(len(out) - 1, rng.choice(headers) + rng.randrange(128))  # a header's text
        else:
            at = rng.randrange(len(out))
        edit = rng.random()
        if edit < 0.6:
            out[at] = rng.choice(b"0123456789(),' <>|fiuOb") if rng.random() < 0.5 else rng.randrange(256)
        elif edit < 0.75:
            del out[at : at + rng.randint(1, 8)]
        elif edit < 0.9:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        else:
            del out[at:]
    return bytes(out)


def test_what_np_load_in_a_loop_asks_for_the_scan_saw(tmp_path: Path, marker: Path) -> None:
    rng = random.Random(20261124)
    paths = []
    for i in range(MUTANTS):
        path = tmp_path / f"mutant{i}.npy"
        path.write_bytes(_mutate(_seed(rng, marker), rng))
        paths.append(path)
    asked = record_loads(_LOAD_IN_A_LOOP, [str(p) for p in paths], marker.parent)
    assert assert_the_scan_saw(paths, asked, "np.load") > MUTANTS // 4
    assert not marker.exists()
