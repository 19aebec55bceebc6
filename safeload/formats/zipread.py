"""A zip reader that sees an archive the way torch's reader (miniz) does, and reports where others differ.

torch reads checkpoints with miniz (caffe2/serialize/inline_container.cc). What miniz does, and
what this module therefore does:

- finds the end-of-central-directory record by scanning back from the end (the last signature
  with room for a record, at most ~64 KiB back) and trusts a ZIP64 record named by the locator;
- takes central-directory and local-header offsets as absolute (no adjustment for prepended
  data, unlike Python's zipfile; when only zipfile's adjusted view works we use it and say so);
- locates a member with a case-insensitive binary search over the names heap-sorted at open time
  (so ``ARCHIVE/DATA.PKL`` is ``archive/data.pkl``, and which of two duplicates wins depends on
  that sort);
- reads a member's bytes at ``local header offset + 30 + local name length + local extra length``
  with the *central* sizes, and never looks at the local name, the local flags or the CRC
  (pytorch builds miniz with CRC checks off).

Everything that lets two readers see different archives is reported as a finding; the bytes torch
would read are still handed on. Stored members are zero-copy slices of the buffer.

CRC: torch never checks it, other tools refuse a member whose CRC is wrong, so a bad CRC is an
evasion signal (SL300). ``extract`` checks it on every member it is asked for, at zlib speed
(~1 GB/s); callers skip it for bytes nothing unpickles (torch storages: a 10 GB checkpoint would
pay seconds to learn nothing about code execution) and defer it (``deferred_crc``) for members
handed back to detection, which runs it only when the member turns out to hold a pickle.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable

import msgspec

from safeload.formats.base import ReadContext
from safeload.formats.compressed import IN_CHUNK, OUT_CHUNK, Decoder, ZlibDecoder
from safeload.formats.spool import Spool, SpoolError
from safeload.model import Finding, make_finding
from safeload.text import escape

LOCAL_SIG = b"PK\x03\x04"
CENTRAL_SIG = b"PK\x01\x02"
EOCD_SIG = b"PK\x05\x06"
ZIP64_LOCATOR_SIG = b"PK\x06\x07"
ZIP64_EOCD_SIG = b"PK\x06\x06"
DESCRIPTOR_SIG = b"PK\x07\x08"

_EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes
_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes

_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_MAX_BACK_SCAN = _U16 + _EOCD.size
# Most archives have no comment: their end record is found in this much of the tail.
_SHORT_BACK_SCAN = 4096

STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14

FLAG_DESCRIPTOR = 0x0008
FLAG_UTF8 = 0x0800
# What ordinary writers set: deflate level bits (1, 2), data descriptor (3), UTF-8 names (11).
# torch writes 0x0808. Anything else (encryption 0, patch 5, strong encryption 6, masked
# directory 13, reserved bits) makes some reader refuse a member another one reads.
_ORDINARY_FLAGS = 0x0002 | 0x0004 | FLAG_DESCRIPTOR | FLAG_UTF8

_DOS_DIRECTORY = 0x10
# Findings of one code an archive's records make that are listed; the rest are counted in one more.
# One per member (a bad CRC, a name that differs) in an archive of 200,000 members took 1.3 s and
# 200 MB to build, and the scan then kept 1,000 of them.
MAX_NOTES_PER_CODE = 100
_HEAP_SORT_MAX = 50_000


class ZipEntry(msgspec.Struct):
    """One central-directory record, with what its local header says. Not changed once parsed (not
    frozen: a frozen dataclass costs four times as much to build, once per member of every archive)."""

    index: int  # position in the central directory
    raw_name: bytes  # central name, as miniz compares it
    name: str  # central name decoded as Python's zipfile does (member paths in reports)
    flags: int
    method: int
    crc: int
    comp_size: int
    size: int
    header_offset: int  # local header position in the buffer
    external_attr: int
    local_name: bytes | None = None  # None: no readable local header
    local_flags: int | None = None
    data_offset: int | None = None  # where torch starts reading the member's bytes
    counted: bool = True  # False: past the EOCD's entry count (Python's zipfile reads it, miniz not)

    @property
    def is_dir(self) -> bool:
        """miniz returns no bytes for these (trailing slash or the DOS directory attribute)."""
        return self.raw_name.endswith(b"/") or bool(self.external_attr & _DOS_DIRECTORY)


class ZipArchive(msgspec.Struct):
    entries: list[ZipEntry]
    findings: list[Finding]
    eocd_offset: int
    end: int  # just after the EOCD record and its comment
    cd_offset: int  # in buffer coordinates
    cd_size: int
    shift: int  # 0: offsets read as absolute (torch); >0: zipfile-style shift for prepended data
    zip64: bool
    comment: bytes
    extra_regions: list[tuple[int, int]] = msgspec.field(default_factory=list)  # bytes outside every record
    # Why miniz (torch's reader) refuses to open the archive where Python's zipfile reads it, and
    # at which byte: torch.load fails before it reads any member, so no loader takes the archive
    # for a checkpoint. None: miniz opens it as far as these records go.
    miniz_refusal: tuple[str, int] | None = None
    _order: list[int] | None = None
    _counted: list[ZipEntry] = msgspec.field(default_factory=list)
    _keys: list[bytes] = msgspec.field(default_factory=list)
    _unique: dict[bytes, ZipEntry] | None = None  # lower-cased name -> entry, when no name repeats

    def locate(self, name: bytes) -> ZipEntry | None:
        """The entry miniz's ``mz_zip_reader_locate_file(name, flags=0)`` returns. Names compare
        lower-cased: miniz's MZ_TOLOWER folds ASCII A-Z only, as bytes.lower() does."""
        if self._order is None:
            self._counted = [e for e in self.entries if e.counted]
            self._keys = [e.raw_name.lower() for e in self._counted]
            unique = dict(zip(self._keys, self._counted, strict=True))
            # Without repeated names the binary search can only land on the one match: a dict
            # finds the same entry without sorting.
            self._unique = unique if len(unique) == len(self._keys) else None
            self._order = [] if self._unique is not None else _miniz_sorted(self._keys)
        wanted = name.lower()
        if self._unique is not None:
            return self._unique.get(wanted)
        lo, hi = 0, len(self._order) - 1
        while lo <= hi:
            mid = lo + ((hi - lo) >> 1)
            key = self._keys[self._order[mid]]
            if key == wanted:
                return self._counted[self._order[mid]]
            if key < wanted:
                lo = mid + 1
            else:
                hi = mid - 1
        return None

    def same_name(self, name: bytes) -> list[ZipEntry]:
        """Every entry miniz would consider named ``name`` (case-insensitive)."""
        low = name.lower()
        return [e for e in self.entries if e.raw_name.lower() == low]


class Extracted(msgspec.Struct):  # one per member read
    data: memoryview | None  # None: nothing could be read
    file_offset: int | None  # absolute offset when the bytes are stored in the file
    findings: list[Finding]
    complete: bool


def _miniz_sorted(keys: list[bytes]) -> list[int]:
    """Indices of lower-cased names in the order miniz's heap sort leaves them.

    miniz compares lower-cased bytes with a shorter prefix first: Python's bytes order. Only where
    names repeat does the algorithm matter (which duplicate the binary search lands on), so the
    heap sort is replayed only then, up to a size where replaying it in Python stays cheap (beyond
    that the duplicates are reported and every copy is scanned anyway).
    """
    idx = list(range(len(keys)))
    size = len(idx)
    if len(set(keys)) == size or size > _HEAP_SORT_MAX:
        return sorted(idx, key=keys.__getitem__)

    def sift(root: int, end: int) -> None:
        while True:
            child = 2 * root + 1
            if child >= end:
                return
            if child + 1 < end and keys[idx[child]] < keys[idx[child + 1]]:
                child += 1
            if not keys[idx[root]] < keys[idx[child]]:
                return
            idx[root], idx[child] = idx[child], idx[root]
            root = child

    for start in range((size - 2) >> 1, -1, -1):
        sift(start, size)
    for end in range(size - 1, 0, -1):
        idx[end], idx[0] = idx[0], idx[end]
        sift(0, end)
    return idx


def find_eocd(buf: memoryview) -> int | None:
    """Offset of the end-of-central-directory record miniz would use."""
    n = len(buf)
    if n < _EOCD.size:
        return None
    # The last signature in a short tail is the last one in the whole window too: look there first.
    for back in (_SHORT_BACK_SCAN, _MAX_BACK_SCAN):
        start = max(0, n - back)
        tail = bytes(buf[start:])
        pos = tail.rfind(EOCD_SIG, 0, n - start - _EOCD.size + len(EOCD_SIG))
        if pos >= 0:
            return start + pos
        if start == 0:
            break
    return None


def sniff(buf: memoryview) -> bool:
    """A zip by structure: a local header at the start, or an EOCD whose central directory exists."""
    if bytes(buf[:4]) in (LOCAL_SIG, EOCD_SIG):
        return True
    eocd = find_eocd(buf)
    if eocd is None:
        return False
    _, _, _, _, total, cd_size, cd_offset, _ = _EOCD.unpack_from(buf, eocd)
    if total == 0:
        return False
    if _directory_shift(buf, eocd, cd_offset, cd_size, total) is not None:
        return True
    # Past 4 GiB or 65,535 members the end record holds placeholders: the ZIP64 record has the
    # values, the one the locator points to (miniz) or the one right before it (zipfile).
    at = eocd - _LOCATOR.size
    if at < 0 or bytes(buf[at : at + 4]) != ZIP64_LOCATOR_SIG:
        return False
    for offset in {_LOCATOR.unpack_from(buf, at)[2], at - _ZIP64_EOCD.size}:
        if 0 <= offset <= len(buf) - _ZIP64_EOCD.size:
            rec = _ZIP64_EOCD.unpack_from(buf, offset)
            if (
                rec[0] == ZIP64_EOCD_SIG
                and rec[7]
                and _directory_shift(buf, eocd, rec[9], rec[8], rec[7]) is not None
            ):
                return True
    return False


def _records_end(buf: memoryview, eocd: int) -> int:
    """Where the central directory ends if nothing lies: before the ZIP64 records, if any."""
    at = eocd - _LOCATOR.size
    if at >= _ZIP64_EOCD.size and bytes(buf[at : at + 4]) == ZIP64_LOCATOR_SIG:
        return at - _ZIP64_EOCD.size
    return eocd


def _central_at(buf: memoryview, offset: int, total: int) -> bool:
    if total == 0:
        return 0 <= offset <= len(buf)
    return 0 <= offset <= len(buf) - 4 and bytes(buf[offset : offset + 4]) == CENTRAL_SIG


def _miniz_zip64_refusal(
    locator: tuple, record: tuple, record_at: int, locator_at: int
) -> tuple[str, int] | None:
    """Why miniz refuses an archive whose ZIP64 end record it found where the locator points, for
    a field Python's zipfile does not check (zipfile takes a total of 0 or 1 disks, and any record
    size); None when these fields pass. miniz checks them in this order."""
    size_of_record, on_disk, total, cd_size = record[1], record[6], record[7], record[8]
    if size_of_record < _ZIP64_EOCD.size - 12:
        return (
            f"the ZIP64 end record gives its own size as {size_of_record}, under the {_ZIP64_EOCD.size - 12} "
            "bytes every such record has",
            record_at,
        )
    disks = locator[3]
    if disks != 1:
        return (f"the ZIP64 locator counts {disks} disks: miniz reads single-disk archives only", locator_at)
    if total > _U32 or on_disk > _U32:
        return (
            f"the ZIP64 end record counts {max(total, on_disk)} entries, over miniz's 2**32 - 1",
            record_at,
        )
    if cd_size > _U32:
        return (
            f"the ZIP64 end record gives a central directory of {cd_size} bytes, over miniz's 4 GiB",
            record_at,
        )
    return None


def _directory_shift(buf: memoryview, eocd: int, cd_offset: int, cd_size: int, total: int) -> int | None:
    """0 when the directory is where the offsets say (torch's reading); the shift Python's zipfile
    applies when bytes were put in front of the archive; None when neither finds it."""
    if _central_at(buf, cd_offset, total):
        return 0
    shift = _records_end(buf, eocd) - cd_size - cd_offset
    if shift > 0 and _central_at(buf, cd_offset + shift, total):
        return shift
    return None


def member_finding(code: str, message: str, ctx: ReadContext, member: str | None, offset: int | None) -> Finding:
    file_offset = None if ctx.file_offset is None or offset is None else ctx.file_offset + offset
    return make_finding(
        code,
        message,
        member=ctx.child_member(member) if member is not None else ctx.member,
        offset=offset,
        file_offset=file_offset,
    )


class _Reader:
    def __init__(self, buf: memoryview, ctx: ReadContext) -> None:
        self.buf = buf
        self.ctx = ctx
        self.findings: list[Finding] = []
        self.noted: dict[str, int] = {}  # findings of each code, listed or not
        # ctx.peek without its dispatch, once per member (local headers, data descriptors).
        self.peek: Callable[[int, int], bytes | memoryview] = ctx.peek_file or self._slice
        self.refusal: tuple[str, int] | None = None  # ZipArchive.miniz_refusal: the first one found

    def _slice(self, offset: int, size: int) -> memoryview:
        return self.buf[offset : offset + size]

    def note(self, code: str, message: str, member: str | None = None, offset: int | None = None) -> None:
        count = self.noted[code] = self.noted.get(code, 0) + 1
        if count <= MAX_NOTES_PER_CODE:
            self.findings.append(member_finding(code, message, self.ctx, member, offset))

    def _unlisted(self) -> None:
        for code, count in self.noted.items():
            if count > MAX_NOTES_PER_CODE:
                self.findings.append(
                    member_finding(
                        code,
                        f"{count - MAX_NOTES_PER_CODE} more {code} findings in this archive's records are "
                        f"not listed (an archive lists {MAX_NOTES_PER_CODE} of each code)",
                        self.ctx,
                        None,
                        None,
                    )
                )

    def u(self, st: struct.Struct, offset: int) -> tuple | None:
        if offset < 0 or offset + st.size > len(self.buf):
            return None
        return st.unpack_from(self.buf, offset)

    # -- end records ---------------------------------------------------------------------------
    def read(self) -> ZipArchive | None:
        archive = self._read()
        self._unlisted()  # into self.findings: the archive's own list
        return archive

    def _read(self) -> ZipArchive | None:
        eocd = find_eocd(self.buf)
        if eocd is None:
            self.note(
                "SL205", "no end-of-central-directory record: the zip archive is truncated or not a zip"
            )
            return None
        (_, disk, cd_disk, on_disk, total, cd_size, cd_offset, comment_len) = _EOCD.unpack_from(
            self.buf, eocd
        )
        comment = bytes(self.buf[eocd + _EOCD.size : eocd + _EOCD.size + comment_len])
        end = min(len(self.buf), eocd + _EOCD.size + comment_len)
        if eocd + _EOCD.size + comment_len > len(self.buf):
            self.note("SL205", "the archive comment runs past the end of the file", offset=eocd)
        zip64 = False
        loc = self.u(_LOCATOR, eocd - _LOCATOR.size)
        if loc is not None and loc[0] == ZIP64_LOCATOR_SIG:
            # miniz follows the locator's offset; Python's zipfile reads the record right before the
            # locator. When those differ the two readers may see different archives.
            z64_offset, expected = loc[2], eocd - _LOCATOR.size - _ZIP64_EOCD.size
            rec = self._zip64_record(z64_offset)
            if rec is not None:
                self.refusal = _miniz_zip64_refusal(loc, rec, z64_offset, eocd - _LOCATOR.size)
            if z64_offset != expected and rec is None and self._displaced(eocd, z64_offset, expected):
                # The whole archive sits further on (a checkpoint stored in a tar, a stub put in
                # front): the locator's offset counts from the archive's start, as all its offsets
                # do. Python's zipfile reads the record it means; torch opens no such archive.
                rec, z64_offset = self._zip64_record(expected), expected
            if z64_offset != expected:
                self.note(
                    "SL306",
                    f"ZIP64 locator points to offset {z64_offset}, not right before itself ({expected})",
                    offset=eocd - _LOCATOR.size,
                )
                if z64_offset > len(self.buf) - _ZIP64_EOCD.size:
                    # miniz refuses the archive (torch cannot open it); zipfile's view is the one left.
                    rec = rec or self._zip64_record(expected)
                    self.refusal = (
                        f"the ZIP64 locator points to offset {z64_offset}, too near the end of the "
                        "file for a ZIP64 end record",
                        eocd - _LOCATOR.size,
                    )
            if rec is None:
                # miniz then reads the EOCD's own values, whatever lies right before the locator.
                self.note(
                    "SL306",
                    "ZIP64 locator without a ZIP64 end record where it points: torch reads the end "
                    "record's values"
                    + (", Python's zipfile the record before the locator" if self._zip64_record(expected) else ""),
                    offset=eocd - _LOCATOR.size,
                )
            else:
                zip64 = True
                (_, _, _, _, z_disk, z_cd_disk, z_on_disk, z_total, z_cd_size, z_cd_offset) = rec
                pairs = [
                    ("entry count", total, z_total, _U16),
                    ("entries on disk", on_disk, z_on_disk, _U16),
                    ("central directory size", cd_size, z_cd_size, _U32),
                    ("central directory offset", cd_offset, z_cd_offset, _U32),
                ]
                for label, small, big, sentinel in pairs:
                    if small != sentinel and small != big:
                        self.note(
                            "SL306",
                            f"EOCD {label} {small} disagrees with the ZIP64 record's {big}",
                            offset=eocd,
                        )
                total, on_disk, cd_size, cd_offset = z_total, z_on_disk, z_cd_size, z_cd_offset
                disk, cd_disk = z_disk, z_cd_disk
        multi_disk = (disk, cd_disk) not in ((0, 0), (1, 1))
        if total != on_disk or multi_disk:
            self.note("SL306", f"multi-disk fields set (disk {disk}, directory disk {cd_disk})", offset=eocd)

        shift = _directory_shift(self.buf, eocd, cd_offset, cd_size, total)
        if shift is None:
            self.note("SL205", "the central directory is not where the end record says", offset=eocd)
            return ZipArchive(
                [], self.findings, eocd, end, cd_offset, cd_size, 0, zip64, comment, miniz_refusal=self.refusal
            )
        if shift:
            self.note(
                "SL305",
                f"the archive's offsets are relative to byte {shift}: {shift} bytes were put in front "
                "of it. Python's zipfile reads it; torch's reader does not",
                offset=0,
            )
        cd_start = cd_offset + shift
        if cd_start + cd_size > len(self.buf):
            self.note("SL205", "the central directory runs past the end of the file", offset=cd_start)
        entries = self._central(cd_start, cd_size, total, shift, disk)
        archive = ZipArchive(
            entries, self.findings, eocd, end, cd_start, cd_size, shift, zip64, comment, miniz_refusal=self.refusal
        )
        self._check_layout(archive)
        return archive

    def _displaced(self, eocd: int, z64_offset: int, expected: int) -> bool:
        """The ZIP64 record right before the locator, and the directory it names, are where the
        locator and that record say once every offset is moved by the same number of bytes, and the
        directory is not where the offsets say unmoved (where miniz would find one)."""
        rec = self._zip64_record(expected)
        if rec is None:
            return False
        total, cd_size, cd_offset = rec[7], rec[8], rec[9]
        move = expected - z64_offset
        return move > 0 and _directory_shift(self.buf, eocd, cd_offset, cd_size, total) == move

    def _zip64_record(self, offset: int) -> tuple | None:
        rec = self.u(_ZIP64_EOCD, offset)
        return rec if rec is not None and rec[0] == ZIP64_EOCD_SIG else None

    # -- central directory ---------------------------------------------------------------------
    def _central(self, start: int, size: int, total: int, shift: int, disk: int) -> list[ZipEntry]:
        limit = self.ctx.limits.max_zip_members
        entries: list[ZipEntry] = []
        buf = self.buf
        nbuf = len(buf)
        unpack = _CENTRAL.unpack_from
        rec_size = _CENTRAL.size
        pos = start
        stop = min(nbuf, start + size)
        odd_disk = False  # reported once: one such entry is enough for torch to refuse the archive
        while pos < stop:
            if len(entries) >= limit:
                self.note("SL203", f"more than {limit} zip members; the rest were not read", offset=pos)
                break
            # Inlined ``self.u(_CENTRAL, pos)``: this loop runs once per member.
            rec = None if pos < 0 or pos + rec_size > nbuf else unpack(buf, pos)
            if rec is None or rec[0] != CENTRAL_SIG:
                if len(entries) < total:
                    self.note("SL205", f"central directory record {len(entries)} is damaged", offset=pos)
                elif pos < stop:
                    self.note("SL306", "bytes after the last central directory record", offset=pos)
                break
            (_, _, _, flags, method, _, _, crc, comp, usize, nlen, xlen, clen, start_disk, _, ext_attr, hoff) = rec
            name_at = pos + rec_size
            raw_name = bytes(buf[name_at : name_at + nlen])
            if start_disk != disk and start_disk != 1 and not odd_disk:
                odd_disk = True
                self.note(
                    "SL306",
                    f"central directory entry {len(entries)} starts on disk {start_disk}: torch's reader "
                    "refuses the archive (a multi-disk entry), Python's zipfile ignores the field",
                    offset=pos,
                )
            if name_at + nlen + xlen + clen > nbuf:
                self.note("SL205", "central directory record runs past the end of the file", offset=pos)
                break
            if name_at + nlen + xlen + clen > start + size and len(entries) < total and self.refusal is None:
                # zipfile reads the record's name and extra fields cut short at the directory's end.
                self.refusal = (
                    f"central directory record {len(entries)} runs past the end of the directory "
                    f"({start + size}), by its name, extra field and comment lengths",
                    pos,
                )
            if comp == _U32 or usize == _U32 or hoff == _U32:
                extra = bytes(buf[name_at + nlen : name_at + nlen + xlen])
                usize, comp, hoff = self._zip64_extra(extra, usize, comp, hoff, raw_name, pos)
            name = raw_name.decode("utf-8", "replace") if flags & FLAG_UTF8 else raw_name.decode("cp437")
            header = hoff + shift
            local_name, local_flags, data_offset = self._local(
                name, raw_name, header, flags, method, crc, comp, usize
            )
            # Positional, in field order: keywords cost a third of building one, once per member.
            entry = ZipEntry(
                len(entries),  # index
                raw_name,
                name,
                flags,
                method,
                crc,
                comp,  # comp_size
                usize,  # size
                header,  # header_offset
                ext_attr,  # external_attr
                local_name,
                local_flags,
                data_offset,
                len(entries) < total,  # counted
            )
            entries.append(entry)
            pos = name_at + nlen + xlen + clen
        if len(entries) != total:
            self.note(
                "SL306",
                f"the end record counts {total} entries, the central directory holds {len(entries)}: "
                "miniz reads the count, Python's zipfile reads to the directory's end",
                offset=start,
            )
        return entries

    def _zip64_extra(
        self, extra: bytes, usize: int, comp: int, hoff: int, raw_name: bytes, pos: int
    ) -> tuple[int, int, int]:
        i = 0
        while i + 4 <= len(extra):
            tag, length = struct.unpack_from("<HH", extra, i)
            body = extra[i + 4 : i + 4 + length]
            if tag == 0x0001:
                values = []
                for j in range(0, len(body) - 7, 8):
                    values.append(struct.unpack_from("<Q", body, j)[0])
                it = iter(values)
                try:
                    if usize == _U32:
                        usize = next(it)
                    if comp == _U32:
                        comp = next(it)
                    if hoff == _U32:
                        hoff = next(it)
                except StopIteration:
                    self.note(
                        "SL306", "ZIP64 extra field too short for the sizes it replaces", _n(raw_name), pos
                    )
                return usize, comp, hoff
            i += 4 + length
        self.note("SL306", "32-bit size or offset is 0xFFFFFFFF but no ZIP64 extra field", _n(raw_name), pos)
        return usize, comp, hoff

    # -- local headers -------------------------------------------------------------------------
    def _local(
        self,
        member: str,
        raw_name: bytes,
        header: int,
        flags: int,
        method: int,
        crc: int,
        comp: int,
        size: int,
    ) -> tuple[bytes | None, int | None, int | None]:
        """The local header's name, flags and where the data starts, reporting where it disagrees
        with the central directory (miniz uses only the header's two lengths)."""
        # One peek for the header and, when it matches, the name: each member's header sits on its
        # own page of a large checkpoint.
        head = (
            None
            if header < 0 or header + _LOCAL.size > len(self.buf)
            else self.peek(header, _LOCAL.size + len(raw_name))
        )
        loc = None if head is None or len(head) < _LOCAL.size else _LOCAL.unpack_from(head)
        if loc is None or loc[0] != LOCAL_SIG:
            self.note("SL205", "no local file header where the central directory points", member, header)
            return None, None, None
        (_, _, lflags, lmethod, _, _, lcrc, lcomp, lsize, nlen, xlen) = loc
        name_at = header + _LOCAL.size
        local_name = (
            bytes(head[_LOCAL.size : _LOCAL.size + nlen])
            if nlen <= len(raw_name)
            else bytes(self.peek(name_at, nlen))
        )
        if local_name != raw_name:
            self.note(
                "SL302",
                f"local header names {escape(_n(local_name))}, the central directory {escape(member)}: "
                "torch reads it under the central name, Python's zipfile refuses it",
                member,
                header,
            )
        if flags & ~_ORDINARY_FLAGS:
            self.note(
                "SL301",
                f"general-purpose flags {flags:#06x} (encryption/patch/reserved bits)",
                member,
                header,
            )
        if lflags != flags:
            self.note(
                "SL301",
                f"local header flags {lflags:#06x} differ from the central directory's {flags:#06x}",
                member,
                header,
            )
        if lmethod != method:
            self.note(
                "SL306", f"local header method {lmethod} differs from the central {method}", member, header
            )
        if not lflags & FLAG_DESCRIPTOR:
            if lcrc != crc:
                self.note("SL300", "local header CRC differs from the central directory's", member, header)
            if _U32 not in (lcomp, lsize) and (lcomp, lsize) != (comp, size):
                self.note("SL306", "local header sizes differ from the central directory's", member, header)
        return local_name, lflags, name_at + nlen + xlen

    # -- layout: overlaps, duplicates, bytes outside the archive --------------------------------
    def _check_layout(self, archive: ZipArchive) -> None:
        spans: list[tuple[int, int, str]] = []
        for e in archive.entries:
            if e.data_offset is None:
                continue
            end = e.data_offset + e.comp_size
            if e.flags & FLAG_DESCRIPTOR:
                end += self._descriptor_len(end)
            spans.append((e.header_offset, end, e.name))
        spans.sort()
        reach, reach_name = -1, ""
        for start, end, name in spans:
            if start < reach:
                self.note("SL304", f"entries {escape(reach_name)} and {escape(name)} overlap", name, start)
            if end > reach:
                reach, reach_name = end, name
        directory = (archive.cd_offset, archive.end)
        for s, e, n in spans:
            if s < directory[1] and directory[0] < e:
                self.note("SL304", f"entry {escape(n)} overlaps the central directory", n, s)
        seen: dict[bytes, ZipEntry] = {}
        for e in archive.entries:
            key = e.raw_name.lower()
            if key in seen:
                first = seen[key]
                self.note(
                    "SL303",
                    f"{escape(e.name)} duplicates {escape(first.name)} (miniz compares names case-insensitively); "
                    "readers disagree on which one is the member",
                    e.name,
                    e.header_offset,
                )
            else:
                seen[key] = e
        # Bytes no record claims: before the first header, between entries, after the end record.
        covered = sorted([(s, e) for s, e, _ in spans] + [(archive.cd_offset, archive.end)])
        regions: list[tuple[int, int]] = []
        cursor = 0
        for s, e in covered:
            if s > cursor:
                regions.append((cursor, s))
            cursor = max(cursor, e)
        if cursor < len(self.buf):
            regions.append((cursor, len(self.buf)))
        for s, e in regions:
            where = (
                "before the archive"
                if s == 0
                else "after the archive"
                if e == len(self.buf)
                else "between entries"
            )
            self.note("SL305", f"{e - s} bytes {where} (offsets {s}-{e}) belong to no zip record", offset=s)
        archive.extra_regions = regions

    def _descriptor_len(self, at: int) -> int:
        """Data descriptors are 12-24 bytes; take the length after which the next record starts."""
        # 4 + 20 + 4: a signature, the longest body, the next record's signature.
        near = bytes(self.peek(at, 28)) if at >= 0 else b""
        base = 4 if near[:4] == DESCRIPTOR_SIG else 0
        for body in (12, 20):
            start = base + body
            if near[start : start + 4] in _NEXT_RECORD:
                return base + body
        return base + 12


_NEXT_RECORD = (LOCAL_SIG, CENTRAL_SIG, ZIP64_EOCD_SIG, EOCD_SIG)


def _n(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def read_archive(buf: memoryview, ctx: ReadContext) -> ZipArchive | None:
    """Parse the archive's directory and local headers; None when there is no end record at all.

    Findings land in ``archive.findings`` (or, for None, are lost: call ``sniff`` first). Callers
    copy them and never change the archive: one parse per buffer serves every zip-based reader.
    """
    key = (id(buf), ctx.member, ctx.file_offset)
    hit = ctx.shared.get("zip")
    if isinstance(hit, tuple) and hit[0] == key and hit[1] is buf:
        archive: ZipArchive | None = hit[2]
        return archive
    archive = _Reader(buf, ctx).read()
    ctx.shared["zip"] = (key, buf, archive)  # holds buf, so its id cannot be reused meanwhile
    return archive


def entries(buf: memoryview, ctx: ReadContext) -> list[ZipEntry]:
    """The archive's entries in central-directory order (for readers of zip-based formats)."""
    archive = read_archive(buf, ctx)
    return [] if archive is None else archive.entries


def extract(buf: memoryview, entry: ZipEntry, ctx: ReadContext, *, check_crc: bool = True) -> Extracted:
    """The bytes torch's reader would return for ``entry``: stored ones zero-copy, deflated ones
    inflated under the file's decompression budget and ratio limit."""
    findings: list[Finding] = []

    def note(code: str, message: str) -> None:
        findings.append(member_finding(code, message, ctx, entry.name, entry.header_offset))

    if entry.data_offset is None:
        return Extracted(None, None, findings, False)
    start = entry.data_offset
    available = max(0, len(buf) - start)
    complete = True
    if entry.size and entry.is_dir:
        note("SL205", "marked as a directory: torch's reader returns no bytes for it")
        complete = False
    if entry.method == STORED:
        want = entry.size
        if entry.comp_size != want:
            note("SL306", f"stored member with compressed size {entry.comp_size} and size {entry.size}")
        if want > available:
            note("SL205", f"member data truncated: {available} of {want} bytes present")
            want, complete = available, False
        data = buf[start : start + want]
        file_offset = None if ctx.file_offset is None else ctx.file_offset + start
    elif entry.method in (DEFLATED, BZIP2, LZMA):
        # torch's reader knows only stored and deflate (it fails on the others); Python's zipfile,
        # which numpy.load and most other zip readers use, also reads bzip2 and LZMA.
        raw = buf[start : start + min(entry.comp_size, available)]
        if entry.comp_size > available:
            note("SL205", f"compressed data truncated: {available} of {entry.comp_size} bytes present")
            complete = False
        inflated, ok = _inflate(raw, entry, ctx, note)
        complete = complete and ok
        data = memoryview(inflated)
        file_offset = None
    else:
        note("SL205", f"compression method {entry.method} is not one torch or safeload reads")
        return Extracted(None, None, findings, False)
    if check_crc and complete:
        findings.extend(crc_findings(data, entry, ctx))
    return Extracted(data, file_offset, findings, complete)


def crc_findings(data: memoryview, entry: ZipEntry, ctx: ReadContext) -> list[Finding]:
    """SL300 when ``data`` (the member's complete bytes) does not hash to the recorded CRC."""
    crc = zlib.crc32(data)
    if crc == entry.crc:
        return []
    message = f"CRC {crc:#010x} does not match the recorded {entry.crc:#010x}"
    return [member_finding("SL300", message, ctx, entry.name, entry.header_offset)]


def deferred_crc(got: Extracted, entry: ZipEntry, ctx: ReadContext) -> Callable[[], list[Finding]] | None:
    """The CRC check of an extracted member, to run only if its content turns out to hold a pickle:
    a bad CRC on bytes nothing unpickles decides nothing about code, and hashing gigabytes of array
    data to learn that costs seconds."""
    data = got.data
    if data is None or not got.complete:
        return None
    return lambda: crc_findings(data, entry, ctx)


def head(raw: memoryview, method: int, n: int) -> bytes | None:
    """The first ``n`` bytes of a member's content (for sniffing), None when they cannot be had.
    Decodes no more than it must: a block of bzip2 at most."""
    try:
        if method == STORED:
            return bytes(raw[:n])
        if method == DEFLATED:
            return zlib.decompressobj(-15).decompress(raw[:4096], n)
        if method == BZIP2:
            return bz2.BZ2Decompressor().decompress(raw, n)
        if method == LZMA:
            return _lzma_decode(raw, n, 4096)[0]  # liblzma's smallest dictionary
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError):
        return None
    return None


def _lzma_decode(raw: memoryview, max_length: int, max_dict: int) -> tuple[bytes, bool]:
    """A zip LZMA member as zipfile reads it: version (2 bytes), properties size (2), the LZMA1
    properties, then a raw LZMA1 stream. Returns (output, end marker reached)."""
    d, body = _lzma_decoder(raw, max_dict)
    return d.decompress(body, max_length), d.eof


def _lzma_decoder(raw: memoryview, max_dict: int) -> tuple[lzma.LZMADecompressor, memoryview]:
    """The raw LZMA1 decoder for a zip LZMA member, and the stream it decodes."""
    if len(raw) < 4:
        raise ValueError("LZMA header truncated")
    props_size = int.from_bytes(raw[2:4], "little")
    if props_size != 5 or len(raw) < 4 + props_size:
        raise ValueError(f"LZMA properties of {props_size} bytes (zip LZMA uses 5)")
    props = bytes(raw[4:9])
    if props[0] >= 9 * 5 * 5:
        raise ValueError("LZMA properties byte out of range")
    pb, rest = divmod(props[0], 9 * 5)
    lp, lc = divmod(rest, 9)
    # liblzma allocates the whole dictionary up front, and a raw decoder takes no memory limit:
    # a header may declare 4 GiB. No match reaches further back than the output allowed here.
    dict_size = min(int.from_bytes(props[1:5], "little"), max_dict)
    filters = [{"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}]
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=filters), raw[9:]


def _inflate(
    raw: memoryview, entry: ZipEntry, ctx: ReadContext, note: Callable[[str, str], None]
) -> tuple[bytes | memoryview, bool]:
    limits = ctx.limits
    ratio_cap = max(1, len(raw)) * limits.max_compression_ratio
    cap = min(entry.size, ratio_cap)
    if entry.size > ratio_cap:
        note(
            "SL309",
            f"declares {entry.size} bytes from {len(raw)} compressed (ratio limit {limits.max_compression_ratio})",
        )
    if not ctx.budget.take(cap):
        note("SL203", f"decompressing {cap} more bytes would pass the file's limit of {ctx.budget.limit}")
        return b"", False
    spool = Spool()
    try:
        decoder: Decoder
        if entry.method == DEFLATED:
            decoder, body = ZlibDecoder(-15), raw
        elif entry.method == BZIP2:
            decoder, body = bz2.BZ2Decompressor(), raw
        else:
            decoder, body = _lzma_decoder(raw, max(4096, cap + 1))
        finished = _decode_into(spool, decoder, body, cap + 1)
        out = spool.view()
    except SpoolError as exc:
        note("SL203", str(exc))
        return b"", False
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        spool.discard()
        note("SL205", f"compressed data is corrupt: {exc}")
        return b"", False
    if entry.method == LZMA:
        # General purpose bit 1: the stream ends with an end marker; without one, its size ends it.
        finished = finished or (not entry.flags & 0x2 and len(out) == entry.size)
    if len(out) > cap:
        if cap < entry.size:
            return out[:cap], False
        note("SL205", f"inflates to more than the {entry.size} bytes recorded; torch's reader fails here")
        return out[:cap], False
    if len(out) < entry.size or not finished:
        note("SL205", f"inflates to {len(out)} bytes, {entry.size} recorded")
        return out, False
    return out, True


def _decode_into(spool: Spool, decoder: Decoder, body: memoryview, limit: int) -> bool:
    """Feed ``body`` to ``decoder`` in chunks, writing at most ``limit`` output bytes to ``spool``
    (a large member goes to a temporary file, not memory). Returns whether the stream ended."""
    pos = 0
    while not decoder.eof and len(spool) < limit:
        if decoder.needs_input:
            if pos >= len(body):
                break
            chunk = bytes(body[pos : pos + IN_CHUNK])
            pos += len(chunk)
        else:
            chunk = b""
        spool.write(decoder.decompress(chunk, min(OUT_CHUNK, limit - len(spool))))
    return decoder.eof
