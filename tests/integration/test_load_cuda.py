"""map_location with a real GPU: the same devices and values as torch.load(weights_only=True).

Needs CUDA; on a machine without it these tests are skipped (the CPU forms are covered in
tests/unit/loader/test_map_location.py). Also runnable on a GPU host without pytest, from the
repository root: ``python -m tests.integration.test_load_cuda``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

import safeload
from safeload.loader import unpickle
from tests.unit.loader import handmade
from tests.unit.loader.compare import assert_same

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _save(obj: Any) -> bytearray:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return bytearray(buf.getvalue())


def _objects(device: str) -> dict[str, Any]:
    x = torch.arange(24.0, device=device).reshape(4, 6)
    return {
        "x": x,
        "view": x[1:, ::2],
        "param": torch.nn.Parameter(torch.ones(3, device=device)),
        "bf16": x.to(torch.bfloat16),
        "f8": x.to(torch.float8_e4m3fn),
    }


MAPS = {
    "none": None,
    "str": "cuda",
    "str-index": "cuda:0",
    "device": torch.device("cuda", 0),
    "dict": {"cpu": "cuda:0"},
    "callable": lambda storage, location: storage.cuda(0),
}


@pytest.mark.parametrize("name", list(MAPS))
def test_cpu_file_to_gpu(name: str) -> None:
    data = _save(_objects("cpu"))
    ref = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location=MAPS[name])
    out = unpickle(handmade.torch_zip(data), map_location=MAPS[name])
    assert_same(ref, out)
    assert out["x"].device == ref["x"].device


@pytest.mark.parametrize(
    "map_location", [None, "cpu", {"cuda:0": "cpu"}, lambda s, loc: s], ids=["none", "cpu", "dict", "callable"]
)
def test_gpu_file(map_location: Any) -> None:
    data = _save(_objects("cuda"))
    ref = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location=map_location)
    out = unpickle(handmade.torch_zip(data), map_location=map_location)
    assert_same(ref, out)
    assert out["view"].device == ref["view"].device


@pytest.mark.parametrize("map_location", [None, "cpu", {"cuda:0": "cpu"}], ids=["none", "cpu", "dict"])
def test_legacy_gpu_file(tmp_path: Path, map_location: Any) -> None:
    # the legacy format names each storage's device in its own pickle and restores it there
    path = tmp_path / "legacy-gpu.pt"
    objects = _objects("cuda")
    del objects["f8"]  # torch writes float8 legacy storages untyped and cannot read them back itself
    torch.save(objects, path, _use_new_zipfile_serialization=False)
    ref = torch.load(path, weights_only=True, map_location=map_location)
    out = safeload.load(path, map_location=map_location)
    assert_same(ref, out)
    assert out["view"].device == ref["view"].device


def test_file_object_gpu_to_gpu() -> None:
    data = bytes(_save(_objects("cuda")))
    ref = torch.load(io.BytesIO(data), weights_only=True)
    out = safeload.load(io.BytesIO(data))
    assert_same(ref, out)
    assert out["param"].device.type == "cuda" and isinstance(out["param"], torch.nn.Parameter)


def test_load_with_mmap_to_gpu(tmp_path: Path) -> None:
    path = tmp_path / "gpu.pt"
    torch.save(_objects("cuda"), path)
    ref = torch.load(path, weights_only=True, mmap=True)
    out = safeload.load(path, mmap=True)
    assert_same(ref, out)
    out_cpu = safeload.load(path, map_location="cpu", mmap=True)
    assert out_cpu["x"].device.type == "cpu" and torch.equal(out_cpu["x"], ref["x"].cpu())


if __name__ == "__main__":
    import tempfile

    for n in MAPS:
        test_cpu_file_to_gpu(n)
    for m in (None, "cpu", {"cuda:0": "cpu"}, lambda s, loc: s):
        test_gpu_file(m)
    for m in (None, "cpu", {"cuda:0": "cpu"}):
        with tempfile.TemporaryDirectory() as d:
            test_legacy_gpu_file(Path(d), m)
    test_file_object_gpu_to_gpu()
    with tempfile.TemporaryDirectory() as d:
        test_load_with_mmap_to_gpu(Path(d))
    print("cuda checks passed on", torch.cuda.get_device_name(0), "torch", torch.__version__)
