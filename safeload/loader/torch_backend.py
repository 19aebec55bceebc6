"""Tensors with torch: the only module that imports torch, and only when a load needs it.

Tensors come out identical to ``torch.load(weights_only=True)`` because the rebuild functions ARE
torch's own: each allowed rebuild name resolves to a wrapper that checks its arguments (storage is
one this load made, offset/size/stride inside it, flags of the right type) and then calls torch's
function. Storages are ``torch.UntypedStorage`` over the scanned buffer (zero-copy where the bytes
are aligned, native-endian and writable or memory-mapped), wrapped in ``TypedStorage`` and moved by
torch's own ``_get_restore_location(map_location)``, exactly as torch's ``_load`` does.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from safeload.formats.base import StorageEntry
from safeload.loader.storages import (
    Where,
    ascii_text,
    check_dims,
    check_flags,
    check_int,
    check_storage_bytes,
    check_view,
    parse_zip_pid,
    shared_view_key,
)
from safeload.loader.unpickler import Gate, Guarded
from safeload.text import escape

_REBUILDS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_nested_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_cpu_tensor",
    "_rebuild_device_tensor_from_numpy",
)
_STORAGE_MODULES = ("torch", "torch.cuda")


def available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def load_owners() -> tuple[Any, Any]:
    """torch and torch.serialization: the modules whose ``load`` is torch.load (ImportError without
    torch). safeload.guard swaps that attribute on both."""
    import torch
    import torch.serialization

    return torch, torch.serialization


class TorchBackend:
    """Builds storages and tensors for one load."""

    name = "torch"

    def __init__(
        self,
        where: Where,
        *,
        map_location: Any,
        mmap: bool,
        byteorder: str = "little",
    ) -> None:
        import torch
        import torch.serialization

        self.torch = torch
        self.where = where
        self._mmap = mmap
        self._map_location = map_location
        self._restore = torch.serialization._get_restore_location(map_location)
        if byteorder not in ("little", "big"):
            raise where.error(f"unknown byte order {escape(byteorder)}")
        self._swap = byteorder != sys.byteorder
        self._gate: Gate | None = None
        self._made: dict[int, Any] = {}  # id -> TypedStorage this load made (kept alive: ids stay unique)
        self._by_key: dict[str, tuple[Any, Any, int]] = {}  # key -> (typed storage, dtype, numel)
        self._markers: dict[int, Any] = {}  # id of a StorageType marker -> its dtype

    # -- names -----------------------------------------------------------------------------------

    def bind(self, gate: Gate) -> None:
        self._gate = gate

    def substitutes(self) -> dict[str, object]:
        """Objects to hand out instead of importing, for the names this backend validates."""
        torch = self.torch
        out: dict[str, object] = {}
        checks: dict[str, Callable[..., Any]] = {
            "_rebuild_tensor": self._rebuild_tensor,
            "_rebuild_tensor_v2": self._rebuild_tensor_v2,
            "_rebuild_tensor_v3": self._rebuild_tensor_v3,
            "_rebuild_parameter": self._rebuild_parameter,
            "_rebuild_parameter_with_state": self._rebuild_parameter_with_state,
            "_rebuild_qtensor": self._rebuild_qtensor,
            "_rebuild_sparse_tensor": self._rebuild_sparse_tensor,
            "_rebuild_nested_tensor": self._rebuild_nested_tensor,
            "_rebuild_meta_tensor_no_storage": self._rebuild_meta_tensor_no_storage,
            "_rebuild_wrapper_subclass": self._rebuild_wrapper_subclass,
            "_rebuild_device_tensor_from_cpu_tensor": self._rebuild_from_data,
            "_rebuild_device_tensor_from_numpy": self._rebuild_from_numpy,
        }
        for fname in _REBUILDS:
            out[f"torch._utils.{fname}"] = Guarded(checks[fname], f"torch._utils.{fname}")
        out["torch._tensor._rebuild_from_type_v2"] = Guarded(
            self._rebuild_from_type_v2, "torch._tensor._rebuild_from_type_v2"
        )
        out["torch.serialization._get_layout"] = Guarded(self._get_layout, "torch.serialization._get_layout")
        # torch's own unpickler maps every legacy <Type>Storage name to a StorageType marker.
        for dtype, storage_name in torch.storage._dtype_to_storage_type_map().items():
            marker = torch.serialization.StorageType(storage_name)
            self._markers[id(marker)] = dtype
            for module in _STORAGE_MODULES:
                out[f"{module}.{storage_name}"] = marker
        return out

    # -- storages --------------------------------------------------------------------------------

    def _dtype_of_storage_type(self, storage_type: object) -> Any:
        torch = self.torch
        gate = self._require_gate()
        if gate.is_global(storage_type):
            if storage_type is torch.UntypedStorage:
                return torch.uint8
            if id(storage_type) in self._markers:
                return self._markers[id(storage_type)]
        raise self.where.error(
            f"persistent id names {escape(type(storage_type).__name__)}, not a storage type"
        )

    def storage(self, entry: StorageEntry | None, key: str, dtype: Any, numel: object, location: str) -> Any:
        """The TypedStorage for `key`, made once per key from the indexed bytes."""
        cached = self._by_key.get(key)
        if cached is not None:
            typed, cached_dtype, cached_numel = cached
            if cached_dtype != dtype or cached_numel != numel:
                raise self.where.error(
                    f"storage {escape(key)} is declared twice with different types or sizes: the file is crafted"
                )
            return typed
        if entry is None:
            raise self.where.error(f"storage {escape(key)} named by the pickle is not in the file")
        elsize = dtype.itemsize
        n = check_storage_bytes(len(entry.data), numel, elsize, key, self.where)
        untyped = self._untyped(entry.data, dtype)
        typed = self._wrap(untyped, dtype, location)
        self._by_key[key] = (typed, dtype, n)
        return typed

    def _untyped(self, data: memoryview, dtype: Any) -> Any:
        torch = self.torch
        if len(data) == 0:
            return torch.UntypedStorage(0)
        # Zero-copy: the storage shares the read-once buffer (or the file mapping), which it keeps
        # alive. Copy when the bytes are not ours to share (a read-only buffer a caller passed),
        # when they must be byte-swapped, or when they are misaligned for the element type.
        share = self._mmap or not data.readonly
        if data.readonly:
            with warnings.catch_warnings():
                # A read-only mapping: torch warns that it cannot mark the tensor read-only.
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(data, dtype=torch.uint8)
        else:
            flat = torch.frombuffer(data, dtype=torch.uint8)
        if not share or self._swap or flat.data_ptr() % max(dtype.itemsize, 1):
            # A copy torch cannot grow (as its own loader's storages): a clone could be resized by
            # set_ to any size, filled with whatever memory held before.
            flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        untyped = flat.untyped_storage()
        if self._swap and dtype.itemsize > 1:
            untyped.byteswap(dtype)
        return untyped

    def _wrap(self, untyped: Any, dtype: Any, location: str) -> Any:
        torch = self.torch
        restored = self._restore(untyped, location)
        typed = torch.storage.TypedStorage(wrap_storage=restored, dtype=dtype, _internal=True)
        self._made[id(typed)] = typed
        return typed

    def view_storage(self, root: Any, dtype: Any, offset: object, size: object) -> Any:
        """A legacy storage view: elements [offset, offset+size) of a root storage."""
        elements = root._untyped_storage.nbytes() // dtype.itemsize
        off, (count,), _ = check_view(offset, (size,), (1,), elements, self.where, what="storage view")
        begin = off * dtype.itemsize
        view = root._untyped_storage[begin : begin + count * dtype.itemsize]
        typed = self.torch.storage.TypedStorage(wrap_storage=view, dtype=dtype, _internal=True)
        self._made[id(typed)] = typed
        return typed

    def zip_persistent_load(self, storages: Mapping[str, StorageEntry]) -> Callable[[object], object]:
        """torch zip ids: ('storage', storage_type, key, location, numel), as torch's _load reads them."""

        def persistent_load(pid: object) -> object:
            storage_type, key, location, numel = parse_zip_pid(pid, self.where)
            dtype = self._dtype_of_storage_type(storage_type)
            return self.storage(storages.get(key), key, dtype, numel, _location(location, self.where))

        return persistent_load

    def legacy_persistent_load(self, storages: Mapping[str, StorageEntry]) -> Callable[[object], object]:
        """Legacy ids, as torch's _legacy_load reads them: storages (with views) and module classes."""
        views: dict[str, Any] = {}

        def persistent_load(pid: object) -> object:
            if type(pid) is not tuple or not pid:
                raise self.where.error("legacy persistent id is not a tuple")
            kind = _ascii(pid[0])
            if kind == "module":
                # ('module', class, source file, source): torch returns the class (already allowed).
                if (
                    len(pid) != 4
                    or not isinstance(pid[1], type)
                    or not self._require_gate().is_global(pid[1])
                ):
                    raise self.where.error("legacy 'module' persistent id does not name an allowed class")
                return pid[1]
            if kind != "storage" or len(pid) != 6:
                raise self.where.error(f"legacy persistent id of kind {escape(kind)} is not defined")
            _, storage_type, root_key, location, numel, view_metadata = pid
            root_key = _key(root_key, self.where)
            dtype = self._dtype_of_storage_type(storage_type)
            root = self.storage(
                storages.get(root_key), root_key, dtype, numel, _location(location, self.where)
            )
            if view_metadata is None:
                return root
            if type(view_metadata) is not tuple or len(view_metadata) != 3:
                raise self.where.error("legacy storage view metadata is not (key, offset, size)")
            view_key, offset, view_size = view_metadata
            view_key = _key(view_key, self.where)
            shared = shared_view_key(view_key, self._by_key, storages, self.where)
            if shared is not None:
                return shared[0]
            if view_key not in views:
                views[view_key] = self.view_storage(root, dtype, offset, view_size)
            return views[view_key]

        return persistent_load

    # -- rebuild wrappers --------------------------------------------------------------------------

    def _require_gate(self) -> Gate:
        if self._gate is None:
            raise RuntimeError("TorchBackend used before bind()")
        return self._gate

    def _own_storage(self, storage: object, what: str = "tensor") -> Any:
        if self._made.get(id(storage)) is not storage:
            raise self.where.error(f"{what} is built on an object that is not a storage from this file")
        return storage

    def _check(self, storage: Any, offset: object, size: object, stride: object, itemsize: int) -> None:
        self._own_storage(storage)
        elements = storage._untyped_storage.nbytes() // max(itemsize, 1)
        check_view(offset, size, stride, elements, self.where)

    def _check_flags(self, requires_grad: object, backward_hooks: object) -> None:
        if type(requires_grad) is not bool:
            raise self.where.error("tensor requires_grad is not a bool")
        # torch.save always writes an empty OrderedDict: hooks are not serialized (and would run code).
        if not isinstance(backward_hooks, dict) or backward_hooks:
            raise self.where.error("tensor carries backward hooks; torch.save never writes them")

    def _check_metadata(self, metadata: object) -> None:
        check_flags(metadata, self.where)

    def _rebuild_tensor(self, storage: Any, offset: object, size: object, stride: object) -> Any:
        self._check(storage, offset, size, stride, storage.dtype.itemsize)
        return self.torch._utils._rebuild_tensor(storage, offset, size, stride)

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        offset: object,
        size: object,
        stride: object,
        requires_grad: object,
        backward_hooks: object,
        metadata: object = None,
    ) -> Any:
        self._check(storage, offset, size, stride, getattr(storage, "dtype", self.torch.uint8).itemsize)
        self._check_flags(requires_grad, backward_hooks)
        self._check_metadata(metadata)
        return self.torch._utils._rebuild_tensor_v2(
            storage, offset, size, stride, requires_grad, backward_hooks, metadata
        )

    def _rebuild_tensor_v3(
        self,
        storage: Any,
        offset: object,
        size: object,
        stride: object,
        requires_grad: object,
        backward_hooks: object,
        dtype: object,
        metadata: object = None,
    ) -> Any:
        if not isinstance(dtype, self.torch.dtype):
            raise self.where.error("tensor dtype is not a torch.dtype")
        self._check(storage, offset, size, stride, dtype.itemsize)
        self._check_flags(requires_grad, backward_hooks)
        self._check_metadata(metadata)
        return self.torch._utils._rebuild_tensor_v3(
            storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata
        )

    def _rebuild_qtensor(
        self,
        storage: Any,
        offset: object,
        size: object,
        stride: object,
        quantizer_params: object,
        requires_grad: object,
        backward_hooks: object,
    ) -> Any:
        self._check(storage, offset, size, stride, getattr(storage, "dtype", self.torch.uint8).itemsize)
        self._check_flags(requires_grad, backward_hooks)
        if type(quantizer_params) is not tuple or not quantizer_params:
            raise self.where.error("quantizer parameters are not a tuple")
        return self.torch._utils._rebuild_qtensor(
            storage, offset, size, stride, quantizer_params, requires_grad, backward_hooks
        )

    def _tensor(self, value: object, what: str) -> Any:
        if not isinstance(value, self.torch.Tensor):
            raise self.where.error(f"{what} is not a tensor")
        return value

    def _rebuild_parameter(self, data: object, requires_grad: object, backward_hooks: object) -> Any:
        self._tensor(data, "parameter data")
        self._check_flags(requires_grad, backward_hooks)
        return self.torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)

    def _rebuild_parameter_with_state(
        self, data: object, requires_grad: object, backward_hooks: object, state: object
    ) -> Any:
        self._tensor(data, "parameter data")
        self._check_flags(requires_grad, backward_hooks)
        _check_state(state, self.where, self.torch.Tensor)
        return self.torch._utils._rebuild_parameter_with_state(data, requires_grad, backward_hooks, state)

    def _rebuild_sparse_tensor(self, layout: object, data: object) -> Any:
        torch = self.torch
        if type(data) is not tuple or not all(
            isinstance(x, (torch.Tensor, tuple, list, bool, type(None))) for x in data
        ):
            raise self.where.error("sparse tensor data is not a tuple of tensors and a size")
        result = torch._utils._rebuild_sparse_tensor(layout, data)
        # torch checks sparse invariants only when check_sparse_tensor_invariants is on; out-of-range
        # indices would let a later to_dense() write outside memory, so they are always checked here.
        _validate_sparse(torch, result)
        return result

    def _rebuild_nested_tensor(self, buffer: object, sizes: object, strides: object, offsets: object) -> Any:
        torch = self.torch
        buf = self._tensor(buffer, "nested tensor buffer")
        for name, value in (("sizes", sizes), ("strides", strides), ("offsets", offsets)):
            self._tensor(value, f"nested tensor {name}")
        if buf.dim() != 1 or not buf.is_contiguous():
            raise self.where.error("nested tensor buffer is not a contiguous 1-d tensor")
        size_rows, stride_rows, offset_list = sizes.tolist(), strides.tolist(), offsets.tolist()  # type: ignore[union-attr]
        if not (len(size_rows) == len(stride_rows) == len(offset_list)):
            raise self.where.error("nested tensor sizes, strides and offsets disagree in length")
        for off, size, stride in zip(offset_list, size_rows, stride_rows, strict=True):
            check_view(off, size, stride, buf.numel(), self.where, what="nested tensor component")
        return torch._utils._rebuild_nested_tensor(buffer, sizes, strides, offsets)

    def _rebuild_meta_tensor_no_storage(
        self, dtype: object, size: object, stride: object, requires_grad: object
    ) -> Any:
        check_dims(size, "meta tensor size", self.where)
        check_dims(stride, "meta tensor stride", self.where)
        return self.torch._utils._rebuild_meta_tensor_no_storage(dtype, size, stride, requires_grad)

    def _rebuild_wrapper_subclass(
        self,
        cls: object,
        dtype: object,
        size: object,
        stride: object,
        storage_offset: object,
        layout: object,
        device: object,
        requires_grad: object,
    ) -> Any:
        self._tensor_type(cls)
        check_dims(size, "wrapper tensor size", self.where)
        check_dims(stride, "wrapper tensor stride", self.where)
        check_int(storage_offset, "wrapper tensor offset", self.where)
        return self.torch._utils._rebuild_wrapper_subclass(
            cls, dtype, size, stride, storage_offset, layout, device, requires_grad
        )

    def _rebuild_from_data(self, data: object, dtype: object, device: object, requires_grad: object) -> Any:
        self._tensor(data, "tensor data")
        return self.torch._utils._rebuild_device_tensor_from_cpu_tensor(data, dtype, device, requires_grad)

    def _rebuild_from_numpy(self, data: object, dtype: object, device: object, requires_grad: object) -> Any:
        import numpy as np

        if not isinstance(data, np.ndarray) or data.dtype.hasobject:
            raise self.where.error("tensor data is not a numeric numpy array")
        return self.torch._utils._rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad)

    def _tensor_type(self, cls: object) -> type:
        gate = self._require_gate()
        if not isinstance(cls, type) or not issubclass(cls, self.torch.Tensor) or not gate.is_global(cls):
            raise self.where.error("tensor subclass is not an allowed torch.Tensor subclass")
        return cls

    def _rebuild_from_type_v2(self, func: object, new_type: object, args: object, state: object) -> Any:
        gate = self._require_gate()
        # func must be an allowed global itself, not something an earlier call returned.
        if not callable(func) or not gate.is_global(func):
            raise self.where.error(
                "_rebuild_from_type_v2 is asked to call something that is not an allowed global"
            )
        self._tensor_type(new_type)
        if type(args) is not tuple:
            raise self.where.error("_rebuild_from_type_v2 arguments are not a tuple")
        _check_state(state, self.where, self.torch.Tensor)
        return self.torch._tensor._rebuild_from_type_v2(func, new_type, args, state)

    def _get_layout(self, name: object) -> Any:
        if type(name) is not str:
            raise self.where.error("layout name is not a string")
        try:
            return self.torch.serialization._get_layout(name)
        except KeyError:
            raise self.where.error(f"unknown tensor layout {escape(name)}") from None

    # -- around the unpickling -------------------------------------------------------------------

    def begin(self) -> object:
        # torch's rebuild helpers read map_location from this thread-local, set by torch's _load.
        tls = self.torch.serialization._serialization_tls
        previous = tls.map_location
        tls.map_location = self._map_location
        return previous

    def end(self, previous: object) -> None:
        self.torch.serialization._serialization_tls.map_location = previous
        # Clears torch's global list of sparse tensors awaiting validation (ours are checked already).
        self.torch._utils._validate_loaded_sparse_tensors()


def _validate_sparse(torch: Any, t: Any) -> None:
    if t.layout is torch.sparse_coo:
        torch._validate_sparse_coo_tensor_args(t._indices(), t._values(), t.size(), t.is_coalesced())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        torch._validate_sparse_compressed_tensor_args(
            t.crow_indices(), t.col_indices(), t.values(), t.size(), t.layout
        )
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        torch._validate_sparse_compressed_tensor_args(
            t.ccol_indices(), t.row_indices(), t.values(), t.size(), t.layout
        )


def _check_state(state: object, where: Where, tensor_class: type) -> None:
    """Object state restored with setattr: plain attribute names only (no dunders, no __class__),
    and none that torch's tensor class defines. setattr runs those setters with the file's values:
    ``_backward_hooks`` or ``_post_accumulate_grad_hooks`` install callables that backward() calls,
    ``data`` and ``grad`` swap tensors, and a method name would be shadowed by a value. torch.save
    writes a tensor's own ``__dict__`` here, which holds none of them."""
    defined = {name for klass in tensor_class.__mro__ for name in vars(klass)}
    parts = state if isinstance(state, tuple) else (state,)
    if isinstance(state, tuple) and len(state) != 2:
        raise where.error("object state is not (dict state, slot state)")
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, dict):
            raise where.error("object state is not a dict")
        for key in part:
            if (
                type(key) is not str
                or not key.isidentifier()
                or (key.startswith("__") and key.endswith("__"))
            ):
                raise where.error(f"object state sets attribute {escape(key)}, which a checkpoint never sets")
            if key in defined:
                raise where.error(
                    f"object state sets {escape(key)}, which torch's tensor defines: setting it would "
                    "run its setter (hooks, gradients, data) or hide its method"
                )


_ascii = ascii_text


def _key(value: object, where: Where) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if type(value) is int:
        value = str(value)
    if type(value) is not str:
        raise where.error("storage key is not a string")
    return value


def _location(value: object, where: Where) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if type(value) is not str:
        raise where.error("storage location is not a string")
    return value
