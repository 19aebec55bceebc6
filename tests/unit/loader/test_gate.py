"""The second gate on its own: what the restricted unpickler refuses even when a scan said SAFE."""

from __future__ import annotations

import argparse
import io
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from safeload.errors import (
    DisallowedGlobalError,
    InternalLoaderError,
    LoadError,
    SafeloadError,
    UnsafeModelError,
)
from safeload.loader import unpickle
from safeload.loader.storages import Where
from safeload.loader.unpickler import GlobalsGuard, Guarded
from safeload.policy import load_policy
from tests import pickle_builder as pb
from tests.unit.loader import handmade, models


def test_floor_name_refused_even_if_the_scan_passed(marker: Path) -> None:
    # As if the scan had wrongly reported the file SAFE: the loader checks the policy again.
    a = handmade.raw_pickle(pb.exec_payload(marker), policy="default")
    with pytest.raises(DisallowedGlobalError) as info:
        unpickle(a)
    assert info.value.on_floor and info.value.global_name == "builtins.exec"
    assert info.value.remedy is None
    assert info.value.report is a.report  # the scan's report travels with a load-time refusal


def test_not_allowed_name_refused_with_remedy(marker: Path) -> None:
    body = pb.call(pb.glob("tests.unit.loader.models", "Plain"))
    a = handmade.raw_pickle(pb.wrap(body), policy="strict")
    with pytest.raises(DisallowedGlobalError) as info:
        unpickle(a)
    assert not info.value.on_floor
    assert 'global = "tests.unit.loader.models.Plain"' in (info.value.remedy or "")
    assert info.value.offset == 2  # the GLOBAL opcode, from the scan's report


def test_name_the_scan_did_not_report_is_an_internal_error(marker: Path) -> None:
    a = handmade.raw_pickle(pb.exec_payload(marker), policy="default")
    a.streams[0].names.clear()  # the scanner and the unpickler disagree
    with pytest.raises(InternalLoaderError, match="did not report"):
        unpickle(a)


def test_python2_names_are_mapped_like_cpython() -> None:
    body = pb.call(pb.glob("__builtin__", "set"), pb.pickle.EMPTY_LIST)
    assert unpickle(handmade.raw_pickle(pb.wrap(body, 2))) == set()
    # Protocol 3+ does not map: __builtin__ is then a module name that is not allowed.
    with pytest.raises(DisallowedGlobalError):
        unpickle(handmade.raw_pickle(pb.wrap(body, 3)))


def test_build_on_an_allowed_class_is_refused() -> None:
    # BUILD with (None, {"shout": ...}) on the class object itself would setattr on argparse.Namespace.
    body = (
        pb.glob("argparse", "Namespace")
        + pb.tup(
            pb.pickle.NONE, pb.pickle.EMPTY_DICT + pb.unicode("shout") + pb.binint(1) + pb.pickle.SETITEM
        )
        + pb.pickle.BUILD
    )
    a = handmade.raw_pickle(pb.wrap(body), policy="default")
    with pytest.raises(UnsafeModelError, match="BUILD on the class Namespace"):
        unpickle(a)
    assert not hasattr(argparse.Namespace, "shout")


def test_setitem_on_an_allowed_global_dict_is_refused() -> None:
    policy = load_policy("strict", allow=["tests.unit.loader.models.REGISTRY"])
    body = (
        pb.glob("tests.unit.loader.models", "REGISTRY")
        + pb.unicode("evil")
        + pb.binint(2)
        + pb.pickle.SETITEM
    )
    with pytest.raises(UnsafeModelError, match="allowed global itself"):
        unpickle(handmade.raw_pickle(pb.wrap(body), policy=policy))
    assert models.REGISTRY == {"kept": 1}


def test_globals_guard_restores_and_refuses() -> None:
    """The snapshot behind the opcode rules: any change to a handed-out global is undone and refused."""
    guard = GlobalsGuard()
    guard.record(models.Plain)
    guard.record(models.REGISTRY)
    models.Plain.value = 2
    models.Plain.extra = 3  # type: ignore[attr-defined]
    models.REGISTRY["evil"] = 1
    with pytest.raises(UnsafeModelError, match="modified allowed global"):
        guard.verify(Where("<test>"))
    assert models.Plain.value == 1 and not hasattr(models.Plain, "extra")
    assert models.REGISTRY == {"kept": 1}
    guard.verify(Where("<test>"))  # unchanged now: no error


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        # SETITEM on a tensor: torch's weights_only refuses it (CVE-2026-24747); so does the loader.
        (pb.binint(0) + pb.binint(99) + pb.pickle.SETITEM, "SETITEM on a Tensor"),
        (pb.binint(7) + pb.pickle.APPEND, "APPEND on a Tensor"),
        (pb.pickle.EMPTY_TUPLE + pb.pickle.REDUCE, "REDUCE on a Tensor"),
        (pb.pickle.EMPTY_TUPLE + pb.pickle.NEWOBJ, "NEWOBJ on a Tensor"),
    ],
    ids=["setitem", "append", "reduce-result", "newobj-result"],
)
def test_torch_opcode_rules_on_a_tensor(ops: bytes, message: str) -> None:
    buf = io.BytesIO()
    torch.save(torch.arange(4.0), buf)
    data = bytearray(buf.getvalue())
    pkl = handmade.data_pkl(data)
    evil = handmade.rezip(data, {"/data.pkl": pkl[:-1] + ops + pickle.STOP})
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(bytes(evil)), weights_only=True)
    with pytest.raises(UnsafeModelError, match=message):
        unpickle(handmade.torch_zip(evil))


def test_build_on_a_tensor_needs_the_tensor_class_allowed_and_named() -> None:
    buf = io.BytesIO()
    torch.save(torch.arange(4.0), buf)
    data = bytearray(buf.getvalue())
    pkl = handmade.data_pkl(data)
    evil = handmade.rezip(
        data, {"/data.pkl": pkl[:-1] + pb.tup(pb.pickle.NONE, pb.pickle.EMPTY_DICT) + pb.BUILD + b"."}
    )
    with pytest.raises(UnsafeModelError, match="BUILD on a Tensor"):
        unpickle(handmade.torch_zip(evil))


def test_containers_and_allowed_instances_still_take_their_opcodes() -> None:
    import collections

    value = {
        "deque": collections.deque([1, 2]),
        "defaultdict": collections.defaultdict(list, {"a": [1]}),
        "set": {1, 2},
        "ns": argparse.Namespace(x=[1]),
        "od": OrderedDict(b=1),
    }
    for protocol in (2, 4, 5):
        out = unpickle(handmade.raw_pickle(pickle.dumps(value, protocol=protocol), policy="default"))
        assert out == value and out["defaultdict"].default_factory is list


def test_build_on_a_rebuild_function_is_refused() -> None:
    body = pb.glob("torch._utils", "_rebuild_tensor_v2") + pb.pickle.EMPTY_DICT + pb.pickle.BUILD
    with pytest.raises(UnsafeModelError, match="BUILD on a function"):
        unpickle(handmade.raw_pickle(pb.wrap(body)))
    # And the wrapper itself refuses to be changed, should any path reach it.
    guarded = Guarded(len, "builtins.len")
    for attempt in (lambda: guarded.__setstate__({}), lambda: guarded.append(1), lambda: guarded.add(1)):
        with pytest.raises(UnsafeModelError, match="modify the allowed function"):
            attempt()
    assert guarded([1, 2]) == 2


def test_rebuild_from_type_must_call_an_allowed_global() -> None:
    # func is the *result* of a call (an OrderedDict), not a global the policy allowed.
    body = pb.call(
        pb.glob("torch._tensor", "_rebuild_from_type_v2"),
        pb.call(pb.glob("collections", "OrderedDict")),
        pb.glob("torch", "Tensor"),
        pb.pickle.EMPTY_TUPLE,
        pb.pickle.EMPTY_DICT,
    )
    with pytest.raises(LoadError, match="not an allowed global"):
        unpickle(handmade.raw_pickle(pb.wrap(body)))


def test_persistent_id_in_a_plain_pickle_is_refused() -> None:
    body = pb.unicode("0") + pb.pickle.BINPERSID
    with pytest.raises(UnsafeModelError, match="persistent id"):
        unpickle(handmade.raw_pickle(pb.wrap(body)))


def test_errors_from_allowed_calls_become_load_errors() -> None:
    body = pb.call(pb.glob("builtins", "complex"), pb.unicode("not a number"), pb.unicode("x"))
    with pytest.raises(LoadError, match="TypeError"):
        unpickle(handmade.raw_pickle(pb.wrap(body)))


def test_unknown_unpickler_argument() -> None:
    with pytest.raises(TypeError, match="unexpected keyword"):
        unpickle(handmade.raw_pickle(pickle.dumps([1])), mmap_mode="r")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"encoding": "latin1"}, "caf\xe9"), ({"encoding": "bytes"}, b"caf\xe9")],
)
def test_encoding_for_python2_strings(kwargs: dict[str, str], expected: object) -> None:
    py2 = b"\x80\x02U\x04caf\xe9q\x00."  # SHORT_BINSTRING written by Python 2
    assert unpickle(handmade.raw_pickle(py2), **kwargs) == expected
    with pytest.raises(SafeloadError):
        unpickle(handmade.raw_pickle(py2))  # ASCII, pickle's default, cannot decode it


def test_plain_objects_round_trip() -> None:
    value = OrderedDict(a=[1, 2.5, None, (True, b"x")], b={"c": {1, 2}, "d": frozenset({3})})
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        out = unpickle(handmade.raw_pickle(pickle.dumps(value, protocol=protocol), policy="default"))
        assert out == value and type(out) is OrderedDict


def test_allowed_class_instances() -> None:
    ns = argparse.Namespace(lr=0.1, name="run")
    out = unpickle(handmade.raw_pickle(pickle.dumps(ns, protocol=2), policy="default"))
    assert out == ns
