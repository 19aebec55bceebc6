"""Report renderers. They read the result model; they never scan."""

from __future__ import annotations

from collections.abc import Callable

from safeload.model import ScanRun
from safeload.report.text import render_run


def _json(run: ScanRun, *, verbose: bool = False) -> str:
    return run.model_dump_json(indent=2) + "\n"


Renderer = Callable[..., str]

FORMATS: dict[str, Renderer] = {"text": render_run, "json": _json}


def render(run: ScanRun, fmt: str, *, verbose: bool = False) -> str:
    return FORMATS[fmt](run, verbose=verbose)
