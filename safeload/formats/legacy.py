"""torch's legacy formats: the pickle sequence (``_use_new_zipfile_serialization=False``) and the tar.

Sequence (torch/serialization.py ``_legacy_save``/``_legacy_load``): five pickles back to back (magic
number, protocol version 1001, sys_info, the object with ``('storage', type, key, location, numel,
view_metadata)`` persistent ids, the sorted storage keys), then for each key an 8-byte
little-endian element count and that many elements. ``torch.load`` unpickles all five in order, so
each is a stream; a payload in any of them runs. The storage region is indexed from the keys and the
element size of each key's storage type, taken from the object pickle's persistent ids.

Tar (torch < 0.1.10, still read by ``_legacy_load``): members ``storages`` (a count, then per storage
a ``(key, location, storage_type)`` pickle followed by the raw storage, then a views pickle),
``tensors`` (a count, then per tensor a pickle followed by binary sizes and strides), ``pickle``
(the object) and ``sys_info`` (unused by torch, scanned all the same). Every pickle in them is a
stream. safeload's loader does not load this format (torch refuses it under weights_only too).

Each pickle is walked once, here: the walk gives where it ends (as CPython's unpickler reads it)
and the few values needed (counts, keys, storage types, by constant folding), and the stream carries
that walk so that the scan does not repeat it. Nothing here unpickles.
"""

from __future__ import annotations

import pickle
import struct
from typing import TYPE_CHECKING

import msgspec

from safeload.analysis.types import ImportSite, WalkResult
from safeload.analysis.walker import walk
from safeload.formats import raw
from safeload.formats.archives import MemoryReader
from safeload.formats.archives import is_tar as _is_tar_archive
from safeload.formats.base import (
    PersistentScheme,
    PickleStream,
    ReadContext,
    ReadResult,
    StorageEntry,
    StreamRole,
)
from safeload.model import Finding, make_finding
from safeload.text import escape

if TYPE_CHECKING:
    import tarfile

NAME = "torch-legacy"
TAR = "torch-legacy-tar"

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
# The magic pickle as every protocol writes it: torch.load requires this exact value first.
_MAGIC_PICKLES = frozenset(pickle.dumps(MAGIC_NUMBER, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1))
_MAGIC_MAX = max(len(p) for p in _MAGIC_PICKLES)
_MAGIC_PREFIXES = tuple(_MAGIC_PICKLES)

_SEQUENCE_ROLES = (
    StreamRole.LEGACY_MAGIC,
    StreamRole.LEGACY_PROTOCOL,
    StreamRole.LEGACY_SYS_INFO,
    StreamRole.LEGACY_OBJECT,
    StreamRole.LEGACY_STORAGE_KEYS,
)
_TAR_MEMBERS = ("sys_info", "pickle", "storages", "tensors")
_TAR_SNIFF_MEMBERS = 8

# Element sizes by storage class name. torch's unpickler maps any global whose name contains
# "Storage" through this table by *name* (torch.FloatStorage, torch.cuda.FloatStorage ...).
ELEMENT_SIZES: dict[str, int] = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "BFloat16Storage": 2,
    "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8,
    "QInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt8Storage": 1,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
    "UntypedStorage": 1,
}


def element_size(qualname: str) -> int | None:
    """Bytes per element of a storage type named ``torch.FloatStorage`` (module ignored, as torch does)."""
    return ELEMENT_SIZES.get(qualname.rsplit(".", 1)[-1])


def is_sequence(buf: memoryview) -> bool:
    # The scan below can only match a stream that starts with one of the magic pickles: checking
    # that first spares every other file the opcode scan.
    if not bytes(buf[:_MAGIC_MAX]).startswith(_MAGIC_PREFIXES):
        return False
    scan = raw.scan_pickle(buf[:_MAGIC_MAX], 0, max_ops=8)
    return scan.end is not None and bytes(buf[: scan.end]) in _MAGIC_PICKLES


def is_tar(buf: memoryview) -> bool:
    """A tar whose first members are torch's legacy ones, with the object pickle among them."""
    if not _is_tar_archive(buf):
        return False
    import tarfile  # here: only for a buffer that starts with a tar header

    names: set[str] = set()
    try:
        with tarfile.open(fileobj=MemoryReader(buf), mode="r:") as tf:
            for _ in range(_TAR_SNIFF_MEMBERS):
                info = tf.next()
                if info is None:
                    break
                names.add(info.name)
    except (tarfile.TarError, OSError, ValueError, EOFError):
        pass
    return "pickle" in names and bool(names & {"storages", "tensors"})


def sniff(buf: memoryview) -> bool:
    return is_sequence(buf) or is_tar(buf)


def read(buf: memoryview, ctx: ReadContext) -> ReadResult:
    if is_sequence(buf):
        return _read_sequences(buf, ctx)
    return _Tar(buf, ctx).read()


def _read_sequences(buf: memoryview, ctx: ReadContext) -> ReadResult:
    """One checkpoint, and every one torch.save appended to the same file after it: torch.load
    reads the first, each further torch.load on the same handle the next. The later ones are
    scanned as siblings (members ``<appended 2>``, ...), never loaded: however many there are,
    they nest no deeper."""
    result = _Sequence(buf, ctx).read()
    pos, count = result.meta.get("next"), 1
    if isinstance(pos, int):
        result.findings.append(
            make_finding(
                "SL202",
                "another legacy checkpoint follows the last storage (torch.save called again on the "
                "same file): torch.load reads the first, each further torch.load on the same handle "
                "the next; each was scanned",
                member=ctx.member,
                offset=pos,
                file_offset=None if ctx.file_offset is None else ctx.file_offset + pos,
            )
        )
    while isinstance(pos, int):
        count += 1
        if count > ctx.limits.max_streams:
            result.findings.append(
                make_finding(
                    "SL203",
                    f"more than max_streams ({ctx.limits.max_streams}) checkpoints; the rest were not read",
                    member=ctx.member,
                    offset=pos,
                )
            )
            break
        sub = msgspec.structs.replace(
            ctx,
            member=ctx.child_member(f"<appended {count}>"),
            file_offset=None if ctx.file_offset is None else ctx.file_offset + pos,
            shared={},
            release=None,
            peek_file=None,
        )
        more = _Sequence(buf[pos:], sub).read()
        result.findings.extend(more.findings)
        result.streams.extend(msgspec.structs.replace(s, loadable=False) for s in more.streams)
        step = more.meta.get("next")
        pos = pos + step if isinstance(step, int) else None
    return result


# -- values from the walker ------------------------------------------------------------------------


def _qualname(value: object) -> str | None:
    """The qualified name of a global as the walker folds it (an ImportSite), else None."""
    return value.qualname if isinstance(value, ImportSite) else None


class _Base:
    """One reading of a buffer: its reader's state (the result is begun by ``read``)."""

    result: ReadResult

    def __init__(self, buf: memoryview, ctx: ReadContext) -> None:
        self.buf = buf
        self.ctx = ctx

    def note(self, code: str, message: str, offset: int | None, member: str | None = None) -> None:
        self.result.findings.append(self._finding(code, message, offset, member))

    def _finding(self, code: str, message: str, offset: int | None, member: str | None) -> Finding:
        base = self.ctx.file_offset
        return make_finding(
            code,
            message,
            member=self.ctx.child_member(member) if member else self.ctx.member,
            offset=offset,
            file_offset=None if base is None or offset is None else base + offset,
        )

    def stream(
        self,
        start: int,
        end: int,
        role: StreamRole,
        *,
        member: str | None = None,
        base: int = 0,
        multi: bool = False,
        loadable: bool = False,
        scheme: PersistentScheme = PersistentScheme.NONE,
        walked: WalkResult | None = None,
    ) -> PickleStream:
        """A stream over buf[start:end]; ``base`` is where the member holding it starts in buf."""
        file_offset = None if self.ctx.file_offset is None else self.ctx.file_offset + base + start
        s = PickleStream(
            member=self.ctx.child_member(member) if member else self.ctx.member,
            data=self.buf[base + start : base + end],
            file_offset=file_offset,
            role=role,
            persistent_scheme=scheme,
            multi=multi,
            loadable=loadable,
            encoding=self.ctx.encoding,
            walked=walked,
        )
        self.result.streams.append(s)
        return s


# -- the pickle sequence ---------------------------------------------------------------------------


class _Sequence(_Base):
    def read(self) -> ReadResult:
        self.result = ReadResult(format=NAME, meta={"legacy": "sequence"})
        buf = self.buf
        pos = 0
        spans: dict[StreamRole, tuple[int, int]] = {}
        walks: dict[StreamRole, WalkResult] = {}
        for role in _SEQUENCE_ROLES:
            # The walker finds where each pickle ends, and what the object and storage-key
            # pickles hold: one pass over each (the scan walks each stream once more).
            walked = walk(
                buf[pos:],
                limits=self.ctx.limits,
                multi=False,
                fold_values=role is StreamRole.LEGACY_STORAGE_KEYS,
            )
            walks[role] = walked
            end = pos + walked.end if walked.pickles else None
            is_object = role is StreamRole.LEGACY_OBJECT
            scheme = PersistentScheme.TORCH_LEGACY if is_object else PersistentScheme.NONE
            if end is None:
                # The sequence breaks here: the rest is one stream, so the walker reports what a
                # loader would have run before failing.
                self.stream(pos, len(buf), role, multi=True, loadable=is_object, scheme=scheme)
                self.note("SL205", f"legacy torch sequence breaks in its {role.value} pickle", pos)
                return self.result
            self.stream(pos, end, role, loadable=is_object, scheme=scheme, walked=walked.up_to_stop())
            spans[role] = (pos, end)
            pos = end
        self._index_storages(spans, walks, pos)
        return self.result

    def _index_storages(
        self, spans: dict[StreamRole, tuple[int, int]], walks: dict[StreamRole, WalkResult], pos: int
    ) -> None:
        pids = [site.value for site in walks[StreamRole.LEGACY_OBJECT].persistent_ids]
        key_values = walks[StreamRole.LEGACY_STORAGE_KEYS].values
        types: dict[str, str] = {}
        for pid in pids:
            if isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[2], str):
                qualname = _qualname(pid[1])
                if qualname is not None:
                    types.setdefault(pid[2], qualname)
        key_list = key_values[0] if key_values else None
        if not isinstance(key_list, list) or not all(isinstance(k, str) for k in key_list):
            self.note(
                "SL205",
                "the storage keys pickle is not a constant list of strings",
                spans[StreamRole.LEGACY_STORAGE_KEYS][0],
            )
            return
        layout: dict[str, dict[str, object]] = {}
        buf = self.buf
        for key in key_list:
            qualname = types.get(key)
            size = None if qualname is None else element_size(qualname)
            if size is None:
                why = (
                    "no persistent id names it"
                    if qualname is None
                    else f"unknown storage type {escape(qualname)}"
                )
                self.note("SL205", f"storage {escape(key)}: {why}; the storage region cannot be indexed", pos)
                return
            if pos + 8 > len(buf):
                self.note("SL205", f"storage {escape(key)}: the file ends before its element count", pos)
                return
            # Read without mapping the page: one per storage, far apart in a large file.
            (count,) = struct.unpack_from("<q", self.ctx.peek(buf, pos, 8))
            nbytes = count * size
            if count < 0 or pos + 8 + nbytes > len(buf):
                self.note(
                    "SL205", f"storage {escape(key)} declares {count} elements, past the end of the file", pos
                )
                return
            start = pos + 8
            file_offset = None if self.ctx.file_offset is None else self.ctx.file_offset + start
            self.result.storages[key] = StorageEntry(
                key=key, data=buf[start : start + nbytes], file_offset=file_offset
            )
            layout[key] = {"offset": start, "numel": count, "element_size": size, "storage_type": qualname}
            pos = start + nbytes
        self.result.meta["storages"] = layout
        self.result.meta["end"] = pos  # where the checkpoint ends (and a next one may start)
        if pos < len(buf):
            self._after_storages(pos)

    def _after_storages(self, pos: int) -> None:
        tail = self.buf[pos:]
        if not is_sequence(tail):
            self.note("SL201", f"{len(tail)} bytes after the last storage", pos)
            return
        # torch.save called again on the file handle: each further torch.load on it reads the next
        # checkpoint (read() goes on from here).
        self.result.meta["next"] = pos


# -- the tar format --------------------------------------------------------------------------------


class _Tar(_Base):
    def read(self) -> ReadResult:
        import tarfile

        from safeload.formats.archives import MemoryReader

        self.result = ReadResult(
            format=TAR,
            meta={"legacy": "tar", "loadable": False, "why": "the legacy tar format is not loaded"},
        )
        members: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(fileobj=MemoryReader(self.buf), mode="r:") as tf:
                for count, info in enumerate(tf):
                    if count >= self.ctx.limits.max_zip_members:
                        self.note("SL203", "too many tar members; the rest were not read", info.offset)
                        break
                    if not info.isreg():
                        continue
                    if info.name in members:
                        # tarfile (and so torch) takes the last member of a name; both are scanned.
                        self.note(
                            "SL303", f"tar member {escape(info.name)} appears twice", info.offset, info.name
                        )
                        self._member(members[info.name])
                    members[info.name] = info
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
            self.note("SL205", f"tar could not be read to its end: {escape(str(exc))}", None)
        for info in members.values():
            self._member(info)
        return self.result

    def _member(self, info: tarfile.TarInfo) -> None:
        base, size = info.offset_data, info.size
        if base + size > len(self.buf):
            self.note(
                "SL205", f"tar member {escape(info.name)} runs past the end of the file", base, info.name
            )
            size = max(0, len(self.buf) - base)
        data = self.buf[base : base + size]
        if info.name == "storages":
            self._storages(data, base, info.name)
        elif info.name == "tensors":
            self._tensors(data, base, info.name)
        elif info.name in _TAR_MEMBERS or raw.sniff(data):
            if info.name not in _TAR_MEMBERS:
                self.note(
                    "SL307", f"unexpected pickle {escape(info.name)} in a legacy torch tar", base, info.name
                )
            scheme = PersistentScheme.TORCH_LEGACY_TAR if info.name == "pickle" else PersistentScheme.NONE
            self.stream(
                0, size, StreamRole.LEGACY_TAR, member=info.name, base=base, multi=True, scheme=scheme
            )

    def _pickle(self, data: memoryview, pos: int, base: int, member: str) -> tuple[int, object] | None:
        """One pickle of a storages/tensors member: a stream, its end and its folded value."""
        if len(self.result.streams) >= self.ctx.limits.max_streams:
            self.note(
                "SL203",
                f"{member}: more pickles than max_streams; the rest were not read",
                base + pos,
                member,
            )
            return None
        walked = walk(data[pos:], limits=self.ctx.limits, multi=False)
        end = pos + walked.end if walked.pickles else None
        if end is None:
            self.stream(pos, len(data), StreamRole.LEGACY_TAR, member=member, base=base, multi=True)
            self.note(
                "SL205",
                f"a pickle in {member} does not end; the rest was scanned as one stream",
                base + pos,
                member,
            )
            return None
        self.stream(pos, end, StreamRole.LEGACY_TAR, member=member, base=base, walked=walked.up_to_stop())
        return end, walked.values[0] if walked.values else None

    def _rest(self, data: memoryview, pos: int, base: int, member: str, why: str) -> None:
        if pos < len(data):
            self.stream(pos, len(data), StreamRole.LEGACY_TAR, member=member, base=base, multi=True)
        self.note("SL205", f"{member}: {why}; the rest was scanned as one stream", base + pos, member)

    def _storages(self, data: memoryview, base: int, member: str) -> None:
        got = self._pickle(data, 0, base, member)
        if got is None:
            return
        pos, count = got
        if not isinstance(count, int) or count < 0:
            return self._rest(data, pos, base, member, "the storage count is not a constant")
        for _ in range(count):
            got = self._pickle(data, pos, base, member)
            if got is None:
                return
            pos, desc = got
            qualname = _qualname(desc[2]) if isinstance(desc, tuple) and len(desc) == 3 else None
            size = None if qualname is None else element_size(qualname)
            if size is None or pos + 8 > len(data):
                return self._rest(
                    data, pos, base, member, "a storage description names no known storage type"
                )
            (numel,) = struct.unpack_from("<q", data, pos)
            if numel < 0 or pos + 8 + numel * size > len(data):
                return self._rest(
                    data, pos, base, member, f"a storage declares {numel} elements, past the member's end"
                )
            pos += 8 + numel * size
        got = self._pickle(data, pos, base, member)  # the views list
        if got is not None and got[0] < len(data):
            self._rest(data, got[0], base, member, "bytes after the storage views")

    def _tensors(self, data: memoryview, base: int, member: str) -> None:
        got = self._pickle(data, 0, base, member)
        if got is None:
            return
        pos, count = got
        if not isinstance(count, int) or count < 0:
            return self._rest(data, pos, base, member, "the tensor count is not a constant")
        for _ in range(count):
            got = self._pickle(data, pos, base, member)
            if got is None:
                return
            pos = got[0]
            if pos + 8 > len(data):
                return self._rest(data, pos, base, member, "a tensor's dimensions are missing")
            (ndim,) = struct.unpack_from("<i", data, pos)
            skip = 8 + 16 * ndim + 8
            if ndim < 0 or pos + skip > len(data):
                return self._rest(
                    data, pos, base, member, f"a tensor declares {ndim} dimensions, past the member's end"
                )
            pos += skip
        if pos < len(data):
            self._rest(data, pos, base, member, "bytes after the last tensor")
