"""numpy's .npy and .npz, read the way ``numpy.load`` reads them, without ``allow_pickle``.

``.npy``: magic ``\\x93NUMPY``, version (1,0) / (2,0) / (3,0), a little-endian header length (2 bytes
for version 1, 4 after), then a header that is a Python dict literal, parsed with
``ast.literal_eval`` as numpy does, and its ``descr`` turned into a dtype by numpy's own
``descr_to_dtype``. If the dtype holds objects, numpy ``pickle.load``s the rest of the file: that
becomes a PickleStream (role NPY_OBJECT, multi=False: numpy reads one pickle). Otherwise the rest is
the raw array and its length must be exactly ``prod(shape) * itemsize`` (else SL205).

``.npz``: a zip (np.savez stores, np.savez_compressed deflates). numpy reads it with Python's
zipfile; safeload reads it with zipread.py, which reports every layout on which zip readers
disagree (CRC, flag bits, local/central names, duplicates, overlaps) and scans every member, so no
member zipfile would hand numpy goes unscanned. Every member whose bytes start with the npy magic
is read as .npy (numpy decides by the magic, not by the name); any other member is handed back as a
child. Stored members are zero-copy slices; deflated ones are decompressed under the Budget.

Meta for the loader, ``ReadResult.meta["npy_arrays"]``: a dict from array key to a dict with
  ``member``        member path of the .npy bytes (None for a whole-file .npy)
  ``version``       (major, minor) of the npy format
  ``descr``         the header's descr literal; rebuild the dtype with
                    ``numpy.lib.format.descr_to_dtype(descr)``
  ``dtype``         str of that dtype (for reports)
  ``shape``         tuple of ints
  ``fortran_order`` bool
  ``has_object``    bool: the array is a pickle (the stream), not raw bytes
  ``data_offset``   where the array bytes (or the pickle) start inside the member's bytes
  ``data_length``   byte length of the raw array (None for object arrays)
  ``storage``       key in ``ReadResult.storages`` holding the raw array bytes (None for object arrays)
  ``crc``           (plain arrays in an npz) the CRC-32 the zip records for the member, None when
                    its bytes could not all be read
  ``crc_prefix``    (with ``crc``) the CRC-32 of the member's bytes before ``data_offset``, to
                    continue over the array bytes: ``zlib.crc32(array_bytes, crc_prefix)``
The key is ``"npy"`` for a whole .npy file and the zip member name (``"arr_0.npy"``) in an npz.
For npz, ``meta["npz_members"]`` lists every member name in archive order, and
``meta["npz_other_members"]`` maps each member that is no .npy (numpy.load returns its bytes) to a
dict with ``storage`` (its key in ``ReadResult.storages``; None for an empty directory entry),
``crc`` and ``crc_prefix`` (0).
"""

from __future__ import annotations

import ast
import functools
import math
import struct
import zlib
from typing import TYPE_CHECKING

import msgspec

from safeload.analysis.walker import walk
from safeload.formats import raw, zipfile_view, zipread
from safeload.formats.base import Child, PickleStream, ReadContext, ReadResult, StorageEntry, StreamRole
from safeload.model import Finding, make_finding

if TYPE_CHECKING:
    import numpy as np

NAME = "numpy"

MAGIC = b"\x93NUMPY"
# numpy refuses headers over 10000 characters unless allow_pickle is set, then takes any size.
MAX_HEADER = 1 << 20
ZIP_LOCAL = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_METHODS = {zipread.DEFLATED: "deflate", zipread.BZIP2: "bzip2", zipread.LZMA: "lzma"}
_HEADER_KEYS = {"descr", "fortran_order", "shape"}
_VERSIONS = {(1, 0): ("<H", "latin1"), (2, 0): ("<I", "latin1"), (3, 0): ("<I", "utf8")}


class NpyError(Exception):
    """A .npy header numpy would refuse (kept inside this module; it becomes a finding)."""

    def __init__(self, message: str, offset: int, code: str = "SL205") -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.code = code


class NpyHeader(msgspec.Struct, frozen=True):
    version: tuple[int, int]
    descr: object
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int
    dtype_name: str  # str(dtype), for reports (numpy builds it slowly; it is cached with the header)

    @property
    def has_object(self) -> bool:
        return bool(self.dtype.hasobject)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_header(data: memoryview) -> NpyHeader:
    """The header of one .npy, validated as numpy.lib.format does; NpyError if numpy would refuse it."""
    if len(data) < 10 or bytes(data[:6]) != MAGIC:
        raise NpyError("not an npy array: magic missing or truncated", 0)
    version = (data[6], data[7])
    if version not in _VERSIONS:
        raise NpyError(f"npy format version {version[0]}.{version[1]} is not one numpy reads", 6)
    length_format, encoding = _VERSIONS[version]
    start = 8 + struct.calcsize(length_format)
    if len(data) < start:
        raise NpyError("npy header length is truncated", 8)
    (length,) = struct.unpack_from(length_format, data, 8)
    if length > MAX_HEADER:
        raise NpyError(f"npy header declares {length} bytes, above safeload's limit {MAX_HEADER}", 8, "SL203")
    end = start + length
    if end > len(data):
        raise NpyError(f"npy header declares {length} bytes but only {len(data) - start} follow", start)
    raw = bytes(data[start:end])
    # An npz's members mostly repeat a few headers, and ast.literal_eval compiles its input (tens of
    # microseconds per member): ordinary-sized headers are interpreted once.
    interpret = _interpret_cached if len(raw) <= _CACHED_HEADER else _interpret
    descr, dtype, shape, fortran_order, dtype_name = interpret(raw, encoding, start)
    return NpyHeader(version, descr, dtype, shape, fortran_order, end, dtype_name)


def _interpret(raw: bytes, encoding: str, start: int) -> tuple[object, np.dtype, tuple[int, ...], bool, str]:
    """A header's text as numpy reads it."""
    try:
        text = raw.decode(encoding)
        # numpy's own parser; only literals, nothing is called or imported.
        header = ast.literal_eval(text)
    except (UnicodeDecodeError, SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as exc:
        # numpy retries a version 1/2 header with Python 2 long literals ("3L") stripped; such
        # files are refused here, which fails closed.
        raise NpyError(f"npy header is not a Python literal numpy reads: {exc}", start) from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS or len(header) != len(_HEADER_KEYS):
        raise NpyError("npy header is not a dict with exactly the keys descr, fortran_order, shape", start)
    shape = header["shape"]
    if not isinstance(shape, tuple) or not all(isinstance(x, int) and x >= 0 for x in shape):
        raise NpyError(f"npy shape is not a tuple of non-negative ints: {shape!r}"[:200], start)
    if not isinstance(header["fortran_order"], bool):
        raise NpyError("npy fortran_order is not a bool", start)
    # numpy is imported on the first .npy header, not with the scanner: most scans never need it.
    from numpy.lib.format import descr_to_dtype

    try:
        dtype = descr_to_dtype(header["descr"])
    except Exception as exc:  # noqa: BLE001 - numpy.dtype raises TypeError, ValueError, KeyError...
        raise NpyError(f"npy descr is not a dtype numpy builds: {type(exc).__name__}", start) from None
    return header["descr"], dtype, tuple(int(x) for x in shape), header["fortran_order"], str(dtype)


_CACHED_HEADER = 4096
_interpret_cached = functools.lru_cache(maxsize=256)(_interpret)


def _abs(file_offset: int | None, offset: int) -> int | None:
    return None if file_offset is None else file_offset + offset


def read_npy(
    data: memoryview,
    result: ReadResult,
    ctx: ReadContext,
    *,
    key: str,
    member: str | None,
    file_offset: int | None,
    encoding: tuple[str, ...],
    more: bool = False,
) -> int | None:
    """Read one .npy's bytes into `result` (stream or storage, meta, findings). Returns where the
    array ends in `data`, None if refused.

    more: bytes may follow the array (a file np.save wrote to more than once: np.load reads it, a
    second np.load on the same handle what follows). Without it (an npz member) they are refused.
    """
    try:
        h = parse_header(data)
    except NpyError as exc:
        result.findings.append(
            make_finding(exc.code, exc.message, member=member, file_offset=_abs(file_offset, exc.offset))
        )
        return None
    info: dict[str, object] = {
        "member": member,
        "version": h.version,
        "descr": h.descr,
        "dtype": h.dtype_name,
        "shape": h.shape,
        "fortran_order": h.fortran_order,
        "has_object": h.has_object,
        "data_offset": h.data_offset,
        "data_length": None,
        "storage": None,
    }
    arrays = result.meta.setdefault("npy_arrays", {})
    assert isinstance(arrays, dict)
    if h.has_object:
        pickled = data[h.data_offset :]
        end, walked = len(data), None
        if more:
            # np.load unpickles one pickle and leaves the handle after its STOP: the walker finds
            # it (the scan does not walk it again).
            walked = walk(pickled, limits=ctx.limits, multi=False, fold_values=False)
            if walked.pickles:
                end = h.data_offset + walked.end
                pickled, walked = data[h.data_offset : end], walked.up_to_stop()
        result.streams.append(
            PickleStream(
                member=member,
                data=pickled,
                file_offset=_abs(file_offset, h.data_offset),
                role=StreamRole.NPY_OBJECT,
                multi=False,
                loadable=True,
                encoding=encoding,
                walked=walked,
            )
        )
        arrays[key] = info
        return end
    remaining = len(data) - h.data_offset
    if remaining < h.nbytes or (remaining > h.nbytes and not more):
        what = "is truncated" if remaining < h.nbytes else "has extra bytes after the array"
        result.findings.append(
            make_finding(
                "SL205",
                f"npy array {what}: shape {h.shape} of {h.dtype} needs {h.nbytes} bytes, {remaining} follow the header",
                member=member,
                file_offset=_abs(file_offset, h.data_offset),
            )
        )
        return None
    end = h.data_offset + h.nbytes
    result.storages[key] = StorageEntry(
        key=key, data=data[h.data_offset : end], file_offset=_abs(file_offset, h.data_offset)
    )
    info.update(data_length=h.nbytes, storage=key)
    arrays[key] = info
    return end


def _read_sequence(buf: memoryview, ctx: ReadContext) -> ReadResult:
    """A .npy, and what np.load on the same handle would read after it: more arrays (np.save
    called again on the file), or a pickle (np.load unpickles a file that is no .npy when
    allow_pickle is set). Only the first array is what safeload.load returns, as np.load does."""
    result = ReadResult(format="npy")
    pos, count = 0, 0
    while True:
        count += 1
        first = count == 1
        # Later arrays are read into a result of their own: scanned, never loaded.
        into = result if first else ReadResult(format="npy")
        member = ctx.member if first else ctx.child_member(f"<array {count}>")
        end = read_npy(
            buf[pos:],
            into,
            ctx,
            key="npy",
            member=member,
            file_offset=_abs(ctx.file_offset, pos),
            encoding=ctx.encoding,
            more=True,
        )
        if not first:
            result.findings.extend(into.findings)
            result.streams.extend(msgspec.structs.replace(s, loadable=False) for s in into.streams)
        if end is None or pos + end >= len(buf):
            break
        pos += end
        rest = buf[pos:]
        if bytes(rest[:6]) == MAGIC:
            if count >= ctx.limits.max_streams:
                result.findings.append(
                    make_finding(
                        "SL203",
                        f"more than max_streams ({ctx.limits.max_streams}) arrays; the rest were not read",
                        member=ctx.member,
                        file_offset=_abs(ctx.file_offset, pos),
                    )
                )
                break
            if count == 1:
                result.findings.append(_more_follows("another npy array", ctx, pos))
            continue
        if raw.is_opcode(rest[0]):
            # np.load unpickles anything that is no array: the walker reads it whatever it holds.
            result.findings.append(_more_follows("a pickle", ctx, pos))
            result.streams.append(
                PickleStream(
                    member=ctx.child_member("<appended>"),
                    data=rest,
                    file_offset=_abs(ctx.file_offset, pos),
                    role=StreamRole.RAW,
                    multi=True,
                    encoding=ctx.encoding,
                )
            )
        else:
            result.findings.append(
                make_finding(
                    "SL201",
                    f"{len(rest)} bytes after the npy array are no npy array and no pickle "
                    "(np.load reads neither)",
                    member=ctx.member,
                    file_offset=_abs(ctx.file_offset, pos),
                )
            )
        break
    return result


def _more_follows(what: str, ctx: ReadContext, pos: int) -> Finding:
    return make_finding(
        "SL202",
        f"{what} follows the npy array: np.load reads the array, and a further np.load on the same "
        "handle what follows (np.save wrote to the file again; with allow_pickle, np.load unpickles "
        "what is no array); each was scanned",
        member=ctx.member,
        file_offset=_abs(ctx.file_offset, pos),
    )


# -- npz --------------------------------------------------------------------------------------------


def _first_member_is_npy(buf: memoryview) -> bool:
    if len(buf) < _LOCAL_HEADER.size or bytes(buf[:4]) != ZIP_LOCAL:
        return False
    fields = _LOCAL_HEADER.unpack_from(buf, 0)
    method, comp_size, name_len, extra_len = fields[3], fields[7], fields[9], fields[10]
    start = _LOCAL_HEADER.size + name_len + extra_len
    # A size of 0 may mean "in a data descriptor after the data": decoders stop on their own.
    end = start + comp_size if comp_size else len(buf)
    return zipread.head(buf[start:end], method, len(MAGIC)) == MAGIC


def sniff(buf: memoryview) -> bool:
    """A .npy by its magic; an .npz as a zip whose first member's bytes are an .npy."""
    return bytes(buf[:6]) == MAGIC or _first_member_is_npy(buf)


def read(buf: memoryview, ctx: ReadContext) -> ReadResult:
    if bytes(buf[:6]) == MAGIC:
        result = _read_sequence(buf, ctx)
        if "npy" in result.meta.get("npy_arrays", {}) and not result.streams:
            result.findings.append(
                make_finding("SL400", "npy array without objects: no pickle", member=ctx.member)
            )
        return result
    return read_npz(buf, ctx)


def _plain_array(data: memoryview) -> bool:
    try:
        return not parse_header(data).has_object
    except NpyError:
        return False


def read_npz(buf: memoryview, ctx: ReadContext) -> ReadResult:
    result = ReadResult(format="npz")
    archive = zipread.read_archive(buf, ctx)
    if archive is None:
        result.findings.append(
            make_finding(
                "SL205",
                "npz archive has no end-of-central-directory record",
                member=ctx.member,
                file_offset=ctx.file_offset,
            )
        )
        return result
    # Layout anomalies (CRC, flags, name mismatch, duplicates, overlap, member limit) come from zipread.
    result.findings.extend(archive.findings)
    result.archive_span = (archive.shift, archive.end)
    result.meta["npz_members"] = [e.name for e in archive.entries]
    others: dict[str, dict[str, object]] = {}
    result.meta["npz_other_members"] = others
    npy_count = 0
    for entry in archive.entries:
        if entry.is_dir and not entry.size:
            others[entry.name] = {"storage": None, "crc": None}  # numpy.load gives b"" for it
            continue
        # numpy's zipfile checks each member's CRC as it reads it. A plain array holds no pickle, so
        # its CRC decides nothing about code: skip hashing (and paging in) gigabytes of weights.
        # Object arrays are verified here, other members once detection finds a pickle in them.
        got = zipread.extract(buf, entry, ctx, check_crc=False)
        result.findings.extend(got.findings)
        member = ctx.child_member(entry.name)
        if got.data is None:
            result.findings.append(
                make_finding(
                    "SL205",
                    "npz member's bytes could not be located",
                    member=member,
                    offset=entry.header_offset,
                )
            )
            continue
        encoding = (
            ctx.encoding
            if entry.method == zipread.STORED
            else (*ctx.encoding, _METHODS.get(entry.method, "?"))
        )
        if bytes(got.data[:6]) == MAGIC:
            npy_count += 1
            if got.complete and not _plain_array(got.data):
                result.findings.extend(zipread.crc_findings(got.data, entry, ctx))
            if (
                read_npy(
                    got.data,
                    result,
                    ctx,
                    key=entry.name,
                    member=member,
                    file_offset=got.file_offset,
                    encoding=encoding,
                )
                is not None
            ):
                _note_crc(result, entry, got)
        else:
            # numpy.load hands such a member over as its bytes; what they are is decided by content.
            result.storages[entry.name] = StorageEntry(
                key=entry.name, data=got.data, file_offset=got.file_offset
            )
            others[entry.name] = {
                "storage": entry.name,
                "crc": entry.crc if got.complete else None,
                "crc_prefix": 0,
            }
            result.children.append(
                Child(
                    name=entry.name,
                    data=got.data,
                    file_offset=got.file_offset,
                    encoding=encoding,
                    verify_if_pickled=zipread.deferred_crc(got, entry, ctx),
                )
            )
    for extra in zipfile_view.members_only_zipfile_reads(
        buf, archive, ctx, _object_array_head, result.findings
    ):
        if not _object_array_head(extra.data):
            continue  # numpy.load unpickles nothing of it
        # Another reading of a member the loader already has from zipread: scanned, never loaded.
        reading = ReadResult(format="npz")
        view = memoryview(extra.data)
        read_npy(view, reading, ctx, key=extra.name, member=extra.member, file_offset=None, encoding=())
        result.findings.extend(reading.findings)
        result.streams.extend(msgspec.structs.replace(s, loadable=False) for s in reading.streams)
    if npy_count and not result.streams:
        result.findings.append(
            make_finding("SL400", f"npz of {npy_count} arrays without objects: no pickle", member=ctx.member)
        )
    return result


def _note_crc(result: ReadResult, entry: zipread.ZipEntry, got: zipread.Extracted) -> None:
    """What the loader needs to check a plain array's member CRC as numpy's zipfile does when it
    reads it (the scan has no reason to hash weights): the recorded CRC and the CRC of the header
    that precedes the array bytes, which the loader continues over them."""
    arrays = result.meta["npy_arrays"]
    assert isinstance(arrays, dict)
    info = arrays[entry.name]
    if info["storage"] is None:
        return  # an object array: the scan checked its CRC
    assert got.data is not None
    info["crc"] = entry.crc if got.complete else None
    info["crc_prefix"] = zlib.crc32(got.data[: info["data_offset"]])


def _object_array_head(head: bytes) -> bool:
    """Whether bytes that start like this are an .npy numpy would unpickle (an object array), as far
    as its header tells; a header that does not parse yet counts as one (read on: fail closed)."""
    if head[:6] != MAGIC:
        return False
    try:
        return parse_header(memoryview(head)).has_object
    except NpyError:
        return True
