"""How many bytes joblib's reader consumes after the BUILD of a ``NumpyArrayWrapper``.

joblib (``numpy_pickle.NumpyArrayWrapper.read_array``) writes raw array bytes between opcodes and
reads them back from the same file handle right after the wrapper's BUILD:

* a numpy alignment padding byte ``p`` and ``p`` more bytes, when the wrapper carries a
  ``numpy_array_alignment_bytes`` attribute that is not None (joblib >= 1.2);
* then ``prod(shape) * dtype.itemsize`` bytes, or, when ``dtype.hasobject``, one nested pickle
  read by a fresh pure-Python unpickler on the same handle.

The dtype arrives as ``numpy.dtype(spec, align, copy)`` plus a BUILD state
``(version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])``. numpy
takes ``hasobject`` from ``flags`` and the item size of flexible kinds (S, U, V) from ``elsize``,
so both are computed from those fields exactly, never guessed. Shared by the walker and the
replay so both skip the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

# The class whose BUILD makes joblib read array bytes (joblib.numpy_pickle.NumpyUnpickler.load_build).
# Protocol 4 resolves dotted names by attribute walk, so the class is also reachable through its
# package; both spellings name the same object.
WRAPPER_NAMES = frozenset(
    {("joblib.numpy_pickle", "NumpyArrayWrapper"), ("joblib", "numpy_pickle.NumpyArrayWrapper")}
)
DTYPE_NAMES = frozenset({"numpy.dtype", "numpy.core.multiarray.dtype", "numpy._core.multiarray.dtype"})
# copyreg helpers that return an instance of their first argument (protocols 0-2 and NEWOBJ_EX).
INSTANCE_FACTORIES = frozenset({"copyreg._reconstructor", "copyreg.__newobj__", "copyreg.__newobj_ex__"})

_FIXED_SIZES = {
    "b": {1},
    "i": {1, 2, 4, 8},
    "u": {1, 2, 4, 8},
    "f": {2, 4, 8, 12, 16},
    "c": {8, 16, 24, 32},
    "O": {4, 8},
    "M": {8},
    "m": {8},
}
_FLEXIBLE = {"S": 1, "V": 1, "U": 4}
_INT64 = 1 << 63


def is_wrapper(module: str, name: str) -> bool:
    return (module, name) in WRAPPER_NAMES


class ArrayRead(msgspec.Struct, frozen=True):
    """What joblib reads after the wrapper: padding (a length byte plus that many), then data."""

    padded: bool  # a padding-length byte comes first
    nbytes: int  # raw array bytes after the padding; 0 when ``pickled``
    pickled: bool  # object dtype: a nested pickle follows instead of raw bytes


def dtype_info(spec: object, state: object) -> tuple[int, bool] | str:
    """(itemsize, hasobject) of ``numpy.dtype(spec, ...)`` after ``__setstate__(state)``, or why not."""
    if not isinstance(spec, str) or not spec or not spec.isascii():
        return "dtype spec is not a constant string"
    kind, digits = spec[0], spec[1:]
    if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
        return "dtype state is not a constant numpy (version 3/4) state"
    elsize, flags = state[5], state[7]
    if type(elsize) is not int or type(flags) is not int:
        return "dtype state has non-integer size or flags"
    hasobject = bool(flags & 1)
    if digits and not digits.isdigit():
        return f"dtype spec {spec!r} not understood"
    number = int(digits) if digits else 0
    if kind in _FLEXIBLE:
        itemsize = elsize if elsize >= 0 else number * _FLEXIBLE[kind]
    elif kind in _FIXED_SIZES and number in _FIXED_SIZES[kind]:
        itemsize = number
    else:
        return f"dtype spec {spec!r} not understood"
    return itemsize, hasobject


def array_read(attrs: Mapping[str, object], dtype: tuple[int, bool] | str) -> ArrayRead | str:
    """The bytes joblib's ``read_array`` consumes for a wrapper with these attributes, or why unknown.

    ``attrs`` is the wrapper's ``__dict__`` after BUILD; ``dtype`` what :func:`dtype_info` said.
    """
    if isinstance(dtype, str):
        return dtype
    itemsize, hasobject = dtype
    if "shape" not in attrs:
        return "wrapper has no shape"
    shape = attrs["shape"]
    if not isinstance(shape, (tuple, list)) or not all(isinstance(x, int) for x in shape):
        return "wrapper shape is not a constant tuple of integers"
    count = 1
    for x in shape:
        if x < 0 or x >= _INT64:
            return "wrapper shape has a negative or out-of-range dimension"
        count *= x
        if count >= _INT64:
            return "wrapper shape overflows int64"
    if hasobject:
        if attrs.get("allow_mmap"):
            # joblib.load(mmap_mode=...) would map raw object pointers instead of reading a pickle.
            return "object array marked allow_mmap: joblib reads it two different ways"
        return ArrayRead(padded=False, nbytes=0, pickled=True)
    if itemsize <= 0:
        return "dtype item size is zero"
    padded = attrs.get("numpy_array_alignment_bytes") is not None
    return ArrayRead(padded=padded, nbytes=count * itemsize, pickled=False)
