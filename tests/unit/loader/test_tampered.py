"""Tampered tensor metadata is refused before any view is made: nothing reads outside the buffer."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

import safeload
from safeload.errors import LoadError, SafeloadError
from safeload.loader import unpickle
from tests import pickle_builder as pb
from tests.unit.loader import forge

FLOATS = bytes(range(16))  # four float32 elements


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_forged_tensor_loads_when_it_is_in_bounds(framework: str) -> None:
    a = forge.checkpoint(forge.tensor_v2("0", 4, 1, (3,), (1,)), {"0": FLOATS})
    out = unpickle(a, framework=framework)
    expected = torch.frombuffer(bytearray(FLOATS), dtype=torch.float32)[1:]
    assert (out == expected).all() if framework == "torch" else (out == expected.numpy()).all()


BAD_VIEWS = [
    pytest.param(0, (5,), (1,), "reaches element 4", id="size-past-end"),
    pytest.param(4, (1,), (1,), "reaches element 4", id="offset-past-end"),
    pytest.param(0, (2,), (4,), "reaches element 4", id="stride-past-end"),
    pytest.param(0, (2, 2), (1 << 62, 1), "reaches element", id="stride-huge"),
    pytest.param(0, (1 << 40, 1 << 40), (1, 1), "more elements than int64", id="size-overflow"),
    pytest.param(0, (2,), (-1,), "out of range", id="negative-stride"),
    pytest.param(-1, (1,), (1,), "out of range", id="negative-offset"),
    pytest.param(0, (-2,), (1,), "out of range", id="negative-size"),
    pytest.param(0, (1 << 64,), (1,), "out of range", id="size-over-int64"),
    pytest.param(0, (2, 2), (1,), "2 sizes but 1 strides", id="rank-mismatch"),
    pytest.param(0, (2.0,), (1,), "must be an integer", id="float-size"),
    pytest.param(0, (True,), (1,), "must be an integer", id="bool-size"),
]


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize(("offset", "size", "stride", "message"), BAD_VIEWS)
def test_out_of_bounds_views_are_refused(
    framework: str, offset: Any, size: tuple[Any, ...], stride: tuple[Any, ...], message: str
) -> None:
    a = forge.checkpoint(forge.tensor_v2("0", 4, offset, size, stride), {"0": FLOATS})
    with pytest.raises(LoadError, match=message):
        unpickle(a, framework=framework)


def test_an_empty_view_past_its_storage_loads_as_torch_loads_it() -> None:
    # torch's bounds check returns early for a view of zero bytes and keeps the offset as written
    # (hypothesis found torch.save writing one); it reads nothing, so it is no hazard.
    base = torch.zeros(0)
    empty = torch.empty(0).set_(base.untyped_storage(), 5, (1, 0), (1, 1))
    buf = io.BytesIO()
    torch.save(empty, buf)
    expected = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert expected.storage_offset() == 5 and expected.shape == (1, 0)

    got = safeload.loads(buf.getvalue(), policy="strict")
    assert got.shape == expected.shape and got.storage_offset() == 5 and got.dtype == expected.dtype
    array = safeload.loads(buf.getvalue(), policy="strict", framework="numpy")
    assert array.shape == (1, 0) and array.dtype == expected.numpy().dtype


@pytest.mark.parametrize("framework", ["torch", "numpy"])
@pytest.mark.parametrize("numel", [3, 5, 0, 1 << 62], ids=["short", "long", "zero", "huge"])
def test_storage_size_must_match_its_persistent_id(framework: str, numel: int) -> None:
    """CVE-2026-24747: a storage smaller than its declaration let writes run past it."""
    a = forge.checkpoint(forge.tensor_v2("0", numel, 0, (1,), (1,)), {"0": FLOATS})
    with pytest.raises(LoadError, match="persistent id declares"):
        unpickle(a, framework=framework)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_missing_storage(framework: str) -> None:
    a = forge.checkpoint(forge.tensor_v2("7", 4, 0, (1,), (1,)), {"0": FLOATS})
    with pytest.raises(LoadError, match="not in the file"):
        unpickle(a, framework=framework)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_one_key_two_declarations(framework: str) -> None:
    body = pb.tup(
        forge.tensor_v2("0", 4, 0, (4,), (1,)),
        forge.tensor_v2("0", 16, 0, (16,), (1,), storage_type="ByteStorage"),
    )
    a = forge.checkpoint(body, {"0": FLOATS})
    with pytest.raises(LoadError, match="declared twice"):
        unpickle(a, framework=framework)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_backward_hooks_are_refused(framework: str) -> None:
    hook = pb.call(pb.glob("collections", "OrderedDict"), pb.tup(pb.tup(pb.binint(1), pb.binint(2))))
    a = forge.checkpoint(forge.tensor_v2("0", 4, 0, (4,), (1,), hook_ops=hook), {"0": FLOATS})
    with pytest.raises(LoadError, match="backward hooks"):
        unpickle(a, framework=framework)


@pytest.mark.parametrize("framework", ["torch", "numpy"])
def test_rebuild_on_something_that_is_not_a_storage(framework: str) -> None:
    body = pb.call(
        pb.glob("torch._utils", "_rebuild_tensor_v2"),
        pb.pickle.EMPTY_LIST,
        pb.binint(0),
        forge.ints((1,)),
        forge.ints((1,)),
        pb.pickle.NEWFALSE,
        forge.hooks(),
    )
    with pytest.raises(LoadError, match="not a storage"):
        unpickle(forge.checkpoint(body, {}), framework=framework)


@pytest.mark.parametrize(
    "pid_ops",
    [
        pb.tup(
            pb.unicode("module"),
            pb.glob("torch", "FloatStorage"),
            pb.unicode("0"),
            pb.unicode("cpu"),
            pb.binint(4),
        ),
        pb.tup(
            pb.unicode("storage"),
            pb.glob("collections", "OrderedDict"),
            pb.unicode("0"),
            pb.unicode("cpu"),
            pb.binint(4),
        ),
        pb.tup(
            pb.unicode("storage"),
            pb.glob("torch", "FloatStorage"),
            pb.binint(0),
            pb.unicode("cpu"),
            pb.binint(4),
        ),
        pb.tup(pb.unicode("storage"), pb.glob("torch", "FloatStorage"), pb.unicode("0")),
        pb.unicode("0"),
    ],
    ids=["module-kind", "not-a-storage-type", "int-key", "short", "not-a-tuple"],
)
def test_bad_persistent_ids(pid_ops: bytes) -> None:
    a = forge.checkpoint(pid_ops + pb.pickle.BINPERSID, {"0": FLOATS})
    with pytest.raises(LoadError, match="persistent id"):
        unpickle(a)


def test_out_of_range_sparse_indices_are_refused() -> None:
    """torch.load skips sparse invariant checks by default; to_dense() would then write out of bounds."""
    indices = forge.tensor_v2("0", 2, 0, (1, 2), (2, 1), storage_type="LongStorage")
    values = forge.tensor_v2("1", 2, 0, (2,), (1,))
    body = pb.call(
        pb.glob("torch._utils", "_rebuild_sparse_tensor"),
        pb.call(pb.glob("torch.serialization", "_get_layout"), pb.unicode("torch.sparse_coo")),
        pb.tup(indices, values, pb.call(pb.glob("torch", "Size"), forge.ints((4,))), pb.pickle.NEWFALSE),
    )
    index_bytes = (1).to_bytes(8, "little") + (1 << 40).to_bytes(8, "little")
    a = forge.checkpoint(body, {"0": index_bytes, "1": bytes(8)})
    with pytest.raises(SafeloadError, match="out of bounds|index"):
        unpickle(a)
    ok = forge.checkpoint(body, {"0": (1).to_bytes(8, "little") + (3).to_bytes(8, "little"), "1": bytes(8)})
    assert unpickle(ok).to_dense().shape == (4,)
