"""The argv of an audit read without argparse, where it is written plainly; None where it is not.

Importing argparse and building the audit's parser is an eighth of a replayed audit of 5,000
files (argparse, gettext and locale to import, forty help texts to format). Most audits are the
same few words, run again and again by a registry's job: those are read here. Anything that is not
plain (an option written as ``--opt=value`` or abbreviated, a value or path that starts with "-",
paths on both sides of an option, --help, a value argparse would refuse) returns None, and
argparse reads the line as it always did: its result, its errors, its help.

What this reads, it reads as argparse does (tests/property/test_audit_argv.py compares the two
on generated command lines): the same values, defaults included, under the same names.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: a replayed audit never needs it
if TYPE_CHECKING:
    from collections.abc import Sequence

# option -> (attribute, kind); kinds: "value" (the last one given wins), "append", "int", "flag"
_OPTIONS = {
    "--policy": ("policy", "value"),
    "--allow": ("allow", "append"),
    "--jobs": ("jobs", "int"),
    "-j": ("jobs", "int"),
    "--format": ("format", "value"),
    "-o": ("output", "value"),
    "--output": ("output", "value"),
    "--cache": ("cache", "value"),
    "--rehash": ("rehash", "flag"),
    "--baseline": ("baseline", "value"),
    "--compare": ("compare", "append"),
    "--no-progress": ("no_progress", "flag"),
    "-v": ("verbose", "flag"),
    "--verbose": ("verbose", "flag"),
}


class AuditArgs:
    """The attributes argparse's Namespace has for ``safeload audit`` (cli_audit.register)."""

    def __init__(self) -> None:
        self.command = "audit"
        self.paths: list[str] = []
        self.policy = "default"
        self.allow: list[str] = []
        self.jobs: int | None = None
        self.format: str | None = None
        self.output: str | None = None
        self.cache: str | None = None
        self.rehash = False
        self.baseline: str | None = None
        self.compare: list[str] | None = None
        self.no_progress = False
        self.verbose = False

    def __repr__(self) -> str:
        return f"AuditArgs({vars(self)!r})"


def read_audit_argv(argv: Sequence[str], formats: Sequence[str]) -> AuditArgs | None:
    """``argv`` as ``safeload`` gets it (``["audit", ...]``); ``formats``: the --format choices."""
    if not argv or argv[0] != "audit":
        return None
    args = AuditArgs()
    tokens = list(argv[1:])
    # 0: no path yet; 1: reading paths; 2: paths read, an option came after them
    paths_state = 0
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("-"):
            if paths_state == 2:
                return None  # paths on both sides of an option: argparse's error to give
            paths_state = 1
            args.paths.append(token)
            i += 1
            continue
        if paths_state == 1:
            paths_state = 2
        option = _OPTIONS.get(token)
        if option is None:
            return None  # --help, --opt=value, an abbreviation, a cluster such as -vo: argparse's
        name, kind = option
        if kind == "flag":
            setattr(args, name, True)
            i += 1
            continue
        if i + 1 >= len(tokens) or tokens[i + 1].startswith("-"):
            return None  # a missing value, or one argparse may take for an option
        value = tokens[i + 1]
        i += 2
        if kind == "append":
            current = getattr(args, name)
            setattr(args, name, [*(current or []), value])
        elif kind == "int":
            try:
                args.jobs = int(value)
            except ValueError:
                return None
        elif name == "format" and value not in formats:
            return None
        else:
            setattr(args, name, value)
    return args if args.paths else None
