"""Result types: what a scan found and what it concluded. Frozen pydantic models."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticSerializationError

from safeload.codes import Effect, Severity, rule
from safeload.text import escape

# 2: an audit's stats no longer say how the run got its results (scanned, from_cache,
# hash_cache_hits): the same registry gives the same report.
SCHEMA_VERSION = 3


class Verdict(str, Enum):
    SAFE = "SAFE"
    UNSAFE = "UNSAFE"
    UNSCANNABLE = "UNSCANNABLE"


class Use(str, Enum):
    """How the unpickler would use an imported global."""

    REFERENCED = "referenced"  # pushed, never called (e.g. returned, stored)
    CALLED = "called"  # REDUCE target
    INSTANTIATED = "instantiated"  # INST / OBJ / NEWOBJ / NEWOBJ_EX class
    BUILD_TARGET = "build_target"  # an instance of it receives BUILD (may call __setstate__)
    ARGUMENT = "argument"  # passed as an argument to a call
    PERSISTENT_ID = "persistent_id"  # appears inside a persistent id


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Finding(_Frozen):
    code: str = Field(description="Rule code from the catalogue, e.g. SL101")
    rule: str = Field(description="Rule name, e.g. disallowed-global")
    severity: Severity
    message: str
    member: str | None = Field(default=None, description="Member inside the file (archive path), if any")
    offset: int | None = Field(default=None, description="Byte offset inside the member's pickle stream")
    file_offset: int | None = Field(default=None, description="Absolute byte offset in the file, when known")
    global_name: str | None = Field(default=None, description="Qualified global, e.g. os.system")
    uses: tuple[Use, ...] = ()
    remedy: str | None = Field(default=None, description="What the user can do; None for floor hits")
    waived: bool = False
    waiver_reason: str | None = None

    @property
    def effect(self) -> Effect:
        if self.waived:
            return Effect.NONE
        return rule(self.code).effect

    def render(self) -> str:
        """One finding as text, every attacker-controlled string escaped."""
        head = f"[{self.severity.value.upper()}] {self.code} {self.rule}: {escape(self.message, 500)}"
        where = []
        if self.member:
            where.append(f"member {escape(self.member)}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        if self.file_offset is not None and self.file_offset != self.offset:
            where.append(f"file offset {self.file_offset}")
        if self.global_name:
            where.append(f"global {escape(self.global_name)}")
        if self.uses:
            where.append("used as " + "/".join(u.value for u in self.uses))
        text = head
        if where:
            text += "\n    " + ", ".join(where)
        if self.waived:
            text += f"\n    WAIVED: {escape(self.waiver_reason or '')}"
        if self.remedy:
            text += "\n    remedy: " + self.remedy
        return text


def make_finding(code: str, message: str, **kw: object) -> Finding:
    """A finding whose rule name and severity come from the catalogue."""
    r = rule(code)
    kw.setdefault("severity", r.severity)
    return Finding(code=r.code, rule=r.name, message=message, **kw)  # type: ignore[arg-type]


class GlobalUse(_Frozen):
    """One import the unpickler would make, as the scanner resolved it."""

    name: str
    member: str | None = None
    offset: int
    opcode: str
    uses: tuple[Use, ...] = ()
    allowed: bool


class StreamReport(_Frozen):
    member: str | None = Field(description="Member holding the stream; None for a whole-file pickle")
    file_offset: int | None = Field(default=None, description="Where the stream starts in the file, if stored")
    length: int
    protocol: int | None = None
    opcodes: int = 0
    globals: tuple[GlobalUse, ...] = ()
    globals_omitted: int = Field(
        default=0,
        description="Import sites of this stream not listed in globals: a file lists the first site of "
        "every global it imports, and further sites up to 1,000 in all (every site is judged)",
    )
    explanation: str | None = Field(default=None, description="Decompiled Python of a flagged stream (fickling)")
    secondary: bool = Field(
        default=False,
        description="Another loader's reading of bytes a more exact reader claims (pickle.load of a "
        "joblib file): its imports are judged, its breaking part way is expected",
    )


class ScanReport(_Frozen):
    schema_version: int = SCHEMA_VERSION
    path: str
    sha256: str | None = Field(description="sha256 of the file; None when hashing was skipped")
    size: int
    formats: tuple[str, ...] = ()
    streams: tuple[StreamReport, ...] = ()
    findings: tuple[Finding, ...] = ()
    verdict: Verdict
    policy: str
    policy_hash: str
    versions: dict[str, str] = Field(default_factory=dict)

    @property
    def globals(self) -> list[str]:
        return sorted({g.name for s in self.streams for g in s.globals})

    @property
    def no_model_format(self) -> bool:
        """Nothing a loader reads as a model (SL204 alone): no known format, or bytes that merely
        start with an opcode and break before anything acts. A directory walk skips such files."""
        return bool(self.findings) and all(f.code == "SL204" for f in self.findings)


def decide(findings: tuple[Finding, ...] | list[Finding]) -> Verdict:
    """UNSAFE wins over UNSCANNABLE wins over SAFE."""
    effects = {f.effect for f in findings}
    if Effect.UNSAFE in effects:
        return Verdict.UNSAFE
    if Effect.INCOMPLETE in effects:
        return Verdict.UNSCANNABLE
    return Verdict.SAFE


def unread_report(
    path: str, finding: Finding, *, policy: str, policy_hash: str, versions: dict[str, str]
) -> ScanReport:
    """The report for an input that could not be read at all (missing, vanished, over a limit)."""
    findings = (finding,)
    return ScanReport(
        path=path,
        sha256=None,
        size=0,
        findings=findings,
        verdict=decide(findings),
        policy=policy,
        policy_hash=policy_hash,
        versions=versions,
    )


class ScanRun(_Frozen):
    """One CLI run over several inputs: the envelope of the JSON report."""

    schema_version: int = SCHEMA_VERSION
    tool: str = "safeload"
    version: str
    policy: str
    reports: tuple[ScanReport, ...] = ()
    skipped: tuple[str, ...] = Field(default=(), description="Files in walked directories that are no model format")
    exit_code: int = Field(description="0 clean, 1 unsafe, 2 incomplete, 3 usage or policy error")


def dump_json(model: BaseModel, *, indent: int | None = None) -> str:
    """``model.model_dump_json``, also for names no UTF-8 can carry. A path or tar member name
    made of bytes that are not UTF-8 is decoded with surrogateescape, and JSON cannot hold those
    characters: such a string is written with each of those bytes as ``\\xNN`` (any other lone
    surrogate as ``\\uXXXX``) and its backslashes doubled."""
    try:
        return model.model_dump_json(indent=indent)
    except PydanticSerializationError:
        clean = type(model).model_validate(_json_safe(model.model_dump()))
        return clean.model_dump_json(indent=indent)


def _json_safe(value: Any) -> Any:
    if isinstance(value, str):
        if not any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
            return value
        return "".join(_json_char(ch) for ch in value)
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_json_safe(v) for v in value)
    return value


def _json_char(ch: str) -> str:
    code = ord(ch)
    if ch == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that surrogateescape carried
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    return ch
