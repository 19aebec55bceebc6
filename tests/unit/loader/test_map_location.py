"""map_location in the four forms torch.load takes, with the same results as torch.load."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from safeload.errors import LoadError
from safeload.loader import unpickle
from tests.unit.loader import handmade
from tests.unit.loader.compare import assert_same

CPU = b"X\x03\x00\x00\x00cpu"


def checkpoint(location: str = "cpu") -> bytearray:
    buf = io.BytesIO()
    x = torch.arange(6.0)
    torch.save({"a": x, "b": x[2:], "c": torch.ones(2, dtype=torch.int8)}, buf)
    data = bytearray(buf.getvalue())
    if location == "cpu":
        return data
    # As if saved on another device: the storages' location tags say so.
    pkl = handmade.data_pkl(data)
    tag = location.encode()
    edited = pkl.replace(CPU, b"X" + len(tag).to_bytes(4, "little") + tag)
    assert edited != pkl
    return handmade.rezip(data, {"/data.pkl": edited})


def load_both(data: bytearray, map_location: Any) -> tuple[Any, Any]:
    ref = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location=map_location)
    out = unpickle(handmade.torch_zip(data), map_location=map_location)
    return ref, out


@pytest.mark.parametrize(
    "map_location",
    [
        None,
        "cpu",
        torch.device("cpu"),
        {"cpu": "cpu"},
        lambda storage, loc: storage,
        lambda storage, loc: None,
    ],
    ids=["none", "str", "device", "dict", "callable", "callable-none"],
)
def test_forms_on_cpu_file(map_location: Any) -> None:
    ref, out = load_both(checkpoint(), map_location)
    assert_same(ref, out)


def test_dict_remaps_a_foreign_device_tag() -> None:
    data = checkpoint("cuda:3")
    ref, out = load_both(data, {"cuda:3": "cpu"})
    assert_same(ref, out)
    assert out["a"].device.type == "cpu"


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_str_and_device_override_every_tag(map_location: Any) -> None:
    ref, out = load_both(checkpoint("cuda:1"), map_location)
    assert_same(ref, out)


def test_callable_sees_each_storage_and_its_tag() -> None:
    seen: list[tuple[int, str]] = []

    def record(storage: Any, location: str) -> Any:
        seen.append((storage.nbytes(), location))
        return storage

    out = unpickle(handmade.torch_zip(checkpoint("cuda:2")), map_location=record)
    ref_seen: list[tuple[int, str]] = []

    def record_ref(storage: Any, location: str) -> Any:
        ref_seen.append((storage.nbytes(), location))
        return storage

    torch.load(io.BytesIO(bytes(checkpoint("cuda:2"))), weights_only=True, map_location=record_ref)
    assert seen == ref_seen == [(24, "cuda:2"), (2, "cuda:2")]
    assert torch.equal(out["b"], torch.arange(2.0, 6.0))


def test_meta_map_location() -> None:
    ref, out = load_both(checkpoint(), "meta")
    assert out["a"].device.type == "meta" and out["a"].shape == ref["a"].shape
    assert out["b"].storage_offset() == ref["b"].storage_offset()


def test_unavailable_device_is_a_load_error() -> None:
    data = checkpoint("cuda:999")  # no machine has this device
    with pytest.raises(RuntimeError):
        torch.load(io.BytesIO(bytes(data)), weights_only=True)
    with pytest.raises(LoadError, match="RuntimeError"):
        unpickle(handmade.torch_zip(data))
