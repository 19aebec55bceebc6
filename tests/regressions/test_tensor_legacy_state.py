"""Tensor states: BUILD on a tensor, and the attributes the rebuild functions restore.

``Tensor.__setstate__`` takes a 4-tuple as the legacy (storage, offset, size, stride) and calls
``set_`` with it, which grows a resizable storage to fit the view, with uninitialized memory, to
any size asked. torch.load(weights_only=True) does the same BUILD (``inst.set_(*state)``) but its
storages cannot grow. The loader's copies were clones, which can: a view the file chose was then
filled from the process's heap, or gigabytes were allocated. Now every such state is checked
against its storage, and the loader's copies cannot grow either. A state (BUILD's, or the one
``_rebuild_from_type_v2`` restores with setattr) could also install backward hooks.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import safeload
from safeload.errors import UnsafeModelError
from safeload.model import Verdict


class _LegacyTensor:
    """Pickles as ``torch.Tensor()`` followed by BUILD with ``state``."""

    def __init__(self, state: tuple[object, ...] | list[object]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[object, ...]:
        return (torch.Tensor, (), self.state)


def _checkpoint(state: tuple[object, ...] | list[object], numel: int = 4) -> bytes:
    """A real torch.save archive whose data.pkl is replaced by one tensor built from ``state``
    ("STORAGE" in it stands for the archive's storage 0, of ``numel`` floats)."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(float(numel))}, buf)
    original = zipfile.ZipFile(io.BytesIO(buf.getvalue()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj == "STORAGE" else None

    data = io.BytesIO()
    Pickler(data, protocol=2).dump({"t": _LegacyTensor(state)})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in original.infolist():
            z.writestr(info.filename, data.getvalue() if info.filename.endswith("/data.pkl") else original.read(info))
    return out.getvalue()


def test_set_grows_a_resizable_storage_with_memory_nobody_wrote() -> None:
    """Why: a clone's storage is resizable, and set_ grows it to whatever view it is given."""
    storage = torch.arange(4.0).clone().untyped_storage()
    assert storage.resizable()
    t = torch.Tensor()
    t.set_(storage, 0, (2,), (100,))
    assert storage.nbytes() == 101 * 4  # grown from 16 bytes; t[1] reads memory nobody wrote


@pytest.mark.parametrize(
    ("state", "why"),
    [
        (("STORAGE", 0, (2,), (100,)), "reaches element 100 but its storage holds 4"),
        (("STORAGE", 1_000_000, (1,), (1,)), "reaches element 1000000"),
        (("STORAGE", 0, (1 << 40,), (1,)), "reaches element 1099511627775"),
        (("STORAGE", -1, (1,), (1,)), "out of range"),
        (("STORAGE", 0, (2, 2), (1,)), "2 sizes but 1 strides"),
        (("not a storage", 0, (1,), (1,)), "whose storage is a str"),
        (["STORAGE", 0, (2,), (100,)], "a tensor state that is a list, not a tuple"),
    ],
)
def test_a_legacy_tensor_state_outside_its_storage_is_refused(
    state: tuple[object, ...] | list[object], why: str, tmp_path: Path
) -> None:
    data = _checkpoint(state)
    assert safeload.scan_bytes(data, policy="strict").verdict is Verdict.SAFE  # torch.Tensor is allowed
    path = tmp_path / "legacy.pt"
    path.write_bytes(data)
    for load in (lambda: safeload.load(path), lambda: safeload.loads(data)):  # mapped, and copied bytes
        with pytest.raises(UnsafeModelError, match=why):
            load()


def test_torch_refuses_them_too() -> None:
    """The same files are no checkpoint torch loads (its storages cannot grow): nothing is lost."""
    with pytest.raises(RuntimeError, match="not resizable"):
        torch.load(io.BytesIO(_checkpoint(("STORAGE", 0, (2,), (100,)))), weights_only=True)


def test_an_empty_storage_cannot_be_grown_either() -> None:
    data = _checkpoint(("STORAGE", 0, (1000,), (1,)), numel=0)
    with pytest.raises(UnsafeModelError, match="its storage holds 0 elements"):
        safeload.loads(data)


def test_a_legacy_state_inside_its_storage_loads_as_torch_loads_it(tmp_path: Path) -> None:
    data = _checkpoint(("STORAGE", 1, (2, 1), (2, 1)))  # elements 1 and 3
    expected = torch.load(io.BytesIO(data), weights_only=True)["t"]
    path = tmp_path / "legacy.pt"
    path.write_bytes(data)
    for got in (safeload.load(path)["t"], safeload.loads(data)["t"]):
        assert got.tolist() == expected.tolist() == [[1.0], [3.0]]
        assert (got.stride(), got.storage_offset(), got.dtype) == (expected.stride(), 1, torch.float32)


def test_storages_the_loader_copies_cannot_grow() -> None:
    """Bytes handed to loads are the caller's: the loader copies them, into storages that torch
    cannot resize (as torch.load's own)."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0), "i": torch.arange(3)}, buf)
    loaded = safeload.loads(buf.getvalue())
    assert not any(t.untyped_storage().resizable() for t in loaded.values())
    assert loaded["w"].tolist() == list(range(6))


def test_hooks_set_through_a_tensor_state_run_on_backward() -> None:
    """Why: torch installs them, and a later backward() calls each with the gradient."""
    calls: list[object] = []
    t = torch.ones(2)
    t.__setstate__((True, None, {0: calls.append}))
    (t * 2).sum().backward()
    assert len(calls) == 1


def test_a_tensor_state_that_sets_backward_hooks_is_refused() -> None:
    """(requires_grad, _, backward_hooks): torch assigns the hooks as given, and backward() calls
    every one. The hook here is an allowed global, so the scan passes the file."""
    hooks = {0: torch.Tensor}  # any callable the policy allows would do
    data = _checkpoint((True, None, hooks))
    assert safeload.scan_bytes(data, policy="strict").verdict is Verdict.SAFE
    with pytest.raises(UnsafeModelError, match="sets backward hooks"):
        safeload.loads(data)
    with pytest.raises(UnsafeModelError, match="sets backward hooks"):
        safeload.loads(_checkpoint((None, None, hooks, True, None)))  # the legacy Variable's five
    for harmless in ((False, None, None), (True, None, {})):
        assert isinstance(safeload.loads(_checkpoint(harmless))["t"], torch.Tensor)


# -- attributes restored on a tensor: _rebuild_from_type_v2, _rebuild_parameter_with_state ---------


def _saved_with_attribute(name: str, value: object, *, parameter: bool = False) -> bytes:
    """torch.save of a tensor (or Parameter) carrying a Python attribute, renamed to ``name`` in
    data.pkl afterwards (torch.save itself refuses nothing: it pickles the tensor's __dict__)."""
    t = torch.nn.Parameter(torch.ones(2)) if parameter else torch.ones(2)
    placeholder = "q" * len(name)
    setattr(t, placeholder, value)
    buf = io.BytesIO()
    torch.save({"t": t}, buf)
    original = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in original.infolist():
            data = original.read(info)
            if info.filename.endswith("/data.pkl"):
                data = data.replace(placeholder.encode(), name.encode())
            z.writestr(info.filename, data)
    return out.getvalue()


def test_an_attribute_state_can_install_hooks_that_backward_runs() -> None:
    """Why: both rebuild functions restore the state with setattr, and torch's setters act on it."""
    calls: list[object] = []
    t = torch.ones(2)
    torch._utils._set_obj_state(t, ({"_backward_hooks": {0: calls.append}}, None))
    t.requires_grad_(True)
    (t * 3).sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("parameter", [False, True], ids=["tensor", "parameter"])
@pytest.mark.parametrize("name", ["_backward_hooks", "_post_accumulate_grad_hooks", "data", "size"])
def test_a_state_cannot_set_what_torch_tensor_defines(name: str, parameter: bool) -> None:
    data = _saved_with_attribute(name, {0: torch.Tensor}, parameter=parameter)
    assert safeload.scan_bytes(data, policy="strict").verdict is Verdict.SAFE
    with pytest.raises(safeload.errors.LoadError, match=f"sets {name}, which torch's tensor defines"):
        safeload.loads(data)


@pytest.mark.parametrize("parameter", [False, True], ids=["tensor", "parameter"])
def test_tensors_with_their_own_attributes_still_load_as_torch_loads_them(parameter: bool) -> None:
    data = _saved_with_attribute("my_tag", {"epoch": 3}, parameter=parameter)
    expected = torch.load(io.BytesIO(data), weights_only=True)["t"]
    got = safeload.loads(data)["t"]
    assert type(got) is type(expected) and got.my_tag == expected.my_tag == {"epoch": 3}
    assert torch.equal(got, expected)
