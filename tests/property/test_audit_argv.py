"""An audit's argv read without argparse (audit_argv) is read exactly as argparse reads it, or
left to argparse: never another meaning for the same command line."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from safeload.audit_argv import read_audit_argv
from safeload.cli import UsageError
from safeload.cli_parser import build_parser
from safeload.report import FORMATS

CHOICES = sorted(FORMATS)

OPTIONS = [
    "--policy", "--allow", "--jobs", "-j", "--format", "-o", "--output", "--cache", "--rehash",
    "--baseline", "--compare", "--no-progress", "-v", "--verbose",
]  # fmt: skip
# What argparse also understands, or refuses: each must be left to it.
TRICKY = [
    "--help", "-h", "--version", "--cache=c", "--cach", "--verb", "-vo", "-j2", "--", "-", "-1",
    "--no-progress=1", "-x", "--jobs=2",
]  # fmt: skip
VALUES = [
    "a",
    "b c",
    "",
    "3",
    "0",
    "-2",
    " 4 ",
    "+5",
    "1_0",
    "٣",
    "x=y",
    "audit",
    "json",
    "html",
    "nope",
    "-",
]


def _argparse(argv: list[str]) -> dict[str, object] | None:
    try:
        return vars(build_parser("audit").parse_args(argv))
    except (UsageError, SystemExit):
        return None


tokens = st.lists(st.sampled_from(OPTIONS + TRICKY + VALUES + CHOICES), max_size=9)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens)
@example(["models", "--cache", "c", "--jobs", "2", "--format", "json", "-o", "r.json", "--no-progress"])
@example(["--cache", "c", "a", "b"])
@example(["a", "-v", "b"])
def test_what_it_reads_argparse_reads_the_same(rest: list[str]) -> None:
    argv = ["audit", *rest]
    plain = read_audit_argv(argv, CHOICES)
    if plain is None:
        return
    parsed = _argparse(argv)
    assert parsed is not None, f"argparse refuses {argv!r}, which was read as {plain!r}"
    assert vars(plain) == parsed


@pytest.mark.parametrize(
    "rest",
    [
        ["models"],
        [
            "models",
            "more",
            "--cache",
            "c",
            "--jobs",
            "2",
            "--format",
            "json",
            "-o",
            "r.json",
            "--no-progress",
        ],
        ["--cache", "c", "-j", "1", "models"],
        ["models", "--policy", "strict", "--allow", "a.B", "--allow", "c.D", "--compare", "strict", "-v"],
        ["models", "--baseline", "old.json", "--rehash", "--output", "r.html", "--verbose", "--jobs", "3"],
    ],
)
def test_a_registry_job_s_command_line_is_read_without_argparse(rest: list[str]) -> None:
    """The lines a registry's job runs: read here (not left to argparse), as argparse reads them."""
    plain = read_audit_argv(["audit", *rest], CHOICES)
    assert plain is not None
    assert vars(plain) == _argparse(["audit", *rest])


@pytest.mark.parametrize(
    "rest",
    [
        [],
        ["--cache", "c"],
        ["a", "-v", "b"],
        ["a", "--jobs", "two"],
        ["a", "--format", "pdf"],
        ["a", "--cache"],
        ["a", "--cache", "-c"],
        ["a", "--cache=c"],
        ["a", "--cach", "c"],
        ["a", "-vo", "r"],
        ["a", "--help"],
        ["-", "a"],
        ["a", "--", "b"],
    ],
)
def test_anything_else_is_left_to_argparse(rest: list[str]) -> None:
    assert read_audit_argv(["audit", *rest], CHOICES) is None


def test_only_an_audit_is_read() -> None:
    for argv in ([], ["scan", "a"], ["--version"], ["policy", "list"], ["audits", "a"]):
        assert read_audit_argv(argv, CHOICES) is None
