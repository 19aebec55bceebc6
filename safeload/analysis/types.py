"""What the opcode walker reports about one stream. Knows nothing of policy."""

from __future__ import annotations

import functools

import msgspec

from safeload.model import Use


@functools.lru_cache(maxsize=64)
def _with_use(uses: frozenset[Use], how: Use) -> frozenset[Use]:
    return uses | {how}  # a handful of combinations, each built once


_REFERENCED: frozenset[Use] = frozenset({Use.REFERENCED})


class ImportSite(msgspec.Struct):  # up to 200,000 per stream: no __dict__, a third less memory apiece
    module: str  # after the Python 2 name mapping (protocol < 3)
    name: str  # may be dotted (protocol 4 walks attributes)
    offset: int  # byte offset of the opcode inside the stream
    opcode: str  # GLOBAL, STACK_GLOBAL, INST, EXT1, ...
    # Shared, never mutated: most sites are only referenced, and a set apiece was two thirds of a
    # hostile stream's 200,000 sites' memory. ``use`` records more.
    uses: frozenset[Use] = _REFERENCED
    # The (module, name) as written in the stream, when the Python 2 mapping changed it.
    raw: tuple[str, str] | None = None

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def use(self, how: Use) -> None:
        if how not in self.uses:
            self.uses = _with_use(self.uses, how)


class Anomaly(msgspec.Struct, frozen=True):
    code: str  # a code from safeload.codes (SL102, SL104, SL107, SL200, SL201, SL202, SL203, ...)
    offset: int
    message: str
    global_name: str | None = None


class PersistentIdSite(msgspec.Struct):  # one per tensor of a legacy checkpoint
    offset: int
    value: object  # constant-folded Python value (tuples/str/int/...), or UNKNOWN where not constant


class _Unknown:
    """A value the walker cannot know statically (the result of a call, a dynamic lookup...)."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = _Unknown()


class WalkResult(msgspec.Struct):
    imports: list[ImportSite] = msgspec.field(default_factory=list)
    anomalies: list[Anomaly] = msgspec.field(default_factory=list)
    persistent_ids: list[PersistentIdSite] = msgspec.field(default_factory=list)
    protocol: int | None = None
    opcodes: int = 0
    pickles: int = 0  # complete pickles (STOP reached)
    end: int = 0  # offset just after the last STOP reached (bytes consumed)
    complete: bool = False  # every byte was parsed as complete pickles
    # Constant-folded value each complete pickle returned (UNKNOWN where not constant): readers of
    # small structural pickles (legacy torch magic number, storage keys) use it without unpickling.
    values: list[object] = msgspec.field(default_factory=list)
    # Why replaying this stream through CPython's unpickler could hang or crash the process (deep
    # tuples hashed recursively, crafted hash collisions); None when a replay is safe.
    replay_hazard: str | None = None
    frames: int = 0  # FRAME opcodes walked (readers of one stream can differ only at a FRAME)
    # (offset, length) of large byte payloads outside frames, in stream order: the replay skips
    # exactly these regions instead of copying them.
    payloads: list[tuple[int, int]] = msgspec.field(default_factory=list)

    def up_to_stop(self) -> WalkResult:
        """This walk of some bytes, reaching its first pickle's STOP, as the walk of exactly that
        pickle: the same but for the note about the bytes after it (read as what they are)."""
        anomalies = [a for a in self.anomalies if not (a.code == "SL201" and a.offset == self.end)]
        complete = not any(a.code in ("SL200", "SL203", "SL207") for a in anomalies)
        return self.replaced(anomalies=anomalies, complete=complete, values=[])

    def with_own_anomalies(self) -> WalkResult:
        """A shallow copy whose anomaly list can grow without changing this one's."""
        return self.replaced(anomalies=list(self.anomalies))

    def replaced(self, **changes: object) -> WalkResult:
        """A shallow copy with ``changes``."""
        return msgspec.structs.replace(self, **changes)

    @property
    def import_keys(self) -> list[tuple[str, str]]:
        return [(i.module, i.name) for i in self.imports]
