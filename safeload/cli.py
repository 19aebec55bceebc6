"""Command line. The only module that reads argv, prints or exits.

Exit codes: 0 clean, 1 unsafe (wins over 2), 2 something could not be fully analysed,
3 usage or policy error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from safeload import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: a replayed audit never needs it
if TYPE_CHECKING:
    from typing import Any, NoReturn


EXIT_CLEAN = 0
EXIT_UNSAFE = 1
EXIT_INCOMPLETE = 2
EXIT_USAGE = 3


class UsageError(Exception):
    pass


class _Formatter(argparse.HelpFormatter):
    # argparse makes a formatter for every argument it adds, and each asks shutil for the terminal's
    # width: importing shutil (with bz2 and lzma) is several percent of a replayed audit. Same rule
    # as shutil.get_terminal_size: $COLUMNS, else the terminal, else 80; argparse then takes 2 off.
    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


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
    for name, add in _COMMANDS.items():
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
    scan.add_argument("paths", nargs="+", metavar="PATH")
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
    scan.add_argument("--sha256", action="store_true", help="hash every file (identity for reports and waivers)")
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
    suggest.add_argument("--base", default="default", metavar="NAME|FILE", help="policy to extend (default: default)")


def _add_audit(sub: Any) -> None:
    from safeload import cli_audit

    cli_audit.register(sub)


# In the order `--help` lists them.
_COMMANDS: dict[str, Callable[[Any], None]] = {"scan": _add_scan, "policy": _add_policy, "audit": _add_audit}


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


def iter_inputs(paths: Sequence[str]) -> Iterator[tuple[str, bool]]:
    """Yield (path, named): named is False for files found by walking a directory."""
    seen: set[str] = set()
    for given in paths:
        if os.path.isdir(given):
            for root, dirs, files in os.walk(given):
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(root, name)
                    key = os.path.realpath(path)
                    if key not in seen and os.path.isfile(path):
                        seen.add(key)
                        yield path, False
        else:
            key = os.path.realpath(given)
            if key not in seen:
                seen.add(key)
                yield given, True


def exit_code_for(verdicts: Sequence[str]) -> int:
    if "UNSAFE" in verdicts:
        return EXIT_UNSAFE
    if "UNSCANNABLE" in verdicts:
        return EXIT_INCOMPLETE
    return EXIT_CLEAN


def _cmd_scan(args: argparse.Namespace) -> int:
    from safeload.api import resolve_policy, scan
    from safeload.gcpause import FrozenHeap
    from safeload.model import ScanRun
    from safeload.report import render

    policy = resolve_policy(args.policy, args.allow)
    reports = []
    skipped = []
    with FrozenHeap():  # what the imports made lives as long as the command: no collection examines it
        for path, named in iter_inputs(args.paths):
            if not named and _is_ref(path):
                skipped.append(path)  # as the audit lists a Hugging Face cache's refs/main
                continue
            report = scan(path, policy=policy, sha256=True if args.sha256 else None, regular_only=not named)
            if (not named or args.skip_non_model) and report.no_model_format:
                skipped.append(path)
                continue
            reports.append(report)
    code = exit_code_for([r.verdict.value for r in reports])
    run = ScanRun(version=__version__, policy=policy.name, reports=tuple(reports), skipped=tuple(skipped), exit_code=code)
    _emit(render(run, args.format, verbose=args.verbose), args.output)
    return code


def _is_ref(path: str) -> bool:
    from safeload.audit_walk import is_ref

    try:
        return is_ref(path, os.stat(path))
    except OSError:
        return False  # the scan reports why it cannot read it


def _emit(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    from safeload.atomic import write_if_changed

    write_if_changed(output, text)  # never a half-written report


def _cmd_policy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from safeload.policy import builtin_policy_names, load_policy, policy_to_toml

    if args.policy_command == "show":
        sys.stdout.write(policy_to_toml(load_policy(args.name)))
        return EXIT_CLEAN
    if args.policy_command == "validate":
        for file in args.files:
            policy = load_policy(Path(file))
            print(f"{file}: valid policy {policy.name!r} ({len(policy.allowed)} allowed globals)")
        return EXIT_CLEAN
    if args.policy_command == "list":
        for name in builtin_policy_names():
            print(name)
        return EXIT_CLEAN
    if args.policy_command == "suggest":
        from safeload.suggest import suggest_policy

        sys.stdout.write(suggest_policy(args.files, base=args.base))
        return EXIT_CLEAN
    raise UsageError("safeload policy: choose an action: show, validate, list, suggest")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in _COMMANDS else None)
    try:
        args = parser.parse_args(argv)
        if args.command == "scan":
            return _cmd_scan(args)
        if args.command == "policy":
            return _cmd_policy(args)
        if args.command == "audit":
            from safeload import cli_audit

            return cli_audit.run(args)
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("safeload: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Imported only now: safeload.errors imports pickle, which a replayed audit has no use for.
        from safeload.errors import PolicyError, SafeloadError

        if isinstance(exc, PolicyError):
            print(f"safeload: policy error: {exc.diagnostics()}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, SafeloadError):
            print(f"safeload: {exc.diagnostics()}", file=sys.stderr)
            return EXIT_INCOMPLETE
        if isinstance(exc, BrokenPipeError):
            return EXIT_INCOMPLETE
        raise


def entry() -> NoReturn:
    # pydantic looks for plugins in the metadata of every installed distribution the first time a
    # model class is built: ~0.1 s in a venv with torch, paid by every run that validates a user's
    # policy file (built-in ones are read without pydantic). safeload's models have no use for
    # plugins (observability hooks on validation). A value the user set is kept.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, OSError):
        code = code or EXIT_INCOMPLETE
    # Everything the command wrote is closed or flushed by now (reports are written and renamed,
    # the cache is closed, worker pools are joined). What is left is the interpreter freeing every
    # object one by one: ~0.1 s after an audit of 5,000 files, for nothing. mypy exits the same way.
    os._exit(code)
