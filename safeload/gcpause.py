"""Fewer cyclic garbage collections while a scan builds its many small objects.

A scan allocates hundreds of thousands of short-lived, mostly acyclic objects (symbolic values, zip
entries, replay stubs). Under the default thresholds each burst of 700 allocations starts a
collection, and the full ones traverse every live object: a quarter of a large scan's time, with
nothing to free. Reference counting frees almost everything anyway.

The collector is not switched off: a hostile stream can make cyclic garbage by the million (a list
appended to itself, then popped), so the youngest generation is still collected, only after
``SCAN_THRESHOLD`` allocations instead of 700, which keeps that garbage bounded. The caller's
thresholds are restored when the last concurrent scan ends.
"""

from __future__ import annotations

import _thread
import functools
import gc
from collections.abc import Callable

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: a replayed audit never needs it
if TYPE_CHECKING:
    from typing import ParamSpec, TypeVar

    _P = ParamSpec("_P")
    _R = TypeVar("_R")

__all__ = ["SCAN_THRESHOLD", "fewer_collections"]

# Allocations between young-generation collections during a scan (CPython's default is 700).
SCAN_THRESHOLD = 100_000

_lock = _thread.allocate_lock()  # threading's Lock, without importing threading (a replayed audit)
_active = 0  # scans in progress, in any thread
_saved: tuple[int, ...] | None = None  # the thresholds to restore when the last one ends


def _enter() -> None:
    global _active, _saved
    with _lock:
        if _active == 0:
            current = gc.get_threshold()
            # 0 means the caller turned automatic collection off: leave that alone.
            if 0 < current[0] < SCAN_THRESHOLD:
                _saved = current
                gc.set_threshold(SCAN_THRESHOLD, *current[1:])
        _active += 1


def _leave() -> None:
    global _active, _saved
    with _lock:
        _active -= 1
        if _active == 0 and _saved is not None:
            gc.set_threshold(*_saved)
            _saved = None


def fewer_collections(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``func`` with a raised young-generation threshold (restored afterwards, even on error)."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        _enter()
        try:
            return func(*args, **kwargs)
        finally:
            _leave()

    return wrapper
