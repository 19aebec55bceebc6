"""`safeload audit`: command-line glue around safeload.audit (arguments, progress, writing the report)."""

from __future__ import annotations

import os
import sys
import time

from safeload.atomic import write_if_changed
from safeload.gcpause import fewer_collections
from safeload.text import escape

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing: a replayed audit never needs it
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from safeload.audit_argv import AuditArgs

    Args = argparse.Namespace | AuditArgs

EXIT_USAGE = 3
# Only when --format is not given: the output file's name says what the user wants written.
_SUFFIX_FORMATS = {
    ".html": "html",
    ".htm": "html",
    ".json": "json",
    ".sarif": "sarif",
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
}


def register(subparsers: Any) -> None:
    from safeload.report import FORMATS

    p = subparsers.add_parser(
        "audit",
        help="audit a model registry: every distinct file scanned once, in parallel, with a cache",
        description="Audit directories and files. Hugging Face cache layouts are understood (snapshots "
        "linking to blobs: each blob is scanned once and reported under every link); files with the same "
        "sha256 are scanned once (once per worker with --jobs). The report lists per file the verdict, sha256, size, formats and "
        "findings, an inventory of globals, and which files each policy would refuse.",
        epilog="Exit codes as for scan: 0 clean, 1 unsafe, 2 something could not be analysed, 3 usage "
        "or policy error. With --baseline, only new findings count.",
    )
    p.add_argument("paths", nargs="+", metavar="DIR|FILE")
    p.add_argument(
        "--policy", default="default", metavar="NAME|FILE", help="policy to audit with (default: default)"
    )
    p.add_argument(
        "--allow", action="append", default=[], metavar="NAME", help="also allow this exact global"
    )
    p.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=None,
        metavar="N",
        help="worker processes (default: one per CPU, at most 8; none for fewer than 150 files "
        "of under 64 MB in all, which are scanned in this process)",
    )
    p.add_argument(
        "--format", choices=sorted(FORMATS), default=None, help="report format (default: from -o, else text)"
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the report to FILE (atomically) instead of stdout; a directory walk that meets FILE "
        "leaves it out",
    )
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="reuse results by (sha256, policy, safeload version) from DIR; an unchanged tree audited "
        "the same way replays the last report (when it does not, stderr says what changed)",
    )
    p.add_argument(
        "--rehash",
        action="store_true",
        help="hash every file again even when its stat is unchanged (and replay no report)",
    )
    p.add_argument(
        "--baseline", metavar="FILE", help="an earlier JSON report: show and count only what is new"
    )
    p.add_argument(
        "--compare",
        action="append",
        default=None,
        metavar="POLICY",
        help="built-in policy to check every file against (repeatable; default: strict and default)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-file lines on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="list every global and info finding")


def output_format(fmt: str | None, output: str | None) -> str:
    if fmt:
        return fmt
    if output:
        return _SUFFIX_FORMATS.get(os.path.splitext(output)[1].lower(), "text")
    return "text"


# An audit builds a report per file, and its cached run reads a stored one: tens of thousands of
# acyclic objects that each trigger young collections and, as they pile up, full ones (0.1 s of a
# 2 s audit of 5,000 files, 7% of its cached re-run).
@fewer_collections
def run(args: Args) -> int:
    fmt = output_format(args.format, args.output)
    started = time.monotonic()
    # A usage error is reported whether or not a report could be replayed (audit() says which).
    usable_jobs = args.jobs is None or args.jobs >= 1
    memo = _memo(args, fmt) if args.cache and not args.rehash and usable_jobs else None
    replay = memo.lookup(args.output) if memo is not None else None
    if replay is not None:
        if replay.report is not None:
            _write(args.output, replay.report)
        memo.replayed(replay, args.output)
        print(
            f"safeload audit: {replay.paths} paths, {replay.files} distinct files, 0 scanned, "
            f"{replay.files} from cache, {replay.skipped} skipped in {time.monotonic() - started:.1f}s "
            f"(nothing changed since the last audit: its report replayed); exit {replay.exit_code}",
            file=sys.stderr,
        )
        return replay.exit_code
    if memo is not None and memo.miss is not None:
        print(f"safeload audit: not replaying the last report: {memo.miss}", file=sys.stderr)

    from pathlib import Path

    from safeload.audit import COMPARED_POLICIES, AuditError, AuditOptions, audit
    from safeload.audit_cache import wait_for_commits
    from safeload.report import render_bytes

    options = AuditOptions(
        policy=args.policy,
        allow=tuple(args.allow),
        jobs=args.jobs,
        cache_dir=Path(args.cache) if args.cache else None,
        baseline=Path(args.baseline) if args.baseline else None,
        rehash=args.rehash,
        compare=tuple(args.compare) if args.compare else COMPARED_POLICIES,
        report=Path(args.output) if args.output else None,
    )
    try:
        with _ProgressDisplay(enabled=not args.no_progress) as progress:
            result = audit(
                args.paths,
                options,
                progress=progress,
                groups=memo.groups if memo else None,
                wait_for_cache=False,  # its last commit goes on while the report is written
            )
    except AuditError as exc:
        print(f"safeload audit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = render_bytes(result, fmt, verbose=args.verbose)
        _write(args.output, report)
        s, c = result.stats, result.counts
        if memo is not None and c.replayable:
            memo.store(
                report,
                exit_code=result.exit_code,
                paths=s.paths,
                files=s.files,
                skipped=len(result.skipped),
                sources=c.policy_sources,
                valid_until=c.changes_on,
                output=args.output,
            )
    finally:
        wait_for_commits()  # the run is over once the cache holds what it learned
    print(
        f"safeload audit: {s.paths} paths, {s.files} distinct files, {c.scanned} scanned, {c.from_cache} from cache, "
        f"{len(result.skipped)} skipped in {time.monotonic() - started:.1f}s; exit {result.exit_code}",
        file=sys.stderr,
    )
    return result.exit_code


def _memo(args: Args, fmt: str) -> Any:
    from safeload.audit_memo import RunMemo, RunSpec
    from safeload.audit_runs import RunStore

    spec = RunSpec(
        paths=tuple(args.paths),
        policy=args.policy,
        allow=tuple(args.allow),
        compare=tuple(args.compare or ()),
        fmt=fmt,
        verbose=args.verbose,
        baseline=args.baseline,
    )
    return RunMemo(RunStore(args.cache), spec, exclude=[args.cache], report=args.output)


def _write(output: str | None, report: str | bytes) -> None:
    if output:
        write_if_changed(output, report)
    elif isinstance(report, bytes):
        sys.stdout.write(report.decode("utf-8"))
    else:
        sys.stdout.write(report)


# Plain progress lines are written together, at most this often: a write each costs a registry
# of small files a few percent of its audit (stderr is line-buffered), and a log reads the same.
_PLAIN_EVERY_S = 0.1


class _ProgressDisplay:
    """A rich progress bar on a terminal, one plain line per file otherwise, nothing when disabled."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.task: Any = None
        self._lines: list[str] = []
        self._written = time.monotonic()

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("auditing"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                # a file name is no rich markup: "[/]" in one would otherwise end the progress bar
                TextColumn("{task.fields[last]}", markup=False),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("audit", total=None, last="")
        return self.update

    def update(self, event: Any) -> None:
        if self.bar is not None:
            last = "" if event.path is None else escape(os.path.basename(event.path), 60)
            self.bar.update(self.task, total=event.total, completed=event.done, last=last)
            return
        if event.path is not None:
            cached = " (cached)" if event.cached else ""
            self._lines.append(
                f"[{event.done}/{event.total}] {'skipped' if event.skipped else event.verdict.value:<11} "
                f"{escape(event.path)}{cached}\n"
            )
            now = time.monotonic()
            if now - self._written >= _PLAIN_EVERY_S or event.done == event.total:
                self._write_lines(now)

    def _write_lines(self, now: float) -> None:
        if self._lines:
            sys.stderr.write("".join(self._lines))
            sys.stderr.flush()
            self._lines = []
        self._written = now

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
        self._write_lines(time.monotonic())  # what is left, even when interrupted
