"""Walker output + policy -> findings and per-import rows. The only place the two meet.

Every import is checked against the policy whatever its use (a global that is only referenced can
still be called later by an allowed callable). Floor hits say the file is very likely malicious
and offer no remedy; other refusals carry the policy's exact remedy line. Persistent ids are
checked against the storage scheme of the stream's container.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Protocol

import msgspec

from safeload.analysis.types import UNKNOWN, ImportSite, PersistentIdSite, WalkResult
from safeload.formats.base import PersistentScheme
from safeload.model import Finding, GlobalUse, Use, make_finding
from safeload.text import escape

__all__ = ["ImportRows", "evaluate_stream"]

# Findings of one kind per stream beyond this are summarised in one more finding.
MAX_PER_KIND = 50
_USE_ORDER = {u: i for i, u in enumerate(Use)}
# torch's find_class turns any name containing "Storage" into a storage type; real files name them
# in these modules.
_STORAGE_MODULES = frozenset({"torch", "torch.storage", "torch.cuda"})
_STORAGE_NAME = re.compile(r"[A-Z][A-Za-z0-9]*Storage\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
# Names TorchScript's unpickler resolves to helpers of its own (torch/csrc/jit/serialization/
# unpickler.cpp), never to Python; together with the classes of the archive's program
# (``__torch__.*``) they are the program's business, which SL312 reports, not the policy's.
TORCHSCRIPT_HELPERS = frozenset(
    f"torch.jit._pickle.{name}"
    for name in (
        "build_tensor_from_id",
        "restore_type_tag",
        "build_intlist",
        "build_tensorlist",
        "build_doublelist",
        "build_boollist",
    )
)


class Decision(Protocol):
    allowed: bool
    on_floor: bool
    reason: str


class PolicyLike(Protocol):
    name: str

    def decide(self, qualname: str) -> Decision: ...

    def remedy(self, qualname: str) -> str: ...


class ImportRows(msgspec.Struct):
    """One stream's import sites, each with its qualified name and whether the policy allows it.

    A report row (GlobalUse) is built only for the sites a report lists: a
    hostile stream holds 200,000 sites, and a model apiece took a quarter of its scan's time and
    half its memory."""

    member: str | None
    sites: list[ImportSite]
    names: list[str]  # sites[i].qualname
    allowed: dict[str, bool]  # per name: allowed and not on the floor

    def __len__(self) -> int:
        return len(self.sites)

    def row(self, i: int) -> GlobalUse:
        site = self.sites[i]
        name = self.names[i]
        return GlobalUse(
            name=name,
            member=self.member,
            offset=site.offset,
            opcode=site.opcode,
            uses=_ordered_uses(site.uses),
            allowed=self.allowed[name],
        )

    def rows(self) -> list[GlobalUse]:
        return [self.row(i) for i in range(len(self.sites))]

    def first_offsets(self) -> dict[str, int | None]:
        """Qualified name -> offset of its first site: what the loader's gate checks names against."""
        first: dict[str, int | None] = {}
        for name, site in zip(self.names, self.sites, strict=True):
            if name not in first:
                first[name] = site.offset
        return first


def evaluate_stream(
    walk: WalkResult,
    *,
    policy: PolicyLike,
    member: str | None,
    file_offset: int | None,
    persistent_scheme: PersistentScheme,
    torchscript: bool = False,
    keep: Callable[[str], bool] | None = None,
) -> tuple[list[Finding], ImportRows]:
    """Findings for one walked stream, and its import sites with the policy's decision on each.

    torchscript: the stream is read by TorchScript's unpickler; the names it resolves itself get
    rows but no policy finding (any other name is judged as everywhere: a Python reader would
    import it, and TorchScript's writer never writes it).
    keep: asked once per finding, with its code, before the finding is made; a finding it refuses
    is left out (the scan's budget counts it). A hostile stream may name 50,000 globals, and a
    finding with its policy remedy took most of that scan's time."""
    where = _Where(member, file_offset, keep or _keep_all)
    findings: list[Finding] = []
    rows = ImportRows(member=member, sites=walk.imports, names=[], allowed={})
    findings += _imports(rows, policy, where, torchscript)
    for anomaly in walk.anomalies:
        where.add(findings, anomaly.code, anomaly.message, anomaly.offset, global_name=anomaly.global_name)
    findings += _persistent_ids(walk.persistent_ids, persistent_scheme, where)
    return findings, rows


def _keep_all(code: str) -> bool:
    return True


class _Where:
    def __init__(self, member: str | None, file_offset: int | None, keep: Callable[[str], bool]) -> None:
        self.member = member
        self.file_offset = file_offset
        self.keep = keep

    def finding(self, code: str, message: str, offset: int | None, **kw: object) -> Finding:
        """The finding; the caller has asked ``keep``."""
        absolute = None if self.file_offset is None or offset is None else self.file_offset + offset
        return make_finding(code, message, member=self.member, offset=offset, file_offset=absolute, **kw)

    def add(self, out: list[Finding], code: str, message: str, offset: int | None, **kw: object) -> None:
        if self.keep(code):
            out.append(self.finding(code, message, offset, **kw))


def _sorted_uses(uses: Iterable[Use]) -> tuple[Use, ...]:
    return tuple(sorted(set(uses), key=_USE_ORDER.__getitem__))


@functools.lru_cache(maxsize=64)
def _ordered_uses(uses: frozenset[Use]) -> tuple[Use, ...]:
    # A site's uses are one of a handful of shared frozensets: one tuple each, not one per row.
    return _sorted_uses(uses)


def _imports(rows: ImportRows, policy: PolicyLike, where: _Where, torchscript: bool = False) -> list[Finding]:
    decisions: dict[str, Decision] = {}
    groups: dict[str, list[ImportSite]] = {}
    names = rows.names
    canonical: dict[str, str] = {}
    for site in rows.sites:
        qualname = site.qualname
        group = groups.get(qualname)
        if group is None:
            canonical[qualname] = qualname
            groups[qualname] = [site]
            decisions[qualname] = policy.decide(qualname)
        else:
            # One string per name, not per site: 200,000 sites may name one global.
            qualname = canonical[qualname]
            group.append(site)
        names.append(qualname)
    rows.allowed = {name: d.allowed and not d.on_floor for name, d in decisions.items()}
    findings: list[Finding] = []
    for qualname, group in groups.items():
        decision = decisions[qualname]
        if decision.allowed and not decision.on_floor:
            continue
        if torchscript and (qualname.startswith("__torch__.") or qualname in TORCHSCRIPT_HELPERS):
            continue
        if not where.keep("SL100" if decision.on_floor else "SL101"):
            continue
        first = group[0]
        uses = _sorted_uses(u for s in group for u in s.uses)
        how = "/".join(u.value for u in uses)
        extra = f" ({len(group)} sites)" if len(group) > 1 else ""
        raw = next((s.raw for s in group if s.raw is not None), None)
        if raw is not None:
            extra += f"; written as {raw[0]}.{raw[1]} and renamed by the Python 2 name mapping"
        if decision.on_floor:
            message = (
                f"{qualname} ({how}) is on the floor: {decision.reason}. "
                f"No policy can allow it; the file is very likely malicious{extra}"
            )
            findings.append(where.finding("SL100", message, first.offset, global_name=qualname, uses=uses))
        else:
            message = f"{qualname} ({how}) is not allowed by policy {policy.name}: {decision.reason}{extra}"
            findings.append(
                where.finding(
                    "SL101",
                    message,
                    first.offset,
                    global_name=qualname,
                    uses=uses,
                    remedy=policy.remedy(qualname),
                )
            )
    return findings


# -- persistent ids ---------------------------------------------------------------------------------


def _persistent_ids(sites: list[PersistentIdSite], scheme: PersistentScheme, where: _Where) -> list[Finding]:
    findings: list[Finding] = []
    bad = 0
    for site in sites:
        if _plain_storage_id(site.value, scheme):
            continue
        why = _check_pid(site.value, scheme)
        if why is None:
            continue
        bad += 1
        if bad <= MAX_PER_KIND:
            where.add(findings, "SL106", f"{why}: {_show(site.value)}", site.offset)
    if bad > MAX_PER_KIND:
        where.add(findings, "SL106", f"{bad - MAX_PER_KIND} more persistent ids outside the scheme", None)
    return findings


def _check_pid(pid: object, scheme: PersistentScheme) -> str | None:
    """None when ``pid`` is one the stream's loader defines; else why not."""
    if scheme is PersistentScheme.NONE:
        return "persistent id in a plain pickle (its loader defines none)"
    if scheme is PersistentScheme.TORCH_ZIP:
        if not (isinstance(pid, tuple) and len(pid) == 5 and _is(pid[0], "storage")):
            return "torch zip persistent id is not ('storage', type, key, location, numel)"
        _, storage_type, key, location, numel = pid
        return (
            _storage_type(storage_type)
            or _text(key, "key")
            or _text(location, "location", allow_bytes=True)
            or _count(numel, "numel")
        )
    if scheme is PersistentScheme.TORCH_LEGACY:
        if isinstance(pid, tuple) and len(pid) == 6 and _is(pid[0], "storage"):
            _, storage_type, key, location, numel, view = pid
            return (
                _storage_type(storage_type)
                or _text(key, "root key")
                or _text(location, "location", allow_bytes=True)
                or _count(numel, "numel")
                or _view(view)
            )
        if isinstance(pid, tuple) and len(pid) == 4 and _is(pid[0], "module"):
            return _module_id(pid[1:])
        return "legacy torch persistent id is neither ('storage', ...) nor ('module', ...)"
    if scheme is PersistentScheme.TORCH_LEGACY_TAR:
        if isinstance(pid, tuple):
            return (
                _module_id(pid)
                if len(pid) == 3
                else "legacy tar persistent id tuple is not (class, file, source)"
            )
        if (type(pid) is str and _DIGITS.match(pid)) or (type(pid) is int and pid >= 0):
            return None
        return "legacy tar persistent id is not a storage key"
    return f"unknown persistent-id scheme {scheme.value}"


def _plain_storage_id(pid: object, scheme: PersistentScheme) -> bool:
    """The common case, decided at once: ('storage', a torch storage class, str key, str location,
    count), with no view in the legacy form; one per tensor of a checkpoint. False: check in full."""
    if type(pid) is not tuple:
        return False
    if scheme is PersistentScheme.TORCH_ZIP:
        if len(pid) != 5:
            return False
    elif scheme is not PersistentScheme.TORCH_LEGACY or len(pid) != 6 or pid[5] is not None:
        return False
    numel = pid[4]
    return (
        pid[0] == "storage"
        and type(pid[2]) is str
        and type(pid[3]) is str
        and type(numel) is int
        and numel >= 0
        and _storage_type(pid[1]) is None
    )


def _is(value: object, word: str) -> bool:
    # torch decodes a bytes typename as ASCII (_maybe_decode_ascii) before comparing.
    return value == word or value == word.encode()


def _storage_type(value: object) -> str | None:
    if not isinstance(value, ImportSite):
        return "storage type is not a global"
    name = value.name
    if value.module not in _STORAGE_MODULES or not (
        _storage_name(name) if len(name) <= 64 else _STORAGE_NAME.match(name)
    ):
        return f"storage type {escape(value.qualname)} is not a torch storage class"
    return None


@functools.lru_cache(maxsize=256)
def _storage_name(name: str) -> bool:
    # A checkpoint names a handful of storage classes, each once per tensor. Short names only are
    # kept (the caller's check): the cache lives as long as the process, the names come from files.
    return _STORAGE_NAME.match(name) is not None


def _text(value: object, what: str, *, allow_bytes: bool = False) -> str | None:
    if type(value) is str or (allow_bytes and type(value) is bytes and value.isascii()):
        return None
    return f"{what} is not a string"


def _count(value: object, what: str) -> str | None:
    if type(value) is int and value >= 0:
        return None
    return f"{what} is not a non-negative integer"


def _view(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, tuple) and len(value) == 3:
        return _text(value[0], "view key") or _count(value[1], "view offset") or _count(value[2], "view size")
    return "view metadata is not None or (key, offset, size)"


def _module_id(data: tuple[object, ...]) -> str | None:
    cls, source_file, source = data
    if not isinstance(cls, ImportSite):
        return "module persistent id does not name a class"
    for part in (source_file, source):
        if part is not None and type(part) is not str:
            return "module persistent id source is not a string"
    return None


def _show(value: object) -> str:
    if value is UNKNOWN:
        return "a value computed at load time"
    if isinstance(value, ImportSite):
        return escape(value.qualname, 80)
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value[:8]) + (", ..." if len(value) > 8 else "") + ")"
    return escape(repr(value), 80)
