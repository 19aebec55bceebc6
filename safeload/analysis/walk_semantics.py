"""What calls, builds, containers and persistent ids mean to the walker.

Part of the walker (see ``walker.py``): REDUCE / NEWOBJ / OBJ / INST results and their provenance,
the uses recorded on imports, BUILD checks (dunder attributes, joblib array wrappers), dict and set
keys whose hashes an attacker controls, and how an unresolvable STACK_GLOBAL is described.
"""

from __future__ import annotations

import math
import struct

from safeload.analysis import joblib_arrays as jl
from safeload.analysis.types import UNKNOWN, PersistentIdSite
from safeload.analysis.values import _CONST_TYPES, Dct, Glob, Lst, Obj, Opaque, Pers, SetV, Tup, fold
from safeload.analysis.walk_args import Arguments, Stop
from safeload.model import Use
from safeload.text import escape

# Records kept per stream; past this the walk stops with a limit finding (memory stays bounded).
MAX_PERSISTENT_IDS = 1_000_000
_NESTED = (Tup, Lst, Dct, SetV)
_FACTORY_NAMES = frozenset(name.split(".", 1)[1] for name in jl.INSTANCE_FACTORIES)
_SMALL_INT = (1 << 61) - 2
# Calls whose result takes its state in place: every numpy callable the shipped rules allow that
# makes a dtype or an array (an array type a user's own rules allow is the loader's to check: it
# tests what each call returned).
_NUMPY_IN_PLACE = frozenset(
    {
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.numeric._frombuffer",
        "numpy._core.numeric._frombuffer",
    }
)
_NUMPY_IN_PLACE_NAMES = frozenset(q.rsplit(".", 1)[1] for q in _NUMPY_IN_PLACE)
_MAX_DIMS = 64  # numpy's NPY_MAXDIMS
_POINTER = struct.calcsize("P")  # an object field holds one pointer
# The flags numpy gives every dtype that holds objects (numpy's NPY_FROM_FIELDS), and the bits of
# them it gives no other dtype (NPY_ITEM_REFCOUNT, NPY_LIST_PICKLE, NPY_ITEM_IS_POINTER).
_OBJECT_FLAGS = 0x01 | 0x02 | 0x08 | 0x10
_OBJECT_BITS = 0x01 | 0x02 | 0x04
# Kinds whose items have a size of their own (void, bytes under both its names, unicode).
_FLEXIBLE = frozenset("VSaU")
_ALIGNMENTS = frozenset({1, 2, 4, 8, 16, 32, 64})
# dtype kinds with fields or a subarray: every other kind's state has None in those three places.
_RECORD_KINDS = frozenset("V")


def _copied(args: object) -> bool:
    """numpy.dtype(obj, align, copy) called with copy set, as numpy's own pickles always do."""
    if type(args) is not Tup or len(args.items) < 3:  # type: ignore[union-attr]
        return False
    flag = args.items[2]  # type: ignore[union-attr]
    return flag is True or (type(flag) is int and flag == 1)


def _record_parts_of_plain_kind(args: object, state: object) -> str | None:
    """The kind of a dtype made from a constant type string whose kind has no fields or subarray,
    when its BUILD state has any (numpy's state: version, byteorder, subarray, names, fields, ...)."""
    spec = _spec(args)
    if not spec or spec[0] in _RECORD_KINDS:
        return None
    parts = state.items[2:5] if type(state) is Tup and len(state.items) >= 5 else None  # type: ignore[union-attr]
    if parts is None or all(p is None for p in parts):
        return None
    return spec


def _numpys_dtype_layout(state: object) -> bool:
    """Whether a dtype state has the layout numpy writes: 8 or 9 items, version 3 or 4. numpy also
    takes 5 to 9 items of versions 0 to 4, each layout with its own defaults (a version 3 state
    without flags gives an object dtype none: its raw bytes become object pointers)."""
    if type(state) is not Tup:
        return False
    items = state.items  # type: ignore[union-attr]
    return len(items) in (8, 9) and type(items[0]) is int and items[0] in (3, 4)


def _object_items_mismatch(state: object) -> str | None:
    """For an array state ``(version, shape, dtype, is_fortran, data)`` (subclasses add items after
    these) of an object dtype, with a constant shape and a list of data: the mismatch between the
    items the shape holds and the items listed. numpy reads as many as the shape holds, past the
    end of a shorter list."""
    if type(state) is not Tup or len(state.items) < 5:  # type: ignore[union-attr]
        return None
    shape, dtype, _, data = state.items[1:5]  # type: ignore[union-attr]
    if type(data) is not Lst or type(shape) is not Tup or not _has_objects(dtype, 8):
        return None
    dims = shape.items  # type: ignore[union-attr]
    # numpy takes at most 64 dimensions (and the product of a long hostile shape is costly)
    if len(dims) > _MAX_DIMS or not all(type(n) is int and n >= 0 for n in dims):
        return None
    count = math.prod(dims)
    given = len(data.items)  # type: ignore[union-attr]
    if given == count:
        return None
    return (
        f"{given} values to an object array of shape {dims!r}, which holds {count} "
        "(numpy reads as many as the shape holds)"
    )


def _layout_problem(args: object, state: object) -> str | None:
    """What in a dtype state numpy's constructor never makes, and its ``__setstate__`` takes as
    given, then crashes on or reads and writes past an item with (object pointers outside the
    array's memory, raw bytes read as pointers):

    - a datetime dtype without its time unit;
    - an item size or alignment on a kind that fixes its own (numpy writes -1 for both);
    - a flexible dtype ("V16", "S5", "U10") given another item size than it was made with, or an
      alignment that is no power of two;
    - a subarray whose base times its shape is not the item;
    - a record whose names and fields disagree, a field not wholly inside the item, an object field
      overlapping another field, or an object field whose place the walk cannot read.
    """
    if type(state) is not Tup or len(state.items) < 6:  # type: ignore[union-attr]
        return None
    subarray, names, fields, elsize = state.items[2:6]  # type: ignore[union-attr]
    alignment = state.items[6] if len(state.items) > 6 else None  # type: ignore[union-attr]
    spec = _spec(args)
    if spec:
        if spec[0] in ("M", "m") and not _datetime_metadata(state):
            return f"a {escape(spec)} dtype a state without its time unit (numpy's are (unit, count, 1, 1))"
        if spec[0] not in _FLEXIBLE:
            # numpy writes -1 for both: the kind fixes them (it took a stray alignment and crashed)
            if elsize != -1 or alignment != -1:
                return (
                    f"a {escape(spec)} dtype an item size and alignment ({escape(repr(elsize), 40)}, "
                    f"{escape(repr(alignment), 40)}) where numpy writes none"
                )
        else:
            made = _spec_size(spec)
            if made is not None and elsize != made:
                return f"a {escape(spec)} dtype an item size of {escape(repr(elsize), 40)} bytes"
            if alignment not in _ALIGNMENTS:
                return f"a {escape(spec)} dtype an alignment of {escape(repr(alignment), 40)} bytes"
    if subarray is not None:
        problem = _subarray_problem(subarray, elsize)
        if problem is not None:
            return problem
    if names is None and fields is None:
        return None
    if type(names) is not Tup or type(fields) is not Dct:
        return "a record state whose names and fields are not a tuple and a dict"
    by_name = {k: v for k, v in fields.pairs if type(k) is str}  # type: ignore[union-attr]
    spans: list[tuple[int, int, bool, str]] = []
    for name in names.items:  # type: ignore[union-attr]
        value = by_name.get(name) if type(name) is str else None
        if type(value) is not Tup or len(value.items) not in (2, 3):  # type: ignore[union-attr]
            return f"a record state whose field {_label(name)} is not (dtype, offset)"
        field, offset = value.items[0], value.items[1]  # type: ignore[union-attr]
        objects = _has_objects(field, 8)
        size = _itemsize(field)
        if type(offset) is not int or size is None:
            if objects:
                return f"an object field ({escape(name)}) whose offset or size is not a constant"
            continue
        if offset < 0 or type(elsize) is not int or offset + size > elsize:
            return (
                f"{'an object' if objects else 'a'} field ({escape(name)}) at bytes {offset} to "
                f"{offset + size} of a record of {escape(repr(elsize), 40)} bytes"
            )
        spans.append((offset, offset + size, objects, name))
    spans.sort(key=lambda span: span[:2])
    reach = reach_objects = -1  # the furthest end of the fields so far, and of the object fields
    reach_name = reach_objects_name = ""
    for start, end, objects, name in spans:
        if start < reach_objects or (objects and start < reach):
            other = reach_objects_name if start < reach_objects else reach_name
            return f"overlapping fields ({escape(other)} and {escape(name)}, at byte {start}), one of them of objects"
        if end > reach:
            reach, reach_name = end, name
        if objects and end > reach_objects:
            reach_objects, reach_objects_name = end, name
    return None


def _datetime_metadata(state: Tup) -> bool:
    """Whether a datetime dtype's state carries the unit numpy reads for it (a state without one
    crashed numpy): version 4, ending in ``(None or a dict, (unit, count, 1, 1))``."""
    items = state.items
    if len(items) != 9 or items[0] != 4 or type(items[8]) is not Tup or len(items[8].items) != 2:  # type: ignore[union-attr]
        return False
    unit = items[8].items[1]  # type: ignore[union-attr]
    # (the unit's bytes are a call to _codecs.encode under protocols 0 to 2: any value will do)
    return (
        type(unit) is Tup
        and len(unit.items) == 4  # type: ignore[union-attr]
        and all(type(n) is int for n in unit.items[1:])  # type: ignore[union-attr]
    )


def _subarray_problem(subarray: object, elsize: object) -> str | None:
    if type(subarray) is not Tup or len(subarray.items) != 2:  # type: ignore[union-attr]
        return "a subarray state that is not (base, shape)"
    base, shape = subarray.items  # type: ignore[union-attr]
    dims = shape.items if type(shape) is Tup else (shape,) if type(shape) is int else None  # type: ignore[union-attr]
    size = _itemsize(base)
    if dims is None or len(dims) > _MAX_DIMS or size is None or not all(type(n) is int and n >= 0 for n in dims):
        return "a subarray of objects whose base or shape is not a constant" if _has_objects(base, 8) else None
    count = math.prod(dims)
    if size * count != elsize:
        return f"a subarray of {count} items of {size} bytes in an item of {escape(repr(elsize), 40)} bytes"
    return None


def _label(value: object) -> str:
    return f"({escape(value)})" if type(value) is str else f"named by a {type(value).__name__}"


def _spec(args: object) -> str | None:
    """The type string a dtype was made from, without its byte order ("f8", "V16"), if constant."""
    spec = args.items[0] if type(args) is Tup and args.items else None  # type: ignore[union-attr]
    return spec.lstrip("<>|=") if type(spec) is str else None


def _spec_size(spec: str | None) -> int | None:
    """Bytes per item of a type string ("f8": 8, "U10": 40, "O": a pointer); None if it has none."""
    if not spec:
        return None
    if spec[0] == "O":
        return _POINTER
    digits = ""
    for ch in spec[1:]:
        if not ch.isdigit():
            break
        digits += ch
    if not digits or len(digits) > 18:
        return None
    return int(digits) * (4 if spec[0] == "U" else 1)


def _object_flags_problem(args: object, state: object) -> str | None:
    """A dtype state whose flags contradict what it holds. numpy gives every dtype that holds
    objects (made as "O", or with object fields or an object subarray base) NPY_ITEM_REFCOUNT,
    NPY_LIST_PICKLE, NPY_NEEDS_INIT and NPY_NEEDS_PYAPI, and no other dtype the first three
    object bits (NPY_ITEM_REFCOUNT, NPY_LIST_PICKLE, NPY_ITEM_IS_POINTER): numpy takes the flags as
    given, then reads raw bytes as object pointers or Python objects as raw bytes."""
    if type(state) is not Tup or len(state.items) < 8:  # type: ignore[union-attr]
        return None
    flags = state.items[7]  # type: ignore[union-attr]
    if type(flags) is not int:
        return "a state whose flags are not a constant integer"
    holds = _holds_objects(args, state, 8)
    if holds and flags & _OBJECT_FLAGS != _OBJECT_FLAGS:
        return "a state whose flags say the dtype holds no objects, though it does (numpy would take raw bytes as object pointers)"
    if not holds and flags & _OBJECT_BITS:
        return "a state whose flags say the dtype holds objects, though it holds none (numpy would take its raw bytes as object pointers)"
    return None


def _holds_objects(args: object, state: object, depth: int) -> bool:
    """Whether a dtype made with ``args`` and given ``state`` holds Python objects: made as "O", or
    (as far as the state shows) with an object field or an object subarray base."""
    if (_spec(args) or "")[:1] == "O":
        return True
    if type(state) is not Tup or len(state.items) < 5:  # type: ignore[union-attr]
        return False
    subarray, _, fields = state.items[2:5]  # type: ignore[union-attr]
    if type(subarray) is Tup and subarray.items and _has_objects(subarray.items[0], depth - 1):  # type: ignore[union-attr]
        return True
    return type(fields) is Dct and any(
        type(v) is Tup and v.items and _has_objects(v.items[0], depth - 1)  # type: ignore[union-attr]
        for _, v in fields.pairs  # type: ignore[union-attr]
    )


def _itemsize(dtype: object) -> int | None:
    """Bytes per item of a dtype the walk built from a type string ("<f8", "U10", "V16", "O")."""
    if type(dtype) is not Obj or dtype.site is None or dtype.site.qualname != "numpy.dtype":  # type: ignore[union-attr]
        return None
    return _spec_size(_spec(dtype.args))  # type: ignore[union-attr]


def _has_objects(dtype: object, depth: int) -> bool:
    """Whether a dtype the walk built (a numpy.dtype call, with the state it was given) holds
    Python objects; nested dtypes are followed ``depth`` levels deep."""
    if depth <= 0 or type(dtype) is not Obj or dtype.site is None or dtype.site.qualname != "numpy.dtype":  # type: ignore[union-attr]
        return False
    return _holds_objects(dtype.args, dtype.state, depth)  # type: ignore[union-attr]


class Semantics(Arguments):
    """Meaning of the object-building opcodes (a mixin: the walker supplies the state)."""

    hash_seen: dict[int, object]
    collisions: int
    # numpy dtypes and arrays made by a call and not yet built or taken into anything (id -> the
    # object, kept alive so that ids stay unique): those alone may take their one BUILD, as the
    # loader's BuildOnce allows. Empty nearly always: the walker tests it before calling _took.
    np_pending: dict[int, Obj]

    def note(self, code: str, offset: int, message: str, global_name: str | None = None) -> None:
        raise NotImplementedError

    def pickle(self, pos: int, name_proto: int | None, joblib: bool) -> tuple[int, object]:
        raise NotImplementedError

    def _call(self, func: object, args: object) -> Obj:
        """REDUCE: ``func(*args)``."""
        self._mark(args, Use.ARGUMENT)
        if type(func) is Glob and func.site is not None:
            site = func.site
            site.use(Use.CALLED)
            cls = site
            if site.module == "copyreg" and site.name in _FACTORY_NAMES and type(args) is Tup and args.items:
                first = args.items[0]
                if type(first) is Glob and first.site is not None:
                    first.site.use(Use.INSTANTIATED)
                    cls = first.site
            obj = Obj(site, cls, args)
            if site.name in _NUMPY_IN_PLACE_NAMES:
                self._made(obj)
            return obj
        return Obj(None, None, args)

    def _new(self, cls: object, args: object) -> Obj:
        """NEWOBJ / NEWOBJ_EX / OBJ / INST: an instance of ``cls``."""
        self._mark(args, Use.ARGUMENT)
        if type(cls) is Glob and cls.site is not None:
            cls.site.use(Use.INSTANTIATED)
            obj = Obj(cls.site, cls.site, args)
            if cls.site.name in _NUMPY_IN_PLACE_NAMES:
                self._made(obj)
            return obj
        return Obj(None, None, args)

    def _made(self, obj: Obj) -> None:
        if obj.site is not None and obj.site.qualname in _NUMPY_IN_PLACE:
            self.np_pending[id(obj)] = obj

    def _took(self, items: object) -> None:
        """``items`` went into a container, a call, a state or a persistent id: a numpy object
        among them may no longer take a BUILD (whatever holds it would see its state change)."""
        pending = self.np_pending
        for item in items if type(items) in (list, tuple) else (items,):  # type: ignore[union-attr]
            if type(item) is Obj:
                pending.pop(id(item), None)

    def _mark(self, value: object, use: Use) -> None:
        """Add ``use`` to every global found inside ``value`` (bounded: this runs per call)."""
        if type(value) is Tup:
            if not value.g:
                return
            # The common case, a flat argument tuple, without the work list.
            for v in value.items:
                t = type(v)
                if t is Glob:
                    if v.site is not None:
                        v.site.use(use)
                elif t in _NESTED:
                    break
            else:
                return
        todo = [value]
        budget = 256
        while todo and budget > 0:
            v = todo.pop()
            budget -= 1
            t = type(v)
            if t is Glob:
                if v.site is not None:  # type: ignore[union-attr]
                    v.site.use(use)  # type: ignore[union-attr]
            elif t is Tup or t is Lst or t is SetV:
                todo.extend(v.items[:budget])  # type: ignore[union-attr]
            elif t is Dct:
                for k, val in v.pairs[:budget]:  # type: ignore[union-attr]
                    todo.append(k)
                    todo.append(val)

    def _persistent(self, pid: object, offset: int) -> Pers:
        ids = self.result.persistent_ids
        if len(ids) >= MAX_PERSISTENT_IDS:
            raise Stop("SL203", offset, f"more than {MAX_PERSISTENT_IDS} persistent ids")
        folded = _flat_persistent_id(pid) if type(pid) is Tup else None
        if folded is None:
            self._mark(pid, Use.PERSISTENT_ID)
            folded = fold(pid, max_nodes=1000, max_depth=10)
        ids.append(PersistentIdSite(offset, folded))
        return Pers(pid)

    def _setitems(self, target: object, items: list[object]) -> None:
        t = type(target)
        if t is Dct:
            keys = items[::2]
            self._keys(keys)
            target.pairs.extend(zip(keys, items[1::2], strict=True))  # type: ignore[union-attr]
        elif t is Obj:
            if target.pairs is None:  # type: ignore[union-attr]
                target.pairs = []  # type: ignore[union-attr]
            target.pairs.extend(zip(items[::2], items[1::2], strict=True))  # type: ignore[union-attr]
        elif t is Lst:
            # list[i] = v works on a real list; keep the folded value faithful.
            lst = target.items  # type: ignore[union-attr]
            for k, v in zip(items[::2], items[1::2], strict=True):
                if isinstance(k, int) and -len(lst) <= k < len(lst):
                    lst[k] = v

    def _keys(self, keys: list[object]) -> None:
        """Count dict/set keys whose hashes an attacker can make collide (a replay would crawl)."""
        for k in keys:
            t = type(k)
            if t is str or t is bytes:
                continue
            if t is int and -_SMALL_INT < k < _SMALL_INT:  # type: ignore[operator]
                continue
            if t is not int and t is not float and t is not Tup:
                continue  # identity-hashed stubs, unhashables, randomized str/bytes
            value = fold(k, max_nodes=64, max_depth=20)
            try:
                h = hash(value)
            except TypeError:
                continue
            first = self.hash_seen.setdefault(h, value)
            if first is not value and first != value:
                self.collisions += 1

    def _numpy_state(self, obj: Obj, state: object, offset: int) -> None:
        """What the loader refuses and the walk can see: a second BUILD on one dtype or array; a
        first BUILD after the object went into a container, call or state (what holds it would see
        it change); a BUILD on a dtype made without numpy's copy flag (with copy=False,
        ``dtype(d, False, False)`` is ``d`` itself); a dtype state numpy would never make (another
        layout than its own, record parts on a kind that has none, see also _layout_problem and
        _object_flags_problem); an
        object array given more or fewer items than its shape holds."""
        site = obj.site
        assert site is not None
        fresh = self.np_pending.pop(id(obj), None) is not None
        dtype = site.qualname == "numpy.dtype"
        if obj.built > 1:
            why = "a second state to the same numpy object"
        elif not fresh:
            why = "a state to a numpy object already taken into a container, call or state (its holder sees it change)"
        elif dtype and not _copied(obj.args):
            why = "a state to a dtype made without numpy's copy flag (numpy may share it)"
        elif dtype and not _numpys_dtype_layout(state):
            why = "a dtype a state laid out as numpy never writes it (8 or 9 items, version 3 or 4)"
        elif dtype and (kind := _record_parts_of_plain_kind(obj.args, state)) is not None:
            why = f"fields or a subarray to a dtype of kind {escape(kind)}, which has none"
        elif dtype and (misplaced := _layout_problem(obj.args, state)) is not None:
            why = misplaced
        elif dtype and (flags := _object_flags_problem(obj.args, state)) is not None:
            why = flags
        elif not dtype and (count := _object_items_mismatch(state)) is not None:
            why = count
        else:
            return
        self.note("SL108", offset, f"BUILD gives {why}: numpy applies it unchecked", global_name=site.qualname)

    def _build(self, inst: object, state: object, offset: int) -> bool:
        """BUILD ``inst`` with ``state``; True when ``inst`` is a joblib array wrapper."""
        self._dunders(state, offset)
        t = type(inst)
        if t is Glob:
            site = inst.site  # type: ignore[union-attr]
            if site is not None:
                site.use(Use.BUILD_TARGET)
            name = site.qualname if site is not None else None
            self.note(
                "SL104",
                offset,
                "BUILD sets attributes on a class or function object itself (process-wide effect)",
                global_name=name,
            )
            return False
        if t is not Obj:
            return False
        obj: Obj = inst  # type: ignore[assignment]
        obj.built += 1
        if obj.site is not None and obj.site.qualname in _NUMPY_IN_PLACE:
            self._numpy_state(obj, state, offset)
        for s in (obj.site, obj.cls):
            if s is not None:
                s.use(Use.BUILD_TARGET)
        wrapper = obj.cls is not None and jl.is_wrapper(obj.cls.module, obj.cls.name)
        if not wrapper:
            obj.state = state
            return False
        # The wrapper has no __setstate__: its __dict__ takes the state dict (and slot state).
        attrs = obj.state if isinstance(obj.state, dict) else {}
        parts = state.items if type(state) is Tup and len(state.items) == 2 else (state,)  # type: ignore[union-attr]
        for part in parts:
            if part is None:
                continue
            if type(part) is not Dct:
                raise Stop("SL200", offset, "joblib array wrapper state is not a constant dict")
            for k, v in part.pairs:
                if type(k) is str:
                    attrs[k] = v
        obj.state = attrs
        return True

    def _dunders(self, state: object, offset: int) -> None:
        """SL104 when a BUILD state would set a dunder (or an unknowable) attribute."""
        parts = state.items if type(state) is Tup and len(state.items) == 2 else (state,)  # type: ignore[union-attr]
        for part in parts:
            t = type(part)
            if t is Dct:
                pairs = part.pairs  # type: ignore[union-attr]
            elif t is Obj and part.pairs:  # type: ignore[union-attr]
                pairs = part.pairs  # type: ignore[union-attr]
            else:
                continue
            for k, _ in pairs:
                if type(k) is str:
                    if len(k) > 4 and k.startswith("__") and k.endswith("__"):
                        self.note("SL104", offset, f"BUILD state sets {escape(k)}")
                elif not isinstance(k, (int, float, bytes, bool)) and k is not None:
                    self.note("SL104", offset, f"BUILD state has a non-constant key ({self._describe(k)})")

    def _array(self, wrapper: Obj, pos: int, offset: int, proto: int) -> int:
        """Skip what joblib reads after a wrapper BUILD; returns the offset where opcodes resume."""
        attrs = wrapper.state if isinstance(wrapper.state, dict) else {}
        folded = {k: fold(v, max_nodes=1000, max_depth=10) for k, v in attrs.items() if k != "dtype"}
        dtype = attrs.get("dtype")
        info: tuple[int, bool] | str
        if type(dtype) is Obj and dtype.site is not None and dtype.site.qualname in jl.DTYPE_NAMES:
            args = dtype.args
            spec = args.items[0] if type(args) is Tup and args.items else None
            info = jl.dtype_info(spec, fold(dtype.state, max_nodes=1000, max_depth=10))
        else:
            info = "wrapper dtype is not a constant numpy.dtype"
        read = jl.array_read(folded, info)
        if isinstance(read, str):
            raise Stop("SL200", offset, f"joblib array bytes cannot be located: {read}")
        if read.pickled:
            # joblib reads object arrays with a fresh pure-Python unpickler whose find_class is the
            # outer one's (so the outer protocol decides the Python 2 name mapping).
            end, _ = self.pickle(pos, proto, False)
            return end
        if read.padded:
            if pos >= self.n:
                raise self._truncated(offset)
            pos += 1 + self.buf[pos]
        end = pos + read.nbytes
        if end > self.n:
            raise Stop("SL200", offset, f"joblib array data ({read.nbytes} bytes) runs past the end")
        return end

    def _dynamic(self, module: object, name: object, offset: int) -> None:
        m = module if type(module) is str else None
        nm = name if type(name) is str else None
        shown = f"{m if m is not None else '?'}.{nm if nm is not None else '?'}"
        self.note(
            "SL102",
            offset,
            f"STACK_GLOBAL with operands that are not constant strings: module {self._describe(module)}, "
            f"name {self._describe(name)}",
            global_name=shown,
        )

    @staticmethod
    def _describe(v: object) -> str:
        t = type(v)
        if t is str:
            return repr(escape(v, 80))
        if t is Glob:
            site = v.site  # type: ignore[union-attr]
            return f"the global {escape(site.qualname)}" if site is not None else "an unresolved global"
        if t is Obj:
            site = v.site  # type: ignore[union-attr]
            return (
                f"the result of {escape(site.qualname)}(...)" if site is not None else "the result of a call"
            )
        if t is Pers:
            return "a persistent-load result"
        if t is Opaque:
            return f"opaque {v.kind}"  # type: ignore[union-attr]
        if t in (Tup, Lst, Dct, SetV):
            return f"a {t.__name__.lower()}"
        return f"a {t.__name__} constant {escape(repr(v), 40)}"


def _flat_persistent_id(pid: Tup) -> tuple[object, ...] | None:
    """What ``_mark`` and ``fold`` make of a flat persistent id (torch's: constants and a storage
    class), in one pass over it: a checkpoint has one per tensor. None when it holds anything else
    (the globals seen so far are marked again by ``_mark``, which changes nothing)."""
    out: list[object] = []
    for x in pid.items:
        t = type(x)
        if t is Glob:
            site = x.site  # type: ignore[attr-defined]
            if site is None:
                out.append(UNKNOWN)
            else:
                site.use(Use.PERSISTENT_ID)
                out.append(site)
        elif t in _CONST_TYPES:
            out.append(x)
        else:
            return None
    return tuple(out)
