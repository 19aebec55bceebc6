"""Without torch: the same checkpoints as numpy arrays equal to .numpy(), sharing memory like torch."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from safeload.errors import LoadError
from safeload.loader import unpickle
from tests.unit.loader import handmade

REPO = Path(__file__).resolve().parents[3]


def save(obj: Any) -> bytearray:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return bytearray(buf.getvalue())


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """What the numpy backend should give for t (bfloat16/float8 through ml_dtypes)."""
    special = {
        torch.bfloat16: ml_dtypes.bfloat16,
        torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
        torch.float8_e5m2: ml_dtypes.float8_e5m2,
        torch.float8_e4m3fnuz: ml_dtypes.float8_e4m3fnuz,
        torch.float8_e5m2fnuz: ml_dtypes.float8_e5m2fnuz,
    }
    if t.dtype in special:
        bits = t.contiguous().view(torch.uint8).numpy()
        return bits.view(special[t.dtype]).reshape(t.shape)
    return t.detach().numpy()


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.complex64,
        torch.complex128,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.uint16,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.float8_e4m3fnuz,
        torch.float8_e5m2fnuz,
    ],
    ids=str,
)
def test_values_equal_numpy_of_torch(dtype: torch.dtype) -> None:
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)) * 5
    t = (base > 0) if dtype is torch.bool else base.to(dtype)
    out = unpickle(handmade.torch_zip(save({"t": t, "v": t[1:, ::2]})), framework="numpy")
    for key, ref in (("t", t), ("v", t[1:, ::2])):
        expected = as_numpy(ref)
        assert out[key].dtype == expected.dtype and out[key].shape == expected.shape
        assert out[key].tobytes() == expected.tobytes()


def test_views_share_memory() -> None:
    x = torch.arange(24.0).reshape(4, 6)
    out = unpickle(handmade.torch_zip(save([x, x.t(), x[2:], x[:, 1]])), framework="numpy")
    for view, ref in zip(out, [x, x.t(), x[2:], x[:, 1]], strict=True):
        assert np.array_equal(view, ref.numpy())
        assert view.strides == tuple(s * 4 for s in ref.stride())
    assert all(np.shares_memory(out[0], v) for v in out[1:])
    out[0][2, 1] = -1.0
    assert out[1][1, 2] == -1.0 and out[2][0, 1] == -1.0 and out[3][2] == -1.0


def test_torch_values_become_plain_values() -> None:
    model = torch.nn.Linear(3, 2)
    sd = model.state_dict()
    obj = {
        "sd": sd,
        "param": torch.nn.Parameter(torch.ones(2)),
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
        "dtypes": [torch.float16, torch.bfloat16, torch.qint8],
    }
    out = unpickle(handmade.torch_zip(save(obj)), framework="numpy")
    assert type(out["sd"]) is type(sd) and out["sd"]._metadata == sd._metadata  # type: ignore[attr-defined]
    assert np.array_equal(out["sd"]["weight"], sd["weight"].numpy())
    assert isinstance(out["param"], np.ndarray) and out["param"].tolist() == [1.0, 1.0]
    assert out["size"] == (2, 3) and type(out["size"]) is tuple
    assert out["device"] == "cpu"
    assert out["dtypes"] == [np.dtype("float16"), np.dtype(ml_dtypes.bfloat16), "torch.qint8"]


@pytest.mark.parametrize(
    "obj",
    [
        torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8),
        torch.eye(3).to_sparse(),
    ],
    ids=["quantized", "sparse"],
)
def test_tensors_numpy_cannot_express_name_the_remedy(obj: torch.Tensor) -> None:
    with pytest.raises(LoadError, match="need torch|no numpy"):
        unpickle(handmade.torch_zip(save(obj)), framework="numpy")


def test_missing_ml_dtypes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now raises ImportError
    data = save({"bf": torch.ones(2, dtype=torch.bfloat16), "f": torch.ones(2)})
    with pytest.raises(LoadError) as info:
        unpickle(handmade.torch_zip(data), framework="numpy")
    assert "ml_dtypes" in info.value.message and "numpy-dtypes" in (info.value.remedy or "")
    assert unpickle(handmade.torch_zip(save({"f": torch.ones(2)})), framework="numpy")["f"].tolist() == [1, 1]


def test_auto_without_torch_gives_numpy_and_never_imports_torch(tmp_path: Path) -> None:
    data = save({"w": torch.arange(6.0).reshape(2, 3), "size": torch.Size([2, 3])})
    (tmp_path / "ckpt.bin").write_bytes(data)
    script = f"""
import sys
sys.modules["torch"] = None  # torch is not importable in this process
sys.path.insert(0, {str(REPO)!r})
from tests.unit.loader import handmade
from safeload.loader import unpickle
out = unpickle(handmade.torch_zip(bytearray(open({str(tmp_path / "ckpt.bin")!r}, "rb").read())))
import numpy as np
assert isinstance(out["w"], np.ndarray) and out["w"].tolist() == [[0, 1, 2], [3, 4, 5]], out
assert out["size"] == (2, 3)
assert sys.modules["torch"] is None
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr
