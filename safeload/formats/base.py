"""What a container reader hands on: pickle streams and a storage index. Bytes in, nothing run.

Every reader works on one read-once buffer (``memoryview``); stored members are zero-copy slices of
it, so the loader unpickles exactly the bytes the scanner walked.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

import msgspec

from safeload.limits import Limits
from safeload.model import Finding

if TYPE_CHECKING:
    from safeload.analysis.types import WalkResult

# Separates nesting levels in a member path: "outer.tar!inner.zip!archive/data.pkl".
NEST_SEP = "!"


class PersistentScheme(str, Enum):
    """Which persistent ids a stream's loader resolves. Anything else is refused."""

    NONE = "none"  # plain pickle: PERSID/BINPERSID must not appear
    TORCH_ZIP = "torch-zip"  # ('storage', storage_type, key, location, numel)
    TORCH_LEGACY = "torch-legacy"  # ('storage', storage_type, key, location, size, view_metadata) / ('module', ...)
    TORCH_LEGACY_TAR = "torch-legacy-tar"  # legacy tar "pickle" member: a str key, or (class, source_file, source)


class StreamRole(str, Enum):
    RAW = "raw"  # a file that is a pickle (possibly several back to back)
    TORCH_ZIP_DATA = "torch-zip-data"  # <prefix>/data.pkl: the object torch.load returns
    TORCH_ZIP_OTHER = "torch-zip-other"  # any other member that is a pickle by content
    LEGACY_MAGIC = "legacy-magic"
    LEGACY_PROTOCOL = "legacy-protocol"
    LEGACY_SYS_INFO = "legacy-sys-info"
    LEGACY_OBJECT = "legacy-object"
    LEGACY_STORAGE_KEYS = "legacy-storage-keys"
    LEGACY_TAR = "legacy-tar"  # pickles inside the legacy tar format (sys_info, pickle, tensors)
    NPY_OBJECT = "npy-object"
    JOBLIB = "joblib"
    EMBEDDED = "embedded"  # a pickle found inside another container member by content


class PickleStream(msgspec.Struct, frozen=True):
    member: str | None  # None: the whole file is this stream
    data: memoryview  # exactly the bytes a loader hands to its unpickler (may hold several pickles)
    file_offset: int | None  # where data[0] sits in the file; None when it was decompressed
    role: StreamRole
    persistent_scheme: PersistentScheme = PersistentScheme.NONE
    # Whether a loader reads on after STOP (raw files and the legacy sequence are walked to the end).
    multi: bool = True
    # joblib writes array bytes between opcodes; the walker must skip them as joblib's reader does.
    joblib_arrays: bool = False
    # Read as pickle.py's pure-Python unpickler reads it (joblib.load), not as the C one; implied
    # by joblib_arrays.
    pure_python: bool = False
    # The stream safeload.load unpickles into the returned object.
    loadable: bool = False
    # Decompression/transport applied by a wrapper (gzip, zlib, ...) before these bytes, for reports.
    encoding: tuple[str, ...] = ()
    # Another loader's reading of bytes a more exact reader claims (pickle.load of a joblib file):
    # what it would import counts; that it breaks part way (on array bytes) does not.
    secondary: bool = False
    # Read by TorchScript's own unpickler (torch.jit.load, in C++): it imports no Python and resolves
    # a fixed set of names itself, and the classes of the archive's program (``__torch__.*``).
    torchscript: bool = False
    # Read as a pickle only because the input starts with an opcode byte and fits no format: the
    # scan calls it no pickle (SL204) when no unpickler could act on it (api._not_a_pickle).
    guessed: bool = False
    # The walker's result for exactly ``data`` under these settings, when a reader had to walk it
    # first (the legacy format's boundaries and storage ids): the scan does not walk it again.
    walked: WalkResult | None = None


class StorageEntry(msgspec.Struct):  # a large checkpoint indexes thousands
    key: str
    data: memoryview  # the storage bytes (a slice of the buffer when stored, else decompressed)
    file_offset: int | None  # absolute offset when the bytes are stored uncompressed (for mmap)


class Container(msgspec.Struct):
    """Everything a reader learned from one buffer."""

    formats: list[str] = msgspec.field(default_factory=list)
    streams: list[PickleStream] = msgspec.field(default_factory=list)
    # Storage index for the loadable stream, keyed by the persistent id's key.
    storages: dict[str, StorageEntry] = msgspec.field(default_factory=dict)
    findings: list[Finding] = msgspec.field(default_factory=list)
    # Format facts the loader needs (torch zip record prefix, byte order, legacy storage layout ...).
    meta: dict[str, object] = msgspec.field(default_factory=dict)


class Budget:
    """Decompressed-bytes budget shared by every reader working on one file (zip bombs)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        """Account for n more decompressed bytes; False when that would exceed the limit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used)


class ReadContext(msgspec.Struct):
    """Where a reader's buffer sits: its member path, its place in the file, the nesting depth."""

    path: str  # the file's path (for messages)
    member: str | None  # member path of this buffer (None: the file itself)
    file_offset: int | None  # absolute offset of buf[0] in the file; None once decompressed
    depth: int  # archive-in-archive nesting depth (0: the file)
    limits: Limits
    budget: Budget
    encoding: tuple[str, ...] = ()
    # Parses several readers of the same buffer share (the zip directory: generic zip and npz).
    shared: dict[str, object] = msgspec.field(default_factory=dict)
    # For the file's own mapped buffer only: let go of pages of buf[start:end] a reader has read
    # through and will not need again (compressed input), so that memory does not grow with it.
    release: Callable[[int, int], None] | None = None
    # For the file's own buffer only: buf[offset:offset + size] read without mapping its page (see
    # Source.peek), for the few bytes a reader takes from each of many far-apart pages.
    peek_file: Callable[[int, int], bytes | memoryview] | None = None

    def peek(self, buf: memoryview, offset: int, size: int) -> bytes | memoryview:
        """buf[offset:offset + size], shorter at the end; ``buf`` is this context's buffer."""
        if self.peek_file is not None:
            return self.peek_file(offset, size)
        return buf[offset : offset + size]

    def child_member(self, name: str) -> str:
        return name if self.member is None else f"{self.member}{NEST_SEP}{name}"


class Child(msgspec.Struct, frozen=True):
    """A member a wrapper (gzip, tar, zip, 7z ...) hands back to detection, to be read by content."""

    name: str
    data: memoryview
    file_offset: int | None  # absolute, when stored uncompressed in the file
    encoding: tuple[str, ...] = ()
    # Integrity checks worth paying for only when the member holds a pickle (a zip member's CRC).
    verify_if_pickled: Callable[[], list[Finding]] | None = None
    # Where ``data`` starts in the buffer it was handed on from, when it is a slice of it (a tar
    # member's bytes): detection then knows an archive found in that buffer to be this member.
    offset: int | None = None


class ReadResult(msgspec.Struct):
    """What one reader produced for one buffer; detection merges these into a Container."""

    format: str
    streams: list[PickleStream] = msgspec.field(default_factory=list)
    storages: dict[str, StorageEntry] = msgspec.field(default_factory=dict)
    findings: list[Finding] = msgspec.field(default_factory=list)
    children: list[Child] = msgspec.field(default_factory=list)
    meta: dict[str, object] = msgspec.field(default_factory=dict)
    # A zip reading: (where the archive's offsets count from, the end of its end record) in the buffer.
    archive_span: tuple[int, int] | None = None
