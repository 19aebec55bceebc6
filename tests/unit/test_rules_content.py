"""The built-in rules against reality: real torch.save / pickle / joblib output, and the real libraries.

Globals are read from the test's own benign files with pickletools (never by unpickling them), except
joblib's format, whose raw array bytes between opcodes only joblib's own reader can skip.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import importlib.util
import io
import pathlib
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import torch
from joblib import numpy_pickle
from torch._weights_only_unpickler import _get_allowed_globals

from safeload.policy import builtin_policy_names, floor, load_policy

# The stdlib's own Python 2 -> 3 table, applied by CPython (and the walker) for protocol < 3.
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING  # isort: skip

STRINGS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}


def _one_pickle_globals(ops: Iterator[tuple[Any, Any, Any]]) -> set[str]:
    found: set[str] = set()
    memo: dict[int, Any] = {}
    pushed: list[Any] = []
    last: Any = None
    proto = 0
    for op, arg, _ in ops:
        value: Any = None
        if op.name == "PROTO":
            proto = arg
        elif op.name in ("GLOBAL", "INST"):
            module, name = arg.split(" ", 1)
            if proto < 3:
                if (module, name) in NAME_MAPPING:
                    module, name = NAME_MAPPING[(module, name)]
                elif module in IMPORT_MAPPING:
                    module = IMPORT_MAPPING[module]
            found.add(f"{module}.{name}")
        elif op.name == "STACK_GLOBAL":
            found.add(f"{pushed[-2]}.{pushed[-1]}")
        if op.name in STRINGS:
            value = arg
            pushed.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(arg)
            pushed.append(value)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = value = last
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = value = last
        last = value
    return found


def pickle_globals(data: bytes, count: int = 1) -> set[str]:
    """Globals of the first `count` pickles in `data`, read with pickletools."""
    stream = io.BytesIO(data)
    found: set[str] = set()
    for _ in range(count):
        found |= _one_pickle_globals(pickletools.genops(stream))
    return found


def torch_save_globals(obj: object, legacy: bool = False) -> set[str]:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    raw = buf.getvalue()
    if legacy:
        # magic number, protocol, sys_info, the object, storage keys; then raw storage bytes.
        return pickle_globals(raw, count=5)
    found: set[str] = set()
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        for member in zf.namelist():
            if member.endswith(".pkl"):
                found |= pickle_globals(zf.read(member))
    assert found or raw, "no pickle found in the torch archive"
    return found


def resolve(qualname: str) -> object:
    """Import the longest importable module prefix, then walk attributes (tests only)."""
    parts = qualname.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(qualname)


def _torch_objects() -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objs: dict[str, object] = {}
        for dtype in (
            torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
            torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
            torch.complex32, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
            torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
        ):  # fmt: skip
            objs[str(dtype)] = torch.zeros(3, dtype=dtype)
            objs[f"{dtype}-object"] = dtype
        param = torch.nn.Parameter(torch.ones(2))
        objs["parameter"] = param
        stateful = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        stateful.tag = "frozen"  # type: ignore[attr-defined]
        objs["parameter-with-state"] = stateful
        tagged = torch.ones(2)
        tagged.note = 1  # type: ignore[attr-defined]
        objs["tensor-with-attribute"] = tagged
        dense = torch.arange(4.0).reshape(2, 2)
        objs["coo"] = dense.to_sparse()
        objs["csr"] = dense.to_sparse_csr()
        objs["csc"] = dense.to_sparse_csc()
        objs["bsr"] = dense.to_sparse_bsr((1, 1))
        objs["bsc"] = dense.to_sparse_bsc((1, 1))
        objs["qtensor"] = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
        scales = torch.tensor([0.1, 0.2])
        objs["qchannel"] = torch.quantize_per_channel(dense, scales, torch.tensor([0, 0]), 0, torch.qint8)
        objs["qchannel-float"] = torch.quantize_per_channel(
            dense, scales, torch.tensor([0.0, 0.0]), 0, torch.quint8
        )
        objs["qint32"] = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint32)
        objs["meta"] = torch.empty(2, 3, device="meta")
        objs["nested"] = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
        objs["view"] = dense.t()[1:]
        objs["channels-last"] = torch.ones(1, 2, 2, 2).to(memory_format=torch.channels_last)
        objs["untyped-storage"] = torch.ones(2).untyped_storage()
        objs["size-device-layout-qscheme"] = [
            torch.Size([1, 2]),
            torch.device("cpu"),
            torch.sparse_coo,
            torch.per_tensor_affine,
        ]
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        objs["state-dict"] = model.state_dict()
        opt = torch.optim.Adam(model.parameters())
        model(torch.ones(3, 2)).sum().backward()
        opt.step()
        objs["optimizer"] = opt.state_dict()
        objs["containers"] = {
            "set": {1, 2},
            "complex": 1 + 2j,
            "bytearray": bytearray(b"ab"),
            "bytes": b"\x00\xff",
            "counter": collections.Counter("aab"),
            "ordered": collections.OrderedDict(a=1),
        }
    return objs


TORCH_OBJECTS = _torch_objects()


# -- strict ----------------------------------------------------------------------------------------------


def test_strict_is_exactly_torch_weights_only() -> None:
    assert load_policy("strict").allowed == set(_get_allowed_globals())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_strict_allows_what_real_torch_save_needs(legacy: bool) -> None:
    strict = load_policy("strict")
    seen: set[str] = set()
    for label, obj in TORCH_OBJECTS.items():
        names = torch_save_globals(obj, legacy=legacy)
        refused = sorted(n for n in names if not strict.decide(n).allowed)
        assert not refused, (label, refused)
        seen |= names
    # The files really exercised the rebuild paths (the extraction is not silently empty).
    assert {
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._tensor._rebuild_from_type_v2",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "torch._utils._rebuild_nested_tensor",
        "torch.serialization._get_layout",
        "torch.storage.UntypedStorage",
        "torch.per_channel_affine",
        "torch.bfloat16",
        "_codecs.encode",
        "builtins.set",
        "collections.Counter",
    } <= seen


def test_strict_refuses_what_torch_weights_only_refuses() -> None:
    strict = load_policy("strict")
    # frozenset and numpy arrays load under default but not under torch's weights_only default.
    names = torch_save_globals({"f": frozenset({1}), "a": np.arange(3)})
    assert {"builtins.frozenset", "numpy.ndarray"} <= names
    assert not strict.decide("builtins.frozenset").allowed
    assert not strict.decide("numpy.ndarray").allowed


# -- default ----------------------------------------------------------------------------------------------


class Plain:
    """An instance pickled through copyreg._reconstructor under protocol 0/1."""

    def __init__(self) -> None:
        self.x = 1


def _default_objects() -> dict[str, object]:
    return {
        "arrays": [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((2, 2), dtype=np.int64, order="F")],
        "object-array": np.array([1, "a", None], dtype=object),
        "structured": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
        "scalars": [
            np.float32(1.5),
            np.int64(3),
            np.bool_(True),
            np.float16(2),
            np.uint8(1),
            np.complex64(1j),
        ],
        "dtype-arguments": [np.float64, np.int64, np.float32, np.int32, np.uint8, np.bool_],
        "dtypes": [np.dtype("f4"), np.dtype(">i2"), np.dtype([("x", "f8")])],
        "datetime": [
            datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
            datetime.date(2024, 1, 2),
            datetime.time(1, 2),
            datetime.timedelta(hours=3),
            datetime.timezone(datetime.timedelta(hours=1), "X"),
        ],
        "paths": [pathlib.PurePosixPath("a/b"), pathlib.PureWindowsPath("c:/x"), pathlib.Path("/tmp/ckpt")],
        "namespace": argparse.Namespace(lr=0.1, layers=[1, 2], out=pathlib.Path("runs")),
        "collections": [
            collections.defaultdict(list, a=[1]),
            collections.defaultdict(int),
            collections.defaultdict(dict),
            collections.defaultdict(float),
            collections.deque([1, 2], maxlen=5),
            frozenset({1}),
            slice(1, 5, 2),
            b"",
            b"data",
        ],
        "types": [int, float, str, bool, list, dict, tuple],
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_default_allows_real_pickles(protocol: int) -> None:
    default = load_policy("default")
    seen: set[str] = set()
    for label, obj in _default_objects().items():
        names = pickle_globals(pickle.dumps(obj, protocol=protocol))
        refused = sorted(n for n in names if not default.decide(n).allowed)
        assert not refused, (label, protocol, refused)
        seen |= names
    assert "numpy.dtype" in seen and "collections.defaultdict" in seen and "argparse.Namespace" in seen


@pytest.mark.parametrize("protocol", [0, 1])
def test_default_allows_plain_instances_old_protocols(protocol: int) -> None:
    names = pickle_globals(pickle.dumps(Plain(), protocol=protocol))
    own = f"{Plain.__module__}.{Plain.__qualname__}"
    assert names == {own, "copyreg._reconstructor", "builtins.object"}
    default = load_policy("default")
    assert default.decide("copyreg._reconstructor").allowed and default.decide("builtins.object").allowed
    assert not default.decide(own).allowed  # the class itself still needs the user's say-so


def test_default_allows_a_lightning_style_checkpoint() -> None:
    ckpt = {
        "epoch": 3,
        "state_dict": torch.nn.Linear(2, 2).state_dict(),
        "hyper_parameters": {"args": argparse.Namespace(lr=0.1), "root": pathlib.PosixPath("/runs/x")},
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5), "dirpath": "/runs"}},
        "metrics": {"history": np.array([0.1, 0.2]), "best": np.float64(0.2)},
        "saved_at": datetime.datetime(2024, 5, 1, 12, 0),
        "counts": collections.defaultdict(int, {"a": 2}),
    }
    default = load_policy("default")
    for legacy in (False, True):
        names = torch_save_globals(ckpt, legacy=legacy)
        refused = sorted(n for n in names if not default.decide(n).allowed)
        assert not refused, refused
        assert {"argparse.Namespace", "pathlib.PosixPath", "numpy._core.multiarray._reconstruct"} <= names


def test_pack_sklearn_allows_joblib_arrays(tmp_path: Path) -> None:
    class Recorder(numpy_pickle.NumpyUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            seen.add(f"{module}.{name}")
            return super().find_class(module, name)

    pack = load_policy("pack-sklearn")
    for compress in (0, 3):
        seen: set[str] = set()
        path = tmp_path / f"arrays-{compress}.joblib"
        joblib.dump(
            {"w": np.ones((3, 2)), "rng": np.random.RandomState(0), "k": np.int64(2)}, path, compress=compress
        )
        # Our own benign file, read by joblib's reader only to learn which globals it names.
        with (
            open(path, "rb") as raw,
            numpy_pickle._validate_fileobject_and_memmap(raw, str(path)) as (fobj, _),
        ):
            Recorder(str(path), fobj, ensure_native_byte_order=True).load()
        assert "joblib.numpy_pickle.NumpyArrayWrapper" in seen
        refused = sorted(n for n in seen if not pack.decide(n).allowed)
        assert not refused, refused


# -- every name is real -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["strict", "default"])
def test_every_core_name_exists(name: str) -> None:
    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for qualname in sorted(load_policy(name).allowed):
            try:
                resolve(qualname)
            except (ImportError, AttributeError) as exc:
                missing.append(f"{qualname}: {exc}")
    assert not missing


PACK_LIBRARIES = {
    "pack-sklearn": {"sklearn", "numpy", "joblib"},
    "pack-transformers": {"transformers", "accelerate"},
    "pack-lightning": {"lightning", "lightning_fabric", "pytorch_lightning"},
}


def _own_names(pack: str) -> set[str]:
    return set(load_policy(pack).allowed - load_policy("default").allowed)


def test_packs_are_registered_and_stay_in_their_libraries() -> None:
    packs = {n for n in builtin_policy_names() if n.startswith("pack-")}
    assert packs == set(PACK_LIBRARIES)
    for pack, libraries in PACK_LIBRARIES.items():
        policy = load_policy(pack)
        assert load_policy("default").allowed < policy.allowed
        strangers = sorted(n for n in _own_names(pack) if n.split(".")[0] not in libraries)
        assert not strangers, (pack, strangers)


def test_pack_names_exist_where_their_library_is_installed() -> None:
    checked = 0
    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pack in PACK_LIBRARIES:
            for qualname in sorted(_own_names(pack)):
                if importlib.util.find_spec(qualname.split(".")[0]) is None:
                    continue  # scripts/check_rules.py checks these where the library is installed
                checked += 1
                try:
                    resolve(qualname)
                except (ImportError, AttributeError) as exc:
                    missing.append(f"{pack}: {qualname}: {exc}")
    assert not missing
    assert checked >= 7  # numpy.random and joblib names are always checkable here


def test_no_builtin_allows_anything_on_the_floor() -> None:
    fl = floor()
    for name in builtin_policy_names():
        policy = load_policy(name)
        assert not [n for n in policy.allowed if fl.covers(n)]
        assert not policy.wildcards  # built-in policies list exact names only


def test_floor_names_that_exist_are_callables_or_modules() -> None:
    """Spot-check that floor entries point at real dangerous things (not typos) where present."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for qualname in (
            "builtins.eval",
            "pkgutil.resolve_name",
            "torch.storage._load_from_bytes",
            "torch.fx.graph_module._forward_from_src",
            "joblib.numpy_pickle_compat.NDArrayWrapper",
            "numpy.lib.format.read_array",
            "uuid._get_command_stdout",
            "collections.namedtuple",
        ):
            assert floor().covers(qualname)
            assert callable(resolve(qualname)), qualname
