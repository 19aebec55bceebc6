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
import gc

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: a replayed audit never needs it
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import ParamSpec, TypeVar

    _P = ParamSpec("_P")
    _R = TypeVar("_R")

__all__ = ["SCAN_THRESHOLD", "FrozenHeap", "fewer_collections"]

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

    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        _enter()
        try:
            return func(*args, **kwargs)
        finally:
            _leave()

    # What functools.wraps copies, without functools: it imports collections, and a replayed
    # audit (cli_audit.run is wrapped) imports neither.
    for name in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(wrapper, name, getattr(func, name))
    wrapper.__dict__.update(func.__dict__)
    wrapper.__wrapped__ = func  # type: ignore[attr-defined]
    return wrapper


class FrozenHeap:
    """``with FrozenHeap():`` keeps every object that exists now out of the collections made in the
    block (gc.freeze), and lets them back in after it (gc.unfreeze).

    For a run of many scans, started once its modules are imported and its inputs listed. Those
    objects live as long as the run, yet the young collections that a scan's allocations set off
    examined them all (the first one, after the imports: 56-66 ms of an audit of 5,000 small
    files, seen here). Workers forked in the block share them page for page, and a collection
    writes to every object it examines: a worker's first collections copied those pages (66-92 ms
    each) until they were frozen. What scans allocate in the block is collected as usual.
    A caller that froze objects itself keeps its own arrangement: nothing is frozen or thawed then.
    """

    def __init__(self) -> None:
        self._froze = False

    def __enter__(self) -> FrozenHeap:
        if gc.get_freeze_count() == 0:
            gc.freeze()
            self._froze = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._froze:
            self._froze = False
            gc.unfreeze()
