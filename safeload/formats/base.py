"""What a container reader hands on: pickle streams and a storage index. Bytes in, nothing run.

Every reader works on one read-once buffer (``memoryview``); stored members are zero-copy slices of
it, so the loader unpickles exactly the bytes the scanner walked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from safeload.model import Finding

# Separates nesting levels in a member path: "outer.tar!inner.zip!archive/data.pkl".
NEST_SEP = "!"


class PersistentScheme(str, Enum):
    """Which persistent ids a stream's loader resolves. Anything else is refused."""

    NONE = "none"  # plain pickle: PERSID/BINPERSID must not appear
    TORCH_ZIP = "torch-zip"  # ('storage', storage_type, key, location, numel)
    TORCH_LEGACY = "torch-legacy"  # ('storage', storage_type, key, location, size, view_metadata) / ('module', ...)


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


@dataclass(frozen=True)
class PickleStream:
    member: str | None  # None: the whole file is this stream
    data: memoryview  # exactly the bytes a loader hands to its unpickler (may hold several pickles)
    file_offset: int | None  # where data[0] sits in the file; None when it was decompressed
    role: StreamRole
    persistent_scheme: PersistentScheme = PersistentScheme.NONE
    # Whether a loader reads on after STOP (raw files and the legacy sequence are walked to the end).
    multi: bool = True
    # joblib writes array bytes between opcodes; the walker must skip them as joblib's reader does.
    joblib_arrays: bool = False
    # The stream safeload.load unpickles into the returned object.
    loadable: bool = False
    # Decompression/transport applied by a wrapper (gzip, zlib, ...) before these bytes, for reports.
    encoding: tuple[str, ...] = ()


@dataclass(frozen=True)
class StorageEntry:
    key: str
    data: memoryview  # the storage bytes (a slice of the buffer when stored, else decompressed)
    file_offset: int | None  # absolute offset when the bytes are stored uncompressed (for mmap)


@dataclass
class Container:
    """Everything a reader learned from one buffer."""

    formats: list[str] = field(default_factory=list)
    streams: list[PickleStream] = field(default_factory=list)
    # Storage index for the loadable stream, keyed by the persistent id's key.
    storages: dict[str, StorageEntry] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    # Format facts the loader needs (torch zip record prefix, byte order, legacy storage layout ...).
    meta: dict[str, object] = field(default_factory=dict)
