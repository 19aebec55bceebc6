"""The command line's parser (argparse): every command, option and help text.

Apart from cli.py so that a plainly written audit (audit_argv) runs without importing argparse.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from safeload import __version__
from safeload.cli import UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import Any, NoReturn


class _Formatter(argparse.HelpFormatter):
    # argparse makes a formatter for every argument it adds, and each asks shutil for the terminal's
    # width: importing shutil (with bz2 and lzma) is several percent of a replayed audit. Same rule
    # as shutil.get_terminal_size: $COLUMNS, else the terminal, else 80; argparse then takes 2 off.
    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        super().__init__(
            prog, indent_increment, max_help_position, _columns() - 2 if width is None else width
        )


def _columns() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    # argparse exits 2 on bad usage; 2 means "incomplete scan" here, so usage errors become 3.
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or, given a command's name, the parser of that command alone: a
    command's run need not build (and import for) the others' arguments and help texts."""
    parser = _Parser(
        prog="safeload",
        description="Scan and safely load pickle-based model files without running their code.",
        epilog="Exit codes: 0 clean, 1 unsafe (wins over 2), 2 could not be fully analysed, 3 usage or policy error.",
    )
    parser.add_argument("--version", action="version", version=f"safeload {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, add in COMMANDS.items():
        if command is None or command == name:
            add(sub)
    return parser


def _add_scan(sub: Any) -> None:
    scan = sub.add_parser(
        "scan",
        help="scan files and directories; the format is decided by content, not extension",
        description="Scan files and directories. Directories are walked; in them, files that are no "
        "model format (by content) are skipped. A named file that is no known format gives exit 2, "
        "unless --skip-non-model.",
    )
    scan.add_argument(
        "paths", nargs="+", metavar="PATH", help="files and directories; - reads one file from standard input"
    )
    _add_policy_args(scan)
    scan.add_argument(
        "--skip-non-model",
        action="store_true",
        help="skip named files that are no model format (by content: nothing in them a loader would "
        "unpickle, e.g. a sentencepiece tokenizer.model) as a directory walk does, instead of exit 2; "
        "the pre-commit hook passes it, since its file patterns select by name",
    )
    scan.add_argument("--format", choices=_formats(), default="text", help="report format (default: text)")
    scan.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of stdout")
    scan.add_argument(
        "--sha256", action="store_true", help="hash every file (identity for reports and waivers)"
    )
    scan.add_argument("-v", "--verbose", action="store_true", help="list every global of every stream")


def _add_policy(sub: Any) -> None:
    policy = sub.add_parser("policy", help="show, validate or suggest policies")
    psub = policy.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=_Parser)
    show = psub.add_parser("show", help="print a resolved policy (built-in name or file) as TOML")
    show.add_argument("name", metavar="NAME|FILE")
    validate = psub.add_parser("validate", help="validate policy files; exit 3 on the first invalid one")
    validate.add_argument("files", nargs="+", metavar="FILE")
    psub.add_parser("list", help="list the built-in policies")
    suggest = psub.add_parser(
        "suggest",
        help="print a policy file with the names FILEs need beyond a base policy, for a human to review",
    )
    suggest.add_argument("files", nargs="+", metavar="FILE")
    suggest.add_argument(
        "--base", default="default", metavar="NAME|FILE", help="policy to extend (default: default)"
    )


def _add_audit(sub: Any) -> None:
    from safeload import cli_audit

    cli_audit.register(sub)


# In the order `--help` lists them.
COMMANDS: dict[str, Callable[[Any], None]] = {"scan": _add_scan, "policy": _add_policy, "audit": _add_audit}


def _formats() -> list[str]:
    from safeload.report import FORMATS

    return sorted(FORMATS)


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policy",
        default="default",
        metavar="NAME|FILE",
        help="built-in policy name (strict, default, pack-...) or a policy TOML file (default: default)",
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="NAME",
        help="also allow this exact global, e.g. mypkg.layers.Scale (repeatable); never imported by safeload",
    )
