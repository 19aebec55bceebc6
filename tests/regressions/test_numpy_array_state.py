"""numpy's ndarray.__setstate__ reads an object array's items without checking how many it was
given: a pickle whose shape claims more items than its list holds crashed the loading process
(found by the byte-flip tests: one flipped byte of a real .npy object array). The loader checks
the state first and refuses it."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import safeload
from safeload.loader.array_state import build_state_problem
from safeload.model import Verdict

ROOT = Path(__file__).resolve().parents[2]


def _object_npy(shape_claimed: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, [2, 3]], dtype=object), allow_pickle=True)
    data = buf.getvalue()
    # BUILD's state starts (version 1, shape (2,)): "K\x01K\x02\x85". Claim more items.
    at = data.index(b"K\x01K\x02\x85") + 2
    return data[:at] + b"K" + bytes([shape_claimed]) + data[at + 2 :]


def test_the_short_object_list_is_a_real_crash_in_numpy() -> None:
    """Why the check exists: numpy itself, given that state, dies (run in its own process)."""
    code = (
        "import numpy as np\n"
        "from numpy._core.multiarray import _reconstruct\n"
        "a = _reconstruct(np.ndarray, (0,), b'b')\n"
        "a.__setstate__((1, (191,), np.dtype('O'), False, [{'a': 1}, [2, 3]]))\n"
        "print(a[150])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0  # a segfault (-11) in numpy 2.4; never a clean run


def test_the_loader_refuses_the_state_instead_of_crashing(tmp_path: Path) -> None:
    data = _object_npy(191)
    path = tmp_path / "short.npy"
    path.write_bytes(data)
    assert safeload.scan_bytes(data).verdict is Verdict.SAFE  # every global is allowed
    # In a child process: should the check regress, the crash takes that process, not the tests.
    code = (
        "import sys, safeload\n"
        "from safeload.errors import UnsafeModelError\n"
        "try:\n"
        "    safeload.load(sys.argv[1])\n"
        "except UnsafeModelError as exc:\n"
        "    print('refused:', exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "object array of shape (191,)" in proc.stdout


def test_well_formed_object_arrays_still_load() -> None:
    value = np.empty((2, 2), dtype=object)
    value[:] = [[{"a": 1}, [2]], ["x", None]]
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=True)
    loaded = safeload.loads(buf.getvalue())
    assert loaded.shape == (2, 2) and loaded[0, 0] == {"a": 1} and loaded[1, 0] == "x"
    assert safeload.loads(pickle.dumps(np.arange(6.0).reshape(2, 3), protocol=2)).tolist() == [
        [0.0, 1.0, 2.0],
        [3.0, 4.0, 5.0],
    ]


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ((1, (3,), np.dtype("O"), False, [1, 2]), "given 2 values"),
        ((1, (3,), np.dtype("O"), False, (1, 2, 3)), "given a tuple"),
        ((1, (2, 2), np.dtype("O"), False, [1, 2, 3]), "(4 items)"),
        ((1, (-1,), np.dtype("f4"), False, b""), "non-negative"),
        ((1, [3], np.dtype("f4"), False, b"\0" * 12), "non-negative"),
        ((1, (3,), "f4", False, b"\0" * 12), "not a numpy dtype"),
        ((1, (3,)), "not (version"),
    ],
)
def test_malformed_states(state: tuple[object, ...], why: str) -> None:
    target = np.ndarray((0,), dtype=np.int8)
    problem = build_state_problem(target, state)
    assert problem is not None and why in problem


def test_good_states_and_other_targets_pass() -> None:
    target = np.ndarray((0,), dtype=np.int8)
    assert build_state_problem(target, (1, (3,), np.dtype("O"), False, [1, 2, 3])) is None
    assert build_state_problem(target, ((3,), np.dtype("f4"), False, b"\0" * 12)) is None
    assert build_state_problem(target, (1, (2, 0), np.dtype("O"), False, [])) is None
    assert build_state_problem({"not": "an array"}, (1, (3,), np.dtype("O"), False, [])) is None
