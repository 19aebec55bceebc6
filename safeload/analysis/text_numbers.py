"""The text arguments of INT, LONG and FLOAT (protocol 0), read as CPython's C unpickler reads them.

pickle.load, numpy.load and torch.load run the C unpickler, which parses these lines with C string
functions; pickle.py's pure-Python unpickler (which the restricted loader builds on) uses Python's
int() and float(), and the two differ:

* INT: C takes ``strtol(line, base 0)`` (leading whitespace, a sign, 0x hex, a leading 0 for octal,
  digits up to the first other character) and accepts it when the newline or a NUL comes next; a
  3-byte line (two characters and the newline) worth 0 or 1 is a bool. Otherwise, or on overflow of
  a C long, Python's int(line, 0). pickle.py: int(line, 0) only, a bool only for "00"/"01". So
  "I-0" is False to C and 0 to pickle.py; "I010" is 8 to C and an error to pickle.py.
* LONG: Python's int(line, 0) on the line up to a NUL, one trailing "L" dropped: both agree but
  for the NUL.
* FLOAT: C's PyOS_string_to_double: no surrounding whitespace, no underscores, an overflow is an
  error, and parsing stops at the newline or a NUL. pickle.py: float(line).

Each function takes the line without its newline and returns None where C raises.
"""

from __future__ import annotations

import math
import re

_C_SPACE = b" \t\n\v\f\r"
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1  # a C long on the 64-bit platforms torch ships for
_HEX = b"0123456789abcdefABCDEF"
_FLOAT = re.compile(rb"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.IGNORECASE)


def _c_string(line: bytes) -> bytes:
    """The line with its newline, as far as C string functions see it (up to the first NUL)."""
    return (line + b"\n").split(b"\0", 1)[0]


def _strtol(s: bytes) -> tuple[int, int, bool]:
    """strtol(s, &end, 0): (value, index of end, overflowed)."""
    i, n = 0, len(s)
    while i < n and s[i] in _C_SPACE:
        i += 1
    negative = i < n and s[i] == 0x2D
    if i < n and s[i] in b"+-":
        i += 1
    base = 10
    if i < n and s[i] == 0x30:  # "0": octal, or hex when "x" and a hex digit follow
        if i + 2 < n and s[i + 1] in b"xX" and s[i + 2] in _HEX:
            base, i = 16, i + 2
        else:
            base = 8
    allowed = _HEX[: base if base <= 10 else 22]
    start = i
    while i < n and s[i] in allowed:
        i += 1
    if i == start:
        return 0, 0, False  # no conversion: the end is the start of the string
    value = int(s[start:i], base)
    value = -value if negative else value
    return value, i, not _LONG_MIN <= value <= _LONG_MAX


def _python_int(s: bytes) -> int | None:
    try:
        return int(s, 0)
    except ValueError:
        return None


def int_arg(line: bytes) -> int | None:
    """INT's value (a bool for a two-character 0 or 1); None where the C unpickler raises."""
    if not line:
        return None  # a line of just the newline: "pickle data was truncated"
    s = _c_string(line)
    value, end, overflow = _strtol(s)
    if not overflow and s[end : end + 1] in (b"\n", b""):
        return bool(value) if len(line) == 2 and value in (0, 1) else value
    return _python_int(s)


def long_arg(line: bytes) -> int | None:
    """LONG's value; None where the C unpickler raises."""
    if not line:
        return None
    if line.endswith(b"L"):
        line = line[:-1]
    return _python_int(_c_string(line))


def float_arg(line: bytes) -> float | None:
    """FLOAT's value; None where the C unpickler raises (no number, other text after it, overflow)."""
    if not line:
        return None
    s = _c_string(line)
    match = _FLOAT.match(s)
    if match is None or s[match.end() : match.end() + 1] not in (b"\n", b""):
        return None
    text = match.group(0)
    value = float(text)
    if math.isinf(value) and b"inf" not in text.lower():
        return None  # overflow: C raises OverflowError
    return value
