"""Routing ``torch.load`` through safeload for code you do not control.

Libraries call ``torch.load`` themselves, and some catch its refusal under ``weights_only=True``
and load the same file again with ``weights_only=False``: the payload then runs. Inside
``guard_torch_load()`` every call to ``torch.load`` (and to ``torch.serialization.load``, the same
function) is ``safeload.load`` under one policy, whatever ``weights_only`` says, so a retry is
refused as the first try was.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from safeload.api import PolicySpec, load, resolve_policy

__all__ = ["guard_torch_load"]

# The guard swaps module attributes: one swap at a time, whichever thread enters or leaves.
_swap_lock = threading.Lock()
# Guards in force, the last entered last, and what torch had before the first of them. Leaving one
# installs the last of those still in force, so that no exit order (threads leave when they
# like) can unguard a block that is still running.
_in_force: list[Callable[..., Any]] = []
_unguarded: list[Any] = []


@contextlib.contextmanager
def guard_torch_load(*, policy: PolicySpec = "default", allow: Iterable[str] = ()) -> Iterator[None]:
    """While the block runs, ``torch.load`` is ``safeload.load`` with this policy.

    The swap is process-wide (every thread's ``torch.load`` is guarded while the block runs) and
    reaches code that looks ``torch.load`` up when it calls it, as libraries do. A reference taken
    before the block (``from torch import load``) still names the original function. Guards nest
    and may overlap across threads: while several are in force, the one entered last decides the
    policy, and torch.load is the original again only once every one has been left.

    ``pickle_module`` may be left out or be the standard ``pickle`` (safeload unpickles with its
    own restricted unpickler either way); any other module is refused, as
    ``torch.load(weights_only=True)`` refuses it.
    """
    from safeload.loader.torch_backend import load_owners

    try:
        owners = load_owners()
    except ImportError as exc:
        raise ImportError("guard_torch_load needs torch: there is no torch.load to guard") from exc
    resolved = resolve_policy(policy, allow)  # a bad policy fails here, before anything is swapped

    def guarded_load(
        f: Any,
        map_location: Any = None,
        pickle_module: Any = None,
        *,
        weights_only: bool | None = None,
        mmap: bool | None = None,
        **pickle_load_args: Any,
    ) -> Any:
        if pickle_module is not None and pickle_module is not pickle:
            named = getattr(pickle_module, "__name__", type(pickle_module).__name__)
            raise TypeError(
                f"torch.load is guarded by safeload: pickle_module={named!r} would unpickle outside "
                "the policy; leave it out"
            )
        return load(f, map_location, policy=resolved, mmap=mmap, **pickle_load_args)

    guarded_load.__doc__ = f"torch.load, guarded by safeload: policy {resolved.name!r}, weights_only ignored."
    guarded_load.__qualname__ = guarded_load.__name__ = "load"

    with _swap_lock:
        if not _in_force:
            _unguarded[:] = [owner.load for owner in owners]
        _in_force.append(guarded_load)
        for owner in owners:
            owner.load = guarded_load
    try:
        yield
    finally:
        with _swap_lock:
            _in_force.remove(guarded_load)
            for owner, unguarded in zip(owners, _unguarded, strict=True):
                owner.load = _in_force[-1] if _in_force else unguarded
