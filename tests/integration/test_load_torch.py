"""safeload.load as a drop-in torch.load: same objects, from paths, file objects and bytes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import safeload
from safeload import api
from safeload.errors import DisallowedGlobalError, LoadError
from tests import pickle_builder as pb
from tests.unit.loader import models
from tests.unit.loader.compare import assert_same

REPO = Path(__file__).resolve().parents[2]


def checkpoint(*, new_dtypes: bool = True) -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 4, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    dtypes = {
        "bf16": base.to(torch.bfloat16),
        "c64": torch.complex(base, base),
        "bool": base > 0,
        "i64": torch.arange(5),
    }
    if new_dtypes:  # saved as UntypedStorage + dtype, which torch's legacy loader cannot read
        dtypes.update(f8=base.to(torch.float8_e4m3fn), u16=torch.arange(3).to(torch.uint16))
    return {
        "model": model.state_dict(),
        "views": [base, base.t(), base[2:, 1:3]],
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
        "dtypes": dtypes,
        "sparse": torch.eye(3).to_sparse(),
        "meta": {
            "epoch": 3,
            "size": torch.Size([6, 4]),
            "device": torch.device("cpu"),
            "dtype": torch.float16,
        },
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_equal_to_torch_load_from_every_kind_of_input(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint(new_dtypes=not legacy), path, _use_new_zipfile_serialization=not legacy)
    ref = torch.load(path, weights_only=True)
    assert_same(ref, safeload.load(path))
    assert_same(ref, safeload.load(str(path)))
    with open(path, "rb") as f:
        assert_same(ref, safeload.load(f))
    assert_same(ref, safeload.load(io.BytesIO(path.read_bytes())))
    assert_same(ref, safeload.loads(path.read_bytes()))
    assert isinstance(safeload.load(path)["model"], OrderedDict)


def test_legacy_views_share_storage(tmp_path: Path) -> None:
    x = torch.arange(10.0)
    path = tmp_path / "legacy.pt"
    torch.save({"x": x, "a": x[2:5], "b": x.view(2, 5)}, path, _use_new_zipfile_serialization=False)
    out = safeload.load(path)
    assert_same(torch.load(path, weights_only=True), out)
    out["x"][3] = -1.0
    assert out["a"][1] == -1.0 and out["b"][0, 3] == -1.0


def test_legacy_with_mmap_is_refused_like_torch(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"x": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError):
        torch.load(path, weights_only=True, mmap=True)
    with pytest.raises(LoadError, match="zip format"):
        safeload.load(path, mmap=True)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_numpy_framework_through_load(tmp_path: Path, legacy: bool) -> None:
    import numpy as np

    path = tmp_path / "ckpt.pt"
    w = torch.arange(6.0).reshape(2, 3)
    obj = {"w": w, "wt": w.t(), "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    out = safeload.load(path, framework="numpy")
    assert out["w"].tolist() == w.tolist() and out["wt"].tolist() == w.t().tolist()
    assert str(out["b"].dtype) == "bfloat16" and np.shares_memory(out["w"], out["wt"])


def test_whole_model_loads_when_its_classes_are_allowed(tmp_path: Path) -> None:
    net = models.Net()
    path = tmp_path / "model.pt"
    torch.save(net, path)
    with pytest.raises(DisallowedGlobalError) as info:
        safeload.load(path)
    report = info.value.report
    assert report is not None
    needed = sorted(f.global_name for f in report.findings if f.code == "SL101")
    assert needed == [
        "tests.unit.loader.models.Net",
        "torch.nn.modules.activation.ReLU",
        "torch.nn.modules.linear.Linear",
    ]
    loaded = safeload.load(path, allow=needed)
    assert type(loaded) is models.Net and loaded.scale == 2.0
    x = torch.ones(1, 4)
    assert torch.equal(loaded(x), net(x))
    assert_same(net.state_dict(), loaded.state_dict())


def test_the_loaded_object_is_the_scanned_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marker: Path
) -> None:
    """Time of check / time of use: the path is swapped for a malicious file right after the scan.

    The loader unpickles the buffer the scan read; the path is never opened again.
    """
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pb.exec_payload(marker))
    real_analyse = api.analyse
    opened: list[str] = []

    def analyse_then_swap(*args: Any, **kwargs: Any) -> Any:
        result = real_analyse(*args, **kwargs)
        os.replace(evil, path)  # an attacker wins the race: the path now holds a payload
        real_open, real_os_open = open, os.open

        def spy_open(file: Any, *a: Any, **k: Any) -> Any:
            opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
            return real_open(file, *a, **k)

        def spy_os_open(file: Any, *a: Any, **k: Any) -> Any:
            opened.append(os.fspath(file))
            return real_os_open(file, *a, **k)

        monkeypatch.setattr("builtins.open", spy_open)
        monkeypatch.setattr(os, "open", spy_os_open)
        return result

    monkeypatch.setattr(api, "analyse", analyse_then_swap)
    out = safeload.load(path)
    monkeypatch.undo()
    assert torch.equal(out["w"], torch.arange(4.0))  # the scanned content, not the swapped one
    assert str(path) not in opened
    assert path.read_bytes() == pb.exec_payload(marker)  # the swap really happened


def test_mmap_does_not_grow_rss_by_the_checkpoint_size(tmp_path: Path) -> None:
    """~200 MB checkpoint: RSS grows by the checkpoint without mmap, and by far less with it."""
    path = tmp_path / "big.pt"
    make = "import sys, torch; torch.save({f'w{i}': torch.full((1024, 1024), float(i)) for i in range(50)}, sys.argv[1])"
    subprocess.run([sys.executable, "-c", make, str(path)], check=True, timeout=300)
    measure = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[3])
        import torch, safeload

        def rss_mb():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) // 1024

        before = rss_mb()
        sd = safeload.load(sys.argv[1], mmap=sys.argv[2] == "mmap")
        grown = rss_mb() - before
        assert sd["w7"][5, 9].item() == 7.0 and sd["w49"].shape == (1024, 1024), "wrong values"
        print(grown)
        """
    )
    grown = {}
    for mode in ("mmap", "copy"):
        proc = subprocess.run(
            [sys.executable, "-c", measure, str(path), mode, str(REPO)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        grown[mode] = int(proc.stdout.strip().splitlines()[-1])
    size_mb = path.stat().st_size >> 20
    assert grown["copy"] >= size_mb * 0.8, grown  # the measurement sees a full read
    assert grown["mmap"] < size_mb * 0.25, grown  # mmap: only touched pages


def test_mmap_tensors_are_writable_and_private_like_torchs(tmp_path: Path) -> None:
    """torch.load(mmap=True) maps the file copy-on-write: tensors take writes, the file does not change.

    Run in a subprocess: a write through a read-only mapping would crash the interpreter.
    """
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(4)}, path)
    before = path.read_bytes()
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); import safeload\n"
        "sd = safeload.load(sys.argv[1], mmap=True)\n"
        "sd['w'].add_(1)\n"
        "assert sd['w'].tolist() == [2.0] * 4\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    assert path.read_bytes() == before


def test_usage_errors(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"x": torch.ones(1)}, path)
    with pytest.raises(ValueError, match="framework"):
        safeload.load(path, framework="jax")
    with pytest.raises(TypeError, match="unexpected keyword"):
        safeload.load(path, mmap_mode="r")
    with pytest.raises(TypeError):
        safeload.load(path, pickle_module=__import__("pickle"))
