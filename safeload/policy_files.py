"""Validating policy files with pydantic: the models of a policy file and of the floor file.

Imported only where a file's content is not known to be valid: a user's policy file, or a built-in
one whose bytes differ from those recorded in ``rules/validated.json`` (see safeload.policy). The
manifest holds each built-in file's sha256 and its content as validated here; a run then takes a
built-in file's content from it, parsing no TOML (tomllib: 35 ms for the built-in files) and
importing no pydantic (150 ms), most of a short run's start-up.

``python -m safeload.policy_files --write-manifest`` records the built-in files as they are now,
after validating each; ``--check-manifest`` says whether the manifest is current.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from safeload.codes import RULES
from safeload.errors import PolicyError
from safeload.limits import Limits, least_value
from safeload.text import escape

if TYPE_CHECKING:
    from safeload.policy import FloorFile, PolicyFile


def _check_reason(value: str) -> str:
    if not value.strip():
        raise ValueError("must say why (an empty reason is not a reason)")
    return value


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


# The [limits] table: every field of Limits, optional, at least its least value.
_LimitsTable: type[BaseModel] = create_model(
    "Limits",
    __base__=_Model,
    **{
        f.name: (int, Field(default=f.default, ge=least_value(f.name)))
        for f in msgspec.structs.fields(Limits)
    },  # type: ignore[call-overload]
)


class _AllowEntry(_Model):
    global_: str = Field(alias="global")
    reason: str
    unsafe_wildcard: bool = False

    _reason = field_validator("reason")(_check_reason)


class _WaiveEntry(_Model):
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    code: str
    global_: str | None = Field(default=None, alias="global")
    reason: str
    expires: date

    _reason = field_validator("reason")(_check_reason)

    @field_validator("code")
    @classmethod
    def _known_code(cls, value: str) -> str:
        if value not in RULES:
            raise ValueError(f"unknown rule code {value!r}")
        if value == "SL100":
            raise ValueError("floor hits (SL100) cannot be waived")
        return value


class _PolicyFile(_Model):
    schema_version: Literal[1]
    name: str | None = None
    description: str = ""
    extends: list[str] = []
    limits: _LimitsTable | None = None  # type: ignore[valid-type]
    allow: list[_AllowEntry] = []
    waive: list[_WaiveEntry] = []


class _FloorModule(_Model):
    name: str
    reason: str

    _reason = field_validator("reason")(_check_reason)


class _FloorName(_Model):
    global_: str = Field(alias="global")
    reason: str

    _reason = field_validator("reason")(_check_reason)


class _FloorFile(_Model):
    schema_version: Literal[1]
    description: str = ""
    module: list[_FloorModule]
    name: list[_FloorName] = []
    attribute: list[_FloorModule] = []


def validate_policy_file(raw: Mapping[str, Any], label: str) -> PolicyFile:
    """A policy file's parsed TOML, checked; PolicyError naming each field that is wrong."""
    from safeload.policy import AllowEntry, PolicyFile, WaiveEntry

    model = _checked(_PolicyFile, raw, label)
    return PolicyFile(
        name=model.name,
        description=model.description,
        extends=tuple(model.extends),
        limits=model.limits.model_dump(exclude_unset=True) if model.limits is not None else {},
        allow=tuple(AllowEntry(a.global_, a.reason, a.unsafe_wildcard) for a in model.allow),
        waive=tuple(WaiveEntry(w.sha256, w.code, w.global_, w.reason, w.expires) for w in model.waive),
    )


def validate_floor_file(raw: Mapping[str, Any], label: str) -> FloorFile:
    from safeload.policy import FloorFile

    model = _checked(_FloorFile, raw, label)
    return FloorFile(
        modules={m.name: m.reason for m in model.module},
        names={n.global_: n.reason for n in model.name},
        attributes={a.name: a.reason for a in model.attribute},
    )


_M = TypeVar("_M", bound=BaseModel)


def _checked(model: type[_M], raw: Mapping[str, Any], label: str) -> _M:
    try:
        return model.model_validate(raw, strict=True)
    except ValidationError as exc:
        raise _validation_error(label, exc, raw) from None


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _validation_error(label: str, exc: ValidationError, data: Mapping[str, Any]) -> PolicyError:
    lines = [f"{label}: invalid policy file"]
    for err in exc.errors():
        where = _loc(err["loc"])
        hint = ""
        loc = err["loc"]
        if len(loc) >= 2 and isinstance(loc[1], int) and loc[0] in ("allow", "waive", "name", "module"):
            entry = data.get(str(loc[0]))
            if isinstance(entry, list) and loc[1] < len(entry) and isinstance(entry[loc[1]], dict):
                glob = entry[loc[1]].get("global", entry[loc[1]].get("name"))
                if isinstance(glob, str):
                    hint = f" (entry for {escape(glob)})"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {where}: {escape(msg)}{hint}")
    return PolicyError("\n".join(lines))


# -- the manifest of built-in files -----------------------------------------------------------------


def manifest_text(rules_dir: Path) -> str:
    """Every built-in file validated (a PolicyError if one is not valid): its sha256 and content."""
    from safeload.policy import FLOOR_FILE, Manifest, parse_toml

    digests: dict[str, str] = {}
    policies: dict[str, PolicyFile] = {}
    floor: FloorFile | None = None
    for path in sorted(rules_dir.glob("*.toml")):
        data = path.read_bytes()
        raw = parse_toml(data, path.name)
        if path.name == FLOOR_FILE:
            floor = validate_floor_file(raw, path.name)
        else:
            policies[path.name] = validate_policy_file(raw, path.name)
        digests[path.name] = hashlib.sha256(data).hexdigest()
    manifest = Manifest(sha256=digests, policies=policies, floor=floor)
    return msgspec.json.format(msgspec.json.encode(manifest), indent=1).decode("utf-8") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    import argparse  # here: the module is imported to validate policy files, seldom run

    from safeload.policy import MANIFEST_FILE

    parser = argparse.ArgumentParser(prog="python -m safeload.policy_files")
    parser.add_argument("--rules", default="rules", help="the rules directory (default: rules)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write-manifest", action="store_true")
    group.add_argument("--check-manifest", action="store_true")
    args = parser.parse_args(argv)
    rules = Path(args.rules)
    text = manifest_text(rules)
    if args.write_manifest:
        (rules / MANIFEST_FILE).write_text(text, encoding="utf-8")
        return 0
    current = rules / MANIFEST_FILE
    return 0 if current.is_file() and current.read_text(encoding="utf-8") == text else 1


if __name__ == "__main__":
    raise SystemExit(main())
