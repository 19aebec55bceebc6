"""The restricted unpickler: the scanned bytes, names through the policy, torch's rules for opcodes.

``find_class`` is the gate. It maps a name the way CPython does (Python 2 names for protocol < 3),
refuses it unless the scan reported it for this stream (anything else means the scanner and the
unpickler disagree: an internal error, the load fails), then asks the Resolver, which checks the
policy (floor first) and hands back the allowed object or a backend's validating stand-in.
``persistent_load`` is the format's own function; streams whose format defines no ids refuse them.

The opcodes that act on objects follow torch's ``_weights_only_unpickler``, generalized from its
fixed list to the policy: REDUCE calls, and NEWOBJ/OBJ construct, only a global the gate handed
out (never an object a call returned: a module instance's ``__call__`` does not run); BUILD only
an instance of a class the gate handed out (never a class, function or module: that would change
it for the whole process); SETITEM only dicts, APPEND only lists (and deques), ADDITEMS only sets,
and none of them an allowed global itself (CVE-2026-24747: SETITEM on a tensor wrote through a
storage smaller than it claimed).
CPython's C unpickler applies these opcodes to whatever is on its stack and has no hook to refuse
them, so this is the pure-Python unpickler (``pickle._Unpickler``) with those handlers replaced; it
reads the same bytes, and anything it parsed differently from the scan could only reach globals
the scan reported and the policy allows. A snapshot of every global handed out, compared after the
load, backs the opcode rules up.
"""

from __future__ import annotations

import collections
import io
import pickle
import types
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from safeload.analysis.text_numbers import float_arg, int_arg, long_arg
from safeload.errors import InternalLoaderError, LoadError, SafeloadError, UnsafeModelError
from safeload.loader.array_state import BuildOnce, build_state_problem
from safeload.loader.resolve import Resolver, map_name
from safeload.loader.storages import Where
from safeload.text import escape

PersistentLoad = Callable[[object], object]

# Keyword arguments pickle.Unpickler takes (torch.load passes its **pickle_load_args on to it).
UNPICKLER_ARGS = frozenset({"encoding", "errors", "fix_imports", "buffers"})
_IMMUTABLE_TYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: attributes cannot be set


class Guarded:
    """A callable stand-in for an allowed function: calls through, refuses to be mutated.

    Backends hand these out for the functions they validate; the opcode rules already keep
    BUILD/SETITEM/APPEND away from globals, and this keeps the wrapper inert should any path reach it.
    """

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self._fn = fn
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def _refuse(self, *_: object) -> None:
        raise UnsafeModelError(
            f"refusing to load: the pickle tries to modify the allowed function {self._name}"
        )

    __setstate__ = _refuse
    __setitem__ = _refuse
    append = _refuse
    extend = _refuse
    add = _refuse

    def __repr__(self) -> str:
        return f"<safeload guarded {self._name}>"


class GlobalsGuard:
    """Snapshots of the process-global objects handed to the unpickler, checked after the load."""

    def __init__(self) -> None:
        self._snapshots: list[tuple[object, object]] = []
        self._seen: set[int] = set()

    def record(self, obj: object) -> None:
        if id(obj) in self._seen:
            return
        self._seen.add(id(obj))
        snap = _snapshot(obj)
        if snap is not None:
            self._snapshots.append((obj, snap))

    def verify(self, where: Where) -> None:
        changed = [obj for obj, snap in self._snapshots if _snapshot(obj) != snap]
        for obj, snap in self._snapshots:
            _restore(obj, snap)
        if changed:
            names = ", ".join(escape(getattr(o, "__qualname__", type(o).__name__)) for o in changed[:5])
            raise UnsafeModelError(
                f"refusing to load: the pickle modified allowed global objects ({names}); they were restored",
                path=where.path,
                member=where.member,
            )


class _Same:
    """Compares by identity, so a snapshot notices any replaced value (not just unequal ones)."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


def _snapshot(obj: object) -> object:
    if isinstance(obj, type):
        if obj.__flags__ & _IMMUTABLE_TYPE:
            return None
        return ("type", {k: _Same(v) for k, v in vars(obj).items()})
    if isinstance(obj, types.ModuleType):
        return ("module", {k: _Same(v) for k, v in vars(obj).items()})
    if isinstance(obj, types.FunctionType):
        return (
            "function",
            {k: _Same(v) for k, v in vars(obj).items()},
            _Same(obj.__defaults__),
            _Same(obj.__kwdefaults__),
            _Same(obj.__code__),
        )
    if type(obj) in (dict, list, set, bytearray):
        return ("container", _copy_container(obj))
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        try:
            return ("instance", {k: _Same(v) for k, v in vars(obj).items()})
        except TypeError:
            return None
    return None


def _copy_container(obj: Any) -> object:
    if isinstance(obj, dict):
        return [(_Same(k), _Same(v)) for k, v in obj.items()]
    if isinstance(obj, bytearray):
        return bytes(obj)
    return [_Same(v) for v in obj]


def _restore(obj: Any, snap: Any) -> None:
    """Put back what a snapshot saw; best effort, the load fails anyway."""
    kind = snap[0]
    try:
        if kind in ("type", "module", "instance", "function"):
            saved = {k: v.obj for k, v in snap[1].items()}
            for key in set(vars(obj)) - set(saved):
                delattr(obj, key)
            for key, value in saved.items():
                if vars(obj).get(key, _MISSING) is not value:
                    setattr(obj, key, value)
            if kind == "function":
                obj.__defaults__, obj.__kwdefaults__, obj.__code__ = snap[2].obj, snap[3].obj, snap[4].obj
        elif kind == "container":
            if isinstance(obj, dict):
                obj.clear()
                obj.update((k.obj, v.obj) for k, v in snap[1])
            elif isinstance(obj, bytearray):
                obj[:] = snap[1]
            elif isinstance(obj, list):
                obj[:] = [v.obj for v in snap[1]]
            else:
                obj.clear()
                obj.update(v.obj for v in snap[1])
    except (AttributeError, TypeError):
        pass


_MISSING = object()


class Gate(msgspec.Struct):
    """What find_class needs for one stream: the policy resolver and the scan's view of the stream."""

    resolver: Resolver
    scanned: Mapping[str, int | None]  # qualified names the scan reported -> first offset
    where: Where
    fix_imports: bool = True
    guard: GlobalsGuard = msgspec.field(default_factory=GlobalsGuard)
    handed_out: dict[int, object] = msgspec.field(default_factory=dict)

    def find(self, module: object, name: object, proto: int) -> object:
        if type(module) is not str or type(name) is not str:
            raise InternalLoaderError("global with a non-string module or name", path=self.where.path)
        module, name = map_name(module, name, proto, self.fix_imports)
        qualname = f"{module}.{name}"
        if qualname not in self.scanned:
            raise InternalLoaderError(
                f"the unpickler met global {escape(qualname)}, which the scan did not report for this stream; "
                "refusing to load (please report this as a safeload bug)",
                path=self.where.path,
                member=self.where.member,
                global_name=qualname,
            )
        obj = self.resolver.resolve(qualname, member=self.where.member, offset=self.scanned[qualname])
        self.guard.record(obj)
        self.handed_out[id(obj)] = obj
        return obj

    def is_global(self, obj: object) -> bool:
        """Whether obj is an object find_class handed out during this load."""
        return self.handed_out.get(id(obj)) is obj

    def is_instance_of_allowed(self, obj: object) -> bool:
        """Whether obj is an instance (not a class, module or function) of a class handed out.

        ``object`` does not count: everything is an instance of it. Subclasses do (numpy's
        ``dtype("O")`` is a ``numpy.dtypes.ObjectDType``).
        """
        if isinstance(obj, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, Guarded)):
            return False
        if self.is_global(type(obj)):
            return True
        return any(
            isinstance(cls, type) and cls is not object and isinstance(obj, cls)
            for cls in self.handed_out.values()
        )


def _taking(base: Callable[[Any], None], count: int | None) -> Callable[[Any], None]:
    """``base`` (a container opcode of pickle's unpickler), after marking the items it takes from
    the stack (its last ``count``, or all since the MARK) as no longer waiting for a BUILD."""

    def handler(self: RestrictedUnpickler) -> None:
        if self._builds.pending:
            self._builds.taken(self.stack if count is None else self.stack[-count:])
        base(self)

    return handler


def _require(ok: bool, message: str) -> None:
    """A malformed stream the C unpickler refuses (pickle.py would go on)."""
    if not ok:
        raise TypeError(f"{message} (pickle.load refuses it too)")


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """pickle's pure-Python unpickler with the gate and torch's opcode rules."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(
        self,
        file: io.BytesIO,
        *,
        gate: Gate,
        persistent: PersistentLoad | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(file, **kwargs)
        self._gate = gate
        self._persistent = persistent
        self._file = file
        self._builds = BuildOnce()

    def find_class(self, module: str, name: str) -> Any:
        return self._gate.find(module, name, self.proto)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise self._refuse("persistent id in a stream whose format defines none")
        if self._builds.pending:
            self._builds.taken([pid])
        return self._persistent(pid)

    # -- torch's opcode rules ------------------------------------------------------------------------

    def _refuse(self, what: str) -> UnsafeModelError:
        return UnsafeModelError(
            f"refusing to load: {what}",
            path=self._gate.where.path,
            member=self._gate.where.member,
            offset=max(0, self._file.tell() - 1),
        )

    def _callable(self, func: object, op: str) -> None:
        if not self._gate.is_global(func):
            raise self._refuse(f"{op} on {_kind(func)}, which is not a global the policy allowed")

    def _instance_of_allowed_type(self, inst: object, op: str) -> None:
        if self._gate.is_global(inst) or not self._gate.is_instance_of_allowed(inst):
            raise self._refuse(f"{op} on {_kind(inst)}; only instances of allowed classes take a state")

    def _container(self, target: object, kinds: tuple[type, ...], op: str) -> None:
        if self._gate.is_global(target):
            raise self._refuse(
                f"{op} on an allowed global itself ({_kind(target)}): it would change it for the process"
            )
        if not isinstance(target, kinds) or not (type(target) in kinds or self._gate.is_global(type(target))):
            names = "/".join(k.__name__ for k in kinds)
            raise self._refuse(f"{op} on {_kind(target)}; only {names} objects take it")

    # Protocol 0 numbers as the C unpickler (pickle.load, torch.load) reads them, not pickle.py.
    def _text_number(self, parse: Callable[[bytes], object], what: str) -> None:
        line = self.readline()
        value = parse(line[:-1] if line.endswith(b"\n") else line)
        if value is None:
            raise ValueError(f"could not convert string to {what}")
        self.append(value)

    def load_int(self) -> None:
        self._text_number(int_arg, "int")

    def load_long(self) -> None:
        self._text_number(long_arg, "int")

    def load_float(self) -> None:
        self._text_number(float_arg, "float")

    # Calls: what they are given is taken (see BuildOnce); what they make may take one BUILD.
    # Arguments must be a tuple (and keywords a dict) as the C unpickler requires.
    def load_reduce(self) -> None:
        self._callable(self.stack[-2], "REDUCE")
        _require(type(self.stack[-1]) is tuple, "REDUCE arguments are not a tuple")
        if self._builds.pending:
            self._builds.taken(self.stack[-1:])
        pickle._Unpickler.load_reduce(self)  # type: ignore[attr-defined]
        self._builds.made(self.stack)

    def load_newobj(self) -> None:
        self._callable(self.stack[-2], "NEWOBJ")
        _require(type(self.stack[-1]) is tuple, "NEWOBJ expected an arg tuple")
        if self._builds.pending:
            self._builds.taken(self.stack[-1:])
        pickle._Unpickler.load_newobj(self)  # type: ignore[attr-defined]
        self._builds.made(self.stack)

    def load_newobj_ex(self) -> None:
        self._callable(self.stack[-3], "NEWOBJ_EX")
        _require(type(self.stack[-2]) is tuple, "NEWOBJ_EX args argument must be a tuple")
        _require(type(self.stack[-1]) is dict, "NEWOBJ_EX kwargs argument must be a dict")
        if self._builds.pending:
            self._builds.taken(self.stack[-2:])
        pickle._Unpickler.load_newobj_ex(self)  # type: ignore[attr-defined]
        self._builds.made(self.stack)

    def load_obj(self) -> None:
        self._callable(self.stack[0] if self.stack else None, "OBJ")
        if self._builds.pending:
            self._builds.taken(self.stack)
        pickle._Unpickler.load_obj(self)  # type: ignore[attr-defined]
        self._builds.made(self.stack)

    def load_inst(self) -> None:
        if self._builds.pending:
            self._builds.taken(self.stack)
        pickle._Unpickler.load_inst(self)  # type: ignore[attr-defined]
        self._builds.made(self.stack)

    def load_build(self) -> None:
        self._instance_of_allowed_type(self.stack[-2], "BUILD")
        if self._builds.pending:
            self._builds.taken(self.stack[-1:])
        problem = self._builds.problem(self.stack[-2]) or build_state_problem(self.stack[-2], self.stack[-1])
        if problem is not None:
            raise self._refuse(f"BUILD with a state that numpy or torch would take unchecked: {problem}")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    # Containers: their items are taken. MARK starts a new ``self.stack``: those ops take all of it.
    load_tuple = _taking(pickle._Unpickler.load_tuple, None)  # type: ignore[attr-defined]
    load_tuple1 = _taking(pickle._Unpickler.load_tuple1, 1)  # type: ignore[attr-defined]
    load_tuple2 = _taking(pickle._Unpickler.load_tuple2, 2)  # type: ignore[attr-defined]
    load_tuple3 = _taking(pickle._Unpickler.load_tuple3, 3)  # type: ignore[attr-defined]
    load_list = _taking(pickle._Unpickler.load_list, None)  # type: ignore[attr-defined]
    load_dict = _taking(pickle._Unpickler.load_dict, None)  # type: ignore[attr-defined]
    load_frozenset = _taking(pickle._Unpickler.load_frozenset, None)  # type: ignore[attr-defined]

    def load_setitem(self) -> None:
        self._container(self.stack[-3], (dict,), "SETITEM")
        if self._builds.pending:
            self._builds.taken(self.stack[-2:])
        pickle._Unpickler.load_setitem(self)  # type: ignore[attr-defined]

    def load_setitems(self) -> None:
        self._container(self.metastack[-1][-1], (dict,), "SETITEMS")
        if self._builds.pending:
            self._builds.taken(self.stack)
        pickle._Unpickler.load_setitems(self)  # type: ignore[attr-defined]

    def load_append(self) -> None:
        self._container(self.stack[-2], _LISTS, "APPEND")
        if self._builds.pending:
            self._builds.taken(self.stack[-1:])
        pickle._Unpickler.load_append(self)  # type: ignore[attr-defined]

    def load_appends(self) -> None:
        self._container(self.metastack[-1][-1], _LISTS, "APPENDS")
        if self._builds.pending:
            self._builds.taken(self.stack)
        pickle._Unpickler.load_appends(self)  # type: ignore[attr-defined]

    def load_additems(self) -> None:
        self._container(self.metastack[-1][-1], (set,), "ADDITEMS")
        if self._builds.pending:
            self._builds.taken(self.stack)
        pickle._Unpickler.load_additems(self)  # type: ignore[attr-defined]

    dispatch[pickle.INST[0]] = load_inst
    dispatch[pickle.TUPLE[0]] = load_tuple
    dispatch[pickle.TUPLE1[0]] = load_tuple1
    dispatch[pickle.TUPLE2[0]] = load_tuple2
    dispatch[pickle.TUPLE3[0]] = load_tuple3
    dispatch[pickle.LIST[0]] = load_list
    dispatch[pickle.DICT[0]] = load_dict
    dispatch[pickle.FROZENSET[0]] = load_frozenset
    dispatch[pickle.INT[0]] = load_int
    dispatch[pickle.LONG[0]] = load_long
    dispatch[pickle.FLOAT[0]] = load_float
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.OBJ[0]] = load_obj
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems


_LISTS = (list, collections.deque)


def _kind(obj: object) -> str:
    if isinstance(obj, type):
        return f"the class {escape(obj.__qualname__)}"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, Guarded)):
        return "a function"
    if isinstance(obj, types.ModuleType):
        return "a module"
    return f"a {escape(type(obj).__qualname__)} object"


def check_args(pickle_args: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(pickle_args) - UNPICKLER_ARGS
    if unknown:
        raise TypeError(f"unexpected keyword arguments for the unpickler: {', '.join(sorted(unknown))}")
    return dict(pickle_args)


def run(
    file: io.BytesIO,
    *,
    gate: Gate,
    persistent: PersistentLoad | None,
    pickle_args: Mapping[str, Any],
    unpickler: Callable[..., RestrictedUnpickler] | None = None,
) -> object:
    """Unpickle one pickle from `file` (at its current position); every failure is a SafeloadError."""
    args = check_args(pickle_args)
    gate.fix_imports = bool(args.get("fix_imports", True))
    make = unpickler or RestrictedUnpickler
    try:
        try:
            result = make(file, gate=gate, persistent=persistent, **args).load()
        finally:
            gate.guard.verify(gate.where)
    except SafeloadError:
        raise
    except (pickle.UnpicklingError, EOFError) as exc:
        raise InternalLoaderError(
            f"the unpickler failed on bytes the scan parsed: {type(exc).__name__}: {escape(str(exc))}",
            path=gate.where.path,
            member=gate.where.member,
        ) from exc
    except (RecursionError, MemoryError) as exc:
        raise LoadError(
            f"rebuilding the object exhausted resources: {type(exc).__name__}",
            path=gate.where.path,
            member=gate.where.member,
        ) from exc
    except Exception as exc:
        raise LoadError(
            f"rebuilding the object failed: {type(exc).__name__}: {escape(str(exc))}",
            path=gate.where.path,
            member=gate.where.member,
        ) from exc
    return result
