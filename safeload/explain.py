"""Decompiled Python for a flagged stream, made with fickling. The only module that imports fickling.

fickling parses and symbolically interprets the opcodes; it never imports or calls what the
stream names. It is used for explanation only, never for the verdict.
"""

from __future__ import annotations

import ast
import contextlib
import sys
import threading
from collections.abc import Iterable, Iterator

# fickling builds a full AST and unparses it: about 10 us a byte on a hostile stream (a dict of
# 150,000 one-byte items), against well under 0.1 us for the walk. Keep the explanation from
# being the expensive part of a scan: one stream up to this size is decompiled ...
MAX_EXPLAIN_BYTES = 256 << 10
# ... and all the streams of one scan together up to this (an archive of many flagged pickles
# would otherwise cost seconds for each), and no more than this many (each call costs about
# 0.2 ms however small the stream; a report with thousands of explanations helps nobody).
MAX_EXPLAIN_TOTAL = 512 << 10
MAX_EXPLAINED_STREAMS = 32
MAX_EXPLAIN_LINES = 40
MAX_LINE_CHARS = 300


class ExplainBudget:
    """The bytes one scan may still have decompiled."""

    def __init__(self, total: int = MAX_EXPLAIN_TOTAL, streams: int = MAX_EXPLAINED_STREAMS) -> None:
        self.left = total
        self.streams = streams

    def take(self, size: int) -> bool:
        if size > self.left or self.streams <= 0:
            return False
        self.left -= size
        self.streams -= 1
        return True


def explain(
    data: bytes | memoryview, focus: Iterable[str] = (), budget: ExplainBudget | None = None
) -> str | None:
    """Python source equivalent to what the unpickler would do, cut to the lines that touch `focus`.

    `focus` holds qualified names of flagged globals; a long stream is reduced to the lines that
    import or use them so the dangerous part is what a reader sees. None for a stream over
    MAX_EXPLAIN_BYTES, or past what ``budget`` (the scan's) has left.
    """
    if len(data) > MAX_EXPLAIN_BYTES or (budget is not None and not budget.take(len(data))):
        return None
    try:
        from fickling.fickle import Pickled

        with _quiet():
            source = ast.unparse(Pickled.load(bytes(data)).ast)
    except Exception:  # fickling rejects what it cannot parse; the walker already reported why
        return None
    lines = source.splitlines()
    if len(lines) > MAX_EXPLAIN_LINES:
        short_names = {name.rsplit(".", 1)[-1] for name in focus}
        picked = [line for line in lines if any(n and n in line for n in short_names)]
        lines = picked[:MAX_EXPLAIN_LINES] or lines[:MAX_EXPLAIN_LINES]
        lines.append("# ... (only the lines that use flagged globals are shown)")
    return "\n".join(line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + " ..." for line in lines)


# fickling writes "Warning: malformed pickle file ..." to sys.stdout and sys.stderr itself, and
# hostile streams are malformed on purpose: on stdout that would break `safeload scan --format
# json` and every other report written there. Only this thread's writes are dropped; another
# thread writing meanwhile reaches the real stream.
_muted = threading.local()
_swap = threading.Lock()


class _ThisThreadMuted:
    def __init__(self, real: object) -> None:
        self.real = real

    def write(self, text: str) -> int:
        if getattr(_muted, "on", False):
            return len(text)
        return self.real.write(text)  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with _swap:
        out, err = _ThisThreadMuted(sys.stdout), _ThisThreadMuted(sys.stderr)
        sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    _muted.on = True
    try:
        yield
    finally:
        _muted.on = False
        with _swap:
            # Put back only what is still ours: whoever replaced it meanwhile keeps theirs.
            if sys.stdout is out:
                sys.stdout = out.real  # type: ignore[assignment]
            if sys.stderr is err:
                sys.stderr = err.real  # type: ignore[assignment]
