"""A zip as Python's zipfile reads it (numpy.load's npz reader, and most tools that unpack a zip),
where that differs from torch's reader (zipread's view, which every zip-based reader takes first).

zipfile ignores the end record's entry counts, shifts every offset by what it takes for prepended
bytes, and trusts the ZIP64 record right before the locator. Where that finds a member whose bytes
zipread did not read, the member is read here with zipfile itself (it only parses headers and
inflates: nothing in the member runs). An archive zipread finds nothing odd about is not listed
again: the two readers only part where zipread has a finding.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import msgspec

from safeload.formats import zipread
from safeload.formats.archives import MemoryReader
from safeload.formats.base import ReadContext
from safeload.model import Finding
from safeload.text import escape

if TYPE_CHECKING:
    import zipfile

_CHUNK = 1 << 20


@functools.cache
def _zipfile_errors() -> tuple[type[Exception], ...]:
    """What zipfile raises on a damaged archive or member. A CRC mismatch is raised only at a
    member's end, after numpy's unpickler has read what came before: what was read so far is still
    handed on. (zipfile is imported only for an archive zipread found something odd about: its
    import, with shutil's and threading's, costs a few ms of every scan's start.)"""
    import lzma
    import zipfile

    return (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,
        RuntimeError,
        KeyError,
        IndexError,
        OverflowError,
        zlib.error,
        lzma.LZMAError,
    )


class ZipfileMember(msgspec.Struct):
    name: str
    member: str  # as reports name it
    data: bytes  # the member's bytes as zipfile returns them, or only its head when not wanted whole


def members_only_zipfile_reads(
    buf: memoryview,
    archive: zipread.ZipArchive,
    ctx: ReadContext,
    wanted: Callable[[bytes], bool],
    findings: list[Finding],
) -> Iterator[ZipfileMember]:
    """Members Python's zipfile finds where zipread found other bytes or none. Each adds an SL306
    finding to ``findings`` (with what stopped its reading, if anything). ``wanted(head)`` says from
    a member's first MiB whether its bytes are needed whole (a member a loader would unpickle, or
    one to recognize by content); other members stop there."""
    if not (archive.findings or archive.extra_regions or archive.shift):
        # Every way the two readers part (entry counts, prepended bytes, ZIP64 records, bytes no
        # record claims, overlaps, names) is one of zipread's findings: without any, zipfile lists
        # the same members at the same offsets, and a checkpoint's scan does not pay for asking it.
        return
    most = _directory_size(buf, archive.eocd_offset) // _CENTRAL_RECORD
    if most > ctx.limits.max_zip_members:
        # zipfile would build every record it lists before handing back any: bound that first.
        findings.append(
            zipread.member_finding(
                "SL203",
                f"Python's zipfile would list up to {most} members, more than max_zip_members "
                f"({ctx.limits.max_zip_members}); the archive was not read as numpy.load reads it",
                ctx,
                None,
                archive.eocd_offset,
            )
        )
        return
    import zipfile

    try:
        zf = zipfile.ZipFile(MemoryReader(buf))
        infos = zf.infolist()
    except _zipfile_errors():
        return  # numpy.load cannot open it, so nothing in it is unpickled that way
    read_by_zipread = {(e.header_offset, e.comp_size, e.size, e.method) for e in archive.entries}
    with zf:
        for info in infos[: ctx.limits.max_zip_members]:
            if (
                info.header_offset,
                info.compress_size,
                info.file_size,
                info.compress_type,
            ) in read_by_zipread:
                continue
            if info.filename.endswith("/"):
                continue

            def note(code: str, message: str, info: zipfile.ZipInfo = info) -> None:
                findings.append(zipread.member_finding(code, message, ctx, info.filename, info.header_offset))

            note(
                "SL306",
                "Python's zipfile (numpy.load's and most unpackers' reader) finds this member at offset "
                f"{info.header_offset}, where torch's reader finds other bytes or none: it was read as "
                "zipfile reads it",
            )
            yield ZipfileMember(
                info.filename, ctx.child_member(info.filename), _read(zf, info, ctx, wanted, note)
            )


_CENTRAL_RECORD = 46  # the smallest central directory record
_EOCD_SIZE_AT = 12
_LOCATOR_SIZE = 20
_ZIP64_RECORD_SIZE = 56


def _directory_size(buf: memoryview, eocd: int) -> int:
    """At least the central directory size zipfile takes: the ZIP64 record's right before the
    locator, if there is one, else the end record's (the larger of the two, to bound its work; not
    the end record's 0xFFFFFFFF, which only says that the ZIP64 record has the value)."""
    size = int.from_bytes(buf[eocd + _EOCD_SIZE_AT : eocd + _EOCD_SIZE_AT + 4], "little")
    locator = eocd - _LOCATOR_SIZE
    record = locator - _ZIP64_RECORD_SIZE
    if (
        record >= 0
        and bytes(buf[locator : locator + 4]) == zipread.ZIP64_LOCATOR_SIG
        and bytes(buf[record : record + 4]) == zipread.ZIP64_EOCD_SIG
    ):
        ours = int.from_bytes(buf[record + 40 : record + 48], "little")
        size = ours if size == 0xFFFFFFFF else max(size, ours)
    # Whatever a record says, zipfile reads no more directory than the file holds.
    return min(size, len(buf))


def _read(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    ctx: ReadContext,
    wanted: Callable[[bytes], bool],
    note: Callable[[str, str], None],
) -> bytes:
    """The member's bytes as zipfile returns them, under the file's decompression budget."""
    out = bytearray()
    try:
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                if not ctx.budget.take(len(chunk)):
                    note(
                        "SL203",
                        f"reading it as zipfile does would pass the file's limit of {ctx.budget.limit} bytes",
                    )
                    break
                out += chunk
                if len(out) == len(chunk) and not wanted(bytes(out)):
                    break
    except _zipfile_errors() as exc:
        note("SL205", f"zipfile stops reading it: {type(exc).__name__}: {escape(str(exc))}")
    return bytes(out)
