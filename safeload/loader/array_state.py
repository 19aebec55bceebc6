"""States numpy's ``ndarray.__setstate__`` does not check for itself, refused before it runs.

BUILD on an array (after ``numpy._core.multiarray._reconstruct``) passes the pickled
``(version, shape, dtype, is_fortran, data)`` to ``ndarray.__setstate__``. For an object dtype
numpy takes ``data`` as a list and reads ``prod(shape)`` items from it without checking its length:
a shorter list makes it read past the list (a segfault in numpy 2.4, found by this project's
byte-flip tests). Raw bytes it does check (a length mismatch is a ValueError). So before numpy sees
a state: the shape must be a tuple of non-negative ints, the dtype a numpy dtype, and an object
array's data a list of exactly as many items as the shape holds.
"""

from __future__ import annotations

import math
import sys

# numpy's NPY_MAXDIMS (64 in numpy 2, 32 in numpy 1): no pickled array has more.
_MAX_DIMS = 64


def build_state_problem(target: object, state: object) -> str | None:
    """Why BUILD with ``state`` on ``target`` must not reach numpy, or None (not an array, or fine)."""
    np = sys.modules.get("numpy")
    if np is None or not isinstance(target, np.ndarray):
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
