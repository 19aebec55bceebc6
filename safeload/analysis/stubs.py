"""Inert stand-ins for everything a replayed pickle names.

The replay hands these to CPython's unpickler instead of real classes and functions. They accept
any arguments, record what BUILD / SETITEM / APPEND store into them, and never call, import or
look up anything they are given. Dunder lookups fail as on a plain object, so the unpickler's own
protocol probes (``__setstate__`` aside, ``__getinitargs__``, ``__reduce__`` ...) find nothing.
"""

from __future__ import annotations

import functools
from typing import Any

from safeload.analysis import joblib_arrays as jl

# copyreg helpers whose result is an instance of their first argument; emulated structurally so
# that the instance's class is known (joblib's array wrapper is made this way under protocols 0-1).
_INSTANCE_FACTORIES = frozenset(
    {("copyreg", "_reconstructor"), ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__")}
)


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


class StubMeta(type):
    """Metaclass of stub classes: attribute access on the class yields more stubs."""

    sl_module: str
    sl_name: str

    def __getattr__(cls, name: str) -> Any:
        if _dunder(name):
            raise AttributeError(name)
        return Stub()

    def __setattr__(cls, name: str, value: Any) -> None:
        # Stub classes are shared between replays (see stub_class): nothing may change them.
        raise AttributeError(f"stub class {cls.sl_module}.{cls.sl_name} is read-only")

    def __delattr__(cls, name: str) -> None:
        raise AttributeError(f"stub class {cls.sl_module}.{cls.sl_name} is read-only")

    def __repr__(cls) -> str:
        return f"<stub {cls.sl_module}.{cls.sl_name}>"


class Stub(metaclass=StubMeta):
    """An instance of a stub class (or what calling a stub returned).

    Recording attributes default to None on the class and are created on first use, so making a
    stub (the replay makes one per REDUCE / NEWOBJ / persistent id) costs one allocation.
    """

    sl_module = "?"
    sl_name = "?"
    sl_args: tuple[Any, ...] = ()
    sl_states: list[Any] | None = None
    sl_attrs: dict[str, Any] | None = None
    sl_items: list[Any] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        inst = object.__new__(cls)
        if args:
            inst.sl_args = args
        return inst

    # No __init__: object.__init__ accepts any arguments when __new__ is overridden.

    def __setstate__(self, state: Any) -> None:
        if self.sl_states is None:
            self.sl_states = []
        self.sl_states.append(state)
        # What a class without __setstate__ would get: its __dict__ updated from a state dict,
        # or from the first part of a (dict, slotstate) pair plus the slot dict.
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        for part in parts:
            if type(part) is dict:
                if self.sl_attrs is None:
                    self.sl_attrs = {}
                for key, value in part.items():
                    if type(key) is str:
                        self.sl_attrs[key] = value

    def _sl_record(self, item: Any) -> None:
        if self.sl_items is None:
            self.sl_items = []
        self.sl_items.append(item)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._sl_record((key, value))

    def append(self, value: Any) -> None:
        self._sl_record(value)

    def extend(self, values: Any) -> None:
        self._sl_record(values)

    def add(self, value: Any) -> None:
        self._sl_record(value)

    def __call__(self, *args: Any, **kwargs: Any) -> Stub:
        return Stub(*args)

    def __getattr__(self, name: str) -> Any:
        if _dunder(name):
            raise AttributeError(name)
        return Stub()

    def __repr__(self) -> str:
        return f"<stub instance of {type(self).sl_module}.{type(self).sl_name}>"


class _FactoryStub(Stub):
    """copyreg._reconstructor / __newobj__ / __newobj_ex__: an instance of the first argument."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        target = args[0] if args and isinstance(args[0], StubMeta) else Stub
        inst = object.__new__(target)
        inst.sl_args = args[1:]
        return inst


class AnyStub(Stub):
    """What every name outside the few that matter to a replay stands for (see stub_class)."""


def stub_class(module: str, name: str) -> StubMeta:
    """The stub class standing for ``module.name``.

    Only a few names need a class that says what it stands for: the copyreg helpers (their result
    is an instance of their first argument) and what joblib's reader looks at (its array wrapper,
    numpy's dtype). Every other name gets one shared class: stubs behave alike whatever they stand
    for, so the unpickler runs the same either way, and making a class costs about 7 us, a third of
    the scan of a stream that names 50,000 distinct globals (and 1 KB each, kept to its end).
    """
    if (
        (module, name) in _INSTANCE_FACTORIES
        or jl.is_wrapper(module, name)
        or f"{module}.{name}" in jl.DTYPE_NAMES
    ):
        return _named_stub_class(module, name)
    return AnyStub


@functools.lru_cache(maxsize=64)
def _named_stub_class(module: str, name: str) -> StubMeta:
    # Cached across replays (making a class costs far more than unpickling a small stream); stub
    # classes are read-only, so one stream cannot change what another replay sees.
    base = _FactoryStub if (module, name) in _INSTANCE_FACTORIES else Stub
    return StubMeta("Stub", (base,), {"sl_module": module, "sl_name": name})


def is_stub(value: object) -> bool:
    return isinstance(value, (Stub, StubMeta))
