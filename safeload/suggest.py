"""``safeload policy suggest FILE...``: a policy file with the names some files need beyond a base.

For a human to review, never to apply blindly: each entry says which file uses the name and how
(called, instantiated, BUILD target ...), and its reason is left for the reviewer to write. Names
on the floor are listed as comments only: no policy can allow them, and a file that needs them is
very likely malicious.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import msgspec

from safeload.codes import Effect
from safeload.model import Finding, ScanReport, Verdict
from safeload.policy import _toml_str, load_policy
from safeload.text import escape

__all__ = ["allow_snippet", "needed_names", "suggest_policy"]

_REFUSED = "SL101"
_FLOOR = "SL100"


class _Need(msgspec.Struct):
    name: str
    sites: list[str] = msgspec.field(default_factory=list)
    uses: set[str] = msgspec.field(default_factory=set)


def needed_names(report: ScanReport) -> list[str]:
    """The names this file needs beyond its policy (refused, not on the floor), in first-use order."""
    seen: dict[str, None] = {}
    for f in report.findings:
        if f.code == _REFUSED and f.global_name and not f.waived:
            seen.setdefault(f.global_name, None)
    return list(seen)


def allow_snippet(names: Iterable[str]) -> str:
    """The [[allow]] entries that would admit `names`, for a refusal message."""
    blocks = [
        f"[[allow]]\nglobal = {_toml_str(n)}\nreason = {_toml_str(f'trusted: why you trust {n}')}"
        for n in names
    ]
    return "\n\n".join(blocks)


def suggest_policy(paths: Iterable[str | os.PathLike[str]], base: str = "default") -> str:
    """A policy TOML extending `base` with every name the files need, each commented with its uses."""
    from safeload.api import scan

    policy = load_policy(base)
    files: list[str] = []
    needs: dict[str, _Need] = {}
    floor: list[str] = []
    problems: list[str] = []
    for path in paths:
        shown = os.fsdecode(path)
        files.append(shown)
        report = scan(path, policy=policy)
        for f in report.findings:
            if f.waived:
                continue
            if f.code == _REFUSED and f.global_name:
                need = needs.setdefault(f.global_name, _Need(f.global_name))
                need.sites.append(_site(shown, f))
                need.uses.update(u.value for u in f.uses)
            elif f.code == _FLOOR:
                floor.append(f"{escape(f.global_name or '?')} in {_site(shown, f)}")
        incomplete = [f for f in report.findings if f.effect is Effect.INCOMPLETE]
        if incomplete:
            problems.append(
                f"{escape(shown)}: could not be fully analysed ({escape(incomplete[0].message, 200)}); "
                "it will not load whatever you allow"
            )
        elif report.verdict is Verdict.UNSAFE and not any(
            f.code in (_REFUSED, _FLOOR) for f in report.findings
        ):
            problems.append(
                f"{escape(shown)}: unsafe for reasons no allow entry can change (see `safeload scan`)"
            )

    names = ", ".join(escape(os.path.basename(f)) for f in files) or "no files"
    lines = [
        f"# Suggested by `safeload policy suggest` for: {', '.join(escape(f) for f in files)}",
        "# REVIEW EVERY ENTRY before using this file. Allowing a name lets a file import its module",
        "# (running that module's top-level code) and call it with arguments of the file's choosing.",
        "# Allow only names you trust, for files whose source you trust, and write each reason yourself.",
    ]
    for line in floor:
        lines.append(
            f"# REFUSED, on the floor (no policy can allow it; the file is very likely malicious): {line}"
        )
    for line in problems:
        lines.append(f"# NOTE {line}")
    lines += [
        "schema_version = 1",
        'name = "suggested"',
        f"description = {_toml_str(f'{base} plus the names needed by {names}')}",
        f"extends = [{_toml_str(base)}]",
    ]
    if not needs:
        lines += ["", f"# These files need nothing beyond {escape(base)}."]
    for need in needs.values():
        uses = "/".join(sorted(need.uses)) or "referenced"
        lines += ["", "[[allow]]", f"global = {_toml_str(need.name)}", f"# used as {uses}"]
        lines += [f"#   in {site}" for site in need.sites[:5]]
        if len(need.sites) > 5:
            lines.append(f"#   ... and {len(need.sites) - 5} more places")
        lines.append(f"reason = {_toml_str('TODO: say why you trust ' + need.name + ' and these files')}")
    return "\n".join(lines) + "\n"


def _site(path: str, f: Finding) -> str:
    where = [escape(path)]
    if f.member:
        where.append(f"member {escape(f.member)}")
    if f.offset is not None:
        where.append(f"offset {f.offset}")
    return ", ".join(where)
