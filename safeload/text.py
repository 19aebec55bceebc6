"""Printing attacker-controlled strings safely."""

from __future__ import annotations

_MAX = 300


def escape(value: object, limit: int = _MAX) -> str:
    """Render a string from a file with control and non-printable characters escaped.

    Names from files reach terminals, logs and reports; a raw ESC or newline could forge output.
    """
    text = value if isinstance(value, str) else repr(value)
    if text.isprintable() and "\\" not in text:
        # Almost every name is plain text: a progress line or report row per file must not pay
        # for a loop over its characters.
        return text if len(text) <= limit else text[: limit - 3] + "..."
    out = []
    for ch in text:
        if ch.isprintable() and ch not in "\\":
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        else:
            code = ord(ch)
            if code < 0x80:
                out.append(f"\\x{code:02x}")
            elif 0xDC80 <= code <= 0xDCFF:
                # A byte that is no UTF-8, carried by surrogateescape (a path or member name made
                # of bytes): shown as that byte, as the JSON report writes it. So \x80 and above
                # name bytes only, and a character there (U+0085) is written \u0085.
                out.append(f"\\x{code - 0xDC00:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    result = "".join(out)
    if len(result) > limit:
        result = result[: limit - 3] + "..."
    return result
