"""numpy's own files and joblib's: arrays rebuilt from the scanned bytes, objects through the policy.

``.npy``: a raw array is an ndarray over its bytes (the numpy reader parsed and checked the
header); an object array is its pickle, unpickled by the restricted unpickler. ``.npz``: a dict of
those, keyed like ``numpy.load``'s NpzFile (member name without ``.npy``).

joblib: joblib's reader is a pure-Python unpickler whose BUILD, on a ``NumpyArrayWrapper``, reads the
array bytes that follow from the file and puts the array on the stack in the wrapper's place.
``JoblibUnpickler`` is the restricted unpickler with that BUILD; the wrapper name resolves (after
the policy allowed it) to ``ArrayWrapper`` here, never to joblib's class, and the bytes are taken
from the scanned buffer (zero-copy where it may be shared) instead of being read and copied.
"""

from __future__ import annotations

import io
import math
import pickle
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.lib.format import descr_to_dtype

from safeload.errors import UnsafeModelError
from safeload.formats.base import StorageEntry
from safeload.loader.storages import Where, check_dims
from safeload.loader.unpickler import Gate, PersistentLoad, RestrictedUnpickler
from safeload.text import escape

WRAPPER = "joblib.numpy_pickle.NumpyArrayWrapper"
OLD_WRAPPER = "joblib.numpy_pickle.NDArrayWrapper"


def share_or_copy(data: memoryview, *, mmap: bool) -> memoryview | bytearray:
    """Bytes an array may be built over: the buffer itself when it is a writable read-once buffer or
    the file mapping, else a private copy (a caller's read-only bytes, decompressed bytes)."""
    if mmap or not data.readonly:
        return data
    return bytearray(data)


def npy_array(info: Mapping[str, Any], entry: StorageEntry, where: Where, *, mmap: bool) -> np.ndarray:
    """A raw .npy array over its bytes (the reader already checked the length against the header),
    shaped as numpy.lib.format.read_array shapes it."""
    dtype = descr_to_dtype(info["descr"])
    shape = check_dims(tuple(info["shape"]), "npy shape", where)
    if math.prod(shape) * dtype.itemsize != len(entry.data):
        raise where.error("npy array bytes do not match its header")
    _check_crc(info, entry.data, where)
    if dtype.shape:
        # A subarray descr ("(2,)<i8"): numpy reads prod(shape) items of it, which become an array of
        # its base dtype with the subarray's dimensions appended, then reshapes that to ``shape``.
        # That works only when the subarray holds one element, or there is no element at all.
        count = math.prod(shape)
        if count * math.prod(dtype.shape) != count:
            raise where.error(
                f"npy descr {escape(str(info['descr']), 60)} is a subarray dtype: numpy.load cannot read "
                f"an array of shape {shape} with it either"
            )
        dtype = dtype.base
    order = "F" if info["fortran_order"] else "C"
    return np.ndarray(shape, dtype=dtype, buffer=share_or_copy(entry.data, mmap=mmap), order=order)


def member_bytes(info: Mapping[str, Any], storages: Mapping[str, StorageEntry], where: Where) -> bytes:
    """An npz member that is no .npy: numpy.load returns its bytes (b"" for a directory entry)."""
    key = info.get("storage")
    if key is None:
        return b""
    entry = storages.get(key)
    if entry is None:
        raise where.error("npz member bytes were not indexed")
    _check_crc(info, entry.data, where)
    return bytes(entry.data)


def _check_crc(info: Mapping[str, Any], data: memoryview, where: Where) -> None:
    """An npz member's CRC, checked as numpy's zipfile checks it when it reads the member."""
    if "crc" not in info:
        return  # a whole .npy file
    expected = info["crc"]
    if expected is None:
        raise where.error("npz member could not be read whole")
    actual = zlib.crc32(data, info["crc_prefix"])
    if actual != expected:
        raise where.error(
            f"npz member's CRC-32 {actual:#010x} does not match the recorded {expected:#010x}: the bytes "
            "are damaged (numpy.load refuses them too)"
        )


class ArrayWrapper:
    """Stands in for joblib's NumpyArrayWrapper: holds its checked state until the array is read."""

    __slots__ = ("subclass", "shape", "order", "dtype", "alignment")

    def __new__(cls, *args: object, **kwargs: object) -> ArrayWrapper:
        return super().__new__(cls)

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or not {"subclass", "shape", "order", "dtype"} <= set(state):
            raise UnsafeModelError("refusing to load: joblib array wrapper state is not joblib's")
        self.subclass = state["subclass"]
        self.shape = state["shape"]
        self.order = state["order"]
        self.dtype = state["dtype"]
        self.alignment = state.get("numpy_array_alignment_bytes")


class _OldWrapper:
    def __new__(cls, *args: object, **kwargs: object) -> Any:
        raise UnsafeModelError("refusing to load: joblib < 0.10 files (NDArrayWrapper) are not supported")


def joblib_substitutes() -> dict[str, object]:
    return {WRAPPER: ArrayWrapper, OLD_WRAPPER: _OldWrapper}


class JoblibUnpickler(RestrictedUnpickler):
    """The restricted unpickler with joblib's BUILD: a wrapper becomes the array that follows it."""

    dispatch = dict(RestrictedUnpickler.dispatch)

    def __init__(
        self,
        file: io.BytesIO,
        *,
        gate: Gate,
        persistent: PersistentLoad | None,
        buffer: memoryview,
        mmap: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(file, gate=gate, persistent=persistent, **kwargs)
        self._buffer = buffer
        self._mmap = mmap
        self._kwargs = kwargs

    def load_build(self) -> None:
        RestrictedUnpickler.load_build(self)
        top = self.stack[-1]
        if isinstance(top, ArrayWrapper):
            self.stack[-1] = self._read_array(top)

    dispatch[pickle.BUILD[0]] = load_build

    def _read_array(self, wrapper: ArrayWrapper) -> np.ndarray:
        where = self._gate.where
        if not isinstance(wrapper.dtype, np.dtype):
            raise where.error("joblib array dtype is not a numpy dtype")
        if wrapper.subclass not in (np.ndarray, np.memmap) or not self._gate.is_global(wrapper.subclass):
            raise where.error(f"joblib array of class {escape(wrapper.subclass)} is not supported")
        if wrapper.order not in ("C", "F"):
            raise where.error("joblib array order is not C or F")
        shape = check_dims(wrapper.shape, "joblib array shape", where)
        if wrapper.dtype.hasobject:
            # joblib writes object arrays as a nested pickle, read with the outer find_class.
            nested = JoblibUnpickler(
                self._file,
                gate=self._gate,
                persistent=None,
                buffer=self._buffer,
                mmap=self._mmap,
                **self._kwargs,
            )
            array = nested.load()
            if not isinstance(array, np.ndarray):
                raise where.error("joblib object array pickle did not give an array")
            return array
        pos = self._file.tell()
        if wrapper.alignment is not None:
            pad = self._buffer[pos] if pos < len(self._buffer) else None
            if pad is None:
                raise where.error("joblib array padding is missing")
            pos += 1 + pad
        count = math.prod(shape)
        nbytes = count * wrapper.dtype.itemsize
        if pos + nbytes > len(self._buffer):
            raise where.error(
                f"joblib array of {nbytes} bytes runs past the end of the stream (at {pos} of {len(self._buffer)})"
            )
        data = share_or_copy(self._buffer[pos : pos + nbytes], mmap=self._mmap)
        self._file.seek(pos + nbytes)
        flat = np.frombuffer(data, dtype=wrapper.dtype, count=count)
        array = flat.reshape(shape[::-1]).transpose() if wrapper.order == "F" else flat.reshape(shape)
        if not array.dtype.isnative:
            # joblib.load (without mmap) hands out native byte order.
            array = array.astype(array.dtype.newbyteorder("="))
        return array


def joblib_factory(buffer: memoryview, *, mmap: bool) -> Callable[..., JoblibUnpickler]:
    def make(file: io.BytesIO, **kwargs: Any) -> JoblibUnpickler:
        return JoblibUnpickler(file, buffer=buffer, mmap=mmap, **kwargs)

    return make
