"""Command line. The only module that reads argv, prints or exits (cli_parser builds its parser,
audit_argv reads a plainly written audit without one).

Exit codes: 0 clean, 1 unsafe (wins over 2), 2 something could not be fully analysed,
3 usage or policy error.
"""

from __future__ import annotations

import os
import sys

from safeload import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: a replayed audit never needs it
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator, Sequence
    from typing import NoReturn


EXIT_CLEAN = 0
EXIT_UNSAFE = 1
EXIT_INCOMPLETE = 2
EXIT_USAGE = 3


class UsageError(Exception):
    pass


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
            # "-": one file piped in (an upload, a download); read once, to its end, bounded.
            given = sys.stdin.buffer if path == "-" and named else path
            report = scan(given, policy=policy, sha256=True if args.sha256 else None, regular_only=not named)
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
    try:
        if argv[:1] == ["audit"]:
            # A plainly written audit (as a registry's job runs it, again and again) is read
            # without argparse: what it costs to import and build is an eighth of a replay.
            from safeload.audit_argv import read_audit_argv
            from safeload.report import FORMATS

            plain = read_audit_argv(argv, sorted(FORMATS))
            if plain is not None:
                from safeload import cli_audit

                return cli_audit.run(plain)
        from safeload.cli_parser import COMMANDS, build_parser

        parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
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
