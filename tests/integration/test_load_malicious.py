"""Every malicious fixture is refused by safeload.load, in every container, and its payload never runs.

Payloads only create the test's marker file (the `marker` fixture asserts it never appears).
"""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import safeload
from safeload.errors import SafeloadError, UnsafeModelError
from tests import pickle_builder as pb

Payload = Callable[[Path], bytes]


def _code(marker: Path) -> bytes:
    return pb.unicode(pb.marker_code(marker))


def _touch(marker: Path) -> bytes:
    return pb.unicode(f"touch {marker}")


PAYLOADS: dict[str, Payload] = {
    **{f"exec-protocol-{p}": (lambda m, p=p: pb.exec_payload(m, protocol=p)) for p in range(6)},
    "os-system": lambda m: pb.system_payload(m),
    "posix-system": lambda m: pb.wrap(pb.call(pb.glob("posix", "system"), _touch(m))),
    "eval-python2-name": lambda m: pb.exec_payload(m, protocol=2, module="__builtin__", name="eval"),
    "inst": lambda m: pb.wrap(pb.MARK + _code(m) + pb.inst("builtins", "exec"), 2),
    "obj": lambda m: pb.wrap(pb.MARK + pb.glob("builtins", "exec") + _code(m) + pb.OBJ, 2),
    "newobj": lambda m: pb.wrap(
        pb.glob("subprocess", "Popen")
        + pb.tup(pb.MARK + pb.unicode("touch") + pb.unicode(str(m)) + pb.pickle.LIST)
        + pb.NEWOBJ,
        2,
    ),
    "newobj-ex": lambda m: pb.wrap(
        pb.stack_global("subprocess", "Popen")
        + pb.tup(pb.MARK + pb.unicode("touch") + pb.unicode(str(m)) + pb.pickle.LIST)
        + pb.EMPTY_DICT
        + pb.NEWOBJ_EX,
        4,
    ),
    "stack-global-from-memo": lambda m: pb.wrap(
        pb.unicode("builtins")
        + pb.put(0)
        + pb.POP
        + pb.unicode("exec")
        + pb.put(1)
        + pb.POP
        + pb.get(0)
        + pb.get(1)
        + pb.STACK_GLOBAL
        + pb.tup(_code(m))
        + pb.REDUCE,
        4,
    ),
    "stack-global-non-string": lambda m: pb.wrap(
        pb.binint(7) + pb.unicode("exec") + pb.STACK_GLOBAL + pb.tup(_code(m)) + pb.REDUCE, 4
    ),
    "dotted-name": lambda m: pb.wrap(pb.call(pb.stack_global("pathlib", "os.system"), _touch(m)), 4),
    "runpy": lambda m: pb.wrap(pb.call(pb.glob("runpy", "_run_code"), _code(m), pb.EMPTY_DICT)),
    "timeit": lambda m: pb.wrap(
        pb.call(
            pb.glob("timeit", "timeit"),
            _code(m),
            pb.unicode("pass"),
            pb.glob("time", "perf_counter"),
            pb.binint(1),
        )
    ),
    "cprofile": lambda m: pb.wrap(pb.call(pb.glob("cProfile", "run"), _code(m))),
    "pkgutil-resolve-name": lambda m: pb.wrap(
        pb.call(pb.call(pb.glob("pkgutil", "resolve_name"), pb.unicode("os:system")), _touch(m))
    ),
    "functools-partial": lambda m: pb.wrap(
        pb.glob("functools", "partial")
        + pb.tup(pb.glob("builtins", "exec"), _code(m))
        + pb.REDUCE
        + pb.EMPTY_TUPLE
        + pb.REDUCE
    ),
    "operator-methodcaller": lambda m: pb.wrap(
        pb.call(
            pb.call(pb.glob("operator", "methodcaller"), pb.unicode("system"), _touch(m)),
            pb.glob("posixpath", "os"),
        )
    ),
    "callable-as-argument": lambda m: pb.wrap(
        pb.call(
            pb.glob("torch._tensor", "_rebuild_from_type_v2"),
            pb.glob("builtins", "exec"),
            pb.glob("torch", "Tensor"),
            pb.tup(_code(m)),
            pb.EMPTY_DICT,
        )
    ),
    "payload-before-broken-tail": lambda m: pb.exec_payload(m)[:-1] + b"\xff\xfe",
    "payload-in-second-pickle": lambda m: pickle.dumps({"ok": 1}, protocol=2) + pb.exec_payload(m),
    "frame-lie": lambda m: (
        pb.proto(4) + pb.frame(pb.call(pb.stack_global("builtins", "exec"), _code(m)) + pb.STOP, 5)
    ),
    "ext1": lambda m: pb.wrap(pb.pickle.EXT1 + bytes([200]) + pb.tup(_code(m)) + pb.REDUCE),
    "build-sets-setstate": lambda m: pb.wrap(
        pb.call(pb.glob("argparse", "Namespace"))
        + pb.tup(
            pb.NONE, pb.EMPTY_DICT + pb.unicode("__setstate__") + pb.glob("builtins", "exec") + pb.SETITEM
        )
        + pb.BUILD
        + _code(m)
        + pb.BUILD
    ),
}


def torch_zip_with(data_pkl: bytes) -> bytes:
    """A real torch.save archive whose data.pkl is replaced by `data_pkl` (names and records kept)."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = data_pkl if info.filename.endswith("/data.pkl") else src.read(info.filename)
            dst.writestr(info.filename, body)
    return out.getvalue()


def npy_object_with(pickled: bytes) -> bytes:
    """An .npy object array header followed by the pickle numpy would load."""
    header = repr({"descr": "|O", "fortran_order": False, "shape": (2,)}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + pickled


# Payloads that plain pickle.loads really runs (the rest need another reader: a loop over several
# pickles, a FRAME-sensitive file object, a registered extension code, or never construct).
LIVE = [
    name
    for name in PAYLOADS
    if name
    not in ("payload-in-second-pickle", "frame-lie", "ext1", "newobj", "newobj-ex", "stack-global-non-string")
]


def test_payloads_are_live(tmp_path: Path) -> None:
    """Each refusal below stops a real attack: unrestricted pickle.loads runs these payloads."""
    live = tmp_path / "live"
    live.mkdir()
    for name in LIVE:
        (live / f"{name}.pkl").write_bytes(PAYLOADS[name](live / f"{name}.ran"))
    script = (
        "import pathlib, pickle, sys\n"
        "for p in sorted(pathlib.Path(sys.argv[1]).glob('*.pkl')):\n"
        "    try:\n"
        "        pickle.loads(p.read_bytes())\n"
        "    except Exception:\n"
        "        pass\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(live)], cwd=live, capture_output=True, timeout=300, check=True
    )
    assert sorted(p.stem for p in live.glob("*.ran")) == sorted(LIVE)


CONTAINERS: dict[str, Callable[[bytes], bytes]] = {
    "raw": lambda p: p,
    "torch-zip": torch_zip_with,
    "npy-object": npy_object_with,
}


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_refused_and_never_run(payload: str, container: str, marker: Path, tmp_path: Path) -> None:
    data = CONTAINERS[container](PAYLOADS[payload](marker))
    path = tmp_path / "model.bin"  # the name says nothing: content decides
    path.write_bytes(data)
    with pytest.raises(SafeloadError):
        safeload.load(path)
    with pytest.raises(SafeloadError):
        safeload.loads(data, policy="strict")
    with open(path, "rb") as f, pytest.raises(SafeloadError):
        safeload.load(f, framework="numpy")


def test_real_torch_save_with_a_payload(marker: Path, tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (exec, (pb.marker_code(marker),))

    for legacy in (False, True):
        path = tmp_path / f"ckpt-{legacy}.pt"
        torch.save({"w": torch.ones(3), "cfg": Payload()}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(UnsafeModelError) as info:
            safeload.load(path)
        assert info.value.global_name == "builtins.exec"
        assert info.value.report is not None and info.value.report.verdict.value == "UNSAFE"


def test_payload_in_an_npz_member(marker: Path, tmp_path: Path) -> None:
    path = tmp_path / "arrays.npz"
    np.savez(path, ok=np.arange(3))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("evil.npy", npy_object_with(pb.exec_payload(marker, protocol=3)))
    with pytest.raises(SafeloadError):
        safeload.load(path)


def test_payload_in_a_joblib_file(marker: Path, tmp_path: Path) -> None:
    joblib = pytest.importorskip("joblib")

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (exec, (pb.marker_code(marker),))

    for compress in (0, 3):
        path = tmp_path / f"model-{compress}.joblib"
        joblib.dump({"w": np.arange(4.0), "p": Payload()}, path, compress=compress)
        with pytest.raises(UnsafeModelError):
            safeload.load(path)
