"""Symbolic values on the walker's stack and in its memo.

Constants (None, bool, int, float, str, small bytes) are plain Python values. Everything else is
one of the small classes below. Values are shared by reference, never copied: a memo entry pushed
a million times is one object, so "billion laughs" streams stay linear in memory. Nothing here
hashes a value taken from the file (dict and set contents are kept as lists), so crafted hash
collisions cannot slow the walker down.
"""

from __future__ import annotations

from collections.abc import Iterable

from safeload.analysis.types import UNKNOWN, ImportSite


class Sym:
    """Base of every non-constant value."""

    __slots__ = ()


class Tup(Sym):
    """A tuple. ``depth`` counts directly nested tuples: hashing a deep tuple recurses in C.

    ``g`` is False only when no global, list, dict or set sits inside (directly or in nested
    tuples), so per-call argument scans can skip the tuple.
    """

    __slots__ = ("items", "depth", "g")

    def __init__(self, items: tuple[object, ...], depth: int, g: bool = True) -> None:
        self.items = items
        self.depth = depth
        self.g = g


class Lst(Sym):
    __slots__ = ("items",)

    def __init__(self, items: list[object]) -> None:
        self.items = items


class Dct(Sym):
    """A dict as the (key, value) pairs stored into it, in order; later pairs win on lookup."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[object, object]]) -> None:
        self.pairs = pairs


class SetV(Sym):
    __slots__ = ("items", "frozen")

    def __init__(self, items: list[object], frozen: bool) -> None:
        self.items = items
        self.frozen = frozen


class Glob(Sym):
    """The object a GLOBAL / STACK_GLOBAL / EXT pushes. ``site`` is None when the name is unknown."""

    __slots__ = ("site",)

    def __init__(self, site: ImportSite | None) -> None:
        self.site = site


class Obj(Sym):
    """Whatever a call or instantiation returned.

    ``site``: the import that produced it (the callable or class), when known.
    ``cls``: the import naming its class, when known (NEWOBJ / INST / OBJ class, a class called by
    REDUCE, or the class handed to ``copyreg._reconstructor`` / ``copyreg.__newobj__``).
    ``state``: merged BUILD states (attribute name -> value) where they were constant dicts.
    ``pairs`` / ``items``: what SETITEM(S) / APPEND(S) stored into it.
    """

    __slots__ = ("site", "cls", "args", "state", "pairs", "items", "built")

    def __init__(self, site: ImportSite | None, cls: ImportSite | None, args: object) -> None:
        self.site = site
        self.cls = cls
        self.args = args
        self.state: object = None
        self.pairs: list[tuple[object, object]] | None = None
        self.items: list[object] | None = None
        self.built = 0


class Pers(Sym):
    """What ``persistent_load`` returned for a persistent id."""

    __slots__ = ("pid",)

    def __init__(self, pid: object) -> None:
        self.pid = pid


class Opaque(Sym):
    """A value whose content the walker does not keep: large bytes, non-ASCII STRING, buffers ..."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


EMPTY_TUP = Tup((), 1, False)

_CONST = (type(None), bool, int, float, str, bytes)
_CONST_TYPES = frozenset(_CONST)


class _Budget(Exception):
    pass


def fold(value: object, *, max_nodes: int = 100_000, max_depth: int = 100) -> object:
    """A plain Python value for a symbolic one, UNKNOWN where it is not constant.

    Tuples, lists, dicts and sets become real containers; a global becomes its ImportSite (so
    readers can check its qualified name); calls, persistent loads and opaque values become
    UNKNOWN. Shared sub-values stay shared, so the output is no bigger in memory than the input,
    but the value *as a tree* (what ``==``, ``repr`` or a JSON dump would walk) is bounded: past
    ``max_nodes`` expanded nodes, ``max_depth`` levels, or on a cycle, the whole value is UNKNOWN.
    A memo fan-out ("billion laughs") therefore folds to UNKNOWN instead of to a bomb. Dicts and
    sets whose keys have attacker-chosen hashes (anything but str/bytes/small ints) are folded only
    when small, so consumers cannot be slowed by hash collisions.
    """
    t = type(value)
    if value is None or t in _CONST:
        return value
    if t is Tup:
        # Fast path: a flat tuple of constants and globals (persistent ids, argument tuples).
        flat: list[object] = []
        for x in value.items:  # type: ignore[attr-defined]
            tx = type(x)
            if x is None or tx in _CONST:
                flat.append(x)
            elif tx is Glob:
                flat.append(x.site if x.site is not None else UNKNOWN)  # type: ignore[attr-defined]
            else:
                break
        else:
            return tuple(flat)
    elif t is not Lst and t is not Dct and t is not SetV:
        return v_site(value)
    seen: dict[int, tuple[object, int]] = {}
    active: set[int] = set()

    def go(v: object, depth: int) -> tuple[object, int]:
        if v is None or type(v) in _CONST:
            return v, 1
        if depth > max_depth:
            raise _Budget
        key = id(v)
        done = seen.get(key)
        if done is not None:
            return done
        if key in active:
            raise _Budget  # a cycle: infinite as a tree
        active.add(key)
        out, size = _one(v, depth)
        active.discard(key)
        if size > max_nodes:
            raise _Budget
        seen[key] = (out, size)
        return out, size

    def many(items: Iterable[object], depth: int) -> tuple[list[object], int]:
        # Leaves (most nodes) stay as they are: copy the list once, then replace only the others.
        out = list(items)
        total = 1 + len(out)
        if _CONST_TYPES.issuperset(map(type, out)):
            if total > max_nodes:
                raise _Budget
            return out, total
        for i, x in enumerate(out):
            if type(x) not in _CONST_TYPES:
                folded, size = go(x, depth + 1)
                out[i] = folded
                total += size - 1
        if total > max_nodes:
            raise _Budget
        return out, total

    def _one(v: object, depth: int) -> tuple[object, int]:
        if isinstance(v, Tup):
            items, size = many(v.items, depth)
            return tuple(items), size
        if isinstance(v, Lst):
            return many(v.items, depth)
        if isinstance(v, Dct):
            keys, ksize = many([k for k, _ in v.pairs], depth)
            vals, vsize = many([val for _, val in v.pairs], depth)
            if not _hash_safe(keys):
                return UNKNOWN, 1
            try:
                return dict(zip(keys, vals, strict=True)), ksize + vsize
            except TypeError:  # an unhashable key: a loader fails here too
                return UNKNOWN, 1
        if isinstance(v, SetV):
            items, size = many(v.items, depth)
            if not _hash_safe(items):
                return UNKNOWN, 1
            try:
                return (frozenset(items) if v.frozen else set(items)), size
            except TypeError:
                return UNKNOWN, 1
        if isinstance(v, Glob):
            return (v.site if v.site is not None else UNKNOWN), 1
        return UNKNOWN, 1

    try:
        return go(value, 0)[0]
    except (_Budget, RecursionError):
        return UNKNOWN


def v_site(value: object) -> object:
    """A non-container value folded: a global's ImportSite, else UNKNOWN."""
    if type(value) is Glob:
        return value.site if value.site is not None else UNKNOWN  # type: ignore[attr-defined]
    return UNKNOWN


_SMALL_INT = (1 << 61) - 2


def _hash_safe(keys: list[object]) -> bool:
    """Whether building a dict/set of these keys is cheap whatever the attacker chose."""
    if len(keys) <= 64:
        return True
    for k in keys:
        t = type(k)
        if t is str or t is bytes or t is bool or k is None or k is UNKNOWN:
            continue
        if t is int and -_SMALL_INT < k < _SMALL_INT:  # type: ignore[operator]
            continue
        return False
    return True
