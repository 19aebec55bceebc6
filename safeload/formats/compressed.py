"""Compression wrappers: gzip, bz2, xz, lzma-alone, zstd, lz4 frame and zlib (joblib's two forms).

Each wrapper hands back one child, the bytes the loader's decompressing reader would produce, for
detection to read again by content. Concatenated streams (multi-member gzip, several bz2/xz/lz4
streams) are all decompressed, because Python's file readers (gzip.open, bz2.open, lzma.open,
lz4.frame.open) read on across them; zero padding between or after streams is skipped the way
those readers skip or ignore it.

Decompression is bounded: input is fed in chunks and output is taken ``max_length`` at a time
(into a Spool: memory, then a temporary file, so large output does not stay in memory),
every output byte is charged to the file's shared Budget (SL203 when it refuses) and a stream that
expands beyond ``limits.max_compression_ratio`` is stopped (SL309). A truncated or corrupt stream,
or bytes after the last stream that no reader continues with, give SL205; what was decompressed
before the break is still handed on (a loader would have run a payload in it before failing),
down to what a decoder call that raised had decoded (see _salvage). gzip members are read as
gzip.py reads them (see GzipMember).

The helpers :class:`Meter` and :func:`inflate` are shared with other readers (7z, sparse tar).
"""

from __future__ import annotations

import bz2
import importlib.util
import lzma
import struct
import zlib
from collections.abc import Callable
from typing import Protocol

import msgspec

from safeload.formats.base import Child, ReadContext, ReadResult
from safeload.formats.spool import Spool, SpoolError
from safeload.model import Finding, make_finding

NAME = "compressed"

IN_CHUNK = 1 << 16
OUT_CHUNK = 1 << 20
# Below this much output nothing is called a bomb: small files compress well for dull reasons.
RATIO_FLOOR = 1 << 24
# xz/lzma streams declare their dictionary size; liblzma allocates it up front.
LZMA_MEMLIMIT = 1 << 30
_SNIFF_IN = 4096
# Consumed input is let go of in steps this large (when the reader may: see ReadContext.release).
RELEASE_EVERY = 8 << 20
_SNIFF_OUT = 64

GZIP_MAGIC = b"\x1f\x8b\x08"
BZ2_MAGIC = b"BZh"
_BZ2_BLOCK = (b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90")
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZ4_MAGIC = b"\x04\x22\x4d\x18"
# joblib < 0.10 wrote "ZF", the decompressed length as hex padded to 19 characters, then zlib.
ZFILE_MAGIC = b"ZF0x"
_ZFILE_HEADER = 2 + 19


class Decoder(Protocol):
    """The incremental-decompressor shape bz2, lzma and lz4.frame share."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class ZlibDecoder:
    """zlib.decompressobj behind the bz2-style interface (``needs_input``, ``max_length``)."""

    def __init__(self, wbits: int) -> None:
        self._d = zlib.decompressobj(wbits)
        self._more = False

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def needs_input(self) -> bool:
        return not self._d.unconsumed_tail and not self._more

    @property
    def unused_data(self) -> bytes:
        # At the end of the stream CPython may leave the same leftover in both attributes.
        return self._d.unused_data if self._d.eof else self._d.unconsumed_tail

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._d.decompress(self._d.unconsumed_tail + data, max(max_length, 0))
        # A full output buffer may leave output pending inside zlib even with no input left.
        self._more = max_length > 0 and len(out) == max_length and not self._d.eof
        return out


class GzipMember:
    """One gzip member, read the way Python's gzip module reads it (gzip.open, and through it pandas
    and joblib): the header as ``_read_gzip_header`` parses it, raw deflate, then the CRC-32 and
    length trailer.

    zlib's own gzip mode (wbits 31) refuses headers gzip.py reads (reserved flag bits set, a wrong
    header CRC, which gzip.py skips unchecked) and raises on a bad trailer inside the call that
    returns the member's last bytes. gzip.py checks the trailer only at the read after the member's
    data, so a loader has unpickled all of it by then: a bad trailer is kept as ``problem`` (the
    caller reports it and reads no further member), never raised.
    """

    _FIXED = 10  # magic, method, flags, mtime, extra flags, OS

    def __init__(self) -> None:
        self._head = bytearray()
        self._step = 0  # fixed part, FEXTRA, FNAME, FCOMMENT, FHCRC, then the body
        self._flags = 0
        self._body: ZlibDecoder | None = None
        self._tail = bytearray()
        self._crc = 0
        self._size = 0
        self.eof = False
        self.unused_data = b""
        self.problem: str | None = None

    @property
    def needs_input(self) -> bool:
        if self._body is None or self._body.eof:
            return not self.eof
        return self._body.needs_input

    def _header(self, data: bytes) -> bytes | None:
        """What follows the header once it is complete; None while it is not."""
        head = self._head
        head += data
        while self._step < 5:
            if self._step == 0:
                if len(head) < self._FIXED:
                    return None
                if bytes(head[:2]) != b"\x1f\x8b":
                    raise ValueError("not a gzip member")
                if head[2] != 8:
                    raise ValueError(f"unknown compression method {head[2]}")
                self._flags = head[3]
                del head[: self._FIXED]
            elif self._step == 1 and self._flags & 4:  # FEXTRA: a 2-byte length, then that many
                if len(head) < 2 or len(head) < 2 + (head[0] | head[1] << 8):
                    return None
                del head[: 2 + (head[0] | head[1] << 8)]
            elif self._step in (2, 3) and self._flags & (8 if self._step == 2 else 16):
                end = head.find(0)  # FNAME, FCOMMENT: zero-terminated, of any length
                if end < 0:
                    head.clear()  # never needed again: only the terminator is looked for
                    return None
                del head[: end + 1]
            elif self._step == 4 and self._flags & 2:  # FHCRC: skipped, as gzip.py skips it
                if len(head) < 2:
                    return None
                del head[:2]
            self._step += 1
        rest = bytes(head)
        head.clear()
        return rest

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        if self._body is None:
            rest = self._header(data)
            if rest is None:
                return b""
            self._body = ZlibDecoder(-15)
            data = rest
        out = b""
        if not self._body.eof:
            out = self._body.decompress(data, max_length)
            self._crc = zlib.crc32(out, self._crc)
            self._size += len(out)
            if not self._body.eof:
                return out
            data = self._body.unused_data
        self._tail += data
        if len(self._tail) >= 8:
            crc, size = struct.unpack_from("<II", self._tail)
            if crc != self._crc:
                self.problem = f"CRC check failed (trailer {crc:#010x}, data {self._crc:#010x})"
            elif size != self._size & 0xFFFFFFFF:
                self.problem = f"incorrect length of data produced (trailer {size}, data {self._size})"
            self.unused_data = bytes(self._tail[8:])
            self.eof = True
        return out


def _lz4_decoder() -> Decoder:
    import lz4.frame  # optional dependency: only files that are lz4 frames need it

    return lz4.frame.LZ4FrameDecompressor()  # type: ignore[no-any-return]


class _ZstdDecoder:
    """One zstd frame, fed to `zstandard`'s decompressobj one block at a time.

    That decompressobj has no max_length: it returns all the output of the input it is given. A
    block regenerates at most 128 KiB (the format's block maximum), so walking the frame's block
    headers (RFC 8878) and feeding whole blocks bounds every step whatever the input chunks are.
    The walk only finds block boundaries; zstandard does all decoding and every check.
    """

    def __init__(self) -> None:
        import zstandard  # optional dependency: only files that are zstd frames need it

        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._pending = bytearray()
        self._ready = bytearray()  # output made but not yet returned
        self._stage = "header"  # header -> block* -> checksum -> done
        self._checksum = False
        self._done = False
        self._error: Exception | None = None  # raised at the call after the output before it

    @property
    def eof(self) -> bool:
        return self._done and not self._ready

    @property
    def needs_input(self) -> bool:
        # Not once an error waits: the next call raises it, whatever input is left.
        return not self._ready and not self._done and self._error is None and self._unit() is None

    @property
    def unused_data(self) -> bytes:
        return bytes(self._pending) if self._done else b""

    def _unit(self) -> int | None:
        """Length of the next whole header, block or checksum at the start of pending input."""
        p = self._pending
        if self._stage == "header":
            if len(p) < 8 and not (len(p) >= 5 and bytes(p[:4]) == ZSTD_MAGIC):
                return None
            if bytes(p[:4]) != ZSTD_MAGIC:  # a skippable frame: magic, 4-byte size, content
                return 8 + int.from_bytes(p[4:8], "little")
            fhd = p[4]
            single = fhd >> 5 & 1
            size = (
                5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + ((1 if single else 0), 2, 4, 8)[fhd >> 6]
            )
            return size if len(p) >= size else None
        if self._stage == "block":
            if len(p) < 3:
                return None
            head = int.from_bytes(p[:3], "little")
            size = 3 + (1 if (head >> 1) & 3 == 1 else head >> 3)
            return size if len(p) >= size else None
        return 4 if len(p) >= 4 else None  # checksum

    def _advance(self, unit: bytes) -> None:
        if self._stage == "header":
            if unit[:4] != ZSTD_MAGIC:
                self._stage = "done"
            else:
                self._checksum = bool(unit[4] & 4)
                self._stage = "block"
        elif self._stage == "block":
            if int.from_bytes(unit[:3], "little") & 1:
                self._stage = "checksum" if self._checksum else "done"
        else:
            self._stage = "done"

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        if self._error is not None and not self._ready:
            raise self._error  # only once all output before it was handed over
        self._pending += data
        while self._error is None and not self._done and (max_length < 0 or len(self._ready) < max_length):
            size = self._unit()
            if size is None:
                break
            unit = bytes(self._pending[:size])
            del self._pending[:size]
            try:
                self._ready += self._d.decompress(unit)
                self._advance(unit)
                if self._stage == "done" and not self._d.eof:
                    raise ValueError("zstd frame ended where the decoder did not")
            except Exception as exc:  # noqa: BLE001 - zstandard raises ZstdError; the walk ValueError
                if not self._ready:
                    raise
                # zstandard's reader hands over the blocks it decoded before it checks the next
                # one or the frame's checksum: a loader unpickles them before the error.
                self._error = exc
                break
            if self._stage == "done":
                self._done = True
        cut = len(self._ready) if max_length < 0 else max_length
        out = bytes(self._ready[:cut])
        del self._ready[:cut]
        return out


def _lzma_auto() -> Decoder:
    # FORMAT_AUTO is what lzma.open/LZMAFile (and joblib's xz/lzma readers) use for every stream.
    return lzma.LZMADecompressor(lzma.FORMAT_AUTO, memlimit=LZMA_MEMLIMIT)


class Codec(msgspec.Struct, frozen=True):
    name: str
    new: Callable[[], Decoder]
    # Whether the bytes after one stream's end start another stream this format's reader reads.
    continues: Callable[[memoryview], bool]


def _is_zlib_header(b: memoryview) -> bool:
    # CMF 0x78 is what zlib.compress and joblib write; other window sizes would collide with
    # protocol-0 pickles, which start with "(" (0x28).
    return len(b) >= 2 and b[0] == 0x78 and (b[0] * 256 + b[1]) % 31 == 0 and not b[1] & 0x20


def _is_bz2(b: memoryview) -> bool:
    return (
        len(b) >= 10 and bytes(b[:3]) == BZ2_MAGIC and 0x31 <= b[3] <= 0x39 and bytes(b[4:10]) in _BZ2_BLOCK
    )


def _is_lzma_alone_header(b: memoryview) -> bool:
    """The 13-byte .lzma header as xz-utils and Python's lzma write it, plus the coder's 0 byte."""
    if len(b) < 14 or b[0] >= 9 * 5 * 5 or b[13] != 0:
        return False
    dict_size = struct.unpack_from("<I", b, 1)[0]
    size = struct.unpack_from("<Q", b, 5)[0]
    if size != (1 << 64) - 1 and size >= 1 << 38:
        return False
    # Encoders write 2^n or 2^n + 2^(n-1); anything else is not a header a writer produced.
    low = dict_size & -dict_size
    return dict_size >= 4096 and dict_size in (low, 3 * low)


def _is_zstd(b: memoryview) -> bool:
    if len(b) < 4:
        return False
    head = bytes(b[:4])
    # Skippable frames 0x184D2A50..5F may come first.
    return head == ZSTD_MAGIC or (head[1:] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50)


GZIP = Codec("gzip", GzipMember, lambda b: bytes(b[:3]) == GZIP_MAGIC)
ZLIB = Codec("zlib", lambda: ZlibDecoder(15), _is_zlib_header)
BZ2 = Codec("bz2", bz2.BZ2Decompressor, _is_bz2)
XZ = Codec("xz", _lzma_auto, lambda b: bytes(b[:6]) == XZ_MAGIC or _is_lzma_alone_header(b))
LZMA = Codec("lzma", _lzma_auto, XZ.continues)
LZ4 = Codec("lz4", _lz4_decoder, lambda b: bytes(b[:4]) == LZ4_MAGIC)
ZSTD = Codec("zstd", _ZstdDecoder, lambda b: _is_zstd(b))
CODECS: dict[str, Codec] = {c.name: c for c in (GZIP, ZLIB, BZ2, XZ, LZMA, LZ4, ZSTD)}
# Codecs whose decoder lives in an optional package, and that package.
_OPTIONAL = {"lz4": "lz4.frame", "zstd": "zstandard"}


def _trial(codec: Codec, buf: memoryview) -> bool:
    """Whether the first bytes decode without error: cheap, and it rules out look-alike headers."""
    try:
        codec.new().decompress(bytes(buf[:_SNIFF_IN]), _SNIFF_OUT)
    except Exception:  # noqa: BLE001 - any decoder failure just means "not this format"
        return False
    return True


def _available(kind: str) -> bool:
    module = _OPTIONAL.get(kind)
    if module is None:
        return True
    # The module names are this file's constants, never names taken from the input.
    return importlib.util.find_spec(module.split(".")[0]) is not None


def detect(buf: memoryview) -> str | None:
    """Which compression format the buffer starts with (by magic bytes and a trial decode)."""
    if len(buf) < 4:
        return None
    head = bytes(buf[:6])
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head == XZ_MAGIC:
        return "xz"
    if _is_bz2(buf):
        return "bz2"
    if head.startswith(LZ4_MAGIC):
        return "lz4"
    if _is_zstd(buf):
        return "zstd"
    if head.startswith(ZFILE_MAGIC):
        return "zfile"
    if _is_zlib_header(buf) and _trial(ZLIB, buf):
        return "zlib"
    if _is_lzma_alone_header(buf) and _trial(LZMA, buf):
        return "lzma"
    return None


def sniff(buf: memoryview) -> bool:
    return detect(buf) is not None


class Meter:
    """Charges one wrapper's output to the file's Budget and watches its compression ratio."""

    def __init__(self, ctx: ReadContext, what: str) -> None:
        self.ctx = ctx
        self.what = what
        self.produced = 0
        self.finding: Finding | None = None

    def charge(self, n: int, consumed: int) -> bool:
        """Account n more output bytes after `consumed` input bytes; False (and a finding) to stop."""
        limits = self.ctx.limits
        total = self.produced + n
        if total > RATIO_FLOOR and total > limits.max_compression_ratio * max(consumed, 1):
            self.finding = make_finding(
                "SL309",
                f"{self.what} expands {consumed} bytes to more than {total} bytes, above "
                f"max_compression_ratio {limits.max_compression_ratio}; reading stopped",
                member=self.ctx.member,
                file_offset=self.ctx.file_offset,
            )
            return False
        if not self.ctx.budget.take(n):
            self.finding = make_finding(
                "SL203",
                f"{self.what}: decompressed data would exceed max_decompressed_bytes "
                f"({self.ctx.budget.limit}) for this file; reading stopped after {self.produced} bytes",
                member=self.ctx.member,
                file_offset=self.ctx.file_offset,
            )
            return False
        self.produced = total
        return True


class Inflated(msgspec.Struct):
    data: Spool
    findings: list[Finding] = msgspec.field(default_factory=list)
    streams: int = 0
    consumed: int = 0  # input bytes that belonged to complete streams (or were read before a stop)
    complete: bool = False  # every input byte was decompressed (or was padding)
    trailing: int | None = None  # offset of bytes after the last stream that no reader continues with


def _skip_zeros(src: memoryview, pos: int) -> int:
    while 0 <= pos < len(src):
        chunk = bytes(src[pos : pos + IN_CHUNK])
        stripped = chunk.lstrip(b"\0")
        if stripped:
            return pos + len(chunk) - len(stripped)
        pos += len(chunk)
    return pos


def inflate(
    src: memoryview,
    codec: Codec,
    ctx: ReadContext,
    *,
    what: str,
    base: int = 0,
    release: Callable[[int, int], None] | None = None,
) -> Inflated:
    """Decompress every stream of `src` with `codec`, bounded by the Budget and the ratio limit.

    `base` is where src starts in the reader's buffer, for the offsets findings name. `release`
    (buffer offsets) lets go of input the decompressor has consumed.
    """
    meter = Meter(ctx, what)
    result = Inflated(Spool())
    out = result.data
    pos = 0
    released = 0
    while True:
        dec = codec.new()
        start = pos
        kept = 0  # output of this stream written so far
        try:
            while not dec.eof:
                if dec.needs_input:
                    if pos >= len(src):
                        result.findings.append(
                            _unreadable(
                                ctx,
                                f"{what} is truncated: stream {result.streams + 1} starting at "
                                f"offset {base + start} ends before its end marker",
                                base + start,
                            )
                        )
                        result.consumed = pos
                        return result
                    chunk = bytes(src[pos : pos + IN_CHUNK])
                    pos += len(chunk)
                    if release is not None and pos - released >= RELEASE_EVERY:
                        release(base + released, base + pos)
                        released = pos
                else:
                    chunk = b""
                piece = dec.decompress(chunk, OUT_CHUNK)
                if piece:
                    if not meter.charge(len(piece), pos):
                        assert meter.finding is not None
                        result.findings.append(meter.finding)
                        result.consumed = pos
                        return result
                    out.write(piece)
                    kept += len(piece)
        except SpoolError as exc:
            result.findings.append(make_finding("SL203", f"{what}: {exc}", member=ctx.member))
            result.consumed = pos
            return result
        except Exception as exc:  # noqa: BLE001 - decoders raise zlib.error, OSError, LZMAError, RuntimeError...
            result.findings.append(
                _unreadable(
                    ctx,
                    f"{what} is corrupt in stream {result.streams + 1} starting at offset "
                    f"{base + start}: {type(exc).__name__}: {exc}",
                    base + start,
                )
            )
            stopped = _salvage(codec, src[start:pos], start, kept, meter, out, base)
            if stopped is not None:
                result.findings.append(stopped)
            result.consumed = pos
            return result
        result.streams += 1
        problem = getattr(dec, "problem", None)
        if problem is not None:
            # The reader raises at its next read: no later stream is ever read.
            result.findings.append(
                _unreadable(
                    ctx,
                    f"{what} stream {result.streams} starting at offset {base + start}: {problem}. "
                    f"Python's {what} reader raises this only after handing over the stream's data, "
                    "which a loader has unpickled by then: that data was scanned",
                    base + start,
                )
            )
            result.consumed = pos
            return result
        # The stream ended inside what it was fed; never step back before the stream's start.
        pos = max(start + 1, pos - len(dec.unused_data or b""))
        result.consumed = pos
        pos = _skip_zeros(src, pos)
        if pos >= len(src):
            result.complete = True
            return result
        if not codec.continues(src[pos:]):
            result.trailing = pos
            result.findings.append(
                _unreadable(
                    ctx,
                    f"{len(src) - pos} bytes after the last {what} stream (offset {base + pos}) are "
                    "not a stream its reader continues with",
                    base + pos,
                )
            )
            return result


# How much of its file Python's file readers (gzip.open, bz2.open, lzma.open) feed their decoder at
# a time, and the least output they ask of it: the 8 KiB of io.DEFAULT_BUFFER_SIZE.
READER_STEP = 8 << 10


def _salvage(
    codec: Codec, stream: memoryview, start: int, kept: int, meter: Meter, out: Spool, grid: int
) -> Finding | None:
    """Decode a stream that failed again from its start and keep what comes out after the ``kept``
    bytes already written, up to the error. ``start``: where the stream starts in the wrapper's
    input (the ratio limit counts input from there). Returns the finding that stopped it, if a limit
    did.

    A decoder call that raises returns nothing, though it may have decoded much (a block whose
    check fails at its end, a deflate error deep into the input it was given). Python's file
    readers (gzip.open, bz2.open, lzma.open, lz4.frame.open) feed their decoder the file 8 KiB at a
    time, at multiples of 8 KiB in the file, and ask for at least 8 KiB of output a call; all they
    get before the error reaches the loader, which unpickles a payload there. So the stream is
    decoded again with its input cut where theirs is (``grid``: where the wrapper's input sits in
    its file, 0 for a compressed file itself): READER_STEP bytes of output a call, to find the step the
    error falls in; then once more, that step one byte a call, so that no reader, however it asks,
    gets further. Each pass is bounded by the stream's input, the byte calls by READER_STEP.
    """
    try:
        coarse = _Redecode(codec, stream, start, meter, out, grid)
        coarse.run(kept, fine_from=None)
        if coarse.stopped is not None or coarse.failed_at is None:
            return coarse.stopped
        fine = _Redecode(codec, stream, start, meter, out, grid)
        fine.run(coarse.failed_at, fine_from=coarse.failed_at)
        return fine.stopped
    except SpoolError as exc:
        return make_finding("SL203", f"{meter.what}: {exc}", member=meter.ctx.member)


class _Redecode:
    """One decoding of a failed stream from its start, writing the output past ``kept`` up to the
    call that raises: READER_STEP bytes a call, then one byte a call from output ``fine_from`` on."""

    def __init__(
        self, codec: Codec, stream: memoryview, start: int, meter: Meter, out: Spool, grid: int
    ) -> None:
        self.codec, self.stream, self.start, self.meter, self.out = codec, stream, start, meter, out
        self.grid = grid + start  # the file offset of the stream's first byte
        self.failed_at: int | None = None  # output before the call that raised
        self.stopped: Finding | None = None  # a limit's finding

    def run(self, kept: int, fine_from: int | None) -> None:
        dec = self.codec.new()
        pos = produced = 0
        held = bytearray()  # the byte calls' output, written once
        try:
            while not dec.eof:
                if dec.needs_input:
                    if pos >= len(self.stream):
                        return
                    # Up to the next multiple of READER_STEP in the file, as a file reader reads.
                    end = pos + READER_STEP - (self.grid + pos) % READER_STEP
                    chunk = bytes(self.stream[pos:end])
                    pos += len(chunk)
                else:
                    chunk = b""
                if fine_from is None or produced + READER_STEP <= fine_from:
                    size = READER_STEP
                else:
                    size = max(1, fine_from - produced)  # coarse up to where the byte calls start
                try:
                    piece = dec.decompress(chunk, size)
                except Exception:  # noqa: BLE001 - the error is reported: what came before it is kept
                    self.failed_at = produced
                    return
                new = piece[max(0, kept - produced) :]
                produced += len(piece)
                if new:
                    if not self.meter.charge(len(new), self.start + pos):
                        self.stopped = self.meter.finding
                        return
                    held += new
                    if fine_from is None:
                        self.out.write(bytes(held))
                        held.clear()
        finally:
            if held:
                self.out.write(bytes(held))


def _unreadable(ctx: ReadContext, message: str, offset: int) -> Finding:
    return make_finding(
        "SL205",
        message,
        member=ctx.member,
        offset=offset,
        file_offset=None if ctx.file_offset is None else ctx.file_offset + offset,
    )


def read(buf: memoryview, ctx: ReadContext) -> ReadResult:
    kind = detect(buf)
    if kind is None:
        return ReadResult(format=NAME, findings=[_unreadable(ctx, "no known compression format", 0)])
    src = buf
    meta: dict[str, object] = {"compression": kind, "compressed_bytes": len(buf)}
    fmt = kind
    if kind == "zfile":
        declared = _zfile_length(buf)
        meta["declared_length"] = declared
        start = _ZFILE_HEADER + (1 if len(buf) > _ZFILE_HEADER and buf[_ZFILE_HEADER] == 0x20 else 0)
        src = buf[start:]
        kind = "zlib"
    if not _available(kind):
        inflated = Inflated(
            Spool(),
            [
                make_finding(
                    "SL208",
                    f"{kind} data, but the {_OPTIONAL[kind]} package is not installed: install "
                    "safeload[formats] to read it",
                    member=ctx.member,
                    file_offset=ctx.file_offset,
                )
            ],
        )
    else:
        inflated = inflate(src, CODECS[kind], ctx, what=kind, base=len(buf) - len(src), release=ctx.release)
    if fmt == "zfile" and inflated.complete and meta["declared_length"] != len(inflated.data):
        inflated.findings.append(
            _unreadable(
                ctx,
                f"joblib zfile declares {meta['declared_length']} bytes but holds {len(inflated.data)}",
                0,
            )
        )
    meta.update(streams=inflated.streams, decompressed_bytes=len(inflated.data), complete=inflated.complete)
    encoding = (*ctx.encoding, fmt)
    children = []
    if inflated.data:
        try:
            data = inflated.data.view()
        except SpoolError as exc:
            inflated.findings.append(make_finding("SL203", f"{fmt}: {exc}", member=ctx.member))
        else:
            children.append(Child(name=f"<{fmt}>", data=data, file_offset=None, encoding=encoding))
    if inflated.trailing is not None:
        offset = (len(buf) - len(src)) + inflated.trailing
        children.append(
            Child(
                name=f"<after-{fmt}>",
                data=buf[offset:],
                file_offset=None if ctx.file_offset is None else ctx.file_offset + offset,
                encoding=ctx.encoding,
            )
        )
    return ReadResult(format=fmt, findings=inflated.findings, children=children, meta=meta)


def _zfile_length(buf: memoryview) -> int | None:
    text = bytes(buf[2:_ZFILE_HEADER]).strip()
    try:
        return int(text, 16)
    except ValueError:
        return None
