"""escape: what names from files look like on terminals and in reports."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from safeload.text import escape


def _char_by_char(text: str, limit: int) -> str:
    """The definition: every character that is not printable, and the backslash, escaped."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # surrogateescape's stand-in for a byte
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    result = "".join(out)
    return result if len(result) <= limit else result[: limit - 3] + "..."


@given(st.text(), st.integers(min_value=4, max_value=400))
def test_every_string_escapes_as_defined(text: str, limit: int) -> None:
    assert escape(text, limit) == _char_by_char(text, limit)


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\\"), max_size=50))
def test_plain_text_is_returned_as_it_is(text: str) -> None:
    if text.isprintable():
        assert escape(text) == text


def test_forged_terminal_output_is_escaped() -> None:
    assert escape("os.system\x1b[2K\rSAFE\n") == "os.system\\x1b[2K\\x0dSAFE\\x0a"
    assert escape("a\\x1b") == "a\\\\x1b"  # a literal backslash cannot pass for an escape
    assert escape("\u202eevil") == "\\u202eevil"  # bidi override: not printable
    assert escape("x" * 10, 8) == "xxxxx..."
    assert escape(b"\x00") == "b'\\\\x00'"  # a non-string is shown as its repr, escaped


def test_a_byte_no_utf8_can_carry_shows_as_that_byte() -> None:
    """A path of bytes that are not UTF-8 reaches safeload through surrogateescape; shown as the
    byte, as in the JSON report, not as the surrogate that stands in for it."""
    name = b"bad\xffname\x80.pkl".decode("utf-8", "surrogateescape")
    assert escape(name) == "bad\\xffname\\x80.pkl"
    assert escape("\udc7f\ud800") == "\\udc7f\\ud800"  # other lone surrogates stay as they are
    # A character that is no byte never reads as one: the byte 0x85 and U+0085 (NEL) differ.
    assert escape("\x85\xa0") == "\\u0085\\u00a0"
    assert escape(b"\x85".decode("utf-8", "surrogateescape")) == "\\x85"
