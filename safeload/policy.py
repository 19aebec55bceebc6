"""Policies as data: which globals a pickle may import, read from TOML files in ``rules/``.

A policy is an immutable value built from a built-in TOML file or a user's file (which may extend
built-in ones) plus names passed at the call site. The floor (``rules/floor.toml``) is checked first
and no policy, ``allow=`` name, wildcard or waiver can lift it. This module never imports, resolves
or calls a name it reads: names are strings compared with strings.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from datetime import date
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from safeload.errors import PolicyError
from safeload.limits import Limits
from safeload.text import escape

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "Decision",
    "Floor",
    "FloorHit",
    "Policy",
    "Waiver",
    "builtin_policy_names",
    "floor",
    "load_policy",
    "policy_to_toml",
]

FLOOR_FILE = "floor.toml"
# Each built-in file's sha256 and content as the tests validated them (see Manifest).
MANIFEST_FILE = "validated.json"
ALLOW_SOURCE = "allow="
# A policy file is a short, hand-written text; anything larger is a mistake or an attack on the reader.
MAX_POLICY_BYTES = 4 << 20
_WILDCARD = ".*"


# -- file content ----------------------------------------------------------------------------------


class AllowEntry(msgspec.Struct, frozen=True):
    global_: str
    reason: str
    unsafe_wildcard: bool = False


class WaiveEntry(msgspec.Struct, frozen=True):
    sha256: str
    code: str
    global_: str | None
    reason: str
    expires: date


class PolicyFile(msgspec.Struct, frozen=True):
    """A policy file's content, valid (checked by safeload.policy_files, or known to be)."""

    name: str | None
    description: str
    extends: tuple[str, ...]
    limits: dict[str, int]  # the fields of Limits the file sets
    allow: tuple[AllowEntry, ...]
    waive: tuple[WaiveEntry, ...]


class FloorFile(msgspec.Struct, frozen=True):
    modules: dict[str, str]
    names: dict[str, str]
    attributes: dict[str, str]


# -- values --------------------------------------------------------------------------------------------


class Decision(msgspec.Struct, frozen=True):
    allowed: bool
    on_floor: bool
    reason: str  # the allow entry's reason / why it is on the floor / "not in policy NAME"
    source: str | None  # the policy file (or "allow=") that decided; "floor.toml" for the floor


class Waiver(msgspec.Struct, frozen=True):
    sha256: str
    code: str
    global_name: str | None  # None: every finding of `code` in that file
    reason: str
    expires: date


class FloorHit(msgspec.Struct, frozen=True):
    entry: str  # the floor entry that matched ("os", "builtins.eval", "__globals__")
    kind: Literal["module", "name", "attribute"]
    reason: str

    def describe(self) -> str:
        return f"{self.kind} {self.entry} is on the floor: {self.reason}"


class Floor(msgspec.Struct, frozen=True, eq=False):
    """Modules (prefix match), names (the object and attributes below it) and attribute segments."""

    modules: Mapping[str, str]
    names: Mapping[str, str]
    attributes: Mapping[str, str]
    digest: str

    def hit(self, qualname: str) -> FloorHit | None:
        segments = qualname.split(".")
        for i in range(1, len(segments) + 1):
            prefix = ".".join(segments[:i])
            if prefix in self.modules:
                return FloorHit(prefix, "module", self.modules[prefix])
            if prefix in self.names:
                return FloorHit(prefix, "name", self.names[prefix])
        # Protocol 4 walks attributes from the module it imports: an innocent module is only the
        # door (torch.serialization.os.system), so attribute segments count wherever they appear.
        for segment in segments[1:]:
            if segment in self.attributes:
                return FloorHit(segment, "attribute", self.attributes[segment])
        return None

    def covers(self, qualname: str) -> bool:
        return self.hit(qualname) is not None

    def wildcard_conflict(self, prefix: str) -> FloorHit | None:
        """A module wildcard may neither sit inside the floor nor cover a floor entry."""
        inside = self.hit(prefix)
        if inside is not None:
            return inside
        below = prefix + "."
        for entry, reason in self.modules.items():
            if entry.startswith(below):
                return FloorHit(entry, "module", reason)
        for entry, reason in self.names.items():
            if entry.startswith(below):
                return FloorHit(entry, "name", reason)
        return None


def _is_qualname(name: str) -> bool:
    segments = name.split(".")
    return len(segments) >= 2 and all(s.isidentifier() for s in segments)


_DECISION_CACHE = 4096


class Policy(msgspec.Struct, frozen=True, eq=False):
    """A resolved policy. Immutable; equal and hashable by content (``hash``)."""

    name: str
    description: str
    allowed: frozenset[str]  # exact qualified names after extends; never a floor name
    reasons: Mapping[str, str]  # name (or "prefix.*") -> reason
    limits: Limits
    waivers: tuple[Waiver, ...]
    sources: tuple[str, ...]  # files it was built from, in resolution order
    hash: str  # sha256 hex of the canonical content (name, entries, reasons, limits, waivers, floor)
    wildcards: frozenset[str] = frozenset()  # module prefixes allowed with unsafe_wildcard = true
    # name (or "prefix.*") -> the file that allowed it, or "allow=" for call-site names
    origins: Mapping[str, str] = msgspec.field(default_factory=lambda: MappingProxyType({}))
    floor: Floor | None = None
    # (source, sha256 of the bytes parsed) for every file in `sources`: what a replayed audit
    # report (audit_memo) checks the files against, without loading the policy.
    source_digests: tuple[tuple[str, str], ...] = ()
    # Decisions already made (a policy serves many files naming the same few globals). Bounded:
    # names come from files, and a hostile one can name a million distinct globals.
    _decided: dict[str, Decision] = msgspec.field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Policy):
            return NotImplemented
        return self.hash == other.hash

    def __hash__(self) -> int:
        return int(self.hash[:16], 16)

    def _floor(self) -> Floor:
        return self.floor if self.floor is not None else floor()

    def decide(self, qualname: str) -> Decision:
        known = self._decided.get(qualname)
        if known is not None:
            return known
        decision = self._decide(qualname)
        if len(self._decided) < _DECISION_CACHE:
            self._decided[qualname] = decision
        return decision

    def _decide(self, qualname: str) -> Decision:
        hit = self._floor().hit(qualname)
        if hit is not None:
            return Decision(False, True, hit.describe(), FLOOR_FILE)
        if qualname in self.allowed:
            return Decision(True, False, self.reasons[qualname], self.origins.get(qualname))
        wildcard = self._wildcard_for(qualname)
        if wildcard is not None:
            return Decision(True, False, self.reasons[wildcard], self.origins.get(wildcard))
        return Decision(False, False, f"not in policy {self.name}", None)

    def _wildcard_for(self, qualname: str) -> str | None:
        if not self.wildcards:
            return None
        segments = qualname.split(".")
        for i in range(len(segments) - 1, 0, -1):
            key = ".".join(segments[:i]) + _WILDCARD
            if key in self.wildcards:
                return key
        return None

    def remedy(self, qualname: str) -> str:
        """What a user can do about a refusal of `qualname`: the exact policy entry, with its risk."""
        shown = escape(qualname)
        hit = self._floor().hit(qualname)
        if hit is not None:
            return (
                f"none: {shown} cannot be allowed ({hit.describe()}). The file is very likely "
                "malicious; do not load it."
            )
        if not _is_qualname(qualname):
            return (
                f"none: {shown} is not a Python qualified name, so no policy entry can allow it; "
                "real serializers never write such a name."
            )
        base = self.name if self.name in builtin_policy_names() else "default"
        return (
            "if you trust this file's source, add to your policy file:\n"
            "[[allow]]\n"
            f"global = {_toml_str(qualname)}\n"
            f'reason = "trusted: say why you trust {qualname} and this file\'s source"\n'
            f'(a policy file starts with schema_version = 1 and extends = ["{base}"]; use it with '
            '--policy FILE or policy="FILE"), '
            f'or pass `--allow {qualname}` to `safeload scan`, or allow=["{qualname}"] to '
            "safeload.load/scan. Why it may be unsafe: unpickling imports the module that defines "
            "it (running that module's top-level code) and may call it with arguments taken from "
            "the file (calling a class runs its __new__/__init__, and BUILD its __setstate__)."
        )

    def with_allowed(self, names: Iterable[str]) -> Policy:
        """A new policy that also allows `names` (exact names only; floor names are refused)."""
        if isinstance(names, str):
            raise PolicyError("allow= takes a list of qualified names, not one string")
        fl = self._floor()
        added: dict[str, str] = {}
        for name in names:
            if not isinstance(name, str):
                raise PolicyError(f"allow= names must be strings, got {type(name).__name__}")
            problem = _name_problem(name, fl, wildcard_ok=False)
            if problem is not None:
                raise PolicyError(f"allow={escape(name)}: {problem}", global_name=name)
            if name not in self.allowed:
                added[name] = "allowed by the caller (allow=)"
        if not added:
            return self
        reasons = {**self.reasons, **added}
        origins = {**self.origins, **dict.fromkeys(added, ALLOW_SOURCE)}
        return _make_policy(
            name=f"{self.name}+allow",
            description=self.description,
            allowed=self.allowed.union(added),
            wildcards=self.wildcards,
            reasons=reasons,
            origins=origins,
            limits=self.limits,
            waivers=self.waivers,
            sources=self.sources,
            fl=fl,
            source_digests=self.source_digests,
        )

    def waiver_for(
        self, sha256: str, code: str, global_name: str | None, today: date | None = None
    ) -> Waiver | None:
        """The unexpired waiver covering this finding of this file, if any. Never for the floor."""
        if code == "SL100" or (global_name is not None and self._floor().covers(global_name)):
            return None
        day = today or date.today()
        digest = sha256.lower()
        for waiver in self.waivers:
            if waiver.sha256 != digest or waiver.code != code or day > waiver.expires:
                continue
            if waiver.global_name is None or waiver.global_name == global_name:
                return waiver
        return None


def _make_policy(
    *,
    name: str,
    description: str,
    allowed: Iterable[str],
    wildcards: Iterable[str],
    reasons: Mapping[str, str],
    origins: Mapping[str, str],
    limits: Limits,
    waivers: Iterable[Waiver],
    sources: Iterable[str],
    fl: Floor,
    source_digests: Iterable[tuple[str, str]] = (),
) -> Policy:
    allowed_set = frozenset(allowed)
    wildcard_set = frozenset(wildcards)
    waiver_tuple = tuple(sorted(waivers, key=lambda w: (w.sha256, w.code, w.global_name or "", w.expires)))
    keys = allowed_set | wildcard_set
    reasons_view = MappingProxyType({k: reasons[k] for k in sorted(keys)})
    origins_view = MappingProxyType({k: origins[k] for k in sorted(keys) if k in origins})
    # Paths are left out so that the same policy hashes the same on every machine.
    canonical = {
        "schema_version": 1,
        "name": name,
        "description": description,
        "allow": [[k, reasons_view[k]] for k in sorted(allowed_set)],
        "wildcards": [[k, reasons_view[k]] for k in sorted(wildcard_set)],
        "limits": limits.as_dict(),
        "waivers": [[w.sha256, w.code, w.global_name, w.reason, w.expires.isoformat()] for w in waiver_tuple],
        "floor": fl.digest,
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Policy(
        name=name,
        description=description,
        allowed=allowed_set,
        reasons=reasons_view,
        limits=limits,
        waivers=waiver_tuple,
        sources=tuple(dict.fromkeys(sources)),
        hash=hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest(),
        wildcards=wildcard_set,
        origins=origins_view,
        floor=fl,
        source_digests=tuple(dict.fromkeys(source_digests)),
    )


# -- reading files ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _rules_dir() -> str | None:
    """The folder of the safeload.rules package, where an install has one (a wheel's, an editable
    install's), else None. importlib.resources also reads a package from a zip, but importing it
    imports pathlib, tempfile and zipfile: about 10 ms of every scan's start."""
    import safeload.rules

    folder = os.path.dirname(safeload.rules.__file__ or "")
    return folder if os.path.isdir(folder) else None


def _read_builtin(filename: str) -> bytes:
    folder = _rules_dir()
    if folder is not None:
        with open(os.path.join(folder, filename), "rb") as fh:
            return fh.read()
    from importlib import resources

    return (resources.files("safeload.rules") / filename).read_bytes()


def _builtin_filenames() -> list[str]:
    folder = _rules_dir()
    if folder is not None:
        return os.listdir(folder)
    from importlib import resources

    return [item.name for item in resources.files("safeload.rules").iterdir()]


def _read_user_file(path: Path) -> bytes:
    # Only regular files: a FIFO or device named as a policy would block or never end.
    if path.exists() and not path.is_file():
        raise PolicyError(f"policy file {escape(str(path))} is not a regular file")
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {escape(str(path))}: {exc.strerror or exc}") from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy file {escape(str(path))} is larger than {MAX_POLICY_BYTES} bytes")
    return data


def parse_toml(data: bytes, label: str) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{label}: not UTF-8 text (byte {exc.start})") from None
    if sys.version_info >= (3, 11):
        import tomllib  # here: built-in files are read from the manifest, never parsed
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{label}: not valid TOML: {exc}") from None


def _validated(data: bytes, label: str, builtin: bool, floor_file: bool = False) -> Any:
    """A file's content: from the manifest for a built-in file whose bytes are the ones it records
    (no TOML parser, no pydantic), otherwise parsed and checked by the pydantic models."""
    if builtin:
        known = _manifest().content(label, hashlib.sha256(data).hexdigest())
        if known is not None:
            return known
    raw = parse_toml(data, label)
    from safeload import policy_files  # pydantic: only for files not known to be valid

    if floor_file:
        return policy_files.validate_floor_file(raw, label)
    return policy_files.validate_policy_file(raw, label)


class Manifest(msgspec.Struct, frozen=True):
    """The built-in files as the tests validated them (``rules/validated.json``, written by
    safeload.policy_files): each file's sha256, and its content as the models read it."""

    sha256: dict[str, str]
    policies: dict[str, PolicyFile]
    floor: FloorFile | None

    def content(self, filename: str, digest: str) -> PolicyFile | FloorFile | None:
        if self.sha256.get(filename) != digest:
            return None
        return self.floor if filename == FLOOR_FILE else self.policies.get(filename)


@lru_cache(maxsize=1)
def _manifest() -> Manifest:
    try:
        return msgspec.json.decode(_read_builtin(MANIFEST_FILE), type=Manifest)
    except (OSError, msgspec.DecodeError):
        return Manifest(sha256={}, policies={}, floor=None)  # every built-in file gets validated


def _name_problem(name: str, fl: Floor, *, wildcard_ok: bool) -> str | None:
    """Why `name` cannot be an allow entry, or None."""
    if name.endswith(_WILDCARD):
        if not wildcard_ok:
            return "wildcards are not allowed here; list exact qualified names"
        prefix = name[: -len(_WILDCARD)]
        if not prefix or not all(s.isidentifier() for s in prefix.split(".")):
            return "a wildcard must be a module path followed by .* (e.g. mypkg.*)"
        conflict = fl.wildcard_conflict(prefix)
        if conflict is not None:
            return f"a wildcard cannot cover the floor ({conflict.describe()})"
        return None
    if "*" in name:
        return "only a trailing .* is a wildcard; list exact qualified names"
    if not _is_qualname(name):
        return "not a qualified name (module.name, each part a Python identifier)"
    hit = fl.hit(name)
    if hit is not None:
        return f"cannot be allowed: {hit.describe()}"
    return None


# -- the floor ------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def floor() -> Floor:
    """The floor from rules/floor.toml (parsed once)."""
    data = _read_builtin(FLOOR_FILE)
    content = _validated(data, FLOOR_FILE, builtin=True, floor_file=True)
    return Floor(
        modules=MappingProxyType(content.modules),
        names=MappingProxyType(content.names),
        attributes=MappingProxyType(content.attributes),
        digest=hashlib.sha256(data).hexdigest(),
    )


# -- resolution -----------------------------------------------------------------------------------------------


class _Resolved(msgspec.Struct, frozen=True):
    """A policy file with its extends applied, before call-site names."""

    name: str
    description: str
    entries: Mapping[str, tuple[str, str]]  # name or "prefix.*" -> (reason, origin)
    limits: Mapping[str, Any]  # explicitly set Limits fields, merged along extends
    waivers: tuple[Waiver, ...]
    sources: tuple[str, ...]
    digests: tuple[tuple[str, str], ...] = ()  # (source, sha256 of its bytes), as sources


_Key = tuple[str, str]  # ("builtin", name) or ("file", absolute path)
# Built-in files never change while the process runs; user files may, so only these are cached.
_BUILTIN_RESOLVED: dict[str, _Resolved] = {}


def _is_path_like(spec: str) -> bool:
    return spec.endswith(".toml") or "/" in spec or os.sep in spec or bool(os.altsep and os.altsep in spec)


def _resolve(key: _Key, stack: tuple[_Key, ...], seen: dict[_Key, _Resolved]) -> _Resolved:
    if key in stack:
        chain = " -> ".join(k[1] for k in (*stack, key))
        raise PolicyError(f"extends cycle: {escape(chain)}")
    if key in seen:
        return seen[key]
    kind, ident = key
    if kind == "builtin" and ident in _BUILTIN_RESOLVED:
        return _BUILTIN_RESOLVED[ident]
    if kind == "builtin":
        label = f"{ident}.toml"
        data = _read_builtin(label)
        base_dir: Path | None = None
        default_name = ident
    else:
        from pathlib import Path  # here: the built-in policies need no paths

        label = ident
        data = _read_user_file(Path(ident))
        base_dir = Path(ident).parent
        default_name = Path(ident).stem
    model: PolicyFile = _validated(data, label, builtin=kind == "builtin")

    fl = floor()
    parents: list[_Resolved] = []
    for i, ref in enumerate(model.extends):
        parent_key = _extends_key(ref, base_dir, label, i)
        parents.append(_resolve(parent_key, (*stack, key), seen))

    entries: dict[str, tuple[str, str]] = {}
    limits: dict[str, Any] = {}
    waivers: list[Waiver] = []
    sources: list[str] = []
    digests: list[tuple[str, str]] = []
    for parent in parents:
        entries.update(parent.entries)
        limits.update(parent.limits)
        waivers.extend(parent.waivers)
        sources.extend(parent.sources)
        digests.extend(parent.digests)

    for i, entry in enumerate(model.allow):
        name = entry.global_
        if name.endswith(_WILDCARD) and not entry.unsafe_wildcard:
            raise PolicyError(
                f"{label}: allow[{i}].global: {escape(name)} is a wildcard; a wildcard needs "
                "unsafe_wildcard = true (prefer exact names)"
            )
        if entry.unsafe_wildcard and not name.endswith(_WILDCARD):
            raise PolicyError(f"{label}: allow[{i}].unsafe_wildcard: set on a name that is not a wildcard")
        problem = _name_problem(name, fl, wildcard_ok=True)
        if problem is not None:
            raise PolicyError(f"{label}: allow[{i}].global: {escape(name)}: {problem}", global_name=name)
        entries[name] = (entry.reason, label)

    limits.update(model.limits)

    for i, w in enumerate(model.waive):
        if w.global_ is not None and fl.covers(w.global_):
            raise PolicyError(
                f"{label}: waive[{i}].global: {escape(w.global_)} is on the floor and cannot be waived"
            )
        waivers.append(Waiver(w.sha256.lower(), w.code, w.global_, w.reason, w.expires))

    sources.append(label)
    digests.append((label, hashlib.sha256(data).hexdigest()))
    resolved = _Resolved(
        name=model.name or default_name,
        description=model.description,
        entries=MappingProxyType(entries),
        limits=MappingProxyType(limits),
        waivers=tuple(dict.fromkeys(waivers)),
        sources=tuple(dict.fromkeys(sources)),
        digests=tuple(dict.fromkeys(digests)),
    )
    if not resolved.entries:
        raise PolicyError(f"{label}: allow: the policy allows nothing (add [[allow]] entries or extends)")
    seen[key] = resolved
    if kind == "builtin":
        _BUILTIN_RESOLVED[ident] = resolved
    return resolved


def _extends_key(ref: str, base_dir: Path | None, label: str, index: int) -> _Key:
    if ref in builtin_policy_names():
        return ("builtin", ref)
    if base_dir is not None and _is_path_like(ref):
        target = (base_dir / ref).resolve()
        if not target.is_file():
            raise PolicyError(
                f"{label}: extends[{index}]: no policy file {escape(ref)} (looked for {target})"
            )
        return ("file", str(target))
    if base_dir is None:
        hint = "built-in policies extend built-in names only"
    else:
        hint = "a path must end in .toml or contain a path separator"
    raise PolicyError(
        f"{label}: extends[{index}]: unknown policy {escape(ref)} ({hint}; built-in: "
        f"{', '.join(builtin_policy_names())})"
    )


def _build(resolved: _Resolved) -> Policy:
    try:
        limits = Limits(**resolved.limits)
    except (TypeError, ValueError) as exc:  # pragma: no cover - each file's limits were validated already
        raise PolicyError(f"{resolved.name}: limits: {exc}") from None
    allowed = [k for k in resolved.entries if not k.endswith(_WILDCARD)]
    wildcards = [k for k in resolved.entries if k.endswith(_WILDCARD)]
    return _make_policy(
        name=resolved.name,
        description=resolved.description,
        allowed=allowed,
        wildcards=wildcards,
        reasons={k: v[0] for k, v in resolved.entries.items()},
        origins={k: v[1] for k, v in resolved.entries.items()},
        limits=limits,
        waivers=resolved.waivers,
        sources=resolved.sources,
        fl=floor(),
        source_digests=resolved.digests,
    )


@lru_cache(maxsize=1)
def _builtin_names() -> tuple[str, ...]:
    names = []
    for filename in _builtin_filenames():
        if filename.endswith(".toml") and filename != FLOOR_FILE:
            names.append(filename[: -len(".toml")])
    return tuple(sorted(names))


def builtin_policy_names() -> list[str]:
    """Names accepted by load_policy besides paths (rules/*.toml except the floor)."""
    return list(_builtin_names())


@lru_cache(maxsize=64)
def _builtin_policy(name: str) -> Policy:
    return _build(_resolve(("builtin", name), (), {}))


def _load_file(path: str) -> Policy:
    from pathlib import Path

    key: _Key = ("file", str(Path(path).resolve()))
    return _build(_resolve(key, (), {}))


def load_policy(spec: str | os.PathLike[str] | Policy = "default", allow: Iterable[str] = ()) -> Policy:
    """A built-in policy by name, a user policy file by path, or a Policy; plus exact `allow` names.

    A string that names a built-in policy wins; otherwise a string ending in .toml or containing a
    path separator is a path. Anything else is a PolicyError listing the built-in names.
    """
    if isinstance(allow, str):
        raise PolicyError("allow= takes a list of qualified names, not one string")
    if isinstance(spec, Policy):
        policy = spec
    elif isinstance(spec, os.PathLike):
        policy = _load_file(os.fspath(spec))
    elif isinstance(spec, str):
        if spec in builtin_policy_names():
            policy = _builtin_policy(spec)
        elif _is_path_like(spec):
            policy = _load_file(spec)
        else:
            raise PolicyError(
                f"unknown policy {escape(spec)}: built-in policies are "
                f"{', '.join(builtin_policy_names())}; pass a path ending in .toml for your own"
            )
    else:
        raise PolicyError(f"policy must be a name, a path or a Policy, not {type(spec).__name__}")
    names = list(allow)
    return policy.with_allowed(names) if names else policy


# -- writing -----------------------------------------------------------------------------------------------------


def _toml_str(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def policy_to_toml(policy: Policy) -> str:
    """The resolved policy as one readable TOML file (extends flattened) that loads back equal."""
    lines = [
        f"# Resolved policy {policy.name} (sha256 {policy.hash})",
        f"# Built from: {', '.join(escape(s) for s in policy.sources) or '(nothing)'}",
        f"# The floor ({FLOOR_FILE}) is checked before these entries; nothing here can lift it.",
        "schema_version = 1",
        f"name = {_toml_str(policy.name)}",
        f"description = {_toml_str(policy.description)}",
        "",
        "[limits]",
    ]
    for key, value in policy.limits.as_dict().items():
        lines.append(f"{key} = {value}")
    for name in sorted(policy.allowed | policy.wildcards):
        lines += [
            "",
            "[[allow]]",
            f"global = {_toml_str(name)}",
            f"reason = {_toml_str(policy.reasons[name])}",
        ]
        if name in policy.wildcards:
            lines.append("unsafe_wildcard = true")
        origin = policy.origins.get(name)
        if origin:
            lines.append(f"# from {escape(origin)}")
    for w in policy.waivers:
        lines += ["", "[[waive]]", f"sha256 = {_toml_str(w.sha256)}", f"code = {_toml_str(w.code)}"]
        if w.global_name is not None:
            lines.append(f"global = {_toml_str(w.global_name)}")
        lines += [f"reason = {_toml_str(w.reason)}", f"expires = {w.expires.isoformat()}"]
    return "\n".join(lines) + "\n"
