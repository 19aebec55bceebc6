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

# fickling builds a full AST; keep hostile streams from making the explanation the expensive part.
MAX_EXPLAIN_BYTES = 1 << 20
MAX_EXPLAIN_LINES = 40
MAX_LINE_CHARS = 300


def explain(data: bytes | memoryview, focus: Iterable[str] = ()) -> str | None:
    """Python source equivalent to what the unpickler would do, cut to the lines that touch `focus`.

    `focus` holds qualified names of flagged globals; a long stream is reduced to the lines that
    import or use them so the dangerous part is what a reader sees.
    """
    if len(data) > MAX_EXPLAIN_BYTES:
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
