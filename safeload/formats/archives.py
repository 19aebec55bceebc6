"""Generic archives: tar (tarfile) and 7z (py7zr). Every regular member is handed back as a child.

Tar members are zero-copy slices of the buffer; 7z members are decompressed into memory, every
byte charged to the file's Budget. Zip is not here: zipread.py reads zip the way torch does.

Decisions, so that nothing is skipped silently:
- links, devices, fifos carry no bytes of their own; each gives an SL310 (low, informational)
  finding. A hard link's target inside the archive is scanned as its own member.
- duplicate member names give SL303: which copy a reader takes differs between readers; all are
  scanned.
- bytes after the point where tarfile stops reading (its end marker, or a header it cannot parse),
  unless they are zero padding, are handed on as a child ``<after-tar>`` and give SL205.
- a 7z archive that cannot be fully opened (encryption, an unsupported filter, a corrupt stream)
  gives SL205 (SL208 where py7zr is not installed); members decompressed before the failure are
  still handed on.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import TYPE_CHECKING, Any

from safeload.formats.base import Child, ReadContext, ReadResult
from safeload.formats.compressed import IN_CHUNK, OUT_CHUNK, Meter
from safeload.formats.spool import Spool, SpoolError
from safeload.model import Finding, make_finding

if TYPE_CHECKING:
    import tarfile

NAME = "archive"

SEVENZ_MAGIC = b"7z\xbc\xaf\x27\x1c"
_BLOCK = 512


class MemoryReader(io.RawIOBase):
    """A seekable read-only file over a memoryview, without copying it (tarfile, zipfile, py7zr)."""

    def __init__(self, buf: memoryview) -> None:
        super().__init__()
        self._buf = buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self._buf) - self._pos))
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._buf) if size is None or size < 0 else min(len(self._buf), self._pos + size)
        start = min(self._pos, end)
        self._pos = max(self._pos, end)
        return bytes(self._buf[start:end])

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = len(self._buf) + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos


# Every byte int(field, 8) can accept (digits, sign, 0o prefix, underscores, ASCII whitespace):
# a field with any other byte fails it, and the test of every zip or pickle then skips raising.
_OCTAL_FIELD = b"\t\n\x0b\x0c\r +-01234567O_o"


def _tar_checksum_ok(block: bytes) -> bool:
    field = block[148:156].split(b"\0", 1)[0].strip(b" ")
    if field.translate(None, _OCTAL_FIELD):
        return False
    try:
        stored = int(field, 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:512])
    # Old writers summed signed chars; tarfile accepts both.
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:512] if b >= 0x80)
    return stored in (unsigned, signed)


def is_tar(buf: memoryview) -> bool:
    """A first header block whose checksum holds (tarfile's own test), with a name in it."""
    if len(buf) < _BLOCK:
        return False
    block = bytes(buf[:_BLOCK])
    return block[0] != 0 and _tar_checksum_ok(block)


def is_7z(buf: memoryview) -> bool:
    return bytes(buf[:6]) == SEVENZ_MAGIC


def sniff(buf: memoryview) -> bool:
    return is_7z(buf) or is_tar(buf)


def read(buf: memoryview, ctx: ReadContext) -> ReadResult:
    if is_7z(buf):
        return read_7z(buf, ctx)
    return read_tar(buf, ctx)


# -- tar --------------------------------------------------------------------------------------------


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "fifo"
    return f"entry of type {info.type!r}"


def _abs(ctx: ReadContext, offset: int) -> int | None:
    return None if ctx.file_offset is None else ctx.file_offset + offset


def _nonzero_from(buf: memoryview, pos: int) -> int | None:
    """Offset of the first non-zero byte at or after pos, None if there is none."""
    while pos < len(buf):
        chunk = bytes(buf[pos : pos + IN_CHUNK])
        stripped = chunk.lstrip(b"\0")
        if stripped:
            return pos + len(chunk) - len(stripped)
        pos += len(chunk)
    return None


def read_tar(buf: memoryview, ctx: ReadContext) -> ReadResult:
    import tarfile  # here: most scans meet no tar, and its import costs a few ms of each start

    result = ReadResult(format="tar")
    names: Counter[str] = Counter()
    try:
        # "r:" reads the tar as it is: a compressed tar is a gzip/bz2/xz wrapper read by compressed.py.
        tf = tarfile.open(fileobj=MemoryReader(buf), mode="r:")  # noqa: SIM115 - closed below
    except Exception as exc:  # noqa: BLE001 - tarfile lets ValueError, UnicodeError and others escape
        result.findings.append(_unreadable(ctx, f"tar archive could not be opened: {exc}", 0))
        return result
    stopped = False
    count = 0
    try:
        while True:
            try:
                info = tf.next()
            except Exception as exc:  # noqa: BLE001 - see tarfile.open above
                result.findings.append(
                    _unreadable(ctx, f"tar header at offset {tf.offset} could not be read: {exc}", tf.offset)
                )
                stopped = True
                break
            if info is None:
                break
            if count >= ctx.limits.max_zip_members:
                result.findings.append(
                    make_finding(
                        "SL203",
                        f"tar archive has more than max_zip_members ({ctx.limits.max_zip_members}) members; "
                        "the rest were not read",
                        member=ctx.member,
                        file_offset=_abs(ctx, info.offset),
                    )
                )
                stopped = True
                break
            count += 1
            names[info.name] += 1
            _tar_member(tf, info, buf, ctx, result)
        # tf.members grows with every header; it is bounded by the member limit above.
        end = tf.offset
    finally:
        tf.close()
    for name, count in names.items():
        if count > 1:
            result.findings.append(
                make_finding(
                    "SL303",
                    f"tar member name appears {count} times; every copy was scanned",
                    member=ctx.child_member(name),
                )
            )
    if not stopped:
        _after_tar(buf, end, ctx, result)
    result.meta["tar_members"] = count
    return result


def _tar_member(
    tf: tarfile.TarFile, info: tarfile.TarInfo, buf: memoryview, ctx: ReadContext, r: ReadResult
) -> None:
    member = ctx.child_member(info.name)
    if info.isdir():
        return
    if not info.isreg():
        r.findings.append(
            make_finding(
                "SL310",
                f"tar member is a {_kind(info)} (to {info.linkname!r}); it has no bytes of its own and was not read",
                member=member,
                file_offset=_abs(ctx, info.offset),
            )
        )
        return
    if info.sparse is not None:
        _tar_sparse(tf, info, ctx, r)
        return
    start, size = info.offset_data, info.size
    available = max(0, min(size, len(buf) - start))
    if available < size:
        r.findings.append(
            _unreadable(
                ctx,
                f"tar member {info.name!r} declares {size} bytes but the archive ends after {available}",
                start,
                member=member,
            )
        )
    r.children.append(
        Child(
            name=info.name,
            data=buf[start : start + available],
            file_offset=_abs(ctx, start),
            encoding=ctx.encoding,
            offset=start,
        )
    )


def _tar_sparse(tf: tarfile.TarFile, info: tarfile.TarInfo, ctx: ReadContext, r: ReadResult) -> None:
    """GNU sparse members are reassembled the way tarfile.extractfile does, charged to the Budget."""
    meter = Meter(ctx, f"sparse tar member {info.name!r}")
    data = bytearray()
    try:
        f = tf.extractfile(info)
        if f is None:
            return
        with f:
            while True:
                piece = f.read(OUT_CHUNK)
                if not piece:
                    break
                if not meter.charge(len(piece), info.size):
                    assert meter.finding is not None
                    r.findings.append(meter.finding)
                    break
                data += piece
    except Exception as exc:  # noqa: BLE001 - see tarfile.open above
        r.findings.append(
            _unreadable(ctx, f"sparse tar member {info.name!r} could not be read: {exc}", info.offset_data)
        )
    r.children.append(
        Child(name=info.name, data=memoryview(data), file_offset=None, encoding=(*ctx.encoding, "tar-sparse"))
    )


def _after_tar(buf: memoryview, end: int, ctx: ReadContext, r: ReadResult) -> None:
    extra = _nonzero_from(buf, min(end, len(buf)))
    if extra is None:
        return
    # A second archive or an appended pickle starts at the first non-zero byte.
    start = extra
    r.findings.append(
        _unreadable(
            ctx,
            f"tar reading stopped at offset {end}, but non-zero bytes follow at offset {extra}; "
            "they were handed on to be read as their own format",
            extra,
        )
    )
    r.children.append(
        Child(name="<after-tar>", data=buf[start:], file_offset=_abs(ctx, start), encoding=ctx.encoding)
    )


# -- 7z ---------------------------------------------------------------------------------------------


class _BudgetExceeded(Exception):
    """Raised inside py7zr's writer to stop extraction when the Budget or ratio refuses."""


class _Sink:
    """One member's bytes as py7zr writes them (its Py7zIO interface), charged as they arrive."""

    def __init__(self, name: str, meter: Meter, compressed: int) -> None:
        self.name = name
        self.data = Spool()
        self._meter = meter
        self._compressed = compressed
        self._pos = 0

    def write(self, s: bytes | bytearray) -> int:
        if not self._meter.charge(len(s), self._compressed):
            raise _BudgetExceeded(self.name)
        self.data.write(s)
        return len(s)

    def read(self, size: int | None = None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def flush(self) -> None:
        return None

    def size(self) -> int:
        return len(self.data)

    def close(self) -> None:
        return None


class _Factory:
    """py7zr WriterFactory: collects one _Sink per extracted member, in extraction order."""

    def __init__(self, meter: Meter, compressed: int) -> None:
        self.sinks: list[_Sink] = []
        self._meter = meter
        self._compressed = compressed

    def create(self, filename: str) -> _Sink:
        sink = _Sink(filename, self._meter, self._compressed)
        self.sinks.append(sink)
        return sink


def read_7z(buf: memoryview, ctx: ReadContext) -> ReadResult:
    result = ReadResult(format="7z")
    try:
        import py7zr
        import py7zr.exceptions
    except ImportError:
        result.findings.append(
            make_finding(
                "SL208",
                "7z archive, but py7zr is not installed: install safeload[formats] to read it",
                member=ctx.member,
                file_offset=_abs(ctx, 0),
            )
        )
        return result
    meter = Meter(ctx, "7z archive")
    factory = _Factory(meter, len(buf))
    special: dict[str, str] = {}
    try:
        with py7zr.SevenZipFile(MemoryReader(buf), mode="r", max_extract_size=ctx.budget.left + 1) as archive:
            if archive.needs_password():
                result.findings.append(
                    _unreadable(ctx, "7z archive is encrypted; its members could not be read", 0)
                )
                return result
            infos = archive.list()
            if len(infos) > ctx.limits.max_zip_members:
                result.findings.append(
                    make_finding(
                        "SL203",
                        f"7z archive has {len(infos)} members, more than max_zip_members "
                        f"({ctx.limits.max_zip_members}); it was not read",
                        member=ctx.member,
                        file_offset=ctx.file_offset,
                    )
                )
                return result
            declared = sum(int(i.uncompressed or 0) for i in infos if not i.is_directory)
            result.meta["7z_members"] = len(infos)
            result.meta["7z_declared_bytes"] = declared
            # py7zr hands a symlink's target path to the factory as if it were the member's bytes.
            special = {i.filename: "symbolic link" for i in infos if i.is_symlink}
            names = Counter(i.filename for i in infos if not i.is_directory)
            for name, count in names.items():
                if count > 1:
                    result.findings.append(
                        make_finding(
                            "SL303",
                            f"7z member name appears {count} times; every copy was scanned",
                            member=ctx.child_member(name),
                        )
                    )
            archive.extractall(factory=factory)  # type: ignore[arg-type]
    except _BudgetExceeded:
        assert meter.finding is not None
        result.findings.append(meter.finding)
    except py7zr.exceptions.DecompressionBombError as exc:
        # py7zr's own cap (set to the Budget left) fired before our writer saw the bytes.
        result.findings.append(
            make_finding("SL203", f"7z archive: {exc}", member=ctx.member, file_offset=ctx.file_offset)
        )
    except Exception as exc:  # noqa: BLE001 - py7zr raises its own errors, lzma/zlib/bz2 errors, KeyError...
        result.findings.append(
            _unreadable(ctx, f"7z archive could not be fully read: {type(exc).__name__}: {exc}", 0)
        )
    _7z_children(factory, special, ctx, result)
    return result


def _7z_children(factory: _Factory, special: dict[str, str], ctx: ReadContext, r: ReadResult) -> None:
    for sink in factory.sinks:
        if sink.name in special:
            r.findings.append(
                make_finding(
                    "SL310",
                    f"7z member is a {special[sink.name]}; it has no bytes of its own and was not read",
                    member=ctx.child_member(sink.name),
                )
            )
            continue
        if sink.data:
            try:
                data = sink.data.view()
            except SpoolError as exc:
                r.findings.append(
                    make_finding("SL203", f"7z member: {exc}", member=ctx.child_member(sink.name))
                )
                continue
            r.children.append(
                Child(name=sink.name, data=data, file_offset=None, encoding=(*ctx.encoding, "7z"))
            )


def _unreadable(ctx: ReadContext, message: str, offset: int, *, member: str | None = None) -> Finding:
    return make_finding("SL205", message, member=member or ctx.member, file_offset=_abs(ctx, offset))
