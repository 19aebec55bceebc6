"""Tensors without torch: torch checkpoints rebuilt as numpy arrays over the scanned bytes.

Used for ``framework="numpy"``, or ``"auto"`` when torch is not importable. Nothing imports torch:
every torch name the policy allows is answered by a stand-in here, and a torch name with no
stand-in is an error that names what to install.

What a torch object becomes (the documented contract of framework='numpy'):
  tensor, nn.Parameter      -> numpy.ndarray over the storage bytes (views of one storage share memory;
                               requires_grad is dropped; a conj/neg bit is applied, which copies)
  torch.Size                -> tuple
  torch.device              -> str, e.g. "cpu", "cuda:0"
  torch.float32 ... dtypes  -> numpy.dtype (bfloat16, float8_*, complex32 through ml_dtypes);
                               a dtype numpy cannot express (quantized, bits, float4) -> its torch name, str
  layouts (torch.strided)   -> str
  sparse, quantized, nested, meta and wrapper-subclass tensors -> LoadError (they need torch)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from safeload.errors import LoadError
from safeload.formats.base import StorageEntry
from safeload.loader.storages import (
    Where,
    check_flags,
    check_storage_bytes,
    check_view,
    parse_zip_pid,
    shared_view_key,
)
from safeload.loader.unpickler import Gate, Guarded
from safeload.text import escape

EXTRA_HINT = "install ml_dtypes (pip install 'safeload[numpy-dtypes]') or load with framework='torch'"
TORCH_HINT = "install torch (pip install 'safeload[torch]') and load with framework='torch'"

# torch dtype name -> (element size, numpy dtype name or "ml:<ml_dtypes name>" or None)
TORCH_DTYPES: dict[str, tuple[int, str | None]] = {
    "float64": (8, "float64"),
    "float32": (4, "float32"),
    "float16": (2, "float16"),
    "bfloat16": (2, "ml:bfloat16"),
    "complex128": (16, "complex128"),
    "complex64": (8, "complex64"),
    "complex32": (4, "ml:complex32"),
    "int64": (8, "int64"),
    "int32": (4, "int32"),
    "int16": (2, "int16"),
    "int8": (1, "int8"),
    "uint64": (8, "uint64"),
    "uint32": (4, "uint32"),
    "uint16": (2, "uint16"),
    "uint8": (1, "uint8"),
    "bool": (1, "bool"),
    "float8_e5m2": (1, "ml:float8_e5m2"),
    "float8_e4m3fn": (1, "ml:float8_e4m3fn"),
    "float8_e5m2fnuz": (1, "ml:float8_e5m2fnuz"),
    "float8_e4m3fnuz": (1, "ml:float8_e4m3fnuz"),
    "float8_e8m0fnu": (1, "ml:float8_e8m0fnu"),
    "qint8": (1, None),
    "quint8": (1, None),
    "qint32": (4, None),
    "quint4x2": (1, None),
    "quint2x4": (1, None),
    "float4_e2m1fn_x2": (1, None),
    "bits8": (1, None),
    "bits16": (2, None),
    "bits1x8": (1, None),
    "bits2x4": (1, None),
    "bits4x2": (1, None),
}

# Legacy <Type>Storage class names -> torch dtype name (torch.storage._dtype_to_storage_type_map).
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}

_LAYOUTS = (
    "torch.strided",
    "torch.sparse_coo",
    "torch.sparse_csr",
    "torch.sparse_csc",
    "torch.sparse_bsr",
    "torch.sparse_bsc",
    "torch._mkldnn",
    "torch.jagged",
)
_NEEDS_TORCH = (
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_nested_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_wrapper_subclass",
)


def numpy_dtype(torch_name: str, where: Where) -> np.dtype:
    """The numpy dtype for a torch dtype name; LoadError naming the extra when numpy lacks it."""
    spec = TORCH_DTYPES.get(torch_name, (0, None))[1]
    if spec is None:
        raise where.error(f"torch.{escape(torch_name)} tensors have no numpy equivalent; {TORCH_HINT}")
    if not spec.startswith("ml:"):
        return np.dtype(spec)
    try:
        import ml_dtypes
    except ImportError:
        raise LoadError(
            f"torch.{torch_name} tensors need the ml_dtypes package to become numpy arrays",
            path=where.path,
            member=where.member,
            remedy=EXTRA_HINT,
        ) from None
    kind = getattr(ml_dtypes, spec[3:], None)
    if kind is None:
        raise LoadError(
            f"the installed ml_dtypes has no {spec[3:]} (torch.{torch_name})",
            path=where.path,
            member=where.member,
            remedy="upgrade ml_dtypes, or " + EXTRA_HINT.split(" or ")[1],
        )
    return np.dtype(kind)


class DType:
    """A torch dtype named by the pickle, before it is known whether numpy can express it."""

    __slots__ = ("name", "itemsize")

    def __init__(self, name: str) -> None:
        self.name = name
        self.itemsize = TORCH_DTYPES[name][0]


class Storage:
    """The numpy stand-in for a TypedStorage: uint8 bytes and the torch dtype name they hold."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: np.ndarray, dtype: DType) -> None:
        self.data = data
        self.dtype = dtype


class _StandIn:
    """A class stand-in (torch.Tensor, nn.Parameter) for NEWOBJ: it never makes an instance of itself."""

    name = ""

    def __new__(cls, *args: Any) -> Any:
        raise LoadError(f"constructing {cls.name} directly needs torch; {TORCH_HINT}")


class NumpyBackend:
    """Builds numpy arrays for a torch checkpoint, for one load."""

    name = "numpy"

    def __init__(self, where: Where, *, mmap: bool, byteorder: str = "little") -> None:
        self.where = where
        self._mmap = mmap
        self._swap = byteorder != sys.byteorder
        self._gate: Gate | None = None
        self._made: dict[int, Storage] = {}
        self._by_key: dict[str, tuple[Storage, str, int]] = {}
        self._dtypes: dict[int, tuple[object, DType]] = {}  # id of a handed-out dtype -> (it, torch dtype)
        self._storage_types: dict[int, str] = {}  # id of a storage-type marker -> torch dtype name

    def bind(self, gate: Gate) -> None:
        self._gate = gate

    def unavailable(self, qualname: str) -> str | None:
        """Why an allowed name cannot be resolved without torch (None: resolve it normally)."""
        if qualname == "torch" or qualname.startswith("torch."):
            return f"{qualname} has no numpy stand-in; {TORCH_HINT}"
        return None

    def substitutes(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for fname, fn in (
            ("_rebuild_tensor", self._rebuild_tensor),
            ("_rebuild_tensor_v2", self._rebuild_tensor_v2),
            ("_rebuild_tensor_v3", self._rebuild_tensor_v3),
            ("_rebuild_parameter", self._rebuild_parameter),
            ("_rebuild_parameter_with_state", self._rebuild_parameter_with_state),
            ("_rebuild_device_tensor_from_cpu_tensor", self._rebuild_converted),
            ("_rebuild_device_tensor_from_numpy", self._rebuild_converted),
        ):
            out[f"torch._utils.{fname}"] = Guarded(fn, f"torch._utils.{fname}")
        for fname in _NEEDS_TORCH:
            out[f"torch._utils.{fname}"] = Guarded(_needs_torch(fname, self.where), f"torch._utils.{fname}")
        out["torch._tensor._rebuild_from_type_v2"] = Guarded(
            self._rebuild_from_type_v2, "torch._tensor._rebuild_from_type_v2"
        )
        out["torch.serialization._get_layout"] = Guarded(_layout, "torch.serialization._get_layout")
        out["torch.Size"] = tuple
        out["torch.device"] = Guarded(_device, "torch.device")
        for cls_name in ("torch.Tensor", "torch.nn.parameter.Parameter", "torch.nn.Parameter"):
            out[cls_name] = type("StandIn", (_StandIn,), {"name": cls_name})
        for name in TORCH_DTYPES:
            # The caller sees a numpy dtype (or, where numpy has none, the torch name); the rebuild
            # functions find the torch dtype behind it by identity.
            shown = _shown_dtype(name, self.where)
            self._dtypes[id(shown)] = (shown, DType(name))
            out[f"torch.{name}"] = shown
        for storage_name, dtype_name in STORAGE_DTYPES.items():
            marker = _StorageType(dtype_name)
            self._storage_types[id(marker)] = dtype_name
            for module in ("torch", "torch.cuda"):
                out[f"{module}.{storage_name}"] = marker
        untyped = _StorageType("uint8")
        self._storage_types[id(untyped)] = "uint8"
        out["torch.storage.UntypedStorage"] = untyped
        out["torch.UntypedStorage"] = untyped
        return out

    # -- storages ---------------------------------------------------------------------------------

    def _require_gate(self) -> Gate:
        if self._gate is None:
            raise RuntimeError("NumpyBackend used before bind()")
        return self._gate

    def _storage_dtype(self, storage_type: object) -> DType:
        if self._require_gate().is_global(storage_type) and id(storage_type) in self._storage_types:
            return DType(self._storage_types[id(storage_type)])
        raise self.where.error("persistent id does not name a storage type")

    def storage(self, entry: StorageEntry | None, key: str, dtype: DType, numel: object) -> Storage:
        cached = self._by_key.get(key)
        if cached is not None:
            storage, name, n = cached
            if name != dtype.name or n != numel:
                raise self.where.error(
                    f"storage {escape(key)} is declared twice with different types or sizes: the file is crafted"
                )
            return storage
        if entry is None:
            raise self.where.error(f"storage {escape(key)} named by the pickle is not in the file")
        n = check_storage_bytes(len(entry.data), numel, dtype.itemsize, key, self.where)
        raw = np.frombuffer(entry.data, dtype=np.uint8) if len(entry.data) else np.zeros(0, np.uint8)
        unit = dtype.itemsize // 2 if dtype.name.startswith("complex") else dtype.itemsize
        if self._swap and unit > 1:
            # As torch's loader: the storage is byte-swapped once, by its own dtype (complex ones
            # by their parts), so every view of it shares the swapped bytes.
            raw = raw.copy()
            raw.view(f"u{unit}").byteswap(inplace=True)
        elif entry.data.readonly and not self._mmap:
            raw = raw.copy()  # a caller's read-only bytes: do not hand out views of them
        storage = Storage(raw, dtype)
        self._made[id(storage)] = storage
        self._by_key[key] = (storage, dtype.name, n)
        return storage

    def zip_persistent_load(self, storages: Mapping[str, StorageEntry]) -> Callable[[object], object]:
        def persistent_load(pid: object) -> object:
            storage_type, key, _location, numel = parse_zip_pid(pid, self.where)
            return self.storage(storages.get(key), key, self._storage_dtype(storage_type), numel)

        return persistent_load

    def legacy_persistent_load(self, storages: Mapping[str, StorageEntry]) -> Callable[[object], object]:
        views: dict[str, Storage] = {}

        def persistent_load(pid: object) -> object:
            if type(pid) is not tuple or len(pid) != 6:
                raise self.where.error("legacy persistent id is not a storage id (numpy backend)")
            kind, storage_type, root_key, _location, numel, view = pid
            if (kind.decode("ascii", "replace") if isinstance(kind, bytes) else kind) != "storage":
                raise self.where.error("legacy persistent id is not a storage id")
            if isinstance(root_key, bytes):
                root_key = root_key.decode("ascii", "replace")
            if type(root_key) is not str:
                raise self.where.error("storage key is not a string")
            dtype = self._storage_dtype(storage_type)
            root = self.storage(storages.get(root_key), root_key, dtype, numel)
            if view is None:
                return root
            if type(view) is not tuple or len(view) != 3:
                raise self.where.error("legacy storage view metadata is not (key, offset, size)")
            view_key, offset, size = view
            view_key = str(view_key.decode("ascii", "replace") if isinstance(view_key, bytes) else view_key)
            shared = shared_view_key(view_key, self._by_key, storages, self.where)
            if shared is not None:
                return shared[0]
            if view_key not in views:
                elements = len(root.data) // dtype.itemsize
                off, (count,), _ = check_view(
                    offset, (size,), (1,), elements, self.where, what="storage view"
                )
                part = Storage(root.data[off * dtype.itemsize : (off + count) * dtype.itemsize], dtype)
                self._made[id(part)] = part
                views[view_key] = part
            return views[view_key]

        return persistent_load

    # -- rebuilds ---------------------------------------------------------------------------------

    def _own(self, storage: object) -> Storage:
        if not isinstance(storage, Storage) or self._made.get(id(storage)) is not storage:
            raise self.where.error("tensor is built on an object that is not a storage from this file")
        return storage

    def _dtype(self, value: object) -> DType:
        known = self._dtypes.get(id(value))
        if known is None or known[0] is not value:
            raise self.where.error("tensor dtype is not a torch dtype")
        return known[1]

    def _array(
        self,
        storage: object,
        offset: object,
        size: object,
        stride: object,
        dtype: DType,
        metadata: object = None,
    ) -> np.ndarray:
        st = self._own(storage)
        elements = len(st.data) // dtype.itemsize
        off, dims, steps = check_view(offset, size, stride, elements, self.where)
        npdtype = numpy_dtype(dtype.name, self.where)
        # An ndarray over the storage's bytes with explicit offset and strides: views of one storage
        # share memory, and the bounds were proved above (numpy checks them again).
        array = np.ndarray(
            shape=dims,
            dtype=npdtype,
            buffer=st.data,
            # An empty view may sit past its storage's end (torch allows it); it reads nothing.
            offset=min(off, elements) * dtype.itemsize,
            strides=tuple(s * dtype.itemsize for s in steps),
        )
        check_flags(metadata, self.where)
        if isinstance(metadata, dict):
            # torch sets a bit for each key present, whatever its value ({"neg": False} negates).
            if "conj" in metadata:
                if npdtype.kind != "c":
                    raise self.where.error("tensor metadata sets conj on a tensor that is not complex")
                array = np.conjugate(array)
            if "neg" in metadata:
                array = np.negative(array)
            array = np.asarray(array)  # a ufunc makes a 0-d array a numpy scalar
        return array

    def _rebuild_tensor(self, storage: object, offset: object, size: object, stride: object) -> np.ndarray:
        return self._array(storage, offset, size, stride, self._own(storage).dtype)

    def _rebuild_tensor_v2(
        self,
        storage: object,
        offset: object,
        size: object,
        stride: object,
        requires_grad: object,
        backward_hooks: object,
        metadata: object = None,
    ) -> np.ndarray:
        _check_hooks(backward_hooks, self.where)
        return self._array(storage, offset, size, stride, self._own(storage).dtype, metadata)

    def _rebuild_tensor_v3(
        self,
        storage: object,
        offset: object,
        size: object,
        stride: object,
        requires_grad: object,
        backward_hooks: object,
        dtype: object,
        metadata: object = None,
    ) -> np.ndarray:
        _check_hooks(backward_hooks, self.where)
        return self._array(storage, offset, size, stride, self._dtype(dtype), metadata)

    def _rebuild_parameter(self, data: object, requires_grad: object, backward_hooks: object) -> object:
        _check_hooks(backward_hooks, self.where)
        return self._ndarray(data)

    def _rebuild_parameter_with_state(
        self, data: object, requires_grad: object, backward_hooks: object, state: object
    ) -> object:
        _check_hooks(backward_hooks, self.where)
        return self._ndarray(data)

    def _rebuild_converted(
        self, data: object, dtype: object, device: object, requires_grad: object
    ) -> object:
        array = self._ndarray(data)
        return array.astype(numpy_dtype(self._dtype(dtype).name, self.where), copy=False)

    def _rebuild_from_type_v2(self, func: object, new_type: object, args: object, state: object) -> object:
        if not callable(func) or not self._require_gate().is_global(func):
            raise self.where.error(
                "_rebuild_from_type_v2 is asked to call something that is not an allowed global"
            )
        if type(args) is not tuple:
            raise self.where.error("_rebuild_from_type_v2 arguments are not a tuple")
        # The tensor subclass and its Python attributes have no numpy meaning: the array is the data.
        return func(*args)

    def _ndarray(self, data: object) -> np.ndarray:
        if not isinstance(data, np.ndarray) or data.dtype.hasobject:
            raise self.where.error("tensor data is not a numeric array")
        return data

    def begin(self) -> object:
        return None

    def end(self, previous: object) -> None:
        return None


def _shown_dtype(name: str, where: Where) -> object:
    try:
        return numpy_dtype(name, where)
    except LoadError:
        return f"torch.{name}"


class _StorageType:
    __slots__ = ("dtype_name",)

    def __init__(self, dtype_name: str) -> None:
        self.dtype_name = dtype_name


def _check_hooks(backward_hooks: object, where: Where) -> None:
    if not isinstance(backward_hooks, dict) or backward_hooks:
        raise where.error("tensor carries backward hooks; torch.save never writes them")


def _needs_torch(fname: str, where: Where) -> Callable[..., Any]:
    def refuse(*_: object) -> Any:
        raise where.error(f"tensors rebuilt by torch._utils.{fname} need torch; {TORCH_HINT}")

    return refuse


def _layout(name: object) -> str:
    if type(name) is not str or name not in _LAYOUTS:
        raise LoadError(f"unknown tensor layout {escape(name)}")
    return name


def _device(*args: object) -> str:
    """torch.device(type[, index]) as a string: 'cpu', 'cuda:0'."""
    if len(args) == 1 and type(args[0]) is str:
        return args[0]
    if len(args) == 2 and type(args[0]) is str and (args[1] is None or type(args[1]) is int):
        return args[0] if args[1] is None else f"{args[0]}:{args[1]}"
    raise LoadError("torch.device arguments are not (type[, index])")
