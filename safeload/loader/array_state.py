"""States numpy's and torch's ``__setstate__`` do not check for themselves, refused before they run.

Each was found by this project's byte-flip and structure fuzzing, or while fixing what it found;
each crashed numpy 2.4 or, for tensors, handed out memory nobody wrote.

- **Arrays.** BUILD on an array (after ``numpy._core.multiarray._reconstruct``) passes the pickled
  ``(version, shape, dtype, is_fortran, data)`` to ``ndarray.__setstate__``. For an object dtype
  numpy reads ``prod(shape)`` items from the ``data`` list without checking its length. Raw bytes
  it does check. So: the shape must be a tuple of non-negative ints, the dtype a numpy dtype, and
  an object array's data a list of exactly as many items as the shape holds.
- **dtypes.** BUILD on a dtype passes ``(version, byteorder, subarray, names, fields, elsize,
  alignment, flags[, metadata])`` to ``dtype.__setstate__``, which takes field offsets, sizes and
  flags as given: an object field placed past the end of its record (one flipped byte) makes numpy
  write object pointers outside the array's memory. A dtype state is accepted only when it is
  exactly the state numpy writes for the dtype its parts describe, built through numpy's own
  checking constructor (which refuses fields past the item size and overlapping object fields),
  and only on a dtype of that very kind (numpy took a subarray state on a datetime dtype and
  crashed: three flipped bytes of a pickle holding a structured dtype).
- **Once, and before any use.** Both ``__setstate__`` change the object in place, under whatever
  already holds it: a dtype given object fields after an array of raw bytes was made with it
  makes numpy read those bytes as object pointers (checked: a segfault at an address the file
  chose). So a dtype or array takes a BUILD only once, only when the call that made it was the
  only holder of a new object (never a dtype numpy shares, like ``dtype("f4", False, False)``),
  and only while nothing has taken it in since: not a tuple, list, dict, set, call or state.
  numpy's own pickles always build each dtype and array right after making it.
- **Tensors.** ``Tensor.__setstate__`` calls ``set_`` with a 4-tuple state (the legacy storage,
  offset, size, stride), and ``set_`` grows a resizable storage to fit, with uninitialized memory:
  the view must fit its storage, as the rebuild functions' views must.
"""

from __future__ import annotations

import collections
import math
import sys
from typing import Any

from safeload.errors import LoadError
from safeload.loader.storages import Where, check_view
from safeload.text import escape

# numpy's NPY_MAXDIMS (64 in numpy 2, 32 in numpy 1): no pickled array has more.
_MAX_DIMS = 64


# What sys.getrefcount says of a new object held only by a list slot, read through a subscript:
# the same expression on the unpickler's stack then means "nothing else holds it". Measured, not
# assumed: interpreters differ in the references they count.
_probe = [object()]
_ONLY_THE_STACK = sys.getrefcount(_probe[-1])
del _probe


class BuildOnce:
    """Which numpy dtypes and arrays made by this load may still take their one BUILD."""

    def __init__(self) -> None:
        # id -> the object (kept alive: ids stay unique). Empty in nearly every load: callers test
        # it before gathering items for ``taken``.
        self.pending: dict[int, object] = {}

    def made(self, stack: list[object]) -> None:
        """After a call: its result, ``stack[-1]``, may be built if it is a new numpy dtype or array."""
        np = sys.modules.get("numpy")
        if np is None or not isinstance(stack[-1], (np.dtype, np.ndarray)):
            return
        if sys.getrefcount(stack[-1]) <= _ONLY_THE_STACK:
            self.pending[id(stack[-1])] = stack[-1]

    def taken(self, items: list[object]) -> None:
        """``items`` went into a container, a call or a state: none of them takes a BUILD any more."""
        for item in items:
            self.pending.pop(id(item), None)

    def problem(self, target: object) -> str | None:
        np = sys.modules.get("numpy")
        if np is None or not isinstance(target, (np.dtype, np.ndarray)):
            return None
        if self.pending.pop(id(target), None) is None:
            kind = "dtype" if isinstance(target, np.dtype) else "array"
            return (
                f"a numpy {kind} given a state after it was built, shared or put to use: numpy would "
                "change it under what already holds it"
            )
        return None


def build_state_problem(target: object, state: object) -> str | None:
    """Why BUILD with ``state`` on ``target`` must not reach numpy or torch, or None (fine)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(target, torch.Tensor):
        return _tensor_state_problem(target, state, torch)
    np = sys.modules.get("numpy")
    if np is None:
        return None
    if isinstance(target, np.dtype):
        return _dtype_state_problem(target, state, np)
    if not isinstance(target, np.ndarray):
        return None
    # Subclasses (numpy.ma.MaskedArray) hand the first five items on to ndarray.__setstate__.
    if isinstance(state, tuple) and len(state) > 5:
        state = state[:5]
    return _ndarray_state_problem(state, np)


def _ndarray_state_problem(state: object, np: object) -> str | None:
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        return "a numpy array's state is not (version, shape, dtype, is_fortran, data)"
    shape, dtype, _fortran, data = state[-4:]
    if (
        not isinstance(shape, tuple)
        or len(shape) > _MAX_DIMS
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        return "a numpy array's shape is not a tuple of non-negative integers"
    if not isinstance(dtype, np.dtype):  # type: ignore[attr-defined]
        return "a numpy array's dtype is not a numpy dtype"
    if dtype.hasobject:
        count = math.prod(shape)
        if not isinstance(data, list) or len(data) != count:
            given = f"{len(data)} values" if isinstance(data, list) else f"a {type(data).__name__}"
            return (
                f"an object array of shape {shape} ({count} items) given {given}: numpy does not "
                "check this and would read past them"
            )
    return None


def _tensor_state_problem(target: Any, state: object, torch: Any) -> str | None:
    """``Tensor.__setstate__`` takes a 4-tuple as the legacy (storage, offset, size, stride) and
    calls ``set_`` with it, which grows a resizable storage to fit: gigabytes on request, and
    uninitialized memory in the tensor. torch.load's own storages cannot grow; a view must fit its
    storage here whatever the storage is (the same check as the rebuild functions')."""
    if not isinstance(state, tuple):
        # torch takes len() and unpacks whatever it is given: a dict of four keys would reach set_
        return f"a tensor state that is a {escape(type(state).__name__)}, not a tuple"
    if len(state) in (3, 5):
        # (requires_grad, _, backward_hooks), or the legacy Variable's five with the hooks third
        # too: torch sets them as given, and backward() would call them. torch.save writes none.
        hooks = state[2]
        if hooks is not None and not (type(hooks) in (dict, collections.OrderedDict) and not hooks):
            return "a tensor state that sets backward hooks: backward() would call them"
        return None
    if len(state) != 4:
        return None  # torch refuses any other length itself
    storage, offset, size, stride = state
    if isinstance(storage, torch.storage.TypedStorage):
        nbytes, itemsize = storage._untyped_storage.nbytes(), storage.dtype.itemsize
    elif isinstance(storage, torch.UntypedStorage):
        nbytes, itemsize = storage.nbytes(), target.element_size()
    else:
        return f"a tensor's legacy state whose storage is a {escape(type(storage).__name__)}"
    try:
        check_view(offset, size, stride, nbytes // max(itemsize, 1), _STATE, what="tensor (legacy state)")
    except LoadError as exc:
        return exc.message
    return None


_STATE = Where(path="")  # check_view's messages are taken, not its errors: the unpickler says where


# numpy's NPY_ALIGNED_STRUCT dtype flag: the struct was laid out with align=True.
_ALIGNED_STRUCT = 0x80


def _dtype_state_problem(target: Any, state: object, np: Any) -> str | None:
    if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
        return "a numpy dtype's state is not numpy's (version 3 or 4, with 8 or 9 items)"
    try:
        expected = _described_dtype(target, state, np)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as exc:
        # numpy's message may quote field names and units from the file: escaped like every such text.
        return f"a numpy dtype's state that numpy's constructor refuses ({type(exc).__name__}: {escape(str(exc), 200)})"
    try:
        _, args, written = expected.__reduce__()
        same = written == state
        # The kind (datetime, void, string ...) is the object's, fixed when it was made: a state
        # describing another kind would be applied to it all the same.
        same_kind = args == target.__reduce__()[1]
    except (TypeError, ValueError):  # comparing parts that are not what numpy writes
        same = same_kind = False
    if not same:
        return "a numpy dtype's state that is not the one numpy writes for the dtype it describes"
    if not same_kind:
        return f"a numpy dtype's state that describes a {escape(args[0])} dtype, given to a {escape(target.str)} one"
    return None


def _described_dtype(target: Any, state: tuple[Any, ...], np: Any) -> Any:
    """The dtype ``state`` describes, built through numpy's checking constructor."""
    _, byteorder, subarray, names, fields, elsize, _alignment, flags = state[:8]
    if subarray is not None:
        base, shape = subarray
        if not isinstance(base, np.dtype):
            raise TypeError("subarray base is not a dtype")
        return np.dtype((base, shape))
    if names is not None:
        if not isinstance(names, tuple) or not isinstance(fields, dict) or type(elsize) is not int:
            raise TypeError("names, fields or item size of the wrong type")
        formats, offsets, titles = [], [], []
        for name in names:
            entry = fields[name]
            if not isinstance(entry, tuple) or len(entry) not in (2, 3) or not isinstance(entry[0], np.dtype):
                raise TypeError("a field is not (dtype, offset[, title])")
            formats.append(entry[0])
            offsets.append(entry[1])
            titles.append(entry[2] if len(entry) == 3 else None)
        spec: dict[str, Any] = {"names": list(names), "formats": formats, "offsets": offsets, "itemsize": elsize}
        if any(t is not None for t in titles):
            spec["titles"] = titles
        return np.dtype(spec, align=bool(type(flags) is int and flags & _ALIGNED_STRUCT))
    described = target
    if target.kind in "mM" and len(state) == 9:
        unit, count = state[8][1][:2]
        if not isinstance(unit, bytes) or type(count) is not int:
            raise TypeError("datetime unit is not (bytes, int, ...)")
        described = np.dtype(f"{target.char}8[{count}{unit.decode('ascii')}]")
    if byteorder in ("<", ">"):
        described = described.newbyteorder(byteorder)
    return described
