"""Policy name -> object. The only place safeload imports a name that a pickle mentions.

A name is imported only after the policy allowed it (the floor is checked again here), and what is
imported is the policy's own string: the longest importable module prefix of the qualified name,
then an attribute walk along the rest. Backends may substitute their own object for a name (a
validating wrapper around torch's rebuild function, a numpy stand-in when torch is absent); the
policy check comes first either way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from safeload.analysis import names
from safeload.errors import DisallowedGlobalError, LoadError
from safeload.text import escape


class PolicyLike(Protocol):
    name: str

    def decide(self, qualname: str) -> Any: ...

    def remedy(self, name: str) -> str | None: ...


def map_name(module: str, name: str, proto: int, fix_imports: bool) -> tuple[str, str]:
    """The Python 2 name mapping CPython's unpickler applies before importing (protocol < 3).

    The walker's own function, so the two gates can never map a name differently.
    """
    return names.map_name(module, name, proto) if fix_imports else (module, name)


class Resolver:
    """Resolves allowed qualified names for one load. Never imports a refused name."""

    def __init__(
        self,
        policy: PolicyLike,
        substitutes: Mapping[str, object],
        *,
        path: str,
        unavailable: Callable[[str], str | None] | None = None,
    ) -> None:
        self._policy = policy
        self._substitutes = substitutes
        self._path = path
        # A backend's veto on importing a name it cannot serve (the numpy backend never imports torch).
        self._unavailable = unavailable
        self._cache: dict[str, object] = {}

    def resolve(self, qualname: str, *, member: str | None = None, offset: int | None = None) -> object:
        if qualname in self._cache:
            return self._cache[qualname]
        decision = self._policy.decide(qualname)
        if decision.on_floor or not decision.allowed:
            on_floor = bool(decision.on_floor)
            why = (
                "is on the floor (never allowed; the file is very likely malicious)"
                if on_floor
                else (f"is not allowed by policy {escape(self._policy.name)!s}")
            )
            raise DisallowedGlobalError(
                f"refusing to load: global {escape(qualname)} {why}",
                path=self._path,
                member=member,
                offset=offset,
                global_name=qualname,
                remedy=None if on_floor else self._policy.remedy(qualname),
                policy=self._policy.name,
                on_floor=on_floor,
            )
        if qualname in self._substitutes:
            obj = self._substitutes[qualname]
        else:
            why_not = self._unavailable(qualname) if self._unavailable is not None else None
            if why_not is not None:
                raise LoadError(why_not, path=self._path, member=member, offset=offset, global_name=qualname)
            obj = import_allowed(qualname, path=self._path)
        self._cache[qualname] = obj
        return obj


def import_allowed(qualname: str, *, path: str) -> object:
    """Import an allowed name: the longest importable module prefix, then attributes.

    Only ever called with a name the policy allowed.
    """
    parts = qualname.split(".")
    if any(not p.isidentifier() for p in parts):
        raise LoadError(f"allowed name {escape(qualname)} is not a dotted Python name", path=path)
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only "this prefix is not a module" moves on to a shorter prefix; a module that exists
            # but fails to import is an error worth reporting as is.
            if exc.name is not None and not _is_prefix(exc.name, module_name):
                raise _import_error(qualname, exc, path) from exc
            continue
        except Exception as exc:
            raise _import_error(qualname, exc, path) from exc
        for attr in parts[cut:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                break
        else:
            return obj
        # The module imported but has no such attribute; a shorter prefix will not have it either.
        break
    raise LoadError(
        f"allowed name {escape(qualname)} cannot be imported in this environment",
        path=path,
        global_name=qualname,
        remedy="install the package that defines it (the file needs it to be rebuilt)",
    )


def _is_prefix(candidate: str, module_name: str) -> bool:
    return module_name == candidate or module_name.startswith(candidate + ".")


def _import_error(qualname: str, exc: BaseException, path: str) -> LoadError:
    return LoadError(
        f"allowed name {escape(qualname)} failed to import: {type(exc).__name__}: {escape(str(exc))}",
        path=path,
        global_name=qualname,
    )
