"""Zip archives, and among them ``torch.save`` checkpoints, found the way torch finds them.

torch's reader (PyTorchStreamReader) takes the record prefix from the *first* central-directory
entry (its name up to the first ``/``), then asks miniz for ``<prefix>/data.pkl``, ``version`` (or
``.data/version``), ``byteorder`` and ``data/<key>`` for each storage. zipread.ZipArchive.locate
reproduces miniz's lookup (case-insensitive, heap-sorted binary search), so ``data.pkl`` is the very
member torch would unpickle, whatever its spelling.

A torch archive yields the data.pkl stream (loadable), every other member that is a pickle by
content or by a ``.pkl`` name (scanned too, SL307), and a storage index; members that are neither
torch's own records nor pickles go back to detection as children. Any other zip hands back all its
members as children. Bytes outside the archive's records are children too, read by content.
"""

from __future__ import annotations

import re

from safeload.formats import raw, zipfile_view, zipread
from safeload.formats.base import (
    Child,
    PersistentScheme,
    PickleStream,
    ReadContext,
    ReadResult,
    StorageEntry,
    StreamRole,
)
from safeload.formats.zipread import ZipArchive, ZipEntry
from safeload.model import Finding, make_finding
from safeload.text import escape

NAME = "torch-zip"
# A torch archive holding a TorchScript program (torch.jit.save): torch.load runs torch.jit.load.
TORCHSCRIPT = "torchscript"
GENERIC = "zip"
# A torch.package archive (PackageExporter): PackageImporter imports the modules shipped in it.
TORCH_PACKAGE = "torch-package"
# Modules a finding names, of those a package ships.
_NAMED_MODULES = 3

# Records torch itself reads or writes beside data.pkl and data/: never pickles.
_TORCH_RECORDS = frozenset(
    {
        b"version",
        b".data/version",
        b"byteorder",
        b".format_version",
        b".storage_alignment",
        b".data/serialization_id",
    }
)
_DATA_DIR = b"data/"


def sniff(buf: memoryview) -> bool:
    return zipread.sniff(buf)


def record_prefix(archive: ZipArchive) -> bytes | None:
    """torch's archive name: the first central entry's name up to its first ``/`` (None: torch refuses)."""
    counted = [e for e in archive.entries if e.counted]
    if not counted:
        return None
    first = counted[0].raw_name
    slash = first.find(b"/")
    return None if slash < 0 else first[:slash]


def read(buf: memoryview, ctx: ReadContext) -> ReadResult:
    archive = zipread.read_archive(buf, ctx)
    if archive is None:
        return ReadResult(
            format=GENERIC,
            findings=[make_finding("SL205", "zip archive without a readable end record", member=ctx.member)],
        )
    prefix = record_prefix(archive)
    data_entry = None if prefix is None else archive.locate(prefix + b"/data.pkl")
    package = None if prefix is None else archive.locate(prefix + b"/.data/extern_modules")
    if prefix is None or data_entry is None:
        result = ReadResult(format=GENERIC if package is None else TORCH_PACKAGE, findings=list(archive.findings))
        for entry in archive.entries:
            _hand_on(buf, entry, ctx, result)
    else:
        result = _read_torch(buf, archive, prefix, data_entry, ctx)
    if package is not None and prefix is not None:
        result.findings.append(_package_finding(archive, prefix, package, ctx))
    _outside_records(buf, archive, ctx, result)
    _zipfile_only(buf, archive, ctx, result)
    result.archive_span = (archive.shift, archive.end)
    return result


def _zipfile_only(buf: memoryview, archive: ZipArchive, ctx: ReadContext, result: ReadResult) -> None:
    """Members only Python's zipfile finds (numpy.load opens any zip as an npz; unpackers read the
    rest): handed on whole, their format decided by content like every other member's."""
    extras = zipfile_view.members_only_zipfile_reads(buf, archive, ctx, lambda _head: True, result.findings)
    for extra in extras:
        if extra.data:
            result.children.append(
                Child(name=extra.name, data=memoryview(extra.data), file_offset=None, encoding=())
            )


def _read_torch(
    buf: memoryview, archive: ZipArchive, prefix: bytes, data_entry: ZipEntry, ctx: ReadContext
) -> ReadResult:
    result = ReadResult(format=NAME, findings=list(archive.findings))
    torchscript = _torchscript(archive, prefix)
    if torchscript is not None:
        result.format = TORCHSCRIPT
        result.findings.append(_program_finding(torchscript, prefix, ctx))
    # torch.load takes the zip path only for files that start with a local header, and miniz reads
    # offsets as absolute: anything else is not a checkpoint torch.load would open as one.
    torch_opens = archive.shift == 0 and bytes(buf[:4]) == zipread.LOCAL_SIG
    data_name = prefix + b"/data.pkl"
    if data_entry.raw_name != data_name:
        result.findings.append(
            make_finding(
                "SL311",
                f"torch loads {escape(data_entry.name)} as data.pkl: its reader compares names case-insensitively",
                member=ctx.child_member(data_entry.name),
                file_offset=None if ctx.file_offset is None else ctx.file_offset + data_entry.header_offset,
            )
        )
    scanned: set[int] = set()
    # Every entry miniz could take for data.pkl is scanned as data.pkl; the one it takes is loadable.
    for entry in [data_entry] + [e for e in archive.same_name(data_name) if e.index != data_entry.index]:
        loadable = entry.index == data_entry.index and torch_opens
        stream = _stream(
            buf,
            entry,
            ctx,
            result,
            StreamRole.TORCH_ZIP_DATA,
            multi=False,
            loadable=loadable,
            torchscript=torchscript is not None,
        )
        if stream is not None:
            result.streams.append(stream)
        scanned.add(entry.index)

    meta: dict[str, object] = {
        "record_prefix": prefix.decode("utf-8", "replace"),
        "data_pkl": data_entry.name,
        "byteorder": "little",
        "torch_opens": torch_opens,
    }
    meta.update(_records(buf, archive, prefix, ctx, result))
    # Read whatever miniz says of the archive: the record's CRC is a finding like any record's.
    undecodable = _serialization_id_refusal(buf, archive, prefix, ctx, result)
    refusal = archive.miniz_refusal or undecodable
    if refusal is not None:
        why, offset = refusal
        meta["torch_refuses"] = {
            "why": why,
            "file_offset": None if ctx.file_offset is None else ctx.file_offset + offset,
        }
    result.meta = meta

    storage_dir = prefix + b"/" + _DATA_DIR
    own = {prefix + b"/" + name for name in _TORCH_RECORDS}
    for entry in archive.entries:
        if entry.index in scanned or entry.raw_name in own:
            continue
        if entry.raw_name.startswith(storage_dir) and len(entry.raw_name) > len(storage_dir):
            _storage(buf, entry, entry.raw_name[len(storage_dir) :], ctx, result)
            continue
        if entry.is_dir and not entry.size:
            continue
        got = zipread.extract(buf, entry, ctx, check_crc=False)
        result.findings.extend(got.findings)
        if got.data is None:
            continue
        if entry.raw_name.lower().endswith(b".pkl") or raw.sniff(got.data):
            if got.complete:
                result.findings.extend(zipread.crc_findings(got.data, entry, ctx))
            under = entry.raw_name.startswith(prefix + b"/")
            program_pickle = torchscript is not None and under and _torchscript_pickle(entry.raw_name[len(prefix) + 1 :])
            result.streams.append(_other_stream(entry, got, ctx, torchscript=program_pickle))
            if not program_pickle:
                result.findings.append(
                    make_finding(
                        "SL307",
                        f"{escape(entry.name)} is a pickle beside data.pkl; scanned with the same policy",
                        member=ctx.child_member(entry.name),
                        file_offset=got.file_offset,
                    )
                )
        else:
            result.children.append(_child(entry, got, ctx))
    return result


def _records(
    buf: memoryview, archive: ZipArchive, prefix: bytes, ctx: ReadContext, result: ReadResult
) -> dict[str, object]:
    """The small records torch reads before data.pkl: version, byteorder, format facts."""
    meta: dict[str, object] = {}

    def record(name: bytes) -> bytes | None:
        entry = archive.locate(prefix + b"/" + name)
        if entry is None:
            return None
        got = zipread.extract(buf, entry, ctx)
        result.findings.extend(got.findings)
        return None if got.data is None else bytes(got.data[:64])

    version = record(b".data/version")
    if version is None:
        version = record(b"version")
    meta["version"] = _leading_int(version)
    byteorder = record(b"byteorder")
    if byteorder is not None:
        if byteorder in (b"little", b"big"):
            meta["byteorder"] = byteorder.decode()
        else:
            result.findings.append(
                make_finding(
                    "SL205",
                    f"byteorder record holds {escape(byteorder)}; torch refuses anything but little/big",
                    member=ctx.child_member((prefix + b"/byteorder").decode("utf-8", "replace")),
                )
            )
    meta["format_version"] = _int(record(b".format_version"))
    meta["storage_alignment"] = _int(record(b".storage_alignment"))
    return meta


def _serialization_id_refusal(
    buf: memoryview, archive: ZipArchive, prefix: bytes, ctx: ReadContext, result: ReadResult
) -> tuple[str, int] | None:
    """torch.load hands the archive's serialization id record to Python as a str: one that is not
    UTF-8 fails the load (UnicodeDecodeError) before data.pkl is read."""
    entry = archive.locate(prefix + b"/.data/serialization_id")
    if entry is None:
        return None
    got = zipread.extract(buf, entry, ctx)
    result.findings.extend(got.findings)
    if got.data is None:
        return None
    try:
        bytes(got.data).decode("utf-8")
    except UnicodeDecodeError as exc:
        return (
            f"its serialization id record ({escape(entry.name)}) is not UTF-8 text (byte {exc.start} "
            "of it), and torch.load fails as it decodes it",
            entry.header_offset,
        )
    return None


def _torchscript(archive: ZipArchive, prefix: bytes) -> ZipEntry | None:
    """The constants.pkl entry that makes torch.load hand the archive to torch.jit.load, if any.
    torch looks for the exact name among its records (_is_torchscript_zip), where other lookups
    ignore case."""
    name = prefix + b"/constants.pkl"
    if archive.locate(name) is None:  # not there in any case: the common answer, from the index
        return None
    # torch's records are the entries the end record counts (miniz's file count).
    return next((e for e in archive.same_name(name) if e.counted and e.raw_name == name), None)


def _torchscript_pickle(name: bytes) -> bool:
    """A pickle TorchScript writes and reads itself (record name under the prefix)."""
    if name in (b"data.pkl", b"constants.pkl", b"bytecode.pkl"):
        return True
    return name.startswith(b"code/") and name.endswith(b".debug_pkl")


def _package_finding(archive: ZipArchive, prefix: bytes, extern: ZipEntry, ctx: ReadContext) -> Finding:
    """PackageImporter (torch.package) opens any torch-style archive holding .data/extern_modules."""
    under = prefix + b"/"
    modules = [
        e.raw_name[len(under) : -3].decode("utf-8", "replace").removesuffix("/__init__").replace("/", ".")
        for e in archive.entries
        if e.raw_name.startswith(under) and e.raw_name.endswith(b".py") and not e.is_dir
    ]
    if modules:
        named = ", ".join(escape(m) for m in modules[:_NAMED_MODULES])
        more = f" and {len(modules) - _NAMED_MODULES} more" if len(modules) > _NAMED_MODULES else ""
        count = "the Python module" if len(modules) == 1 else f"the {len(modules)} Python modules"
        ships = f"{count} shipped in it ({named}{more})"
    else:
        ships = "any Python module shipped in it (this one ships none)"
    return _code_finding(
        "SL313",
        f"a torch.package archive (it holds {escape(extern.name)}): torch.package.PackageImporter imports "
        f"{ships} in place of installed ones whenever a pickle or its caller names them, and runs their code",
        extern,
        ctx,
        remedy="open it with PackageImporter only if you trust its source, after reading the .py files in it",
    )


def _program_finding(constants: ZipEntry, prefix: bytes, ctx: ReadContext) -> Finding:
    code = escape(prefix.decode("utf-8", "replace") + "/code/")
    return _code_finding(
        "SL312",
        f"a TorchScript archive (it holds {escape(constants.name)}): torch.load hands it to torch.jit.load, "
        f"which compiles the program in {code} and runs it, __setstate__ methods while it loads",
        constants,
        ctx,
        remedy="load it with torch.jit.load only if you trust its source, after reading its program "
        f"({code}*.py inside the archive)",
    )


def _code_finding(code: str, message: str, record: ZipEntry, ctx: ReadContext, *, remedy: str) -> Finding:
    """An archive that ships code, reported at the record that makes a loader run it."""
    return make_finding(
        code,
        message,
        member=ctx.child_member(record.name),
        file_offset=None if ctx.file_offset is None else ctx.file_offset + record.header_offset,
        remedy=f"{remedy}; for the weights alone, ask for a state_dict checkpoint "
        "(torch.save(model.state_dict())) or safetensors",
    )


def _leading_int(value: bytes | None) -> int | None:
    """The number torch reads from a version record (std::stoull: leading whitespace, a +, then
    digits; whatever follows is ignored); None when it reads none, or a negative one (which torch
    then refuses as too small or too large)."""
    if value is None:
        return None
    digits = re.match(rb"\s*\+?(\d+)", value)
    return int(digits.group(1)) if digits else None


def _int(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip() or b"x")
    except ValueError:
        return None


def _stream(
    buf: memoryview,
    entry: ZipEntry,
    ctx: ReadContext,
    result: ReadResult,
    role: StreamRole,
    *,
    multi: bool,
    loadable: bool = False,
    torchscript: bool = False,
) -> PickleStream | None:
    got = zipread.extract(buf, entry, ctx)
    result.findings.extend(got.findings)
    if got.data is None:
        result.findings.append(
            make_finding(
                "SL205",
                f"{escape(entry.name)} could not be read; torch's data.pkl was not scanned",
                member=ctx.child_member(entry.name),
            )
        )
        return None
    return PickleStream(
        member=ctx.child_member(entry.name),
        data=got.data,
        file_offset=got.file_offset,
        role=role,
        persistent_scheme=PersistentScheme.TORCH_ZIP,
        # torch's unpickler reads one pickle from data.pkl; the walker reports what follows it.
        multi=multi,
        loadable=loadable,
        encoding=_encoding(entry, ctx),
        torchscript=torchscript,
    )


def _other_stream(
    entry: ZipEntry, got: zipread.Extracted, ctx: ReadContext, *, torchscript: bool
) -> PickleStream:
    assert got.data is not None
    return PickleStream(
        member=ctx.child_member(entry.name),
        data=got.data,
        file_offset=got.file_offset,
        role=StreamRole.TORCH_ZIP_OTHER,
        # Other pickles in a torch archive (TorchScript's constants.pkl ...) use torch's storage ids.
        persistent_scheme=PersistentScheme.TORCH_ZIP,
        multi=True,
        encoding=_encoding(entry, ctx),
        torchscript=torchscript,
    )


def _storage(buf: memoryview, entry: ZipEntry, key_raw: bytes, ctx: ReadContext, result: ReadResult) -> None:
    key = key_raw.decode("utf-8", "replace")
    # Storages are indexed, not read: no CRC (torch does not check one, and nothing unpickles them).
    got = zipread.extract(buf, entry, ctx, check_crc=False)
    result.findings.extend(got.findings)
    if got.data is None:
        return
    if key in result.storages:
        return  # a duplicate name: SL303 already says so, the first one stays indexed
    result.storages[key] = StorageEntry(key=key, data=got.data, file_offset=got.file_offset)


def _encoding(entry: ZipEntry, ctx: ReadContext) -> tuple[str, ...]:
    if entry.method == zipread.STORED:
        return ctx.encoding
    return (*ctx.encoding, "deflate" if entry.method == zipread.DEFLATED else f"zip-method-{entry.method}")


def _child(entry: ZipEntry, got: zipread.Extracted, ctx: ReadContext) -> Child:
    assert got.data is not None
    return Child(
        name=entry.name,
        data=got.data,
        file_offset=got.file_offset,
        encoding=_encoding(entry, ctx),
        verify_if_pickled=zipread.deferred_crc(got, entry, ctx),
    )


def _hand_on(buf: memoryview, entry: ZipEntry, ctx: ReadContext, result: ReadResult) -> None:
    if entry.is_dir and not entry.size:
        return
    got = zipread.extract(buf, entry, ctx, check_crc=False)
    result.findings.extend(got.findings)
    if got.data is not None:
        result.children.append(_child(entry, got, ctx))


def _outside_records(buf: memoryview, archive: ZipArchive, ctx: ReadContext, result: ReadResult) -> None:
    """Bytes before, between or after the records: their own format, maybe a pickle torch.load
    would read instead of the zip (it takes the legacy path when the file does not start with PK)."""
    for start, end in archive.extra_regions:
        name = "<before-zip>" if start == 0 else "<after-zip>" if end == len(buf) else f"<zip-gap-{start}>"
        file_offset = None if ctx.file_offset is None else ctx.file_offset + start
        result.children.append(
            Child(name=name, data=buf[start:end], file_offset=file_offset, encoding=ctx.encoding)
        )
