"""Compression wrappers: real streams from the real libraries, malicious payloads, bombs, damage."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import random
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import joblib
import lz4.frame
import numpy as np
import pytest
import zstandard
from joblib.numpy_pickle_compat import write_zfile

from safeload.formats import compressed
from safeload.limits import Limits
from tests.pickle_builder import (
    call,
    exec_payload,
    marker_code,
    real_load_in_subprocess,
    stack_global,
    unicode,
    wrap,
)
from tests.unit.formats._samples import codes, foreign_samples, imports, make_ctx

BENIGN = pickle.dumps({"weights": list(range(200)), "name": "model"}, protocol=4)

WRITERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "bz2": bz2.compress,
    "xz": lzma.compress,
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "zlib": zlib.compress,
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "lz4": lz4.frame.compress,
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_real_stream_gives_one_child_with_the_exact_bytes(kind: str) -> None:
    data = WRITERS[kind](BENIGN)
    buf = memoryview(data)
    assert compressed.sniff(buf)
    assert compressed.detect(buf) == kind
    result = compressed.read(buf, make_ctx(encoding=("outer",)))
    assert result.format == kind
    assert codes(result) == []
    assert len(result.children) == 1
    child = result.children[0]
    assert bytes(child.data) == BENIGN
    assert child.encoding == ("outer", kind)
    assert child.file_offset is None
    assert result.meta["complete"] is True
    assert result.meta["decompressed_bytes"] == len(BENIGN)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_malicious_payload_is_handed_on_intact(kind: str, marker: Path) -> None:
    payload = exec_payload(marker)
    result = compressed.read(memoryview(WRITERS[kind](payload)), make_ctx())
    assert bytes(result.children[0].data) == payload
    assert imports(result.children[0].data) == ["builtins.exec"]
    assert codes(result) == []


@pytest.mark.parametrize("name", sorted(foreign_samples()))
def test_sniff_does_not_claim_other_formats(name: str) -> None:
    sample = foreign_samples()[name]
    expected = name in ("gzip", "bz2", "xz")
    assert compressed.sniff(memoryview(sample)) is expected


def test_multi_member_gzip_reads_every_member(marker: Path) -> None:
    # gzip.open reads on across members, so a payload in the second member is live.
    data = gzip.compress(BENIGN) + gzip.compress(exec_payload(marker))
    assert gzip.decompress(data) == BENIGN + exec_payload(marker)
    result = compressed.read(memoryview(data), make_ctx())
    assert codes(result) == []
    assert bytes(result.children[0].data) == BENIGN + exec_payload(marker)
    assert result.meta["streams"] == 2


@pytest.mark.parametrize("kind", ["bz2", "xz", "lz4", "zstd"])
def test_concatenated_streams_are_all_read(kind: str, marker: Path) -> None:
    data = WRITERS[kind](BENIGN) + WRITERS[kind](exec_payload(marker))
    result = compressed.read(memoryview(data), make_ctx())
    assert codes(result) == []
    assert bytes(result.children[0].data) == BENIGN + exec_payload(marker)


def test_zero_padding_after_gzip_is_not_a_finding() -> None:
    data = gzip.compress(BENIGN) + bytes(1000)
    result = compressed.read(memoryview(data), make_ctx())
    assert codes(result) == []
    assert len(result.children) == 1


def test_trailing_garbage_is_handed_on_and_reported(marker: Path) -> None:
    payload = exec_payload(marker)
    data = bz2.compress(BENIGN) + payload
    result = compressed.read(memoryview(data), make_ctx(file_offset=100))
    assert codes(result) == ["SL205"]
    assert bytes(result.children[0].data) == BENIGN
    tail = result.children[1]
    assert tail.name == "<after-bz2>"
    assert bytes(tail.data) == payload
    assert tail.file_offset == 100 + len(data) - len(payload)


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_every_truncation_is_sl205_and_never_raises(kind: str) -> None:
    data = WRITERS[kind](BENIGN)
    for cut in range(0, len(data), max(1, len(data) // 40)):
        buf = memoryview(data[:cut])
        if not compressed.sniff(buf):
            continue
        result = compressed.read(buf, make_ctx())
        assert "SL205" in codes(result), cut
        # What came out is a prefix of the real content, handed on so its imports get scanned.
        out = b"".join(bytes(c.data) for c in result.children)
        assert BENIGN.startswith(out)


def test_truncated_stream_hands_on_the_decompressed_prefix(marker: Path) -> None:
    payload = exec_payload(marker)
    # Incompressible filler after the payload makes the payload come out before the cut.
    data = lzma.compress(payload + random.Random(1).randbytes(200_000))
    result = compressed.read(memoryview(data[: len(data) // 2]), make_ctx())
    assert codes(result) == ["SL205"]
    prefix = bytes(result.children[0].data)
    assert prefix.startswith(payload)


@pytest.mark.parametrize("kind", ["gzip", "bz2", "xz", "zlib"])
def test_byte_flips_never_raise_and_checked_formats_report_them(kind: str) -> None:
    data = WRITERS[kind](BENIGN)
    rng = random.Random(kind)
    for _ in range(60):
        flipped = bytearray(data)
        pos = rng.randrange(len(flipped))
        flipped[pos] ^= 1 << rng.randrange(8)
        buf = memoryview(bytes(flipped))
        if not compressed.sniff(buf):
            continue
        result = compressed.read(buf, make_ctx())
        # These formats carry checksums over the content: damage never reads as clean.
        if b"".join(bytes(c.data) for c in result.children) != BENIGN:
            assert "SL205" in codes(result), pos


def _live(build: Callable[[Path], bytes], tmp_path: Path, mode: str) -> None:
    """The real loader (pickle.load through Python's file reader, in a subprocess) runs the payload
    of the file ``build`` makes for a marker: the trick is live."""
    workdir = tmp_path / "live"
    workdir.mkdir()
    ran = workdir / "RAN"
    proc = real_load_in_subprocess(build(ran), workdir, mode=mode)
    assert ran.exists(), proc.stderr.decode()


def _bad_trailer(member: bytes, field: str) -> bytes:
    """A gzip member whose CRC-32 or length trailer no longer matches its data."""
    at = len(member) - (8 if field == "crc" else 4)
    return member[:at] + bytes(b ^ 0xFF for b in member[at : at + 4]) + member[at + 4 :]


@pytest.mark.parametrize("field", ["crc", "length"])
def test_gzip_bad_trailer_is_reported_and_its_member_still_scanned(
    field: str, marker: Path, tmp_path: Path
) -> None:
    # gzip.py checks the trailer at the read after the member's data: the unpickler has run it by then.
    _live(lambda m: _bad_trailer(gzip.compress(exec_payload(m)), field), tmp_path, "gzip")
    data = _bad_trailer(gzip.compress(exec_payload(marker)), field)
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(data)
    result = compressed.read(memoryview(data), make_ctx())
    assert codes(result) == ["SL205"]
    assert ("CRC check failed" if field == "crc" else "incorrect length") in result.findings[0].message
    assert bytes(result.children[0].data) == exec_payload(marker)
    assert imports(result.children[0].data) == ["builtins.exec"]


def test_no_member_after_a_bad_trailer_is_read(marker: Path) -> None:
    # gzip.py raises when it reaches the next member: its bytes never reach a loader.
    data = _bad_trailer(gzip.compress(BENIGN), "crc") + gzip.compress(exec_payload(marker))
    result = compressed.read(memoryview(data), make_ctx())
    assert codes(result) == ["SL205"]
    assert [bytes(c.data) for c in result.children] == [BENIGN]


def _gzip_header(flags: int, fields: bytes, member: bytes) -> bytes:
    """``member`` (as gzip.compress writes it: a 10-byte header, no optional field) with header
    ``flags`` and the optional ``fields`` those flags announce."""
    return member[:3] + bytes([flags]) + member[4:10] + fields + member[10:]


GZIP_HEADERS = {
    # Bits 5-7 are reserved: zlib refuses them, gzip.py never looks at them.
    "reserved-flag-bits": (0xE0, b""),
    # gzip.py reads the header CRC and never checks it; zlib does.
    "wrong-header-crc": (0x02, b"\xde\xad"),
    "every-optional-field": (
        0x04 | 0x08 | 0x10 | 0x02,
        b"\x03\x00abc" + b"name.pkl\x00" + b"a comment\x00" + b"\x00\x00",
    ),
}


@pytest.mark.parametrize("header", sorted(GZIP_HEADERS))
def test_gzip_headers_are_read_as_gzip_py_reads_them(header: str, marker: Path, tmp_path: Path) -> None:
    flags, fields = GZIP_HEADERS[header]
    _live(lambda m: _gzip_header(flags, fields, gzip.compress(exec_payload(m))), tmp_path, "gzip")
    data = _gzip_header(flags, fields, gzip.compress(exec_payload(marker)))
    if header != "every-optional-field":
        with pytest.raises(zlib.error):
            zlib.decompress(data, 31)  # what a reader built on zlib's gzip mode would say
    result = compressed.read(memoryview(data), make_ctx())
    assert codes(result) == []
    assert bytes(result.children[0].data) == exec_payload(marker)


def test_a_name_field_of_any_length_is_read_without_holding_it(marker: Path) -> None:
    name = b"n" * (3 * compressed.IN_CHUNK + 5) + b"\x00"
    data = _gzip_header(0x08, name, gzip.compress(exec_payload(marker)))
    assert gzip.decompress(data) == exec_payload(marker)
    result = compressed.read(memoryview(data), make_ctx())
    assert codes(result) == []
    assert bytes(result.children[0].data) == exec_payload(marker)


def test_output_before_a_failing_check_is_scanned(marker: Path, tmp_path: Path) -> None:
    """A decoder call that raises returns nothing of what it decoded; lzma.open's reader asks for
    8 KiB at a time and hands the loader the payload before the block's check fails."""

    def build(m: Path) -> bytes:
        damaged = bytearray(lzma.compress(exec_payload(m) + random.Random(2).randbytes(40_000)))
        damaged[-40] ^= 0x10  # inside the last block: its check fails at the block's end
        return bytes(damaged)

    _live(build, tmp_path, "xz")
    data = build(marker)
    assert len(data) < compressed.IN_CHUNK  # one call of the first reading decodes it all
    result = compressed.read(memoryview(data), make_ctx())
    assert codes(result) == ["SL205"]
    assert "corrupt" in result.findings[0].message
    out = bytes(result.children[0].data)
    assert out.startswith(exec_payload(marker)) and len(out) > 30_000
    assert imports(out) == ["builtins.exec"]


def _binary_exec(marker: Path, before: bytes = b"") -> bytes:
    """exec(...) in binary opcodes only (zstandard's reader has no readline: no text opcode loads
    through it), after ``before`` pushed and popped."""
    return wrap(
        before
        + (pickle.POP if before else b"")
        + call(stack_global("builtins", "exec"), unicode(marker_code(marker))),
        4,
    )


def _split_across_an_8k_read(marker: Path) -> bytes:
    """A pickle in two xz streams, the second's footer damaged and just past the file's 8 KiB mark.
    lzma.open reads 8 KiB of file at a time: its first read holds all the second stream's data,
    which it hands over; the footer's error comes at the next read, after the loader has the
    whole pickle. Decoded with more input at once, the data and the error come in one call."""
    tail = b""
    for size in range(7900, 8200):
        blob = random.Random(size).randbytes(size)
        before = pickle.BINBYTES + len(blob).to_bytes(4, "little") + blob
        data = _binary_exec(marker, before)
        cut = len(pickle.PROTO + b"\x04" + before + pickle.POP)
        first, second = lzma.compress(data[:cut]), bytearray(lzma.compress(data[cut:]))
        if len(first) + len(second) - _XZ_FOOTER == 8192:
            second[-10] ^= 0x01  # inside the footer's CRC-32
            return first + bytes(second)
        tail = bytes(second)
    raise AssertionError(f"no size puts the footer at the mark ({len(tail)} bytes in the second stream)")


_XZ_FOOTER = 12


def test_a_stream_that_fails_after_a_read_boundary_is_scanned_to_its_error(
    marker: Path, tmp_path: Path
) -> None:
    """Which output a reader hands over before an error depends on where its reads fall; the
    scan keeps all a decoder yields before the error, read as finely as any reader could."""
    _live(_split_across_an_8k_read, tmp_path, "xz")
    data = _split_across_an_8k_read(marker)
    result = compressed.read(memoryview(data), make_ctx())
    assert codes(result) == ["SL205"]
    assert "corrupt in stream 2" in result.findings[0].message
    assert imports(result.children[0].data) == ["builtins.exec"]


def test_a_zstd_frame_with_a_bad_checksum_is_scanned(marker: Path, tmp_path: Path) -> None:
    """zstandard's reader hands over a frame's data before it checks the frame's checksum."""

    def build(m: Path) -> bytes:
        frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(_binary_exec(m)))
        frame[-1] ^= 0x01
        return bytes(frame)

    _live(build, tmp_path, "zstd")
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(build(marker))
    result = compressed.read(memoryview(build(marker)), make_ctx())
    assert codes(result) == ["SL205"]
    assert "checksum" in result.findings[0].message
    assert bytes(result.children[0].data) == _binary_exec(marker)
    assert imports(result.children[0].data) == ["builtins.exec"]


def test_a_zstd_error_waits_until_every_byte_before_it_was_handed_over() -> None:
    """Asked for a little at a time, the decoder hands over all a failing frame decoded, then raises."""
    content = random.Random(3).randbytes(300_000)  # three blocks
    frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(content))
    frame[-1] ^= 0x01
    decoder = compressed.ZSTD.new()
    out = bytearray(decoder.decompress(bytes(frame), 1000))
    with pytest.raises(zstandard.ZstdError):
        while True:
            out += decoder.decompress(b"", 1000)
    assert bytes(out) == content


def _gzip_bomb(total: int, member: int = 16 << 20) -> bytes:
    """`total` bytes of zeros as a multi-member gzip, built without ever holding them."""
    one = gzip.compress(bytes(member), compresslevel=9)
    return one * (total // member)


def test_gigabyte_gzip_bomb_stops_at_the_budget_with_bounded_memory() -> None:
    bomb = _gzip_bomb(1 << 30)
    assert len(bomb) < 2 << 20
    # deflate cannot pass ~1030:1, so it is the byte budget, not the ratio, that stops it.
    limits = Limits(max_decompressed_bytes=32 << 20)
    ctx = make_ctx(limits)
    tracemalloc.start()
    try:
        result = compressed.read(memoryview(bomb), ctx)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert codes(result) == ["SL203"]
    assert ctx.budget.used <= 32 << 20
    assert len(result.children[0].data) == ctx.budget.used
    # Memory follows the budget, not the 1 GiB the stream would make.
    assert peak < 96 << 20


def test_budget_is_shared_with_what_was_spent_before() -> None:
    limits = Limits(max_decompressed_bytes=len(BENIGN) + 10)
    ctx = make_ctx(limits)
    assert ctx.budget.take(20)
    result = compressed.read(memoryview(gzip.compress(BENIGN)), ctx)
    assert codes(result) == ["SL203"]


@pytest.mark.parametrize("kind", ["zstd", "xz"])
def test_high_ratio_stream_stops_on_the_ratio_limit(kind: str) -> None:
    zeros = bytes(128 << 20)
    bomb = (
        zstandard.ZstdCompressor(level=3).compress(zeros)
        if kind == "zstd"
        else lzma.compress(zeros, preset=0)
    )
    del zeros
    assert len(bomb) < 64 << 10
    ctx = make_ctx()
    tracemalloc.start()
    try:
        result = compressed.read(memoryview(bomb), ctx)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert codes(result) == ["SL309"]
    # Stopped soon after the floor, far below the 128 MiB the stream would make.
    assert compressed.RATIO_FLOOR <= len(result.children[0].data) < 32 << 20
    assert peak < 64 << 20


def test_ratio_limit_is_configurable() -> None:
    bits = np.random.default_rng(0).integers(0, 2, 20 << 20, dtype=np.uint8).tobytes()
    data = zlib.compress(bits, 1)  # one bit of entropy per byte: a ratio of about 6
    assert codes(compressed.read(memoryview(data), make_ctx())) == []
    strict = Limits(max_compression_ratio=3)
    assert codes(compressed.read(memoryview(data), make_ctx(strict))) == ["SL309"]


@pytest.mark.parametrize("compress", ["zlib", "gzip", "bz2", "lzma", "xz", "lz4"])
def test_every_joblib_compression_is_unwrapped(compress: str, tmp_path: Path) -> None:
    path = tmp_path / "model.joblib"
    joblib.dump({"w": np.arange(100.0), "name": "m"}, path, compress=compress)
    raw = path.read_bytes()
    result = compressed.read(memoryview(raw), make_ctx())
    assert result.format == compress
    assert codes(result) == []
    inner = bytes(result.children[0].data)
    assert inner.startswith(b"\x80")
    assert b"NumpyArrayWrapper" in inner


def test_joblib_legacy_zfile() -> None:
    fh = io.BytesIO()
    write_zfile(fh, BENIGN)
    data = fh.getvalue()
    assert data.startswith(b"ZF0x")
    result = compressed.read(memoryview(data), make_ctx())
    assert result.format == "zfile"
    assert codes(result) == []
    assert bytes(result.children[0].data) == BENIGN
    assert result.meta["declared_length"] == len(BENIGN)


def test_joblib_zfile_with_a_false_length_is_reported() -> None:
    fh = io.BytesIO()
    write_zfile(fh, BENIGN)
    data = bytearray(fh.getvalue())
    data[4] = ord("f") if data[4] != ord("f") else ord("e")
    result = compressed.read(memoryview(bytes(data)), make_ctx())
    assert codes(result) == ["SL205"]
    assert bytes(result.children[0].data) == BENIGN


def test_empty_content_gives_no_child() -> None:
    result = compressed.read(memoryview(gzip.compress(b"")), make_ctx())
    assert codes(result) == []
    assert result.children == []


def test_zfile_findings_name_offsets_in_the_file() -> None:
    fh = io.BytesIO()
    write_zfile(fh, BENIGN)
    data = fh.getvalue()
    result = compressed.read(memoryview(data[:-4]), make_ctx(file_offset=1000))
    (finding,) = result.findings
    assert finding.code == "SL205"
    assert finding.file_offset == 1000 + 21


def test_unrecognized_bytes_are_not_claimed_and_read_says_so() -> None:
    buf = memoryview(b"\x00\x01\x02\x03 not compressed")
    assert not compressed.sniff(buf)
    assert codes(compressed.read(buf, make_ctx())) == ["SL205"]


def test_missing_optional_package_is_unscannable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(compressed._OPTIONAL, "lz4", "safeload_no_such_module")
    result = compressed.read(memoryview(lz4.frame.compress(BENIGN)), make_ctx())
    assert codes(result) == ["SL208"]
    assert "install safeload[formats]" in result.findings[0].message
    assert result.children == []


def test_lzma_alone_sniff_rejects_look_alikes() -> None:
    # A protocol-1 pickle of bytes can begin with a byte below 225 and a zero at offset 13.
    look_alike = bytearray(pickle.dumps([b"x" * 40], protocol=1))
    look_alike[13] = 0
    assert compressed.detect(memoryview(bytes(look_alike))) is None
